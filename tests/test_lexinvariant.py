"""Lexinvariant LM: invariance, key reproducibility, partial p, chunked and reference losses,
generation with a fixed E, the synthetic task generators, and launch.py train + eval."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models  # noqa: F401  (switches eager sharding off)
from data import encoders, pipeline, synthetic
from models import lexinvariant, token_lm
from models.lexinvariant import LexinvariantLM

from conftest import run_launch

V, N, D = 48, 40, 32   # padded vocab, real vocab, width


def _mcfg(**kw):
  c = token_lm.default_model_config()
  c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = D, 1, 4, 2, 8, 64
  c.init_std = 0.1
  c.update(kw)
  return c


def _lcfg(**kw):
  c = lexinvariant.default_lexinv_config()
  c.update(kw)
  return c


SPECIALS = (0, 1, 2)
LIVE = np.arange(V) < 30   # with vocab='train': ids 30..39 never seen in training ('other')
FIXED = dict(fixed_specials=True, vocab='train')


def _model(ce_chunk=0, seed=0, **lx):
  live = LIVE if lx.get('vocab') == 'train' else None
  return LexinvariantLM(_mcfg(ce_chunk=ce_chunk), _lcfg(**lx), V, N, special_ids=SPECIALS,
                        live=live, rngs=nnx.Rngs(seed))


def _batch(b=3, t=12, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  seg = np.ones((b, t), np.int32)
  seg[0, 7:] = 2
  seg[-1, 9:] = 0
  pos = np.concatenate([np.arange(t)[None]] * b).astype(np.int32)
  pos[0, 7:] = np.arange(t - 7)
  return dict(inputs=jax.random.randint(k1, (b, t), 0, N),
              targets=jax.random.randint(k2, (b, t), 0, N),
              segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos),
              weights=jnp.asarray(seg > 0, jnp.float32) * jax.random.uniform(k3, (b, t)),
              target_bytes=jnp.asarray(np.where(seg > 0, 1, 0), jnp.int32))


# The model's entry points, each one compiled program (called eagerly, every operation of the
# forward compiles on its own: hundreds of compilations per test).
_hidden = nnx.jit(lambda m, x, d, pos, seg: m.hidden(x, d, pos, seg)[0])
_logits = nnx.jit(lambda m, h, d: m.token_logits(h, d))
_nll = nnx.jit(lambda m, h, y, d: m.token_nll(h, y, d))
_fixed_draw = nnx.jit(lambda m, e: m.fixed_draw(e))
_draw = nnx.jit(lambda m, k: m.draw(k, 3))
_embed = nnx.jit(lambda m, x, d: m.embed_tokens(x, d))


def _perturb(model, seed=1):
  """Moves scale/bias/temperature off their initial values so the tests see them."""
  k = jax.random.key(seed)
  model.embed_scale[...] = 1.0 + 0.3 * jax.random.normal(k, (D,))
  model.embed_bias[...] = 0.2 * jax.random.normal(jax.random.fold_in(k, 1), (D,))
  model.readout_scale[...] = jnp.float32(0.11)
  return model


def test_permuting_vocabulary_with_E_leaves_outputs_unchanged():
  model = _perturb(_model())
  b = _batch()
  e_BxNxD = jax.random.normal(jax.random.key(3), (3, N, D))
  sigma = np.random.default_rng(0).permutation(N)
  inv = np.argsort(sigma)
  # tokens renamed v -> sigma(v); E'[sigma(v)] = E[v], i.e. E' = E[sigma^-1]
  x2, y2 = jnp.asarray(sigma)[b['inputs']], jnp.asarray(sigma)[b['targets']]
  e2 = e_BxNxD[:, inv]
  d1, d2 = _fixed_draw(model, e_BxNxD), _fixed_draw(model, e2)
  h1 = _hidden(model, b['inputs'], d1, b['positions'], b['segment_ids'])
  h2 = _hidden(model, x2, d2, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(h1, h2, rtol=1e-5, atol=1e-5)
  l1, l2 = _logits(model, h1, d1), _logits(model, h2, d2)
  np.testing.assert_allclose(l2[..., :N][..., sigma], l1[..., :N], rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(l1[..., N:]))  # padding ids are never predicted
  np.testing.assert_allclose(_nll(model, h1, b['targets'], d1),
                             _nll(model, h2, y2, d2), rtol=1e-5, atol=1e-5)
  # and the outputs do depend on E (the test is not vacuous)
  h3 = _hidden(model, b['inputs'], _fixed_draw(model, e2), b['positions'], b['segment_ids'])
  assert np.abs(np.asarray(h3 - h1)).max() > 1e-2


def test_shared_loss_is_invariant_to_a_global_cipher_in_distribution():
  """With the shared scheme a cipher of the text is the same as a different draw of pi: the
  loss of ciphered text under key k equals the plain loss under the draw whose permutation is
  pi_b composed with the cipher."""
  model = _perturb(_model())
  b = _batch()
  draw = _draw(model, jax.random.key(5))
  sigma = jnp.asarray(np.random.default_rng(1).permutation(N))
  inv = jnp.argsort(sigma)
  cipher_draw = dict(draw, perm=draw['perm'].at[:, :N].set(draw['perm'][:, :N][:, inv]))
  h = _hidden(model, b['inputs'], draw, b['positions'], b['segment_ids'])
  hc = _hidden(model, sigma[b['inputs']], cipher_draw, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(h, hc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_nll(model, h, b['targets'], draw),
                             _nll(model, hc, sigma[b['targets']], cipher_draw), rtol=1e-5)


def test_fixed_rows_keep_invariance_over_the_lexical_ids():
  """With learned special rows and a training vocabulary, a cipher of the lexical ids (live,
  non-special) is again a redraw of pi; unseen ids are interchangeable (one shared row);
  `live` is data (zero gradient) and `lexical_ids` is what the cipher evaluations permute."""
  model = _perturb(_model(**FIXED))
  lexical = model.lexical_ids()
  np.testing.assert_array_equal(lexical, np.arange(3, 30))
  b = _batch()
  draw = _draw(model, jax.random.key(5))
  sigma = np.arange(V)
  sigma[lexical] = np.random.default_rng(1).permutation(lexical)
  sigma = jnp.asarray(sigma)
  inv = jnp.argsort(sigma)
  cipher_draw = dict(draw, perm=draw['perm'].at[:, :N].set(draw['perm'][:, :N][:, inv[:N]]))
  h = _hidden(model, b['inputs'], draw, b['positions'], b['segment_ids'])
  hc = _hidden(model, sigma[b['inputs']], cipher_draw, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(h, hc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_nll(model, h, b['targets'], draw),
                             _nll(model, hc, sigma[b['targets']], cipher_draw), rtol=1e-5)
  # unseen ids 30..39 share the 'other' row: swapping them changes nothing
  swap = jnp.where(b['inputs'] == 31, 35, jnp.where(b['inputs'] == 35, 31, b['inputs']))
  assert int(jnp.sum(swap != b['inputs'])) > 0
  hs = _hidden(model, swap, draw, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(h, hs, rtol=1e-6, atol=1e-6)
  lg = np.asarray(_logits(model, h, draw))
  np.testing.assert_allclose(lg[..., 30:N], np.broadcast_to(lg[..., 30:31], lg[..., 30:N].shape))
  # specials are fixed: the same learned row in every sequence, whatever the draw
  other = _draw(model, jax.random.key(6))
  np.testing.assert_allclose(_embed(model, jnp.asarray([[0, 1, 2, 33]]), draw)[:1],
                             _embed(model, jnp.asarray([[0, 1, 2, 33]]), other)[:1])
  grads = nnx.jit(nnx.grad(lambda m: lexinvariant.lexinv_loss(m, b, jax.random.key(2))[0]))(model)
  assert not np.any(np.asarray(grads['live'][...]))
  assert np.abs(np.asarray(grads['fixed'][...])).max() > 0


def test_fixed_rows_refuse_bad_inputs():
  with pytest.raises(ValueError, match='needs the ids seen in training'):
    LexinvariantLM(_mcfg(), _lcfg(**FIXED), V, N, special_ids=SPECIALS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='expected vocab_size=48'):
    LexinvariantLM(_mcfg(), _lcfg(**FIXED), V, N, special_ids=SPECIALS, live=LIVE[:40],
                   rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='no lexical id'):
    LexinvariantLM(_mcfg(), _lcfg(**FIXED), V, N, special_ids=SPECIALS,
                   live=np.arange(V) < 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lexinv.vocab='bytes'"):
    _model(vocab='bytes')


def test_token_counts_count_documents_with_their_markers():
  enc = encoders.ByteEncoder()
  docs = ['abca', '', 'b' * 10]
  c = pipeline.token_counts(docs, enc)
  assert c.shape == (enc.vocab_size,)
  off = enc.OFFSET
  assert c[off + ord('a')] == 2 and c[off + ord('b')] == 11 and c[off + ord('c')] == 1
  assert c[enc.bos_id] == 3 and c[enc.eos_id] == 3 and c.sum() == 14 + 6
  # the character budget stops before the document that would pass it (the first is kept)
  c2 = pipeline.token_counts(docs, enc, max_chars=5)
  assert c2[off + ord('b')] == 1 and c2[enc.bos_id] == 2


def test_draw_is_reproducible_from_keys_and_per_row():
  model = _model()
  k = jax.random.fold_in(jax.random.key(0), 7)  # (seed, step)
  a, a2 = model.draw(k, 4), model.draw(k, 4)
  for key in ('perm', 'gauss', 'mask'):
    np.testing.assert_array_equal(a[key], a2[key])
  big = model.draw(k, 8)  # row b depends on (key, b) only, not on the batch size
  np.testing.assert_array_equal(big['perm'][:4], a['perm'])
  np.testing.assert_array_equal(big['gauss'], a['gauss'])
  for r in range(4):  # valid permutations of the real ids, identity on padding ids
    assert sorted(np.asarray(a['perm'][r, :N]).tolist()) == list(range(N))
    np.testing.assert_array_equal(a['perm'][r, N:], np.arange(N, V))
  assert len({tuple(np.asarray(p).tolist()) for p in a['perm']}) == 4  # rows differ
  other = model.draw(jax.random.fold_in(jax.random.key(0), 8), 4)   # another step
  assert not np.array_equal(other['perm'], a['perm'])
  assert not np.allclose(other['gauss'], a['gauss'])
  g = np.asarray(model.draw(jax.random.key(1), 2)['gauss'])
  assert g.shape == (N, D) and abs(g.mean()) < 0.1 and abs(g.std() - 1) < 0.1   # N(0, I)
  ind = _model(table='independent')
  gi, gi2 = ind.draw(k, 3)['gauss'], ind.draw(k, 5)['gauss']
  assert gi.shape == (3, N, D)
  np.testing.assert_array_equal(gi, gi2[:3])
  assert not np.allclose(gi[0], gi[1])
  with pytest.raises(ValueError, match='independent'):
    LexinvariantLM(_mcfg(), _lcfg(table='independent'), 32768, 32000,
                   rngs=nnx.Rngs(0)).draw(k, 128)


def _copy_tokenlm(lex):
  """A TokenLM with lex's transformer and learned table."""
  tm = token_lm.TokenLM(_mcfg(), V, rngs=nnx.Rngs(9))
  tm.transformer = lex.transformer
  tm.embed = lex.embed
  return tm


