"""Generate text from a checkpoint for config.sample (prompt, temperature, top_p, ...).

The latest checkpoint or --step; with config.sample.byte_level through the family's byte-level
view; with config.dynamic set, a pretrained LM under dynamic tokenization (train/dynamic.py).
"""
from __future__ import annotations

from train.modes import _checkpoint


class Mode(_checkpoint.CheckpointMode):
  PLAIN, DYNAMIC = 'sample', 'sample'  # train.trainer.sample / train.dynamic.sample
