"""Evaluate a checkpoint: validation bits per byte (and the family's suite) to eval_step{N}.json.

Restores the latest checkpoint (or --step) onto this process's devices. With config.dynamic
set, the model (a pretrained LM) is evaluated under dynamic tokenization instead
(train/dynamic.py).
"""
from __future__ import annotations

from train import modes
from train.modes import _dynamic, _flags


class Mode(modes.Mode):
  reads_run = True

  def add_flags(self, flags) -> None:
    _flags.step(flags)

  def accepts(self, cfg):
    return _dynamic.accepts(cfg)

  def refusal(self, cfg) -> str:
    return _dynamic.refusal(cfg)

  def run(self, args, cfg, module, overrides) -> int:
    if _dynamic.on(cfg):
      from train import dynamic  # pylint: disable=import-outside-toplevel
      dynamic.run(cfg, args.workdir, step=args.step)
    else:
      from train import trainer  # pylint: disable=import-outside-toplevel
      trainer.evaluate(cfg, args.workdir, step=args.step)
    return 0
