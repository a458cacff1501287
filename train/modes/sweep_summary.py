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

  def run(self, args, cfg, module, overrides) -> int:
    if _jobs.check_counts(args) or _jobs.check_sweep(args, module):
      return 2
    from train import sweep  # pylint: disable=import-outside-toplevel
    rows = sweep.gather(cfg, module.get_sweep(cfg), storage.canonical(args.workdir), overrides)
    missing = [r['run'] for r in rows if r['status'] != 'done']
    print(f'{len(rows) - len(missing)} of {len(rows)} points done'
          + (f'; not done: {", ".join(missing)}' if missing else ''))
    return 0
