"""The preflight (train/preflight.py): a job's batch, micro-batches, hosts and pod data checked
against its devices before any data or compile work -- at the start of training for the devices
present, and in `--mode=launch` for the slice the job is written for. No jit compilation: fake
devices come from `--xla_force_host_platform_device_count` in a subprocess, or the device count
is passed to the preflight directly."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_XLA_FLAGS
from train import config_lib, preflight

README = os.path.join(ROOT, 'README.md')


def _launch_commands(path=README):
  """The documented launch.py commands of `path` whose mode writes a job (launch, sweep jobs),
  as argument lists (tests/test_docs.py's parser)."""
  from test_docs import commands_in  # pylint: disable=import-outside-toplevel
  with open(path, encoding='utf-8') as f:
    cmds, _ = commands_in(f.read(), os.path.relpath(path, ROOT))
  # an elided command ("launch.py ... --submit": the one above it, plus flags) names no job
  return [c for c in cmds if 'an elided "..."' not in c.skipped and (
      '--mode=launch' in c.args or any(a.startswith('--sweep_jobs=') for a in c.args))]


def _parsed(args):
  """(flags, config with the command's overrides) of one launch.py command."""
  import launch  # pylint: disable=import-outside-toplevel
  flags, overrides = launch.parse(args)
  cfg, module = config_lib.load(os.path.join(ROOT, flags.config))
  config_lib.override(cfg, overrides)
  config_lib.validate(cfg)
  return flags, cfg, module, overrides


def _target(flags):
  if flags.launcher == 'tpu':
    return preflight.tpu_target(flags.accelerator_type)
  return preflight.slurm_target(flags.nodes, flags.gpus_per_node)


def _readme_pod_command():
  pods = [c for c in _launch_commands() if any(a.startswith('--accelerator_type=')
                                                for a in c.args)]
  assert len(pods) == 1, [c.at() for c in pods]
  return pods[0]


def test_accelerator_types_name_chips_and_hosts():
  t = preflight.tpu_target('v5litepod-256')
  assert (t.devices, t.processes, t.chip, t.platform) == (256, 64, 'v5e', 'tpu')
  assert (preflight.tpu_target('v4-32').devices, preflight.tpu_target('v4-32').processes) == (16, 4)
  assert preflight.tpu_target('v5p-128').devices == 64      # TensorCores / 2
  assert preflight.tpu_target('v6e-8').processes == 1       # a single-host slice
  assert preflight.tpu_target('v5litepod-16').processes == 4
  for bad in ('v4-3', 'v9-8', 'tpu-256', ''):
    with pytest.raises(preflight.PreflightError):
      preflight.tpu_target(bad)
  s = preflight.slurm_target(4, 8)
  assert (s.devices, s.processes) == (32, 4)


def test_readme_pod_command_passes_on_its_slice_and_the_old_preset_did_not():
  cmd = _readme_pod_command()
  assert '--dry' in cmd.args
  flags, cfg, _, _ = _parsed(cmd.args)
  target = _target(flags)
  assert (target.devices, target.chip) == (256, 'v5e')
  assert preflight.problems(cfg, target, repo=ROOT) == []
  job = preflight.plan(cfg, target, flops_per_token=1e9)
  assert (job.data, job.fsdp, job.rows_per_device) == (64, 4, 1)
  text = job.summary()
  for want in ('data 64 x fsdp 4', '256 per step = 1 per device', '4 per host',
               '2,097,152 per step', 'at 40% MFU', 'v5e: 197 TFLOP/s'):
    assert want in text, text
  # the same check on the numbers the preset had (64 rows, the README's flags): refused
  cfg.train.batch_size = 64
  found = preflight.problems(cfg, target, repo=ROOT)
  assert len(found) == 1 and 'train.batch_size=64 over 256 batch shards' in found[0], found
  assert '--config.train.batch_size=256' in found[0]
  with pytest.raises(preflight.PreflightError, match='cannot run on v5litepod-256'):
    preflight.plan(cfg, target)


def _run(argv, devices, cwd=ROOT, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}')
  return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_readme_pod_flags_on_256_fake_devices():
  """The preflight of the training start (the devices present) on 256 fake CPU devices, with
  the README's config and overrides: passes; the old preset's 64 rows: refused."""
  flags = [a for a in _readme_pod_command().args if a.startswith(('--config=', '--config.'))]
  code = (
      'import sys\n'
      'from train import config_lib, preflight\n'
      'import launch\n'
      f'args, over = launch.parse({flags!r} + ["--workdir=unused"])\n'
      'cfg, _ = config_lib.load(args.config)\n'
      'config_lib.override(cfg, over)\n'
      'job = preflight.check(cfg)\n'
      'print("ok", job.target.devices, job.data, job.fsdp, job.rows_per_device)\n'
      'cfg.train.batch_size = 64\n'
      'try:\n'
      '  preflight.check(cfg)\n'
      'except preflight.PreflightError as e:\n'
      '  print("refused:", e)\n')
  p = _run(['-c', code], 256)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'ok 256 64 4 1' in p.stdout, p.stdout
  assert 'refused:' in p.stdout and 'train.batch_size=64 over 256 batch shards' in p.stdout


def test_every_documented_job_passes_preflight():
  """Every launch / sweep-job command of README.md and docs/ fits the devices it names."""
  from train import sweep  # pylint: disable=import-outside-toplevel
  paths = [README] + [os.path.join(ROOT, 'docs', f) for f in sorted(os.listdir(
      os.path.join(ROOT, 'docs'))) if f.endswith('.md')]
  cmds = [c for p in paths for c in _launch_commands(p)]
  assert len(cmds) >= 3, [c.at() for c in cmds]
  for cmd in cmds:
    flags, cfg, module, overrides = _parsed(cmd.args)
    target = _target(flags)
    if flags.mode == 'sweep':
      cfgs = [sweep._point_config(cfg, p, overrides)  # pylint: disable=protected-access
              for p in module.get_sweep(cfg)]
    else:
      cfgs = [cfg]
    for c in cfgs:
      assert preflight.problems(c, target, repo=ROOT) == [], cmd.at()


def test_micro_batches_hosts_and_the_mesh():
  cfg, _ = config_lib.load(os.path.join(ROOT, 'configs/hat.py:1b'))
  pod = preflight.tpu_target('v5litepod-256')
  cfg.train.batch_size, cfg.train.grad_accum = 512, 4  # 128-row micro-batches on 256 chips
  (msg,) = preflight.problems(cfg, pod)
  assert 'train.grad_accum=4' in msg and 'micro-batches of 128 rows' in msg and '[1, 2]' in msg
  cfg.train.grad_accum = 2
  assert preflight.problems(cfg, pod) == []
  cfg.train.grad_accum = 1
  cfg.mesh.fsdp = 3
  (msg,) = preflight.problems(cfg, pod)
  assert 'mesh data=-1 x fsdp=3' in msg and '256 devices' in msg
  cfg.mesh.fsdp, cfg.train.batch_size = 1, 300
  (msg,) = preflight.problems(cfg, pod)
  assert '300 rows do not split evenly' in msg and '256 or 512' in msg
  # rows that split over the devices but not over the hosts (8 GPUs on 3 nodes: 24 devices)
  cfg.train.batch_size = 24
  assert preflight.problems(cfg, preflight.slurm_target(3, 8)) == []
  assert preflight.problems(cfg, preflight.Target(24, 5)) != []


def test_a_pod_reads_committed_files_or_the_embedded_corpus():
  cfg, _ = config_lib.load(os.path.join(ROOT, 'configs/hat.py:1b'))
  cfg.mesh.fsdp = 4
  pod = preflight.tpu_target('v5litepod-256')
  assert preflight.problems(cfg, pod, repo=ROOT) == []          # python_docs: built on each host
  cfg.data.source = 'text:/home/me/corpus.txt'
  (msg,) = preflight.problems(cfg, pod, repo=ROOT)
  assert "data.source names '/home/me/corpus.txt'" in msg and 'Commit the file' in msg
  assert 'python_docs' in msg
  cfg.data.source = 'text:README.md'                           # committed: shipped with the code
  assert preflight.problems(cfg, pod, repo=ROOT) == []
  assert preflight.problems(cfg, preflight.tpu_target('v5litepod-8'), repo=ROOT) == []
  cfg.data.source = 'text:/home/me/corpus.txt'                 # one host: its own disk
  assert preflight.problems(cfg, preflight.tpu_target('v5litepod-8'), repo=ROOT) == []
  # on the workers (training start, no repository to ship): their own files are what they read
  assert preflight.problems(cfg, pod) == []


def test_a_batch_smaller_than_the_devices_ends_in_one_message(tmp_path):
  """Batch 4 on 8 CPU devices: the preflight's message and exit 1 at the start of training,
  no traceback, nothing written."""
  wd = tmp_path / 'run'
  p = _run(['launch.py', '--config=configs/byte_lm.py:tiny', f'--workdir={wd}',
            '--config.train.batch_size=4'], 8)
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert 'train.batch_size=4 over 8 batch shards' in p.stderr
  assert '--config.train.batch_size=8' in p.stderr
  assert not wd.exists()


def test_launch_prints_the_summary_and_refuses_a_bad_batch(tmp_path):
  base = ['launch.py', '--config=configs/hat.py:1b', '--mode=launch', '--launcher=tpu',
          '--tpu=t', '--zone=z', '--spot', '--accelerator_type=v5litepod-256',
          '--runtime_version=v2-alpha-tpuv5-lite', '--config.mesh.fsdp=4', '--dry',
          '--allow_dirty']
  p = _run(base + [f'--workdir={tmp_path / "ok"}'], 1)
  assert p.returncode == 0, p.stderr[-3000:]
  for want in ('# preflight: configs/hat.py:1b on v5litepod-256: fits', 'data 64 x fsdp 4',
               '1 per device', 'FLOPs', 'at 40% MFU'):
    assert want in p.stdout, p.stdout
  assert 'queued-resources create' in p.stdout
  p = _run(base + [f'--workdir={tmp_path / "bad"}', '--config.train.batch_size=64'], 1)
  assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert 'train.batch_size=64 over 256 batch shards' in p.stderr
  assert 'queued-resources' not in p.stdout and not (tmp_path / 'bad').exists()
  # slurm: the devices are nodes x GPUs per node
  p = _run(['launch.py', '--config=configs/hat.py:1b', f'--workdir={tmp_path / "s"}',
            '--mode=launch', '--launcher=slurm', '--nodes=3', '--gpus_per_node=8'], 1)
  assert p.returncode == 1 and 'over 24 batch shards' in p.stderr, p.stderr[-3000:]


def test_multi_host_jobs_warn_of_data_on_the_workers_own_disks():
  from train import config_lib  # pylint: disable=import-outside-toplevel
  from train.modes import launch as launch_mode  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
  assert launch_mode._local_data(cfg) == []  # the embedded corpus (pylint: disable=protected-access)
  config_lib.override(cfg, {'data.source': 'shards:gs://b/c/*.parquet,/mnt/c/*.parquet',
                            'data.eval_source': 'gs://b/v/*.parquet'})
  notes = launch_mode._local_data(cfg)  # pylint: disable=protected-access
  assert len(notes) == 1 and 'data.source reads /mnt/c/*.parquet on each worker' in notes[0]
  assert 'gs://b' not in notes[0] and 'gcsfuse' in notes[0]
  config_lib.override(cfg, {'data.source': 'text:/home/me/corpus.txt', 'data.eval_source': ''})
  assert 'data.source reads /home/me/corpus.txt' in launch_mode._local_data(cfg)[0]  # pylint: disable=protected-access
  config_lib.override(cfg, {'data.source': 'tfds:c4/en', 'data.data_dir': '/data/tfds'})
  assert 'data.data_dir=/data/tfds' in launch_mode._local_data(cfg)[0]  # pylint: disable=protected-access
  assert 'gcsfuse' in launch_mode._local_data(cfg)[0]  # pylint: disable=protected-access
