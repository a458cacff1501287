"""Backbone sizes shared by the token-LM baselines (byte and subword) so they compare fairly."""
import ml_collections

# name -> (d_model, num_layers, num_heads, mlp_dim, seq_len, batch_size, steps, lr)
_SIZES = {
    'tiny': (128, 2, 4, 384, 256, 16, 300, 3e-3),
    'small': (768, 12, 12, 2048, 1024, 256, 20_000, 6e-4),   # ~85M non-embedding ("125M class")
    '350m': (1024, 24, 16, 2816, 1024, 256, 40_000, 3e-4),    # ~310M non-embedding
}
PRESETS = tuple(_SIZES)


def apply(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  d, layers, heads, mlp, seq, batch, steps, lr = _SIZES[preset]
  m = c.model
  m.d_model = d
  m.num_layers = layers
  m.num_heads = heads
  m.num_kv_heads = heads
  m.head_dim = d // heads
  m.mlp_dim = mlp
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.train.steps = steps
  c.optim.lr = lr
  if preset == 'tiny':  # seconds on a 2-core CPU
    c.train.log_every = 25
    c.ckpt.every = 100
    c.train.eval_batches = 16
    c.optim.warmup_steps = 20
  else:
    c.train.log_every = 50
    c.ckpt.every = 1000
    c.train.eval_every = 2000
    c.train.eval_batches = 200
    c.optim.warmup_steps = 1000
    c.model.ce_chunk = 256
    c.model.remat = 'full' if preset == '350m' else 'none'
  return c


def model_config() -> ml_collections.ConfigDict:
  """The token LM's model keys (one home: models/token_lm.default_model_config)."""
  from models import token_lm  # pylint: disable=g-import-not-at-top
  return token_lm.default_model_config()
