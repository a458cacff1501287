"""Content fingerprints of a run's data (`data.source`), recorded at the run's start and compared
on every resume and evaluation.

* a local file up to `LARGE` bytes: its SHA-256, streamed; a larger one: its size, mtime and the
  SHA-256 of `SAMPLES` blocks of `BLOCK` bytes spread evenly over it (first and last included),
  so a 100 GB corpus is fingerprinted in milliseconds;
* a bucket object (`gs://...`, any fsspec URL): its size and generation (or etag) from fsspec's
  `info`, no read;
* the embedded corpus (`python_docs`): its builder config and version, and its document count
  when prepared; `tfds:NAME`: the name.

`source(cfg_data)` gives `{'source', 'files' | 'builder' | 'dataset', 'hash'}`; `hash` names the
whole (16 hex digits). `differences(old, new)` lists what changed, one line per file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

LARGE = 64 << 20
BLOCK = 1 << 20
SAMPLES = 16


def file(path: str) -> dict[str, Any]:
  """The fingerprint of one file (see the module doc); a missing file: `{'path', 'missing'}`."""
  if '://' in path:
    import fsspec  # pylint: disable=import-outside-toplevel
    fs, p = fsspec.core.url_to_fs(path)
    try:
      info = fs.info(p)
    except FileNotFoundError:
      return {'path': path, 'missing': True}
    gen = info.get('generation') or info.get('etag') or info.get('mtime') or ''
    return {'path': path, 'bytes': int(info.get('size') or 0), 'generation': str(gen)}
  a = os.path.abspath(os.path.expanduser(path))
  try:
    st = os.stat(a)
  except OSError:
    return {'path': a, 'missing': True}
  h = hashlib.sha256()
  with open(a, 'rb') as f:
    if st.st_size <= LARGE:
      for chunk in iter(lambda: f.read(BLOCK), b''):
        h.update(chunk)
      return {'path': a, 'bytes': st.st_size, 'sha256': h.hexdigest()}
    last = st.st_size - BLOCK
    for i in range(SAMPLES):
      f.seek(last * i // (SAMPLES - 1))
      h.update(f.read(BLOCK))
  return {'path': a, 'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns,
          'sampled_sha256': h.hexdigest()}


def source(cfg_data) -> dict[str, Any]:
  """The fingerprint of `data.source` (with the options that change which documents it gives)."""
  src = str(cfg_data.source)
  out: dict[str, Any] = {'source': src}
  for k in ('txt_split', 'text_key', 'max_doc_chars', 'max_docs', 'doc_filter', 'char_map',
            'eval_split'):
    if k in cfg_data:
      out[k] = cfg_data[k]
  if src.startswith('text:'):
    out['files'] = [file(p) for p in src[len('text:'):].split(',') if p]
  elif src == 'python_docs':
    out['builder'] = _embedded(cfg_data)
  elif src.startswith('tfds:'):
    out['dataset'] = src[len('tfds:'):]
  out['hash'] = hashlib.sha256(json.dumps(out, sort_keys=True, default=str).encode()
                               ).hexdigest()[:16]
  return out


def _embedded(cfg_data) -> dict[str, Any]:
  from data import corpus  # pylint: disable=import-outside-toplevel
  config = corpus._python_docs_config(int(cfg_data.get('max_doc_chars', 100_000)))  # pylint: disable=protected-access
  version = str(corpus.PythonDocs.VERSION)
  out: dict[str, Any] = {'name': f'python_docs/{config.name}/{version}'}
  stats = os.path.join(corpus.default_data_dir(cfg_data.get('data_dir', '')), 'python_docs',
                       config.name, version, 'notoklm_stats.json')
  if os.path.exists(stats):
    with open(stats) as f:
      out['documents'] = json.load(f).get('documents')
  return out


def differences(old: dict, new: dict) -> list[str]:
  """What differs between two fingerprints of the same `data.source`, one line per file or
  part ([] when the same). Fields missing on either side (an older record) are not compared."""
  out = []
  if old.get('source') != new.get('source'):
    return [f"data.source {old.get('source')!r} -> {new.get('source')!r}"]
  old_files = {f['path']: f for f in old.get('files', [])}
  for f in new.get('files', []):
    was = old_files.pop(f['path'], None)
    if was is None:
      out.append(f"{f['path']}: not in the run's record")
    elif f.get('missing'):
      out.append(f"{f['path']}: missing now")
    else:
      keys = [k for k in ('bytes', 'sha256', 'mtime_ns', 'sampled_sha256', 'generation')
              if k in was and k in f and was[k] != f[k]]
      if keys:
        how = ', '.join(f'{k} {str(was[k])[:12]} -> {str(f[k])[:12]}' for k in keys)
        out.append(f"{f['path']}: content changed ({how})")
  out += [f'{p}: no longer in data.source' for p in old_files]
  ob, nb = old.get('builder') or {}, new.get('builder') or {}
  for k in ('name', 'documents'):
    if ob.get(k) is not None and nb.get(k) is not None and ob[k] != nb[k]:
      out.append(f'embedded corpus {k}: {ob[k]} -> {nb[k]}')
  return out