def test_p0_is_the_standard_lm_and_p1_is_all_random():
  b = _batch()
  rng = jax.random.key(4)
  lex0 = _model(p=0.0)
  assert lex0.embed is not None
  l_lex, m_lex = lexinvariant.lexinv_loss(lex0, b, rng)
  l_std, m_std = token_lm.lm_loss(_copy_tokenlm(lex0), b)
  np.testing.assert_allclose(l_lex, l_std, rtol=1e-5)
  np.testing.assert_allclose(m_lex['nll_sum'], m_std['nll_sum'], rtol=1e-5)
  assert float(m_lex['n_bytes']) == float(m_std['n_bytes'])
  d0 = lex0.draw(rng, 3)
  assert not np.any(d0['mask'])
  np.testing.assert_array_equal(d0['perm'], np.broadcast_to(np.arange(V), (3, V)))

  lex1 = _perturb(_model(p=1.0))
  assert lex1.embed is None  # no learned table in the pure model
  d1 = lex1.draw(rng, 3)
  assert np.all(d1['mask'])
  want = (np.asarray(d1['gauss'])[np.take_along_axis(np.asarray(d1['perm']),
                                                     np.asarray(b['inputs']), 1)]
          * np.asarray(lex1.embed_scale[...]) + np.asarray(lex1.embed_bias[...]))
  np.testing.assert_allclose(lex1.embed_tokens(b['inputs'], d1), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('table', ['shared', 'permuted_learned'])
def test_partial_p_mixes_rows(table):
  model = _model(p=0.3, table=table)
  d = model.draw(jax.random.key(0), 2000)
  frac = float(np.mean(d['mask']))
  assert abs(frac - 0.3) < 0.04, frac
  ident = np.arange(V)
  perm = np.asarray(d['perm'])
  assert np.all(perm[~np.asarray(d['mask'])] == ident)        # standard rows: identity
  assert np.all(np.any(perm[np.asarray(d['mask'])] != ident, axis=1))  # random rows permuted
  # a standard row's embedding is the learned row of its token; a random row's is not
  b = _batch(b=2)
  d2 = model.draw(jax.random.key(3), 2)
  d2 = dict(d2, mask=jnp.array([False, True]))
  if table == 'shared':
    d2['perm'] = d2['perm'].at[0].set(jnp.arange(V))
  else:
    d2['perm'] = d2['perm'].at[0].set(jnp.arange(V))
  e = np.asarray(model.embed_tokens(b['inputs'], d2))
  w = np.asarray(model.embed.embedding[...])
  np.testing.assert_allclose(e[0], w[np.asarray(b['inputs'][0])], rtol=1e-6)
  assert not np.allclose(e[1], w[np.asarray(b['inputs'][1])])


def _reference_nll(model, batch, draw):
  """Materializes every sequence's E_b = G[pi_b] ([B, N, D]) and its full logits."""
  g, perm = np.asarray(draw['gauss'], np.float64), np.asarray(draw['perm'])
  if g.ndim == 2:
    e_BxNxD = g[np.minimum(perm[:, :N], N - 1)]
  else:
    e_BxNxD = g.copy()
  if model.fixed is not None:  # learned rows: one per special, one shared by every unseen id
    fixed = np.asarray(model.fixed[...], np.float64)
    for k, v in enumerate(SPECIALS):
      e_BxNxD[:, v] = fixed[k]
    if model.live is not None:
      e_BxNxD[:, ~LIVE[:N]] = fixed[len(SPECIALS)]
  scale = np.asarray(model.embed_scale[...], np.float64)
  bias = np.asarray(model.embed_bias[...], np.float64)
  x = np.take_along_axis(e_BxNxD, np.asarray(batch['inputs'])[..., None], axis=1) * scale + bias
  h, _ = model.transformer(jnp.asarray(x, jnp.float32), batch['positions'], batch['segment_ids'])
  logits = np.einsum('btd,bvd->btv', np.asarray(h, np.float64), e_BxNxD) * float(
      model.readout_scale[...])
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  tgt = np.take_along_axis(logits, np.asarray(batch['targets'])[..., None], axis=-1)[..., 0]
  return lse - tgt


@pytest.mark.parametrize('table,fixed', [('shared', {}), ('independent', {}),
                                         ('shared', FIXED), ('independent', FIXED),
                                         ('shared', dict(fixed_specials=True))])
def test_loss_matches_materialized_per_sequence_E(table, fixed):
  """The reference materializes E_b over every id (fixed rows included: an unseen id's row is
  the shared 'other' row, so the softmax counts it once per unseen id)."""
  model = _perturb(_model(table=table, **fixed))
  b = _batch()
  rng = jax.random.key(11)
  draw = model.draw(rng, 3)
  ref = _reference_nll(model, b, draw)
  h, _ = model.hidden(b['inputs'], draw, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(model.token_nll(h, b['targets'], draw), ref, rtol=2e-5, atol=2e-5)
  w = np.asarray(b['weights'])
  loss, m = lexinvariant.lexinv_loss(model, b, rng)
  np.testing.assert_allclose(float(m['nll_sum']), (ref * w).sum(), rtol=2e-5)
  np.testing.assert_allclose(float(loss), (ref * w).sum() / w.sum(), rtol=2e-5)
  # the logits over token ids agree with the materialized E too
  lg = np.asarray(model.token_logits(h, draw))[..., :N]
  np.testing.assert_allclose(jax.nn.log_softmax(lg)[np.arange(3)[:, None], np.arange(12),
                                                    np.asarray(b['targets'])],
                             -ref, rtol=2e-5, atol=2e-5)


def test_permuted_learned_matches_reference():
  model = _model(p=1.0, table='permuted_learned')
  b = _batch()
  draw = model.draw(jax.random.key(2), 3)
  w = np.asarray(model.embed.embedding[...], np.float64)
  e_BxVxD = w[np.asarray(draw['perm'])]
  x = np.take_along_axis(e_BxVxD, np.asarray(b['inputs'])[..., None], axis=1)
  h, _ = model.transformer(jnp.asarray(x, jnp.float32), b['positions'], b['segment_ids'])
  logits = np.einsum('btd,bvd->btv', np.asarray(h, np.float64), e_BxVxD)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ref = lse - np.take_along_axis(logits, np.asarray(b['targets'])[..., None], -1)[..., 0]
  h2, _ = model.hidden(b['inputs'], draw, b['positions'], b['segment_ids'])
  np.testing.assert_allclose(model.token_nll(h2, b['targets'], draw), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('lx', [dict(), dict(table='independent'), dict(p=0.5),
                                dict(FIXED, p=0.5)])
def test_chunked_loss_and_grads_match_unchunked(lx):
  b = _batch()
  rng = jax.random.key(1)
  full, chunked = _perturb(_model(0, **lx)), _perturb(_model(5, **lx))  # 12 = 5 + 5 + 2
  grad_fn = nnx.jit(nnx.value_and_grad(lexinvariant.lexinv_loss, has_aux=True))
  (l1, m1), g1 = grad_fn(full, b, rng)
  (l2, m2), g2 = grad_fn(chunked, b, rng)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(m1['nll_sum'], m2['nll_sum'], rtol=1e-5)
  for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
  assert float(optax_norm(g1)) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_generation_keeps_E_fixed_and_matches_full_forward():
  model = _perturb(_model())
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, N, size=(2, 6)), jnp.int32)
  rng = jax.random.key(3)
  out = lexinvariant.generate(model, prompt, 5, temperature=0.0, rng=rng)
  assert out.shape == (2, 5)
  np.testing.assert_array_equal(out, lexinvariant.generate(model, prompt, 5, rng=rng))
  # the draw generate makes from its key
  draw = nnx.jit(lambda m, k: m.draw(k, 2))(model, jax.random.split(rng)[0])
  seq = jnp.concatenate([prompt, out], axis=1)
  logits = nnx.jit(lambda m, s, d: m(s, d)[0])(model, seq, draw)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 5:-1], -1), out)
  assert int(out.max()) < N  # padding ids are never generated


