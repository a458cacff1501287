"""What the job-writing modes share (launch, sweep --sweep_jobs, sweep_summary): their flags,
their checks, where they write, and the sbatch script written (and submitted with --submit).
None of them uses devices."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from train import launching, storage


def add_flags(flags) -> None:
  """The flags of a written job (launch, sweep jobs)."""
  flags.add_argument('--submit', action='store_true', help='run the written script / command')
  flags.add_argument('--nodes', type=int, default=1)
  flags.add_argument('--gpus_per_node', type=int, default=8)
  flags.add_argument('--partition', default='')
  flags.add_argument('--time', default='24:00:00')
  flags.add_argument('--repo', default='', help='repository path on the hosts (default: this one)')
  flags.add_argument('--max_restarts', type=int, default=20,
                     help='tpu/local --submit: restarts of a preempted or failed job')
  flags.add_argument('--restart_backoff', type=float, default=60.0,
                     help='seconds between attempts')


@dataclass
class Place:
  """Where a job for `workdir` is written: `out_dir` (WORKDIR/launch), its name, the
  repository the hosts run from and the directory of the jobs' logs."""
  workdir: str
  out_dir: str
  name: str
  repo: str
  log_dir: str


def check_counts(args) -> int:
  """0, or 2 after the message for a count flag below its minimum."""
  for name in ('nodes', 'gpus_per_node', 'max_restarts', 'restart_backoff'):
    low = 1 if name == 'nodes' else 0
    if getattr(args, name) < low:
      print(f'error: --{name}={getattr(args, name)}: must be >= {low}', file=sys.stderr)
      return 2
  return 0


def check_sweep(args, module) -> int:
  """0, or 2 after the message when the config file defines no get_sweep(config)."""
  if not hasattr(module, 'get_sweep'):
    print(f'error: {args.config} defines no get_sweep(config)', file=sys.stderr)
    return 2
  return 0


def place(args) -> Place:
  workdir = storage.canonical(args.workdir)  # a gs:// URL is passed on untouched
  out_dir = launching.launch_dir(workdir)
  repo = args.repo or launching.REPO
  log_dir = os.path.join(out_dir, 'logs') if not storage.is_remote(workdir) else os.path.join(
      repo, 'slurm_logs')
  return Place(workdir, out_dir, os.path.basename(workdir.rstrip('/')) or 'notoklm', repo,
               log_dir)


def write_script(args, out_dir: str, file_name: str, text: str) -> int:
  """Writes the sbatch script `text` into `out_dir`, prints it, and with --submit runs it."""
  script = os.path.join(out_dir, file_name)
  os.makedirs(out_dir, exist_ok=True)
  with open(script, 'w') as f:
    f.write(text)
  print(text, end='')
  print(f'# written to {script}')
  if args.submit:
    cmd = ['sbatch', script]
    print('# running: ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)
  return 0
