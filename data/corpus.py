"""Document sources: TFDS builders and a random-access `DocSource`.

Four kinds of `data.source`:

* ``'python_docs'`` — an embedded corpus that needs no download, built from text every
  CPython install carries: `pydoc_data.topics`, module docstrings (read with `ast` from
  the source, so no pure-Python module is imported; builtin/extension modules are imported
  for their docstrings, minus a deny-list) and the standard library's own `.py` files
  (tests excluded; sorted paths; capped at `_SOURCE_BYTES_CAP`).
* ``'text:PATH[,PATH...]'`` — local `.txt` / `.jsonl` files, prepared by `LocalText` into a
  config named by a hash of (absolute path, size, mtime) of every file and the reading
  options, so a changed file re-prepares.
* ``'shards:GLOB[,GLOB...]'`` — parquet / jsonl[.gz] / txt shards, local or in a bucket,
  streamed with each host reading its share (data/shards.py; nothing is prepared).
* ``'tfds:NAME[/CONFIG]'`` — any registered TFDS dataset (`tfds:python_docs` included),
  prepared with `file_format='array_record'`, field `data.text_key`.

Splits of the builders we own are fixed by a stable hash (sha1) of a document key:
~2 % validation, with at least one document in each split.

Bad input policy of `LocalText` (every case is counted in `stats`, which are written beside
the prepared dataset as `notoklm_stats.json` and reloaded from the cache):

* missing path -> `FileNotFoundError` naming it; unsupported suffix -> `ValueError`.
* `.txt`: the unit of rejection is the line. Lines that are not valid UTF-8
  (`skipped_invalid_utf8`) and lines containing NUL (`skipped_nul`) are dropped; whitespace-only
  documents are dropped (`skipped_empty`). Files are streamed: a line longer than 1 MiB is read
  in pieces of about 1 MiB (cut at UTF-8 character boundaries; such a line is dropped from its
  first bad piece on), and a document longer than `max_doc_chars` is passed on in parts, so memory stays
  bounded by about 1 MiB plus `max_doc_chars` whatever the file (benchmarks/data_memory.py).
* `.jsonl`: the unit is the record. Lines that are not UTF-8 (`skipped_invalid_utf8`), not JSON
  objects (`skipped_bad_json`), without the field (`skipped_missing_field`), with a non-string
  field (`skipped_not_string`), whose text contains NUL (`skipped_nul`) or is whitespace-only
  (`skipped_empty`) are dropped.
* documents longer than `max_doc_chars` characters are cut into pieces of at most that many
  characters (`docs_cut` documents, `pieces_from_cuts` extra pieces).
* a file (or set of files) yielding no usable document -> `ValueError` naming the file(s); a
  file among others that yields none is counted in `files_without_documents`. Exactly one usable
  document in all -> `ValueError` (a validation split needs a document of its own).

Preparation holds an exclusive file lock in the data dir, so processes sharing a data dir
prepare a dataset once.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import importlib
import json
import logging
import os
import re
import sys
import sysconfig
import warnings
from typing import Any, Iterator

import tensorflow_datasets as tfds

VALIDATION_FRACTION = 0.02
_STATS_FILE = 'notoklm_stats.json'
_SOURCE_BYTES_CAP = 20_000_000
_SKIP_DIRS = {'test', 'tests', 'idle_test', 'idlelib', 'site-packages', 'dist-packages',
              '__pycache__', 'tkinter', 'turtledemo', 'lib-dynload', 'ensurepip'}
_SKIP_MODULES = ('antigravity', 'this', 'idlelib', 'tkinter', '_tkinter', 'turtle',
                 'turtledemo', 'test', 'readline', '_curses', '_curses_panel', 'curses',
                 'lib2to3.tests', '__main__', '__phello__')


def default_data_dir(data_dir: str = '') -> str:
  """`data_dir`, else $NOTOKLM_DATA_DIR, else ~/.cache/notoklm/tfds. A bucket URL is refused
  with the way to use it: TFDS's array_record files are read (by index, by every host) from a
  local path, so a bucket is mounted (gcsfuse) and the mount point given."""
  d = data_dir or os.environ.get('NOTOKLM_DATA_DIR') or '~/.cache/notoklm/tfds'
  if re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', d):
    bucket = d.split('://', 1)[1].split('/', 1)[0]
    raise ValueError(
        f'data.data_dir={d}: TFDS datasets are read from a local path, not a bucket URL. Mount '
        f'the bucket on every host (gcsfuse --implicit-dirs {bucket} /mnt/{bucket}) and set '
        f'data.data_dir to the same folder under /mnt/{bucket}; a dataset prepared there once '
        'is read by index by every host, nothing is copied. (Sharded parquet / jsonl corpora '
        'stream from gs:// directly: data.source=shards:gs://...)')
  return os.path.abspath(os.path.expanduser(d))


def stable_bucket(key: str) -> float:
  """Stable pseudo-uniform value in [0, 1) of a string (sha1; not Python's `hash`)."""
  return int(hashlib.sha1(key.encode('utf-8')).hexdigest()[:12], 16) / float(16**12)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders (not registered itself): no checksums file next to the code.

  TFDS's `code_path` probe needs the `importlib_resources` backport for builders defined in a
  package module; our builders download nothing, so there is no checksums file to look for.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _log_download_bytes(self) -> None:
    # TFDS's line says "Downloading ... Unknown size" even for a local file: say what happens
    print(f'preparing {self.name} from its source into {self.data_dir} (once; later runs '
          'reuse it)', flush=True)

  def _log_download_done(self) -> None:
    pass


def _features():
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'name': tfds.features.Text()})