def test_synthetic_generators():
  rng = np.random.default_rng(0)
  text, offs, mapping = synthetic.lookup_instance(rng, num_keys=6, num_queries=5)
  defs, queries = text.split(' |')
  assert {p[0]: p[1] for p in defs.split()} == mapping
  assert all(len(p) == 2 for p in defs.split())
  qs = queries.split()
  assert len(qs) == 5 == len(offs)
  for q, o in zip(qs, offs):
    k, v = q
    assert mapping[k] == v == text[o] and text[o - 1] == k and text[o - 2] == ' '
  text, offs, sigma = synthetic.permutation_instance(rng, length=4, num_demos=3)
  pairs = [p.split('>') for p in text.split()]
  assert len(pairs) == 4 and not np.array_equal(sigma, np.arange(4))
  for s, t in pairs:
    assert len(set(s)) == 4 and t == ''.join(np.array(list(s))[sigma])
  assert text[offs[0]:] == pairs[-1][1] and offs == list(range(offs[0], offs[0] + 4))

  enc = encoders.ByteEncoder()
  lb = synthetic.lookup_batch(enc, 5, 96, seed=1)
  pb = synthetic.permutation_batch(enc, 5, 96, seed=1)
  for bt, per_row in ((lb, 8), (pb, 4)):
    assert (bt['answer'].sum(1) == per_row).all()
    ans = bt['answer'] > 0
    assert np.all(bt['weights'][ans] == 1)
    assert np.all((bt['targets'][ans] >= enc.encode('a')[0]) &
                  (bt['targets'][ans] <= enc.encode('z')[0]))
    np.testing.assert_array_equal(bt['inputs'][:, 1:][bt['weights'][:, 1:] > 0],
                                  bt['targets'][:, :-1][bt['weights'][:, 1:] > 0])
    perfect = synthetic.score(bt['targets'], bt)
    assert perfect['token_accuracy'] == 1.0 == perfect['exact_accuracy']
  assert synthetic.score(lb['targets'], lb)['n_answers'] == 40
  assert synthetic.score(pb['targets'], pb)['n_answers'] == 5
  wrong = pb['targets'].copy()
  first = np.argmax(pb['answer'] > 0, axis=1)
  wrong[np.arange(5), first] = 0  # one wrong token spoils the whole permutation answer
  s = synthetic.score(wrong, pb)
  assert s['exact_accuracy'] == 0.0 and s['token_accuracy'] == pytest.approx(0.75)
  np.testing.assert_array_equal(synthetic.lookup_batch(enc, 5, 96, seed=1)['inputs'],
                                lb['inputs'])  # seeded

  rb = synthetic.repeat_batch(enc, 3, 40, seed=1, length=12, copies=3)
  for r in range(3):  # bos + s s s, the second and third copies are the answers
    text = enc.decode(rb['inputs'][r, 1:36].tolist() + [rb['targets'][r, 35]])
    assert len(text) == 36 and text == text[:12] * 3
  assert (rb['answer'].sum(1) == 24).all() and synthetic.score(rb['targets'], rb)['n_answers'] == 6
  np.testing.assert_array_equal(rb['copy'][0, :37], np.r_[[1] * 12, [2] * 12, [3] * 12, 0])
  nll = np.where(rb['copy'] == 1, 3.0, 0.5)
  pred = np.where(rb['copy'] >= 2, rb['targets'], 0)   # copies the context, guesses copy 1
  per = synthetic.by_copy(nll, pred, rb)
  assert [c['copy'] for c in per] == [1, 2, 3]
  assert per[0]['loss'] == 3.0 and per[1]['loss'] == per[2]['loss'] == 0.5
  assert per[0]['accuracy'] == 0.0 and per[1]['accuracy'] == per[2]['accuracy'] == 1.0


