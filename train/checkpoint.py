"""Orbax checkpoints: train state + every host's data-iterator state + the resolved config.

Async saves, a keep-N policy, and restore onto whatever mesh the restoring process has (the
abstract target carries the new shardings). If the newest checkpoint cannot be read (a
truncated or corrupted write), restore falls back to the previous one and says so.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
_STATE_BYTES = 4096  # fixed-size buffer for one host's JSON iterator state


def _gather_data_states(state: dict) -> list[dict]:
  """Every host's iterator state, gathered so the primary host can save them all."""
  raw = json.dumps(state).encode()
  if len(raw) > _STATE_BYTES:
    raise ValueError(f'data iterator state too large to checkpoint ({len(raw)} bytes)')
  if jax.process_count() == 1:
    return [state]
  buf = np.zeros(_STATE_BYTES, np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(row).rstrip(b'\0').decode()) for row in every]


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=opts, item_names=('state', 'data', 'config'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, config: dict, force=False) -> bool:
    states = _gather_data_states(data_state or {})
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'hosts': states}),
        config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state, step: int | None = None, fallback: bool = True):
    """-> (step, state, this host's data state or None). Falls back to older steps on failure."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                                f'available: {steps}')
      candidates = [step]
    else:
      candidates = steps[::-1] if fallback else steps[-1:]
    errors = []
    for s in candidates:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'step {s}: {type(e).__name__}: {str(e)[:300]}')
        log.warning('checkpoint step %d in %s is unreadable (%s); trying an older one',
                    s, self.directory, errors[-1])
        continue
      if errors:
        log.warning('restored step %d after skipping unreadable checkpoints: %s', s, errors)
      hosts = (out.data or {}).get('hosts') or []
      pid = jax.process_index()
      data_state = hosts[pid] if pid < len(hosts) and len(hosts) == jax.process_count() else None
      if hosts and data_state is None:
        log.warning('checkpoint has data states for %d hosts but this run has %d: the data '
                    'iterators restart from the beginning of the epoch', len(hosts),
                    jax.process_count())
      return s, out.state, data_state
    raise RuntimeError(f'no readable checkpoint in {self.directory}:\n' + '\n'.join(errors))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
