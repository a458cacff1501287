"""Tests for models/token_lm.py: loss (chunked vs unchunked), cache, generation, accounting."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models  # noqa: F401  (switches eager sharding off)
from models import token_lm
from models.token_lm import TokenLM

V = 37


def _cfg(**kw):
  c = token_lm.default_model_config()
  c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = 32, 2, 4, 2, 8, 64
  c.init_std = 0.1
  c.update(kw)
  return c


def _batch(b=2, t=12, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  seg = jnp.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3])[:b, :t]
  pos = jnp.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3])[:b, :t]
  return dict(inputs=jax.random.randint(k1, (b, t), 0, V),
              targets=jax.random.randint(k2, (b, t), 0, V),
              segment_ids=seg.astype(jnp.int32), positions=pos.astype(jnp.int32),
              weights=(seg > 0).astype(jnp.float32) * jax.random.uniform(k3, (b, t)),
              target_bytes=jnp.where(seg > 0, 2, 0).astype(jnp.int32))


def test_param_counts_and_partition_specs():
  tied = TokenLM(_cfg(tie_embeddings=True), V, rngs=nnx.Rngs(0))
  untied = TokenLM(_cfg(tie_embeddings=False), V, rngs=nnx.Rngs(0))
  d, l, f, hk, gk = 32, 2, 64, 32, 16
  per_layer = d * hk + 2 * d * gk + hk * d + 3 * d * f + 2 * d
  assert token_lm.count_params(tied) == V * d + l * per_layer + d
  assert token_lm.count_params(untied) - token_lm.count_params(tied) == d * V
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(untied)))
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['readout']['kernel']) == ('embed', 'vocab')
  blk = specs['transformer']['layers'][0]
  assert tuple(blk['attn']['k']) == ('embed', 'kv_heads', 'head_dim')
  assert tuple(blk['mlp']['gate']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['transformer']['final_norm']['scale']) == ('norm',)
  # Only Params live in the model, so (graphdef, params) is the whole state.
  _, params, rest = nnx.split(untied, nnx.Param, ...)
  assert not jax.tree.leaves(rest)


@pytest.mark.parametrize('tie', [True, False])
def test_chunked_loss_matches_unchunked(tie):
  batch = _batch()
  full = TokenLM(_cfg(tie_embeddings=tie, ce_chunk=0), V, rngs=nnx.Rngs(0))
  chunked = TokenLM(_cfg(tie_embeddings=tie, ce_chunk=5), V, rngs=nnx.Rngs(0))  # 12 = 5+5+2

  grad_fn = nnx.jit(nnx.value_and_grad(token_lm.lm_loss, has_aux=True))
  (l0, m0), g0 = grad_fn(full, batch, None)
  (l1, m1), g1 = grad_fn(chunked, batch, None)
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(m1, m0, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g0), rtol=1e-5, atol=1e-5)
  # The loss definition and metric sums.
  if not tie:
    return

  @nnx.jit
  def reference_nll(m):
    logits, _ = m(batch['inputs'], batch['positions'], batch['segment_ids'])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]

  nll, w = reference_nll(full), batch['weights']
  np.testing.assert_allclose(m0['nll_sum'], jnp.sum(nll * w), rtol=1e-5)
  np.testing.assert_allclose(m0['n_tokens'], jnp.sum(w), rtol=1e-6)
  np.testing.assert_allclose(l0, jnp.sum(nll * w) / jnp.sum(w), rtol=1e-5)
  assert float(m0['n_bytes']) == 2 * (7 + 5 + 9)


def test_jit_train_step_bf16_remat_finite():
  cfg = _cfg(ce_chunk=4, remat='full', window=4)
  model = TokenLM(cfg, V, jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = _batch()
  batch['weights'] = jnp.zeros_like(batch['weights']).at[0].set(1.0)

  @jax.jit
  def step(params, batch):
    def loss_fn(p):
      return token_lm.lm_loss(nnx.merge(graphdef, p), batch, jax.random.key(0))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return new, loss, metrics, grads

  new_params, loss, metrics, grads = step(params, batch)
  assert np.isfinite(float(loss)) and abs(float(loss) - np.log(V)) < 1.0
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_params))
  assert float(metrics['n_tokens']) == 12.0
  assert float(jnp.abs(grads['embed']['embedding'][...]).sum()) > 0
  # Zero weights: loss 0, no NaN.
  batch['weights'] = jnp.zeros_like(batch['weights'])
  _, loss0, _, grads0 = step(params, batch)
  assert float(loss0) == 0.0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads0))


@pytest.mark.parametrize('window', [0, 3])
def test_kv_cache_decoding_matches_full_forward(window):
  model = TokenLM(_cfg(window=window), V, rngs=nnx.Rngs(0))
  b, t, p = 2, 9, 4
  tokens = jax.random.randint(jax.random.key(3), (b, t), 0, V)
  full_logits = nnx.jit(lambda m, tok: m(tok)[0])(model, tokens)

  step = jax.jit(lambda tok, cache, i: model(tok, None, None, cache, i))
  cache = model.init_cache(b, t)
  logits, cache = nnx.jit(lambda m, tok, c: m(tok, cache=c, cache_index=0))(  # the prefill
      model, tokens[:, :p], cache)
  outs = [logits]
  for i in range(p, t):
    logits, cache = step(tokens[:, i:i + 1], cache, jnp.int32(i))
    outs.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full_logits, atol=1e-5)


def test_generate_greedy_matches_repeated_forward_and_eos():
  model = TokenLM(_cfg(init_std=0.5), V, rngs=nnx.Rngs(1))
  prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, V)
  n = 4
  out = token_lm.generate(model, prompt, n, temperature=0.0, top_p=1.0,
                          rng=jax.random.key(0), eos_id=None)
  assert out.shape == (2, n) and out.dtype == jnp.int32
  # Full forwards over a fixed-length buffer (causal, so the zero tail never matters).
  forward = nnx.jit(lambda m, seq: m(seq)[0])
  seq = jnp.concatenate([prompt, jnp.zeros((2, n), jnp.int32)], axis=1)
  for i in range(5, 5 + n):
    seq = seq.at[:, i].set(jnp.argmax(forward(model, seq)[:, i - 1], axis=-1))
  np.testing.assert_array_equal(out, seq[:, 5:])

  # eos = row 0's second token: row 0 is padded with 0 after it, row 1 goes on unchanged
  # unless it emits the same token.
  eos = int(out[0, 1])
  out_eos = token_lm.generate(model, prompt, n, 0.0, 1.0, jax.random.key(0), eos_id=eos)
  np.testing.assert_array_equal(out_eos[0], [out[0, 0], eos, 0, 0])
  row1 = np.asarray(out[1])
  hits = np.nonzero(row1 == eos)[0]
  expect1 = row1.copy() if not hits.size else np.where(np.arange(n) > hits[0], 0, row1)
  np.testing.assert_array_equal(out_eos[1], expect1)

  # Sampling runs, stays in the vocabulary, and depends on the key.
  s1 = token_lm.generate(model, prompt, n, 1.0, 0.9, jax.random.key(1))
  s2 = token_lm.generate(model, prompt, n, 1.0, 0.9, jax.random.key(2))
  assert s1.shape == (2, n) and np.all((np.asarray(s1) >= 0) & (np.asarray(s1) < V))
  assert not np.array_equal(s1, s2) or n < 2


def test_top_p_filter_and_sampling():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = np.isfinite(np.asarray(token_lm._top_p_filter(logits, jnp.float32(0.7))))
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  kept = np.isfinite(np.asarray(token_lm._top_p_filter(logits, jnp.float32(0.1))))
  np.testing.assert_array_equal(kept, [[False, True, False, False]])
  kept = np.isfinite(np.asarray(token_lm._top_p_filter(logits, jnp.float32(1.0))))
  assert kept.all()
  keys = jax.random.split(jax.random.key(0), 200)
  draws = jax.vmap(
      lambda k: token_lm.sample_logits(logits, jnp.float32(1.0), jnp.float32(0.7), k))(
      keys)
  assert set(np.unique(np.asarray(draws)).tolist()) == {1, 3}


def test_flops_per_token():
  cfg = _cfg(d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)
  # q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 = 576 per layer; readout 8*10.
  n = 2 * 576 + 80
  assert token_lm.flops_per_token(cfg, 10, 16) == 6 * n + 12 * 2 * 8 * 8
  cfg.window = 4  # mean keys per query: 4 * (1 - 4/32) = 3.5
  assert token_lm.flops_per_token(cfg, 10, 16) == 6 * n + 12 * 2 * 8 * 3.5
  cfg.window = 64  # window >= T: full causal
  assert token_lm.flops_per_token(cfg, 10, 16) == 6 * n + 12 * 2 * 8 * 8


# -- frozen visual Unicode embeddings (model.input_embedding='glyph') ------------------------------
def test_glyph_table_renders_and_falls_back():
  """Unit rows; look-alike glyphs are near (O ~ Q, l ~ I), unlike ones far; pad/bos/eos, bytes
  >= 0x80 and controls without a stand-in take the seeded fallback; whitespace gets visible
  stand-ins (so ' ', '\\n' and '\\t' differ); a missing font names model.glyph_font."""
  from data import encoders  # pylint: disable=import-outside-toplevel
  from models import glyphs  # pylint: disable=import-outside-toplevel
  tb = glyphs.encoder_token_bytes(encoders.ByteEncoder())
  table, stats = glyphs.glyph_table(tb, 32, size=8)
  np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)
  row = lambda ch: table[ord(ch) + 3]
  assert row('O') @ row('Q') > row('O') @ row('x') + 0.2
  assert stats['glyph_rendered_tokens'] == 95 + 3  # printable ASCII, newline, tab, CR
  spaces = np.stack([row(' '), row('\n'), row('\t')])
  assert np.abs(spaces @ spaces.T - np.eye(3)).max() < 0.99
  again, _ = glyphs.glyph_table(tb, 32, size=8)
  np.testing.assert_array_equal(table, again)
  fb = np.random.default_rng([0, 0xe2 + 3]).standard_normal(32)
  np.testing.assert_allclose(table[0xe2 + 3], fb / np.linalg.norm(fb), atol=1e-6)
  with pytest.raises(ValueError, match="model.glyph_font='/no/such/font.ttf'"):
    glyphs.glyph_table(tb, 32, font='/no/such/font.ttf')
  with pytest.raises(ValueError, match='tie_embeddings=False'):
    TokenLM(_cfg(input_embedding='glyph'), V, rngs=nnx.Rngs(0))


def test_glyph_embedding_never_changes_across_steps(tmp_path):
  """The glyph table is frozen state: not a trained parameter, not in the optimizer state or
  the checkpoint; after training steps the model's input table is still the rendered one while
  the other parameters moved. The run records the table (artifacts/glyph_table.npy) and eval /
  sample restore with it."""
  from data import encoders  # pylint: disable=import-outside-toplevel
  from models import glyphs  # pylint: disable=import-outside-toplevel
  from train import config_lib, families, trainer  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
  config_lib.override(cfg, {'model.input_embedding': 'glyph', 'model.tie_embeddings': False,
                            'model.d_model': 32, 'model.num_layers': 1, 'model.head_dim': 8,
                            'model.mlp_dim': 64, 'data.seq_len': 32, 'train.batch_size': 2})
  setup = trainer.Setup(cfg)
  want, _ = glyphs.glyph_table(glyphs.encoder_token_bytes(encoders.ByteEncoder()), 32)
  state = setup.init_state()
  assert 'embed' not in state['params']
  assert not any('embed' in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      state['opt_state'])[0])
  step = setup.make_train_step()
  rng = np.random.default_rng(0)
  before = jax.tree.map(np.asarray, state['params'])
  for _ in range(3):
    ids = rng.integers(3, 259, (2, 33)).astype(np.int32)
    batch = {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
             'segment_ids': np.ones((2, 32), np.int32),
             'positions': np.tile(np.arange(32, dtype=np.int32), (2, 1)),
             'weights': np.ones((2, 32), np.float32), 'target_bytes': np.ones((2, 32), np.int32)}
    state, _ = step(state, batch)
    np.testing.assert_array_equal(np.asarray(setup.model(state['params']).embed.embedding[...]),
                                  want)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                       state['params'])
  assert all(jax.tree.leaves(moved))
  # the run's recorded copy is what eval reads back (not a re-rendering)
  wd = str(tmp_path / 'g')
  fam = families.get(cfg, wd)
  files = families.write_artifacts(fam, wd)
  assert files == ['glyph_table.npy']
  np.testing.assert_array_equal(np.load(f'{wd}/artifacts/glyph_table.npy'), want)
  np.testing.assert_array_equal(families.get(cfg, wd).frozen_params()['embed']['embedding'], want)
