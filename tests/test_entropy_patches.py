"""Entropy patches (BLT; `data.splitter='entropy'`): units cut where a byte LM's next-byte entropy
is high. Causality (future bytes change neither past units nor past log-probs), cached
generation equal to uncached (the patcher's own KV cache beside the HAT's), the byte view,
threshold calibration to a target mean unit length, the recorded patcher of a run, and bad
input (a missing patcher, one that is not a byte LM or reads another vocabulary, thresholds and
targets no text reaches, boundary tokens).

One tiny random byte LM and HAT serve the in-process tests; one byte-LM run and one HAT run on
it are launched (module fixture)."""
import json
import os
import shutil

import hypothesis
import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from conftest import run_launch
from data import encoders, words
from models import hat, hat_view, patcher, token_lm
from train import config_lib, families

ENC = encoders.ByteEncoder()
LW = 8
TEXT = 'def f(x):\n    return x + 1  # the cat sat on the mat, said the docs.'


def _byte_lm():
  m = token_lm.default_model_config()
  m.d_model, m.num_layers, m.mlp_dim, m.init_std = 32, 2, 64, 0.5  # spread-out entropies
  return token_lm.TokenLM(m, ENC.vocab_size, rngs=nnx.Rngs(0)), m


@pytest.fixture(scope='module')
def source():
  """A patcher that reads 24 ids back (as if trained on rows of 24), in pieces of 64 ids: the
  tests' texts are longer than both."""
  model, window = patcher.windowed(*_byte_lm(), context=24)
  return patcher.LMEntropy(model, window=window, num_layers=2, chunk=64)


def test_long_rows_are_read_in_pieces_exactly(source):
  """Pieces overlapping by the receptive field (layers x window) give the entropies of one
  pass over the whole row, packed documents included."""
  whole = patcher.LMEntropy(patcher.windowed(*_byte_lm(), context=24)[0])
  ids = np.random.RandomState(0).randint(3, 259, (2, 300))
  ids[:, 0] = ENC.bos_id
  seg = np.ones_like(ids)
  seg[1, 150:] = 2
  np.testing.assert_allclose(source.entropies(ids, seg), whole.entropies(ids, seg), atol=1e-6)


@pytest.fixture(scope='module')
def model():
  m = hat.default_model_config()
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 2, 16, 64
  m.byte_d_model, m.byte_heads, m.byte_mlp_dim, m.byte_window, m.init_std = 32, 2, 64, 8, 0.3
  return hat.HAT(m, ENC.vocab_size, rngs=nnx.Rngs(3))


def ids_of(text: str) -> list[int]:
  return [ENC.bos_id] + list(ENC.encode(text))


def splitters(source):
  """A global and a relative rule, each at a threshold that cuts TEXT into several units."""
  h = source.entropies(np.asarray([ids_of(TEXT)]), np.ones((1, len(ids_of(TEXT)))))[0, 1:]
  return [words.EntropySplitter(source, 'global', float(np.median(h)), LW),
          words.EntropySplitter(source, 'relative', 0.5, LW)]


# -- the rule ------------------------------------------------------------------------------------
def test_units_follow_the_entropies_and_cap(source):
  glob, rel = splitters(source)
  ids = ids_of(TEXT)
  h = source.entropies(np.asarray([ids]), np.ones((1, len(ids))))[0]
  for sp in (glob, rel):
    starts = hat.host_word_starts(sp, LW, ids)
    rise = h if sp.rule == 'global' else h - np.append(0, h[:-1])
    bounds = starts + [len(ids)]
    assert max(np.diff(bounds)) <= LW and 3 < len(starts) < len(ids) - 3
    for i in range(2, len(ids)):  # after bos: a start where the rule fires or the cap cuts
      if rise[i] > sp.threshold:
        assert i in starts
      elif i in starts:
        prev = max(s for s in starts if s < i)
        assert i - prev == LW or i - prev + words._NEED[ids[i] - 3] > LW  # pylint: disable=protected-access
    # the text API reads a text as a document after bos: the same units
    assert [s + 1 for s in sp.split_bytes(TEXT.encode())] == starts[1:]
    assert ''.join(sp.split(TEXT)) == TEXT


