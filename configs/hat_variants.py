"""HAT variants from neighbouring papers, each against the default on the same data and steps:

  * word-boundary tokens (Thawani et al. 2023, "Learn Your Tokens"): `model.pooling='boundary'`,
    a real boundary token before every word (its splitter must decide at a word's first byte:
    `data.splitter='ascii_whitespace'`);
  * an intra-word bidirectional encoder (Sun et al., ACL 2023): `model.encoder_attention='word'`;
  * both (the papers' full design: a prefix boundary token that reads its word both ways);
  * the default with `ascii_whitespace` words (the control for the boundary runs' splitter).

  python launch.py --config=configs/hat_variants.py:tiny --workdir=runs/hat_variants --mode=sweep

Each point trains `train.steps` (400 for tiny here: a few CPU minutes) and is evaluated (bits per byte,
next-word accuracy, the robustness suite) into summary.md. See models/hat.py for the designs.
"""
from configs import hat

PRESETS = hat.PRESETS
STEPS = {'tiny': 400, 'small': 20_000, '1b': 50_000}


def get_config(preset: str = 'tiny'):
  c = hat.get_config(preset)
  c.train.steps = STEPS[preset]
  c.eval.next_word_texts = 128   # 200-byte windows of the validation text (about 2,300 words)
  return c


def get_sweep(cfg):
  del cfg
  ascii_ws = {'data.splitter': 'ascii_whitespace'}
  return [
      {'name': 'default'},
      {'name': 'ascii_whitespace', **ascii_ws},
      {'name': 'boundary_tokens', **ascii_ws, 'model.pooling': 'boundary'},
      {'name': 'intra_word_encoder', 'model.encoder_attention': 'word'},
      {'name': 'intra_word_boundary', **ascii_ws, 'model.pooling': 'boundary',
       'model.encoder_attention': 'word'},
  ]
