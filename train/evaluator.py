"""Continuous evaluation (`--mode=evaluator`): follow a training workdir, evaluate every new
checkpoint once, on this process's own devices and mesh.

The evaluator polls the checkpoint directory for finalized steps (an orbax manager of its own,
read-only: the training job's manager is never shared), restores each new one, runs the evaluators
`config.evals` runs in the training loop (every != 0; by default validation loss and bits per
byte) -- the same evaluator objects `--mode=eval` runs -- and appends `{'step', 'loss', 'bpb',
..., '<name>/<metric>', ...}` to `workdir/evaluator.jsonl` (flushed and fsynced: that file is
the record of what was evaluated) and to TensorBoard under `eval/` beside the training curves,
under the keys the training loop writes. A restarted evaluator reads the
record and skips what it holds; a restarted training job only adds checkpoints. It exits once
the final step (`train.steps`, resolved from `train.flops_budget` like the trainer does) is
evaluated, or after `max_idle_seconds` without a new checkpoint (0: wait forever); the final step
is the run's recorded `train.steps` (config.json, read again when reached: a resume may extend
the run), whatever the command line's config says. It reads a run: a workdir without one is an
error after `max_idle_seconds` (default 120 s) of waiting for a training to start there, and is
never created. A checkpoint
deleted by the trainer's keep-N policy before it could be read is counted as missed.
"""
from __future__ import annotations

import json
import time

import jax

from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import evals, storage, trainer
from train import record as run_record
from train.metrics import log0

RECORD = 'evaluator.jsonl'


def evaluated_steps(workdir: str) -> list[int]:
  path = storage.join(workdir, RECORD)
  if not storage.exists(path):
    return []
  steps = []
  for line in storage.read_text(path).splitlines():
    line = line.strip()
    if line:
      try:
        steps.append(int(json.loads(line)['step']))
      except (ValueError, KeyError):
        continue  # a line torn by a crash mid-write: that step is evaluated again
  return steps


def run(cfg, workdir: str, poll_seconds: float = 30.0, max_idle_seconds: float = 0.0) -> dict:
  workdir = storage.check_workdir(workdir, create=False)  # a reader creates nothing
  setup = trainer.Setup(cfg, workdir=workdir)
  # the run's own train.steps (its record), not a preset's; re-read when reached (a resume
  # may have extended the run)
  final = run_record.recorded_steps(workdir) or int(setup.cfg.train.steps)
  ckpt_dir = storage.join(workdir, 'checkpoints')
  done = set(evaluated_steps(workdir))
  record = storage.JsonlLog(storage.join(workdir, RECORD)) if jax.process_index() == 0 else None
  primary = jax.process_index() == 0
  writer = metrics_lib.Writer(workdir)
  which = setup.evaluators.in_loop()
  notes = setup.evaluators.prepare(setup, which)  # e.g. the validation batches, once
  log0(f'[evaluator] following {ckpt_dir} until step {final} with evaluators '
       f'{[e.name for e in which] or "none"} ({", ".join(notes) or "-"}); already evaluated: '
       f'{sorted(done) or "none"}')
  missed, evaluated = [], []
  idle_since = time.monotonic()
  while final not in done:
    new = [s for s in ckpt_lib.complete_steps(ckpt_dir) if s not in done]
    for s in new:
      ck = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
      try:
        state, _, restored = trainer.restore_or_init(setup, ck, step=s)
      except (FileNotFoundError, ckpt_lib.CheckpointError):
        if storage.exists(storage.join(ckpt_dir, str(s))):
          raise  # there and unreadable, or another config: not ours to hide
        missed.append(s)  # removed by the trainer's keep-N policy meanwhile
        done.add(s)
        log0(f'[evaluator] step {s} was deleted before it could be read')
        continue
      finally:
        ck.close()
      ev = evals.scalars(setup.evaluators.run(which, setup, state['params'], workdir, restored))
      del state
      if primary:  # flushed (fsynced / uploaded): the record of what was done
        record.append({'step': restored, **ev}, sync=True)
        writer.scalars(restored, ev, prefix='eval')
        writer.flush()
      done.add(restored)
      evaluated.append(restored)
      idle_since = time.monotonic()
      log0(f'[evaluator] step {restored}: loss {ev.get("loss", float("nan")):.4f} '
           f'bpb {ev.get("bpb", float("nan")):.4f}')
    if final in done:
      final = max(final, run_record.recorded_steps(workdir) or final)
      if final in done:
        break
    if max_idle_seconds and time.monotonic() - idle_since > max_idle_seconds:
      writer.close()
      if record is not None:
        record.close()
      raise TimeoutError(f'[evaluator] no new checkpoint in {ckpt_dir} for {max_idle_seconds:.0f}s '
                         f'(evaluated {sorted(done)}; final step {final} not reached)')
    time.sleep(poll_seconds)
  writer.close()
  if record is not None:
    record.close()
  log0(f'[evaluator] done: evaluated {evaluated}, missed {missed}')
  return {'evaluated': evaluated, 'missed': missed}
