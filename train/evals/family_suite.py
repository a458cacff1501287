"""The family's own evaluations (`Family.eval_suite`: probes, generation metrics, plots; every
family, default none). Flat: its keys (e.g. `lexinv_suite`, `lcm`, and `row`, the headline
metrics of sweep summaries) are the top level of the evaluation record."""
from __future__ import annotations

from train import evals


class Evaluator(evals.Evaluator):

  flat = True
  order = 30

  def run(self, setup, params, workdir, step, earlier):
    del earlier
    return setup.family.eval_suite(setup, params, workdir, step) or None
