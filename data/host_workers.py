"""One host's training batches built by `data.workers` processes (tokenizing, word splitting,
packing in parallel, outside the trainer's GIL).

With W workers, worker w is the ordinary single-process iterator of virtual host
`process_index * W + w` of `process_count * W` (the same sharding, the same state), building
`local_batch / W` rows; the host batch is the workers' rows concatenated in worker order. The
batches are therefore deterministic, and the same as those of W * process_count hosts of one
worker each. The state is the list of the workers' states (with `workers` beside
`process_index` / `process_count`, so a run resumed with another `data.workers` is refused).

Workers are 'spawn'ed processes (JAX is not fork-safe) that never touch an accelerator
(`JAX_PLATFORMS=cpu` in their environment). They ignore SIGINT (the trainer stops them), and
stop by themselves when the trainer's process is gone, so an interrupted or killed run leaves
no process behind. An exception in a worker ends the iterator with that exception (its worker
traceback as a note), every worker stopped.

This module knows nothing of the pipeline: a worker's iterator comes from `factory(index,
count, state)` (a picklable callable, e.g. a `functools.partial` of a module-level function;
data/pipeline.py `make_train_iterator` makes it).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
from typing import Any, Callable, Iterator

import numpy as np

CONTEXT = 'spawn'
_POLL_S = 0.2
_STOP_S = 10.0  # a worker gets this long to stop before it is terminated


class WorkerError(RuntimeError):
  """A data worker failed with an exception that could not be sent back, or died."""


def _counts(stats) -> dict[str, float]:
  return {k: v for k, v in dict(stats or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stats(it) -> dict[str, dict]:
  return {'transform': _counts(getattr(getattr(it, 'transform', None), 'stats', None)),
          'source': _counts(getattr(getattr(it, 'source', None), 'stats', None))}


def _put(q, item, stop, parent) -> bool:
  """Puts `item` into the bounded queue `q` unless `stop` is set or the parent is gone."""
  while not stop.is_set():
    if parent is not None and not parent.is_alive():
      return False
    try:
      q.put(item, timeout=_POLL_S)
      return True
    except queue.Full:
      pass
  return False


def _worker_main(factory, index: int, count: int, state, q, stop) -> None:
  """A worker: ('ready',), then ('ok', batch, state, stats delta) per batch, or ('error', ...)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the trainer, which stops us
  parent = mp.parent_process()
  sent = False
  try:
    it = factory(index, count, state)
    seen = _stats(it)
    if not _put(q, ('ready', None, None, None), stop, parent):
      return
    while True:
      batch = next(it)
      now = _stats(it)
      delta = {k: {s: v - seen[k].get(s, 0) for s, v in now[k].items()
                   if v != seen[k].get(s, 0)} for k in now}
      seen = now
      if not _put(q, ('ok', batch, it.get_state(), delta), stop, parent):
        return
  except BaseException as e:  # pylint: disable=broad-except
    try:
      pickle.dumps(e)
      exc = e
    except Exception:  # pylint: disable=broad-except
      exc = None
    sent = _put(q, ('error', exc, f'{type(e).__name__}: {e}', traceback.format_exc()), stop,
                parent)
  finally:
    if not sent:  # stopping: what is still queued is dropped, so the process can exit
      q.cancel_join_thread()


@contextlib.contextmanager
def _worker_env():
  """The environment the workers are spawned with: host work only, no accelerator."""
  old = os.environ.get('JAX_PLATFORMS')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  try:
    yield
  finally:
    if old is None:
      os.environ.pop('JAX_PLATFORMS', None)
    else:
      os.environ['JAX_PLATFORMS'] = old


def _concat(parts: list):
  if isinstance(parts[0], dict):
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}
  return np.concatenate(parts)


def _add(stats, delta: dict, lock=None) -> None:
  if stats is None or not delta:
    return
  with lock or contextlib.nullcontext():
    for k, v in delta.items():
      stats[k] = stats.get(k, 0) + v


