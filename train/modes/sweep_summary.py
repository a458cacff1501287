"""Gather a sweep's points from their finished runs (after --mode=sweep --sweep_jobs=...).

Writes WORKDIR/summary.csv / summary.md and says how many points are done. Uses no devices.
"""
from __future__ import annotations

from train import modes, storage
from train.modes import _jobs


class Mode(modes.Mode):
  devices = False

  def add_flags(self, flags) -> None:
    _jobs.add_flags(flags)  # checked as for the written jobs
    _jobs.add_sweep_flags(flags)  # default: the sweep recorded in WORKDIR/sweep.json

  def run(self, args, cfg, module, overrides) -> int:
    from train import sweep  # pylint: disable=import-outside-toplevel
    workdir = storage.canonical(args.workdir)
    recorded = sweep.read_spec(workdir) or {}
    if _jobs.check_counts(args) or _jobs.check_sweep(
        args, module, recorded=bool(recorded.get('sweep') or recorded.get('seeds'))):
      return 2
    points, _ = _jobs.sweep_points(args, cfg, module, workdir, record=False)
    rows = sweep.gather(cfg, points, workdir, overrides)
    missing = [r['run'] for r in rows if r['status'] != 'done']
    print(f'{len(rows) - len(missing)} of {len(rows)} points done'
          + (f'; not done: {", ".join(missing)}' if missing else ''))
    return 0
