"""Follow the workdir and evaluate every new checkpoint once (train/evaluator.py).
"""
from __future__ import annotations

from train import modes
from train.modes import _flags


class Mode(modes.Mode):
  reads_run = True

  def record_wait(self, args) -> float:
    # started beside its training, the run's record may be seconds away
    return args.max_idle_seconds or 120.0

  def add_flags(self, flags) -> None:
    _flags.poll_seconds(flags)
    flags.add_argument('--max_idle_seconds', type=float, default=0.0,
                       help='exit with an error after this long without a new checkpoint '
                            '(0: never)')

  def run(self, args, cfg, module, overrides) -> int:
    from train import evaluator  # pylint: disable=import-outside-toplevel
    evaluator.run(cfg, args.workdir, args.poll_seconds, args.max_idle_seconds)
    return 0