TINY = ['--config.data.max_docs=300', '--config.train.batch_size=8', '--config.data.seq_len=128',
        '--config.train.steps=6', '--config.ckpt.every=100', '--config.train.eval_batches=2',
        '--config.sample.max_new_tokens=8', '--config.train.log_every=3',
        '--config.optim.warmup_steps=2', '--config.model.num_layers=1']
LEX = ['--config.lexinv.eval_batches=2', '--config.lexinv.probe_rows=8',
       '--config.lexinv.probe_steps=20', '--config.lexinv.synthetic_n=8']


def test_launch_train_and_eval_against_standard_lm(data_dir, tmp_path):
  std, lex = str(tmp_path / 'std'), str(tmp_path / 'lex')
  run_launch(data_dir, '--config=configs/lexinvariant.py:tiny_lm', f'--workdir={std}', *TINY,
             '--config.sample.max_new_tokens=0')  # the baseline: no end-of-run sample
  p = run_launch(data_dir, '--config=configs/lexinvariant.py:tiny', f'--workdir={lex}', *TINY,
                 *LEX)
  assert 'lexinvariant p=1.0 table=shared vocab=train (' in p.stdout and 'sample 0' in p.stdout
  p = run_launch(data_dir, '--config=configs/lexinvariant.py:tiny', f'--workdir={lex}',
                 '--mode=eval', *TINY, *LEX, f'--config.lexinv.baseline_workdir={std}',
                 '--config.lexinv.unseen=xyz', '--config.eval.robustness=caps',
                 '--config.eval.next_word_texts=4')
  ev = json.load(open(os.path.join(lex, 'eval_step6.json')))
  assert ev['step'] == 6 and np.isfinite(ev['bpb'])
  assert ev['next_word']['n_words'] > 0 and 0 <= ev['next_word']['accuracy'] <= 1
  suite = ev['lexinv_suite']
  # unseen symbols: LookUp / Repeat over 'xyz' beside the other lowercase letters
  assert suite['unseen']['unseen']['lexinv']['alphabet'] == 'xyz'
  assert len(suite['unseen']['seen']['standard']['alphabet']) == 23
  assert suite['unseen']['unseen']['standard']['lookup']['n_answers'] == 64
  assert '## Unseen symbols' in open(os.path.join(lex, 'lexinv_eval_step6.md')).read()
  assert suite['models'] == ['lexinv', 'standard']
  assert suite['by_position'][0]['positions'] == '0-0'
  assert all(r['ppl_ratio'] > 0 for r in suite['by_position'])
  for name in ('lexinv', 'standard'):
    assert np.isfinite(suite['cipher'][name]['loss_cipher'])
    assert 0 <= suite['probe'][name]['token_accuracy'] <= 1
    for task in ('lookup', 'permutation'):
      assert 0 <= suite['synthetic'][task][name]['token_accuracy'] <= 1
    assert [c['copy'] for c in suite['repeat'][name]] == [1, 2, 3]
    heads = suite['attention'][name]
    assert len(heads) == 1 and len(heads[0]) == 4   # 1 layer x 4 heads
    for h in heads[0]:  # attention rows are distributions over at least the 17 allowed keys
      assert 0 <= h['offset0'] + h['offset1'] + h['offset2'] <= 1 + 1e-5
      assert 0 <= h['entropy'] <= np.log(128) + 1e-5
  # the cipher leaves the lexinvariant model's loss unchanged (up to E sampling) even untrained
  c = suite['cipher']['lexinv']
  assert abs(c['diff']) < 0.1, c
  for f in ('lexinv_eval_step6.md', 'lexinv_eval_step6.json', 'lexinv_ppl_by_position_step6.png'):
    assert os.path.getsize(os.path.join(lex, f)) > 0
  assert '## Substitution cipher' in open(os.path.join(lex, 'lexinv_eval_step6.md')).read()
  # interchangeable token embeddings: trained with letters q-z mapped away, evaluated with them
  ic = str(tmp_path / 'ic')
  opts = ['--config.lexinv.embedding=interchangeable', '--config.lexinv.interchangeable=abcdefghij',
          '--config.data.char_map=qrstuvwxyz=abcdefghij']
  run_launch(data_dir, '--config=configs/lexinvariant.py:tiny', f'--workdir={ic}', *TINY, *opts,
             '--config.sample.prompt=ab ab a')
  run_launch(data_dir, '--config=configs/lexinvariant.py:tiny', f'--workdir={ic}', '--mode=eval',
             *TINY, *LEX, *opts, '--config.lexinv.unseen=qrstuvwxyz',
             '--config.eval.robustness=', '--config.eval.next_word=False')
  isuite = json.load(open(os.path.join(ic, 'eval_step6.json')))['lexinv_suite']
  assert isuite['models'] == ['interchangeable'] and isuite['cipher_alphabet_size'] == 10
  u = isuite['unseen']
  assert u['seen']['interchangeable']['alphabet'] == 'abcdefghij'
  assert 0 <= u['unseen']['interchangeable']['lookup']['exact_accuracy'] <= 1
  # the training vocabulary is data saved with the checkpoint: restoring where the data says
  # otherwise (here: fewer documents, so fewer live ids) keeps the trained model's set
  from train import config_lib, trainer
  cfg = config_lib.load_saved(lex)
  saved_live = np.asarray(trainer.restore(cfg, lex)[1]['params']['live'])
  assert suite['cipher_alphabet_size'] == int(saved_live[3:259].sum())
  with cfg.unlocked():
    cfg.data.max_docs = 5
  setup, state, _ = trainer.restore(cfg, lex)
  counted = setup.family.live_ids()
  assert counted.sum() < saved_live.sum()
  np.testing.assert_array_equal(np.asarray(state['params']['live']), saved_live)
  np.testing.assert_array_equal(setup.model(state['params']).lexical_ids(),
                                np.flatnonzero(saved_live[:259])[2:])


