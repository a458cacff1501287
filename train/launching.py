"""Running the same launch.py command at scale: distributed start-up from the environment,
and the per-host commands / job scripts for TPU pods (gcloud) and SLURM clusters.

Distributed start-up (`init_distributed`), first match wins:
  1. explicit `--coordinator=HOST:PORT --num_processes=N --process_id=I` (or NOTOKLM_* vars);
  2. a SLURM step with more than one task (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
     SLURM_PROCID, SLURM_LOCALID): JAX's SLURM cluster detection (coordinator = first node of
     the step, port derived from the job id);
  3. a Cloud TPU VM that is one worker of several (TPU_WORKER_HOSTNAMES lists more than one
     host): JAX's TPU cluster detection;
  4. otherwise jax.distributed stays off (one machine).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time

import jax

from train import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


COMPILE_CACHE_ENV = 'NOTOKLM_COMPILE_CACHE'
COMPILE_CACHE_MAX_BYTES = 4 << 30


def compile_cache_dir() -> str:
  """Where compiled programs are kept across processes: $NOTOKLM_COMPILE_CACHE, else
  ~/.cache/notoklm/jax_compile ('' or 'off' disables it)."""
  d = os.environ.get(COMPILE_CACHE_ENV)
  if d is None:
    d = os.path.join(os.path.expanduser('~'), '.cache', 'notoklm', 'jax_compile')
  return '' if d.strip().lower() in ('', 'off', '0', 'none') else os.path.abspath(d)


def enable_compile_cache() -> str:
  """Turns on JAX's persistent compilation cache in `compile_cache_dir()` (before the first
  compile): a program compiled once -- by any earlier run, evaluation or test process with the
  same shapes, code and jax version -- is loaded instead of compiled again. Every program is
  kept (no minimum compile time). The directory is bounded here, once per process
  (`prune_compile_cache`), not by JAX's own bound: that one lists and stats the whole directory
  under one lock on every write, which grows with the cache and serialises every process that
  compiles (measured: 30 % more CPU for a test file on an empty cache, 26.7 s of 83 s in that
  scan). Concurrent processes share the directory: an entry another process is still writing
  reads as a miss (JAX recompiles it). Returns the directory ('' when disabled). Deleting the
  directory is always safe."""
  d = compile_cache_dir()
  if d:
    if os.path.exists(d) and not os.path.isdir(d):
      raise NotADirectoryError(f'{COMPILE_CACHE_ENV}={d}: not a directory (name a directory for '
                               "the compilation cache, or 'off')")
    os.makedirs(d, exist_ok=True)
    prune_compile_cache(d, COMPILE_CACHE_MAX_BYTES)
    jax.config.update('jax_compilation_cache_dir', d)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    jax.config.update('jax_compilation_cache_max_size', -1)
  return d


def prune_compile_cache(d: str, max_bytes: int, keep: float = 0.75) -> int:
  """Bounds the compilation cache `d`: past `max_bytes`, the least recently used entries go
  (by access time, else write time) until `keep` of the bound remains. Returns the number
  removed. Entries that vanish meanwhile (another process pruning) are skipped."""
  entries, total = [], 0
  try:
    names = os.listdir(d)
  except OSError:
    return 0
  for name in names:
    path = os.path.join(d, name)
    try:
      st = os.stat(path)
    except OSError:
      continue
    if not os.path.isfile(path) or name.startswith('.'):
      continue
    entries.append((max(st.st_atime, st.st_mtime), st.st_size, path))
    total += st.st_size
  if total <= max_bytes:
    return 0
  removed = 0
  for _, size, path in sorted(entries):
    if total <= keep * max_bytes:
      break
    try:
      os.remove(path)
    except OSError:
      continue
    total -= size
    removed += 1
  return removed


def default_python() -> str:
  """The interpreter for generated commands: the repo's own `.venv` path (relative, so it holds
  on every host that has the repo and its venv at --repo), else this interpreter."""
  exe = os.path.abspath(sys.executable)
  return os.path.relpath(exe, REPO) if exe.startswith(REPO + os.sep) else exe


def _slurm_tasks() -> int:
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if not all(k in os.environ for k in needed):
    return 0
  return int(os.environ['SLURM_NTASKS'])


def _tpu_workers() -> int:
  hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  return len(hosts)


DISTRIBUTED_ENV = 'NOTOKLM_DISTRIBUTED'  # '1': start jax.distributed from JAX's own detection


def detect(coordinator: str | None) -> str:
  """'explicit' | 'slurm' | 'tpu' | 'auto' | 'single' (see the module doc; 'auto': the TPU
  launcher's workers set NOTOKLM_DISTRIBUTED=1 and JAX finds its peers from the TPU metadata)."""
  if coordinator:
    return 'explicit'
  if _slurm_tasks() > 1:
    return 'slurm'
  if _tpu_workers() > 1:
    return 'tpu'
  if os.environ.get(DISTRIBUTED_ENV) == '1':
    return 'auto'
  return 'single'


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> str:
  """Starts jax.distributed as the environment says; returns how ('single': not started)."""
  how = detect(coordinator)
  if how == 'explicit':
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator needs --num_processes and --process_id')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif how in ('slurm', 'tpu', 'auto'):
    jax.distributed.initialize()  # JAX's cluster detection reads the same variables
  return how


def launch_args(config: str, workdir: str, overrides: dict, mode: str = 'train') -> list[str]:
  """The launch.py arguments that reproduce a run: config, workdir, mode and overrides."""
  args = [f'--config={config}', f'--workdir={workdir}']
  if mode != 'train':
    args.append(f'--mode={mode}')
  for k, v in overrides.items():
    args.append(f'--config.{k}={v}')
  return args


def shell_command(repo: str, python: str, args: list[str]) -> str:
  python = python or default_python()
  return f'cd {shlex.quote(repo)} && {python} launch.py ' + ' '.join(shlex.quote(a) for a in args)


def slurm_script(args: list[str], job_name: str, nodes: int, gpus_per_node: int,
                 time_limit: str = '24:00:00', partition: str = '', repo: str = '',
                 python: str = '', array: int = 0, commands_file: str = '',
                 log_dir: str = '') -> str:
  """An sbatch script: one task per node that sees all the node's GPUs (one JAX process per
  host), `srun` starting launch.py on each; processes find each other from the SLURM variables.
  With `array` > 0 and `commands_file`, a job array whose task i runs line i+1 of the file
  (one sweep point per array task) instead of `args`."""
  repo = repo or REPO
  python = python or default_python()
  log_dir = log_dir or os.path.join(repo, 'slurm_logs')
  lines = ['#!/bin/bash', f'#SBATCH --job-name={job_name}', f'#SBATCH --nodes={nodes}',
           '#SBATCH --ntasks-per-node=1', f'#SBATCH --time={time_limit}',
           f'#SBATCH --output={log_dir}/%x-%A_%a.out' if array else
           f'#SBATCH --output={log_dir}/%x-%j.out']
  if gpus_per_node:
    lines.append(f'#SBATCH --gpus-per-node={gpus_per_node}')
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  if array:
    lines.append(f'#SBATCH --array=0-{array - 1}')
  lines += ['#SBATCH --signal=TERM@120  # SIGTERM to every task 2 min before the end: checkpoint',
            'set -euo pipefail',
            f'# The nodes run the checkout {repo} and its {python} as this machine has them: they',
            '# must be on a filesystem every node mounts (or pass --repo=PATH as the nodes see it).',
            f'if [ ! -x {shlex.quote(os.path.join(repo, python))} ]; then',
            f'  echo "notoklm: {os.path.join(repo, python)} does not exist on $(hostname): put the '
            'repo and its .venv on a shared filesystem, or pass --repo=PATH" >&2; exit 1',
            'fi',
            f'mkdir -p {shlex.quote(log_dir)}', f'cd {shlex.quote(repo)}']
  if array:
    lines.append(f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands_file)})')
    lines.append('srun --kill-on-bad-exit=1 bash -c "$CMD"')
  else:
    lines.append(f'srun --kill-on-bad-exit=1 {python} launch.py '
                 + ' '.join(shlex.quote(a) for a in args))
  return '\n'.join(lines) + '\n'


