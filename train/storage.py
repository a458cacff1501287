"""Where a run's files live: local paths and bucket URLs (gs://), one set of helpers.

Every file a run reads or writes outside its checkpoints (config.json, summaries, metrics
JSONL, TensorBoard events, artifacts, eval results, sweep tables, exports) goes through these
functions, and checkpoints go through orbax, which writes `gs://` natively (tensorstore). A
workdir URL is never rewritten: `canonical` makes a local path absolute and leaves a URL as it
is (`os.path.abspath('gs://b/r')` would have made it `<cwd>/gs:/b/r`).

  * Writes are atomic where the store allows: a local file is written to a temporary name and
    renamed; an object upload replaces the object whole (a reader sees old or new content).
  * `JsonlLog`: append-only logs (metrics, the evaluator's record). Local: appended lines.
    Remote: objects cannot be appended to, so the log is kept in memory and the object
    rewritten, at most every `flush_secs` and on `flush()`.
  * `WorkdirLock`: one training process per workdir. Local: the kernel's advisory lock
    (flock) on the workdir directory, held through an open descriptor for the run's life
    (released when the holder dies; deleting `.train.lock`, which names the holder, cannot
    break it). gs://: a lock object created with `ifGenerationMatch=0`, renewed with the
    generation it holds (a lease: a crashed holder's lock frees itself after
    `NOTOKLM_LOCK_LEASE_S`, default 120 s), removed on release; a second run is refused naming
    the holder and when its lease ends.
  * `check_workdir`: before any training, a URL's scheme, bucket and credentials are checked
    and a failure names the URL.

Supported URLs: gs:// (gcsfs for files, tensorstore for checkpoints; an emulator through
STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL). s3:// works where s3fs is installed, but its
workdir lock is not enforced (S3 has no generation precondition here): said at start-up.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid

log = logging.getLogger(__name__)

SCHEMES = ('gs://', 's3://')
LEASE_ENV = 'NOTOKLM_LOCK_LEASE_S'


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (busy, a file, not writable, an unreachable bucket): the
  user must act."""


# -- paths ---------------------------------------------------------------------------------------
def is_remote(p) -> bool:
  return str(p).startswith(SCHEMES)


_BUCKET = re.compile(r'[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]')


def canonical(p) -> str:
  """A local path made absolute (home expanded); a bucket URL as it is. Any other URL scheme
  (`hdfs://`, `http://`, ...) is a WorkdirError naming it."""
  p = str(p)
  if is_remote(p):
    scheme, rest = p.split('://', 1)
    bucket = rest.split('/')[0]
    if not _BUCKET.fullmatch(bucket):
      raise WorkdirError(f'{p}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '
                         f'-, _ or .; starting and ending with a letter or digit): expected '
                         f'{scheme}://BUCKET/PATH')
    return p.rstrip('/')
  if '://' in p:
    raise WorkdirError(f'{p}: unsupported URL scheme {p.split("://")[0]!r} (workdirs are local '
                       f'paths or {", ".join(SCHEMES)} URLs)')
  m = re.match(r'([A-Za-z][A-Za-z0-9+.-]*):/', p)
  if m:  # 'gs:/bucket/run', a URL with one slash, would be a local folder named 'gs:'
    raise WorkdirError(f'{p}: looks like a {m.group(1)}:// URL with a slash missing; write '
                       f'{m.group(1)}://BUCKET/PATH')
  out = os.path.abspath(os.path.expanduser(p))
  if ':/' in out:  # tensorstore (orbax) reads 'x:/...' inside a path as a URL
    raise WorkdirError(f'{p}: a folder name ending in ":" cannot hold checkpoints (orbax would '
                       'read the path as a URL); rename it')
  return out


def join(*parts) -> str:
  return os.path.join(*[str(x) for x in parts])