# -- interchangeable token embeddings (lexinv.embedding='interchangeable') ------------------------
def _imodel(ids, ce_chunk=0):
  return lexinvariant.InterchangeableLM(_mcfg(ce_chunk=ce_chunk),
                                        _lcfg(embedding='interchangeable', d_random=8), V, N,
                                        interchangeable_ids=ids, special_ids=SPECIALS,
                                        rngs=nnx.Rngs(0))


def test_interchangeable_embeddings_invariance_loss_and_extension():
  """The dual embedding: learned rows [n(W_v), 0] for ordinary tokens, [n(s), n(r_b,v)] / sqrt 2
  for the interchangeable ones; permuting the interchangeable ids (their random parts moving
  along) permutes the logits exactly; the chunked loss is the logits' cross-entropy; extending
  the set reuses the parameters for new tokens."""
  inter = np.arange(10, 20)
  model = _imodel(inter)
  model.shared[...] = jax.random.normal(jax.random.key(5), model.shared.shape)
  b = _batch()
  draw = model.draw(jax.random.key(1), 3)
  rows = np.asarray(nnx.jit(lambda m, d, x: m._rows(d, x))(model, draw, b['inputs']))
  np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-5)
  plain = ~np.isin(np.asarray(b['inputs']), inter)
  assert np.all(rows[plain][:, -8:] == 0) and np.all(rows[~plain][:, -8:] != 0)
  run = nnx.jit(lambda m, x, d: m.hidden(x, d, b['positions'], b['segment_ids'])[0])
  logit_fn = nnx.jit(lambda m, h, d: m.token_logits(h, d))
  h = run(model, b['inputs'], draw)
  logits = np.asarray(logit_fn(model, h, draw))
  perm = np.random.default_rng(1).permutation(len(inter))
  sigma = np.arange(V)
  sigma[inter] = inter[perm]
  d2 = model.fixed_draw(jnp.zeros_like(draw['rand']).at[:, perm].set(draw['rand']))
  logits2 = np.asarray(logit_fn(model, run(model, jnp.asarray(sigma)[b['inputs']], d2), d2))
  np.testing.assert_allclose(logits2[..., sigma][..., :N], logits[..., :N], atol=1e-5)
  assert np.all(np.isneginf(logits[..., N:]))
  ref = jax.nn.logsumexp(logits, -1) - np.take_along_axis(logits, np.asarray(b['targets'])[..., None],
                                                          -1)[..., 0]
  for chunk in (0, 5):
    got = _imodel(inter, chunk)
    nnx.update(got, nnx.state(model))
    nll = nnx.jit(lambda m, h, y, d: m.token_nll(h, y, d))(got, h, b['targets'], draw)
    np.testing.assert_allclose(nll, ref, atol=1e-4)
  new = model.extended([30, 31])
  assert new.lexical_ids().tolist() == list(range(10, 20)) + [30, 31]
  r = new.draw(jax.random.key(2), 1)
  e = np.asarray(nnx.jit(lambda m, d, x: m._rows(d, x))(new, r, jnp.asarray([[30, 10, 25]])))[0]
  np.testing.assert_allclose(e[0, :-8], e[1, :-8], atol=1e-6)   # the shared part
  assert not np.allclose(e[0, -8:], e[1, -8:]) and np.all(e[2, -8:] == 0)


def test_interchangeable_set_errors():
  with pytest.raises(ValueError, match='lexinv.interchangeable is empty'):
    _imodel([])
  with pytest.raises(ValueError, match='lexinv.interchangeable covers every token'):
    _imodel(np.arange(3, N))
  with pytest.raises(ValueError, match='special ids'):
    _imodel([1, 5])
  from configs import lexinvariant as lexcfg
  from train import families
  for spec, msg in (('', 'is empty'), ('all', 'covers every token'), ('ab\u00e9', "'\u00e9' is 2 "
                                                                                   'tokens')):
    cfg = lexcfg.get_config('tiny')
    cfg.lexinv.embedding, cfg.lexinv.interchangeable = 'interchangeable', spec
    with pytest.raises(ValueError, match=msg):
      families.get(cfg).build_model(nnx.Rngs(0))