# -- shipping the code and restarting preempted jobs ---------------------------------------------
def launch_dir(workdir: str) -> str:
  """Where generated job files go (on this machine): WORKDIR/launch for a local workdir, else
  a cache folder named after the URL, `$NOTOKLM_CACHE` (default `~/.cache/notoklm`)
  `/launch/<the URL's path>` (a script runs here, not in a bucket; and never in the checkout,
  where the TPU job's code archive would land in the next archive's working tree)."""
  if not storage.is_remote(workdir):
    return os.path.join(workdir, 'launch')
  cache = os.environ.get('NOTOKLM_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser(os.path.join('~', '.cache')),
      'notoklm')
  return os.path.join(cache, 'launch', workdir.replace('://', '_').replace('/', '_'))


def repo_relative(arg: str, repo: str = REPO) -> str:
  """`--config=/abs/repo/configs/x.py:p` -> `--config=configs/x.py:p` (the workers run their
  own copy of the repo); any other argument unchanged."""
  if not arg.startswith('--config='):
    return arg
  path, sep, preset = arg[len('--config='):].partition(':')
  full = os.path.abspath(path)
  if full.startswith(os.path.abspath(repo) + os.sep):
    path = os.path.relpath(full, repo)
  return f'--config={path}{sep}{preset}'


