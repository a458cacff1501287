"""Subword LM baseline: byte-level BPE (trained on the train split, cached) into the shared transformer.

  python launch.py --config=configs/subword_lm.py:tiny --workdir=runs/bpe_tiny
"""
from configs import base, lm_presets

PRESETS = lm_presets.PRESETS


def get_config(preset: str = 'tiny'):
  c = base.get_config()
  c.family = 'lm'
  c.data.encoder = 'bpe'
  c.data.vocab_size = 4096 if preset == 'tiny' else 32768
  c.model = lm_presets.model_config()
  c = lm_presets.apply(c, preset)
  c.data.seq_len //= 4 if preset == 'tiny' else 2   # ~4 bytes per token: similar bytes per row
  if preset != 'tiny':
    c.model.tie_embeddings = False
  c.sample.max_new_tokens = 50
  return c


def get_sweep(cfg):
  """Vocabulary-size list: a list of override dicts; `--mode=sweep` runs each point."""
  sizes = (1024, 4096) if cfg.preset == 'tiny' else (16384, 32768, 65536)
  return [{'data.vocab_size': v} for v in sizes]
