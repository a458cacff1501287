"""Packing documents into fixed-length rows, and per-host train / eval iterators.

A document becomes `d = [bos] + encode(text) + [eos]`, i.e. the (input, target) pairs
`(d[:-1], d[1:])`. Pairs are packed greedily into rows of `seq_len`: a row is filled from the
current document at the current offset; a document that does not fit is split and its rest
starts the next row. Every piece is a segment of its own (ids 1, 2, ... within a row; 0 is
padding) with positions from 0, so no attention crosses documents (or pieces).

Batches are dicts of host-local numpy arrays, `B` rows of `T` tokens:
  inputs, targets, segment_ids, positions: int32[B, T]; weights: float32[B, T] (1 on real
  targets, 0 on padding); target_bytes: int32[B, T] = encoder.token_bytes[targets] * weights.

`TrainIterator` is infinite: epoch e visits `default_rng([seed, e]).permutation(N)`, each host
taking the permuted positions i with i % process_count == process_index. Its state (epoch,
cursor in the host's shard, pair offset in the current document) is a small JSON-able dict;
`get_state()` is the state after the last batch returned, and an iterator built from it
continues with exactly the batch the uninterrupted one would have produced.

`eval_batches` packs the whole split (documents in order) into one global stream of rows that
does not depend on the number of hosts; global batch g is rows [g*P*B, (g+1)*P*B) and host p
gets its B rows [p*B, (p+1)*B) of it (weight-0 rows where the stream ended). All hosts therefore
yield the same number of batches, and the metrics do not depend on the host count.
"""
from __future__ import annotations

import abc
import collections
import functools
import queue
import threading
from typing import Any, Iterator

import numpy as np

from data import corpus, encoders, perturb

KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights', 'target_bytes')