def code_archive(out_dir: str, repo: str = REPO, allow_dirty: bool = False) -> tuple[str, str]:
  """(archive path, commit): `git archive` of the repo's HEAD, the exact code every worker runs.
  Uncommitted changes to tracked files are refused (the workers would run other code than the
  commit says) unless `allow_dirty`: then they are archived as a stash commit."""
  import subprocess  # pylint: disable=import-outside-toplevel
  git = lambda *a: subprocess.run(['git', '-C', repo, *a], capture_output=True, text=True)
  head = git('rev-parse', 'HEAD')
  if head.returncode:
    raise ValueError(f'{repo} is not a git checkout ({head.stderr.strip()}): the TPU launcher '
                     'ships an archive of the exact commit')
  commit = head.stdout.strip()
  if git('diff', '--quiet', 'HEAD').returncode:
    if not allow_dirty:
      raise ValueError(f'{repo} has uncommitted changes: commit them (the workers run exactly '
                       'a commit), or pass --allow_dirty to ship them as a stash commit')
    stash = git('stash', 'create')
    if stash.returncode or (stash.stdout.strip() and
                            not re.fullmatch(r'[0-9a-f]{40}', stash.stdout.strip())):
      raise ValueError(f'{repo}: the uncommitted changes cannot be shipped as a stash commit '
                       f'(git stash create: {(stash.stderr or stash.stdout).strip()[:300]}); '
                       'finish the merge or commit them')
    commit = stash.stdout.strip() or commit
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'notoklm-{commit[:12]}.tar.gz')
  r = git('archive', '--format=tar.gz', '-o', path, commit)
  if r.returncode:
    raise ValueError(f'git archive failed: {r.stderr.strip()}')
  return path, commit


