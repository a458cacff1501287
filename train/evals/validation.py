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
    asked = int(self.cfg.train.eval_batches)
    self.batches = setup.family.eval_batches(jax.process_index(), jax.process_count(), asked)
    self.step_fn = setup.make_eval_step()
    note = f'{len(self.batches)} eval batches'
    stats = setup.family.data_stats()
    if 'documents_validation' in stats:
      note += f' (validation split: {stats["documents_validation"]} documents' + (
          f', {stats["bytes_validation"]:,} bytes)' if 'bytes_validation' in stats else ')')
    if 0 < len(self.batches) < asked:
      note += (f' -- warning: train.eval_batches={asked} asked for more than the split holds '
               f'({len(self.batches)} batches); every run of this data is scored on the same '
               f'{len(self.batches)} (a larger split: data.val_fraction / data.val_min_bytes for '
               'a text: source)')
    return note

  def run(self, setup, params, workdir, step, earlier):
    del workdir, step, earlier
    return setup.evaluate(params, self.batches, self.step_fn)