def empty_batch(batch: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  b = {k: np.zeros((batch, seq_len), np.int32) for k in KEYS}
  b['weights'] = np.zeros((batch, seq_len), np.float32)
  if pad_id:
    b['inputs'][:] = pad_id
    b['targets'][:] = pad_id
  return b


def pad_rows(x, rows: int, fill=None):
  """`x` (an array, or a dict / tuple of arrays) padded along axis 0 to `rows` rows with `fill`
  (a row of the same structure, repeated; default zeros): the one way every fixed-shape batch
  (jitted evaluation, decoding, embedding) is padded here."""
  if isinstance(x, dict):
    return {k: pad_rows(v, rows, None if fill is None else fill[k]) for k, v in x.items()}
  if isinstance(x, tuple):
    return tuple(pad_rows(v, rows, None if fill is None else f)
                 for v, f in zip(x, fill or (None,) * len(x)))
  x = np.asarray(x)
  if len(x) > rows:
    raise ValueError(f'{len(x)} rows do not fit a batch of {rows}')
  if len(x) == rows:
    return x
  row = np.zeros(x.shape[1:], x.dtype) if fill is None else np.asarray(fill, x.dtype)
  return np.concatenate([x, np.broadcast_to(row, (rows - len(x),) + x.shape[1:])])


def _rows(x, sl):
  if isinstance(x, dict):
    return {k: _rows(v, sl) for k, v in x.items()}
  if isinstance(x, tuple):
    return tuple(_rows(v, sl) for v in x)
  return None if x is None else np.asarray(x)[sl]


def _concat(parts):
  first = parts[0]
  if isinstance(first, dict):
    return {k: _concat([p[k] for p in parts]) for k in first}
  if isinstance(first, tuple):
    return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
  return None if first is None else np.concatenate(parts)


def map_in_batches(fn, inputs, batch: int, fill=None):
  """`fn` over `inputs` (an array, or a dict / tuple of arrays, N rows) in chunks of exactly
  `batch` rows (the last one padded by `pad_rows`), so a jitted `fn` compiles once; returns
  its outputs (arrays, or dicts / tuples of arrays, or None) for the N real rows, as numpy."""
  leaf = inputs
  while isinstance(leaf, (dict, tuple)):
    leaf = next(iter(leaf.values())) if isinstance(leaf, dict) else leaf[0]
  n = len(leaf)
  parts = []
  for s in range(0, n, batch):
    m = min(batch, n - s)
    out = fn(pad_rows(_rows(inputs, slice(s, s + m)), batch, fill))
    parts.append(_rows(out, slice(0, m)))
  if not parts:
    raise ValueError('map_in_batches: no rows')
  return _concat(parts)


def document_tokens(encoder: encoders.Encoder, text: str,
                    ids: np.ndarray | None = None) -> np.ndarray:
  """`[bos] + encode(text) + [eos]` as int32 (`ids`: `encode(text)` if already known)."""
  ids = encoder.encode(text) if ids is None else ids
  out = np.empty(len(ids) + 2, np.int32)
  out[0], out[1:-1], out[-1] = encoder.bos_id, ids, encoder.eos_id
  return out


def tokenize_documents(encoder: encoders.Encoder, texts: list[str]) -> list[np.ndarray]:
  """`document_tokens` of each text, encoded together (the encoder's thread pool)."""
  return [document_tokens(encoder, t, ids) for t, ids in zip(texts, encoder.encode_batch(texts))]


class _Stream(abc.ABC):
  """A cursor over documents: `tokens()` is the current document (None at the end)."""
  offset: int

  @abc.abstractmethod
  def tokens(self) -> np.ndarray | None:
    """`[bos] + ids + [eos]` of the current document, or None when exhausted."""

  @abc.abstractmethod
  def consume(self, n: int) -> None:
    """Takes `n` pairs of the current document, moving on when it is used up."""


def fill_row(batch: dict[str, np.ndarray], r: int, stream: _Stream) -> int:
  """Packs row `r` of `batch` from `stream`; returns the number of pairs written."""
  seq_len = batch['inputs'].shape[1]
  t = seg = 0
  while t < seq_len:
    d = stream.tokens()
    if d is None:
      break
    o = stream.offset
    take = min(len(d) - 1 - o, seq_len - t)
    seg += 1
    batch['inputs'][r, t:t + take] = d[o:o + take]
    batch['targets'][r, t:t + take] = d[o + 1:o + 1 + take]
    batch['segment_ids'][r, t:t + take] = seg
    batch['positions'][r, t:t + take] = np.arange(take, dtype=np.int32)
    batch['weights'][r, t:t + take] = 1.0
    t += take
    stream.consume(take)
  return t


def _finish(batch: dict[str, np.ndarray], encoder: encoders.Encoder) -> dict[str, np.ndarray]:
  batch['target_bytes'] = (encoder.token_bytes[batch['targets']] *
                           (batch['weights'] > 0)).astype(np.int32)
  return batch


def pack(docs_tokens, seq_len: int) -> dict[str, np.ndarray]:
  """Packs a finite list of `document_tokens` arrays into as many rows as needed (tests)."""
  stream = _ListStream(list(docs_tokens))
  rows = []
  while stream.tokens() is not None:
    b = empty_batch(1, seq_len)
    fill_row(b, 0, stream)
    rows.append(b)
  if not rows:
    return empty_batch(0, seq_len)
  return {k: np.concatenate([b[k] for b in rows]) for k in KEYS}


class _ListStream(_Stream):

  def __init__(self, docs: list[np.ndarray]):
    self.docs, self.i, self.offset = docs, 0, 0

  def tokens(self):
    return self.docs[self.i] if self.i < len(self.docs) else None

  def consume(self, n):
    self.offset += n
    if self.offset >= len(self.docs[self.i]) - 1:
      self.i, self.offset = self.i + 1, 0


class _TrainStream(_Stream):
  """Endless epochs over this host's shard of a per-epoch permutation."""

  def __init__(self, source, encoder, seed, process_index, process_count, shuffle, state,
               lookahead: int = 16):
    self.source, self.encoder = source, encoder
    self.seed, self.shuffle = int(seed), shuffle
    self.process_index, self.process_count = process_index, process_count
    self.epoch, self.cursor, self.offset = state['epoch'], state['cursor'], state['offset']
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lookahead = lookahead
    self._shard_epoch, self._shard = -1, None

  def shard(self) -> np.ndarray:
    if self._shard_epoch != self.epoch:
      n = len(self.source)
      order = (np.random.default_rng([self.seed, self.epoch]).permutation(n)
               if self.shuffle else np.arange(n))
      self._shard, self._shard_epoch = order[self.process_index::self.process_count], self.epoch
    return self._shard

  def tokens(self):
    doc = int(self.shard()[self.cursor])
    tokens = self._cache.get(doc)
    if tokens is None:  # encode this and the next documents together (thread pool)
      docs = [int(d) for d in self.shard()[self.cursor:self.cursor + self._lookahead]]
      texts = [self.source[d] for d in docs]
      for d, text, ids in zip(docs, texts, self.encoder.encode_batch(texts)):
        self._cache[d] = document_tokens(self.encoder, text, ids)
        self._cache.move_to_end(d)
      tokens = self._cache[doc]
      while len(self._cache) > 2 * self._lookahead:
        self._cache.popitem(last=False)
    return tokens

  def consume(self, n):
    self.offset += n
    if self.offset >= len(self.tokens()) - 1:
      self.offset = 0
      self.cursor += 1
      if self.cursor >= len(self.shard()):
        self.epoch, self.cursor = self.epoch + 1, 0

  def state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'cursor': self.cursor, 'offset': self.offset}


