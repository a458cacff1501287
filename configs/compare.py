"""Matched-FLOP comparison: HAT vs the byte-level and subword LMs on the same data.

  python launch.py --config=configs/compare.py:tiny --workdir=runs/compare --mode=sweep

Each model trains for the same training-FLOP budget (`train.flops_budget`; steps follow from
each family's FLOP accounting: models/hat.flops_per_byte, models/token_lm.flops_per_token, times
batch x sequence positions), then is evaluated on validation bits per byte, the robustness
suite and next-word accuracy (train/evals/next_word.py: every model on the same windows of the
validation text). Writes summary.md / summary.csv and bpb_vs_flops.png (validation bits per
byte against training FLOPs) in the workdir. Overrides given on the command line apply to all
three runs.
"""
from configs import hat

PRESETS = ('tiny', 'small')
BUDGET = {'tiny': 8e12, 'small': 1e19}   # training FLOPs per model
EVALS = 6                                 # evaluations along each run (for the FLOPs curve)
MODELS = ('hat', 'byte_lm', 'subword_lm')
NEXT_WORD_TEXTS = {'tiny': 256, 'small': 1024}  # 200-byte windows scored for next-word accuracy


def get_config(preset: str = 'tiny'):
  c = hat.get_config(preset)
  c.train.flops_budget = BUDGET[preset]
  return c


def get_sweep(cfg):
  """One point per model, all with this config's `train.flops_budget`: each trains the steps
  its own FLOP accounting gives (the trainer resolves them, train/trainer.resolve_steps) and
  evaluates `EVALS` times along the way."""
  budget = cfg.train.flops_budget
  return [{'name': name, 'config': f'configs/{name}.py:{cfg.preset}',
           'train.flops_budget': budget,
           'train.eval_batches': 0,  # the whole validation split for every model
           'eval.next_word_texts': NEXT_WORD_TEXTS[cfg.preset],
           'train.eval_count': EVALS}
          for name in MODELS]
