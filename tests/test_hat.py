"""HAT: causality across the word hierarchy, document isolation, cached generation equal to
uncached greedy decoding byte for byte, FLOP accounting, and an end-to-end launch run."""
import copy
import json
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import encoders, hat_data, words
from models import hat
from conftest import run_launch

ENC = encoders.ByteEncoder()


def tiny_cfg(pooling='query', init_std=0.02, encoder_attention='causal'):
  m = hat.default_model_config()
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 2, 16, 64
  m.byte_d_model, m.byte_heads, m.byte_mlp_dim, m.byte_window = 32, 2, 64, 8
  m.pooling, m.init_std, m.encoder_attention = pooling, init_std, encoder_attention
  return m


def encoder_for(splitter_spec='fixed:4', lw=8, boundary=None):
  """The byte encoder, or with `boundary` (a boundary token id) the one that inserts it."""
  if boundary is None:
    return ENC
  return hat_data.BoundaryByteEncoder(words.get_splitter(splitter_spec, lw), boundary)


def make_batch(texts, splitter_spec='fixed:4', t=48, w=16, lw=8, boundary=None):
  """Packs `texts` one per row (bos + bytes + eos) and adds the word fields (`boundary`: with
  word-boundary tokens before every word)."""
  enc = encoder_for(splitter_spec, lw, boundary)
  rows = len(texts)
  batch = {k: np.zeros((rows, t), np.int32) for k in
           ('inputs', 'targets', 'segment_ids', 'positions', 'target_bytes')}
  batch['weights'] = np.zeros((rows, t), np.float32)
  for r, text in enumerate(texts):
    ids = np.concatenate([[ENC.bos_id], enc.encode(text), [ENC.eos_id]])[:t + 1]
    n = len(ids) - 1
    batch['inputs'][r, :n], batch['targets'][r, :n] = ids[:-1], ids[1:]
    batch['segment_ids'][r, :n] = 1
    batch['positions'][r, :n] = np.arange(n)
    batch['weights'][r, :n] = 1
    batch['target_bytes'][r, :n] = enc.token_bytes[ids[1:]]
  fields = hat_data.WordFields(words.get_splitter(splitter_spec, lw), w, lw, boundary)
  return fields(batch), fields


# (pooling, encoder_attention): the default, 'last', the word-boundary tokens of "Learn Your
# Tokens" (read at the closing boundary with the causal encoder, at the opening one with the
# intra-word encoder) and the intra-word bidirectional encoder
VARIANTS = [('query', 'causal'), ('last', 'causal'), ('boundary', 'causal'), ('query', 'word'),
            ('boundary', 'word')]


_FORWARD = nnx.jit(lambda m, b: m(b))  # one compilation per model structure and batch shape


@pytest.fixture(scope='module', params=VARIANTS, ids=['/'.join(v) for v in VARIANTS])
def model(request):
  pooling, attention = request.param
  return hat.HAT(tiny_cfg(pooling, encoder_attention=attention), ENC.vocab_size,
                 rngs=nnx.Rngs(0))


def test_word_fields_are_consistent():
  batch, _ = make_batch(['hello world, this is HAT', 'x'], splitter_spec='whitespace')
  for r in range(2):
    n = int((batch['segment_ids'][r] > 0).sum())
    ids = batch['word_ids'][r, :n]
    assert (ids >= 0).all() and (np.diff(ids) >= 0).all()
    for j in range(ids.max() + 1):
      g = batch['word_gather'][r, j]
      np.testing.assert_array_equal(g[g >= 0], np.flatnonzero(ids == j))
  assert batch['word_positions'][0, :3].tolist() == [0, 1, 2]


def test_causal_across_words(model):
  """Logits at position t depend only on positions <= t: the decoder reads the *previous*
  word. Cut 17 starts word 5 of fixed:4 (bos is word 0); cut 19 lies inside it, where an
  intra-word encoder's states already saw the changed bytes (the decoder must not read them).
  With boundary tokens the words shift by one position each: both cuts fall inside words."""
  a, _ = make_batch(['abcdefghijklmnopqrstuvwxyz0123456789'], boundary=model.boundary_id)
  la = _FORWARD(model, a)
  for cut in (17, 19):
    b = copy.deepcopy(a)
    b['inputs'][0, cut:37] = ENC.encode('Z' * (37 - cut))
    lb = _FORWARD(model, b)
    chex.assert_trees_all_close(la[0, :cut], lb[0, :cut], atol=1e-5)
    assert not np.allclose(la[0, cut:37], lb[0, cut:37], atol=1e-3)


