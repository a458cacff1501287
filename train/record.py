"""A run's record: what it is, fixed at its start, and the one policy for every later command.

The workdir is the run. At its start the trainer writes `run.json`: the resolved config, the
data fingerprint (data/fingerprint.py: content hashes of local files, generations of bucket
objects, the embedded corpus's builder), the recorded artifacts (the tokenizer; their manifest)
and the code commit. `config.json` is the run's current config: it changes only through a
resume that changes a key, and each change is a line of `config_history.jsonl` (step, key, old,
new, explicit). Records are append-only:

* **A resume** compares the new config with `config.json`. Keys in `RESUME_FREE` (extending
  `train.steps`, log / eval / checkpoint cadence, evaluation and sampling settings, the mesh)
  pass and go to the history; any other changed key is refused, naming each, unless
  `--allow_config_change=KEY[,KEY...]` (launch.py's train flag; `optim.*` style prefixes too)
  allows it explicitly: it is then written to the history with the step it took effect. The
  data fingerprint is compared too: a data file edited in place is refused, naming the file
  (`--allow_config_change=data.fingerprint` accepts it).
* **A finished run with nothing to do** (its latest checkpoint and summary at or past
  `train.steps`) says so and writes nothing.
* **train_seconds** accumulates across resumes (`train_time.jsonl`: seconds at every checkpoint).
* **Later modes** (eval, sample, evaluator, export: `Mode.reads_run`) start from the run's
  `config.json`; the command line's config file is not used, its `--config.KEY=VALUE` overrides
  are applied on top. An override of a key in `FIXED_AFTER_TRAINING` (the model's shape, its
  tokenizer and context) that differs from the record is refused, naming the key; any other
  (another data source or split, `train.eval_batches`, `eval.*`, `evals.*`, `sample.*`) is
  applied and written into the result.
* **Evaluations** (`eval_step{N}.json`) carry `record`: the data fingerprint, the batches, and
  the overrides. `eval_step{N}.json` itself is the largest evaluation of the run's own data (the
  whole split first); any other, or a smaller one, is written beside it as
  `eval_step{N}.<key>.json` and never replaces it (`--mode=report` reads `eval_step{N}.json`).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import subprocess
import time
from typing import Any

from train import config_lib, storage

log = logging.getLogger(__name__)

RUN = 'run.json'
HISTORY = 'config_history.jsonl'
TRAIN_TIME = 'train_time.jsonl'
READS = 'data_reads'  # per process: what each launch read of a streamed corpus
DATA_KEY = 'data.fingerprint'  # the name --allow_config_change uses for the data's content

# Patterns: 'a.b' is the key and its sub-keys, 'a.' / 'a*' every key starting so.
RESUME_FREE = (
    'train.steps', 'train.flops_budget', 'train.eval_count', 'train.log_every',
    'train.eval_every', 'train.eval_batches', 'train.nan_policy', 'ckpt.', 'eval.', 'evals.',
    'sample.', 'mesh.', 'data.prefetch', 'data.data_dir', 'dynamic*', 'report.', 'ensemble.')
NOT_COMPARED = ('config_file', 'preset')  # provenance: where the values came from
FIXED_AFTER_TRAINING = (
    'family', 'model.', 'data.seq_len', 'data.encoder', 'data.vocab_size', 'data.max_words',
    'data.max_word_bytes', 'data.max_sentence_bytes')
# data keys that do not change which documents are read
_DATA_NEUTRAL = ('data.prefetch', 'data.workers', 'data.data_dir', 'data.shuffle', 'data.train_split')


def matches(key: str, patterns) -> bool:
  for p in patterns:
    if p.endswith(('.', '*')):
      if key.startswith(p.rstrip('*')):
        return True
    elif key == p or key.startswith(p + '.'):
      return True
  return False


def _flat(cfg) -> dict[str, Any]:
  return dict(config_lib._flat_items(cfg))  # pylint: disable=protected-access


def diff(old, new) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} of every key whose value differs (`NOT_COMPARED` aside)."""
  a, b = _flat(old), _flat(new)
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not matches(k, NOT_COMPARED) and norm(a.get(k)) != norm(b.get(k))}