def test_packed_documents_do_not_mix(source):
  """In a packed row each document is cut as alone (entropies never read another document)."""
  sp = splitters(source)[0]
  a, b = ids_of('the cat sat') + [ENC.eos_id], ids_of('x = [1, 2, 3]') + [ENC.eos_id]
  row = np.zeros((1, 40), np.int32)
  seg = np.zeros((1, 40), np.int32)
  row[0, :len(a)], row[0, len(a):len(a) + len(b)] = a, b
  seg[0, :len(a)], seg[0, len(a):len(a) + len(b)] = 1, 2
  lay = words.batch_words(row, seg, sp, 40, LW)
  got = lay['word_start'][0, :lay['num_words'][0]].tolist()
  alone = lambda ids: hat.host_word_starts(sp, LW, ids)
  assert got == alone(a) + [len(a) + s for s in alone(b)]


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(st.binary(min_size=1, max_size=40), st.integers(1, 40), st.booleans())
def test_future_bytes_do_not_change_past_units(source, data, cut, relative):
  sp = splitters(source)[int(relative)]
  ids = [ENC.bos_id] + [b + 3 for b in data]
  k = min(cut, len(ids))
  full = hat.host_word_starts(sp, LW, ids)
  assert hat.host_word_starts(sp, LW, ids[:k]) == [s for s in full if s < k]


def test_future_bytes_do_not_change_past_log_probs(source, model):
  sp = splitters(source)[0]
  ids = ids_of(TEXT)
  size = len(ids)
  fwd = nnx.jit(lambda m, b: jax.nn.log_softmax(m(b)[0], axis=-1))
  full = np.asarray(fwd(model, hat.single_row_batch(ids, hat.host_word_starts(sp, LW, ids), LW,
                                                    size)))
  for k in (9, 23, 40):
    part = ids[:k]
    lp = np.asarray(fwd(model, hat.single_row_batch(part, hat.host_word_starts(sp, LW, part), LW,
                                                    size)))
    np.testing.assert_allclose(lp[:k], full[:k], atol=1e-5)


# -- generation and the byte view ----------------------------------------------------------------
@pytest.mark.parametrize('relative', [False, True], ids=['global', 'relative'])
def test_cached_generation_equals_uncached(source, model, relative):
  """The jitted loop decides units with the patcher's own KV cache, byte by byte; the reference
  re-runs both models over the whole sequence for every byte."""
  sp = splitters(source)[int(relative)]
  prompt = ids_of('def f(x): return x + ')
  cached = hat.generate(model, prompt, sp, 24, max_word_bytes=LW)
  assert cached == hat.generate_uncached(model, prompt, sp, 24, max_word_bytes=LW)
  n_prompt = len(hat.host_word_starts(sp, LW, prompt))
  assert len(hat.host_word_starts(sp, LW, prompt + cached)) > n_prompt + 2  # crossed units


def test_byte_view_matches_the_forward(source, model):
  sp = splitters(source)[0]
  view = hat_view.byte_view(model, sp, max_word_bytes=LW)
  text = TEXT[:30].encode()
  ids = [1] + [b + 3 for b in text]
  batch = hat.single_row_batch(ids, hat.host_word_starts(sp, LW, ids), LW)
  logits = np.asarray(nnx.jit(lambda m, b: m(b)[0])(model, batch), np.float64)
  take = np.concatenate([np.arange(3, 259), [ENC.eos_id]])
  want = logits[:, take] - np.log(np.exp(logits[:, take]).sum(-1, keepdims=True))
  score = view.score(text)
  np.testing.assert_allclose(score[:-1], want[np.arange(len(text)), list(text)], atol=1e-4)
  np.testing.assert_allclose(score[-1], want[-1, -1], atol=1e-4)
  d = view.distributions(text[:12])
  np.testing.assert_allclose(np.exp(d.astype(np.float64)).sum(-1), 1.0, atol=1e-4)


# -- calibration and thresholds ------------------------------------------------------------------
def _rows(texts, t=96):
  ids = np.zeros((len(texts), t), np.int32)
  seg = np.zeros((len(texts), t), np.int32)
  for r, text in enumerate(texts):
    x = (ids_of(text) + [ENC.eos_id])[:t]
    ids[r, :len(x)], seg[r, :len(x)] = x, 1
  return ids, seg


