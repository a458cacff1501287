"""Sharded file corpora streamed from a local disk or a bucket: `data.source='shards:GLOB[,GLOB...]'`.

A pattern is a local path or an fsspec URL (`gs://bucket/corpus/*.parquet`; `s3://` needs the
`s3fs` package); a pattern without glob characters that names a directory means every file
under it with a known suffix. Formats, by suffix:

* `.parquet` -- the string column `data.text_key`, read one row group at a time (in record
  batches of `_BATCH_ROWS` rows; only that column).
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst` -- the string field `data.text_key` of each JSON object
  line (the `text:` rules of data/corpus.py). `.zst` needs the `zstandard` package.
* `.txt`, `.txt.gz`, `.txt.zst` -- documents by `data.txt_split` (the `text:` rules).

Documents longer than `data.max_doc_chars` are cut into pieces (counted), as for `text:`.
Nothing is prepared or copied: every host streams its own share.

Sharing (`ShardSource.train_stream`): the unit of work is a file, or a parquet row group when
there are fewer files than processes. Epoch e permutes the units with
`default_rng([seed, e])` (identity without `data.shuffle`) and process p reads units p, p+P,
p+2P, ... of that order, so the processes' shares are disjoint, cover the corpus and change
every epoch. Inside a share, documents are shuffled in consecutive chunks of
`data.shuffle_buffer` documents (each chunk permuted by a seed derived from its start), so at
most one chunk of texts is held.

Position: (epoch, unit, segment, item) of the chunk's start -- segment is the parquet row
group, item the number of usable documents before it in that segment -- plus the document's
index in the chunk and the token offset in it. Resuming re-reads that chunk (at most one row
group, or a jsonl/txt file up to the chunk, is read again) and continues on the exact next
batch; the state is checked against the seed, shuffle, process layout, buffer and a digest of
the matched files (paths, sizes, generations / mtimes).

Validation: `data.eval_source` (patterns, as after `shards:`) read whole and in order, or, when
it is empty, the documents whose stable hash (sha1 of the text) falls below
`HELD_OUT_FRACTION`, which the training stream never yields.

Bad input (ValueError, i.e. one message and exit 1 from launch.py, unless said otherwise):
a pattern matching nothing; a matched file with an unknown suffix; a parquet file without the
text column, or whose text column is not a string column (mixed schemas: the check runs when a
file is opened, and on the first file at start); fewer units than processes; a share without a
single document in a whole epoch; access denied or no credentials for a bucket (the message
names the bucket and how to authenticate); `.zst` without `zstandard`. Counted skips, each
with a warning on stderr and a count in `stats` (the run's data stats): a corrupt or truncated
shard (`skipped_corrupt_shards`: its documents from the damage on are dropped; the rest of the
corpus goes on), a shard without a usable document (`shards_without_documents`), and the
per-record skips of the `text:` rules (`skipped_*`).
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import importlib.util
import sys
import zlib
from typing import Any, Callable, Iterator

import numpy as np

HELD_OUT_FRACTION = 0.02
_BATCH_ROWS = 1024
_GLOB_CHARS = '*?['
_FORMATS = (('.parquet', 'parquet', ''), ('.jsonl.gz', 'jsonl', 'gz'),
            ('.jsonl.zst', 'jsonl', 'zst'), ('.jsonl', 'jsonl', ''), ('.txt.gz', 'txt', 'gz'),
            ('.txt.zst', 'txt', 'zst'), ('.txt', 'txt', ''))


def _format(path: str) -> tuple[str, str] | None:
  for suffix, fmt, comp in _FORMATS:
    if path.endswith(suffix):
      return fmt, comp
  return None


def _bucket_of(url: str) -> str:
  proto, _, rest = url.partition('://')
  return f'{proto}://{rest.split("/")[0]}' if rest else url


def _auth_help(url: str) -> str:
  if url.startswith(('gs://', 'gcs://')):
    return ('authenticate with `gcloud auth application-default login`, or set '
            'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file; on a TPU VM / GCE '
            'the VM\'s service account needs storage.objects.list and storage.objects.get on '
            'the bucket')
  if url.startswith('s3://'):
    return 'set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY'
  return 'check the permissions of the path'


def _is_auth_error(e: BaseException) -> bool:
  names = {t.__name__ for t in type(e).__mro__}
  if names & {'PermissionError', 'DefaultCredentialsError', 'RefreshError',
              'NoCredentialsError', 'TransportError'}:
    return True
  code = getattr(e, 'code', None) or getattr(e, 'status', None)
  text = str(e).lower()
  return code in (401, 403) or 'credential' in text or 'unauthorized' in text or (
      'forbidden' in text)


def _access_error(url: str, e: BaseException) -> ValueError:
  return ValueError(f'data.source shards: cannot read {_bucket_of(url)} ({url}): access denied '
                    f'or no credentials ({type(e).__name__}: {str(e)[:200]}); {_auth_help(url)}')


def _filesystem(url: str):
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise ValueError(f'data.source shards: {url}: the file system for this URL is not '
                     f'installed ({e})') from None


class Shard:
  """One matched file: `url` (a local path or PROTO://...), size, version, format."""

  def __init__(self, url: str, size: int, version: str, fmt: str, comp: str):
    self.url, self.size, self.version, self.fmt, self.comp = url, size, version, fmt, comp

  def __repr__(self):
    return f'Shard({self.url!r}, {self.size} bytes)'


def _version(info: dict) -> str:
  for k in ('generation', 'mtime', 'ETag', 'LastModified', 'updated', 'mtime_ns'):
    if info.get(k) is not None:
      return str(info[k])
  return ''


def list_shards(patterns: list[str], what: str = 'data.source') -> list[Shard]:
  """The files matched by `patterns` (sorted, deduplicated); ValueError for a pattern matching
  nothing, an unknown suffix, or a bucket that cannot be listed."""
  if not patterns:
    raise ValueError(f'{what}: shards: needs at least one pattern (shards:DIR/*.parquet)')
  found: dict[str, Shard] = {}
  for pat in patterns:
    fs, path = _filesystem(pat)
    local = 'file' in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
      if any(c in path for c in _GLOB_CHARS):
        infos = fs.glob(path, detail=True)
      elif fs.isdir(path):
        infos = {p: i for p, i in fs.find(path, detail=True).items() if _format(p)}
      else:
        infos = {path: fs.info(path)} if fs.exists(path) else {}
    except Exception as e:  # pylint: disable=broad-except
      if _is_auth_error(e):
        raise _access_error(pat, e) from None
      raise
    files = {p: i for p, i in infos.items() if i.get('type', 'file') != 'directory'}
    if not files:
      raise ValueError(f'{what}: pattern {pat!r} matches no file' + (
          f' ({path})' if local else ''))
    for p, info in sorted(files.items()):
      url = p if local else fs.unstrip_protocol(p)
      kind = _format(url)
      if kind is None:
        raise ValueError(f'{what}: {url} has an unsupported suffix: expected one of '
                         + ', '.join(s for s, _, _ in _FORMATS) + ' (narrow the pattern)')
      if kind[1] == 'zst' and importlib.util.find_spec('zstandard') is None:
        raise ValueError(f'{what}: {url} is zstd-compressed and the zstandard package is not '
                         'installed here: decompress the shards or use .gz')
      found[url] = Shard(url, int(info.get('size') or 0), _version(info), *kind)
  return [found[u] for u in sorted(found)]


def fingerprint_of(shards: list[Shard]) -> dict[str, Any]:
  h = hashlib.sha1()
  for s in shards:
    h.update(f'{s.url}\0{s.size}\0{s.version}\n'.encode())
  return {'files': len(shards), 'bytes': sum(s.size for s in shards), 'sha1': h.hexdigest()}


class _Counting:
  """A binary file object that counts the bytes read into `counts[url]`."""

  def __init__(self, f, url: str, counts: dict):
    self._f, self._url, self._counts = f, url, counts
    counts['objects_opened'][url] += 1

  def read(self, n=-1):
    out = self._f.read(n)
    self._counts['bytes_read'][self._url] += len(out)
    return out

  def readinto(self, b):
    data = self.read(len(b))
    b[:len(data)] = data
    return len(data)

  def __iter__(self):
    while True:
      line = self.readline()
      if not line:
        return
      yield line

  def readline(self, size=-1):
    out = self._f.readline(size)
    self._counts['bytes_read'][self._url] += len(out)
    return out

  def seek(self, *a):
    return self._f.seek(*a)

  def tell(self):
    return self._f.tell()

  def readable(self):
    return True

  def seekable(self):
    return True

  def writable(self):
    return False

  @property
  def closed(self):
    return self._f.closed

  def close(self):
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _corruption_errors() -> tuple:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  errs = [pa.ArrowInvalid, pa.ArrowIOError, EOFError, gzip.BadGzipFile, zlib.error]
  if importlib.util.find_spec('zstandard') is not None:
    import zstandard  # pylint: disable=import-outside-toplevel
    errs.append(zstandard.ZstdError)
  return tuple(errs)


class ShardSource:
  """A streamed document source over sharded files (see the module doc). `split` 'train' or
  the eval split; `__iter__` yields the split's documents in file order (eval, BPE samples);
  `train_stream` is a host's shuffled, endless, resumable stream. No random access."""

  streamed = True

  def __init__(self, patterns: list[str], split: str, *, rules, text_key: str = 'text',
               txt_split: str = 'paragraph', max_doc_chars: int = 100_000,
               eval_patterns: list[str] | None = None, shuffle_buffer: int = 1024,
               train_split: str = 'train'):
    """`rules`: the `text:` reading rules (data/corpus.py: `txt_documents`, `jsonl_documents`,
    `cut`, `stable_bucket`), passed in so that this module imports nothing of data/."""
    if txt_split not in ('file', 'paragraph', 'line'):
      raise ValueError(f"data.txt_split must be 'file', 'paragraph' or 'line', got {txt_split!r}")
    self.rules, self.key, self.txt_split = rules, text_key, txt_split
    self.max_chars, self.shuffle_buffer = int(max_doc_chars), max(1, int(shuffle_buffer))
    self.split = split
    self.is_train = split == train_split
    self.eval_patterns = list(eval_patterns or [])
    # (train files, held-out by hash) or (eval files, all documents)
    if not self.is_train and self.eval_patterns:
      self.shards = list_shards(self.eval_patterns, 'data.eval_source')
      self.held_out = None
    else:
      self.shards = list_shards(patterns)
      self.held_out = None if self.eval_patterns else (not self.is_train)
    fp = fingerprint_of(self.shards)
    self.name = f'shards[{fp["files"]} files, {fp["sha1"][:12]}]/{split}'
    self.counts = {'objects_opened': collections.Counter(), 'bytes_read': collections.Counter()}
    self.stats: dict[str, Any] = {'shard_files': fp['files'], 'shard_bytes': fp['bytes']}
    self._fp = fp
    self._first_checked = False
    self._corrupt = _corruption_errors()

  # -- records --------------------------------------------------------------------------------
  def fingerprint(self) -> dict[str, Any]:
    """What identifies the matched data: file count, total bytes and a sha1 over every file's
    (URL, size, generation or mtime) -- no object is read."""
    return dict(self._fp)

  def fetched(self) -> dict[str, dict[str, int]]:
    """{url: {'opens', 'bytes'}} of what this process has read so far."""
    return {u: {'opens': n, 'bytes': self.counts['bytes_read'][u]}
            for u, n in self.counts['objects_opened'].items()}

  def __len__(self):
    raise TypeError(f'{self.name} is streamed: it has no length or random access (the lm and '
                    'hat families train on shards:; this use needs a text:/tfds: source)')

  def __getitem__(self, i):
    raise ValueError(f'data.source {self.name} is streamed: no random access to documents. '
                     'The lm and hat families (bytes or BPE) train on shards:; for this family '
                     'use a prepared source (text:FILES or tfds:NAME)')

  def __repr__(self):
    return f'ShardSource({self.name!r})'

  # -- reading --------------------------------------------------------------------------------
  def _open(self, shard: Shard):
    fs, path = _filesystem(shard.url)
    try:
      f = _Counting(fs.open(path, 'rb'), shard.url, self.counts)
    except Exception as e:  # pylint: disable=broad-except
      if _is_auth_error(e):
        raise _access_error(shard.url, e) from None
      raise
    if shard.comp == 'gz':
      return gzip.GzipFile(fileobj=f, mode='rb')
    if shard.comp == 'zst':
      import zstandard  # pylint: disable=import-outside-toplevel
      import io  # pylint: disable=import-outside-toplevel
      return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
    return f

  def _parquet(self, shard: Shard):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    f = self._open(shard)
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if self.key not in names:
      f.close()
      raise ValueError(f'{shard.url} has no column {self.key!r} (data.text_key); its columns: '
                       f'{names}')
    t = pf.schema_arrow.field(self.key).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))):
      f.close()
      raise ValueError(f'{shard.url}: column {self.key!r} (data.text_key) is {t}, not a string '
                       'column (mixed schemas: every shard needs the text as a string column)')
    return f, pf

  def row_groups(self, shard: Shard) -> int:
    f, pf = self._parquet(shard)
    try:
      return pf.num_row_groups
    finally:
      f.close()

  def check_first(self) -> None:
    """Opens the first matched file once (fail fast on a wrong text column)."""
    if not self._first_checked and self.shards and self.shards[0].fmt == 'parquet':
      self.row_groups(self.shards[0])
    self._first_checked = True

  def _warn(self, msg: str) -> None:
    print(f'data: {msg}', file=sys.stderr, flush=True)

  def _raw(self, shard: Shard, rg: int, start_seg: int, stats) -> Iterator[tuple[int, str]]:
    """(segment, raw document text) of one unit, from segment `start_seg`."""
    if shard.fmt == 'parquet':
      f, pf = self._parquet(shard)
      with f:
        groups = [rg] if rg >= 0 else range(pf.num_row_groups)
        for g in groups:
          if g < start_seg:
            continue
          for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[g],
                                       columns=[self.key], use_threads=False):
            for v in batch.column(0).to_pylist():
              if not isinstance(v, str):
                stats['skipped_not_string'] += 1
              elif '\x00' in v:
                stats['skipped_nul'] += 1
              else:
                yield g, v
      return
    with self._open(shard) as f:
      if shard.fmt == 'jsonl':
        for text in self.rules.jsonl_documents(f, self.key, stats):
          yield 0, text
      else:
        for _, text in self.rules.txt_documents(f, self.txt_split, stats, self.max_chars):
          yield 0, text

  def _items(self, unit: tuple[int, int], start_seg: int = 0) -> Iterator[tuple[int, str]]:
    """(segment, document piece) of one unit's usable documents of this split."""
    shard = self.shards[unit[0]]
    stats = collections.Counter()
    n = 0
    try:
      for seg, text in self._raw(shard, unit[1], start_seg, stats):
        if not text.strip():
          stats['skipped_empty'] += 1
          continue
        if self.held_out is not None:
          if (self.rules.stable_bucket(text) < HELD_OUT_FRACTION) != self.held_out:
            continue
        for piece in self.rules.cut(text, self.max_chars, stats):
          if piece.strip():
            n += 1
            yield seg, piece
    except self._corrupt as e:
      self.stats['skipped_corrupt_shards'] = self.stats.get('skipped_corrupt_shards', 0) + 1
      self._warn(f'skipped the rest of corrupt or truncated shard {shard.url} '
                 f'({type(e).__name__}: {str(e)[:160]}); '
                 f'{self.stats["skipped_corrupt_shards"]} so far')
    finally:
      for k, v in stats.items():
        self.stats[k] = self.stats.get(k, 0) + v
    if n == 0 and start_seg == 0:
      self.stats['shards_without_documents'] = self.stats.get('shards_without_documents', 0) + 1
      self._warn(f'shard {shard.url} has no usable document of split {self.split!r} '
                 f'(counted in shards_without_documents)')

  def _whole_units(self) -> list[tuple[int, int]]:
    return [(i, -1) for i in range(len(self.shards))]

  def __iter__(self) -> Iterator[str]:
    """The split's documents (pieces), files in sorted order (same on every host)."""
    self.check_first()
    for unit in self._whole_units():
      for _, text in self._items(unit):
        yield text

  def bpe_sample(self, max_bytes: int, seed: int = 0) -> Iterator[str]:
    """A bounded, seeded sample of the training documents for tokenizer training: files in a
    `default_rng(seed)` order, at most max(max_bytes / 16, 1 MiB) UTF-8 bytes from each, until
    `max_bytes` in all (so a sample spans at least 16 files where there are)."""
    per_file = max(max_bytes // 16, 1 << 20)
    total = 0
    for i in np.random.default_rng(seed).permutation(len(self.shards)):
      taken = 0
      for _, text in self._items((int(i), -1)):
        n = len(text.encode('utf-8'))
        if total + n > max_bytes and total > 0:
          return
        total += n
        taken += n
        yield text
        if taken >= per_file:
          break

  # -- training -------------------------------------------------------------------------------
  def units(self, process_count: int) -> list[tuple[int, int]]:
    """Units of work: (file, -1) whole files, or (file, row group) for parquet files when there
    are fewer files than processes."""
    if len(self.shards) >= process_count:
      return self._whole_units()
    out = []
    for i, s in enumerate(self.shards):
      if s.fmt == 'parquet':
        out += [(i, g) for g in range(self.row_groups(s))]
      else:
        out.append((i, -1))
    if len(out) < process_count:
      raise ValueError(f'{self.name}: {len(self.shards)} files ({len(out)} units: files, or '
                       f'parquet row groups) for {process_count} processes; every process needs '
                       'one: write the corpus in at least as many shards (or row groups) as '
                       'processes')
    return out

  def state_meta(self, process_count: int) -> dict[str, Any]:
    return {'units': len(self.units(process_count)), 'shuffle_buffer': self.shuffle_buffer,
            'shards_sha1': self._fp['sha1'][:16]}

  def train_stream(self, tokenize: Callable[[list[str]], list[np.ndarray]], seed: int,
                   process_index: int, process_count: int, shuffle: bool,
                   state: dict[str, Any] | None) -> ShardStream:
    # (no up-front check here: a process opens only the files of its share)
    return ShardStream(self, tokenize, seed, process_index, process_count, shuffle, state)


STATE_KEYS = ('epoch', 'unit', 'segment', 'item', 'index', 'offset')


class ShardStream:
  """A host's endless stream over its share (the `_Stream` protocol of data/pipeline.py:
  `tokens()`, `consume(n)`, `offset`, `state()`)."""

  def __init__(self, source: ShardSource, tokenize, seed, process_index, process_count,
               shuffle, state, lookahead: int = 64):
    self.source, self.tokenize = source, tokenize
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.pi, self.pc = process_index, process_count
    self.all_units = source.units(process_count)
    state = state or {}
    missing = [k for k in STATE_KEYS if k not in state] if state else []
    if missing:
      raise ValueError(f'iterator state lacks {missing}: it is not the state of a shards: source')
    s = {k: int(state.get(k, 0)) for k in STATE_KEYS}
    self.epoch, self.unit, self.segment, self.item = s['epoch'], s['unit'], s['segment'], s['item']
    self.index, self.offset = s['index'], s['offset']
    self._lookahead = lookahead
    self._units_epoch, self._units = -1, []
    self._chunk: list[str] | None = None
    self._order: np.ndarray | None = None
    self._tokens: dict[int, np.ndarray] = {}
    self._next = None      # position after the chunk
    self._reader = None    # (position it is at, generator) kept between chunks
    if self.unit >= len(self.host_units()) and self.unit > 0:
      raise ValueError(f'iterator state unit {self.unit} beyond this process\'s share')

  def host_units(self) -> list[tuple[int, int]]:
    if self._units_epoch != self.epoch:
      n = len(self.all_units)
      order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
               else np.arange(n))
      self._units = [self.all_units[i] for i in order[self.pi::self.pc]]
      self._units_epoch = self.epoch
    return self._units

  def _reader_at(self, unit: int, segment: int, item: int):
    """A generator of (segment, item, text) of unit `unit` of this epoch from the position."""
    if self._reader is not None and self._reader[0] == (self.epoch, unit, segment, item):
      return self._reader[1]

    def gen():
      seg, k = segment, 0
      for s, text in self.source._items(self.host_units()[unit], segment):  # pylint: disable=protected-access
        if s != seg:
          seg, k = s, 0
        if s == segment and k < item:
          k += 1
          continue
        yield s, k, text
        k += 1
    return gen()

  def _load(self) -> None:
    """Reads the chunk starting at (epoch, unit, segment, item)."""
    texts: list[str] = []
    empty_epochs = 0
    while not texts:
      units = self.host_units()
      u, seg, item = self.unit, self.segment, self.item
      epoch_start = (u, seg, item) == (0, 0, 0)
      while len(texts) < self.source.shuffle_buffer and u < len(units):
        reader = self._reader_at(u, seg, item)
        for s, k, text in reader:
          texts.append(text)
          seg, item = s, k + 1
          if len(texts) >= self.source.shuffle_buffer:
            self._reader = ((self.epoch, u, seg, item), reader)
            break
        else:
          u, seg, item = u + 1, 0, 0
          self._reader = None
      if texts:
        self._next = (u, seg, item)
        break
      if epoch_start:
        empty_epochs += 1
        if empty_epochs > 1 or len(units) == 0:
          raise ValueError(f'process {self.pi} of {self.pc}: its share of {self.source.name} '
                           f'({len(units)} units) has no usable document in epoch {self.epoch}')
      self.epoch, self.unit, self.segment, self.item = self.epoch + 1, 0, 0, 0
    self._chunk = texts
    if self.index >= len(texts):
      raise ValueError(f'iterator state index {self.index} beyond its chunk ({len(texts)} '
                       'documents): the data changed')
    rng = np.random.default_rng([self.seed, self.epoch, self.unit, self.segment, self.item,
                                 self.pi, 7])
    self._order = rng.permutation(len(texts)) if self.shuffle else np.arange(len(texts))
    self._tokens = {}

  def tokens(self) -> np.ndarray:
    if self._chunk is None:
      self._load()
    if self.index not in self._tokens:
      idx = list(range(self.index, min(self.index + self._lookahead, len(self._chunk))))
      self._tokens = dict(zip(idx, self.tokenize([self._chunk[self._order[i]] for i in idx])))
    return self._tokens[self.index]

  def consume(self, n: int) -> None:
    self.offset += n
    if self.offset >= len(self.tokens()) - 1:
      self.offset = 0
      self.index += 1
      if self.index >= len(self._chunk):
        self.unit, self.segment, self.item = self._next
        self.index, self._chunk, self._tokens = 0, None, {}
        if self.unit >= len(self.host_units()):
          self.epoch, self.unit, self.segment, self.item = self.epoch + 1, 0, 0, 0
          self._reader = None

  def state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'unit': self.unit, 'segment': self.segment, 'item': self.item,
            'index': self.index, 'offset': self.offset}
