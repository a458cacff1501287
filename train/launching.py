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
import shlex
import sys

import jax

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
  kept (no minimum compile time), the directory is bounded (least recently used entries go
  past 4 GiB) and file-locked, so concurrent processes share it safely. Returns the directory
  ('' when disabled). Deleting the directory is always safe."""
  d = compile_cache_dir()
  if d:
    os.makedirs(d, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', d)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    jax.config.update('jax_compilation_cache_max_size', COMPILE_CACHE_MAX_BYTES)
  return d


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


def detect(coordinator: str | None) -> str:
  """'explicit' | 'slurm' | 'tpu' | 'single' (see the module doc)."""
  if coordinator:
    return 'explicit'
  if _slurm_tasks() > 1:
    return 'slurm'
  if _tpu_workers() > 1:
    return 'tpu'
  return 'single'


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> str:
  """Starts jax.distributed as the environment says; returns how ('single': not started)."""
  how = detect(coordinator)
  if how == 'explicit':
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator needs --num_processes and --process_id')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif how in ('slurm', 'tpu'):
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


def tpu_command(args: list[str], tpu: str, zone: str, project: str = '', repo: str = '',
                python: str = '') -> str:
  """One gcloud command that runs launch.py on every worker of a TPU pod slice (each worker
  finds its peers from the TPU metadata: no --coordinator needed)."""
  repo = repo or REPO
  remote = shell_command(repo, python, args)
  parts = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}']
  if project:
    parts.append(f'--project={project}')
  parts += ['--worker=all', f'--command={remote}']
  return ' '.join(shlex.quote(p) for p in parts)


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
            'set -euo pipefail', f'mkdir -p {shlex.quote(log_dir)}', f'cd {shlex.quote(repo)}']
  if array:
    lines.append(f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands_file)})')
    lines.append('srun --kill-on-bad-exit=1 bash -c "$CMD"')
  else:
    lines.append(f'srun --kill-on-bad-exit=1 {python} launch.py '
                 + ' '.join(shlex.quote(a) for a in args))
  return '\n'.join(lines) + '\n'