class WorkerIterator:
  """Infinite, checkpointable iterator of one host's batches, built by `workers` processes.

  `factory(index, count, state) -> iterator` builds worker w's own iterator (virtual host
  `index = process_index * workers + w` of `count = process_count * workers`; `state` None
  means from the start). `source` / `transform`: this process's objects, whose `stats` receive
  the workers' counts (what the run reports). Each worker keeps up to max(`prefetch`, 2)
  batches ready. The workers start on the first batch or on `set_state`."""

  def __init__(self, factory: Callable[..., Any], workers: int, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2, state: dict[str, Any] | None = None,
               source=None, transform=None):
    if workers < 1:
      raise ValueError(f'data.workers={workers}: a WorkerIterator needs >= 1 worker')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.factory, self.workers = factory, int(workers)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.prefetch = max(int(prefetch), 2)
    self.source, self.transform = source, transform
    self.streamed = bool(getattr(source, 'streamed', False))
    self._procs: list = []
    self._queues: list = []
    self._stop = None
    self._states: list = [None] * self.workers
    if state is not None:
      self.set_state(state)

  # -- state ---------------------------------------------------------------------------------
  def _meta(self) -> dict[str, int]:
    return {'workers': self.workers, 'process_index': self.process_index,
            'process_count': self.process_count}

  def get_state(self) -> dict[str, Any]:
    """The state after the last batch returned: each worker's (None: not started yet)."""
    return {**self._meta(), 'worker_states': list(self._states)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes so that the next batch is the one that followed `state` (the workers start now,
    so a state that does not fit their data is a ValueError here)."""
    saved = int(state.get('workers', 0))
    if saved != self.workers:
      raise ValueError(f'the iterator state was written with data.workers={saved}, this run '
                       f'has data.workers={self.workers}: resume with '
                       f'--config.data.workers={saved}')
    meta = self._meta()
    bad = {k: (state[k], v) for k, v in meta.items() if k in state and state[k] != v}
    if bad:
      raise ValueError(f'iterator state does not match this iterator (saved, now): {bad}')
    states = list(state.get('worker_states') or [])
    if len(states) != self.workers:
      raise ValueError(f'iterator state holds {len(states)} worker states for '
                       f'data.workers={self.workers}')
    self.close()
    self._states = states
    self._start()

  # -- processes -------------------------------------------------------------------------------
  def _start(self) -> None:
    ctx = mp.get_context(CONTEXT)
    self._stop = ctx.Event()
    self._queues = [ctx.Queue(maxsize=self.prefetch) for _ in range(self.workers)]
    count = self.process_count * self.workers
    try:
      with _worker_env():
        for w in range(self.workers):
          index = self.process_index * self.workers + w
          p = ctx.Process(target=_worker_main, name=f'notoklm-data-{w}', daemon=True,
                          args=(self.factory, index, count, self._states[w], self._queues[w],
                                self._stop))
          try:
            p.start()
          except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise ValueError(
                f'data.workers={self.workers}: the data pipeline (its batch transform '
                f'{type(self.transform).__name__}) cannot be sent to a worker process '
                f'({type(e).__name__}: {e}); use data.workers=0') from e
          self._procs.append(p)
      for w in range(self.workers):
        self._get(w, 'ready')
    except BaseException:
      self.close()
      raise

  def _get(self, w: int, want: str):
    """The next message of worker w (its exception raised here, every worker stopped)."""
    q, p = self._queues[w], self._procs[w]
    while True:
      try:
        kind, a, b, c = q.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if not p.is_alive():
          try:
            kind, a, b, c = q.get(timeout=_POLL_S)
            break
          except queue.Empty:
            pass
          code = p.exitcode
          self.close()
          raise WorkerError(f'data worker {w} of {self.workers} (data.workers) exited with code '
                            f'{code} without a message') from None
    if kind == 'error':
      self.close()
      where = f'in data worker {w} of {self.workers} (data.workers) on this host'
      if a is None:
        raise WorkerError(f'{b} ({where})\n{c}')
      a.add_note(f'({where}; its traceback:\n{c.rstrip()})')
      raise a
    assert kind == want, (kind, want)
    return a, b, c

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if not self._procs:
      self._start()
    parts, states = [], []
    for w in range(self.workers):
      batch, state, delta = self._get(w, 'ok')
      parts.append(batch)
      states.append(state)
      _add(getattr(self.transform, 'stats', None), delta['transform'],
           getattr(self.transform, '_lock', None))
      _add(getattr(self.source, 'stats', None), delta['source'])
    self._states = states
    return _concat(parts)

  def close(self) -> None:
    """Stops the workers (the iterator can be revived with `set_state`)."""
    if self._stop is not None:
      self._stop.set()
    procs, queues = self._procs, self._queues
    self._procs, self._queues = [], []
    done = threading.Event()

    def drain():  # a worker blocked on a full pipe needs its queue read to exit
      while not done.is_set():
        for q in queues:
          try:
            q.get_nowait()
          except (queue.Empty, OSError, ValueError):
            pass
        done.wait(0.02)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
      for p in procs:
        p.join(_STOP_S)
        if p.is_alive():
          p.terminate()
          p.join(2)
        if p.is_alive():
          p.kill()
          p.join()
    finally:
      done.set()
      drainer.join()
    for q in queues:
      q.close()
      q.cancel_join_thread()
    for p in procs:
      p.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
