"""--mode=lm_eval on two jax.distributed processes (train/evals/lm_eval.py): the token path's
rows are spread over a mesh that spans both processes (each scores its share, the scores are
gathered), the byte path and generation run on each process's share of the requests on its own
copy of the weights, and the results file is the one a single process writes, token-level and
byte-level (per request too). A process that fails on its requests ends every process with one
error naming it, rather than leaving the others waiting in a collective.

One tiny BPE run (2 steps, trained in this process as tests/test_lm_eval.py does), evaluated
by launch.py in this process and by pairs of processes on CPU (one device each): token-level,
byte-level, and with process 1 made to fail (tests/lm_eval_faults.py); and the failure exchange
itself in a pair of bare jax.distributed processes."""
import json
import os
import subprocess
import sys

import pytest

import lm_eval_faults
from conftest import ROOT, launch_cmd, start_launch, subprocess_env
from test_cross_family import TINY, _cfg, text_source
from test_lm_eval import INC, TASKS
from test_train import _free_port
from train import trainer


@pytest.fixture(scope='module')
def bpe_run(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval_mh')
  source = text_source(d)
  cfg = _cfg('configs/subword_lm.py:tiny', TINY, {'data.vocab_size': 300},
             {'data.source': source})
  trainer.train(cfg, str(d / 'bpe'))
  return str(d / 'bpe')


def _flags(model, out, *extra):
  return ['--config=configs/subword_lm.py:tiny', f'--workdir={out}', '--mode=lm_eval',
          f'--config.lm_eval.model={model}', f'--config.lm_eval.tasks={TASKS}',
          f'--config.lm_eval.include_path={INC}', '--config.lm_eval.bootstrap_iters=0',
          '--config.lm_eval.limit=8', *extra]


def _pair(cmd, data_dir, timeout=600, **env) -> tuple[list[int], list[str]]:
  """(exit statuses, outputs) of `cmd(i)` run as processes 0 and 1 of 2 (one CPU device each);
  a pair still running after `timeout` seconds is killed and the test fails."""
  port = _free_port()

  def start(argv):  # launch.py through the tests' launch server, anything else as it is
    if argv[:2] == launch_cmd():
      return start_launch(data_dir, *argv[2:], devices=1, **env)
    return subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(data_dir, devices=1, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  procs = [start(cmd(i, port)) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
    pytest.fail(f'the pair still ran after {timeout} s (a hang):\n' +
                '\n'.join(f'-- process {i}:\n{o[-3000:]}' for i, o in enumerate(outs)))
  return [p.returncode for p in procs], outs


def _launch_pair(flags, data_dir, timeout=600, **env):
  return _pair(lambda i, port: launch_cmd(*flags, f'--coordinator=localhost:{port}',
                                          '--num_processes=2', f'--process_id={i}'),
               data_dir, timeout, **env)


def _same_results(one: str, two: str) -> list[dict]:
  got = [json.load(open(os.path.join(wd, 'lm_eval', 'step_2.json'))) for wd in (one, two)]
  assert set(got[0]['results']) == set(got[1]['results']) == set(TASKS.split(','))
  for task, r in got[0]['results'].items():
    for k, v in r.items():
      if isinstance(v, float):
        assert got[1]['results'][task][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
      else:
        assert got[1]['results'][task][k] == v, (task, k)
  assert got[0]['n-samples'] == got[1]['n-samples']
  assert got[0]['notoklm']['requests'] == got[1]['notoklm']['requests']
  assert got[0]['notoklm']['scoring'] == got[1]['notoklm']['scoring']
  return got


def test_two_processes_write_the_results_of_one(bpe_run, data_dir, tmp_path):
  import launch  # pylint: disable=import-outside-toplevel
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  assert launch.main(_flags(bpe_run, one)) == 0
  codes, outs = _launch_pair(_flags(bpe_run, two), data_dir)
  for code, out in zip(codes, outs):
    assert code == 0, out[-4000:]
  assert 'process 0 of 2' in outs[0] and 'process 1 of 2' in outs[1]
  got = _same_results(one, two)
  assert got[0]['notoklm']['scoring'].startswith('token-level')


def test_two_processes_score_bytes_as_one(bpe_run, data_dir, tmp_path, monkeypatch):
  """scoring='bytes' (the exact byte view; rolling documents and generation over bytes): the
  same results file, and every request's score (each process's scores recorded by
  tests/lm_eval_faults.py:record) within float rounding of the single process's."""
  import launch  # pylint: disable=import-outside-toplevel
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  rec = {n: tmp_path / f'record_{n}' for n in ('one', 'two')}
  for d in rec.values():
    d.mkdir()
  flags = ('--config.lm_eval.scoring=bytes',)
  with monkeypatch.context() as m:
    for k, v in lm_eval_faults.record_environment(str(rec['one'])).items():
      m.setenv(k, v)
    assert launch.main(_flags(bpe_run, one, *flags)) == 0
  codes, outs = _launch_pair(_flags(bpe_run, two, *flags), data_dir,
                             **lm_eval_faults.record_environment(str(rec['two'])))
  for code, out in zip(codes, outs):
    assert code == 0, out[-4000:]
  got = _same_results(one, two)
  assert got[0]['notoklm']['scoring'].startswith('byte-level')
  assert sorted(os.listdir(rec['two'])) == ['process_0.jsonl', 'process_1.jsonl']
  a, b = lm_eval_faults.recorded(str(rec['one'])), lm_eval_faults.recorded(str(rec['two']))
  assert a.keys() == b.keys()
  whats = {w for w, _ in a}
  assert {'byte-level loglikelihood requests', 'byte-level rolling documents',
          'generate_until requests'} <= whats, whats
  for key, x in a.items():
    y = b[key]
    if key[0] == 'generate_until requests':
      assert x == y, key
    elif key[0] == 'byte-level loglikelihood requests':  # [log p, is_greedy]
      assert y[0] == pytest.approx(x[0], rel=1e-5, abs=1e-4) and y[1] == x[1], key
    else:
      assert y == pytest.approx(x, rel=1e-5, abs=1e-4), key


def test_a_failing_process_ends_both_with_one_error(bpe_run, data_dir, tmp_path):
  """Process 1 fails on its generation requests (after the token path's loglikelihood rows,
  gathered across both): both processes exit non-zero at once with the same message, naming
  process 1 and what it failed on."""
  flags = _flags(bpe_run, str(tmp_path / 'fail'), '--config.lm_eval.tasks=notoklm_mc,notoklm_gen',
                 '--config.lm_eval.limit=2')
  codes, outs = _launch_pair(flags, data_dir, timeout=300,
                             **lm_eval_faults.fail_environment(1, 'generate_until'))
  want = ('process 1 of 2 failed on its share of generate_until requests (1 of 2): RuntimeError: '
          'injected fault: process 1 fails on its 1 generate_until requests')
  for i, (code, out) in enumerate(zip(codes, outs)):
    assert code != 0 and want in out, (i, out[-4000:])
  assert 'process 0 stops too' in outs[0]
  assert not os.path.exists(tmp_path / 'fail' / 'lm_eval' / 'step_2.json')


FAILURES = r'''
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from train.evals import lm_eval as le
rank = jax.process_index()


def failing_on(process):
  def score(items):
    if rank == process:
      raise ValueError(f'cannot score {items[0]!r}')
    return [x * 2 for x in items]
  return score


for what, run in (
    ('generate_until requests', lambda w: le.share(list(range(5)), failing_on(1), w)),
    ('byte-level rolling windows', lambda w: le.share(list(range(5)), failing_on(0), w)),
    ('token-level rows', lambda w: le.agreed(list(range(5)), failing_on(1), w))):
  try:
    run(what)
    print(f'{what}: no error')
  except le.ProcessFailure as e:
    print(f'{what}: ProcessFailure: {e}')
print('then', le.share(list(range(5)), lambda xs: [x + 1 for x in xs]),
      le.agreed([1, 2], lambda xs: [x + 1 for x in xs], 'token-level rows'))
'''


def test_the_failure_exchange(data_dir):
  """Without launch.py: `share` (the byte path, rolling windows, generation) and `agreed` (the
  token path's rows) on two jax.distributed processes, one of them failing: every process
  raises the same ProcessFailure, and both go on in step afterwards."""
  codes, outs = _pair(lambda i, port: [sys.executable, '-c', FAILURES, f'localhost:{port}',
                                       str(i)], data_dir, timeout=300)
  for code, out in zip(codes, outs):
    assert code == 0, out[-4000:]
  for i, out in enumerate(outs):
    lines = [x for x in out.splitlines() if ': ' in x and not x.startswith(('WARNING', '['))]
    assert ('generate_until requests: ProcessFailure: lm_eval: process 1 of 2 failed on its '
            'share of generate_until requests (2 of 5): ValueError: cannot score 1') in out, out
    assert ('byte-level rolling windows: ProcessFailure: lm_eval: process 0 of 2 failed on its '
            'share of byte-level rolling windows (3 of 5): ValueError: cannot score 0') in out
    assert ('token-level rows: ProcessFailure: lm_eval: process 1 of 2 failed on token-level '
            'rows (5): ValueError: cannot score 0') in out
    assert 'then [1, 2, 3, 4, 5] [2, 3]' in out
    assert not any('no error' in x for x in lines), out
