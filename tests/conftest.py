"""Shared test setup: CPU only, the persistent compilation cache (the same one runs use), one
TFDS data dir per test session (the embedded corpus is prepared once, also when pytest-xdist
runs the files in several worker processes), and helpers to run launch.py in a subprocess."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
from gcs_emulator import SAFE_ENV  # pylint: disable=wrong-import-position

for _k, _v in SAFE_ENV.items():  # no Google client in any test probes a metadata server
  os.environ.setdefault(_k, _v)

from train import launching  # pylint: disable=wrong-import-position

launching.enable_compile_cache()  # in-process tests; launch.py subprocesses enable it themselves


@pytest.fixture(scope='module')
def gcs(monkeypatch_module):
  """A Cloud Storage emulator on 127.0.0.1 for this module (bucket 'test-bucket'); this process
  and its launch.py subprocesses reach it through the environment."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  gcs_emulator.quiet_logs()
  proc, url = gcs_emulator.start()
  for k, v in gcs_emulator.environment(url).items():
    monkeypatch_module.setenv(k, v)
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.filesystem('gs').clear_instance_cache()
  yield 'gs://test-bucket'
  gcs_emulator.stop(proc)


@pytest.fixture(scope='module')
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  d = os.environ.get('NOTOKLM_TEST_DATA_DIR')
  if not d:
    # xdist workers share one directory (preparation is file-locked in data/corpus.py)
    base = tmp_path_factory.getbasetemp()
    d = str((base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'tfds')
    os.makedirs(d, exist_ok=True)
  os.environ['NOTOKLM_DATA_DIR'] = d
  return d


def launch_cmd(*args):
  return [sys.executable, os.path.join(ROOT, 'launch.py'), *args]


def subprocess_env(data_dir, devices=1, **extra):
  env = dict(os.environ)
  env['NOTOKLM_DATA_DIR'] = data_dir
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(extra)
  return env


def run_launch(data_dir, *args, devices=1, timeout=600, check=True, **extra_env):
  p = subprocess.run(launch_cmd(*args), cwd=ROOT, env=subprocess_env(data_dir, devices, **extra_env),
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'launch {args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n'
                         f'{p.stderr[-5000:]}')
  return p


def pytest_configure(config):
  config.addinivalue_line('markers', 'device_suite: the device suite dry run, a subset '
                          '(alone: pytest -m device_suite tests)')
