"""Operations: distributed start-up from SLURM variables, generated sbatch / gcloud text, sweeps
as independent jobs gathered afterwards, and the continuous evaluator across restarts."""
import json
import os
import shlex
import signal
import socket
import subprocess
import time

import pytest

import launch
from conftest import start_launch, subprocess_env
from test_train import CONFIG, RESUME, SMALL, _wait_for_step, curve
from train import launching

SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's SLURM coordinator port: base + job id % 4096


def _free_slurm_job_id() -> int:
  for port in range(SLURM_PORT_BASE + 1000, 65535):
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
    return port - SLURM_PORT_BASE
  raise RuntimeError('no free port')


def test_detect_environment(monkeypatch):
  for k in list(os.environ):
    if k.startswith('SLURM_') or k.startswith('TPU_'):
      monkeypatch.delenv(k)
  assert launching.detect(None) == 'single'
  assert launching.detect('host:1234') == 'explicit'
  slurm = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node[001-004]', SLURM_NTASKS='1',
               SLURM_PROCID='0', SLURM_LOCALID='0')
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert launching.detect(None) == 'single'  # a one-task step stays off
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert launching.detect(None) == 'slurm'
  for k in slurm:
    monkeypatch.delenv(k)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0')
  assert launching.detect(None) == 'single'
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert launching.detect(None) == 'tpu'


def test_compile_cache_is_pruned_least_recently_used_first(tmp_path):
  """The compilation cache's bound: under it nothing goes; past it the least recently used
  entries go (access time, else write time) until 3/4 of the bound remains."""
  d = tmp_path / 'cache'
  d.mkdir()
  for i in range(8):  # entry i used at time 1000 + i (entry 5 read recently: 3000)
    f = d / f'k{i}-cache'
    f.write_bytes(b'x' * 100)
    os.utime(f, (3000 if i == 5 else 1000 + i, 1000 + i))
  assert launching.prune_compile_cache(str(d), 800) == 0 and len(os.listdir(d)) == 8
  assert launching.prune_compile_cache(str(d), 700) == 3  # 800 bytes -> at most 525
  assert sorted(os.listdir(d)) == ['k3-cache', 'k4-cache', 'k5-cache', 'k6-cache', 'k7-cache']
  assert launching.prune_compile_cache(str(d / 'absent'), 1) == 0


def test_a_compile_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch):
  f = tmp_path / 'not_a_dir'
  f.write_text('')
  monkeypatch.setenv(launching.COMPILE_CACHE_ENV, str(f))
  with pytest.raises(NotADirectoryError, match='NOTOKLM_COMPILE_CACHE=.*not a directory'):
    launching.enable_compile_cache()


def test_two_processes_from_slurm_variables(data_dir, tmp_path):
  wd = str(tmp_path / 'slurm')
  job = _free_slurm_job_id()
  args = [CONFIG, f'--workdir={wd}', '--config.train.steps=16', '--config.ckpt.every=8', *SMALL]
  procs = []
  for i in range(2):
    env = subprocess_env(data_dir, devices=2, SLURM_JOB_ID=str(job),
                         SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2', SLURM_PROCID=str(i),
                         SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES='1')
    procs.append(start_launch(data_dir, *args, env=env))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert 'jax.distributed (slurm): process 0 of 2' in outs[0]
  assert 'jax.distributed (slurm): process 1 of 2' in outs[1]
  assert 'devices 4' in outs[0] and 'bits per byte' in outs[0]
  assert 'bits per byte' not in outs[1]  # only process 0 reports
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit())
  assert steps == [8, 16]
  assert sorted(curve(wd)) == list(range(1, 17))


def test_launch_scripts(tmp_path, capsys):
  wd = str(tmp_path / 'big')
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=launch', '--launcher=slurm',
                      '--nodes=4', '--gpus_per_node=4', '--partition=gpu', '--time=2:00:00',
                      '--config.optim.lr=0.001', '--repo=/shared/notoklm']) == 0
  text = open(os.path.join(wd, 'launch', 'train.sbatch')).read()
  out = capsys.readouterr().out  # the preflight's summary (16 rows on 16 GPUs), then the script
  assert '# preflight: configs/byte_lm.py:tiny on 4 nodes x 4 GPUs: fits' in out, out
  assert out.split('# written to')[0].endswith(text)
  lines = text.splitlines()
  assert lines[0] == '#!/bin/bash'
  for want in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=4',
               '#SBATCH --partition=gpu', '#SBATCH --time=2:00:00', 'cd /shared/notoklm'):
    assert want in lines, (want, text)
  srun = shlex.split([l for l in lines if l.startswith('srun')][0])
  assert srun[:3] == ['srun', '--kill-on-bad-exit=1', launching.default_python()]
  assert srun[3:] == ['launch.py', CONFIG, f'--workdir={wd}', '--config.optim.lr=0.001']
  subprocess.run(['bash', '-n', os.path.join(wd, 'launch', 'train.sbatch')], check=True)

  # TPU: the commands a pod run is (ship, set up, start on every worker), printed with --dry;
  # the full submit / restart path runs against a stub gcloud in test_pod.py
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=launch', '--launcher=tpu',
                      '--tpu=pod-v5e-64', '--zone=us-west4-a', '--project=lab', '--allow_dirty',
                      '--dry', '--config.optim.lr=0.001']) == 0
  out = capsys.readouterr().out
  cmds = [shlex.split(l) for l in out.splitlines() if l.startswith('gcloud')]
  assert [c[4] for c in cmds] == ['scp', 'ssh', 'ssh'], out
  for c in cmds:
    assert c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and '--worker=all' in c
    assert '--zone=us-west4-a' in c and '--project=lab' in c
  start = [a for a in cmds[2] if a.startswith('--command=')][0]
  assert f'launch.py {CONFIG} --workdir={wd} --config.optim.lr=0.001' in start, start
  assert 'NOTOKLM_DISTRIBUTED=1' in start, start
  assert 'warning: the workdir is on each worker' in out, out
  subprocess.run(['bash', '-n', os.path.join(wd, 'launch', 'tpu.sh')], check=True)
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=launch', '--launcher=tpu']) == 2
  assert 'needs --tpu=NAME and --zone=ZONE' in capsys.readouterr().err


