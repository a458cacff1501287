"""Sentence space, LCM (Base and Two-Tower), sentence decoder: units and one end-to-end run."""
import collections
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import pipeline, sentences
from models import lcm
from train import config_lib
from train.evals import lcm as lcm_evals
from train.families import lcm as lcm_family
from train.families import sentence_decoder as sd


# -- sentence splitting ----------------------------------------------------------------------
def test_split_sentences_caps_and_counts():
  st = collections.Counter()
  text = ('The "try" statement specifies handlers. It runs the suite!\n\nA second  paragraph'
          '\nwraps here? "Quoted" starts a sentence. e.g. lower case does not.')
  out = sentences.split_document(text, 200, st)
  assert out == ['The "try" statement specifies handlers.', 'It runs the suite!',
                 'A second paragraph wraps here?', '"Quoted" starts a sentence. e.g. lower case '
                 'does not.']
  long = 'alpha beta, gamma delta; ' * 6 + 'omega'
  pieces = sentences.split_document(long, 40, st)
  assert all(len(p.encode()) <= 40 for p in pieces) and st['sentences_resplit'] == 1
  assert pieces[0].endswith(';'), pieces  # the best boundary in the window: '; ' over ', '
  assert ' '.join(pieces) == long.strip()
  # no boundary at all: cut at a character boundary, never inside a UTF-8 sequence
  cjk = '漢字' * 30
  pieces = sentences.split_document(cjk, 16, st)
  assert ''.join(pieces) == cjk and all(len(p.encode()) <= 16 for p in pieces)
  # non-text characters become spaces (counted); a document of only those is empty (counted)
  st = collections.Counter()
  assert sentences.split_document('Bell\x07 rings.\x00 Done\ufffd.', 64, st) == [
      'Bell rings.', 'Done .']
  assert st['chars_non_text'] == 3
  assert sentences.split_document('\x00\x01 \ufffd\n\n  ', 64, st) == []
  assert st['docs_empty'] == 1
  assert sentences.split_document('Only one.', 64, st) == ['Only one.']
  assert st['docs_one_sentence'] == 1
  with pytest.raises(ValueError, match='max_bytes'):
    sentences.cap_sentence('x', 4)


def test_robust_normalizer():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (20000, 3)).astype(np.float32)
  x[:50] = 1e6  # outliers move neither statistic
  x[:, 2] = 7.0  # constant dimension: scale 1, not 0
  center, scale = sentences.fit_robust_normalizer(x)
  np.testing.assert_allclose(center[:2], 3.0, atol=0.05)
  np.testing.assert_allclose(scale[:2], 2.0, atol=0.06)
  assert center[2] == 7.0 and scale[2] == 1.0


# -- diffusion pieces ------------------------------------------------------------------------
@pytest.mark.parametrize('schedule', ['cosine', 'sigmoid'])
def test_alpha_bars(schedule):
  c = lcm.default_config()
  c.schedule = schedule
  a = lcm.alpha_bars(c)
  assert a.shape == (100,) and np.all(np.diff(a) < 0) and a[0] > 0.99
  assert a[-1] == pytest.approx(0.0, abs=1e-12)  # zero terminal SNR
  c.zero_snr = False
  assert lcm.alpha_bars(c)[-1] > 0


