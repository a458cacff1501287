"""Hierarchical byte-to-word transformer (HAT): byte encoder -> word backbone -> byte decoder.

  python launch.py --config=configs/hat.py:tiny --workdir=runs/hat_tiny

Sizes: the backbone matches the byte/subword baselines' preset of the same name
(configs/lm_presets.py), so the three compare on one backbone; the byte encoder/decoder are
small sliding-window stacks.
"""
from configs import base, lm_presets
from models import hat

PRESETS = ('tiny', 'small', '1b')

# name -> (byte_d, byte_heads, byte_mlp, enc_layers, dec_layers, byte_window, seq_len (bytes),
#          max_words, backbone preset)
_SIZES = {
    'tiny': (64, 4, 192, 1, 1, 64, 256, 64, 'tiny'),
    'small': (512, 8, 1408, 2, 2, 256, 4096, 1024, 'small'),
    '1b': (768, 12, 2048, 2, 2, 512, 8192, 2048, '350m'),
}


def get_config(preset: str = 'tiny'):
  c = base.get_config()
  c.family = 'hat'
  c.data.encoder = 'bytes'
  c.data.splitter = 'whitespace'   # whitespace | unicode | spacebyte | fixed:N
  # (model.chunking='learned': the model cuts its own units with a router, H-Net style, toward
  # model.chunk_target bytes per unit; the splitter is then not read. docs/hat.md)
  c.data.max_word_bytes = 16       # Lw: longer words are cut at UTF-8 character boundaries
  bd, bh, bmlp, enc, dec, win, seq, words, backbone = _SIZES[preset]
  c.data.max_words = words         # W per row; bytes of further words get weight 0 (counted)
  # the word-level backbone and the trainer settings of the baselines' preset of that size
  c.model = m = hat.default_model_config()
  m.update(lm_presets.backbone(backbone))
  lm_presets.set_keys(c, lm_presets.training(backbone))
  m.byte_d_model, m.byte_heads, m.byte_mlp_dim = bd, bh, bmlp
  m.enc_layers, m.dec_layers, m.byte_window = enc, dec, win
  c.data.seq_len = seq
  if preset == '1b':  # the paper's largest-scale shape: a wider, deeper backbone
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = (
        2048, 16, 16, 16, 128, 5632)
    m.scan_layers = True
    # The batch is global (rows per optimizer step: the experiment, the same on any slice) and
    # is split over every device (mesh data x fsdp), so it must be a multiple of the device
    # count: 256 rows run on the 256 chips of the v5litepod-256 slice the README launches (one
    # 8192-byte row per chip) and on 4 nodes x 8 GPUs; train/preflight.py refuses any other
    # slice it does not divide, with the fix.
    c.train.batch_size, c.train.steps, c.optim.lr = 256, 50_000, 3e-4
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 120
  return c


def get_sweep(cfg):
  """Word splitters on the same model."""
  return [{'data.splitter': s} for s in ('whitespace', 'unicode', 'spacebyte', 'fixed:4')]
