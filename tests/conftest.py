"""Shared test setup: CPU only, the persistent compilation cache (the same one runs use), one
TFDS data dir per test session (the embedded corpus is prepared once, also when pytest-xdist
runs the files in several worker processes), and helpers to run launch.py in a subprocess."""
import atexit
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import weakref

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# XLA's CPU backend without LLVM optimizations: compiling, not running, dominates the tests' time
# (tiny shapes); the programs compute the same values, about half the compile time (measured on
# a launch.py run: 7.5 s -> 3.9 s of CPU compiling). In-process (before JAX starts its backend)
# and in every launch.py subprocess (subprocess_env).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
# A test marked `xla_optimized` runs in a child pytest with XLA's CPU optimisation as in real
# runs (`pytest_runtest_call` below): for the few in-process tests whose running of SmolLM2
# outweighs their compiling (the lm-eval reference test: 99 s -> 69 s alone).
OPTIMIZED_CHILD = 'NOTOKLM_TEST_OPTIMIZED_CHILD'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', '') and not os.environ.get(OPTIMIZED_CHILD):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
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


def subprocess_env(data_dir, devices=1, optimize=False, **extra):
  """The environment of a launch.py subprocess. `optimize`: XLA's CPU backend optimises as in
  real runs (for the runs of SmolLM2-135M, whose execution outweighs compiling: a transfer
  test took 79 s with TEST_XLA_FLAGS against 62 s without, both with compiling)."""
  env = dict(os.environ)
  env['NOTOKLM_DATA_DIR'] = data_dir
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices}'
                      + ('' if optimize else f' {TEST_XLA_FLAGS}'))
  env.update(extra)
  return env


class _LaunchServer:
  """This process's client of tests/launch_server.py, a fork server that has imported what
  launch.py imports (~1.5 s of CPU saved per run): started at the first run, ended with this
  process. $NOTOKLM_TEST_LAUNCH_SERVER=0 runs every launch.py as a plain subprocess."""
  _proc = None
  _path = None
  _env = None
  _SAME = ('JAX_', 'PYTHON')  # read at import time: a run that sets them otherwise falls back

  @classmethod
  def connect(cls, env):
    """A socket to the server, or None where it cannot serve a run with this environment."""
    if os.environ.get('NOTOKLM_TEST_LAUNCH_SERVER', '1') == '0':
      return None
    if cls._proc is None:
      d = tempfile.mkdtemp(prefix='launch_server')
      atexit.register(shutil.rmtree, d, True)
      cls._path = os.path.join(d, 'socket')
      cls._env = subprocess_env(os.environ.get('NOTOKLM_DATA_DIR', ''))
      cls._proc = subprocess.Popen(
          [sys.executable, os.path.join(ROOT, 'tests', 'launch_server.py'), cls._path],
          cwd=ROOT, env=cls._env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
      atexit.register(cls._proc.kill)
      ready = cls._proc.stdout.readline().strip()
      if ready != 'ready threads=1 backends=0':  # forks only from one thread, no jax backend
        cls._proc.kill()
        raise RuntimeError(f'tests/launch_server.py did not start cleanly: {ready!r} '
                           f'(exit {cls._proc.wait()})')
    if cls._proc.poll() is not None:
      return None
    keys = {k for k in (*env, *cls._env) if k.startswith(cls._SAME)}
    if any(env.get(k) != cls._env.get(k) for k in keys):
      return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cls._path)
    return s


class _Output:
  """`proc.stdout` of a LaunchProc: what the run wrote so far (`.read()`)."""

  def __init__(self, path):
    self._path = path

  def read(self):
    with open(self._path, encoding='utf-8', errors='replace') as f:
      return f.read()


class LaunchProc:
  """`subprocess.Popen(launch_cmd(*args), cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE or
  STDOUT, text=True)` as far as the tests use it (pid, poll, wait, send_signal, kill,
  terminate, communicate, returncode, stdout.read), served by the launch server's fork."""

  def __init__(self, sock, args, env, merge_stderr, output=None):
    self.args = launch_cmd(*args)
    self.returncode = None
    self._dir = None if output else tempfile.mkdtemp(prefix='launch_run')
    if self._dir:  # the output stays readable while the object lives
      weakref.finalize(self, shutil.rmtree, self._dir, True)
    out = str(output or os.path.join(self._dir, 'stdout'))
    err = out if merge_stderr else os.path.join(self._dir, 'stderr')
    self._paths = (out, None if merge_stderr else err)
    self._sock = sock
    try:
      sock.sendall((json.dumps({'argv': [str(a) for a in args], 'env': env, 'cwd': ROOT,
                                'stdout': out, 'stderr': err}) + '\n').encode())
      self._reply = sock.makefile('r')
      self.pid = json.loads(self._reply.readline())['pid']
    except BaseException:
      sock.close()
      raise
    self.stdout = _Output(out)

  def poll(self):
    if self.returncode is None and select.select([self._sock], [], [], 0)[0]:
      self._finish()
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      if not select.select([self._sock], [], [], timeout)[0]:
        raise subprocess.TimeoutExpired(self.args, timeout)
      self._finish()
    return self.returncode

  def _finish(self):
    line = self._reply.readline()
    self.returncode = json.loads(line)['returncode'] if line else -signal.SIGKILL
    self._sock.close()

  def send_signal(self, sig):
    if self.returncode is None:
      os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def communicate(self, timeout=None):
    self.wait(timeout)
    out = self.stdout.read()
    err = None if self._paths[1] is None else _Output(self._paths[1]).read()
    return out, err