def test_calibration_hits_the_target_mean_length(source):
  texts = [TEXT, 'import numpy as np\nprint(np.arange(10).sum())',
           'Whitespace splitting fails where words are not separated by spaces.']
  ids, seg = _rows(texts)
  n_bytes = int(((ids >= 3) & (seg > 0)).sum())
  for rule in words.PATCH_RULES:
    sp = words.EntropySplitter(source, rule, 0.0, LW)
    for target in (2.5, 4.0):
      thr, reached = words.calibrate_threshold(sp, ids, seg, target)
      assert reached == pytest.approx(target, rel=0.06)
      fields = words.batch_words(ids, seg, words.EntropySplitter(source, rule, thr, LW), 64, LW)
      starts_at_bytes = sum(int(((ids[r] >= 3) & (seg[r] > 0))[fields['word_start'][
          r, :fields['num_words'][r]]].sum()) for r in range(len(texts)))
      assert n_bytes / starts_at_bytes == pytest.approx(reached)
  with pytest.raises(ValueError, match='data.patch_target_len=8: no threshold reaches it'):
    words.calibrate_threshold(words.EntropySplitter(source, 'global', 0.0, LW), ids, seg, 8.0)


@pytest.mark.parametrize('rule,threshold', [('global', -0.1), ('global', 5.96),
                                            ('relative', 6.0), ('relative', -6.0)])
def test_a_threshold_no_text_reaches_is_refused(source, rule, threshold):
  with pytest.raises(ValueError, match=r'data.patch_threshold=.*no text reaches it'):
    words.EntropySplitter(source, rule, threshold, LW)


def test_get_splitter_names_the_patcher():
  with pytest.raises(ValueError, match='data.patcher'):
    words.get_splitter('entropy', 8)


# -- a run: the patcher recorded, and bad input --------------------------------------------------
SMALL = ['--config.data.max_docs=200', '--config.train.batch_size=8', '--config.data.seq_len=128',
         '--config.train.eval_batches=1', '--config.eval.robustness=', '--config.ckpt.async_save=False']


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """A byte LM trained a few steps, and a HAT with entropy patches from it (trained, sampled)."""
  root = tmp_path_factory.mktemp('entropy')
  lm_wd, hat_wd = str(root / 'byte_lm'), str(root / 'hat')
  run_launch(data_dir, '--config=configs/byte_lm.py:tiny', f'--workdir={lm_wd}',
             '--config.train.steps=6', '--config.sample.max_new_tokens=0', *SMALL)
  p = run_launch(data_dir, '--config=configs/hat.py:tiny', f'--workdir={hat_wd}',
                 '--config.train.steps=2', '--config.sample.max_new_tokens=0',
                 '--config.data.splitter=entropy', f'--config.data.patcher={lm_wd}',
                 '--config.data.patch_target_len=3', '--config.data.max_word_bytes=8', *SMALL)
  return lm_wd, hat_wd, p.stdout


def test_the_patcher_is_a_recorded_artifact(runs):
  lm_wd, hat_wd, stdout = runs
  assert 'HAT splitter entropy' in stdout and 'patcher ' in stdout
  rec = json.load(open(os.path.join(hat_wd, 'artifacts', 'patcher.json')))
  assert rec['rule'] == 'global' and rec['calibrated_len'] == pytest.approx(3, rel=0.06)
  assert rec['patcher_config']['family'] == 'lm'
  assert json.load(open(os.path.join(hat_wd, 'run.json')))['artifacts']['files']['patcher.json']
  # evaluation and sampling rebuild the family from the run: the recorded patcher, threshold
  # and weights (checked by fingerprint), no recalibration
  fam = families.get(config_lib.load_saved(hat_wd), hat_wd)
  assert fam.splitter.threshold == rec['threshold']
  assert fam.splitter.source.fingerprint == rec['fingerprint']
  # the patcher's forward pass is charged to the HAT's training FLOPs
  d = fam.cfg.data
  assert fam.patcher_flops > 0 and fam.flops_per_token() == pytest.approx(hat.flops_per_byte(
      fam.cfg.model, ENC.vocab_size, d.seq_len, d.max_words, fam.word_len) + fam.patcher_flops)
  summary = json.load(open(os.path.join(hat_wd, 'train_summary.json')))
  assert summary['data']['train_bytes_per_word'] > 1.5
  # weights that changed since training are refused
  rec['fingerprint'] = '0' * 16
  other = os.path.join(os.path.dirname(hat_wd), 'hat_tampered')
  shutil.copytree(hat_wd, other)
  data = json.dumps(rec).encode()
  open(os.path.join(other, 'artifacts', 'patcher.json'), 'wb').write(data)
  manifest = json.load(open(os.path.join(other, 'artifacts', 'manifest.json')))
  import hashlib  # pylint: disable=import-outside-toplevel
  manifest['files']['patcher.json']['sha256'] = hashlib.sha256(data).hexdigest()
  json.dump(manifest, open(os.path.join(other, 'artifacts', 'manifest.json'), 'w'))
  with pytest.raises(ValueError, match='other weights than the patcher this run was trained'):
    families.get(config_lib.load_saved(other), other)


