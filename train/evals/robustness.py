"""The robustness suite (every text family, `eval.robustness`): bits per byte of the
validation text under each perturbation of data/perturb.py (ALL CAPS; a fraction
`eval.noise_frac` of the characters of every word permuted, deleted or replaced), beside the
clean figure, as `robustness_step{N}.md`."""
from __future__ import annotations

import os

import jax

from train.evals import report
from train.metrics import log0


def run(setup, params, kinds: list[str], clean: dict, workdir: str, step: int) -> dict:
  """{kind: {'bpb', 'loss', 'n_bytes'}} for each perturbation `kind`; `setup` is the trainer's
  Setup (its family builds the perturbed batches, its eval step scores them)."""
  cfg, fam = setup.cfg, setup.family
  eval_step = setup.make_eval_step()
  out = {}
  for kind in kinds:
    r = setup.evaluate(params, fam.eval_batches(jax.process_index(), jax.process_count(),
                                                cfg.train.eval_batches, perturbation=kind),
                       eval_step)
    out[kind] = {'bpb': r.get('bpb'), 'loss': r.get('loss'), 'n_bytes': r.get('n_bytes')}
  rows = [['clean', f'{clean["bpb"]:.4f}', '1.000x']]
  for k, v in out.items():
    name = 'ALL CAPS' if k == 'caps' else f'{k} ({cfg.eval.noise_frac:.0%} of characters per word)'
    rows.append([name, f'{v["bpb"]:.4f}', f'{v["bpb"] / clean["bpb"]:.3f}x'])
  table = report.markdown(['condition', 'bits per byte', 'vs clean'], rows)
  log0(table.rstrip('\n'))
  report.write_text(os.path.join(workdir, f'robustness_step{step}.md'), table)
  return out