def test_documents_do_not_see_each_other(model):
  enc = encoder_for(boundary=model.boundary_id)
  a, _ = make_batch(['first document here', 'second'], boundary=model.boundary_id)
  # put both documents into one row: row 0 = doc1 (segment 1) followed by doc2 (segment 2)
  t = a['inputs'].shape[1]
  ids1 = np.concatenate([[ENC.bos_id], enc.encode('first document here'), [ENC.eos_id]])
  ids2 = np.concatenate([[ENC.bos_id], enc.encode('second'), [ENC.eos_id]])
  def row(first_doc):
    inp = np.zeros(t, np.int32)
    seg = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    n1, n2 = len(ids1) - 1, len(ids2) - 1
    inp[:n1], seg[:n1], pos[:n1] = first_doc[:-1], 1, np.arange(n1)
    inp[n1:n1 + n2], seg[n1:n1 + n2], pos[n1:n1 + n2] = ids2[:-1], 2, np.arange(n2)
    return inp, seg, pos, n1, n2
  fields = hat_data.WordFields(words.get_splitter('fixed:4', 8), 16, 8, model.boundary_id)
  outs = []
  for doc in (ids1, np.concatenate([[ENC.bos_id], enc.encode('FIRST DOCUMENT HERE'),
                                    [ENC.eos_id]])):
    inp, seg, pos, n1, n2 = row(doc)
    b = {'inputs': inp[None], 'targets': np.zeros((1, t), np.int32), 'segment_ids': seg[None],
         'positions': pos[None], 'weights': np.ones((1, t), np.float32),
         'target_bytes': np.ones((1, t), np.int32)}
    outs.append(_FORWARD(model, fields(b))[0, n1:n1 + n2])
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize('spec', ['whitespace', 'fixed:4', 'unicode'])
def test_cached_generation_equals_uncached(spec):
  model = hat.HAT(tiny_cfg(init_std=0.3), ENC.vocab_size, rngs=nnx.Rngs(3))
  splitter = words.get_splitter(spec, 8)
  split_ids = hat_data.WordFields(splitter, 64, 8).word_starts
  prompt = [ENC.bos_id] + list(ENC.encode('def f(x): return x + '))
  cached = hat.generate(model, prompt, splitter, 24, max_word_bytes=8)
  uncached = hat.generate_uncached(model, prompt, splitter, 24, max_word_bytes=8)
  assert cached == uncached
  # the generation crossed word boundaries, so the backbone cache was exercised
  assert len(split_ids(prompt + cached)) > len(split_ids(prompt)) + 2


@pytest.mark.parametrize('spec,pooling,attention', [('fixed:4', 'boundary', 'word'),
                                                    ('ascii_whitespace', 'boundary', 'causal'),
                                                    ('whitespace', 'query', 'word')])
def test_cached_generation_of_variants_equals_uncached(spec, pooling, attention):
  """The variants' generation equals a full forward per new id, greedy: the boundary token
  emitted by the model (forced where a word reached the cap, here 4 bytes), the intra-word
  encoder run once on each finished word."""
  model = hat.HAT(tiny_cfg(pooling, 0.3, attention), ENC.vocab_size, rngs=nnx.Rngs(3))
  splitter = words.get_splitter(spec, 8)
  lw = 8
  if pooling == 'boundary':
    splitter, lw = hat_data.BoundaryWords(model.boundary_id, splitter.word_cap), 9
  prompt = [ENC.bos_id] + list(encoder_for(spec, 8, model.boundary_id).encode('def f(x): r'))
  cached = hat.generate(model, prompt, splitter, 20, max_word_bytes=lw)
  assert cached == hat.generate_uncached(model, prompt, splitter, 20, max_word_bytes=lw)
  words_out = hat.host_word_starts(splitter, lw, prompt + cached)
  assert len(words_out) >= len(hat.host_word_starts(splitter, lw, prompt)) + 2  # crossed words
  if spec == 'fixed:4':  # no word of more than 4 bytes: the model had to emit the boundary
    assert model.boundary_id in cached
    bounds = words_out + [len(prompt + cached)]
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) <= 5


def test_boundary_token_id_and_splitter_errors():
  """A boundary id that collides with a special or a byte, or a splitter that decides word
  starts late: ValueErrors naming the key (launch.py prints them as one `error:` line)."""
  sp = words.get_splitter('ascii_whitespace', 8)
  for bad, what in ((1, 'special'), (ord('a') + 3, "0x61 ('a')"), (384, 'outside')):
    with pytest.raises(ValueError, match=rf'model.boundary_id={bad} .*{re.escape(what)}'):
      hat_data.BoundaryByteEncoder(sp, bad)
    with pytest.raises(ValueError, match='model.boundary_id'):
      m = tiny_cfg('boundary')
      m.boundary_id = bad
      hat.HAT(m, ENC.vocab_size, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="data.splitter='whitespace'"):
    hat_data.BoundaryByteEncoder(words.get_splitter('whitespace', 8), 259)
  enc = hat_data.BoundaryByteEncoder(sp, 300)
  ids = enc.encode('ab  cd\té')
  assert ids.tolist() == [300, 100, 101, 300, 35, 35, 102, 103, 300, 12, 198, 172]
  assert enc.decode(ids) == 'ab  cd\té' and enc.token_bytes[ids].sum() == 9


