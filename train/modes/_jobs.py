"""What the job-writing modes share (launch, sweep --sweep_jobs, sweep_summary): their flags,
their checks, where they write, and the sbatch script written (and submitted with --submit).
None of them uses devices."""
from __future__ import annotations

import os
import shlex
import shutil
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


def add_sweep_flags(flags) -> None:
  """The flags of a command-line sweep (sweep, sweep_summary)."""
  flags.add_argument('--sweep', default='',
                     help="keys to sweep, the product of their values: 'optim.lr=1e-3,3e-3 "
                          "model.num_layers=2,4' (each value parsed as --config.KEY=VALUE); "
                          'recorded in WORKDIR/sweep.json, which sweep_summary reads')
  flags.add_argument('--seeds', type=int, default=0,
                     help='N > 0: a seed axis (config.seed=0..N-1); the summary gives mean +- '
                          'std across seeds and each seed\'s value')
  flags.add_argument('--file_sweep', choices=('product', 'off'), default='product',
                     help="with --sweep/--seeds: 'product' multiplies the config file's "
                          "get_sweep points (when it defines one) by them; 'off' ignores it")


def check_sweep(args, module, recorded: bool = False) -> int:
  """0, or 2 after the message when the config file defines no get_sweep(config) and the
  command line gives no --sweep / --seeds (nor is a command-line sweep `recorded`)."""
  spec = _cli_spec(args)
  if not hasattr(module, 'get_sweep') and not spec['sweep'] and not spec['seeds'] and not recorded:
    print(f'error: {args.config} defines no get_sweep(config); give the points on the command '
          "line with --sweep='KEY=V1,V2 ...' (and/or --seeds=N)", file=sys.stderr)
    return 2
  return 0


def _cli_spec(args) -> dict:
  return {'sweep': ' '.join(getattr(args, 'sweep', '').split()),
          'seeds': getattr(args, 'seeds', 0), 'file_sweep': getattr(args, 'file_sweep', 'product')}


def sweep_points(args, cfg, module, workdir: str, record: bool = True) -> tuple[list[dict], dict]:
  """(points, spec): the sweep's points from the config file's get_sweep and the command line's
  --sweep / --seeds / --file_sweep, and the spec to record (`train/sweep.py` `record_spec`,
  once the points are checked). `record`: a workdir that recorded another spec is refused; else
  (sweep_summary) a command line without them takes the recorded ones."""
  from train import config_lib, sweep  # pylint: disable=import-outside-toplevel
  spec = _cli_spec(args)
  if spec['seeds'] < 0:
    raise config_lib.ConfigError(f'--seeds={spec["seeds"]}: must be >= 0')
  given = spec != {'sweep': '', 'seeds': 0, 'file_sweep': 'product'}
  if not record and not given:
    spec = {**spec, **{k: v for k, v in (sweep.read_spec(workdir) or {}).items() if k in spec}}
    if spec['sweep'] or spec['seeds']:
      print(f'# the sweep recorded in {workdir}/{sweep.SPEC_FILE}: --sweep={spec["sweep"]!r} '
            f'--seeds={spec["seeds"]} --file_sweep={spec["file_sweep"]}', flush=True)
  axes = sweep.parse_spec(cfg, spec['sweep'])
  cli = bool(axes or spec['seeds'])
  use_file = hasattr(module, 'get_sweep') and not (cli and spec['file_sweep'] == 'off')
  points = sweep.points(module.get_sweep(cfg) if use_file else None, axes, spec['seeds'])
  full = {**spec, 'config': args.config, 'axes': {k: list(v) for k, v in axes.items()}}
  if record:
    sweep.check_spec(workdir, full)
  elif given:
    old = sweep.read_spec(workdir)
    if old is not None and any(old.get(k) != v for k, v in spec.items()):
      raise config_lib.ConfigError(
          f'{workdir}/{sweep.SPEC_FILE} records --sweep={old.get("sweep")!r} '
          f'--seeds={old.get("seeds")} --file_sweep={old.get("file_sweep")}; this command gives '
          f'--sweep={spec["sweep"]!r} --seeds={spec["seeds"]} --file_sweep='
          f'{spec["file_sweep"]} (leave them out to use the recorded sweep)')
  return points, full


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
    if shutil.which('sbatch') is None:
      raise FileNotFoundError(launching.missing_tool('sbatch', f'submit it with sbatch {script}'))
    return subprocess.call(cmd)
  return 0
