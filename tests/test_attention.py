"""The attention kernels of models/layers.py against a dense reference: splash (Pallas interpret
mode on CPU), the blocked sliding-window path, the arguments of cuDNN's packed layout, the
per-platform resolution, and the TPU lowering of the splash path from this CPU host."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401  (switches eager sharding off)
from models import layers

H, G, K = 4, 2, 16


def _reference(q, k, v, seg, window):
  """Dense masked softmax(q k / sqrt(K)) v with kv heads repeated, in plain jnp (fp32)."""
  t = q.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (j <= i) & ((i - j < window) if window > 0 else True)
  allowed = allowed[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
  return jnp.einsum('bhts,bshk->bthk', p, v)


def _inputs(t, b=2):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, H, K))
  k = jax.random.normal(ks[1], (b, t, G, K))
  v = jax.random.normal(ks[2], (b, t, G, K))
  # two documents + padding (segment 0) in row 0, one document in row 1
  a, c = t // 2, t // 2 + t // 3
  seg = jnp.stack([jnp.array([1] * a + [2] * (c - a) + [0] * (t - c)), jnp.full((t,), 3)])
  return q, k, v, seg


def _values_and_grads(fn, q, k, v, seg, window):
  """(fn's output, the gradients of a nonlinear loss of it) and the same for the reference."""
  def value_and_grads(f):
    loss = lambda q, k, v: jnp.sum(jnp.sin(3.0 * f(q, k, v, seg)))
    return f(q, k, v, seg), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return value_and_grads(fn), value_and_grads(
      lambda q, k, v, seg: _reference(q, k, v, seg, window))


def test_splash_interpret_matches_reference():
  """Causal + segments + sliding window + GQA through the splash kernel (Pallas interpret mode
  on this CPU), T = 136 padded to two 128-blocks: values and gradients. Causal only (the
  kernel's other mask): values. One jitted program (compile time dominates on CPU)."""
  q, k, v, seg = _inputs(136)
  cfg = layers.AttentionConfig(impl='splash', block_q=128, block_kv=128)
  local = functools.partial(layers.attend, window=37, config=cfg)
  causal = functools.partial(layers.attend, window=0, config=cfg)

  @jax.jit
  def run(q, k, v, seg):
    return (_values_and_grads(local, q, k, v, seg, 37),
            (causal(q, k, v, seg), _reference(q, k, v, seg, 0)))

  (got, want), (got_causal, want_causal) = run(q, k, v, seg)
  chex.assert_trees_all_close(got, want, atol=2e-5)
  chex.assert_trees_all_close(got_causal, want_causal, atol=2e-5)


@pytest.mark.parametrize('t,window,block', [(40, 9, 0), (37, 12, 8), (37, 0, 16)])
def test_blocked_matches_reference(t, window, block):
  """Blocked kernel: sliding-window tiles with block = window (one previous block) and
  block < window (two previous blocks, T not a multiple of the block); causal query blocks
  (T not a multiple of the block). Values and gradients with segment ids; values without."""
  q, k, v, seg = _inputs(t)
  cfg = layers.AttentionConfig(impl='blocked', window_block=block)
  fn = functools.partial(layers.attend, window=window, config=cfg)

  @jax.jit
  def run(q, k, v, seg):
    return (_values_and_grads(fn, q, k, v, seg, window),
            (fn(q, k, v, None), _reference(q, k, v, jnp.ones_like(seg), window)))

  (got, want), (got_plain, want_plain) = run(q, k, v, seg)
  chex.assert_trees_all_close(got, want, atol=1e-5)
  chex.assert_trees_all_close(got_plain, want_plain, atol=1e-5)


def test_cudnn_packed_arguments_describe_the_segment_mask():
  """cuDNN's packed layout gets per-row run lengths and offsets (`segment_runs`); the mask they
  describe (`runs_mask`), with causal + window, gives the reference through XLA attention."""
  q, k, v, seg = _inputs(30)
  runs = jax.jit(layers.segment_runs, static_argnums=1)
  seqlen, offsets, ok = runs(seg, 4)
  np.testing.assert_array_equal(seqlen, [[15, 10, 5, -1], [30, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 15, 25, -1, -1], [0, -1, -1, -1, -1]])
  assert bool(ok)
  t = q.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]

  @jax.jit
  def packed_and_reference(q, k, v, seg, seqlen, offsets):
    out = []
    for window in (0, 7):
      allowed = (j <= i) & ((i - j < window) if window else True)
      mask = layers.runs_mask(seqlen, offsets, t) & allowed[None, None]
      out.append((jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla'),
                  _reference(q, k, v, seg, window)))
    return out

  for got, want in packed_and_reference(q, k, v, seg, seqlen, offsets):
    chex.assert_trees_all_close(got, want, atol=1e-5)
  # rows the packed layout cannot express exactly send the kernel to the dense-mask branch
  assert not bool(runs(seg, 2)[2])                         # 3 runs > 2
  assert not bool(runs(jnp.array([[1, 1, 2, 1]]), 4)[2])   # id 1 in two runs


def test_attention_impl_resolution_and_errors():
  r = functools.partial(layers.resolve_attention_impl, 'auto', seq_len=256, head_dim=64)
  assert r(window=0, dtype=jnp.bfloat16, platform='tpu') == 'splash'
  assert r(window=64, dtype=jnp.bfloat16, platform='gpu') == 'cudnn'
  assert r(window=64, dtype=jnp.float32, platform='gpu') == 'blocked'   # cuDNN needs bf16
  assert r(window=64, dtype=jnp.float32, platform='cpu') == 'blocked'
  assert r(window=0, dtype=jnp.float32, platform='cpu') == 'blocked'    # causal blocks
  assert layers.resolve_attention_impl('auto', seq_len=64, head_dim=64, window=0,
                                       dtype=jnp.float32, platform='cpu') == 'xla'  # one block
  assert layers.AttentionConfig(impl='').impl == 'auto'
  with pytest.raises(ValueError, match='model.attention_impl'):
    layers.AttentionConfig(impl='flash')
  with pytest.raises(ValueError, match='model.attention_block_q'):
    layers.AttentionConfig(block_q=100)
  with pytest.raises(ValueError, match='model.attention_window_block'):
    layers.AttentionConfig(window_block=12)
  with pytest.raises(ValueError, match='model.attention_impl'):
    layers.resolve_attention_impl('cudnn', window=0, seq_len=8, dtype=jnp.float32, head_dim=8)


def test_splash_exports_for_tpu():
  """The splash path lowers for TPU from this CPU host: the module holds the Mosaic kernel."""
  b, t = 2, 256
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  cfg = layers.AttentionConfig(impl='splash', block_q=128, block_kv=128)
  fn = jax.jit(lambda q, k, v, seg: layers.attend(q, k, v, seg, window=64, config=cfg))
  exported = jax.export.export(fn, platforms=['tpu'])(
      spec(b, t, H, K), spec(b, t, G, K), spec(b, t, G, K),
      jax.ShapeDtypeStruct((b, t), jnp.int32))
  text = exported.mlir_module()
  assert 'tpu_custom_call' in text