def _fs(p):
  """(fsspec filesystem, path without the scheme) of a bucket URL."""
  import fsspec  # pylint: disable=import-outside-toplevel
  scheme = str(p).split('://')[0]
  try:
    fs = fsspec.filesystem(scheme)
  except (ImportError, ValueError) as e:
    need = {'gs': 'gcsfs', 's3': 's3fs'}.get(scheme, scheme)
    raise WorkdirError(f'{p}: {scheme}:// paths need the {need} package ({e})') from e
  return fs, str(p).split('://', 1)[1]


def exists(p) -> bool:
  if not is_remote(p):
    return os.path.exists(p)
  fs, path = _fs(p)
  return fs.exists(path)


def isdir(p) -> bool:
  if not is_remote(p):
    return os.path.isdir(p)
  fs, path = _fs(p)
  return fs.isdir(path)


def isfile(p) -> bool:
  if not is_remote(p):
    return os.path.isfile(p)
  fs, path = _fs(p)
  return fs.isfile(path)


def listdir(p) -> list[str]:
  """Names in the directory `p` (empty when it does not exist)."""
  if not is_remote(p):
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  fs, path = _fs(p)
  try:
    entries = fs.ls(path, detail=False, refresh=True)
  except FileNotFoundError:
    return []
  return sorted({os.path.basename(e.rstrip('/')) for e in entries
                 if e.rstrip('/') != path.rstrip('/')})


def makedirs(p) -> None:
  """A local directory (and parents); nothing for a bucket (prefixes need no creation)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def read_bytes(p) -> bytes:
  if not is_remote(p):
    with builtins.open(p, 'rb') as f:
      return f.read()
  fs, path = _fs(p)
  return fs.cat_file(path)


def read_text(p) -> str:
  return read_bytes(p).decode('utf-8')


def read_json(p):
  return json.loads(read_text(p))


def write_bytes(p, data: bytes) -> None:
  """Atomic: a temporary file renamed over the target, or one object upload."""
  if is_remote(p):
    fs, path = _fs(p)
    fs.pipe_file(path, data)
    return
  os.makedirs(os.path.dirname(p) or '.', exist_ok=True)
  tmp = os.path.join(os.path.dirname(p), f'.{os.path.basename(p)}.tmp{os.getpid()}')
  with builtins.open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, p)


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def write_json(p, obj) -> None:
  write_text(p, json.dumps(obj, indent=2) + '\n')


def open_file(p, mode: str = 'rb'):
  """A file object (e.g. for matplotlib's savefig); a remote one is uploaded on close."""
  if not is_remote(p):
    if any(m in mode for m in 'wa'):
      os.makedirs(os.path.dirname(p) or '.', exist_ok=True)
    return builtins.open(p, mode)
  fs, path = _fs(p)
  return fs.open(path, mode)


def remove(p) -> None:
  if not is_remote(p):
    os.remove(p)
    return
  fs, path = _fs(p)
  fs.rm(path)


def rmtree(p) -> None:
  if not is_remote(p):
    shutil.rmtree(p, ignore_errors=True)
    return
  fs, path = _fs(p)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def move(src, dst) -> None:
  """Moves a file or directory tree (a rename locally; copy then delete in a bucket)."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    return
  fs, a = _fs(src)
  _, b = _fs(dst)
  fs.mv(a, b, recursive=True)


def upload_tree(local_dir: str, remote_dir: str) -> None:
  fs, path = _fs(remote_dir)
  for d, _, files in os.walk(local_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), local_dir)
      fs.put_file(os.path.join(d, f), f'{path}/{rel}')


@contextlib.contextmanager
def local_dir(p):
  """A local directory standing for `p`: `p` itself when local, else a temporary directory
  uploaded to `p` when the block ends without an error (libraries that only write local files:
  HF exports, safetensors)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)
    yield p
    return
  tmp = tempfile.mkdtemp(prefix='notoklm_stage_')
  try:
    yield tmp
    upload_tree(tmp, p)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# -- checks -------------------------------------------------------------------------------------
