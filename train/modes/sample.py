"""Generate text from a checkpoint for config.sample (prompt, temperature, top_p, ...).

The latest checkpoint or --step; with config.sample.byte_level through the family's byte-level
view; with config.dynamic set, a pretrained LM under dynamic tokenization (train/dynamic.py).
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
      dynamic.sample(cfg, args.workdir, step=args.step)
    else:
      from train import trainer  # pylint: disable=import-outside-toplevel
      trainer.sample(cfg, args.workdir, step=args.step)
    return 0
