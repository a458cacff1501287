"""One host's training batches built by `data.workers` processes (tokenizing, word splitting,
packing in parallel, outside the trainer's GIL).

With W workers, worker w is the ordinary single-process iterator of virtual host
`process_index * W + w` of `process_count * W` (the same sharding, the same state), building
`local_batch / W` rows; the host batch is the workers' rows concatenated in worker order. The
batches are therefore deterministic, and the same as those of W * process_count hosts of one
worker each. The state is the list of the workers' states (with `workers` beside
`process_index` / `process_count`, so a run resumed with another `data.workers` is refused).

Workers are 'spawn'ed processes (JAX is not fork-safe) that never touch an accelerator
(`JAX_PLATFORMS=cpu` in their environment). They ignore SIGINT and SIGTERM (the trainer, which
gets them too, stops its workers when it is done: closing the iterator, or at exit), and stop
by themselves when the trainer's process is gone, so an interrupted or killed run leaves no
process behind. An exception in a worker ends the iterator with that exception (its worker
traceback as a note), every worker stopped.

This module knows nothing of the pipeline: a worker's iterator comes from `factory(index,
count, state)` (a picklable callable, e.g. a `functools.partial` of a module-level function;
data/pipeline.py `make_train_iterator` makes it).
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import time
import traceback
import weakref
from multiprocessing import shared_memory
from multiprocessing import util as _mp_util  # noqa: F401  (its exit hook first, ours runs before it)
from typing import Any, Callable, Iterator

import numpy as np

CONTEXT = 'spawn'
_LIVE: weakref.WeakSet = weakref.WeakSet()  # iterators with workers, closed at exit
_POLL_S = 0.2
_STOP_S = 10.0  # a worker gets this long to stop before it is killed


@atexit.register  # runs before multiprocessing's exit hook (registered earlier: `_mp_util`),
def _close_all() -> None:  # which would wait forever on workers that ignore SIGTERM
  for it in list(_LIVE):
    it.close()


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


def _layout(batch):
  """((key, shape, dtype, offset), ...), bytes: where a flat dict of arrays goes in a slot."""
  if not isinstance(batch, dict) or not all(isinstance(v, np.ndarray) for v in batch.values()):
    return None
  out, off = [], 0
  for k, v in batch.items():
    out.append((k, v.shape, v.dtype.str, off))
    off += -(-v.nbytes // 64) * 64
  return tuple(out), off


def _shm_free() -> float:
  """Bytes free for shared memory (/dev/shm; unbounded where there is none)."""
  try:
    return shutil.disk_usage('/dev/shm').free
  except OSError:
    return float('inf')


class _Ring:
  """A worker's batches written into `slots` slots of one shared memory block (made on the
  first batch, sized by it): only (name, offset, layout) goes through the queue, not the
  pickled arrays. `free` counts the slots the trainer has copied out."""

  def __init__(self, free, slots: int):
    self.free, self.slots = free, slots
    self.shm, self.layout, self.n = None, None, 0

  def pack(self, batch, stop, parent):
    """-> ('shm', (name, offset, layout)), or ('ok', batch) for a batch of another layout,
    or None when stopping."""
    lay = _layout(batch)
    if lay is None or (self.layout is not None and lay != self.layout):
      return 'ok', batch
    if self.shm is None:
      self.layout, size = lay, max(lay[1], 1) * self.slots
      if size > _shm_free():  # (a full /dev/shm would end the worker with SIGBUS)
        self.layout = ()  # through the queue, pickled
        return 'ok', batch
      self.shm = shared_memory.SharedMemory(create=True, size=size)
    while not self.free.acquire(timeout=_POLL_S):
      if stop.is_set() or (parent is not None and not parent.is_alive()):
        return None
    base = (self.n % self.slots) * self.layout[1]
    self.n += 1
    for k, shape, dtype, off in self.layout[0]:
      np.ndarray(shape, dtype, self.shm.buf, base + off)[...] = batch[k]
    return 'shm', (self.shm.name, base, self.layout[0])

  def close(self):
    if self.shm is not None:
      self.shm.close()
      self.shm.unlink()


def _worker_main(factory, index: int, count: int, state, q, stop, free, slots: int) -> None:
  """A worker: ('ready',), then ('shm' or 'ok', batch, state, stats delta) per batch, or
  ('error', ...)."""
  # Ctrl-C or a job's SIGTERM reaches the trainer too, which stops us when it is done (e.g.
  # after its preemption checkpoint); we stop by ourselves when it is gone
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = mp.parent_process()
  sent = False
  ring = _Ring(free, slots)
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
      packed = ring.pack(batch, stop, parent)
      if packed is None or not _put(q, (*packed, it.get_state(), delta), stop, parent):
        return
  except BaseException as e:  # pylint: disable=broad-except
    try:
      pickle.dumps(e)
      exc = e
    except Exception:  # pylint: disable=broad-except
      exc = None
    sent = _put(q, ('error', exc, f'{type(e).__name__}: {e}', traceback.format_exc()), stop,
                parent)
    # the batches queued before the error may still be read: keep their slots until stopped
    while sent and not stop.wait(_POLL_S) and (parent is None or parent.is_alive()):
      pass
  finally:
    if not sent:  # stopping: what is still queued is dropped, so the process can exit
      q.cancel_join_thread()
    ring.close()


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
    self._free: list = []  # per worker: the semaphore of its free shared memory slots
    self._shms: dict = {}  # name -> this process's attachment
    self._stop = None
    self._states: list = [None] * self.workers
    if state is not None:
      self.set_state(state)

  # -- state ---------------------------------------------------------------------------------
  def _meta(self) -> dict[str, int]:
    return {'workers': self.workers, 'process_index': self.process_index,
            'process_count': self.process_count}

  def get_state(self) -> dict[str, Any]:
    """The state after the last batch returned: each worker's (None: not started yet), the
    entries they all share (seed, corpus size, ...) stored once in `worker_common` so the
    state stays small (a checkpoint holds a few KB per host)."""
    started = [s for s in self._states if s is not None]
    common = ({k: v for k, v in started[0].items() if all(k in s and s[k] == v for s in started)}
              if len(started) == len(self._states) and started else {})
    return {**self._meta(), 'worker_common': common,
            'worker_states': [None if s is None else
                              {k: v for k, v in s.items() if k not in common}
                              for s in self._states]}

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
    common = state.get('worker_common') or {}
    states = [None if s is None else {**common, **s} for s in state.get('worker_states') or []]
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
    slots = self.prefetch + 1
    _LIVE.add(self)
    self._free = [ctx.Semaphore(slots) for _ in range(self.workers)]
    count = self.process_count * self.workers
    try:
      with _worker_env():
        for w in range(self.workers):
          index = self.process_index * self.workers + w
          p = ctx.Process(target=_worker_main, name=f'notoklm-data-{w}', daemon=True,
                          args=(self.factory, index, count, self._states[w], self._queues[w],
                                self._stop, self._free[w], slots))
          try:
            p.start()
          except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise ValueError(
                f'data.workers={self.workers}: the data pipeline (its batch transform '
                f'{type(self.transform).__name__}) cannot be sent to a worker process '
                f'({type(e).__name__}: {e}); use data.workers=0') from e
          self._procs.append(p)
      for w in range(self.workers):
        self._get(w, ('ready',))
    except BaseException:
      self.close()
      raise

  def _get(self, w: int, want: tuple):
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
    assert kind in want, (kind, want)
    return kind, a, b, c

  def __iter__(self) -> Iterator[dict]:
    return self

  def _views(self, payload) -> dict[str, np.ndarray]:
    name, base, layout = payload
    shm = self._shms.get(name)
    if shm is None:
      shm = self._shms[name] = shared_memory.SharedMemory(name)
    return {k: np.ndarray(shape, dtype, shm.buf, base + off) for k, shape, dtype, off in layout}

  def __next__(self) -> dict:
    if not self._procs:
      self._start()
    got = [self._get(w, ('ok', 'shm')) for w in range(self.workers)]
    parts = [self._views(payload) if kind == 'shm' else payload for kind, payload, _, _ in got]
    batch = _concat(parts)  # a copy: the slots are free again
    del parts
    for w, (kind, _, state, delta) in enumerate(got):
      if kind == 'shm':
        self._free[w].release()
      _add(getattr(self.transform, 'stats', None), delta['transform'],
           getattr(self.transform, '_lock', None))
      _add(getattr(self.source, 'stats', None), delta['source'])
    self._states = [state for _, _, state, _ in got]
    return batch

  def close(self) -> None:
    """Stops the workers (the iterator can be revived with `set_state`)."""
    if self._stop is not None:
      self._stop.set()
    procs, queues = self._procs, self._queues
    self._procs, self._queues = [], []
    deadline = time.monotonic() + _STOP_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
      for q in queues:  # a worker blocked on a full pipe needs its queue read to exit
        try:
          while True:
            q.get_nowait()
        except (queue.Empty, OSError, ValueError, EOFError):
          pass
      for p in procs:
        p.join(0.02)
    killed = False
    for p in procs:
      if p.is_alive():  # (SIGTERM is ignored by a worker)
        killed = True
        p.kill()
        p.join()
    for q in queues:
      q.close()
      q.cancel_join_thread()
    shms, self._shms, self._free = self._shms, {}, []
    for shm in shms.values():
      try:
        shm.close()
      except BufferError:  # a view still referenced: freed with it
        pass
      if killed:  # a worker that did not stop by itself has not removed its block
        try:
          shm.unlink()
        except FileNotFoundError:
          pass
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
