"""The robustness suite (every text family, `eval.robustness`): bits per byte of the
validation text under each perturbation of data/perturb.py (ALL CAPS; a fraction
`eval.noise_frac` of the characters of every word permuted, deleted or replaced), beside the
clean figure, as `robustness_step{N}.md`. Evaluator type 'robustness' (its kinds:
`eval.robustness`, '' to skip); results under its name: {kind: {'bpb', 'loss', 'n_bytes'}}."""
from __future__ import annotations

import os

import jax

from train import evals
from train.evals import report
from train.metrics import log0


class Evaluator(evals.Evaluator):
  """Holds the perturbed batches of each kind and the compiled eval step across calls."""

  order = 10

  def __init__(self, name, cfg, options):
    super().__init__(name, cfg, options)
    self.kinds = [k for k in str(cfg.eval.robustness).split(',') if k]
    self.batches: dict[str, list] = {}
    self.step_fn = None

  def _batches(self, setup, kind: str | None) -> list:
    """Kept across calls when it runs in the training loop (else built for the one call)."""
    if kind in self.batches:
      return self.batches[kind]
    batches = setup.family.eval_batches(jax.process_index(), jax.process_count(),
                                        self.cfg.train.eval_batches, perturbation=kind)
    if self.every != 0:
      self.batches[kind] = batches
    return batches

  def run(self, setup, params, workdir, step, earlier):
    if not self.kinds:
      return None
    self.step_fn = self.step_fn or setup.make_eval_step()
    clean = earlier if 'bpb' in earlier else setup.evaluate(
        params, self._batches(setup, None), self.step_fn)
    out = {}
    for kind in self.kinds:
      r = setup.evaluate(params, self._batches(setup, kind), self.step_fn)
      out[kind] = {'bpb': r.get('bpb'), 'loss': r.get('loss'), 'n_bytes': r.get('n_bytes')}
    write_table(self.cfg, out, clean, workdir, step)
    return out


def write_table(cfg, out: dict, clean: dict, workdir: str, step: int) -> None:
  rows = [['clean', f'{clean["bpb"]:.4f}', '1.000x']]
  for k, v in out.items():
    name = 'ALL CAPS' if k == 'caps' else f'{k} ({cfg.eval.noise_frac:.0%} of characters per word)'
    rows.append([name, f'{v["bpb"]:.4f}', f'{v["bpb"] / clean["bpb"]:.3f}x'])
  table = report.markdown(['condition', 'bits per byte', 'vs clean'], rows)
  log0(table.rstrip('\n'))
  report.write_text(os.path.join(workdir, f'robustness_step{step}.md'), table)