def test_sweep_as_jobs_and_gathered_summary(data_dir, tmp_path, capsys):
  wd = str(tmp_path / 'sweep')
  over = ['--config.train.steps=20', '--config.ckpt.every=100', '--config.eval.robustness=',
          *SMALL]
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=sweep', '--sweep_jobs=print', *over]) == 0
  cmds = [l for l in capsys.readouterr().out.splitlines() if l and not l.startswith('#')]
  assert len(cmds) == 2 and all('launch.py' in c for c in cmds)
  assert 'optim.lr=0.001' in cmds[0] and 'optim.lr=0.003' in cmds[1]
  assert cmds[0].count(' && ') == 1 and '--mode=eval' not in cmds[0]  # robustness off
  p = subprocess.run(['bash', '-c', cmds[0]], env=subprocess_env(data_dir), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=sweep_summary', *over]) == 0
  assert '1 of 2 points done' in capsys.readouterr().out
  md = open(os.path.join(wd, 'summary.md')).read()
  assert md.count('| done |') == 1 and md.count('| missing |') == 1, md
  # with the robustness suite on, each job also runs --mode=eval after training
  from train import config_lib, sweep
  cfg, module = config_lib.load(CONFIG.split('=', 1)[1])
  with_eval = sweep.job_commands(CONFIG.split('=', 1)[1], module.get_sweep(cfg), wd, {}, cfg=cfg)
  assert all(c.count(' && ') == 2 and '--mode=eval' in c.split(' && ')[2] for c in with_eval)
  # the same points as a SLURM job array over the command file
  assert launch.main([CONFIG, f'--workdir={wd}', '--mode=sweep', '--sweep_jobs=slurm', *over]) == 0
  text = open(os.path.join(wd, 'launch', 'sweep.sbatch')).read()
  assert '#SBATCH --array=0-1' in text and 'sweep_commands.txt' in text
  assert open(os.path.join(wd, 'launch', 'sweep_commands.txt')).read().splitlines() == cmds


def _evaluated(wd):
  path = os.path.join(wd, 'evaluator.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(l)['step'] for l in open(path) if l.strip()]


def test_evaluator_follows_training_across_restarts(data_dir, tmp_path):
  """Training and evaluator in separate processes; training is killed -9 and restarted, the
  evaluator too: every checkpoint is evaluated exactly once, and the evaluator exits after
  the final step."""
  wd = str(tmp_path / 'run')
  args = [*RESUME, f'--workdir={wd}', '--config.ckpt.keep=50']  # 60 steps, a checkpoint every 5
  ev_args = [*args, '--mode=evaluator', '--poll_seconds=0.2', '--max_idle_seconds=300']
  env = subprocess_env(data_dir)

  def start(a):
    return start_launch(data_dir, *a, env=env)

  train = start(args)
  evaluator = start(ev_args)
  _wait_for_step(wd, 12, train)
  train.send_signal(signal.SIGKILL)
  train.communicate(timeout=60)
  t0 = time.time()
  while not _evaluated(wd) and time.time() - t0 < 300:
    time.sleep(0.1)
  evaluator.send_signal(signal.SIGKILL)
  evaluator.communicate(timeout=60)
  assert _evaluated(wd), 'the evaluator evaluated nothing before it was killed'
  train = start(args)
  evaluator = start(ev_args)
  out_t = train.communicate(timeout=600)[0]
  assert train.returncode == 0, out_t[-3000:]
  out_e = evaluator.communicate(timeout=600)[0]
  assert evaluator.returncode == 0, out_e[-3000:]
  steps = _evaluated(wd)
  saved = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit())
  assert sorted(steps) == saved and len(steps) == len(set(steps)), (steps, saved)
  assert saved[-1] == 60 and 'evaluator] done' in out_e
  # the final evaluation equals the trainer's own end-of-run validation
  final = [json.loads(l) for l in open(os.path.join(wd, 'evaluator.jsonl'))][-1]
  summary = json.load(open(os.path.join(wd, 'train_summary.json')))
  assert final['step'] == 60 and final['bpb'] == pytest.approx(summary['eval']['bpb'], abs=1e-6)
