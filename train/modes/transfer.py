"""Give a pretrained model a new tokenizer, by embedding initialization (train/transfer.py).
"""
from __future__ import annotations

from train import modes


class Mode(modes.Mode):
  families = ('pretrained',)

  def refusal(self, cfg) -> str:
    return 'it transfers a pretrained model (configs/pretrained.py, any model.source)'

  def run(self, args, cfg, module, overrides) -> int:
    from train import transfer  # pylint: disable=import-outside-toplevel
    transfer.run(cfg, args.workdir)
    return 0