def check_workdir(workdir, create: bool = True) -> str:
  """The canonical workdir after checking it can be used: locally not a file, creatable and
  writable (created if `create`); a URL's scheme, its bucket's existence and the credentials
  (one listing of the bucket). A WorkdirError / FileNotFoundError names the workdir."""
  wd = canonical(workdir)
  if not is_remote(wd):
    if os.path.exists(wd) and not os.path.isdir(wd):
      raise WorkdirError(f'workdir {workdir} is a file, not a directory')
    if not create:
      if not os.path.exists(wd):
        raise FileNotFoundError(f'workdir {workdir} does not exist')
      return wd
    try:
      os.makedirs(wd, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f'workdir {workdir} cannot be created: {e.strerror or e}') from e
    if not os.access(wd, os.W_OK | os.X_OK):
      raise WorkdirError(f'workdir {workdir} is not writable')
    return wd
  fs, path = check_bucket(wd, f'workdir {workdir}')
  if not create and not fs.exists(path):
    raise FileNotFoundError(f'workdir {workdir} does not exist')
  return wd


def check_not_a_run(workdir: str, mode: str) -> None:
  """A WorkdirError when `workdir` holds a training run (its config.json): a mode that writes its
  own files (a report, an ensemble, a sweep's points) would mix them into that run."""
  if exists(join(canonical(workdir), 'config.json')):
    raise WorkdirError(f'--workdir={workdir} holds a training run (config.json); --mode={mode} '
                       'writes its own files there: give it a workdir of its own '
                       + ('(its points train in folders under it)' if mode == 'sweep' else
                          '(the runs it reads are named by the config, not by --workdir)'))


def check_bucket(url: str, what: str):
  """(filesystem, path) of the bucket URL `url` after one look at its bucket: a WorkdirError
  beginning with `what` (e.g. 'workdir gs://b/run') when the bucket cannot be reached (no
  credentials, no network) or does not exist."""
  fs, path = _fs(url)
  bucket = path.split('/')[0]
  try:
    found = fs.exists(bucket)
  except Exception as e:  # pylint: disable=broad-except  # auth and transport errors vary
    raise WorkdirError(f'{what}: cannot reach the bucket {bucket!r} '
                       f'({type(e).__name__}: {str(e)[:200]}). Credentials: gcloud auth '
                       'application-default login, or GOOGLE_APPLICATION_CREDENTIALS') from e
  if not found:
    raise WorkdirError(f'{what}: the bucket {bucket!r} does not exist (or these '
                       'credentials cannot see it); create it first (gcloud storage buckets '
                       f'create gs://{bucket})')
  return fs, path


# -- logs ---------------------------------------------------------------------------------------
class JsonlLog:
  """An append-only JSONL file (see the module doc for buckets). `keep_steps` drops existing
  records with `step` > that value (and torn lines) when the log is opened."""

  def __init__(self, path: str, keep_steps: int | None = None, flush_secs: float = 30.0):
    self.path, self.flush_secs = path, flush_secs
    self._remote = is_remote(path)
    self._lines: list[str] = []
    self._last = time.monotonic()
    self._f = None
    old = read_text(path).splitlines() if exists(path) else []
    kept = old if keep_steps is None else [l for l in old if _step_le(l, keep_steps)]
    if self._remote:
      self._lines = [l + '\n' for l in kept]
      if len(kept) != len(old):
        self.flush()
      return
    if len(kept) != len(old):
      write_text(path, ''.join(l + '\n' for l in kept))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    self._f = builtins.open(path, 'a', buffering=1)

  def append(self, record: dict, sync: bool = False) -> None:
    line = json.dumps(record) + '\n'
    if not self._remote:
      self._f.write(line)
      if sync:
        self._f.flush()
        os.fsync(self._f.fileno())
      return
    self._lines.append(line)
    if sync or time.monotonic() - self._last > self.flush_secs:
      self.flush()

  def flush(self) -> None:
    if self._remote:
      write_text(self.path, ''.join(self._lines))
      self._last = time.monotonic()
    elif self._f is not None:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if self._f is not None:
      self._f.close()
      self._f = None