class _SplitPlan:
  """Hash split with at least one document per split (needs one pre-scan of the keys).

  `fraction`: the documents whose stable hash falls below it are validation. `min_bytes` (needs
  (key, bytes) pairs): while the validation documents hold fewer bytes, the next documents by
  hash join them (always leaving one for training). Every choice depends only on the keys and
  sizes, so it is the same on every host and every run over the same files."""

  def __init__(self, keys: Iterator, fraction: float = VALIDATION_FRACTION, min_bytes: int = 0):
    self.fraction = float(fraction)
    self.n = self.n_val = 0  # distinct keys (pieces of a document share its key, in a row)
    sizes: dict[str, int] = {}
    lo = hi = prev = None
    for item in keys:
      k, size = item if isinstance(item, tuple) else (item, 0)
      if min_bytes > 0:
        sizes[k] = sizes.get(k, 0) + size
      if k == prev:
        continue
      prev = k
      b = stable_bucket(k)
      self.n += 1
      self.n_val += b < self.fraction
      lo = (b, k) if lo is None or (b, k) < lo else lo
      hi = (b, k) if hi is None or (b, k) > hi else hi
    self.force_val = lo[1] if self.n >= 2 and self.n_val == 0 else None
    self.force_train = hi[1] if self.n >= 2 and self.n_val == self.n else None
    self.extra_val: set[str] = set()
    if min_bytes > 0 and self.n >= 2:
      order = sorted(sizes, key=lambda k: (stable_bucket(k), k))
      val = [k for k in order if self.split_of(k) == 'validation']
      have = sum(sizes[k] for k in val)
      for k in order[len(val):-1]:  # by hash, never the last one (training keeps a document)
        if have >= min_bytes:
          break
        self.extra_val.add(k)
        have += sizes[k]
      self.n_val = len(val) + len(self.extra_val)

  def split_of(self, key: str) -> str:
    if key == self.force_val or key in getattr(self, 'extra_val', ()):
      return 'validation'
    if key == self.force_train:
      return 'train'
    return 'validation' if stable_bucket(key) < self.fraction else 'train'


def _cut(text: str, max_chars: int, stats: collections.Counter) -> list[str]:
  if max_chars <= 0 or len(text) <= max_chars:
    return [text]
  pieces = [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
  stats['docs_cut'] += 1
  stats['pieces_from_cuts'] += len(pieces) - 1
  return pieces


def _write_stats(path: str, stats: dict[str, int]) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(dict(sorted(stats.items())), f, indent=1)
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Embedded corpus.


def _stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def _stdlib_py_files() -> list[tuple[str, str]]:
  """(relative path, absolute path) of standard-library sources, sorted, size-capped."""
  root = _stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    parts = [] if rel == '.' else rel.split(os.sep)
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith('.'))
    if parts and parts[0] == 'lib2to3' and any(p in ('tests', 'data') for p in parts):
      continue
    for f in sorted(filenames):
      if f.endswith('.py'):
        out.append((os.path.join(rel, f) if parts else f, os.path.join(dirpath, f)))
  out.sort()
  total, kept = 0, []
  for rel, path in out:
    size = os.path.getsize(path)
    if total + size > _SOURCE_BYTES_CAP:
      continue
    total += size
    kept.append((rel, path))
  return kept


