"""Test-only fault injection for the trainer's step, installed through the environment so that
launch.py subprocesses get it too (the production step has no fault code):

  NOTOKLM_GRADIENT_WRAPPER=tests/fault_injection.py:nonfinite_steps
  NOTOKLM_FAULT_NONFINITE_STEPS=5,12   # these steps' loss and gradients become NaN

`environment(steps)` gives both variables for `conftest.run_launch(..., **env)`.
"""
import os

import jax
import jax.numpy as jnp

STEPS_ENV = 'NOTOKLM_FAULT_NONFINITE_STEPS'
HERE = os.path.abspath(__file__)


def environment(steps: str) -> dict[str, str]:
  """The variables that make the train steps `steps` ('5,7') non-finite in a subprocess."""
  return {'NOTOKLM_GRADIENT_WRAPPER': f'{HERE}:nonfinite_steps', STEPS_ENV: steps}


def nonfinite_steps(gradients):
  """Wraps the trainer's `gradients(state, batch, frozen)`: at the (1-based) steps listed in
  $NOTOKLM_FAULT_NONFINITE_STEPS the loss and every gradient are NaN."""
  raw = os.environ.get(STEPS_ENV, '')
  try:
    steps = [int(x) for x in raw.split(',') if x.strip()]
  except ValueError as e:
    raise ValueError(f'${STEPS_ENV}={raw!r}: expected comma-separated step numbers') from e

  def wrapped(state, batch, frozen):
    loss, sums, grads = gradients(state, batch, frozen)
    if not steps:
      return loss, sums, grads
    bad = jnp.isin(state['step'] + 1, jnp.asarray(steps, jnp.int32))
    loss = jnp.where(bad, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)
    return loss, sums, grads

  return wrapped
