"""The base of the modes that act on one checkpoint of a run (eval, sample)."""
from __future__ import annotations

from train import modes
from train.modes import _dynamic, _flags


class CheckpointMode(modes.Mode):
  """A mode on one checkpoint (`--step`, default the latest) of the run in --workdir: with
  `config.dynamic` it calls `train.dynamic.<DYNAMIC>`, else `train.trainer.<PLAIN>`, each as
  `(cfg, workdir, step=...)`; dynamic tokenization accepts only the pretrained family."""

  reads_run = True
  PLAIN = DYNAMIC = ''

  def add_flags(self, flags) -> None:
    _flags.step(flags)

  def accepts(self, cfg):
    return _dynamic.accepts(cfg)

  def refusal(self, cfg) -> str:
    return _dynamic.refusal(cfg)

  def run(self, args, cfg, module, overrides) -> int:
    # pylint: disable=import-outside-toplevel
    if _dynamic.on(cfg):
      from train import dynamic
      fn = getattr(dynamic, self.DYNAMIC)
    else:
      from train import trainer
      fn = getattr(trainer, self.PLAIN)
    fn(cfg, args.workdir, step=args.step)
    return 0
