"""Where a run's files live: paths, atomic writes, and the one-writer lock of a workdir.

Every file a run reads or writes (config.json, summaries, metrics, artifacts, checkpoints)
goes through these helpers, so a workdir is one place with one set of rules:
  * `path(p)`: the workdir as an `etils.epath.Path` (the path type orbax and TFDS use);
  * `write_text(p, text)`: atomic (a reader sees the old file or the new one, never a part);
  * `WorkdirLock`: one training process per workdir. A second training on the same workdir
    is refused with the holder named; a crashed holder never leaves it stuck (the lock is an
    OS file lock, released when the process dies).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket

from etils import epath


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (busy, a file, not writable): the user must act."""


def path(p) -> epath.Path:
  """`p` as an epath.Path; a local path becomes absolute (user home expanded)."""
  if isinstance(p, epath.Path):
    return p
  return epath.Path(os.path.abspath(os.path.expanduser(str(p))))


def write_text(p, text: str) -> None:
  """Writes `text` to `p` atomically: a temporary file renamed over the target."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f'.{p.name}.tmp{os.getpid()}'
  tmp.write_text(text)
  tmp.replace(p)


def write_json(p, obj) -> None:
  write_text(p, json.dumps(obj, indent=2) + '\n')


def read_json(p):
  return json.loads(path(p).read_text())


def prepare_workdir(workdir, create: bool = True) -> epath.Path:
  """The workdir, created if `create`; a WorkdirError naming it when it is a file, cannot be
  created or is not writable."""
  wd = path(workdir)
  if wd.exists() and not wd.is_dir():
    raise WorkdirError(f'workdir {workdir} is a file, not a directory')
  if not create:
    if not wd.exists():
      raise FileNotFoundError(f'workdir {workdir} does not exist')
    return wd
  try:
    wd.mkdir(parents=True, exist_ok=True)
  except (OSError, NotADirectoryError) as e:
    raise WorkdirError(f'workdir {workdir} cannot be created: {e.strerror or e}') from e
  if not os.access(str(wd), os.W_OK | os.X_OK):
    raise WorkdirError(f'workdir {workdir} is not writable')
  return wd


class WorkdirLock:
  """Exclusive lock of a workdir for one training process (`WORKDIR/.train.lock`, an OS file
  lock holding the holder's pid, host and start time). `acquire` raises WorkdirError naming the
  holder when another process has it."""

  NAME = '.train.lock'

  def __init__(self, workdir):
    self.file = path(workdir) / self.NAME
    self._fd = None

  def acquire(self) -> None:
    fd = os.open(str(self.file), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip()
      os.close(fd)
      try:
        h = json.loads(holder)
        who = f'pid {h["pid"]} on {h["host"]}, started {h["since"]}'
      except (ValueError, KeyError, TypeError):
        who = 'another process'
      raise WorkdirError(
          f'workdir {self.file.parent} is already being trained by {who}. Two trainings on '
          'one workdir would interleave their checkpoints and logs: wait for that run to '
          'finish (or stop it), or train in another --workdir.') from None
    info = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                       'since': datetime.datetime.now().isoformat(timespec='seconds')})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  @contextlib.contextmanager
  def held(self):
    self.acquire()
    try:
      yield self
    finally:
      self.release()
