"""Train a model (the default mode); resumes if the workdir has a checkpoint.

The run's exit status is 0 when it finished, 143 / 130 when SIGTERM / SIGINT stopped it (after
a checkpoint, so the same command resumes it).
"""
from __future__ import annotations

from train import modes


class Mode(modes.Mode):

  def run(self, args, cfg, module, overrides) -> int:
    from train import trainer  # pylint: disable=import-outside-toplevel
    out = trainer.train(cfg, args.workdir)
    return modes.signal_status(out.get('signal'))
