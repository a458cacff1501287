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
    # Llama-style ~1B (TinyLlama-1.1B's shape: 22 layers, width 2048, 32 heads / 4 KV heads,
    # SwiGLU 5632): ~0.97B non-embedding; 4096 bytes or 2048 subword tokens per row
    '1b': (2048, 22, 32, 5632, 4096, 256, 50_000, 3e-4),
}
KV_HEADS = {'1b': 4}   # GQA where the preset has it (else num_kv_heads = num_heads)
PRESETS = tuple(_SIZES)


def backbone(preset: str) -> dict:
  """The transformer's `model.*` sizes of `preset`."""
  d, layers, heads, mlp = _SIZES[preset][:4]
  return {'d_model': d, 'num_layers': layers, 'num_heads': heads,
          'num_kv_heads': KV_HEADS.get(preset, heads), 'head_dim': d // heads, 'mlp_dim': mlp,
          'remat': 'full' if preset in ('350m', '1b') else 'none',
          # lax.scan over the layers: compile time flat in depth, ~2x faster (compile_time.py)
          'scan_layers': preset in ('350m', '1b')}


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
  """A token LM's preset on `c`: backbone sizes on `c.model` and the preset's training settings
  (the readout chunking stays the model default, `ce_chunk=-1`: auto, chunked only where one
  device's logits would not fit)."""
  c.model.update(backbone(preset))
  return set_keys(c, training(preset))


def model_config() -> ml_collections.ConfigDict:
  """The token LM's model keys (one home: models/token_lm.default_model_config)."""
  return token_lm.default_model_config()