def _make_batch(stream, encoder, local_batch, seq_len, transform=None):
  """One batch from `stream` (then `transform`ed) and the stream's state after it."""
  batch = empty_batch(local_batch, seq_len, encoder.pad_id)
  for r in range(local_batch):
    fill_row(batch, r, stream)
  batch = _finish(batch, encoder)
  return (transform(batch) if transform else batch), stream.state()


def put_unless_stopped(q: queue.Queue, item, stop: threading.Event) -> None:
  """Puts `item` into the bounded queue `q`, giving up once `stop` is set."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return
    except queue.Full:
      pass


def stop_thread(thread: threading.Thread, stop: threading.Event, q: queue.Queue) -> None:
  """Stops a prefetch thread that fills `q`: sets `stop` and drains `q` until it exits."""
  stop.set()
  while thread.is_alive():
    try:
      q.get(timeout=0.05)
    except queue.Empty:
      pass
  thread.join()


def _produce(stream, encoder, local_batch, seq_len, q, stop, transform=None):
  """Prefetch thread body: batches (or the exception that stopped it) into `q`."""
  try:
    while not stop.is_set():
      put_unless_stopped(q, ('ok', *_make_batch(stream, encoder, local_batch, seq_len, transform)), stop)
  except BaseException as e:  # pylint: disable=broad-except
    put_unless_stopped(q, ('error', e, None), stop)


class TrainIterator:
  """Infinite, checkpointable, per-host iterator of packed training batches."""

  def __init__(self, source: corpus.DocSource, encoder: encoders.Encoder, seq_len: int,
               local_batch: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, prefetch: int = 2, state: dict[str, Any] | None = None,
               transform=None):
    """`transform(batch) -> batch` runs on the prefetch thread (e.g. HAT's word fields)."""
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.transform = transform
    self.streamed = bool(getattr(source, 'streamed', False))  # data/shards.py
    if not self.streamed and len(source) < process_count:
      raise ValueError(f'{source.name} has {len(source)} documents, fewer than the '
                       f'{process_count} hosts that shard it')
    self.source, self.encoder = source, encoder
    self.seq_len, self.local_batch = int(seq_len), int(local_batch)
    self.seed, self.shuffle, self.prefetch = int(seed), bool(shuffle), int(prefetch)
    self.process_index, self.process_count = process_index, process_count
    self._thread = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self.set_state(state or ({} if self.streamed else {'epoch': 0, 'cursor': 0, 'offset': 0}))

  def _meta(self) -> dict[str, Any]:
    # What gives (epoch, cursor, offset) its meaning; seq_len and batch size may change.
    size = (self.source.state_meta(self.process_count) if self.streamed
            else {'num_docs': len(self.source)})
    return {'seed': self.seed, 'shuffle': self.shuffle, **size,
            'process_index': self.process_index, 'process_count': self.process_count}

  def get_state(self) -> dict[str, Any]:
    """The state after the last batch returned by `__next__` (JSON-able)."""
    return {**self._state, **self._meta()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes so that the next batch is the one that followed `state`."""
    if state.get('workers'):  # data/host_workers.py
      raise ValueError(f'the iterator state was written with data.workers={state["workers"]}, '
                       'this iterator runs in the trainer (data.workers=0): resume with '
                       f'--config.data.workers={state["workers"]}')
    meta = self._meta()
    bad = {k: (state[k], v) for k, v in meta.items() if k in state and state[k] != v}
    if bad:
      raise ValueError(f'iterator state does not match this iterator (saved, now): {bad}')
    self.close()
    if self.streamed:  # a streamed source makes its own stream (data/shards.py)
      self._stream = self.source.train_stream(
          functools.partial(tokenize_documents, self.encoder), self.seed, self.process_index,
          self.process_count, self.shuffle, {k: v for k, v in state.items() if k not in meta})
      self._state = self._stream.state()
    else:
      self._state = {k: int(state[k]) for k in ('epoch', 'cursor', 'offset')}
      self._stream = _TrainStream(self.source, self.encoder, self.seed, self.process_index,
                                  self.process_count, self.shuffle, self._state)
      if self._state['cursor'] >= len(self._stream.shard()):
        raise ValueError(f'iterator state cursor {self._state["cursor"]} beyond the shard')
    if self.prefetch > 0:
      self._stop = threading.Event()
      self._queue = queue.Queue(maxsize=self.prefetch)
      # The thread gets no reference to `self`, so a dropped iterator is collected and closed.
      args = (self._stream, self.encoder, self.local_batch, self.seq_len, self._queue, self._stop,
              self.transform)
      self._thread = threading.Thread(target=_produce, args=args, name='TrainIterator',
                                      daemon=True)
      self._thread.start()

  def _make(self):
    return _make_batch(self._stream, self.encoder, self.local_batch, self.seq_len,
                       self.transform)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._thread is None:
      batch, state = self._make()
    else:
      kind, batch, state = self._queue.get()
      if kind == 'error':
        self._thread = None
        raise batch
    self._state = state
    return batch

  def close(self) -> None:
    """Stops the prefetch thread (the iterator can be revived with `set_state`)."""
    if self._thread is not None:
      stop_thread(self._thread, self._stop, self._queue)
      self._thread = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def token_counts(source: corpus.DocSource, encoder: encoders.Encoder,
                 max_chars: int = 0) -> np.ndarray:
  """int64 [vocab_size]: how often each id occurs in the documents `[bos] + ids + [eos]` of
  `source`, read in order up to `max_chars` characters (0: every document)."""
  counts = np.zeros(encoder.vocab_size, np.int64)
  total = 0
  for i in range(len(source)):
    text = source[i]
    if max_chars and total + len(text) > max_chars and total > 0:
      break
    total += len(text)
    counts += np.bincount(document_tokens(encoder, text), minlength=encoder.vocab_size)
  return counts


class _EvalStream(_Stream):

  def __init__(self, source, encoder):
    self.source, self.encoder, self.i, self.offset = source, encoder, 0, 0
    self._doc = None
    # a streamed source (data/shards.py) is read in order, as far as the batches need
    self._texts = (iter(source) if getattr(source, 'streamed', False)
                   else (source[i] for i in range(len(source))))

  def tokens(self):
    if self._doc is None:
      text = next(self._texts, None)
      if text is not None:
        self._doc = document_tokens(self.encoder, text)
    return self._doc

  def consume(self, n):
    self.offset += n
    if self.offset >= len(self._doc) - 1:
      self.i, self.offset, self._doc = self.i + 1, 0, None


class EvalBatches:
  """Re-iterable deterministic eval batches of one host (see module doc)."""

  def __init__(self, source, encoder, seq_len, local_batch, process_index=0, process_count=1,
               max_batches=0):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.source, self.encoder = source, encoder
    self.seq_len, self.local_batch, self.max_batches = seq_len, local_batch, max_batches
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    stream = _EvalStream(self.source, self.encoder)
    scratch = empty_batch(1, self.seq_len)
    g = 0
    while stream.tokens() is not None and (self.max_batches <= 0 or g < self.max_batches):
      batch = empty_batch(self.local_batch, self.seq_len, self.encoder.pad_id)
      for host in range(self.process_count):
        for r in range(self.local_batch):
          if host == self.process_index:
            fill_row(batch, r, stream)
          else:  # other hosts' rows: walk the stream without keeping them
            fill_row(scratch, 0, stream)
      yield _finish(batch, self.encoder)
      g += 1


def eval_batches(source: corpus.DocSource, encoder: encoders.Encoder, seq_len: int,
                 local_batch: int, process_index: int = 0, process_count: int = 1,
                 max_batches: int = 0) -> EvalBatches:
  """The host's batches of the whole split (or the first `max_batches` global batches)."""
  return EvalBatches(source, encoder, seq_len, local_batch, process_index, process_count,
                     max_batches)


def _hosts(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def local_batch_size(cfg, process_count: int) -> int:
  if cfg.train.batch_size % process_count:
    raise ValueError(f'train.batch_size {cfg.train.batch_size} is not divisible by the '
                     f'{process_count} processes')
  return cfg.train.batch_size // process_count


def make_train_iterator(cfg, encoder: encoders.Encoder, process_index: int | None = None,
                        process_count: int | None = None,
                        state: dict[str, Any] | None = None, transform=None):
  """The host's train iterator from the full config (host defaults: jax.process_index/count):
  a TrainIterator, or with `data.workers` = W >= 1 a host_workers.WorkerIterator whose W
  processes each run one (virtual host `process_index * W + w` of `process_count * W`, its
  `local_batch / W` rows; `encoder` and `transform` are pickled into each)."""
  process_index, process_count = _hosts(process_index, process_count)
  source = corpus.get_source(cfg.data, cfg.data.train_split)
  local_batch = local_batch_size(cfg, process_count)
  workers = int(cfg.data.workers)
  if not workers:
    return TrainIterator(source, encoder, cfg.data.seq_len, local_batch, seed=cfg.seed,
                         process_index=process_index, process_count=process_count,
                         shuffle=cfg.data.shuffle, prefetch=cfg.data.prefetch, state=state,
                         transform=transform)
  from data import host_workers  # pylint: disable=import-outside-toplevel
  if local_batch % workers:
    raise ValueError(f'data.workers={workers}: a host builds {local_batch} rows per batch '
                     f'(train.batch_size {cfg.train.batch_size} / {process_count} processes), '
                     'which the workers share equally: data.workers must divide it')
  factory = functools.partial(_worker_iterator, cfg.data, cfg.data.train_split, encoder,
                              local_batch // workers, cfg.seed, transform)
  return host_workers.WorkerIterator(factory, workers, process_index, process_count,
                                     prefetch=cfg.data.prefetch, state=state, source=source,
                                     transform=transform)


def _worker_iterator(cfg_data, split: str, encoder: encoders.Encoder, rows: int, seed: int,
                     transform, process_index: int, process_count: int,
                     state: dict[str, Any] | None) -> TrainIterator:
  """What a data worker runs (data/host_workers.py): the TrainIterator of its virtual host,
  without a prefetch thread (the worker process is the prefetch)."""
  source = corpus.get_source(cfg_data, split)
  return TrainIterator(source, encoder, cfg_data.seq_len, rows, seed=seed,
                       process_index=process_index, process_count=process_count,
                       shuffle=cfg_data.shuffle, prefetch=0, state=state, transform=transform)


def make_eval_batches(cfg, encoder: encoders.Encoder, process_index: int | None = None,
                      process_count: int | None = None, max_batches: int | None = None,
                      perturbation: str | None = None, transform=None) -> list:
  """This host's eval batches of `data.eval_split` as a list: `max_batches` global batches
  (default `train.eval_batches`; 0: the whole split), the text optionally perturbed
  (`data.perturb`, with `eval.noise_frac` / `eval.noise_seed`) and each batch `transform`ed."""
  process_index, process_count = _hosts(process_index, process_count)
  source = corpus.get_source(cfg.data, cfg.data.eval_split)
  if perturbation:
    source = perturb.PerturbedSource(source, perturbation, cfg.eval.noise_frac,
                                     cfg.eval.noise_seed)
  if max_batches is None:
    max_batches = cfg.train.get('eval_batches', 0)
  batches = eval_batches(source, encoder, cfg.data.seq_len, local_batch_size(cfg, process_count),
                         process_index, process_count, max_batches)
  return [transform(b) if transform else b for b in batches]
