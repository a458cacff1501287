"""A fork server for the tests' launch.py runs (`conftest.run_launch`).

Every launch.py subprocess of the suite used to pay ~2 s of CPU importing jax, flax, optax,
orbax, TFDS and the project before doing anything; the suite starts about a hundred of them.
This server imports those modules once, without starting jax's backend or any thread, and
forks a child per run. The child then becomes what `python launch.py ARGS` would be:

  * the caller's environment (exactly), working directory, argv and sys.path[0];
  * stdin from /dev/null, stdout and stderr into the caller's files (unbuffered when the
    environment says PYTHONUNBUFFERED, as `python` would);
  * `launch.py` run as `__main__` (runpy), then the interpreter's own exit: non-daemon threads
    joined, atexit handlers run, SystemExit / an uncaught exception turned into the exit status
    exactly as `python launch.py` does (`os._exit` in launch.py ends it at once, as it would);
  * Python's and numpy's global random generators reseeded from the OS, as at a fresh start.

jax's backend starts in the child, after the environment is set, so XLA_FLAGS (device count,
optimisation level) are the run's. What a fork cannot redo: the hash seed of str (one per
server, random per server) and the values of environment variables read while importing
(jax's JAX_* flags): `conftest` falls back to a plain subprocess when the run's JAX_* or
PYTHON* variables differ from the server's.

Protocol (one connection per run, on a Unix socket): the client sends one JSON line
{argv, env, cwd, stdout, stderr}; the server answers {"pid": N} once the child exists and
{"returncode": R} when it has ended (R = -signal for a child killed by a signal, as
subprocess reports it). Runs may overlap (the processes of one jax.distributed run). The
server ends when its parent (the pytest process that started it) is gone.

  python tests/launch_server.py SOCKET_PATH
"""
import json
import os
import select
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch.py')
# what a launch.py run of any family imports before its work starts (none starts a Python
# thread or jax's backend: the server says so when ready, and conftest checks it)
PRELOAD = ('launch', 'numpy', 'jax', 'jax.numpy', 'flax.nnx', 'optax', 'orbax.checkpoint',
           'ml_collections', 'tensorboardX', 'tensorflow_datasets', 'train.config_lib',
           'train.modes', 'train.launching', 'train.trainer', 'train.checkpoint', 'train.record',
           'train.families', 'data.corpus', 'data.encoders', 'data.pipeline', 'models')


def _preload():
  import importlib  # pylint: disable=import-outside-toplevel
  for name in PRELOAD:
    importlib.import_module(name)
  from train import modes  # pylint: disable=import-outside-toplevel
  for name in modes.names():
    importlib.import_module(f'train.modes.{name}')


def _child(req):
  """In the forked child: become `python launch.py ARGS` (returns to main, which runs it)."""
  import io  # pylint: disable=import-outside-toplevel
  import random  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel
  os.environ.clear()
  os.environ.update(req['env'])
  os.chdir(req['cwd'])
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  for fd, path in ((1, req['stdout']), (2, req['stderr'])):
    if fd == 2 and path == req['stdout']:  # stderr=STDOUT: one file description, one offset
      os.dup2(1, 2)
      continue
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
  unbuffered = bool(req['env'].get('PYTHONUNBUFFERED'))
  sys.stdin = io.TextIOWrapper(io.FileIO(0, 'r', closefd=False), encoding='utf-8')
  sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), encoding='utf-8',
                                line_buffering=False, write_through=unbuffered)
  sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), encoding='utf-8',
                                errors='backslashreplace', line_buffering=True,
                                write_through=True)
  sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
  random.seed()
  np.random.seed()
  sys.argv = [LAUNCH, *req['argv']]
  sys.path[0] = ROOT


def serve(path):
  """Forks a child per request (several may run at once, e.g. the processes of one
  jax.distributed run); returns the request in a child, None when the parent is gone."""
  parent = os.getppid()
  srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  srv.bind(path)
  srv.listen(16)
  import threading  # pylint: disable=import-outside-toplevel

  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  # forking is safe only from one thread, and jax's backend must start in each child
  print(f'ready threads={threading.active_count()} backends={len(xla_bridge._backends)}',
        flush=True)
  children = {}  # pid -> the connection its exit status goes to
  while True:
    ready, _, _ = select.select([srv], [], [], 0.05 if children else 1.0)
    if ready:
      conn, _ = srv.accept()
      conn.settimeout(30)  # a client that connected but never sent a request is dropped
      try:
        req = json.loads(conn.makefile('r').readline())
      except (OSError, ValueError):
        conn.close()
        continue
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        for c in (srv, conn, *children.values()):
          c.close()
        _child(req)
        return req
      conn.sendall((json.dumps({'pid': pid}) + '\n').encode())
      children[pid] = conn
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
      conn = children.pop(pid)
      try:
        conn.sendall((json.dumps({'returncode': rc}) + '\n').encode())
      except OSError:
        pass  # the client is gone
      conn.close()
    if not children and os.getppid() != parent:  # the pytest process is gone
      return None


def main():
  sys.path[0] = ROOT  # as for `python launch.py`: the repository first, not tests/
  _preload()
  if serve(sys.argv[1]) is None:
    return
  import runpy  # pylint: disable=import-outside-toplevel
  runpy.run_path(LAUNCH, run_name='__main__')  # its SystemExit / exception ends the child


if __name__ == '__main__':
  main()