def _hat_cfg(**over):
  cfg, _ = config_lib.load('configs/hat.py:tiny')
  config_lib.override(cfg, {'data.splitter': 'entropy', 'data.max_docs': 200, **over})
  return cfg


@pytest.mark.parametrize('over,error,match', [
    ({}, ValueError, 'needs data.patcher'),
    ({'data.patcher': '/nonexistent/run'}, FileNotFoundError, 'data.patcher: no run directory'),
    ({'data.patcher': 'x', 'model.pooling': 'boundary'}, ValueError, "model.pooling='boundary'"),
    ({'data.patcher': 'x', 'data.patch_target_len': 0.5}, ValueError,
     r'data.patch_target_len=0.5: no text reaches it'),
    ({'data.patcher': 'x', 'data.patch_target_len': 17.0}, ValueError,
     r'data.patch_target_len=17: no text reaches it'),
    ({'data.patcher': 'x', 'data.patch_target_len': 0.0, 'data.patch_threshold': 9.0}, ValueError,
     r'data.patch_threshold=9 .*no text reaches it'),
    ({'data.patcher': 'x', 'data.patch_rule': 'max'}, ValueError, 'data.patch_rule'),
    ({'data.patcher': 'sweep:byte_lm'}, ValueError, 'names a point of the sweep'),
], ids=['no-patcher', 'missing', 'boundary-tokens', 'target-below-1', 'target-over-cap',
        'threshold', 'rule', 'sweep-point-outside-a-sweep'])
def test_bad_input_before_anything_loads(over, error, match):
  with pytest.raises(error, match=match):
    families.get(_hat_cfg(**over))


def test_a_sweep_point_as_patcher(runs):
  """`data.patcher='sweep:NAME'`: the workdir of the point NAME beside this run's (configs/hat.py's
  sweep trains its byte LM first)."""
  lm_wd, _, _ = runs
  cfg = _hat_cfg(**{'data.patcher': 'sweep:byte_lm', 'data.seq_len': 128,
                    'data.max_word_bytes': 8, 'data.patch_calib_rows': 8})
  fam = families.get(cfg, os.path.join(os.path.dirname(lm_wd), 'entropy'))
  assert fam.patcher_record['workdir'] == os.path.realpath(lm_wd)
  assert fam.patcher_record['calibrated_len'] == pytest.approx(4, rel=0.1)


def test_a_patcher_that_is_no_byte_lm_is_refused(runs, tmp_path):
  lm_wd, hat_wd, _ = runs
  with pytest.raises(ValueError, match="is a 'hat' run, not a byte LM"):
    families.get(_hat_cfg(**{'data.patcher': hat_wd}))
  other = str(tmp_path / 'bpe_lm')
  shutil.copytree(lm_wd, other)
  cfg = json.load(open(os.path.join(other, 'config.json')))
  cfg['data']['encoder'] = 'bpe'
  json.dump(cfg, open(os.path.join(other, 'config.json'), 'w'))
  with pytest.raises(ValueError, match="another vocabulary .data.encoder='bpe'"):
    families.get(_hat_cfg(**{'data.patcher': other}))
