"""Faults through launch.py: preemption of every family (kill -9 and SIGTERM, one during a
checkpoint write), a truncated newest checkpoint, injected NaN under both policies, a full
disk while checkpointing, a checkpoint of another config, a missing workdir."""
import json
import os
import resource
import signal
import subprocess
import time

import pytest

import fault_injection
from conftest import ROOT, launch_cmd, run_launch, start_launch, subprocess_env
from test_train import CONFIG, RESUME, SMALL, _wait_for_step, curve

FAMILIES = {
    'hat': ['--config=configs/hat.py:tiny', '--config.data.max_words=24'],
    'lexinv': ['--config=configs/lexinvariant.py:tiny'],
}


def _start(data_dir, *args):
  return start_launch(data_dir, *args)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_resumes_exactly_after_kill9_and_sigterm(data_dir, tmp_path, family):
  """kill -9 at a random step, resume, SIGTERM at a later random step, resume to the end: the
  loss curve equals an uninterrupted run's, bitwise."""
  args = [*FAMILIES[family], '--config.train.steps=60', '--config.ckpt.every=10', *SMALL]
  ref = str(tmp_path / 'ref')
  run_launch(data_dir, *args, f'--workdir={ref}')
  wd = str(tmp_path / 'run')
  rng = __import__('random').Random(family)
  for sig, at in ((signal.SIGKILL, rng.randint(12, 25)), (signal.SIGTERM, rng.randint(33, 45))):
    proc = _start(data_dir, *args, f'--workdir={wd}')
    _wait_for_step(wd, at, proc)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), out[-2000:]
    assert max(curve(wd)) < 60, 'the run finished before it was interrupted'
  p = run_launch(data_dir, *args, f'--workdir={wd}')
  assert 'resumed from step' in p.stdout
  a, b = curve(ref), curve(wd)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:5]


def test_kill9_during_checkpoint_write(data_dir, reference_run, tmp_path):
  """kill -9 the moment an unfinished checkpoint directory exists: the restart ignores it,
  resumes from the last complete one, and the curve equals an uninterrupted run's."""
  args = RESUME  # 60 steps, a checkpoint every 5
  ref = reference_run(*args)
  wd = str(tmp_path / 'run')
  ckpt = os.path.join(wd, 'checkpoints')
  proc = _start(data_dir, *args, f'--workdir={wd}')
  _wait_for_step(wd, 12, proc)
  seen = None
  t0 = time.time()
  while seen is None and proc.poll() is None and time.time() - t0 < 120:
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    partial = [n for n in names if 'tmp' in n]
    if partial:
      proc.kill()
      seen = partial
  out = proc.communicate(timeout=60)[0]
  assert seen, f'no checkpoint write was caught in progress: {out[-1500:]}'
  interrupted = int(seen[0].split('.')[0])
  p = run_launch(data_dir, *args, f'--workdir={wd}')
  resumed = int(p.stdout.split('resumed from step ')[1].split()[0])
  assert resumed < interrupted, (resumed, seen)
  a, b = curve(ref), curve(wd)
  assert sorted(b) == list(range(1, 61)) and all(a[s] == b[s] for s in a)


def test_truncated_checkpoint_falls_back_and_mismatch_is_named(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  args = [CONFIG, '--config.train.steps=20', '--config.ckpt.every=10', *SMALL]
  run_launch(data_dir, *args, f'--workdir={wd}')
  config_json = open(os.path.join(wd, 'config.json')).read()
  # resuming with another model shape is refused naming the key (the run's record); allowed
  # explicitly, the checkpoint still does not fit; config.json is left as it was either way
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--config.model.mlp_dim=256', check=False)
  assert p.returncode == 2 and 'model.mlp_dim (384 -> 256)' in p.stderr, p.stderr[-2000:]
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--config.model.mlp_dim=256',
                 '--config.train.steps=30', '--allow_config_change=model.mlp_dim', check=False)
  assert p.returncode == 1 and 'does not match the model' in p.stderr, p.stderr[-2000:]
  # a checkpoint of another model shape: named, not mistaken for corruption
  assert ('params/transformer/layers/0/mlp/down/kernel: checkpoint shape (384, 128) != model '
          'shape (256, 128)') in p.stderr, p.stderr[-2000:]
  assert open(os.path.join(wd, 'config.json')).read() == config_json
  # --mode=eval starts from the run's record: another model shape is refused, naming the key
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--mode=eval', '--config.model.mlp_dim=256',
                 check=False)
  assert p.returncode == 2 and '--config.model.mlp_dim=256' in p.stderr, p.stderr[-2000:]
  # truncate every file of the newest checkpoint: eval falls back to step 10 and says so
  newest = os.path.join(wd, 'checkpoints', '20')
  for root, _, files in os.walk(newest):
    for f in files:
      path = os.path.join(root, f)
      os.truncate(path, os.path.getsize(path) // 2)
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--mode=eval')
  assert 'checkpoint step 20' in p.stderr and 'unreadable' in p.stderr, p.stderr[-2000:]
  assert json.load(open(os.path.join(wd, 'eval_step10.json')))['step'] == 10
  # ... and the same training command resumes from step 10, moves the unreadable step aside
  # (kept for inspection) and writes step 20 again, so eval now reads step 20
  p = run_launch(data_dir, *args, f'--workdir={wd}')
  assert 'resumed from step 10' in p.stdout
  aside = os.listdir(os.path.join(wd, 'checkpoints_unreadable'))
  assert len(aside) == 1 and aside[0].startswith('20-'), aside
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--mode=eval')
  assert 'unreadable' not in p.stderr
  assert json.load(open(os.path.join(wd, 'eval_step20.json')))['step'] == 20
  # a workdir without checkpoints
  p = run_launch(data_dir, *args, f'--workdir={tmp_path / "nowhere"}', '--mode=eval', check=False)
  assert p.returncode == 1 and 'nowhere does not exist' in p.stderr, p.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'nowhere')  # a reader creates nothing


