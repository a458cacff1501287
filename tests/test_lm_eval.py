"""Standard benchmarks through lm-evaluation-harness (train/evals/lm_eval.py, --mode=lm_eval) on
the local tasks of tests/data/lm_eval/ (a 55-item multiple-choice task, a last-word cloze task,
a rolling-perplexity task and a short generation task; no hub).

Two tiny runs (a byte LM and a BPE LM, 2 steps, as tests/test_cross_family.py) are trained
in-process once; launch.py evaluates each on all four tasks (and HAT and lexinvariant runs,
in-process), bad input ends in one `error:` line with exit status 1, 8 CPU devices give the
results of 1, and byte-level scoring equals token-level up to the canonical correction. The
agreement with lm-eval's own `hf` backend is tests/test_lm_eval_reference.py."""
import json
import os

import numpy as np
import pytest

from conftest import run_launch
from test_cross_family import TINY, _cfg, text_source
from train import runs, trainer
from train.evals import lm_eval as le

TASKS = 'notoklm_mc,notoklm_cloze,notoklm_rolling,notoklm_gen'
INC = os.path.join(os.path.dirname(__file__), 'data', 'lm_eval')


@pytest.fixture(scope='module')
def tiny_runs(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval')
  source = text_source(d)
  out = {}
  for name, spec, extra in (('bytes', 'configs/byte_lm.py:tiny', {}),
                            ('bpe', 'configs/subword_lm.py:tiny', {'data.vocab_size': 300})):
    cfg = _cfg(spec, TINY, extra, {'data.source': source})
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
  # two programs' float32 sums of about -25 (one ulp there is 1.9e-6): 1e-6 was below float32's
  # resolution and failed by 1.15e-6 on one fresh clone
  assert lp == pytest.approx(full[7:].sum(), abs=1e-5)


def test_byte_level_batched_across_requests_equals_one_text_at_a_time(tiny_runs):
  """The byte views' `loglikelihoods` (requests batched into a few padded shapes: the byte LM's
  rows, the exact BPE view's packed lattice trees) give what each text's `distributions` give."""
  from models import byte_level  # pylint: disable=import-outside-toplevel
  pairs = [(b'def fib', b'onacci(n):'), (b'The quick brown', b' fox'), (b'', 'Caf\u00e9'.encode()),
           (b'    a, b = 0', b', 1\n    return a'), (b'x', b'')]
  for name in ('bytes', 'bpe'):
    run = runs.load_run(tiny_runs[name][1])
    view = run.family.byte_view(run.model())
    got = view.loglikelihoods(pairs)
    one = byte_level.ByteLM.loglikelihoods(view, pairs)
    np.testing.assert_allclose([g[0] for g in got], [o[0] for o in one], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [o[1] for o in one] and got[-1] == (0.0, True)


def test_byte_level_equals_token_level_up_to_the_canonical_correction(tiny_runs):
  """Where the context/continuation split falls on a token boundary, the exact byte-level score
  is the token-level one (lm-eval's HF conventions, the adapter's batched scorer) minus the
  canonical correction (log Z of the canonical next tokens at each continuation step,
  `le.canonical_log_z`) plus log C(ctx + cont) - log C(ctx), the mass of the other canonical
  sequences covering each prefix; C(ctx) = 1 when no token can cross the context's end, and the
  first term drops when the document ends after the continuation."""
  _, wd = tiny_runs['bpe']
  run = runs.load_run(wd)
  model = run.model()
  cfg = run.cfg.lm_eval.copy_and_resolve_references()
  cfg.max_length = 128  # no truncation: the view reads the whole text too
  lm = le.make_lm(run.family, model, cfg)
  enc, view = lm.encoder, run.family.byte_view(model)
  tb = view.c.token_bytes
  bos, eos = enc.bos_id, enc.eos_id

  def tok(ctx_ids, cont_ids):
    return lm.scorer([([bos] + ctx_ids, cont_ids)])[0][0]

  def log_c(x: bytes):  # log Q(starts with x) from the view - log Q(enc(x)) from the tokens
    ids, logz = le.canonical_log_z(view, x)
    return float(view.score(x, end=False).sum()) - (tok([], ids) - logz[:len(ids)].sum())

  # splits on token boundaries of this run's tokenizer (enc(ctx) = the encoding's first k
  # tokens): one after which no token can cross (C(ctx) = 1), one with the most that can
  text = ('def fibonacci(n):\n    a, b = 0, 1\n    return a\n\nThe quick brown fox jumps '
          'over the lazy dog.').encode()
  ids = [int(i) for i in enc.encode(text.decode())]
  splits = []
  for k in range(2, len(ids) - 1):
    ctx = b''.join(tb[i] for i in ids[:k])
    if ctx.decode(errors='ignore').encode() == ctx and [int(i) for i in enc.encode(
        ctx.decode())] == ids[:k]:
      splits.append((sum(1 for t in tb if t and ctx[-1] in t[:-1]), k, ctx))
  exact = next(s for s in splits if s[0] == 0)
  cover = max(splits)
  assert cover[0] > 0
  for crossing, k, cb in (exact, cover):
    ic = ids[:k]
    ends = [j for j in range(k + 1, min(k + 6, len(ids)) + 1)  # the continuation: whole tokens
            if [int(i) for i in enc.encode(b''.join(tb[i] for i in ids[:j]).decode(
                errors='replace'))] == ids[:j]]
    ik = ids[k:(ends or [len(ids)])[-1]]
    kb = b''.join(tb[i] for i in ik)
    got_ids, logz = le.canonical_log_z(view, cb + kb)
    assert got_ids == ic + ik  # the split falls on a token boundary
    n = len(ic)
    byte = le.byte_loglikelihood(view, cb, kb)[0]
    cc, cw = log_c(cb), log_c(cb + kb)
    assert cc > -1e-4 and cw > -1e-4
    assert byte == pytest.approx(tok(ic, ik) - logz[n:len(got_ids)].sum() + cw - cc, abs=2e-4)
    assert -logz[n:len(got_ids)].sum() > 0.5  # not vacuous: a 2-step model leaves canonical
    if crossing == 0:  # C(ctx) = 1: equal up to the canonical correction alone, at the end
      assert cc == pytest.approx(0.0, abs=1e-4)
      byte_end = byte + float(view.score(cb + kb, end=True)[-1])
      assert byte_end == pytest.approx(tok(ic, ik + [eos]) - logz[n:].sum(), abs=1e-4)
    else:
      assert cc > 1e-3  # other canonical sequences cover the context


def test_report_has_a_column_per_task_metric(tiny_runs, tmp_path):
  """--mode=report: a column per lm-eval task metric from each run's latest results
  (WORKDIR/lm_eval/step_N.json, as --mode=lm_eval writes them), blank for a run without any."""
  import shutil  # pylint: disable=import-outside-toplevel

  from train import config_lib, cross_family  # pylint: disable=import-outside-toplevel
  no_results = shutil.ignore_patterns('lm_eval')
  bpe = str(shutil.copytree(tiny_runs['bpe'][1], tmp_path / 'bpe', ignore=no_results))
  byt = str(shutil.copytree(tiny_runs['bytes'][1], tmp_path / 'bytes', ignore=no_results))
  cfg, _ = config_lib.load('configs/cross_family.py')
  for step, acc in ((1, 0.25), (2, 0.5)):  # the latest step counts
    res = {'results': {'notoklm_mc': {'alias': 'notoklm_mc', 'acc,none': acc,
                                      'acc_stderr,none': 0.1, 'acc_norm,none': acc / 2},
                       'notoklm_rolling': {'alias': 'notoklm_rolling',
                                           'bits_per_byte,none': 3.0 + step}},
           'notoklm': {'scoring': 'token-level'}}
    le.write(res, cfg.lm_eval, os.path.join(bpe, 'lm_eval'), step, {'model': bpe})
  config_lib.override(cfg, {'report.runs': f'{bpe},{byt}', 'report.byte_eval': False,
                            'report.gen_bytes': 2})
  rows = {r['run']: r for r in cross_family.report(cfg, str(tmp_path / 'report'))}
  assert rows['bpe']['lm_eval_step'] == 2 and rows['bpe']['notoklm_mc/acc'] == 0.5
  assert rows['bpe']['notoklm_mc/acc_norm'] == 0.25
  assert rows['bpe']['notoklm_rolling/bits_per_byte'] == 5.0
  assert 'notoklm_mc/acc_stderr' not in rows['bpe']
  assert rows['bytes']['notoklm_mc/acc'] is None and rows['bytes']['lm_eval_step'] is None
  md = open(tmp_path / 'report' / 'report.md').read().splitlines()
  header = [c.strip() for c in md[0].strip('|').split('|')]
  cells = {line.split('|')[1].strip(): [c.strip() for c in line.strip('|').split('|')]
           for line in md[2:4]}
  k = header.index('notoklm_mc/acc')
  assert cells['bpe'][k] == '0.5' and cells['bytes'][k] == ''


# HAT and lexinvariant tiny runs (2 steps), evaluated by launch.py in this process (the task
# registry is indexed once per process)
SMALL = {'train.steps': 2, 'train.batch_size': 2, 'train.eval_batches': 1, 'ckpt.every': 2,
         'ckpt.async_save': False, 'optim.warmup_steps': 1, 'eval.robustness': '',
         'sample.max_new_tokens': 4, 'model.num_layers': 1}
MORE = {'hat': ('configs/hat.py:tiny', {'data.seq_len': 128, 'data.max_words': 32,
                                        'model.enc_layers': 1, 'model.dec_layers': 1}),
        'lexinv': ('configs/lexinvariant.py:tiny',
                         {'data.seq_len': 64, 'lexinv.eval_batches': 1, 'lexinv.probe_rows': 8,
                          'lexinv.probe_steps': 2, 'lexinv.synthetic_n': 8})}


@pytest.fixture(scope='module')
def more_runs(tiny_runs, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval_more')
  source = text_source(d)
  out = {}
  for name, (spec, extra) in MORE.items():
    trainer.train(_cfg(spec, SMALL, extra, {'data.source': source}), str(d / name))
    out[name] = (spec, str(d / name))
  return out


@pytest.mark.parametrize('name', list(MORE))
def test_launch_hat_and_lexinvariant(more_runs, name):
  """launch.py --mode=lm_eval (in this process) on a HAT and a lexinvariant run: every local
  task, scored through the family's byte view."""
  import launch  # pylint: disable=import-outside-toplevel
  spec, wd = more_runs[name]
  assert launch.main([*_flags(spec, wd, '--config.lm_eval.limit=3')]) == 0
  rec = json.load(open(os.path.join(wd, 'lm_eval', 'step_2.json')))
  assert rec['family'] == name and set(rec['results']) == set(TASKS.split(','))
  assert rec['notoklm']['scoring'].startswith('byte-level')
  assert 0 <= rec['results']['notoklm_mc']['acc,none'] <= 1
  assert rec['results']['notoklm_rolling']['bits_per_byte,none'] > 0
  assert 0 <= rec['results']['notoklm_gen']['exact_match,none'] <= 1


def test_eight_devices_give_the_same_results(tiny_runs, data_dir, tmp_path):
  """The BPE run's token-level scores, batched over a mesh of 8 CPU devices (a subprocess),
  equal those on the 1 device of this process."""
  import launch  # pylint: disable=import-outside-toplevel
  spec, wd = tiny_runs['bpe']
  tasks = '--config.lm_eval.tasks=notoklm_mc,notoklm_cloze,notoklm_rolling'
  got = {}
  for devices in (1, 8):
    out = str(tmp_path / f'd{devices}')
    args = _flags(spec, out, f'--config.lm_eval.model={wd}', '--config.lm_eval.limit=16', tasks)
    if devices == 1:
      assert launch.main(list(args)) == 0
    else:
      run_launch(data_dir, *args, devices=8)
    got[devices] = json.load(open(os.path.join(out, 'lm_eval', 'step_2.json')))
  assert got[1]['results'].keys() == got[8]['results'].keys()
  for task, r in got[1]['results'].items():
    for k, v in r.items():
      if isinstance(v, float):
        assert got[8]['results'][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
  assert got[1]['notoklm']['requests'] == got[8]['notoklm']['requests']


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
