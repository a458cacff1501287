"""A cross-tokenizer ensemble of finished runs of any families, through their byte-level views.

--config=configs/cross_family.py (train/cross_family.py).
"""
from __future__ import annotations

from train import modes


class Mode(modes.Mode):

  def run(self, args, cfg, module, overrides) -> int:
    from train import cross_family  # pylint: disable=import-outside-toplevel
    cross_family.ensemble(cfg, args.workdir)
    return 0
