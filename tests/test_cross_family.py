"""Byte-level modes over finished runs: `--mode=sample --config.sample.byte_level=True`
(trainer.sample_bytes), `--mode=ensemble` and `--mode=report` (train/cross_family.py), the
N-member ensemble math (models/byte_level/ensembles.py) and their bad inputs.

Two tiny runs (a byte LM and a BPE LM, 2 steps on a small text file) are trained in-process
once; the launch.py subprocesses only check that bad input ends in one `error:` line."""
import json
import math
import os

import numpy as np
import pytest

from conftest import run_launch
from models import byte_level as bl
from train import config_lib, cross_family, families, trainer
from train.evals import byte_views

TEXT = ('def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n'
        '    return a\n\nThe quick brown fox jumps over the lazy dog. Caf\u00e9 na\u00efve.\n\n')
TINY = {'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 2,
        'model.num_kv_heads': 1, 'model.head_dim': 16, 'model.mlp_dim': 64,
        'data.seq_len': 48, 'train.batch_size': 2, 'train.steps': 2, 'train.eval_batches': 1,
        'ckpt.every': 2, 'ckpt.async_save': False, 'data.txt_split': 'paragraph',
        'optim.warmup_steps': 1, 'eval.robustness': '', 'sample.max_new_tokens': 4}


def _cfg(spec, *overs):
  cfg, _ = config_lib.load(spec)
  for over in overs:
    config_lib.override(cfg, over)
  return cfg


def text_source(d) -> str:
  """`data.source` of a small corpus written into directory `d`: TEXT 40 times, in parts (about
  10 % of them validation)."""
  corpus = d / 'corpus.txt'
  corpus.write_text(''.join(f'# part {i}\n' + TEXT for i in range(40)))
  return f'text:{corpus}'


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('xfam')
  source = text_source(d)
  out = {}
  for name, spec, extra in (('bytes', 'configs/byte_lm.py:tiny', {}),
                            ('bpe', 'configs/subword_lm.py:tiny', {'data.vocab_size': 300})):
    cfg = _cfg(spec, TINY, extra, {'data.source': source})
    trainer.train(cfg, str(d / name))
    out[name] = (spec, str(d / name), cfg)
  out['dir'] = d
  return out


def test_sample_byte_level(runs):
  spec, wd, cfg = runs['bpe']
  cfg = _cfg(spec, TINY, {'data.source': cfg.data.source, 'data.vocab_size': 300,
                          'sample.byte_level': True, 'sample.temperature': 0.0,
                          'sample.prompt': 'def fibon', 'sample.max_new_tokens': 6})
  texts = trainer.sample(cfg, wd)  # plain token-level, token healing, byte-level
  assert len(texts) == 3 and all(t.startswith('def fibon') for t in texts)
  assert all(len(t.encode()) <= len('def fibon') + 6 for t in texts)
  # a prompt that ends inside a character: byte-level and healing run, plain cannot
  model = trainer.restore(cfg, wd)
  view = model[0].family.byte_view(model[0].model(model[1]['params']))
  out = bl.sample_compare(view, 'Caf\u00e9'.encode()[:-1], 3)
  assert isinstance(out['byte-level'], bytes) and out['plain token-level'].startswith('n/a')
  # bad prompts: one clear ValueError each (launch.py prints it as one error line)
  with pytest.raises(ValueError, match='not valid UTF-8'):
    config_lib.override(cfg, {'sample.prompt': 'abc\udcff'})  # the byte 0xff from argv
    trainer.sample(cfg, wd)
  config_lib.override(cfg, {'sample.prompt': ''})
  with pytest.raises(ValueError, match='sample.prompt is empty'):
    trainer.sample(cfg, wd)
  # the byte LM: bytes are bytes, one byte-level completion
  spec, wd, bcfg = runs['bytes']
  bcfg = _cfg(spec, TINY, {'data.source': bcfg.data.source, 'sample.byte_level': True,
                           'sample.prompt': 'abc\udcff', 'sample.max_new_tokens': 3})
  texts = trainer.sample(bcfg, wd)
  assert len(texts) == 1 and texts[0].startswith('abc\\xff')


def test_family_without_byte_view():
  class NoText(families.Family):  # pylint: disable=abstract-method
    build_model = loss = train_iterator = eval_batches = flops_per_token = None
  fam = NoText(_cfg('configs/byte_lm.py:tiny'))
  with pytest.raises(ValueError, match='no byte-level view'):
    trainer.sample_bytes(fam, None, fam.cfg.sample)