def saved_config(workdir: str):
  """The run's config (config.json over its config file's defaults), or None: no run yet."""
  if not storage.exists(storage.join(workdir, 'config.json')):
    return None
  return config_lib.load_saved(workdir)


def code_commit() -> str:
  """The code's git commit (with '+dirty' when the tree has changes), else 'unknown'."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                          text=True, timeout=10)
    if head.returncode != 0:
      return 'unknown'
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                           capture_output=True, text=True, timeout=10)
    return head.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def read_run(workdir: str) -> dict:
  path = storage.join(workdir, RUN)
  return storage.read_json(path) if storage.exists(path) else {}


def write_run(workdir: str, cfg, data: dict, step: int = 0, new: bool = True) -> None:
  """Writes `run.json`, the run's identity: at a run's start (`new`), or once for a run
  recorded before run.json existed (then `recorded_at_step` says when)."""
  path = storage.join(workdir, RUN)
  if not new and storage.exists(path):
    return
  manifest_path = storage.join(workdir, 'artifacts', 'manifest.json')
  storage.write_json(path, {
      'config': cfg.to_dict(), 'data': data,
      'artifacts': storage.read_json(manifest_path) if storage.exists(manifest_path) else {},
      'code': code_commit(), 'started': datetime.datetime.now().isoformat(timespec='seconds'),
      'recorded_at_step': step})


def _append_lines(path: str, rows: list[dict]) -> None:
  old = storage.read_text(path) if storage.exists(path) else ''
  if old and not old.endswith('\n'):
    old += '\n'
  storage.write_text(path, old + ''.join(json.dumps(r, default=str) + '\n' for r in rows))


def _read_lines(path: str) -> list[dict]:
  if not storage.exists(path):
    return []
  out = []
  for line in storage.read_text(path).splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


def _allowed(key: str, allow) -> bool:
  return matches(key, [a.strip() for a in allow if a.strip()])


def check_resume(workdir: str, saved, cfg, allow=()) -> list[dict]:
  """The changes of a resume (rows for the history), or a ConfigError naming every changed key
  that decides what the run trains and is not allowed explicitly."""
  changes = diff(saved, cfg)
  refused = [k for k in changes if not matches(k, RESUME_FREE) and not _allowed(k, allow)]
  if refused:
    what = ', '.join(f'{k} ({changes[k][0]!r} -> {changes[k][1]!r})' for k in refused)
    raise config_lib.ConfigError(
        f'resuming {workdir} with a changed {what}: the run recorded '
        f'{"this key" if len(refused) == 1 else "these keys"} at its start (config.json). Keep '
        'the recorded value(s), train a new run in another --workdir, or allow the change '
        f'explicitly with --allow_config_change={",".join(refused)} (written to {HISTORY} '
        'with the step it takes effect)')
  return [{'key': k, 'old': o, 'new': n, 'explicit': not matches(k, RESUME_FREE)}
          for k, (o, n) in changes.items()]


def check_data(workdir: str, data: dict, allow=()) -> list[dict]:
  """Compares the data fingerprint with the run's record: a ValueError naming each changed
  file, unless `data.fingerprint` is allowed (then the history rows)."""
  recorded = read_run(workdir).get('data')
  if not recorded:
    return []
  from data import fingerprint  # pylint: disable=import-outside-toplevel
  changed = fingerprint.differences(recorded, data)
  if not changed:
    return []
  if not _allowed(DATA_KEY, allow):
    from train import checkpoint  # pylint: disable=import-outside-toplevel
    raise checkpoint.CheckpointError(
        f'the training data changed since this run recorded it ({RUN}): '
        + '; '.join(changed) + '. Restore the data the run was trained on, train a new run in '
        f'another --workdir, or resume on the changed data with '
        f'--allow_config_change={DATA_KEY} (written to {HISTORY})')
  return [{'key': DATA_KEY, 'old': recorded.get('hash'), 'new': data.get('hash'),
           'explicit': True, 'what': changed}]


def append_history(workdir: str, step: int, rows: list[dict]) -> None:
  if rows:
    _append_lines(storage.join(workdir, HISTORY), [{'step': step, **r} for r in rows])


def history(workdir: str) -> list[dict]:
  return _read_lines(storage.join(workdir, HISTORY))


def finished(workdir: str, latest: int | None, steps: int) -> dict | None:
  """The run's summary when it has nothing left to do: its latest checkpoint is at or past
  `steps` and its summary records that step. None otherwise."""
  if latest is None or latest < steps:
    return None
  path = storage.join(workdir, 'train_summary.json')
  if not storage.exists(path):
    return None
  summary = storage.read_json(path)
  return summary if summary.get('step') == latest else None


def append_reads(workdir: str, process_index: int, row: dict) -> None:
  """Appends one launch's reads of a streamed corpus (`Family.data_reads`, with the steps it
  trained) to this process's `data_reads/process_<i>.jsonl`: which objects, how many bytes."""
  _append_lines(storage.join(workdir, READS, f'process_{process_index}.jsonl'), [row])


