"""Test-only wrappers of the lm-eval adapter's per-process scoring (train/evals/lm_eval.py,
`installed_wrapper`), installed through the environment so that launch.py subprocesses get them
too (the production code has no test branches):

  NOTOKLM_LM_EVAL_WRAPPER=tests/lm_eval_faults.py:fail
  NOTOKLM_FAULT_LM_EVAL=1:generate_until   # process 1 raises when it scores generate_until

  NOTOKLM_LM_EVAL_WRAPPER=tests/lm_eval_faults.py:record
  NOTOKLM_FAULT_LM_EVAL_RECORD=DIR         # each process appends what it scored to
                                           # DIR/process_I.jsonl: {what, items, results}

`fail_environment` / `record_environment` give the variables.
"""
import json
import os

import jax

HERE = os.path.abspath(__file__)
FAIL_ENV = 'NOTOKLM_FAULT_LM_EVAL'
RECORD_ENV = 'NOTOKLM_FAULT_LM_EVAL_RECORD'


def fail_environment(process: int, what: str) -> dict[str, str]:
  """Process `process` raises when it scores work whose description contains `what`."""
  return {'NOTOKLM_LM_EVAL_WRAPPER': f'{HERE}:fail', FAIL_ENV: f'{process}:{what}'}


def record_environment(directory: str) -> dict[str, str]:
  return {'NOTOKLM_LM_EVAL_WRAPPER': f'{HERE}:record', RECORD_ENV: str(directory)}


def fail(score, what: str):
  raw = os.environ.get(FAIL_ENV, '')
  process, _, match = raw.partition(':')
  if not process.strip().isdigit():
    raise ValueError(f'${FAIL_ENV}={raw!r}: expected PROCESS:WHAT')

  def wrapped(items):
    if jax.process_index() == int(process) and match in what:
      raise RuntimeError(f'injected fault: process {jax.process_index()} fails on its '
                         f'{len(items)} {what}')
    return score(items)

  return wrapped


def _jsonable(x):
  if isinstance(x, bytes):
    return {'bytes': x.decode('latin-1')}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  return x


def record(score, what: str):
  directory = os.environ[RECORD_ENV]

  def wrapped(items):
    out = score(items)
    if not what.startswith('token-level'):  # the token path returns device arrays
      with open(os.path.join(directory, f'process_{jax.process_index()}.jsonl'), 'a') as f:
        f.write(json.dumps({'what': what, 'items': _jsonable(list(items)),
                            'results': _jsonable(list(out))}) + '\n')
    return out

  return wrapped


def recorded(directory: str) -> dict:
  """{(what, item as JSON): result} over every process's record in `directory`."""
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name)) as f:
      for line in f:
        r = json.loads(line)
        for item, res in zip(r['items'], r['results']):
          out[(r['what'], json.dumps(item))] = res
  return out
