"""Run every point of the config file's get_sweep(config) and/or the command line's --sweep
and --seeds in its own sub-workdir, summarized (the spec is recorded in WORKDIR/sweep.json).

With --sweep_jobs=print or slurm, write one independent job per point instead (no devices
used here; WORKDIR/launch/sweep_commands.txt, and for slurm a job array sweep.sbatch) and
gather them afterwards with --mode=sweep_summary (train/sweep.py).
"""
from __future__ import annotations

import os

from train import launching, modes
from train.modes import _jobs


class Mode(modes.Mode):

  def add_flags(self, flags) -> None:
    flags.add_argument('--sweep_jobs', choices=('', 'print', 'slurm'), default='',
                       help='write the points as independent jobs (print: their commands; '
                            'slurm: a job array) instead of running them here')
    _jobs.add_flags(flags)
    _jobs.add_sweep_flags(flags)

  def needs_devices(self, args) -> bool:
    return not args.sweep_jobs

  def run(self, args, cfg, module, overrides) -> int:
    if args.sweep_jobs:
      return _write_jobs(args, cfg, module, overrides)
    if _jobs.check_sweep(args, module):
      return 2
    from train import storage, sweep  # pylint: disable=import-outside-toplevel
    points, spec = _jobs.sweep_points(args, cfg, module, storage.canonical(args.workdir))
    rows, stopped = sweep.run(cfg, points, args.workdir, overrides, spec)
    if stopped:
      return modes.signal_status(stopped)
    failed = [r['run'] for r in rows if str(r['status']).startswith('failed')]
    if failed:
      print(f'{len(failed)} of {len(rows)} sweep points failed: {", ".join(failed)} (their '
            'status in summary.md says why)', flush=True)
      return 1
    return 0


def _write_jobs(args, cfg, module, overrides) -> int:
  """--sweep_jobs: one command per point (sweep_commands.txt), printed or as a SLURM array."""
  if _jobs.check_counts(args):
    return 2
  where = _jobs.place(args)
  if _jobs.check_sweep(args, module):
    return 2
  from train import sweep  # pylint: disable=import-outside-toplevel
  points, spec = _jobs.sweep_points(args, cfg, module, where.workdir)
  cmds = sweep.job_commands(args.config, points, where.workdir, overrides, where.repo, cfg=cfg)
  sweep.record_spec(where.workdir, spec)  # what --mode=sweep_summary reads
  os.makedirs(where.out_dir, exist_ok=True)
  path = os.path.join(where.out_dir, 'sweep_commands.txt')
  with open(path, 'w') as f:
    f.write('\n'.join(cmds) + '\n')
  if args.sweep_jobs == 'print':
    print('\n'.join(cmds))
    print(f'# {len(cmds)} jobs (also in {path}); then: python launch.py --config={args.config} '
          f'--workdir={where.workdir} --mode=sweep_summary')
    return 0
  text = launching.slurm_script([], f'{where.name}-sweep', args.nodes, args.gpus_per_node,
                                args.time, args.partition, where.repo, array=len(cmds),
                                commands_file=path, log_dir=where.log_dir)
  return _jobs.write_script(args, where.out_dir, 'sweep.sbatch', text)