def start_launch(data_dir, *args, devices=1, merge_stderr=True, env=None, optimize=False,
                 output=None, **extra_env):
  """launch.py ARGS started in the background: a LaunchProc from the launch server, or (where
  it cannot serve this environment) a subprocess.Popen with the same interface. `env`: the
  whole environment (else subprocess_env(data_dir, devices, optimize, **extra_env)).
  `output`: a file path that gets stdout and stderr (instead of `proc.stdout`)."""
  env = env if env is not None else subprocess_env(data_dir, devices, optimize, **extra_env)
  sock = _LaunchServer.connect(env)
  if sock is not None:
    return LaunchProc(sock, args, env, merge_stderr or output is not None, output)
  if output is not None:
    with open(output, 'w') as f:
      return subprocess.Popen(launch_cmd(*args), cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, text=True)
  return subprocess.Popen(launch_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                          text=True)


def run_launch(data_dir, *args, devices=1, timeout=600, check=True, optimize=False,
               **extra_env):
  proc = start_launch(data_dir, *args, devices=devices, merge_stderr=False, optimize=optimize,
                      **extra_env)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()  # as subprocess.run does on its timeout
    proc.communicate()
    raise
  p = subprocess.CompletedProcess(launch_cmd(*args), proc.returncode, out, err)
  if check and p.returncode != 0:
    raise AssertionError(f'launch {args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n'
                         f'{p.stderr[-5000:]}')
  return p


def _shared_tmp(tmp_path_factory, name):
  """A directory all xdist workers of this session share (beside their own base temp dirs)."""
  base = tmp_path_factory.getbasetemp()
  d = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / name
  os.makedirs(d, exist_ok=True)
  return d


