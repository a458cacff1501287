"""Train a model (the default mode); resumes if the workdir has a checkpoint.

The run's exit status is 0 when it finished, 143 / 130 when SIGTERM / SIGINT stopped it (after
a checkpoint, so the same command resumes it). A resume checks the config and the data against
the run's record (train/record.py); a finished run with nothing to do says so and writes
nothing.
"""
from __future__ import annotations

from train import modes


class Mode(modes.Mode):

  def add_flags(self, flags) -> None:
    flags.add_argument('--allow_config_change', default='', metavar='KEY[,KEY...]',
                       help='resume with these recorded keys changed (e.g. optim.lr, '
                            'train.batch_size, optim.* for a prefix; data.fingerprint for data '
                            'edited in place); each change goes to config_history.jsonl with '
                            'its step (train/record.py)')

  def run(self, args, cfg, module, overrides) -> int:
    from train import trainer  # pylint: disable=import-outside-toplevel
    allow = [k.strip() for k in args.allow_config_change.split(',') if k.strip()]
    out = trainer.train(cfg, args.workdir, allow_changes=allow)
    return modes.signal_status(out.get('signal'))