def _module_of(rel: str) -> str:
  mod = rel[:-3].replace(os.sep, '.')
  return mod[:-len('.__init__')] if mod.endswith('.__init__') else mod


def _skip_module(mod: str) -> bool:
  if mod.startswith(('_test', '_xx', 'xx', 'test.')) or mod.endswith('_test'):
    return True
  return any(mod == s or mod.startswith(s + '.') for s in _SKIP_MODULES)


def _extension_modules() -> list[str]:
  names = set(sys.builtin_module_names)
  dyn = os.path.join(_stdlib_dir(), 'lib-dynload')
  if os.path.isdir(dyn):
    names.update(f.split('.')[0] for f in os.listdir(dyn) if f.endswith(('.so', '.pyd')))
  return sorted(n for n in names if not _skip_module(n))


def _embedded_documents() -> Iterator[tuple[str, str, str]]:
  """Yields (split key, name, text) of the embedded corpus, in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for name in sorted(topics.topics):
    yield f'topic:{name}', f'topic/{name}', topics.topics[name]
  for mod in _extension_modules():
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        doc = importlib.import_module(mod).__doc__
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(doc, str) and doc.strip():
      yield f'module:{mod}', f'docstring/{mod}', doc
  for rel, path in _stdlib_py_files():
    mod = _module_of(rel)
    if _skip_module(mod):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        src = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    try:
      doc = ast.get_docstring(ast.parse(src), clean=True)
    except (SyntaxError, ValueError):
      doc = None
    if doc and doc.strip():
      yield f'module:{mod}', f'docstring/{mod}', doc
    yield f'module:{mod}', f'src/{rel}', src


@dataclasses.dataclass(eq=False)
class PythonDocsConfig(tfds.core.BuilderConfig):
  max_doc_chars: int = 100_000


def _python_docs_config(max_doc_chars: int = 100_000) -> PythonDocsConfig:
  v = sys.version_info
  return PythonDocsConfig(name=f'py{v.major}_{v.minor}_{v.micro}_c{max_doc_chars}',
                          max_doc_chars=max_doc_chars)


class PythonDocs(_Builder):
  """Embedded corpus from the running Python's docs, docstrings and stdlib sources."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [_python_docs_config()]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features(),
                                 description=__doc__.split('\n\n')[0])

  def _split_generators(self, dl_manager):
    del dl_manager
    self.notoklm_stats = stats = collections.Counter()
    docs, seen = [], set()  # ~12 MB: held once instead of re-reading the stdlib per split
    for key, name, text in _embedded_documents():
      if name in seen:
        stats['skipped_duplicate_name'] += 1
        continue
      seen.add(name)
      if '\x00' in text:
        stats['skipped_nul'] += 1
        continue
      pieces = _cut(text, self.builder_config.max_doc_chars, stats)
      for j, piece in enumerate(pieces):
        docs.append((key, name if len(pieces) == 1 else f'{name}#{j}', piece))
    stats['documents'] = len(docs)
    plan = _SplitPlan(k for k, _, _ in docs)
    return {s: self._generate_examples(docs, plan, s) for s in ('train', 'validation')}

  def _generate_examples(self, docs, plan, split):
    for key, name, text in docs:
      if plan.split_of(key) == split:
        self.notoklm_stats[f'documents_{split}'] += 1
        yield name, {'text': text, 'name': name}


# --------------------------------------------------------------------------------------
# Local .txt / .jsonl files.


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  paths: tuple[str, ...] = ()
  txt_split: str = 'paragraph'
  text_key: str = 'text'
  max_doc_chars: int = 100_000
  val_fraction: float = VALIDATION_FRACTION
  val_min_bytes: int = 0