def test_sentence_encoder_has_no_byte_view():
  """MiniLM (a BERT sentence encoder, WordPiece) gives no next-token probabilities: any mode
  that builds its family (sample, eval, ensemble and report members) says so in one error."""
  cfg = _cfg('configs/pretrained.py:minilm')
  with pytest.raises(ValueError, match='a sentence encoder .* only --mode=transfer takes it'):
    families.get(cfg)


def test_ensemble_math():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50, 257)) * 2
  dists = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  dists[0, :, 200:256] = -np.inf  # one member rules bytes out (a BPE model: invalid UTF-8)
  dists[0] -= np.logaddexp.reduce(dists[0], axis=-1, keepdims=True)
  targets = rng.integers(0, 200, 50)
  picked = dists[:, np.arange(50), targets]
  w = bl.fit_mixture_weights(picked)
  assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
  best = bl.mix_logprobs(picked, w).mean()
  for other in ([1, 0, 0], [0, 1, 0], [1 / 3] * 3, [0.5, 0.25, 0.25]):
    assert best >= bl.mix_logprobs(picked, other).mean() - 1e-9
  prod = bl.product_logprobs(dists, [1, 1, 0.5])
  np.testing.assert_allclose(np.exp(prod).sum(-1), 1.0, atol=1e-9)
  assert np.all(np.isinf(prod[:, 200:256]))
  alphas = bl.fit_product_alphas(dists, targets)
  nll = lambda a: -bl.product_logprobs(dists, a)[np.arange(50), targets].mean()
  assert nll(alphas) <= min(nll([1, 1, 1]), nll([1, 0.05, 0.05])) + 1e-6


def test_pieces_cut_at_lines_and_characters():
  text = ('x' * 150 + '\n' + '\u00e9' * 100).encode()
  parts = byte_views.cut(text, 200)
  assert b''.join(parts) == text and all(len(p) <= 200 for p in parts)
  assert parts[0].endswith(b'\n') and all(p.decode() for p in parts)  # whole characters
  items = byte_views.pieces([text, 'ab'], 200)
  assert [end for _, end in items] == [False] * (len(parts) - 1) + [True, True]
  fit, rest = byte_views.split_fit(items, 2)
  assert len(fit) + len(rest) == len(items)


def test_ensemble_and_report(runs, tmp_path):
  d = runs['dir']
  bad = d / 'bad.txt'
  bad.write_bytes(b'good text\nthen \xff bad\n')
  members = f'{runs["bytes"][1]},{runs["bpe"][1]}'
  cfg = _cfg('configs/cross_family.py', {
      'data.source': runs['bpe'][2].data.source, 'data.eval_split': 'train',  # more text
      'byte_eval.val_bytes': 300,
      'byte_eval.fit_bytes': 150, 'byte_eval.piece_bytes': 64,
      'byte_eval.text_file': str(d / 'corpus.txt'), 'byte_eval.text_bytes': 200,
      'ensemble.members': members})
  out = cross_family.ensemble(cfg, str(tmp_path / 'ens'))
  rows = {(r['model'], r['kind']): r for r in out['rows']}
  assert ('bytes', 'member') in rows and ('bpe', 'member') in rows
  mix = rows[('bytes+bpe', 'mixture')]
  assert sum(float(x) for x in mix['weights'].split(' / ')) == pytest.approx(1.0, abs=2e-3)
  assert mix['fit_bpb'] <= min(rows[('bytes', 'member')]['fit_bpb'],
                               rows[('bpe', 'member')]['fit_bpb']) + 1e-6
  assert all(math.isfinite(r['text_bpb']) for r in out['rows'])
  saved = json.load(open(tmp_path / 'ens' / 'ensemble.json'))
  assert 'beats_best_member' in saved['summary']['validation']
  assert 'the best member' in open(tmp_path / 'ens' / 'ensemble.md').read()
  # a text file the BPE member gives probability 0: one error naming the file and the member
  config_lib.override(cfg, {'byte_eval.text_file': str(bad)})
  with pytest.raises(ValueError, match=r"bad.txt: the piece at byte 0 .* 'bpe'.*not valid UTF-8"):
    cross_family.ensemble(cfg, str(tmp_path / 'ens_bad'))
  # the report over both runs (their parent directory stands for them, like a sweep's)
  config_lib.override(cfg, {'byte_eval.text_file': '', 'report.runs': runs['bytes'][1],
                            'report.gen_bytes': 4})
  rows = cross_family.report(cfg, str(tmp_path / 'rep'))
  assert rows[0]['run'] == 'bytes' and rows[0]['steps'] == 2 and rows[0]['params'] > 0
  assert rows[0]['val_bpb'] is not None and rows[0]['gen_bytes_per_s'] > 0
  assert rows[0]['val_bpb_byte_view'] > 0 and rows[0]['tokens_seen'] == 2 * 2 * 48
  for f in ('report.md', 'report.csv', 'report.json', 'report.png'):
    assert os.path.exists(tmp_path / 'rep' / f)


