"""Standard benchmarks through lm-evaluation-harness (train/evals/lm_eval.py, --mode=lm_eval) on
the local tasks of tests/data/lm_eval/ (a 55-item multiple-choice task, a last-word cloze task,
a rolling-perplexity task and a short generation task; no hub).

Two tiny runs (a byte LM and a BPE LM, 2 steps, as tests/test_cross_family.py) are trained
in-process once; launch.py evaluates each on all four tasks, and bad input ends in one
`error:` line with exit status 1."""
import json
import os

import numpy as np
import pytest

from conftest import run_launch
from test_cross_family import TEXT, TINY, _cfg
from train import runs, trainer
from train.evals import lm_eval as le

TASKS = 'notoklm_mc,notoklm_cloze,notoklm_rolling,notoklm_gen'
INC = os.path.join(os.path.dirname(__file__), 'data', 'lm_eval')


@pytest.fixture(scope='module')
def tiny_runs(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval')
  corpus = d / 'corpus.txt'
  corpus.write_text(''.join(f'# part {i}\n' + TEXT for i in range(40)))
  out = {}
  for name, spec, extra in (('bytes', 'configs/byte_lm.py:tiny', {}),
                            ('bpe', 'configs/subword_lm.py:tiny', {'data.vocab_size': 300})):
    cfg = _cfg(spec, TINY, extra, {'data.source': f'text:{corpus}'})
    trainer.train(cfg, str(d / name))
    out[name] = (spec, str(d / name))
  return out


def _flags(spec, wd, *extra):
  return (f'--config={spec}', f'--workdir={wd}', '--mode=lm_eval',
          f'--config.lm_eval.tasks={TASKS}', f'--config.lm_eval.include_path={INC}',
          '--config.lm_eval.bootstrap_iters=0', *extra)


@pytest.mark.parametrize('name', ['bytes', 'bpe'])
def test_launch_every_local_task(tiny_runs, data_dir, name):
  spec, wd = tiny_runs[name]
  run_launch(data_dir, *_flags(spec, wd, '--config.lm_eval.limit=6'))
  rec = json.load(open(os.path.join(wd, 'lm_eval', 'step_2.json')))
  assert set(rec['results']) == set(TASKS.split(','))
  assert 0 <= rec['results']['notoklm_mc']['acc,none'] <= 1
  assert rec['results']['notoklm_rolling']['bits_per_byte,none'] > 0
  assert rec['versions']['lm-eval'] == '0.4.13' and rec['seed'] == 0
  assert rec['notoklm']['scoring'].startswith('byte-level' if name == 'bytes' else 'token')
  assert len(rec['notoklm']['compiled_shapes']) <= 4
  assert '| notoklm_mc |' in open(os.path.join(wd, 'lm_eval', 'step_2.md')).read()


def test_bytes_and_tokens_on_a_bpe_run(tiny_runs):
  """Token-level scoring follows lm-eval's HF conventions, batched (equal to one request at a
  time); byte-level scoring is the byte view's chain rule."""
  _, wd = tiny_runs['bpe']
  run = runs.load_run(wd)
  model = run.model()
  cfg = run.cfg.lm_eval
  lm = le.make_lm(run.family, model, cfg, window=int(run.cfg.data.seq_len))
  enc = lm.encoder
  pairs = [([enc.bos_id] + list(enc.encode('def fib')), list(enc.encode('onacci(n):'))),
           ([enc.bos_id] + list(enc.encode('The quick brown')), list(enc.encode(' fox'))),
           ([enc.bos_id], list(enc.encode('Caf\u00e9')))]
  batched = lm.scorer(pairs)
  one = [lm.scorer([p])[0] for p in pairs]
  np.testing.assert_allclose([b[0] for b in batched], [o[0] for o in one], rtol=1e-5, atol=1e-5)
  view = run.family.byte_view(model)
  lp, _ = le.byte_loglikelihood(view, b'def fib', b'onacci')
  full = view.score(b'def fibonacci', end=False)
  assert lp == pytest.approx(full[7:].sum(), abs=1e-6)


@pytest.mark.parametrize('extra,match', [
    (('--config.lm_eval.tasks=notoklm_mcq',), "unknown task 'notoklm_mcq'; the closest is "
                                              "'notoklm_mc'"),
    (('--config.lm_eval.limit=0',), 'lm_eval.limit=0.0: must be > 0'),
    (('--config.lm_eval.tasks=notoklm_absent',), "the data of task 'notoklm_absent' is not "
                                                 'available'),
])
def test_bad_input(tiny_runs, data_dir, extra, match):
  spec, wd = tiny_runs['bytes']
  p = run_launch(data_dir, *_flags(spec, wd, *extra), check=False)
  assert p.returncode == 1, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and match in errors[0], p.stderr[-2000:]


def test_bad_run(data_dir, tmp_path):
  for args, match in (
      (_flags('configs/byte_lm.py:tiny', str(tmp_path / 'none')), 'no run directory'),
      (_flags('configs/lcm.py:tiny', str(tmp_path / 'none'), '--config.lm_eval.tasks=notoklm_gen'),
       'notoklm_gen generate text, but the run in')):
    p = run_launch(data_dir, *args, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and match in errors[0], p.stderr[-2000:]
