"""Entry point for every family and mode.

  python launch.py --config=configs/byte_lm.py:tiny --workdir=runs/byte_tiny [--mode=MODE]
      [--config.optim.lr=1e-3 ...] [the mode's flags]

This file is the general flags, the dispatch and the handling of a user's mistakes. The modes
are the modules of train/modes/, found by name (`--help` lists them, with their own flags);
the dispatcher (train/modes/__init__.py) checks the families a mode accepts and starts
jax.distributed for the modes that use devices. Multi-host: on a SLURM step or a TPU pod slice
jax.distributed starts from the environment; elsewhere pass --coordinator=HOST:PORT
--num_processes=N --process_id=I (or set NOTOKLM_COORDINATOR / NOTOKLM_NUM_PROCESSES /
NOTOKLM_PROCESS_ID). See train/launching.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse(argv):
  from train import config_lib, modes
  overrides, rest = config_lib.parse_argv_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='configs/FILE.py[:preset]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--debug', action='store_true',
                 help="show the traceback of an error that is reported as the user's mistake")
  p.add_argument('--coordinator', default=os.environ.get('NOTOKLM_COORDINATOR'))
  p.add_argument('--num_processes', type=int,
                 default=int(os.environ.get('NOTOKLM_NUM_PROCESSES', '0')) or None)
  p.add_argument('--process_id', type=int,
                 default=int(os.environ['NOTOKLM_PROCESS_ID'])
                 if 'NOTOKLM_PROCESS_ID' in os.environ else None)
  modes.add_flags(p)  # --mode and every mode's own flags
  args = p.parse_args(rest)
  modes.check_flags(args)  # another mode's flag would be silently ignored
  if not args.workdir.strip():  # '' would be the current directory: the run's files land there
    raise config_lib.ConfigError(f'--workdir={args.workdir!r} is empty: name the run\'s '
                                 'directory (e.g. --workdir=runs/byte_tiny)')
  return args, overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  debug = '--debug' in argv
  if not debug:
    _quiet_background_errors()
  from train import config_lib
  try:
    args, overrides = parse(argv)
    cfg, module = config_lib.load(args.config)
    config_lib.override(cfg, overrides)
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    return _main(args, cfg, module, overrides)
  except config_lib.ConfigError as e:
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (which checkpoints itself)
    if debug:
      raise
    print(f'interrupted (SIGINT){": " + str(e) if str(e) else ""}', file=sys.stderr, flush=True)
    return 130
  except _user_errors() as e:
    if debug:
      raise
    # a user's mistake (a bad input, a busy or unusable workdir, a checkpoint to act on, a
    # stopped non-finite step): one paragraph, no traceback. Leave at once: a failed async
    # checkpoint write leaves orbax threads whose shutdown would bury the message.
    print(f'error: {_message(e)}\n(--debug shows the traceback)', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _quiet_background_errors() -> None:
  """A failed asynchronous checkpoint write (full disk, read-only directory) makes orbax's
  writer threads log their tracebacks and leaves asyncio callbacks on a closed loop: hundreds of
  lines before the one message that matters. Without --debug those lines are dropped (the
  errors themselves still end the run with the message)."""
  class _NoTraceback(logging.Filter):
    def filter(self, record):
      record.exc_info, record.exc_text = None, None
      return True

  for name in ('absl', 'gcsfs', 'google'):  # a bucket's transport errors: the message says it
    logging.getLogger(name).addFilter(_NoTraceback())
  default = sys.unraisablehook

  def unraisable(u):
    if isinstance(u.exc_value, RuntimeError) and 'Event loop is closed' in str(u.exc_value):
      return
    # reads of an unreadable checkpoint left pending by orbax after the fallback already said
    # which step it skipped and why
    tb, files = u.exc_traceback, []
    while tb is not None:
      files.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    if 'TensorStore' in str(u.exc_value) or any('orbax' in f for f in files):
      return
    default(u)

  sys.unraisablehook = unraisable


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that report a user's mistake (the code raises them with a message naming the
  input); anything else is a bug and keeps its traceback."""
  from train import checkpoint, storage  # pylint: disable=import-outside-toplevel
  return (ValueError, OSError, FloatingPointError, TimeoutError, checkpoint.CheckpointError,
          storage.WorkdirError)


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror or ''):
    return f'{e.strerror or type(e).__name__}: {e.filename}'
  return str(e) or type(e).__name__


def _main(args, cfg, module, overrides) -> int:
  from train import modes
  return modes.run(args, cfg, module, overrides)


if __name__ == '__main__':
  sys.exit(main())
