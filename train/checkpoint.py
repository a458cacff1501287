"""Orbax checkpoints: train state + every host's data-iterator state + the resolved config.

Async saves, a keep-N policy, and restore onto whatever mesh the restoring process has (the
abstract target carries the new shardings). If the newest checkpoint cannot be read (a
truncated or corrupted write), restore falls back to the previous one and says so; the
training process (`move_aside=True`) then moves the unreadable steps to
`WORKDIR/checkpoints_unreadable/<step>-<time>` (kept for inspection), so its next saves of those
steps are written. A save that does not happen is an error, never reported as done.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train import storage

log = logging.getLogger(__name__)
_STATE_BYTES = 4096  # fixed-size buffer for one host's JSON iterator state


class CheckpointError(RuntimeError):
  """A checkpoint problem the user must act on (wrong config, nothing readable, failed save);
  launch.py prints it without a traceback."""


def _short(msg: str, n: int = 240) -> str:
  """Head and tail of a long error (the OS reason, e.g. 'No space left', is often at the end)."""
  return msg if len(msg) <= 2 * n else f'{msg[:n]} ... {msg[-n:]}'


def _key_str(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def stored_shapes(step_dir: str) -> dict[str, tuple[int, ...]] | None:
  """'params/layers/0/attn/q' -> global shape of every array in a checkpoint's train state, from
  orbax's metadata (None when it cannot be read: the restore itself then decides)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / 'state')
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(_key_str(k) for k in path): tuple(leaf.shape)
            for path, leaf in leaves if hasattr(leaf, 'shape')}
  except Exception:  # pylint: disable=broad-except
    return None


def check_matches(step_dir: str, abstract_state) -> None:
  """Raises CheckpointError naming the first parameters whose shape (or presence) differs
  between the checkpoint and the model this config builds."""
  stored = stored_shapes(step_dir)
  if stored is None:
    return  # unreadable metadata: the restore itself decides (and falls back)
  want = {'/'.join(_key_str(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  problems = []
  for k in sorted(set(want) | set(stored), key=lambda k: (not k.startswith('params/'), k)):
    if k not in stored:
      problems.append(f'{k}: in the model {want[k]} but not in the checkpoint')
    elif k not in want:
      problems.append(f'{k}: in the checkpoint {stored[k]} but not in the model')
    elif want[k] != stored[k]:
      problems.append(f'{k}: checkpoint shape {stored[k]} != model shape {want[k]}')
  if problems:
    more = f'\n  ... and {len(problems) - 8} more' if len(problems) > 8 else ''
    raise CheckpointError(
        f'checkpoint {step_dir} does not match the model of this config (was it written with '
        f'different model settings?):\n  ' + '\n  '.join(problems[:8]) + more
        + _layout_hint(stored, want))


def _layout_hint(stored: dict, want: dict) -> str:
  """A hint when the mismatch is the transformer's layer layout (`model.scan_layers`)."""
  per_layer = lambda keys: any(re.search(r'/layers/\d+/', k) for k in keys)
  stacked = lambda keys: any(re.search(r'/layers/(?!\d)', k) for k in keys)
  if per_layer(stored) and stacked(want) and not per_layer(want):
    have, flag = 'per-layer (unrolled)', False
  elif stacked(stored) and not per_layer(stored) and per_layer(want):
    have, flag = 'stacked (scanned)', True
  else:
    return ''
  return (f'\nthe checkpoint holds {have} layer parameters: set '
          f'--config.model.scan_layers={flag}, or convert the parameters with '
          f'models.transformer.convert_layer_layout')


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


def complete_steps(directory: str) -> list[int]:
  """Steps whose checkpoint directory was finalized (read from the disk: an unfinished write is
  a '<step>.orbax-checkpoint-tmp' directory until its final rename)."""
  try:
    return sorted(int(d) for d in storage.listdir(directory) if d.isdigit())
  except OSError:
    return []


class _ReadOnlyNotes(logging.Filter):
  """Drops orbax's notes that a reader's checkpoint directory is read-only (said on every eval,
  sample and evaluator look; read-only is what the reader asked for)."""

  def filter(self, record):
    msg = str(record.msg)
    return not (msg.startswith('Given directory is read only')
                or msg.startswith('CheckpointManagerOptions.read_only=True'))


if not any(isinstance(f, _ReadOnlyNotes) for f in logging.getLogger('absl').filters):
  logging.getLogger('absl').addFilter(_ReadOnlyNotes())


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: a reader (eval, sample, the evaluator): creates nothing, writes nothing."""
    if keep < 1:
      raise ValueError(f'ckpt.keep={keep}: at least the newest checkpoint must be kept (>= 1)')
    self.directory = storage.canonical(directory)  # a gs:// URL stays one (orbax writes there)
    # a reader passes what orbax would otherwise reset, warning, on every eval and sample
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=opts, item_names=('state', 'data', 'config'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def complete_steps(self) -> list[int]:
    return complete_steps(self.directory)

  def _failed(self, what: str, e: Exception) -> CheckpointError:
    done = self.complete_steps()
    kept = (f'the last complete checkpoint, step {done[-1]}, is intact' if done
            else 'no complete checkpoint exists yet')
    return CheckpointError(
        f'{what} failed in {self.directory}: {type(e).__name__}: {_short(str(e))}\n'
        f'{kept} (an unfinished write is never listed). Free disk space (or fix the error) and '
        f'rerun the same command to resume.')

  def save(self, step: int, state, data_state: dict | None, config: dict, force=False) -> bool:
    states = _gather_data_states(data_state or {})
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'hosts': states}),
        config=ocp.args.JsonSave(config))
    try:  # also raises a previous async save's error
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(f'saving the checkpoint of step {step}', e) from e
    if not saved:
      raise CheckpointError(
          f'the checkpoint of step {step} was not written in {self.directory}: a checkpoint of '
          f'step {self.manager.latest_step()} is already there (orbax writes only newer steps)')
    return True

  def restore(self, abstract_state, step: int | None = None, fallback: bool = True,
              move_aside: bool = False):
    """-> (step, state, this host's data state or None). Falls back to older steps on failure;
    with `move_aside` (the training process only) the unreadable newer steps are then moved
    out of the checkpoint directory, so the steps they held can be saved again."""
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
    check_matches(os.path.join(self.directory, str(candidates[0])), abstract_state)
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
        if move_aside:
          self._move_aside([c for c in candidates if c > s])
      hosts = (out.data or {}).get('hosts') or []
      pid = jax.process_index()
      data_state = hosts[pid] if pid < len(hosts) and len(hosts) == jax.process_count() else None
      if hosts and data_state is None:
        log.warning('checkpoint has data states for %d hosts but this run has %d: the data '
                    'iterators restart from the beginning of the epoch', len(hosts),
                    jax.process_count())
      return s, out.state, data_state
    raise CheckpointError(f'no readable checkpoint in {self.directory}:\n' + '\n'.join(errors))

  def _move_aside(self, steps: list[int]) -> None:
    """Moves unreadable step directories to ../checkpoints_unreadable/<step>-<time> (process 0;
    every process waits for it), then re-reads the directory."""
    dest = storage.join(os.path.dirname(self.directory), 'checkpoints_unreadable')
    stamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
    if jax.process_index() == 0:
      for s in steps:
        target = storage.join(dest, f'{s}-{stamp}')
        storage.move(storage.join(self.directory, str(s)), target)
        log.warning('moved the unreadable checkpoint of step %d to %s', s, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('notoklm_checkpoint_move_aside')
    self.manager.reload()

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed('writing a checkpoint', e) from e

  def close(self):
    self.wait()
    self.manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