def reads(workdir: str) -> dict[int, list[dict]]:
  """{process index: its launches' rows} of `append_reads`."""
  d = storage.join(workdir, READS)
  return {int(n[len('process_'):-len('.jsonl')]): _read_lines(storage.join(d, n))
          for n in sorted(storage.listdir(d)) if n.startswith('process_')}


def train_seconds_at(workdir: str, step: int | None) -> float:
  """The training seconds recorded at checkpoint `step` (0: a new run)."""
  if not step:
    return 0.0
  rows = [r for r in _read_lines(storage.join(workdir, TRAIN_TIME)) if r.get('step') == step]
  return float(rows[-1]['train_seconds']) if rows else 0.0


def log_train_time(workdir: str, step: int, seconds: float) -> None:
  _append_lines(storage.join(workdir, TRAIN_TIME), [{'step': step, 'train_seconds': seconds}])


# -- later modes ----------------------------------------------------------------------------

def later_config(workdir: str, cfg, overrides: dict, mode: str, wait_seconds: float = 0.0):
  """The config a mode that reads the run in `workdir` works from: the run's recorded config
  with the command line's overrides on top (see the module doc). Without a record (no
  config.json: a pretrained model evaluated in a new workdir, a path that holds no run), `cfg`
  as given: the mode itself then says what is missing. `wait_seconds`: how long to wait for a
  run that is starting (the evaluator beside its training)."""
  if storage.is_remote(workdir):  # the bucket and the credentials first, in one message
    storage.check_bucket(storage.canonical(workdir), f'workdir {workdir}')
  path = storage.join(storage.canonical(workdir), 'config.json')
  deadline = time.monotonic() + wait_seconds
  if wait_seconds and not storage.exists(path):
    from train.metrics import log0  # pylint: disable=import-outside-toplevel
    log0(f'--mode={mode}: waiting up to {wait_seconds:.0f} s for a run in {workdir} (no '
         'config.json yet; --max_idle_seconds sets the wait)')
  while wait_seconds and not storage.exists(path):
    if time.monotonic() > deadline:
      where = 'does not exist' if not storage.exists(workdir) else 'holds no run (no config.json)'
      raise FileNotFoundError(f'workdir {workdir} {where} after {wait_seconds:.0f} s of '
                              f'waiting: --mode={mode} follows a training run; check --workdir')
    time.sleep(min(0.5, wait_seconds))
  if not storage.exists(path):
    return cfg
  run_cfg = config_lib.load_saved(workdir)
  # the device layout is this process's own (an eval on 1 device of a run trained on 8): the
  # mesh comes from the command line, never from the record
  config_lib.override(run_cfg, {f'mesh.{k}': v for k, v in cfg.mesh.items()})
  applied = copy.deepcopy(run_cfg)
  try:
    config_lib.override(applied, overrides)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f'{e} (in the config the run in {workdir} recorded, which '
                                 f'--mode={mode} starts from)') from None
  changes = diff(run_cfg, applied)
  fixed = [k for k in changes if matches(k, FIXED_AFTER_TRAINING)]
  if fixed:
    k = fixed[0]
    raise config_lib.ConfigError(
        f'--config.{k}={changes[k][1]!r}: the run in {workdir} was trained with {k}='
        f'{changes[k][0]!r}, and --mode={mode} starts from its recorded config (config.json); '
        "a finished run's model shape, tokenizer and context cannot change (drop the "
        'override, or train a new run)')
  config_lib.validate(applied)
  given = f"{cfg.get('config_file', '')}:{cfg.get('preset', '')}"
  recorded = f"{run_cfg.get('config_file', '')}:{run_cfg.get('preset', '')}"
  from train.metrics import log0  # pylint: disable=import-outside-toplevel
  log0(f'--mode={mode}: the run\'s recorded config ({workdir}/config.json, {recorded})'
       + (f' (not --config={given})' if given != recorded else '')
       + (': with ' + ', '.join(f'{k}={v[1]!r}' for k, v in changes.items()) if changes else ''))
  return applied