@pytest.mark.parametrize('spec', ['unicode', 'whitespace'])
def test_host_word_starts_are_causal_byte_by_byte(spec):
  """Byte by byte, as generation and the byte-level view see a text, completed words never
  change; for `unicode` the bytes of an unfinished character join the last word (split alone
  they would be invalid UTF-8, words of their own) until the character is complete."""
  sp = words.get_splitter(spec, 8)
  for text in ('a clause\u2019s x', 'b\u00a0c  d\u3000e', '\u00e9t\u00e9 \U0001F600x',
               'x\u0301y z', 'abcdefg\u00e9\u00e9h'):
    ids = [ENC.bos_id] + ENC.encode(text).tolist()
    prev = None
    for n in range(1, len(ids) + 1):
      starts = hat.host_word_starts(sp, 8, ids[:n])
      if prev is not None:
        assert starts[:len(prev) - 1] == prev[:-1], (text, n)
      prev = starts
    assert prev == hat.host_word_starts(sp, 8, ids)
  if spec == 'unicode':
    assert hat.host_word_starts(sp, 8, [ENC.bos_id, 0xC3 + 3]) == [0, 1]  # after a special


@pytest.mark.parametrize('spec', ['whitespace', 'spacebyte'])
def test_cached_generation_through_late_word_starts(spec):
  """Bytes forced through the device loop: multi-byte whitespace (U+3000, U+00A0, U+2003)
  starts a word 1-2 bytes after its first byte arrived, so the decoder re-reads those bytes;
  a 9-byte word hits the cap (8); specials in the middle. The greedy continuation after the
  forced bytes must equal the uncached one and the one from prefilling them as a prompt. Two
  decoder layers: only then do the re-read bytes' cached keys depend on the word context."""
  m = tiny_cfg(init_std=0.3)
  m.dec_layers = 2
  model = hat.HAT(m, ENC.vocab_size, rngs=nnx.Rngs(5))
  splitter = words.get_splitter(spec, 8)
  prompt = [ENC.bos_id] + list(ENC.encode('ab'))
  forced = list(ENC.encode('c\u3000d\u00a0e  f\u2003abcdefghi é')) + [ENC.eos_id, ENC.bos_id]
  forced += list(ENC.encode('g\u3000'))
  n_free = 12
  looped = hat.generate(model, prompt, splitter, len(forced) + n_free, max_word_bytes=8,
                        forced=forced)
  assert looped[:len(forced)] == forced
  prefilled = hat.generate(model, prompt + forced, splitter, n_free, max_word_bytes=8)
  uncached = hat.generate_uncached(model, prompt + forced, splitter, n_free, max_word_bytes=8)
  assert looped[len(forced):] == prefilled == uncached


@pytest.mark.parametrize('pooling,attention', [('query', 'causal'), ('boundary', 'word')])
def test_loss_and_grads_finite(pooling, attention):
  model = hat.HAT(tiny_cfg(pooling, encoder_attention=attention), ENC.vocab_size,
                  rngs=nnx.Rngs(0))
  batch, _ = make_batch(['some text for the loss', ''], boundary=model.boundary_id)
  (loss, sums), grads = nnx.jit(nnx.value_and_grad(hat.hat_loss, has_aux=True))(model, batch)
  assert np.isfinite(float(loss)) and float(sums['n_tokens']) == float(batch['weights'].sum())
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_flops_per_byte_matches_parameter_count():
  """With attention terms removed (window=1 has S=1 key; tiny), 6 * matmul params touched per
  byte position must equal the formula; checked against the model's real parameter shapes."""
  m = tiny_cfg('last')
  t, w, lw = 64, 16, 8
  model = hat.HAT(m, ENC.vocab_size, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
                          if np.ndim(x) >= 2)
  byte_mm = size(params['encoder']) + size({k: v for k, v in params['decoder'].items()})
  cross = sum(size(l['cross_v']) + size(l['cross_o']) for l in params['decoder']['layers'].values())
  byte_mm -= cross
  word_mm = size(params['backbone']) + size(params['pool_out']) + cross
  expected = 6 * (byte_mm + size(params['head'])) + 6 * word_mm * w / t
  attn = 12 * (m.enc_layers + m.dec_layers) * m.byte_d_model * m.byte_window * (
      1 - m.byte_window / (2 * t)) + 12 * m.num_layers * m.num_heads * m.head_dim * (w / 2) * w / t
  got = hat.flops_per_byte(m, ENC.vocab_size, t, w, lw)
  assert got == pytest.approx(expected + attn, rel=1e-9)


