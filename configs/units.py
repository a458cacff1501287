"""Units learned from data against fixed rules, at matched training FLOPs (docs/hat.md, "Units
compared"): HAT with whitespace words, UAX #29 words, entropy patches (BLT) and learned chunking
(H-Net) at two compression targets, the byte LM and the subword LM, on the embedded corpus; and
one HAT with learned chunking trained on the same corpus with its spaces removed.

  python launch.py --config=configs/units.py:tiny --workdir=runs/units --mode=sweep
  # unit lengths, bits per byte on text without spaces and on a CJK text, speeds, renderings
  python benchmarks/units.py --sweep=runs/units --bytes=600 --gen_bytes=16 \
      --text_file=benchmarks/texts/cjk.txt

The entropy patches' patcher (a small byte LM) is trained first, as the sweep's point `patcher`
(`data.patcher='sweep:patcher'`); its training is not charged to the HAT's budget, its forward
pass over every byte is (models/hat.flops_per_byte plus the patcher's, train/families/hat.py).
Every other point trains `train.flops_budget` FLOPs by its own family's accounting and is
evaluated on the whole validation split (bits per byte, ALL-CAPS and character-noise
robustness) and next-word accuracy. Results and wall times: docs/hat.md, "Units compared at
matched FLOPs".
"""
from configs import hat

PRESETS = ('tiny', 'small')
BUDGET = {'tiny': 1e12, 'small': 1e18}   # training FLOPs per model
PATCHER_STEPS = {'tiny': 150, 'small': 5_000}
NEXT_WORD_TEXTS = {'tiny': 64, 'small': 1024}  # 200-byte windows scored for next-word accuracy
TARGETS = (4.0, 8.0)                     # learned chunking: bytes per unit
NO_SPACES = ' ='                         # data.char_map: every space removed


def get_config(preset: str = 'tiny'):
  c = hat.get_config(preset)
  c.train.flops_budget = BUDGET[preset]
  return c


def get_sweep(cfg):
  """The patcher first (a fixed number of steps), then one point per kind of unit and the two
  baselines, all with this config's `train.flops_budget` and the same evaluation."""
  p = cfg.preset
  ev = {'train.flops_budget': cfg.train.flops_budget,
        'train.eval_batches': 0,               # the whole validation split for every model
        'eval.robustness': 'caps,replace',     # ALL-CAPS and character noise
        'eval.next_word_texts': NEXT_WORD_TEXTS[p]}
  learned = [{'name': f'hat_learned{t:g}', **ev, 'model.chunking': 'learned',
              'model.chunk_target': t} for t in TARGETS]
  return [
      {'name': 'patcher', 'config': f'configs/byte_lm.py:{hat.PATCHER_PRESET[p]}',
       'train.flops_budget': 0.0, 'train.steps': PATCHER_STEPS[p], 'eval.robustness': '',
       'eval.next_word': False},
      {'name': 'hat_whitespace', **ev, 'data.splitter': 'whitespace'},
      {'name': 'hat_unicode', **ev, 'data.splitter': 'unicode'},
      {'name': 'hat_entropy', **ev, 'data.splitter': 'entropy', 'data.patcher': 'sweep:patcher'},
      *learned,
      {'name': 'byte_lm', 'config': f'configs/byte_lm.py:{p}', **ev},
      {'name': 'subword_lm', 'config': f'configs/subword_lm.py:{p}', **ev},
      {**learned[0], 'name': f'hat_learned{TARGETS[0]:g}_nospaces', 'data.char_map': NO_SPACES,
       'eval.next_word': False},   # words are not marked in its text
  ]