def test_injected_nan_skip_and_stop(data_dir, tmp_path):
  skip = str(tmp_path / 'skip')
  run_launch(data_dir, CONFIG, f'--workdir={skip}', '--config.train.steps=12', *SMALL,
             '--config.train.nan_policy=skip', **fault_injection.environment('5,7'))
  summary = json.load(open(os.path.join(skip, 'train_summary.json')))
  assert summary['nonfinite_steps'] == 2
  losses = curve(skip)
  assert losses[5] != losses[5] and losses[7] != losses[7]  # NaN recorded for those steps
  assert all(losses[s] == losses[s] for s in losses if s not in (5, 7))
  assert summary['eval']['bpb'] == summary['eval']['bpb']  # parameters stayed finite

  stop = str(tmp_path / 'stop')
  args = [CONFIG, f'--workdir={stop}', '--config.train.steps=20', '--config.ckpt.every=10', *SMALL]
  p = run_launch(data_dir, *args, check=False, **fault_injection.environment('15'))
  assert p.returncode == 1, p.stderr[-2000:]
  assert 'non-finite loss, gradient or update at step 15' in p.stderr and 'step 10' in p.stderr
  assert sorted(int(s) for s in os.listdir(os.path.join(stop, 'checkpoints')) if s.isdigit()) == [10]
  p = run_launch(data_dir, *args)  # without the fault: resumes from the kept checkpoint
  assert 'resumed from step 10' in p.stdout
  p = run_launch(data_dir, *args, '--config.train.nan_policy=halt', check=False)
  assert p.returncode == 2 and 'train.nan_policy' in p.stderr


def test_full_disk_while_checkpointing(data_dir, tmp_path):
  """Files may not grow past 200 kB (RLIMIT_FSIZE, as a full disk would refuse them): the save of
  step 20 fails, the run stops with a message, step 10 stays intact and resumes."""
  wd = str(tmp_path / 'run')
  args = [CONFIG, f'--workdir={wd}', '--config.ckpt.every=10', *SMALL]
  run_launch(data_dir, *args, '--config.train.steps=10')

  def limit_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  p = subprocess.run(launch_cmd(*args, '--config.train.steps=20'), cwd=ROOT,
                     env=subprocess_env(data_dir), capture_output=True, text=True, timeout=600,
                     preexec_fn=limit_files)
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'the last complete checkpoint, step 10, is intact' in p.stderr, p.stderr[-3000:]
  assert 'File too large' in p.stderr
  # the writer threads' tracebacks do not bury the message (--debug shows them)
  assert 'Traceback' not in p.stderr and len(p.stderr.splitlines()) < 20, p.stderr[-3000:]
  failed = curve(wd)
  p = run_launch(data_dir, *args, '--config.train.steps=20')
  assert 'resumed from step 10' in p.stdout
  assert curve(wd)[20] == failed[20]  # the same computation, now saved


def test_layer_layout_mismatch_names_scan_layers():
  """A checkpoint of the other layer layout (`model.scan_layers`) is named as such."""
  from train import checkpoint
  unrolled = {f'params/transformer/layers/{i}/attn/q': (8, 2, 4) for i in range(2)}
  scanned = {'params/transformer/layers/attn/q': (2, 8, 2, 4)}
  assert 'scan_layers=False' in checkpoint._layout_hint(unrolled, scanned)
  assert 'scan_layers=True' in checkpoint._layout_hint(scanned, unrolled)
  assert checkpoint._layout_hint(unrolled, unrolled) == ''