def _step_le(line: str, last: int) -> bool:
  try:
    return int(json.loads(line)['step']) <= last
  except (ValueError, KeyError, TypeError):
    return False  # a line torn by a crash


# -- the one-writer lock --------------------------------------------------------------------------
def _holder_info(extra: dict | None = None) -> dict:
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now().isoformat(timespec='seconds'), **(extra or {})}


def _busy(workdir: str, who: str) -> WorkdirError:
  return WorkdirError(
      f'workdir {workdir} is already being trained by {who}. Two trainings on one workdir '
      'would interleave their checkpoints and logs: wait for that run to finish (or stop it), '
      'or train in another --workdir.')


class WorkdirLock:
  """Exclusive lock of a workdir for one training process: `WORKDIR/.train.lock` (see the
  module doc). `acquire` raises WorkdirError naming the holder; `lost` turns true if a remote
  lease was taken over (the trainer then stops before writing)."""

  NAME = '.train.lock'

  def __init__(self, workdir):
    self.workdir = canonical(workdir)
    self.file = join(self.workdir, self.NAME)
    self._fd = None
    self._dfd = None
    self._info = None
    self._gcs = None
    self.lost = False

  def acquire(self) -> None:
    if self.workdir.startswith('gs://'):
      self._gcs = _GcsLease(self.file, self.workdir)
      self._gcs.acquire()
      return
    if is_remote(self.workdir):
      log.warning('workdir %s: the one-writer lock is not enforced on this store (no '
                  'conditional writes); make sure no other training uses it', self.workdir)
      return
    # The kernel's lock is on the workdir directory itself, held through an open descriptor
    # for the run's life: deleting (or replacing) .train.lock cannot break it, and a killed
    # holder never leaves it stuck. .train.lock names the holder (host, pid, start).
    dfd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(dfd)
      raise _busy(self.workdir, self._holder()) from None
    except OSError:  # a filesystem without directory locks (NFS): the file's lock below
      os.close(dfd)
      dfd = None
    self._dfd = dfd
    fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      self.release()
      raise _busy(self.workdir, self._holder()) from None
    self._info = _holder_info()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self._info).encode(), 0)
    self._fd = fd

  def _holder(self) -> str:
    """Who holds the lock: .train.lock's record, else (that file deleted) the process the
    kernel lists in /proc/locks for the workdir on this host."""
    try:
      with builtins.open(self.file, 'rb') as f:
        h = json.loads(f.read(4096).decode(errors='replace'))
      return f'pid {h["pid"]} on {h["host"]}, started {h["since"]}'
    except (OSError, ValueError, KeyError, TypeError):
      pass
    pid = _flock_pid(self.workdir)
    if pid:
      return (f'pid {pid} on {socket.gethostname()} (its {self.NAME}, which names the holder, '
              'was deleted)')
    return 'another process'
  @property
  def held(self) -> bool:
    return self._fd is not None or (self._gcs is not None and not self._gcs.lost)

  def check(self) -> None:
    """Raises WorkdirError if a remote lease was lost (someone took the workdir over)."""
    if self._fd is not None and not os.path.exists(self.file):
      # .train.lock was deleted: the directory's lock still holds; name the holder again
      try:
        write_text(self.file, json.dumps(self._info))
      except OSError:
        pass
    if self._gcs is not None and self._gcs.lost:
      raise WorkdirError(f'workdir {self.workdir}: this run lost its lock ({self._gcs.lost}); '
                         'stopping without writing more')

  def release(self) -> None:
    for attr in ('_fd', '_dfd'):
      fd = getattr(self, attr)
      if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        setattr(self, attr, None)
    if self._gcs is not None:
      self._gcs.release()
      self._gcs = None


