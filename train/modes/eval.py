"""Evaluate a checkpoint: validation bits per byte (and the family's suite) to eval_step{N}.json.

Restores the latest checkpoint (or --step) onto this process's devices. With config.dynamic
set, the model (a pretrained LM) is evaluated under dynamic tokenization instead
(train/dynamic.py).
"""
from __future__ import annotations

from train.modes import _checkpoint


class Mode(_checkpoint.CheckpointMode):
  PLAIN, DYNAMIC = 'evaluate', 'run'  # train.trainer.evaluate / train.dynamic.run