def test_context_mask_is_shifted_causal_per_document():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  m = np.asarray(lcm.context_mask(seg))[0]
  assert m.shape == (6, 7) and m[:, 0].all()  # the zero vector is always visible
  # query j sees h_0..h_j of its own document (key k+1 holds h_k)
  assert m[0, 1:].tolist() == [1, 0, 0, 0, 0, 0]
  assert m[2, 1:].tolist() == [1, 1, 1, 0, 0, 0]
  assert m[4, 1:].tolist() == [0, 0, 0, 1, 1, 0]
  assert not m[5, 1:].any()  # padding sees only the zero vector
  dropped = np.asarray(lcm.context_mask(seg, jnp.array([[0, 0, 1, 0, 0, 0]], bool)))[0]
  assert dropped[2].tolist() == [1, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(dropped[[0, 1, 3, 4]], m[[0, 1, 3, 4]])


def _tiny_model_cfg(variant):
  c = lcm.default_config()
  c.variant = variant
  c.d_model, c.num_layers, c.num_heads, c.head_dim, c.mlp_dim = 32, 1, 2, 16, 64
  c.denoiser_layers = 1
  return c


def _nonzero_modulation(model, rng):
  """AdaLN modulation starts at zero (gates closed); open it so outputs depend on the context."""
  for layer in model.denoiser.layers:
    k = layer.modulation.kernel
    k[...] = 0.1 * jax.random.normal(rng, k[...].shape)
    layer.modulation.bias[...] = jnp.ones_like(layer.modulation.bias[...])  # gates open
    for dense in (layer.q, layer.k, layer.v, layer.o):  # unit-scale projections
      dense.kernel[...] = dense.kernel[...] * 50


def test_two_tower_reads_only_earlier_sentences_of_its_document():
  e = 8
  model = lcm.LCM(_tiny_model_cfg('two_tower'), e, np.zeros(e), np.ones(e), rngs=nnx.Rngs(0))
  _nonzero_modulation(model, jax.random.key(1))
  rng = np.random.default_rng(0)
  inputs = jnp.array([[1, 5, 6, 7, 1, 8]])
  seg = jnp.array([[1, 1, 1, 1, 2, 2]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1]])
  emb = jnp.asarray(rng.normal(size=(1, 6, e)), jnp.float32)
  xt = jnp.asarray(rng.normal(size=(1, 6, e)), jnp.float32)
  t = jnp.full((1, 6), 50)

  @nnx.jit  # one compiled program (eagerly, every operation compiles on its own)
  def out(model, emb):
    h = model.context(emb, inputs, pos, seg)
    return model.denoiser(xt, t, lcm.shifted_context(h), lcm.context_mask(seg))

  base = out(model, emb)
  changed = out(model, emb.at[0, 2].add(5.0))  # input 2 of document 1
  np.testing.assert_allclose(changed[0, :2], base[0, :2], atol=1e-5)  # earlier queries
  np.testing.assert_allclose(changed[0, 4:], base[0, 4:], atol=1e-5)  # the other document
  assert np.abs(np.asarray(changed[0, 2:4] - base[0, 2:4])).max(axis=-1).min() > 1e-2