def local_text_config(paths, txt_split='paragraph', text_key='text',
                      max_doc_chars=100_000, val_fraction=VALIDATION_FRACTION,
                      val_min_bytes=0) -> LocalTextConfig:
  """Checks the paths and names a config by their (path, size, mtime) and the options."""
  if txt_split not in ('file', 'paragraph', 'line'):
    raise ValueError(f"data.txt_split must be 'file', 'paragraph' or 'line', got {txt_split!r}")
  if not 0.0 < float(val_fraction) < 1.0:
    raise ValueError(f'data.val_fraction={val_fraction!r}: must be between 0 and 1 (the share of '
                     'documents held out for validation, by a stable hash)')
  if int(val_min_bytes) < 0:
    raise ValueError(f'data.val_min_bytes={val_min_bytes!r}: must be >= 0')
  absolute = []
  for p in paths:
    a = os.path.abspath(os.path.expanduser(p))
    if os.path.isdir(a):
      raise ValueError(f'data source {p!r} is a directory: list its files '
                       "(data.source='text:a.txt,b.jsonl')")
    if not os.path.isfile(a):
      commas = (f"; data.source='text:...' splits on commas, so it named {len(paths)} files "
                f'{list(paths)} (a file name holding a comma: rename it or link it)'
                if len(paths) > 1 else '')
      raise FileNotFoundError(f'data source file not found: {p!r} ({a}){commas}')
    if not a.endswith(('.txt', '.jsonl')):
      raise ValueError(f'unsupported data file {a!r}: expected .txt or .jsonl')
    absolute.append(a)
  if not absolute:
    raise ValueError('data.source text: needs at least one path')
  h = hashlib.sha1()
  for a in absolute:
    st = os.stat(a)
    h.update(f'{a}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  h.update(f'{txt_split}\0{text_key}\0{max_doc_chars}'.encode())
  if float(val_fraction) != VALIDATION_FRACTION or int(val_min_bytes):  # (default: names as before)
    h.update(f'\0{float(val_fraction)!r}\0{int(val_min_bytes)}'.encode())
  return LocalTextConfig(name=f'h{h.hexdigest()[:16]}', paths=tuple(absolute),
                         txt_split=txt_split, text_key=text_key, max_doc_chars=max_doc_chars,
                         val_fraction=float(val_fraction), val_min_bytes=int(val_min_bytes))


_PIECE_BYTES = 1 << 20  # longer lines are read in pieces of at most this many bytes


def _binary(path):
  """`open(path, 'rb')`, or `path` itself when it is already a binary file object (a shard
  streamed by data/shards.py; its owner closes it)."""
  if isinstance(path, (str, os.PathLike)):
    return open(path, 'rb')  # pylint: disable=consider-using-with
  return contextlib.nullcontext(path)


def _read_lines(path) -> Iterator[bytes]:
  with _binary(path) as f:
    yield from f


def _utf8_cut(raw: bytes) -> int:
  """Length of the longest prefix of `raw` that does not end inside a UTF-8 character."""
  for k in range(1, min(4, len(raw)) + 1):
    b = raw[-k]
    if b & 0xC0 != 0x80:  # the last lead (or ASCII) byte
      need = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
      return len(raw) - k if k < need else len(raw)
  return len(raw)


def _read_pieces(path: str, size: int = _PIECE_BYTES) -> Iterator[tuple[bytes, bool]]:
  """(bytes, ends_a_line) pieces of a file: whole lines, except that a line longer than `size`
  bytes comes in pieces of at most about `size` bytes, never cut inside a UTF-8 character."""
  carry = b''
  with _binary(path) as f:
    while True:
      raw = f.readline(size)
      if not raw:
        if carry:
          yield carry, True
        return
      raw, carry = carry + raw, b''
      if raw.endswith(b'\n'):
        yield raw, True
        continue
      cut = _utf8_cut(raw)
      raw, carry = raw[:cut], raw[cut:]
      if raw:
        yield raw, False


def _txt_documents(path: str, mode: str, stats: collections.Counter,
                   max_chars: int = 0) -> Iterator[tuple[int, str]]:
  """Streams (document index, text) of a .txt file, dropping bad lines (see module doc).

  A document longer than `max_chars` (> 0) comes as several consecutive parts with the same
  index, each part but the last a multiple of `max_chars` characters long, so cutting every
  part into `max_chars` pieces gives the pieces of the whole document while memory stays
  bounded by `max_chars` plus one line piece."""
  buf: list[str] = []
  held = 0  # characters in buf
  doc = 0
  at_line_start = True

  def take_full_parts():  # the leading multiple of max_chars characters of buf
    nonlocal held
    text = ''.join(buf)
    k = len(text) - len(text) % max_chars
    buf[:] = [text[k:]] if k < len(text) else []
    held = len(text) - k
    return text[:k]

  def flush():
    nonlocal held
    text = ''.join(buf)
    buf.clear()
    held = 0
    if mode == 'paragraph':
      text = text.rstrip('\r\n')
    return text

  dropping = False  # the rest of a line (read in pieces) with a bad piece is dropped too
  for raw, ends in _read_pieces(path, _PIECE_BYTES):
    line_start, at_line_start = at_line_start, ends
    if dropping:
      dropping = not ends
      continue
    try:
      line = raw.decode('utf-8')
    except UnicodeDecodeError:
      stats['skipped_invalid_utf8'] += 1
      dropping = not ends
      continue
    if '\x00' in line:
      stats['skipped_nul'] += 1
      dropping = not ends
      continue
    if mode == 'paragraph' and line_start and ends and not line.strip():
      if buf:
        yield doc, flush()
        doc += 1
      continue
    buf.append(line)
    held += len(line)
    if mode == 'line' and ends:
      yield doc, ''.join(buf).rstrip('\r\n')
      buf.clear()
      held = 0
      doc += 1
    elif 0 < max_chars <= held:
      yield doc, take_full_parts()
  if buf or mode == 'file':
    yield doc, flush()


def _jsonl_documents(path: str, key: str, stats: collections.Counter) -> Iterator[str]:
  for raw in _read_lines(path):
    if not raw.strip():
      continue
    try:
      rec = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError:
      stats['skipped_invalid_utf8'] += 1
      continue
    except ValueError:
      stats['skipped_bad_json'] += 1
      continue
    if not isinstance(rec, dict):
      stats['skipped_bad_json'] += 1
    elif key not in rec:
      stats['skipped_missing_field'] += 1
    elif not isinstance(rec[key], str):
      stats['skipped_not_string'] += 1
    elif '\x00' in rec[key]:
      stats['skipped_nul'] += 1
    else:
      try:
        rec[key].encode('utf-8')
      except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        stats['skipped_invalid_utf8'] += 1
        continue
      yield rec[key]


def _local_documents(cfg: LocalTextConfig, stats: collections.Counter):
  """Yields (split key, example key, name, text) of all usable document pieces.

  Raises ValueError if no file yields a usable document.
  """
  empty_files = []
  for path in cfg.paths:
    stats['files'] += 1
    if path.endswith('.jsonl'):
      docs = enumerate(_jsonl_documents(path, cfg.text_key, stats))
    else:
      docs = _txt_documents(path, cfg.txt_split, stats, cfg.max_doc_chars)
    n = 0
    for i, parts in itertools.groupby(docs, key=lambda x: x[0]):
      j = 0
      n_pieces = 0
      for _, text in parts:  # one part, unless the document is longer than max_doc_chars
        if not text.strip():
          continue
        for piece in _cut(text, cfg.max_doc_chars, collections.Counter()):
          if not piece.strip():
            continue
          n += 1
          n_pieces += 1
          stats['documents'] += 1
          yield f'{path}:{i}', f'{path}:{i}:{j}', f'{os.path.basename(path)}:{i}:{j}', piece
          j += 1
      if n_pieces == 0:
        stats['skipped_empty'] += 1
      elif n_pieces > 1:
        stats['docs_cut'] += 1
        stats['pieces_from_cuts'] += n_pieces - 1
    if n == 0:
      empty_files.append(path)
      stats['files_without_documents'] += 1
  if len(empty_files) == len(cfg.paths):
    raise ValueError(f'no usable documents in {", ".join(empty_files)} '
                     f'(empty, whitespace-only or all lines rejected: {dict(stats)})')


class LocalText(_Builder):
  """Local .txt/.jsonl files; one config per set of files (see `local_text_config`)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features(),
                                 description='Local text files: ' + ', '.join(
                                     self.builder_config.paths))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    scan = collections.Counter()
    plan = _SplitPlan(((k, len(t.encode('utf-8'))) for k, _, _, t in _local_documents(cfg, scan)),
                      cfg.val_fraction, cfg.val_min_bytes)
    if plan.n < 2:
      raise ValueError(f'only {plan.n} usable document in {", ".join(cfg.paths)}; need at least '
                       "2 (one for validation): add text or use data.txt_split='paragraph'/'line'")
    self.notoklm_stats = collections.Counter(scan)
    return {s: self._generate_examples(plan, s) for s in ('train', 'validation')}

  def _generate_examples(self, plan, split):
    for key, example_key, name, text in _local_documents(self.builder_config,
                                                         collections.Counter()):
      if plan.split_of(key) == split:
        self.notoklm_stats[f'documents_{split}'] += 1
        self.notoklm_stats[f'bytes_{split}'] += len(text.encode('utf-8'))
        yield example_key, {'text': text, 'name': name}


# --------------------------------------------------------------------------------------
# Preparing and reading.


@contextlib.contextmanager
def file_lock(path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_dir), 'dataset_info.json'))


def _quiet(make_builder):
  """Builds without absl's 'Using custom data configuration' warning (expected for us)."""

  def make():
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      return make_builder()
    finally:
      absl_logger.setLevel(level)

  return make


_SHUFFLE_MEM_BYTES = 128 << 20  # examples TFDS's writer holds in memory before spilling


class _LocalGfile:
  """The three `tf.io.gfile` calls TFDS's shuffler makes, on the local file system."""

  class io:  # pylint: disable=invalid-name
    class gfile:  # pylint: disable=invalid-name
      GFile = staticmethod(open)
      exists = staticmethod(os.path.exists)
      remove = staticmethod(os.remove)

  class errors:  # pylint: disable=invalid-name
    class ResourceExhaustedError(OSError):
      message = ''


@contextlib.contextmanager
def _bounded_tfds_writer():
  """TFDS's example writer keeps every example in memory up to 1 GB, then spills them into
  temporary bucket files through TensorFlow's gfile -- which is not installed here, so a
  dataset over 1 GB would fail. While preparing: spill past `_SHUFFLE_MEM_BYTES`, with plain
  local file I/O when TensorFlow is absent (pinned tensorflow-datasets version)."""
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  saved = shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf
  shuffle.MAX_MEM_BUFFER_SIZE = min(saved[0], _SHUFFLE_MEM_BYTES)
  try:
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    shuffle.tf = _LocalGfile
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf = saved


def _tree(root: str) -> list[str]:
  """Every directory and file under `root` (deepest first), `root` included."""
  out = []
  for d, dirs, files in os.walk(root, topdown=False):
    out += [os.path.join(d, f) for f in files] + [os.path.join(d, x) for x in dirs]
  return out + ([root] if os.path.isdir(root) else [])


def _remove_new(root: str, existed: set[str]) -> None:
  """Removes what a failed preparation created under `root` (nothing that existed before)."""
  for p in _tree(root):
    if p in existed:
      continue
    try:
      if os.path.isdir(p) and not os.path.islink(p):
        if not os.listdir(p):
          os.rmdir(p)
      else:
        os.remove(p)
    except OSError:
      pass


def _check_catalog_preparable(builder, data_dir: str) -> None:
  """A TFDS catalog dataset (lm1b, c4, wiki40b, pg19, ...) that is not prepared here needs
  TensorFlow and internet to prepare: say so, and how, before anything is downloaded."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec('tensorflow') is None:
    raise ValueError(
        f'data.source=tfds:{builder.name}: the TFDS dataset is not prepared in {data_dir}, and '
        'preparing a catalog dataset needs TensorFlow (not installed here) and internet. On a '
        'connected machine: pip install tensorflow, then python -c "import tensorflow_datasets '
        f"as tfds; tfds.builder('{builder.name}', data_dir='DIR').download_and_prepare("
        f"file_format='array_record')\"; copy DIR/{builder.name} into {data_dir} (or set "
        'data.data_dir to DIR). Local files work without it: data.source=text:PATH.')


def prepare(make_builder, data_dir: str):
  """Prepares a builder once across processes; returns a fresh builder reading from disk."""
  make_builder = _quiet(make_builder)
  builder = make_builder()
  ours = isinstance(builder, _Builder)
  stats_path = os.path.join(os.fspath(builder.data_dir), _STATS_FILE)
  if _is_prepared(builder) and (not ours or os.path.exists(stats_path)):
    return builder  # (the stats are written under the lock right after preparing)
  lock = os.path.join(data_dir, '.locks', f'{builder.name}-{builder.builder_config.name if builder.builder_config else "default"}.lock')
  with file_lock(lock):
    builder = make_builder()
    if not _is_prepared(builder):
      if not ours:
        _check_catalog_preparable(builder, data_dir)
      tfds.disable_progress_bar()
      dataset_dir = os.path.join(data_dir, builder.name)
      existed = set(_tree(dataset_dir))
      try:
        with _bounded_tfds_writer():
          builder.download_and_prepare(file_format='array_record')
      except BaseException:
        _remove_new(dataset_dir, existed)  # no half-prepared or empty cache directories
        raise
      if ours:
        _write_stats(os.path.join(os.fspath(builder.data_dir), _STATS_FILE),
                     dict(builder.notoklm_stats))
  return make_builder()


class DocSource:
  """Random access to the documents (str) of one split; `stats` are the preparation counts."""

  def __init__(self, data_source, name: str, text_key: str = 'text', max_docs: int = 0,
               stats: dict[str, int] | None = None):
    self._ds = data_source
    self.name = name
    self._key = text_key
    n = len(data_source)
    self._len = min(n, max_docs) if max_docs > 0 else n
    self.stats = dict(stats or {})

  def __len__(self) -> int:
    return self._len

  def record(self, i: int) -> dict[str, Any]:
    """The whole example `i` (bytes decoded as UTF-8), e.g. with its 'name'."""
    if not -self._len <= i < self._len:
      raise IndexError(f'document {i} out of range for {self.name} ({self._len} documents)')
    rec = self._ds[int(i) % self._len]
    if not isinstance(rec, dict):
      rec = {self._key: rec}
    return {k: v.decode('utf-8', errors='replace') if isinstance(v, bytes) else v
            for k, v in rec.items()}

  def __getitem__(self, i: int) -> str:
    return str(self.record(i)[self._key])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self):
    return f'DocSource({self.name!r}, {self._len} documents)'


def _builder_source(builder, split: str, text_key: str, max_docs: int) -> DocSource:
  stats_path = os.path.join(os.fspath(builder.data_dir), _STATS_FILE)
  stats = {}
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      stats = json.load(f)
  cfg = builder.builder_config.name if builder.builder_config else ''
  name = '/'.join(x for x in (builder.name, cfg, str(builder.version)) if x)
  return DocSource(builder.as_data_source(split), name=name, text_key=text_key,
                   max_docs=max_docs, stats=stats)


def parse_char_map(spec: str) -> dict[int, int | None]:
  """`data.char_map` 'FROM=TO' (two strings of n characters around the middle '=', e.g.
  'qrstuvwxyz=abcdefghij') -> a `str.translate` table; 'FROM=' (nothing after a final '=',
  e.g. ' =') removes the characters of FROM (text without spaces); '' -> {} (no mapping)."""
  if not spec:
    return {}
  n = (len(spec) - 1) // 2
  if len(spec) % 2 == 0 or n == 0 or spec[n] != '=':
    if len(spec) > 1 and spec.endswith('='):  # 'FROM=': the characters of FROM are removed
      src = spec[:-1]
      if len(set(src)) != len(src):
        raise ValueError(f'data.char_map={spec!r}: a character appears twice in FROM {src!r}')
      return {ord(a): None for a in src}
    raise ValueError(f"data.char_map={spec!r}: expected 'FROM=TO', two strings of equal length "
                     "around the middle '=' (e.g. 'qrstuvwxyz=abcdefghij'), or 'FROM=' to "
                     "remove the characters of FROM (e.g. ' =')")
  src, dst = spec[:n], spec[n + 1:]
  if len(set(src)) != n:
    raise ValueError(f'data.char_map={spec!r}: a character appears twice in FROM {src!r}')
  return {ord(a): ord(b) for a, b in zip(src, dst)}


class MappedSource:
  """A DocSource view whose documents go through `str.translate(table)` (`data.char_map`: e.g.
  letters the model must never see in training, mapped onto others)."""

  def __init__(self, source, spec: str):
    self.source, self.table = source, parse_char_map(spec)
    self.name = f'{source.name}[char_map={spec}]'
    self.stats = getattr(source, 'stats', {})

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i: int) -> str:
    return self.source[i].translate(self.table)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def record(self, i: int) -> dict[str, Any]:
    """The example with its text mapped (other fields, e.g. 'name', as they are)."""
    rec = dict(self.source.record(i))
    key = getattr(self.source, '_key', 'text')
    rec[key] = str(rec[key]).translate(self.table)
    return rec

  def __repr__(self):
    return f'MappedSource({self.name!r}, {len(self)} documents)'


class FilteredSource:
  """A DocSource view of the documents whose 'name' matches a regex (`data.doc_filter`: e.g.
  only the embedded corpus's English prose, '^(topic|docstring)/', or only its code)."""

  def __init__(self, source, pattern: str):
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'data.doc_filter={pattern!r} is not a regular expression: {e}') from None
    self.source = source
    self.index = [i for i in range(len(source))
                  if regex.search(str(source.record(i).get('name', '')))]
    if not self.index:
      raise ValueError(f'data.doc_filter={pattern!r} matches no document name of '
                       f'{source.name} ({len(source)} documents)')
    self.name = f'{source.name}[doc_filter={pattern}]'
    self.stats = {**getattr(source, 'stats', {}), 'doc_filter_kept': len(self.index)}

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i: int) -> str:
    return self.source[self.index[i]]

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def record(self, i: int) -> dict[str, Any]:
    return self.source.record(self.index[i])

  def __repr__(self):
    return f'FilteredSource({self.name!r}, {len(self)} documents)'