class TpuJob:
  """A training job on a Cloud TPU VM slice, from this machine (`--launcher=tpu`).

  ship:  the archive of the commit copied to every worker (`tpu-vm scp --worker=all`);
  setup: on every worker once per commit: unpack into ~/notoklm-<commit>, a venv with Python
         3.12 (uv) and the pinned requirements plus `jax[tpu]` at the pinned jax version;
  start: the same launch.py command on every worker (`tpu-vm ssh --worker=all`), each writing
         ~/notoklm-<commit>/logs/<host>.log; jax.distributed finds its peers from the TPU
         metadata (NOTOKLM_DISTRIBUTED=1). The workdir (a gs:// bucket) is passed untouched.
  `spot`: the slice is a spot queued resource (`--accelerator_type`, `--runtime_version`),
  created when missing and recreated when preempted.
  """

  def __init__(self, run_args: list[str], tpu: str, zone: str, project: str = '',
               archive: str = '', commit: str = '', jax_version: str = '', spot: bool = False,
               accelerator_type: str = '', runtime_version: str = '', run=None,
               poll_s: float = 30.0):
    if not tpu or not zone:
      raise ValueError('--launcher=tpu needs --tpu=NAME and --zone=ZONE')
    if spot and not (accelerator_type and runtime_version):
      raise ValueError('--spot needs --accelerator_type (e.g. v5litepod-256) and '
                       '--runtime_version (e.g. v2-alpha-tpuv5-lite)')
    self.run_args, self.tpu, self.zone, self.project = run_args, tpu, zone, project
    self.archive, self.commit = archive, commit
    self.jax_version = jax_version or jax.__version__
    self.spot, self.accelerator_type, self.runtime_version = spot, accelerator_type, runtime_version
    self.dir = f'~/notoklm-{commit[:12]}'
    self.run = run or _run
    self.poll_s = poll_s

  def _gcloud(self, *args) -> list[str]:
    out = ['gcloud', 'compute', 'tpus', *args, f'--zone={self.zone}']
    return out + ([f'--project={self.project}'] if self.project else [])

  def ship_cmd(self) -> list[str]:
    return self._gcloud('tpu-vm', 'scp', self.archive, f'{self.tpu}:~/', '--worker=all')

  def setup_cmd(self) -> list[str]:
    d, name = self.dir, os.path.basename(self.archive)
    script = (
        f'set -e; D={d}; if [ ! -f $D/.venv/.notoklm-ready ]; then rm -rf $D; mkdir -p $D; '
        f'tar -xzf ~/{name} -C $D; cd $D; python3 -m pip install -q --user uv; '
        '~/.local/bin/uv venv -q --python 3.12 .venv; '
        '~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt '
        f'"jax[tpu]=={self.jax_version}"; '
        '~/.local/bin/uv pip install -q --python .venv/bin/python --no-deps '
        '-r requirements-nodeps.txt; touch .venv/.notoklm-ready; fi')
    return self._gcloud('tpu-vm', 'ssh', self.tpu, '--worker=all', f'--command={script}')

  def start_cmd(self) -> list[str]:
    args = ' '.join(shlex.quote(a) for a in self.run_args)
    script = (f'cd {self.dir} && mkdir -p logs && {DISTRIBUTED_ENV}=1 .venv/bin/python launch.py '
              f'{args} 2>&1 | tee logs/$(hostname).log; exit ${{PIPESTATUS[0]}}')
    return self._gcloud('tpu-vm', 'ssh', self.tpu, '--worker=all', f'--command={script}')

  def commands(self) -> list[list[str]]:
    """Every command of an attempt (with --spot, the slice's creation first: run when it is
    missing or was preempted)."""
    steps = [self.ship_cmd(), self.setup_cmd(), self.start_cmd()]
    return ([self.create_cmd()] if self.spot else []) + steps

  def script(self) -> str:
    """Ship, set up and start as a shell script (one attempt on an existing slice)."""
    return '\n'.join(['#!/bin/bash', 'set -euo pipefail']
                     + [' '.join(shlex.quote(c) for c in cmd)
                        for cmd in self.commands()[-3:]]) + '\n'

  # -- spot slices ----------------------------------------------------------------------------
  def _qr(self, *args) -> list[str]:
    return self._gcloud('queued-resources', *args)

  def create_cmd(self) -> list[str]:
    return self._qr('create', self.tpu, f'--node-id={self.tpu}',
                    f'--accelerator-type={self.accelerator_type}',
                    f'--runtime-version={self.runtime_version}', '--spot')

  def ensure_slice(self, timeout_s: float = 4 * 3600) -> None:
    """A spot slice that is ACTIVE: created if missing, recreated if preempted or failed."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
      r = self.run(self._qr('describe', self.tpu, '--format=value(state.state)'), capture=True)
      state = r.stdout.strip() if r.returncode == 0 else 'MISSING'
      if state == 'ACTIVE':
        return
      if state in ('MISSING', 'SUSPENDED', 'FAILED', 'DELETING'):
        if state != 'MISSING':
          self.run(self._qr('delete', self.tpu, '--force', '--quiet'))
        self.run(self.create_cmd())
      time.sleep(self.poll_s)
    raise TimeoutError(f'the spot slice {self.tpu} did not become ACTIVE within {timeout_s:.0f} s')

  def attempt(self) -> int:
    if self.spot:
      self.ensure_slice()
    for cmd in (self.ship_cmd(), self.setup_cmd()):
      r = self.run(cmd)
      if r.returncode:
        return r.returncode
    return self.run(self.start_cmd()).returncode


class LocalJob:
  """The same command on this machine (`--launcher=local`), for restart loops without a
  cluster (and their test)."""

  def __init__(self, run_args: list[str], python: str = '', repo: str = REPO, run=None):
    self.cmd = [python or sys.executable, os.path.join(repo, 'launch.py'), *run_args]
    self.run = run or _run

  def commands(self) -> list[list[str]]:
    return [self.cmd]

  def attempt(self) -> int:
    return self.run(self.cmd).returncode


_TOOL_HINTS = {'sbatch': 'Slurm\'s client, on a cluster\'s login node',
               'gcloud': 'the Google Cloud CLI, https://cloud.google.com/sdk'}


def missing_tool(tool: str, written: str = '') -> str:
  """The message for a --submit whose command line tool is not on PATH."""
  hint = _TOOL_HINTS.get(tool, '')
  return (f'--submit runs {tool}, which is not on PATH here' + (f' ({hint})' if hint else '')
          + (f'; the job is written: {written}' if written else '')
          + '; without --submit the job is only written')


def _run(cmd: list[str], capture: bool = False):
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  print('# running: ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
  if os.sep not in cmd[0] and shutil.which(cmd[0]) is None:
    raise FileNotFoundError(missing_tool(cmd[0]))
  return subprocess.run(cmd, capture_output=capture, text=True)


def run_finished(workdir: str, steps: int | None = None) -> bool:
  """Whether the run in `workdir` finished: its train_summary.json exists (written only at the
  end) and, when `steps` is given, reached that step."""
  path = storage.join(workdir, 'train_summary.json')
  try:
    if not storage.exists(path):
      return False
    return steps is None or int(storage.read_json(path).get('step', 0)) >= steps
  except (OSError, ValueError):
    return False


def latest_checkpoint(workdir: str) -> int:
  """The largest step under WORKDIR/checkpoints (-1 when none)."""
  try:
    steps = [int(n) for n in storage.listdir(storage.join(workdir, 'checkpoints')) if n.isdigit()]
  except (OSError, ValueError):
    return -1
  return max(steps, default=-1)


def restart_loop(job, workdir: str, steps: int | None, max_restarts: int,
                 backoff_s: float = 60.0, max_stalled: int = 3) -> int:
  """Runs `job.attempt()` until the run in `workdir` has finished (each attempt resumes from
  the latest checkpoint there), at most 1 + `max_restarts` times; 0 when finished. An attempt
  that ends with 2 (launch.py's exit for a bad config) is not retried, nor are `max_stalled`
  failed attempts in a row that wrote no new checkpoint (an input error, a bug: a restart
  cannot fix them, preemptions leave progress behind)."""
  stalled = 0
  for i in range(max_restarts + 1):
    if run_finished(workdir, steps):
      print(f'# {workdir}: finished', flush=True)
      return 0
    before = latest_checkpoint(workdir)
    rc = job.attempt()
    if run_finished(workdir, steps):
      print(f'# {workdir}: finished (attempt {i + 1})', flush=True)
      return 0
    if rc == 2:  # launch.py's exit status for a user's mistake: a restart cannot fix it
      print(f'# attempt {i + 1} ended with 2 (a configuration error, see its log): '
            'not restarting', file=sys.stderr, flush=True)
      return 2
    stalled = stalled + 1 if latest_checkpoint(workdir) <= before else 0
    if stalled >= max_stalled:
      print(f'# {stalled} attempts in a row ended ({rc}) without a new checkpoint in '
            f'{workdir}: not restarting (see the last attempt\'s error above)', file=sys.stderr,
            flush=True)
      return 1
    if i < max_restarts:
      print(f'# attempt {i + 1} ended with {rc} before the run finished (preempted or failed): '
            f'restarting in {backoff_s:.0f} s, resuming from the latest checkpoint', flush=True)
      time.sleep(backoff_s)
  print(f'# {workdir}: not finished after {max_restarts + 1} attempts', file=sys.stderr,
        flush=True)
  return 1