def test_ddim_with_an_exact_denoiser_returns_its_x0():
  """If the denoiser always answers x0, every DDIM step (guided or not) must land on x0."""
  e = 8
  c = _tiny_model_cfg('two_tower')
  model = lcm.LCM(c, e, np.zeros(e), np.ones(e), rngs=nnx.Rngs(0))
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, e)), jnp.float32)

  def exact(xt, t, ctx, mask):
    del t, ctx, mask
    return jnp.concatenate([x0] * (xt.shape[0] // x0.shape[0]))  # guided calls stack c and u

  model.denoiser = exact
  h = jnp.zeros((1, 4, c.d_model))
  seg = jnp.ones((1, 4), jnp.int32)
  for scale, steps in ((1.0, 10), (3.0, 40)):
    got = lcm.ddim_sample(model, h, seg, jax.random.key(0), c, steps=steps,
                          guidance_scale=scale, guidance_rescale=0.7, initial_noise_scale=0.6)
    np.testing.assert_allclose(got, x0, atol=1e-4)
  with pytest.raises(ValueError, match='inference steps'):
    lcm.ddim_sample(model, h, seg, jax.random.key(0), c, steps=0)


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics():
  rng = np.random.default_rng(0)
  target = rng.normal(size=(40, 16))
  doc = np.repeat(np.arange(10), 4)
  assert lcm_evals.contrastive_accuracy(target, target, doc).mean() == 1.0
  wrong = np.roll(target, 4, axis=0)  # each prediction is another document's target
  per = lcm_evals.contrastive_accuracy(wrong, target, doc)
  assert per.mean() < 0.6 and (per < 1).all()  # that target is always a closer negative
  # chance level for predictions unrelated to the targets
  ca = lcm_evals.contrastive_accuracy(rng.normal(size=(40, 16)), target, doc).mean()
  assert 0.3 < ca < 0.7
  ctx = [target[max(i - 2, 0):i + 1] * 0 + target[i - 1] for i in range(40)]
  assert lcm_evals.paraphrase_ratio(target, target, ctx) == pytest.approx(1.0)
  par = lcm_evals.paraphrase_ratio(np.stack([c[-1] for c in ctx]), target, ctx)  # copies context
  assert par > 1.5
  chex.assert_trees_all_close(lcm_evals.l2(np.ones((2, 4)), np.zeros((2, 4))), np.full(2, 2.0))
  assert lcm_evals.bleu(['the cat sat on the mat'], ['the cat sat on the mat']) == pytest.approx(100.0)
  assert lcm_evals.bleu(['a b c d'], ['w x y z']) == 0.0
  # hand-computed: 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3; equal lengths (no penalty)
  want = 100 * np.exp(np.mean(np.log([5 / 6, 3 / 5, 2 / 4, 1 / 3])))
  assert lcm_evals.bleu(['the cat sat on a mat'], ['the cat sat on the mat']) == pytest.approx(want)
  # 4/5, 2/4, then 0/3 -> 1/(2*3) and 0/2 -> 1/(4*2)
  want = 100 * np.exp(np.mean(np.log([4 / 5, 2 / 4, 1 / 6, 1 / 8])))
  assert lcm_evals.bleu(['a b c d e'], ['a b x d e']) == pytest.approx(want)


# -- end to end on a tiny local corpus -----------------------------------------------------------
_DOCS = [
    'The loop runs once per item. It stops at the end. Then control returns.',
    'A class bundles data. Methods act on it. Instances share methods. Attributes differ.',
    'Only one sentence here.',
    '\x01\x02 \ufffd\x7f',  # nothing but non-text characters: an empty document, skipped
    'Exceptions signal errors. Handlers catch them. Finally clauses always run.',
    'Modules hold code. Packages hold modules. Imports load them once.',
    ('This sentence is far too long for the cap, so it is split at a comma, or at a '
     'semicolon; or at a space when nothing better fits the window at all.'),
    'Strings are immutable\x07. Lists are mutable. Tuples are immutable too.',
    'Generators yield values. They keep state between calls. Iteration ends with StopIteration.',
    'Dictionaries map keys to values. Keys must be hashable. Order is insertion order.',
    'Functions are objects. They can be passed around. Closures capture variables.',
    'Files must be closed. The with statement closes them. Errors are still raised.',
    'Numbers can be large. Integers have arbitrary precision. Floats do not.',
    'Sets hold unique items. Membership tests are fast. Sets are unordered.',
]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  """A sentence decoder, a Base-LCM and a Two-Tower LCM, each trained for 3 steps."""
  del data_dir
  from train import trainer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('lcm')
  corpus_path = root / 'docs.jsonl'
  corpus_path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in _DOCS))
  common = {'data.source': f'text:{corpus_path}', 'data.doc_filter': '',
            'data.holdout_docs': 0.3, 'data.max_sentence_bytes': 48, 'train.steps': 3,
            'train.batch_size': 4, 'train.log_every': 1, 'ckpt.every': 3, 'eval.max_sentences': 6,
            'data.prefetch': 0}
  small = {'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 2,
           'model.head_dim': 16, 'model.mlp_dim': 64}
  out = {'root': root}
  cfg, _ = config_lib.load('configs/sentence_decoder.py:tiny')
  cfg.unlock()
  config_lib.override(cfg, {**common, **small, 'data.seq_len': 49, 'model.prefix_len': 2,
                            'train.eval_batches': 1})
  out['dec'] = str(root / 'dec')
  out['dec_cfg'] = cfg
  out['dec_summary'] = trainer.train(cfg, out['dec'])
  out['dec_eval'] = trainer.evaluate(cfg, out['dec'])
  for variant in ('base', 'two_tower'):
    cfg, _ = config_lib.load('configs/lcm.py:tiny')
    cfg.unlock()
    config_lib.override(cfg, {**common, **small, 'data.seq_len': 8, 'model.variant': variant,
                              'model.denoiser_layers': 1, 'lcm.inference_steps': 4,
                              'lcm.decoder_workdir': out['dec'], 'lcm.max_sentences': 2,
                              'lcm.eot_threshold': 1.1, 'lcm.repeat_threshold': 1.1})
    wd = str(root / variant)
    out[variant] = (cfg, wd, trainer.train(cfg, wd), trainer.evaluate(cfg, wd))
  return out