def recorded_steps(workdir: str) -> int | None:
  saved = saved_config(workdir)
  return None if saved is None else int(saved.train.steps)


# -- evaluations ----------------------------------------------------------------------------

def eval_record(workdir: str, cfg) -> dict:
  """What an evaluation measured: the data (fingerprint), the batches, the overrides of the
  run's recorded config, and whether the data is the run's own."""
  from data import fingerprint  # pylint: disable=import-outside-toplevel
  data = fingerprint.source(cfg.data)
  saved = saved_config(workdir)
  overrides = ({k: v[1] for k, v in diff(saved, cfg).items() if not k.startswith('mesh.')}
               if saved is not None else {})
  run_data = read_run(workdir).get('data')
  own = (not any(k.startswith('data.') and not matches(k, _DATA_NEUTRAL) for k in overrides)
         and (not run_data or not fingerprint.differences(run_data, data)))
  return {'data': {'source': data['source'], 'fingerprint': data['hash']},
          'eval_batches': int(cfg.train.eval_batches), 'overrides': overrides,
          'own_data': bool(own)}


def _size(ev: dict) -> tuple:
  rec = ev.get('record') or {}
  return (rec.get('eval_batches') == 0, float(ev.get('n_bytes') or ev.get('n_tokens') or 0))


def _key(ev: dict) -> str:
  rec = ev.get('record')
  text = json.dumps(rec if rec else ev, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def write_eval(workdir: str, step: int, ev: dict) -> str:
  """Writes the evaluation `ev` (with its `record`) of `step`; returns the path. The run's own
  data, at least as large as what `eval_step{step}.json` holds: that file (what it held moves
  beside it under its key). Anything else: `eval_step{step}.<key>.json`."""
  main = storage.join(workdir, f'eval_step{step}.json')
  keyed = lambda e: storage.join(workdir, f'eval_step{step}.{_key(e)}.json')
  rec = ev.get('record') or {}
  if not storage.exists(main):
    if rec.get('own_data', True):
      storage.write_json(main, ev)
      return main
    storage.write_json(keyed(ev), ev)
    return keyed(ev)
  old = storage.read_json(main)
  old_rec = old.get('record') or {}
  same = old_rec == rec
  takes_main = rec.get('own_data', True) and (
      same or not old_rec.get('own_data', False) or _size(ev) >= _size(old))
  if not takes_main:
    storage.write_json(keyed(ev), ev)
    return keyed(ev)
  if not same:
    storage.write_json(keyed(old), old)  # kept beside: never lost
  storage.write_json(main, ev)
  return main
