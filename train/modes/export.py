"""Write a checkpoint as an HF-format directory (a token LM's; the family's `export_hf` hook).
"""
from __future__ import annotations

from train import modes
from train.modes import _flags


class Mode(modes.Mode):
  reads_run = True

  def add_flags(self, flags) -> None:
    _flags.step(flags)

  def run(self, args, cfg, module, overrides) -> int:
    from train import trainer  # pylint: disable=import-outside-toplevel
    trainer.export_hf(cfg, args.workdir, step=args.step)
    return 0
