"""Frozen visual Unicode input embeddings (Bochkov 2025) against learned ones, on the byte-level
and the subword LM (same sizes, data and steps):

  python launch.py --config=configs/glyph.py:tiny --workdir=runs/glyph --mode=sweep

Points per LM: the preset (learned, tied input/readout), learned untied (the readout the glyph
model must have) and glyph (`model.input_embedding='glyph'`: the input table rendered from the
tokens' glyphs with DejaVu Sans, reduced by PCA, frozen; models/glyphs.py). Each point trains
`train.steps` (the tiny preset's 1000 here) and is evaluated (bits per byte, next-word accuracy,
the robustness suite) into summary.md.
"""
from configs import byte_lm

PRESETS = ('tiny', 'small')
STEPS = {'tiny': 400, 'small': 20_000}


def get_config(preset: str = 'tiny'):
  c = byte_lm.get_config(preset)
  c.train.steps = STEPS[preset]
  return c


def get_sweep(cfg):
  steps = cfg.train.steps
  points = []
  for lm in ('byte_lm', 'subword_lm'):
    spec = f'configs/{lm}.py:{cfg.preset}'
    base = {'config': spec, 'train.steps': steps, 'eval.next_word_texts': 128}
    points += [
        {'name': f'{lm}_learned', **base},
        {'name': f'{lm}_learned_untied', **base, 'model.tie_embeddings': False},
        {'name': f'{lm}_glyph', **base, 'model.tie_embeddings': False,
         'model.input_embedding': 'glyph'},
    ]
  return points