def get_source(cfg_data, split: str) -> DocSource:
  """The documents of `split` for the `data` config (source, data_dir, text_key, ...), only
  those whose name matches `data.doc_filter` when it is set, mapped through `data.char_map` when
  it is set."""
  source = _get_source(cfg_data, split)
  pattern = str(cfg_data.get('doc_filter', '') or '')
  if pattern:
    source = FilteredSource(source, pattern)
  spec = str(cfg_data.get('char_map', '') or '')
  return MappedSource(source, spec) if spec else source


def _get_source(cfg_data, split: str) -> DocSource:
  data_dir = default_data_dir(cfg_data.get('data_dir', ''))
  src = cfg_data.source
  max_docs = int(cfg_data.get('max_docs', 0))
  max_chars = int(cfg_data.get('max_doc_chars', 100_000))
  if src == 'python_docs':
    config = _python_docs_config(max_chars)
    if config.name in PythonDocs.builder_configs:
      config = config.name  # a registered config is passed by name
    builder = prepare(lambda: PythonDocs(data_dir=data_dir, config=config,
                                         file_format='array_record'), data_dir)
    return _builder_source(builder, split, 'text', max_docs)
  if src.startswith('text:'):
    paths = [p for p in src[len('text:'):].split(',') if p]
    config = local_text_config(paths, cfg_data.get('txt_split', 'paragraph'),
                               cfg_data.get('text_key', 'text'), max_chars,
                               cfg_data.get('val_fraction', VALIDATION_FRACTION),
                               cfg_data.get('val_min_bytes', 0))
    builder = prepare(lambda: LocalText(data_dir=data_dir, config=config,
                                        file_format='array_record'), data_dir)
    return _builder_source(builder, split, 'text', max_docs)
  if src.startswith('tfds:'):
    name = src[len('tfds:'):]
    try:
      builder = prepare(lambda: tfds.builder(name, data_dir=data_dir,
                                             file_format='array_record'), data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown_tfds(name) from None
    return _builder_source(builder, split, cfg_data.get('text_key', 'text'), max_docs)
  if src.startswith('shards:'):
    return _shard_source(cfg_data, src[len('shards:'):], split)
  raise ValueError(f"unknown data.source {src!r}: expected 'python_docs', 'text:PATH[,PATH...]', "
                   "'shards:GLOB[,GLOB...]' or 'tfds:NAME[/CONFIG]'")


def _shard_source(cfg_data, spec: str, split: str):
  """`shards:GLOB[,GLOB...]`: sharded files streamed from a local disk or a bucket
  (data/shards.py; the `text:` reading rules are passed in)."""
  import types  # pylint: disable=import-outside-toplevel
  from data import shards  # pylint: disable=import-outside-toplevel
  for key in ('doc_filter', 'char_map'):
    if cfg_data.get(key, ''):
      raise ValueError(f'data.{key} is not supported with data.source=shards: (streamed)')
  rules = types.SimpleNamespace(txt_documents=_txt_documents, jsonl_documents=_jsonl_documents,
                                cut=_cut, stable_bucket=stable_bucket)
  evals = str(cfg_data.get('eval_source', '') or '')
  return shards.ShardSource(
      [p for p in spec.split(',') if p], split, rules=rules,
      text_key=cfg_data.get('text_key', 'text'), txt_split=cfg_data.get('txt_split', 'paragraph'),
      max_doc_chars=int(cfg_data.get('max_doc_chars', 100_000)),
      eval_patterns=[p for p in evals.removeprefix('shards:').split(',') if p],
      shuffle_buffer=int(cfg_data.get('shuffle_buffer', 1024)),
      train_split=cfg_data.get('train_split', 'train'))


def _unknown_tfds(name: str) -> ValueError:
  """The error for an unknown `tfds:NAME`, naming the closest registered datasets (TFDS's own
  error lists its whole catalogue)."""
  import difflib  # pylint: disable=import-outside-toplevel
  base = name.split('/')[0].split(':')[0]
  close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False),
                                    n=3, cutoff=0.6)
  return ValueError(f'data.source=tfds:{name}: no TFDS dataset {base!r}'
                   + (f'; did you mean {" or ".join(repr(c) for c in close)}?' if close else '')
                   + ' (tensorflow_datasets.list_builders() lists them all)')


def describe(source: DocSource) -> dict[str, Any]:
  """A small dict for the run log: name, documents and the preparation counts."""
  return {'name': source.name, 'documents': len(source), **source.stats}
