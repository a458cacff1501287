"""Test-only hooks named by the environment: `installed(ENV)` is the function that `$ENV` names
('package.module:function' or 'path/to/file.py:function'), or None. Production runs set none;
the test suite wraps a piece of the code this way (the trainer's gradients:
tests/fault_injection.py; the lm-eval adapter's per-process scoring: tests/lm_eval_faults.py)
in the test process and in launch.py subprocesses alike, so the production code carries no test
branches."""
from __future__ import annotations

import importlib
import importlib.util
import os

_LOADED: dict[str, object] = {}


def installed(env: str):
  """The function `$env` names (loaded once per spec), or None when `$env` is unset."""
  spec = os.environ.get(env, '')
  if not spec:
    return None
  if spec not in _LOADED:
    where, _, name = spec.rpartition(':')
    if not where or not name:
      raise ValueError(f'${env}={spec!r}: expected module:function or path/to/file.py:function')
    if where.endswith('.py'):
      module_spec = importlib.util.spec_from_file_location(
          os.path.splitext(os.path.basename(where))[0], where)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
    else:
      module = importlib.import_module(where)
    _LOADED[spec] = getattr(module, name)
  return _LOADED[spec]