def test_decoder_trains_and_round_trips(runs):
  s, ev = runs['dec_summary'], runs['dec_eval']
  assert s['step'] == 3 and np.isfinite(s['train']['loss']) and np.isfinite(ev['bpb'])
  rt = ev['round_trip']
  assert rt['sentences'] == 6 and 0 <= rt['exact_match'] <= 1 and 0 <= rt['bleu'] <= 100
  assert np.isfinite(rt['round_trip_l2'])
  # the data counts reach the run summary and the caches: the re-split long sentence, the
  # empty document (in whichever space it fell)
  cfg = runs['dec_cfg']
  stats = [sd.load_space(cfg.data, split, 'minilm').meta['stats']
           for split in ('train', 'validation')]
  assert sum(st.get('sentences_resplit', 0) for st in stats) >= 1
  assert sum(st.get('docs_empty', 0) for st in stats) == 1
  assert s['data']['train_docs'] == stats[0]['docs']


@pytest.mark.parametrize('variant', ['base', 'two_tower'])
def test_lcm_trains_evaluates_and_samples(runs, variant):
  from train import trainer  # pylint: disable=import-outside-toplevel
  cfg, wd, summary, ev = runs[variant]
  assert summary['step'] == 3 and np.isfinite(summary['train']['loss'])
  m = ev['lcm']
  assert m['targets'] > 0 and 0 <= m['contrastive_acc'] <= 1
  for k in ('l2', 'round_trip_l2', 'paraphrase_ratio', 'decoder_bleu', 'copy_prev_l2'):
    assert np.isfinite(m[k]), k
  assert os.path.exists(os.path.join(wd, 'lcm_metrics_step3.md'))
  assert set(ev['row']) >= {'l2', 'contrastive_acc', 'round_trip_l2'}
  # the normalizer is part of the parameters and did not move in training
  setup, state, _ = trainer.restore(cfg, wd)
  np.testing.assert_array_equal(np.asarray(state['params']['center']), setup.family.center)
  text, info = setup.family.generate(setup.graphdef, state['params'], cfg.sample)
  assert info == {'sentences': 2, 'stop': '2 sentences'}  # stopping thresholds set above 1
  assert text.startswith(cfg.sample.prompt) and text == trainer.sample(cfg, wd)[0]
  if variant == 'base':  # the stopping rules: every prediction is "end of text" / a repeat
    fam = setup.family
    fam.cfg.unlock()
    for key, stop in (('eot_threshold', 'end of text'), ('repeat_threshold', 'repetition')):
      fam.cfg.lcm[key] = -1.0
      text, info = fam.generate(setup.graphdef, state['params'], cfg.sample)
      assert info == {'sentences': 0, 'stop': stop} and text == cfg.sample.prompt
      fam.cfg.lcm[key] = 1.1


def test_report_gives_an_lcm_run_its_recorded_row(runs, tmp_path):
  """--mode=report over an LCM run: the row of what it recorded, `view: none (...)` (it has no
  byte-level view), no bytes seen (it models no bytes)."""
  from train import cross_family  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/cross_family.py')
  config_lib.override(cfg, {'report.runs': runs['base'][1], 'report.byte_eval': False})
  (row,) = cross_family.report(cfg, str(tmp_path / 'report'))
  assert row['family'] == 'lcm' and row['view'].startswith('none (') and row['steps'] == 3
  assert row['status'] == 'finished' and row['bytes_seen'] is None and row['tokens_seen'] > 0