def test_launch_train_eval_sample(data_dir, tmp_path):
  wd = str(tmp_path / 'hat')
  args = ['--config=configs/hat.py:tiny', f'--workdir={wd}', '--config.train.steps=12',
          '--config.ckpt.every=6', '--config.data.max_docs=300', '--config.train.batch_size=8',
          '--config.train.eval_batches=3', '--config.sample.max_new_tokens=24',
          '--config.data.splitter=unicode', '--config.model.encoder_attention=word',
          '--config.eval.next_word_texts=4']
  p = run_launch(data_dir, *args)
  assert 'bits per byte' in p.stdout and 'sample 0' in p.stdout
  summary = json.load(open(os.path.join(wd, 'train_summary.json')))
  assert summary['data']['train_bytes_per_word'] > 1
  run_launch(data_dir, *args, '--mode=eval')
  ev = json.load(open(os.path.join(wd, 'eval_step12.json')))
  assert ev['bpb'] == pytest.approx(summary['eval']['bpb'], abs=1e-6)


@pytest.mark.parametrize('spec', ['whitespace', 'unicode', 'spacebyte', 'fixed:4'])
def test_degenerate_text_through_hat(spec):
  """Whitespace-only, punctuation-only, over-long words, invalid UTF-8 and empty rows."""
  texts = ['   \n\t  \r\n   ', '!!!???...,;:---', 'x' * 40 + ' ' + 'é' * 11, '', 'a\x00b']
  batch, fields = make_batch(texts, splitter_spec=spec, t=64, w=32, lw=8)
  # invalid UTF-8 bytes in a row (e.g. a row that starts mid-character)
  batch2, _ = make_batch(['ok'], splitter_spec=spec, t=64, w=32, lw=8)
  raw = [0xff, 0xfe, 0x80, 0xc3] + list(b'abc')
  batch2['inputs'][0, 1:1 + len(raw)] = np.asarray(raw) + 3
  for b in (batch, fields(batch2)):
    lens = (b['word_gather'] >= 0).sum(-1)
    assert lens.max() <= 8  # the cap holds, cut at UTF-8 boundaries by the splitter
    real = b['segment_ids'] > 0
    assert (b['word_ids'][real] >= 0).all() and (b['word_ids'][~real] == -1).all()
  model = hat.HAT(tiny_cfg(), ENC.vocab_size, rngs=nnx.Rngs(0))
  loss, sums = nnx.jit(hat.hat_loss)(model, batch)  # one compilation for the four splitters
  assert np.isfinite(float(loss)) and float(sums['n_tokens']) > 0


def test_compare_sweep_matches_training_flops(monkeypatch):
  """Every model of the matched-FLOP comparison trains within one step of the same budget."""
  from train import config_lib, families, sweep, trainer
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg, module = config_lib.load('configs/compare.py:tiny')
  cfg.train.flops_budget = 3e12
  points = module.get_sweep(cfg)
  assert [p['name'] for p in points] == ['hat', 'byte_lm', 'subword_lm']
  for p in points:
    sub = sweep._point_config(cfg, p, {})
    budget_steps = sub.train.steps
    resolved, per_step = trainer.resolve_steps(sub, families.get(sub))
    assert sub.train.steps == budget_steps  # the given config is not changed
    steps = resolved.train.steps
    assert 3e12 - per_step < steps * per_step <= 3e12
    assert resolved.train.eval_every == max(1, steps // 6)


def test_pooling_projection_order():
  """Query pooling projects keys/values over the row then gathers (W*Lw >= T, training) or
  gathers then projects (a long row, generation): the same word vectors either way."""
  m = hat.HAT(tiny_cfg('query'), ENC.vocab_size, rngs=nnx.Rngs(0))
  batch, _ = make_batch(['hello world, this is HAT', 'x'], t=48, w=16, lw=8)  # W*Lw = 128 >= 48
  h = jax.random.normal(jax.random.key(0), (2, 48, 32))
  long_h = jnp.concatenate([h, jnp.zeros((2, 200, 32))], axis=1)              # T = 248 > 128
  gather = jnp.asarray(batch['word_gather'])
  pool = jax.jit(lambda h: m.pool(h, gather))
  chex.assert_trees_all_close(pool(h), pool(long_h), atol=1e-5)
  chex.assert_trees_all_close(pool(h), m.pool(h, gather, project_first=False), atol=1e-5)
