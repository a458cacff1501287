"""Backbone sizes and training schedules shared by the token-LM baselines (byte and subword) and
HAT's word-level backbone, so the three compare on one backbone. Pure functions: each config
file applies what it takes, explicitly."""
import ml_collections

from models import token_lm

# name -> (d_model, num_layers, num_heads, mlp_dim, seq_len, batch_size, steps, lr)
_SIZES = {
    'tiny': (128, 2, 4, 384, 256, 16, 300, 3e-3),
    'small': (768, 12, 12, 2048, 1024, 256, 20_000, 6e-4),   # ~85M non-embedding ("125M class")
    '350m': (1024, 24, 16, 2816, 1024, 256, 40_000, 3e-4),    # ~310M non-embedding
}
PRESETS = tuple(_SIZES)


def backbone(preset: str) -> dict:
  """The transformer's `model.*` sizes of `preset`."""
  d, layers, heads, mlp = _SIZES[preset][:4]
  return {'d_model': d, 'num_layers': layers, 'num_heads': heads, 'num_kv_heads': heads,
          'head_dim': d // heads, 'mlp_dim': mlp,
          'remat': 'full' if preset == '350m' else 'none'}


def training(preset: str) -> dict:
  """Flat `section.key` -> value of the trainer, data and checkpoint settings of `preset`."""
  seq, batch, steps, lr = _SIZES[preset][4:]
  out = {'data.seq_len': seq, 'train.batch_size': batch, 'train.steps': steps, 'optim.lr': lr}
  if preset == 'tiny':  # seconds on a 2-core CPU
    out.update({'train.log_every': 25, 'ckpt.every': 100, 'train.eval_batches': 16,
                'optim.warmup_steps': 20})
  else:
    out.update({'train.log_every': 50, 'ckpt.every': 1000, 'train.eval_every': 2000,
                'train.eval_batches': 200, 'optim.warmup_steps': 1000})
  return out


def set_keys(c: ml_collections.ConfigDict, flat: dict) -> ml_collections.ConfigDict:
  """Sets `{'section.key': value}` on `c` (every key must exist)."""
  for key, value in flat.items():
    section, leaf = key.split('.')
    if leaf not in c[section]:
      raise KeyError(f'{key} is not a config key')
    c[section][leaf] = value
  return c


def apply(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """A token LM's preset on `c`: backbone sizes on `c.model` (ce_chunk 256 beyond tiny) and the
  preset's training settings."""
  c.model.update(backbone(preset))
  if preset != 'tiny':
    c.model.ce_chunk = 256
  return set_keys(c, training(preset))


def model_config() -> ml_collections.ConfigDict:
  """The token LM's model keys (one home: models/token_lm.default_model_config)."""
  return token_lm.default_model_config()
