"""The 1b presets' train step lowered for a 256-chip TPU pod (data 64 x fsdp 4) from this CPU
host, through benchmarks/pod_lowering.py in a subprocess (the fake device count is fixed when
JAX starts): parameter and optimizer shardings as train/partitioning.py's rules say
(per-device bytes = total / fsdp), the splash kernel (tpu_custom_call) inside a shard_map in the
TPU module, and -- for the subword preset, compiled for the CPU mesh -- the FSDP collectives."""
import os
import subprocess
import sys

from conftest import ROOT


def test_pod_lowering_1b_presets():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=256 '
                       '--xla_backend_optimization_level=0')
  p = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'pod_lowering.py'),
       '--configs=configs/subword_lm.py:1b,configs/hat.py:1b',
       '--compile_configs=configs/subword_lm.py:1b', '--cpu_attention=xla'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(p.stdout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert 'FAILED' not in p.stdout
  for spec in ('configs/subword_lm.py:1b', 'configs/hat.py:1b'):
    assert f'| {spec} |' in p.stdout   # a row of the per-device memory table
  assert 'all-gather' in p.stdout
