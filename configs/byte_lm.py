"""Byte-level LM baseline: UTF-8 bytes (256 + specials) into the shared transformer.

  python launch.py --config=configs/byte_lm.py:tiny --workdir=runs/byte_tiny
"""
from configs import base, lm_presets

PRESETS = lm_presets.PRESETS


def get_config(preset: str = 'tiny'):
  c = base.get_config()
  c.family = 'lm'
  c.data.encoder = 'bytes'
  c.model = lm_presets.model_config()
  c = lm_presets.apply(c, preset)
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 200
  return c


def get_sweep(cfg):
  """Learning-rate grid: a list of override dicts; `--mode=sweep` runs each point."""
  lrs = (1e-3, 3e-3) if cfg.preset == 'tiny' else (3e-4, 6e-4, 1e-3)
  return [{'optim.lr': lr} for lr in lrs]
