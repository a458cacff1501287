"""Flags that several modes read, declared alike by each (train/modes/__init__.py: `Flags`)."""
from __future__ import annotations


def step(flags) -> None:
  """--step: eval, sample and export."""
  flags.add_argument('--step', type=int, default=None,
                     help='the checkpoint step to use (default: the latest)')


def poll_seconds(flags) -> None:
  """--poll_seconds: the evaluator's wait for a new checkpoint, the TPU launcher's for its
  queued resource."""
  flags.add_argument('--poll_seconds', type=float, default=30.0,
                     help='seconds between looks for a new checkpoint (evaluator) or at a '
                          'queued TPU (launch)')
