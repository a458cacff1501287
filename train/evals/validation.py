"""Validation loss and bits per byte (every family): the trainer's eval step (the family's
`loss` metrics, summed over the validation batches, `metrics.derived`) on `train.eval_batches`
batches of the validation split (0: all of it). Flat: its keys (`loss`, `bpb`, `n_tokens`,
`n_bytes`, ...) are the top level of every evaluation record."""
from __future__ import annotations

import jax

from train import evals


class Evaluator(evals.Evaluator):
  """Holds this process's validation batches and the compiled eval step across calls."""

  flat = True
  order = 0

  def __init__(self, name, cfg, options):
    super().__init__(name, cfg, options)
    self.batches = None
    self.step_fn = None

  def prepare(self, setup) -> str:
    self.batches = setup.family.eval_batches(jax.process_index(), jax.process_count(),
                                             self.cfg.train.eval_batches)
    self.step_fn = setup.make_eval_step()
    return f'{len(self.batches)} eval batches'

  def run(self, setup, params, workdir, step, earlier):
    del workdir, step, earlier
    return setup.evaluate(params, self.batches, self.step_fn)
