"""Byte-level evaluations across families, over finished runs (train/cross_family.py).

  # cross-tokenizer ensemble: SmolLM2 (no run needed) + the subword LM and HAT trained here
  python launch.py --config=configs/cross_family.py --workdir=runs/ens --mode=ensemble \
      --config.ensemble.members=pretrained:smollm2,runs/compare/subword_lm,runs/compare/hat
  # one table + plots across families (a sweep workdir stands for its points)
  python launch.py --config=configs/cross_family.py --workdir=runs/report --mode=report \
      --config.report.runs=runs/compare,pretrained:smollm2 --config.byte_eval.text_file=a.txt

A member / run is a finished run's workdir (any family with a byte view: lm over bytes or BPE,
hat, lexinv, pretrained), or a pretrained model without a run: `pretrained:smollm2`,
`pretrained:PATH` (a .gguf file or an HF directory, e.g. one written by --mode=transfer; such a
path is recognized without the prefix too). Texts: `data.*` names the validation split (the
embedded corpus by default); `byte_eval.text_file` adds a text file.
"""
import ml_collections

from configs import base

PRESETS = ('default',)


def get_config(preset: str = 'default'):
  del preset
  c = base.get_config()
  c.family = ''              # none: every member / run brings its own
  c.byte_eval = b = ml_collections.ConfigDict()
  b.piece_bytes = 200        # texts are scored in pieces of at most this many bytes, each as a
                             # document (within the tiny models' training context)
  b.val_bytes = 16000        # validation bytes scored: pieces spread over the split (0: all)
  b.fit_bytes = 4000         # held-out validation bytes the ensemble weights are fitted on
                             # (interleaved with, never among, the scored pieces)
  b.text_file = ''           # also score this text file (pieces spread over it)
  b.text_bytes = 16000       # ... this many of its bytes (0: all)
  c.ensemble = e = ml_collections.ConfigDict()
  e.members = ''             # two or more, comma-separated (see above)
  e.kinds = 'mixture,poe,poe_fit'  # mixture (EM weights), product of experts with exponents 1,
                                   # product of experts with fitted exponents
  c.report = r = ml_collections.ConfigDict()
  r.runs = ''                # comma-separated run workdirs, sweep workdirs, pretrained:SOURCE
  r.byte_eval = True         # measure bits per byte through each byte view (validation pieces,
                             # text file); False: only what the runs recorded, and the speed
  r.gen_prompt = 'def '      # byte-level generation speed: greedy bytes after this prompt
  r.gen_bytes = 64
  return c