def _flock_pid(path: str) -> int | None:
  """The pid /proc/locks gives for a FLOCK on `path`'s inode (Linux), else None."""
  try:
    st = os.stat(path)
    with builtins.open('/proc/locks') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  for line in lines:
    parts = line.split()
    if len(parts) > 5 and parts[1] == 'FLOCK' and parts[5].split(':')[-1] == str(st.st_ino):
      try:
        return int(parts[4])
      except ValueError:
        return None
  return None


class _GcsLease:
  """The gs:// lock object: created only if absent (ifGenerationMatch=0), renewed and deleted
  only at the generation this process wrote (ifGenerationMatch=<ours>), taken over only from
  an expired lease at the generation read (so two contenders cannot both win)."""

  def __init__(self, url: str, workdir: str):
    self.url, self.workdir = url, workdir
    self.lease = float(os.environ.get(LEASE_ENV, '120'))
    self.owner = uuid.uuid4().hex
    self.generation = None
    self.lost = ''
    self._stop = threading.Event()
    self._thread = None
    bucket, _, name = url[len('gs://'):].partition('/')
    self._blob = _gcs_client().bucket(bucket).blob(name)

  def _body(self) -> str:
    return json.dumps(_holder_info({'owner': self.owner,
                                    'expires': time.time() + self.lease}))

  def acquire(self) -> None:
    """Takes the lock. A lease that missed a renewal (its holder is probably gone, e.g. a
    preempted slice) is waited for until it expires and then taken over; a live holder's is
    refused at once."""
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    while True:
      try:
        self._blob.upload_from_string(self._body(), if_generation_match=0)
        break
      except gexc.PreconditionFailed:
        pass
      blob = self._blob.bucket.get_blob(self._blob.name)
      if blob is None:  # released meanwhile
        continue
      try:
        h = json.loads(blob.download_as_text())
      except ValueError:
        h = {}
      left = float(h.get('expires', 0)) - time.time()
      if left <= 0:
        try:  # an expired lease: take it over, at the generation just read
          self._blob.upload_from_string(self._body(), if_generation_match=blob.generation)
          break
        except gexc.PreconditionFailed:
          raise _busy(self.workdir, 'another process (it took the expired lock first)') from None
      who = f'pid {h.get("pid")} on {h.get("host")}, started {h.get("since")}'
      if left > 0.7 * self.lease:  # renewed within the last renewal interval: alive
        raise _busy(self.workdir, f'{who}; its lease ends in {left:.0f} s unless renewed, so '
                    'a crashed run frees it then')
      log.warning('workdir %s: the lock of %s missed a renewal; waiting %.0f s for its lease to '
                  'end', self.workdir, who, left)
      time.sleep(min(left + 0.5, self.lease))
    self._blob.reload()
    self.generation = self._blob.generation
    self._thread = threading.Thread(target=self._renew, name='WorkdirLease', daemon=True)
    self._thread.start()

  def renew(self) -> bool:
    """One renewal of the lease at the generation this process holds; False once it was lost
    (the object replaced: another run took over an expired lease)."""
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    try:
      self._blob.upload_from_string(self._body(), if_generation_match=self.generation)
      self._blob.reload()
      self.generation = self._blob.generation
    except gexc.PreconditionFailed:
      self.lost = 'the lock object was replaced by another process'
      log.error('workdir %s: %s', self.workdir, self.lost)
      return False
    except Exception as e:  # pylint: disable=broad-except  # transient: retry at the next tick
      log.warning('workdir %s: renewing the lock failed (%s); retrying', self.workdir, e)
    return True

  def _renew(self) -> None:
    while not self._stop.wait(self.lease / 4):
      if not self.renew():
        return

  def release(self) -> None:
    from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.generation is not None and not self.lost:
      try:
        self._blob.delete(if_generation_match=self.generation)
      except (gexc.PreconditionFailed, gexc.NotFound):
        pass


def _gcs_client():
  from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
    return gcs.Client(credentials=AnonymousCredentials(), project='notoklm-emulator')
  return gcs.Client()