def test_sentence_batches_resume_exactly(runs):
  cfg, _, _, _ = runs['base']
  space = sd.load_space(cfg.data, 'train', 'minilm')
  meta_time = os.path.getmtime(os.path.join(space.directory, 'meta.json'))
  index = sentences.SentenceIndex(space)
  it = pipeline.TrainIterator(index, index, 8, 2, seed=3, prefetch=0)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again = pipeline.TrainIterator(index, index, 8, 2, seed=3, prefetch=0, state=state)
  for w in want:
    chex.assert_trees_all_equal(w, next(again))
  fields = sentences.EmbeddingFields(space)(want[0])
  np.testing.assert_array_equal(fields['target_emb'][0, 0], space.embeddings[want[0]['targets'][0, 0]])
  assert fields['input_emb'][want[0]['inputs'] == sentences.BOS_ID].sum() == 0
  rows = sentences.SentenceRows(space, 48, 3, seed=1)
  next(rows)
  st = rows.get_state()
  a = [next(rows) for _ in range(4)]
  rows2 = sentences.SentenceRows(space, 48, 3, seed=1, state=st)
  for x in a:
    chex.assert_trees_all_equal(x, next(rows2))
  # a second request reads the same cache (not rebuilt)
  sd.load_space(cfg.data, 'train', 'minilm')
  assert os.path.getmtime(os.path.join(space.directory, 'meta.json')) == meta_time


def test_bad_sentence_inputs(runs, tmp_path):
  cfg, _, _, _ = runs['base']
  empty = tmp_path / 'empty.jsonl'
  empty.write_text(json.dumps({'text': '\x01\x02'}) + '\n' + json.dumps({'text': ' \ufffd '}) + '\n')
  cfg = cfg.copy_and_resolve_references()
  cfg.data.source = f'text:{empty}'
  with pytest.raises(ValueError, match='no document with text left'):
    sd.load_space(cfg.data, 'train', 'minilm')
  with pytest.raises(ValueError, match='unknown sentence encoder'):
    sd.sentence_encoder('word2vec')
  # a decoder for another sentence space is refused by name
  with pytest.raises(ValueError, match='decodes'):
    sd.check_decoder(sd.load_decoder(runs['dec']), 'hf:/elsewhere', 'lcm.decoder_workdir')
  # a prompt without a sentence is refused before training (not after the last step)
  from train import trainer  # pylint: disable=import-outside-toplevel
  no_prompt = runs['base'][0].copy_and_resolve_references()
  no_prompt.sample.prompt = ' \n '
  with pytest.raises(ValueError, match='has no sentence'):
    trainer.train(no_prompt, str(tmp_path / 'no_prompt'))
  assert not os.path.exists(tmp_path / 'no_prompt' / 'checkpoints')


def test_sentence_autoencoder_space(runs):
  """model.autoencoder=True trains a byte encoder with the decoder; its embeddings then form a
  sentence space of their own (cached like MiniLM's) that an LCM reads."""
  from train import trainer  # pylint: disable=import-outside-toplevel
  cfg = runs['dec_cfg'].copy_and_resolve_references()
  cfg.unlock()
  config_lib.override(cfg, {'model.autoencoder': True, 'model.embed_dim': 16,
                            'model.encoder_layers': 1})
  wd = str(runs['root'] / 'ae')
  summary = trainer.train(cfg, wd)
  assert np.isfinite(summary['train']['loss'])
  enc = sd.sentence_encoder(f'autoencoder:{wd}')
  e = enc(['One sentence.', 'Another, longer sentence here.'])
  assert e.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  lcm_cfg, _, _, _ = runs['base']
  lcm_cfg = lcm_cfg.copy_and_resolve_references()
  lcm_cfg.data.sentence_encoder = f'autoencoder:{wd}'
  lcm_cfg.lcm.decoder_workdir = wd
  fam = lcm_family.LCMFamily(lcm_cfg)
  assert fam.space.dim == 16 and fam.space.meta['encoder'] == f'autoencoder:{wd}'
  sd.check_decoder(sd.load_decoder(wd), fam.spec, 'lcm.decoder_workdir')
  with pytest.raises(ValueError, match='not an autoencoder'):
    sd.load_decoder(runs['dec'], autoencoder=True)
