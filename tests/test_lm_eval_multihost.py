"""--mode=lm_eval on two jax.distributed processes (train/evals/lm_eval.py): the token path's
rows are spread over a mesh that spans both processes (each scores its share, the scores are
gathered), generation runs on each process's share of the requests on its own copy of the
weights, and the results file is the one a single process writes.

One tiny BPE run (2 steps, trained in this process as tests/test_lm_eval.py does), evaluated
by launch.py once in this process and once by a pair of processes on CPU (one device each)."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, launch_cmd, subprocess_env
from test_cross_family import TEXT, TINY, _cfg
from test_lm_eval import INC, TASKS
from test_train import _free_port
from train import trainer


@pytest.fixture(scope='module')
def bpe_run(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval_mh')
  corpus = d / 'corpus.txt'
  corpus.write_text(''.join(f'# part {i}\n' + TEXT for i in range(40)))
  cfg = _cfg('configs/subword_lm.py:tiny', TINY, {'data.vocab_size': 300},
             {'data.source': f'text:{corpus}'})
  trainer.train(cfg, str(d / 'bpe'))
  return str(d / 'bpe')


def _flags(model, out):
  return ['--config=configs/subword_lm.py:tiny', f'--workdir={out}', '--mode=lm_eval',
          f'--config.lm_eval.model={model}', f'--config.lm_eval.tasks={TASKS}',
          f'--config.lm_eval.include_path={INC}', '--config.lm_eval.bootstrap_iters=0',
          '--config.lm_eval.limit=8']


def test_two_processes_write_the_results_of_one(bpe_run, data_dir, tmp_path):
  import launch  # pylint: disable=import-outside-toplevel
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  assert launch.main(_flags(bpe_run, one)) == 0
  port = _free_port()
  procs = [subprocess.Popen(
      launch_cmd(*_flags(bpe_run, two), f'--coordinator=localhost:{port}', '--num_processes=2',
                 f'--process_id={i}'), cwd=ROOT, env=subprocess_env(data_dir, devices=1),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert 'process 0 of 2' in outs[0] and 'process 1 of 2' in outs[1]
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