def test_bad_input_one_error_line(data_dir, tmp_path):
  p = run_launch(data_dir, '--config=configs/cross_family.py', f'--workdir={tmp_path}/e',
                 '--mode=ensemble', f'--config.ensemble.members={tmp_path}/missing_run',
                 check=False)
  assert p.returncode == 1 and p.stderr.startswith('error: ensemble.members names 1 model')
  p = run_launch(data_dir, '--config=configs/cross_family.py', f'--workdir={tmp_path}/e',
                 '--mode=ensemble', f'--config.ensemble.members={tmp_path}/a,{tmp_path}/b',
                 check=False)
  assert p.returncode == 1 and 'error: ensemble.members: no run directory' in p.stderr
  assert 'Traceback' not in p.stderr
  cfg = _cfg('configs/cross_family.py', {'ensemble.members': 'a,b', 'ensemble.kinds': 'geo'})
  with pytest.raises(config_lib.ConfigError, match=r"ensemble.kinds: unknown \['geo'\]"):
    cross_family.ensemble(cfg, str(tmp_path / 'k'))  # launch.py: exit 2
  assert not os.path.exists(tmp_path / 'k')


def test_held_out_sets_score_the_same_bytes_for_every_family(runs, tmp_path):
  """Evaluator type 'held_out': a byte LM and a BPE LM score a named file and the validation
  split on the same bytes with the same context in bytes, and each result says what it
  measured; bad entries are one ConfigError naming them."""
  from train.evals import held_out  # pylint: disable=import-outside-toplevel
  play = tmp_path / 'play.txt'
  play.write_text('ROMEO. But soft, what light through yonder window breaks?\n' * 12
                  + 'Caf\u00e9 na\u00efve\n')
  opts = {'type': 'held_out', 'every': 0, 'sets': f'play={play},val', 'context_bytes': 96,
          'max_bytes': 0}
  size = len(play.read_bytes())
  got = {}
  for name in ('bytes', 'bpe'):
    _, wd, cfg = runs[name]
    setup, state, _ = trainer.restore(cfg, wd)
    ev = held_out.Evaluator('held_out', cfg, opts)
    assert f'play {size} bytes' in ev.prepare(setup)
    got[name] = ev.run(setup, state['params'], wd, 2, {})
  a, b = got['bytes'], got['bpe']
  assert a['play']['n_bytes'] == b['play']['n_bytes'] == size
  for s in ('play', 'val'):
    for k in ('n_bytes', 'n_pieces', 'sha1', 'context_bytes', 'source'):
      assert a[s][k] == b[s][k], (s, k)
    assert 0 < a[s]['bpb'] < 20 and 0 < b[s]['bpb'] < 20 and a[s]['bpb'] != b[s]['bpb']
  assert a['play']['n_pieces'] >= size // 96 + 1  # the whole file, in pieces of <= 96 bytes
  assert a['val']['source'] == 'val' and a['play']['context_bytes'] == 96
  # the same numbers as scoring the pieces through the byte view by hand
  _, wd, cfg = runs['bytes']
  setup, state, _ = trainer.restore(cfg, wd)
  view = setup.family.byte_view(setup.model(state['params']))
  items = byte_views.pieces([play.read_bytes()], 96)
  assert a['play']['bpb'] == pytest.approx(byte_views.score(view, items).bpb(), rel=1e-6)
  # max_bytes spreads pieces over the set
  few = held_out.Evaluator('h', cfg, {**opts, 'sets': f'play={play}', 'max_bytes': 200})
  few.prepare(setup)
  assert sum(len(p) for p, _ in few.items['play']) <= 300
  for bad, match in (({'sets': 'play'}, "'play' has no file"),
                     ({'sets': f'a={play},a={play}'}, "'a' is named twice"),
                     ({'sets': 'x y=/f'}, 'NAME a plain word'),
                     ({'context_bytes': 4}, r'evals.held_out.context_bytes=4'),
                     ({'max_bytes': -1}, r'evals.held_out.max_bytes=-1')):
    with pytest.raises(config_lib.ConfigError, match=match):
      held_out.Evaluator('held_out', cfg, {**opts, **bad})
  with pytest.raises(config_lib.ConfigError, match='nope.txt does not exist'):
    held_out.Evaluator('held_out', cfg, {**opts, 'sets': f'p={tmp_path}/nope.txt'}).prepare(setup)