@pytest.fixture(scope='session')
def reference_run(data_dir, tmp_path_factory):
  """`reference_run(*launch_args)` -> the workdir of an uninterrupted launch.py run with these
  arguments, made once per test session: the tests that compare an interrupted run against the
  same uninterrupted one share it (file-locked, so xdist workers share it too). Treat it as
  read-only."""
  root = _shared_tmp(tmp_path_factory, 'reference_runs')

  def run(*args, devices=1):
    key = hashlib.sha1(repr((args, devices)).encode()).hexdigest()[:16]
    wd = root / key
    with open(root / f'{key}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        if not (wd / 'train_summary.json').exists():
          shutil.rmtree(wd, ignore_errors=True)  # a run that failed part-way
          run_launch(data_dir, *args, f'--workdir={wd}', devices=devices)
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
    return str(wd)

  return run


# Scheduling for the suite command `pytest -n 2 --dist loadgroup tests` (the units below replace
# xdist_group marks; see pytest_xdist_make_scheduler). Most of the time goes to
# a few tests that run launch.py in subprocesses; with whole files per worker (--dist loadfile)
# the heaviest files decided the wall time. Here each test of the files in PER_TEST is its own
# unit of work (their module fixtures are cheap), every other file stays one unit (its tests
# share module fixtures and in-process compilations), and the units go out heaviest first, so
# light ones fill in at the end. COST: rough seconds per unit (a file, or one test of a PER_TEST
# file, each of its parameters alike), cold on 2 cores, from `--durations=0` (refresh it when
# files grow); a guide for the order only, a unit not listed counts 1 s.
PER_TEST = {'test_faults.py', 'test_ops.py', 'test_pod.py', 'test_reliability.py',
            'test_train.py'}
COST = {  # refreshed from `--durations=0` of a cold run on 2 cores (with other load), 2026-12-07
    'test_pretrained.py': 240, 'test_lexinvariant.py': 200, 'test_lm_eval.py': 150,
    'test_lm_eval_reference.py': 120, 'test_hat.py': 130, 'test_zett.py': 113,
    'test_lcm.py': 100, 'test_entropy_patches.py': 54, 'test_hat_from_pretrained.py': 51,
    'test_learned_chunking.py': 48, 'test_layers.py': 30, 'test_shards.py': 33,
    'test_records.py': 32, 'test_device_suite.py': 32, 'test_omp.py': 31, 'test_token_lm.py': 31,
    'test_cross_family.py': 30, 'test_sweeps.py': 26, 'test_words.py': 24,
    'test_byte_level.py': 18, 'test_mistakes.py': 18, 'test_hypernet.py': 17,
    'test_pod_lowering.py': 14, 'test_data.py': 14, 'test_attention.py': 13,
    'test_causal_dynamic.py': 12, 'test_preflight.py': 11, 'test_layering.py': 3,
    'test_modes.py': 2, 'test_docs.py': 1, 'test_lm_eval_multihost.py': 60,
    'test_fast_views.py': 16, 'test_host_workers.py': 12, 'test_launch_server.py': 12,
    'test_pod.py::test_two_processes_on_bucket_shards_resume_bitwise_and_a_third_evaluates': 79,
    'test_pod.py::test_sweep_on_bucket_data_into_a_bucket': 25,
    'test_pod.py::test_local_restart_loop_resumes_after_kill': 16,
    'test_pod.py::test_restart_loop_stops_on_a_user_error': 9,
    'test_pod.py::test_storage_and_the_lock_object_on_a_bucket': 3,
    'test_pod.py::test_bad_workdir_urls_fail_before_training': 2,
    'test_faults.py::test_family_resumes_exactly_after_kill9_and_sigterm': 54,
    'test_faults.py::test_truncated_checkpoint_falls_back_and_mismatch_is_named': 45,
    'test_faults.py::test_injected_nan_skip_and_stop': 38,
    'test_faults.py::test_full_disk_while_checkpointing': 21,
    'test_faults.py::test_kill9_during_checkpoint_write': 17,
    'test_train.py::test_8_devices_match_1_device': 40,
    'test_train.py::test_train_eval_sample': 37,
    'test_train.py::test_two_processes_train_and_checkpoint': 32,
    'test_train.py::test_resume_is_exact': 29,
    'test_train.py::test_evaluators_in_the_loop_match_eval_and_evaluator': 21,
    'test_train.py::test_sweep_writes_summary': 16,
    'test_train.py::test_bad_text_lines_are_counted_in_run_log': 6,
    'test_train.py::test_bad_config_and_data_fail_clearly': 4,
    'test_ops.py::test_evaluator_follows_training_across_restarts': 25,
    'test_ops.py::test_two_processes_from_slurm_variables': 20,
    'test_ops.py::test_sweep_as_jobs_and_gathered_summary': 7,
    'test_reliability.py::test_user_mistakes_end_in_one_message': 25,
    'test_reliability.py::test_a_bpe_run_records_its_tokenizer': 9,
    'test_reliability.py::test_data_that_changed_before_a_resume_is_named': 7,
    'test_reliability.py::test_a_crash_right_after_a_checkpoint_keeps_its_metrics_line': 5,
    'test_reliability.py::test_a_nonfinite_update_is_never_applied': 5,
    'test_reliability.py::test_one_training_per_workdir_and_failed_extras_keep_the_record': 3,
}


def _unit(nodeid):
  """The unit of work a test belongs to: itself in a PER_TEST file, else its file."""
  fname = os.path.basename(nodeid.split('::')[0])
  return nodeid if fname in PER_TEST else fname


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs without the plugin
def pytest_xdist_make_scheduler(config, log):
  """--dist loadgroup with the units above (xdist's own reading of `xdist_group` marks relies
  on renaming test ids, which this pytest no longer allows)."""
  if config.getvalue('dist') != 'loadgroup':
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=import-outside-toplevel

  class Units(LoadGroupScheduling):
    def _split_scope(self, nodeid):
      return _unit(nodeid)

  return Units(config, log)


def pytest_collection_modifyitems(config, items):
  if not config.getoption('loadgroup', False):  # set by xdist in its workers under loadgroup
    return
  units = {}
  for item in items:
    unit = _unit(item.nodeid)
    cost = COST.get(unit if unit.endswith('.py') else f'{unit.split("::")[0].split("/")[-1]}::'
                    f'{item.originalname}', 1.0)
    units.setdefault(unit, (cost, []))[1].append(item)
  order = sorted(units.values(), key=lambda u: -u[0])  # stable: ties keep the file order
  items[:] = [item for _, unit in order for item in unit]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
  """An `xla_optimized` test runs in a child pytest (the same node id, its output shown on
  failure) whose XLA optimises as real runs do; this process only checks that it passed."""
  if item.get_closest_marker('xla_optimized') is None or os.environ.get(OPTIMIZED_CHILD):
    return
  env = dict(os.environ)
  env[OPTIMIZED_CHILD] = '1'
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(TEST_XLA_FLAGS, '').strip()
  for k in [k for k in env if k.startswith('PYTEST_XDIST') or k == 'PYTEST_CURRENT_TEST']:
    del env[k]
  p = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                      item.nodeid], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=1800)
  if p.returncode != 0 or ' passed' not in p.stdout:
    pytest.fail(f'{item.nodeid} with XLA optimisation (child pytest, exit {p.returncode}):\n'
                f'{p.stdout[-6000:]}\n{p.stderr[-3000:]}', pytrace=False)
  item.runtest = lambda: None  # passed in the child


def pytest_configure(config):
  config.addinivalue_line('markers', 'xla_optimized: runs in a child pytest with XLA\'s CPU '
                          'optimisation on (tests dominated by running a real model)')
  config.addinivalue_line('markers', 'device_suite: the device suite dry run, a subset '
                          '(alone: pytest -m device_suite tests)')
  if getattr(config.option, 'dist', 'no') == 'loadgroup':
    config.option.loadscopereorder = False  # keep the heaviest-first order above


