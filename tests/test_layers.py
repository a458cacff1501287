"""Tests for models/layers.py and models/transformer.py against plain-jnp references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models  # noqa: F401  (switches eager sharding off)
from models import layers
from models.transformer import Transformer, convert_layer_layout

D, H, K = 16, 4, 8
# layers and references called through jit: one compilation per call site and shape instead of
# one per operation (eager), the tests' main cost
call = nnx.jit(lambda module, *args: module(*args))
weights = nnx.jit(lambda attn, *args: attn.weights(*args))


def _reference_attention(attn, x_BxTxD, positions_BxT, segment_ids_BxT, window):
  """Dense masked softmax with kv heads repeated to the query heads, in plain jnp."""
  q = jnp.einsum('btd,dhk->bthk', x_BxTxD, attn.q[...])
  k = jnp.einsum('btd,dgk->btgk', x_BxTxD, attn.k[...])
  v = jnp.einsum('btd,dgk->btgk', x_BxTxD, attn.v[...])
  q = layers.rope(q, positions_BxT, attn.rope_base)
  k = layers.rope(k, positions_BxT, attn.rope_base)
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  t = x_BxTxD.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (j <= i) & ((i - j < window) if window > 0 else True)
  allowed = allowed[None, None] & (segment_ids_BxT[:, None, :, None]
                                   == segment_ids_BxT[:, None, None, :])
  s = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
  out = jnp.einsum('bhts,bshk->bthk', p, v)
  return jnp.einsum('bthk,hkd->btd', out, attn.o[...])


reference_attention = nnx.jit(_reference_attention, static_argnums=4)


@pytest.mark.parametrize('num_kv_heads,window', [(4, 0), (2, 0), (1, 3), (2, 5)])
def test_attention_matches_reference(num_kv_heads, window):
  attn = layers.Attention(D, H, num_kv_heads, K, window=window, init_std=0.3,
                          rngs=nnx.Rngs(0))
  b, t = 2, 10
  x = jax.random.normal(jax.random.key(1), (b, t, D))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.array([[1] * 6 + [2] * 4, [1] * 3 + [2] * 5 + [0] * 2])
  y, cache = call(attn, x, pos, seg)
  assert cache is None
  chex.assert_trees_all_close(y, reference_attention(attn, x, pos, seg, window), atol=1e-5)
  # The diagnostic weights are the distribution the layer uses: with v and o they give y.
  w = weights(attn, x, pos, seg)
  chex.assert_trees_all_close(w.sum(-1), jnp.ones((b, H, t)), atol=1e-5)
  v = jnp.repeat(jnp.einsum('btd,dgk->btgk', x, attn.v[...]), H // num_kv_heads, axis=2)
  y_w = jnp.einsum('bthk,hkd->btd', jnp.einsum('bhts,bshk->bthk', w, v), attn.o[...])
  chex.assert_trees_all_close(y_w, y, atol=1e-5)
  # No segment ids: plain causal (+ window).
  ones = jnp.ones((b, t), jnp.int32)
  y, _ = call(attn, x, pos)
  chex.assert_trees_all_close(y, reference_attention(attn, x, pos, ones, window), atol=1e-5)


def test_rope_relative_property():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, K))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, K))

  def score(m, n):
    pm, pn = jnp.full((1, 1), m), jnp.full((1, 1), n)
    return jnp.sum(layers.rope(q, pm, 1e4) * layers.rope(k, pn, 1e4))

  for delta in (0, 3, 17):
    base = score(delta, 0)
    for shift in (1, 10, 250):
      np.testing.assert_allclose(score(delta + shift, shift), base, rtol=1e-4, atol=1e-4)
  assert abs(float(score(5, 0)) - float(score(6, 0))) > 1e-4
  # Rotation preserves norms; position 0 is the identity.
  np.testing.assert_allclose(jnp.linalg.norm(layers.rope(q, jnp.full((1, 1), 7))),
                             jnp.linalg.norm(q), rtol=1e-5)
  chex.assert_trees_all_close(layers.rope(q, jnp.zeros((1, 1))), q, atol=1e-6)


def _stack(window=0, remat=False, scan=False):
  return Transformer(2, D, H, 2, K, 32, window=window, remat=remat, init_std=0.3,
                     scan_layers=scan, rngs=nnx.Rngs(0))


def test_segment_isolation_and_causality():
  model = _stack()
  b, t = 1, 12
  seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2])
  pos = jnp.array([list(range(5)) + list(range(5)) + [0, 0]])
  x = jax.random.normal(jax.random.key(1), (b, t, D))
  noise = jax.random.normal(jax.random.key(2), (b, t, D))
  y, _ = call(model, x, pos, seg)
  assert np.all(np.isfinite(np.asarray(y)))

  in_seg2 = (seg == 2)[..., None]
  y2, _ = call(model, jnp.where(in_seg2, x + noise, x), pos, seg)
  chex.assert_trees_all_close(y2[:, :5], y[:, :5], atol=1e-6)      # segment 1 untouched
  chex.assert_trees_all_close(y2[:, 10:], y[:, 10:], atol=1e-6)    # padding untouched
  assert float(jnp.max(jnp.abs(y2[:, 5:10] - y[:, 5:10]))) > 1e-3

  in_seg1 = (seg == 1)[..., None]
  y1, _ = call(model, jnp.where(in_seg1, x + noise, x), pos, seg)
  chex.assert_trees_all_close(y1[:, 5:], y[:, 5:], atol=1e-6)      # segment 2 untouched

  # Causality: changing position 7 leaves positions < 7 unchanged (no segments given).
  pos_full = jnp.arange(t)[None]
  yc, _ = call(model, x, pos_full)
  yc2, _ = call(model, x.at[:, 7].add(1.0), pos_full)
  chex.assert_trees_all_close(yc2[:, :7], yc[:, :7], atol=1e-6)
  assert float(jnp.max(jnp.abs(yc2[:, 7:] - yc[:, 7:]))) > 1e-3


@pytest.mark.parametrize('window,scan', [(0, False), (3, False), (3, True)])
def test_kv_cache_matches_full_forward(window, scan):
  model = _stack(window, scan=scan)
  b, t, p = 2, 9, 4
  x = jax.random.normal(jax.random.key(1), (b, t, D))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  y_full = nnx.jit(lambda m, x, pos: m(x, pos)[0])(model, x, pos)

  step = jax.jit(lambda x, pos, cache, i: model(x, pos, None, cache, i))
  cache = model.init_cache(b, t)
  y_pre, cache = call(model, x[:, :p], pos[:, :p], None, cache, 0)  # the prefill
  outs = [y_pre]
  for i in range(p, t):
    y_i, cache = step(x[:, i:i + 1], pos[:, i:i + 1], cache, jnp.int32(i))
    outs.append(y_i)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), y_full, atol=1e-5)



@pytest.mark.parametrize('num_kv_heads,window', [(2, 0), (1, 3)])
def test_shared_prefix_tree_matches_full_forward(num_kv_heads, window):
  """A token tree over one cached row (layers.attend_shared_prefix, as the byte-level views'
  branches use it): each token equals the uncached forward of its own path."""
  attn = layers.Attention(D, H, num_kv_heads, K, window=window, init_std=0.3, rngs=nnx.Rngs(0))
  p = 7
  x = np.asarray(jax.random.normal(jax.random.key(2), (1, p + 3, D)))
  prefill = nnx.jit(lambda m, x, cache: m(x, jnp.arange(p)[None], None, cache, 0)[1])
  cache = prefill(attn, x[:, :p], attn.init_cache(1, p + 1))
  # branch a leaves the prefix after slot 4 (two tokens), branch b after slot 6 (one token)
  paths = {'a': (4, [p, p + 1]), 'b': (6, [p + 2])}
  ids, pos, pre, own = [], [], np.zeros((1, 3, p + 1), bool), np.eye(3, dtype=bool)[None]
  want = []
  for anchor, extra in paths.values():
    seq = np.concatenate([x[:, :anchor + 1], x[:, extra]], axis=1)
    full = np.asarray(reference_attention(attn, seq, np.arange(seq.shape[1])[None],
                                          np.ones((1, seq.shape[1]), np.int32), window))
    for i, e in enumerate(extra):
      row = len(ids)
      ids.append(e)
      pos.append(anchor + 1 + i)
      pre[0, row, :anchor + 1] = True
      own[0, row, row - i:row + 1] = True
      want.append(full[:, anchor + 1 + i])

  @nnx.jit
  def tree(m, x, pos, pre, own, cache):
    shared = layers.shared_prefix_cache(cache, pre, own)
    y, out_cache = m(x, pos, None, shared)
    assert out_cache is shared  # nothing written (checked as it traces)
    return y

  y = tree(attn, x[:, ids], np.asarray(pos)[None], pre, own, cache)
  chex.assert_trees_all_close(y[0], np.concatenate(want), atol=1e-5)


def test_remat_matches_plain():
  x = jax.random.normal(jax.random.key(1), (1, 6, D))
  pos = jnp.arange(6)[None]

  def loss(m):
    return jnp.sum(m(x, pos)[0] ** 2)

  grad_fn = nnx.jit(nnx.value_and_grad(loss))
  l0, g0 = grad_fn(_stack(remat=False))
  l1, g1 = grad_fn(_stack(remat='full'))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g0), atol=1e-5)


def test_layer_partition_specs_and_dtypes():
  rngs = nnx.Rngs(0)
  mods = dict(dense=layers.Dense(4, 6, axes=('embed', 'mlp'), rngs=rngs),
              embed=layers.Embed(10, 4, rngs=rngs),
              norm=layers.RMSNorm(4),
              attn=layers.Attention(8, 2, 1, 4, rngs=rngs),
              mlp=layers.MLP(4, 8, rngs=rngs))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(mods)))
  assert tuple(specs['dense']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['norm']['scale']) == ('norm',)
  assert tuple(specs['attn']['q']) == ('embed', 'heads', 'head_dim')
  assert tuple(specs['attn']['k']) == ('embed', 'kv_heads', 'head_dim')
  assert tuple(specs['attn']['o']) == ('heads', 'head_dim', 'embed')
  assert tuple(specs['mlp']['down']['kernel']) == ('mlp', 'embed')
  for leaf in jax.tree.leaves(nnx.state(mods, nnx.Param)):
    assert leaf.dtype == jnp.float32
  # bf16 compute: outputs in bf16, norm statistics still sane.
  norm = layers.RMSNorm(4, dtype=jnp.bfloat16)
  y = norm(jnp.array([[[1e3, -1e3, 1e3, -1e3]]], jnp.float32))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), [[[1, -1, 1, -1]]], rtol=1e-2)


def test_scan_layers_same_model_and_convertible():
  """A scanned stack is the unrolled one with stacked parameters: same init, same outputs and
  gradients (remat per layer inside the scan), and the parameter trees convert both ways."""
  x = jax.random.normal(jax.random.key(1), (2, 6, D))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  unrolled, scanned = _stack(window=3, remat='dots'), _stack(window=3, remat='dots', scan=True)
  p_unrolled = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  p_scanned = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  assert p_scanned['layers']['attn']['q'].shape == (2, D, H, K)
  chex.assert_trees_all_equal(convert_layer_layout(p_unrolled, scanned=True), p_scanned)
  chex.assert_trees_all_equal(convert_layer_layout(p_scanned, scanned=False), p_unrolled)
  adam = optax.adam(1e-3)  # optimizer state: the moments convert with the parameters
  moments = jax.jit(lambda p: adam.update(p, adam.init(p))[1])  # one update, grads = params
  chex.assert_trees_all_equal(convert_layer_layout(moments(p_unrolled), scanned=True),
                              moments(p_scanned))
  spec = nnx.get_partition_spec(nnx.state(scanned))['layers']['mlp']['down']['kernel']
  assert tuple(spec) == ('layers', 'mlp', 'embed')
  for view, layer in zip(scanned.layers, unrolled.layers, strict=True):  # per-layer reads
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(view)),
                                nnx.to_pure_dict(nnx.state(layer)))

  def value_and_grad(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, pos)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  l0, g0 = value_and_grad(unrolled)
  l1, g1 = value_and_grad(scanned)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  chex.assert_trees_all_close(nnx.to_pure_dict(g1),
                              convert_layer_layout(nnx.to_pure_dict(g0), scanned=True), atol=1e-5)
