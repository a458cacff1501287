"""Lexinvariant LM (Huang et al. 2023) and its matching standard LM, on the same data and sizes.

  python launch.py --config=configs/lexinvariant.py:tiny_lm --workdir=runs/lexinv_std_tiny
  python launch.py --config=configs/lexinvariant.py:tiny --workdir=runs/lexinv_tiny
  python launch.py --config=configs/lexinvariant.py:tiny --workdir=runs/lexinv_tiny --mode=eval \
      --config.lexinv.baseline_workdir=runs/lexinv_std_tiny

Presets: `tiny` (CPU minutes, bytes), `150m` (GPU; the paper's size: 12 layers, width 1024,
bytes/characters), `150m_bpe32k` (the same model on a 32k byte-level BPE vocabulary), and
`<preset>_lm`: the standard LM (`family='lm'`) with identical model, data and training keys.
"""
import ml_collections

from configs import base, lm_presets
from models import lexinvariant

# name -> (d_model, num_layers, num_heads, mlp_dim, seq_len, batch_size, steps, lr, warmup)
_SIZES = {
    'tiny': (128, 2, 4, 384, 256, 16, 4000, 3e-3, 100),
    '150m': (1024, 12, 16, 2816, 1024, 128, 50_000, 3e-4, 2000),
    '150m_bpe32k': (1024, 12, 16, 2816, 1024, 64, 50_000, 3e-4, 2000),
}
PRESETS = tuple(_SIZES) + tuple(f'{k}_lm' for k in _SIZES)


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  standard = preset.endswith('_lm')
  size = preset[:-3] if standard else preset
  d, layers, heads, mlp, seq, batch, steps, lr, warmup = _SIZES[size]
  c = base.get_config()
  c.family = 'lm' if standard else 'lexinv'
  c.model = m = lm_presets.model_config()
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = d, layers, heads, heads
  m.head_dim, m.mlp_dim = d // heads, mlp
  c.data.encoder = 'bytes'
  c.data.seq_len = seq
  c.train.batch_size, c.train.steps = batch, steps
  c.optim.lr, c.optim.warmup_steps = lr, warmup
  if size == 'tiny':
    c.train.log_every = 100
    c.ckpt.every = 2000
    c.train.eval_batches = 16
  else:
    c.train.log_every = 100
    c.ckpt.every = 2000
    c.train.eval_every = 5000
    c.train.eval_batches = 200
    m.ce_chunk = -1   # auto (models/token_lm.resolve_ce_chunk)
  if size == '150m_bpe32k':
    c.data.encoder = 'bpe'
    c.data.vocab_size = 32768
  c.sample.prompt = 'def f(x):\n    return x\n\ndef g(x):\n    return x\n\ndef '
  c.sample.max_new_tokens = 100
  if standard:
    return c
  c.lexinv = lx = lexinvariant.default_lexinv_config()
  # pad/bos/eos are markers, not symbols: learned rows. Byte presets model the characters that
  # occur in the training split (the paper's character vocabulary); see models/lexinvariant.py.
  lx.fixed_specials = True
  lx.vocab = 'train' if c.data.encoder == 'bytes' else 'all'
  lx.vocab_min_freq = 1e-5   # ids rarer than this share the one 'other' row
  lx.baseline_workdir = ''   # a trained `lm` workdir (e.g. the <preset>_lm config) to compare with
  lx.eval_seed = 0
  lx.eval_batches = 16 if size == 'tiny' else 64   # validation batches for curves and cipher
  lx.probe_rows = 48 if size == 'tiny' else 256    # rows to train the deciphering probe on
  lx.probe_steps = 300
  lx.synthetic_n = 128 if size == 'tiny' else 512  # instances per synthetic task
  lx.lookup_keys = 8
  lx.lookup_queries = 8
  lx.perm_length = 4
  lx.perm_demos = 6
  # unseen-symbol evaluation (--mode=eval): LookUp / Repeat over `unseen` characters (never in
  # training: map them away with data.char_map) beside `seen` ones ('' = the interchangeable
  # set, else the lowercase letters not in `unseen`); '' = not run
  lx.unseen = ''
  lx.seen = ''
  return c


def get_sweep(cfg):
  """Partial lexinvariance: the probability p that a sequence gets random embeddings
  (p < 1 with the paper's regulariser: a random permutation of the learned table)."""
  if cfg.preset.endswith('_lm'):
    return [{'optim.lr': lr} for lr in ((1e-3, 3e-3) if cfg.preset.startswith('tiny') else
                                        (1.5e-4, 3e-4))]
  return ([{'lexinv.p': 1.0, 'lexinv.table': 'shared'}]
          + [{'lexinv.p': p, 'lexinv.table': 'permuted_learned'} for p in (0.05, 0.25)])
