"""Sweeps declared in the config file: `get_sweep(config)` returns a list of override dicts
(write grids with `grid(...)`), or on the command line (`--sweep='optim.lr=1e-3,3e-3
model.num_layers=2,4'`, `--seeds=N`: `parse_spec`, `points`). Each point trains in its own
sub-workdir (resuming if it was interrupted); a summary of final metrics is written as CSV and
Markdown (with mean +- std across seeds when the sweep has a seed axis), and the runs' training
curves as a PNG."""
from __future__ import annotations

import copy
import itertools
import math
import re
import shlex

from train import config_lib, launching, storage, trainer
from train.evals import report
from train.metrics import log0


def grid(**axes) -> list[dict]:
  """grid(**{'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]}) -> product of overrides."""
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


SPEC_FILE = 'sweep.json'
SEED_KEY = 'seed'


def _split_values(key: str, text: str) -> list[str]:
  """'1e-3,3e-3' -> ['1e-3', '3e-3']; commas inside brackets or parentheses stay (a tuple)."""
  out, depth, cur = [], 0, ''
  for ch in text:
    depth += (ch in '([{') - (ch in ')]}')
    if ch == ',' and depth == 0:
      out.append(cur)
      cur = ''
    else:
      cur += ch
  out.append(cur)
  out = [v.strip() for v in out]
  if not text.strip() or any(not v for v in out):
    raise config_lib.ConfigError(f'--sweep: {key}={text!r}: an empty value; give a comma-'
                                 f'separated list, e.g. {key}=1,2')
  return out


def parse_spec(cfg, spec: str) -> dict[str, list]:
  """`--sweep='KEY=V1,V2 KEY2=V3,V4'` -> {KEY: [V1, V2], KEY2: [V3, V4]}, each value parsed to
  the key's type as a `--config.KEY=V` override is. An unknown key, a value that does not
  parse or is out of range, an empty list, a key or a value given twice is a ConfigError naming
  the key."""
  axes = {}
  for item in spec.split():
    key, eq, values = item.partition('=')
    if not eq or not key:
      raise config_lib.ConfigError(f'--sweep: {item!r} is not KEY=V1,V2,...')
    if key in axes:
      raise config_lib.ConfigError(f'--sweep: {key} is given twice')
    probe = copy.deepcopy(cfg)
    parsed = []
    for raw in _split_values(key, values):
      try:
        config_lib.override(probe, {key: raw})
        config_lib.validate(probe)
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f'--sweep: {key}={raw!r}: {e}') from None
      node = probe
      for part in key.split('.'):
        node = node[part]
      if node in parsed:  # '1e-3,0.001': one point twice, trained once, listed twice
        raise config_lib.ConfigError(f'--sweep: {key}={raw!r}: the value {node!r} is given '
                                     'twice; give each value once')
      parsed.append(node)
    axes[key] = parsed
  return axes


def points(file_points: list[dict] | None, axes: dict[str, list], seeds: int = 0) -> list[dict]:
  """The sweep's points: the config file's points (None: not used) times the grid of `axes`
  times `seeds` seeds (seed=0..N-1; 0: no seed axis). A key swept both by the config file and
  the command line, or `--seeds` with a seed key, is a ConfigError naming it."""
  axes = dict(axes)
  if seeds:
    if SEED_KEY in axes:
      raise config_lib.ConfigError(f'--seeds={seeds} and --sweep with {SEED_KEY}=...: give the '
                                   'seeds one way')
    axes[SEED_KEY] = list(range(seeds))
  base = file_points if file_points is not None else [{}]
  for key in axes:
    if any(key in p for p in base):
      raise config_lib.ConfigError(
          f'--sweep: {key} is swept by the config file\'s get_sweep too: drop it from the '
          'command line, or pass --file_sweep=off to sweep only the command line\'s keys')
  out = []
  for p in base:
    for extra in grid(**axes):
      q = {**p, **extra}
      if 'name' in p and extra:
        q['name'] = p['name'] + ',' + ','.join(f'{k}={v}' for k, v in extra.items())
      out.append(q)
  return out


def read_spec(workdir: str) -> dict | None:
  """The recorded command-line sweep of a sweep workdir (`sweep.json`), or None."""
  path = storage.join(workdir, SPEC_FILE)
  return storage.read_json(path) if storage.exists(path) else None


def check_spec(workdir: str, spec: dict) -> None:
  """A ConfigError when `workdir` recorded another sweep spec than `spec` ({'sweep', 'seeds',
  'file_sweep', ...}): its summary would mix two sweeps."""
  old = read_spec(workdir)
  keys = ('sweep', 'seeds', 'file_sweep')
  if old is not None and any(old.get(k) != spec.get(k) for k in keys):
    was = ' '.join(f'--{k}={old.get(k)!r}' for k in keys)
    now = ' '.join(f'--{k}={spec.get(k)!r}' for k in keys)
    raise config_lib.ConfigError(f'{workdir} holds a sweep recorded as {was} ({SPEC_FILE}); '
                                 f'this command gives {now}: use another --workdir')


def record_spec(workdir: str, spec: dict | None) -> None:
  """Writes `spec` as the sweep's `sweep.json` (refused as `check_spec` says)."""
  if spec is None:
    return
  check_spec(workdir, spec)
  if read_spec(workdir) is None and jax_process_zero():
    storage.makedirs(workdir)
    storage.write_json(storage.join(workdir, SPEC_FILE), spec)


def run_name(point: dict) -> str:
  """A point's sub-workdir: its 'name' key, else its overrides spelled out."""
  name = point.get('name') or ','.join(f'{k}={v}' for k, v in point.items()) or 'base'
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', name)


def _point_config(cfg, point: dict, cli_overrides: dict):
  """The config of one sweep point. A point may name its own config file with the key
  'config' ('configs/x.py:preset'); the command line's overrides then apply to it too."""
  original, point = point, dict(point)
  point.pop('name', None)
  spec = point.pop('config', None)
  try:
    if spec is None:
      sub = copy.deepcopy(cfg)
    else:
      sub, _ = config_lib.load(spec)
      config_lib.override(sub, cli_overrides)
    config_lib.override(sub, point)
    config_lib.validate(sub)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f'sweep point {run_name(original)}: {e}') from None
  return sub


def run(cfg, points: list[dict], workdir: str, cli_overrides: dict | None = None,
        spec: dict | None = None) -> list[dict]:
  """Trains every point in `workdir/<point name>` (resuming finished or interrupted runs),
  evaluates it (validation bits per byte and, unless eval.robustness is '', the robustness
  suite), and writes summary.csv / summary.md / curves_bpb.png / bpb_vs_flops.png /
  val_bpb_vs_<key>.png (report.py). A point
  stopped by SIGTERM / SIGINT (checkpointed) ends the sweep there: its row says 'stopped by
  SIGTERM at step N' and later points are 'not started'; rerunning the command resumes.
  `spec`: the command-line sweep, recorded as `sweep.json` once the points are checked."""
  cli_overrides = cli_overrides or {}
  subs = [_point_config(cfg, p, cli_overrides) for p in points]  # bad keys fail before training
  workdir = storage.check_workdir(workdir)
  storage.check_not_a_run(workdir, 'sweep')
  record_spec(workdir, spec)
  rows, stopped = [], None
  for point, sub in zip(points, subs):
    name = run_name(point)
    wd = storage.join(workdir, name)
    if stopped:
      rows.append(_row(name, point, sub, {}, {}, 'not started'))
      continue
    log0(f'=== sweep point {name}')
    try:
      out, status = trainer.train(sub, wd), 'done'
      if 'preempted_at' in out:
        stopped = out['signal']
        status, ev = f'stopped by {stopped} at step {out["preempted_at"]}', {}
      else:
        ev = trainer.evaluate(sub, wd) if _evaluates(sub) else out.get('eval', {})
    except Exception as e:  # pylint: disable=broad-except  # one failed point must not end the sweep
      out, ev, status = {}, {}, f'failed: {type(e).__name__}: {e}'[:200]
      log0(f'sweep point {name} {status}')
    rows.append(_row(name, point, sub, out, ev, status))
  _write_all(rows, workdir)
  return rows, stopped


def _evaluates(sub) -> bool:
  """Whether a point runs `--mode=eval` after training (robustness, which comes with next-word
  accuracy, or a family suite)."""
  return bool(sub.eval.robustness) or bool(sub.eval.get('in_sweep', False))


def _row(name, point, sub, out: dict, ev: dict, status: str) -> dict:
  row = {'run': name, 'status': status, **{k: v for k, v in point.items() if k != 'name'},
         'family': sub.family, 'params': out.get('params'), 'train_flops': out.get('train_flops'),
         'steps': out.get('step'),
         'final_train_loss': out.get('train', {}).get('loss'),
         'final_train_bpb': out.get('train', {}).get('bpb'),
         'val_loss': ev.get('loss'), 'val_bpb': ev.get('bpb')}
  for kind, r in (ev.get('robustness') or {}).items():
    row[f'{kind}_bpb'] = r.get('bpb')
  if ev.get('next_word'):
    row['next_word_acc'] = ev['next_word'].get('accuracy')
  row.update(ev.get('row') or {})  # a family eval suite's headline metrics
  row['train_seconds'] = out.get('train_seconds')
  return row


def _write_all(rows: list[dict], workdir: str) -> None:
  log0(report.write_rows(rows, workdir, 'summary').rstrip('\n'))
  seeds = seed_summary(rows)
  if seeds:
    report.write_rows(seeds['rows'], workdir, 'summary_seeds', formats=('csv',))
    text = (f'\n## Across seeds ({seeds["metric"]}: mean +- std, then each seed)\n\n'
            + report.markdown(list(seeds['rows'][0]), [[report.fmt_general(v) for v in r.values()]
                                                        for r in seeds['rows']])
            + f'\n{seeds["verdict"]}\n')
    if jax_process_zero():
      path = storage.join(workdir, 'summary.md')
      storage.write_text(path, storage.read_text(path) + text)
    log0(text.rstrip('\n'))
    report.plot_seeds(seeds, workdir)
  names = [r['run'] for r in rows if storage.isdir(storage.join(workdir, r['run']))]
  keys = [k for k in dict.fromkeys(k for r in rows for k in _point_keys(r))  # those that vary
          if len({str(r.get(k)) for r in rows}) > 1]
  report.plot_bpb_curves(names, workdir)
  report.plot_eval_vs_flops(names, workdir, rows, [k for k in keys if k != SEED_KEY])
  report.plot_metric_vs_keys(rows, keys, workdir)


def jax_process_zero() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def _point_keys(row: dict) -> list[str]:
  """A summary row's swept keys: those between 'status' and 'family' (see `_row`)."""
  keys = list(row)
  if 'status' not in keys or 'family' not in keys:
    return [k for k in keys if k not in ('run', 'status')]
  return keys[keys.index('status') + 1:keys.index('family')]


def seed_summary(rows: list[dict], metric: str = 'val_bpb') -> dict | None:
  """Rows grouped by their point without the seed: for each group its swept values, the number
  of finished seeds, `metric` as 'mean +- std' (sample std; '' with one seed) and each seed's
  value; and `verdict`, a sentence that names the best point only when its mean +- std range
  lies below every other's (lower is better), else says the spread does not separate them.
  None when no row has a seed key."""
  if not any(SEED_KEY in r for r in rows):
    return None
  point_keys = [k for k in dict.fromkeys(k for r in rows for k in _point_keys(r))
                if k != SEED_KEY]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(str(r.get(k)) for k in point_keys), []).append(r)
  out, stats = [], []
  for members in groups.values():
    vals = [(r.get(SEED_KEY), r.get(metric)) for r in members]
    done = [v for _, v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    mean = sum(done) / len(done) if done else None
    std = (math.sqrt(sum((v - mean) ** 2 for v in done) / (len(done) - 1))
           if len(done) > 1 else None)
    label = ','.join(f'{k}={members[0].get(k)}' for k in point_keys
                     if members[0].get(k) is not None) or 'base'
    row = {k: members[0].get(k) for k in point_keys}
    row['seeds'] = len(done)
    row[f'{metric} mean'] = mean
    row[f'{metric} std'] = std
    row[metric] = ('' if mean is None else f'{mean:.4f}' + (f' +- {std:.4f}' if std is not None
                                                           else ' (one seed)'))
    row['per seed'] = ' '.join(f'{s}:{v:.4f}' if isinstance(v, float) else f'{s}:-'
                               for s, v in vals)
    out.append(row)
    stats.append({'label': label, 'mean': mean, 'std': std or 0.0, 'n': len(done),
                  'values': [(s, v) for s, v in vals if isinstance(v, (int, float))]})
  return {'metric': metric, 'rows': out, 'groups': stats, 'verdict': verdict(stats, metric)}


def verdict(stats: list[dict], metric: str) -> str:
  """Names a winner (lowest mean) only beyond the spread: its mean + std below every other
  point's mean - std."""
  ok = sorted((g for g in stats if g['mean'] is not None), key=lambda g: g['mean'])
  if len(ok) < 2:
    return 'One point: no comparison.'
  best, rest = ok[0], ok[1:]
  if best['n'] < 2:
    return (f'Lowest mean {metric}: {best["label"]} ({best["mean"]:.4f}), from a single seed: '
            'no spread to compare against (add seeds: --seeds=3).')
  if all(best['mean'] + best['std'] < g['mean'] - g['std'] for g in rest):
    return (f'Winner beyond the spread: {best["label"]} ({metric} {best["mean"]:.4f} +- '
            f'{best["std"]:.4f}; next {rest[0]["label"]} {rest[0]["mean"]:.4f} +- '
            f'{rest[0]["std"]:.4f}).')
  close = [g['label'] for g in rest if best['mean'] + best['std'] >= g['mean'] - g['std']]
  return (f'No winner: the lowest mean {metric} ({best["label"]}, {best["mean"]:.4f} +- '
          f'{best["std"]:.4f}) is within the seeds\' spread of {", ".join(close)}.')


# -- sweeps as independent jobs ------------------------------------------------------------------
def job_commands(config_spec: str, points: list[dict], workdir: str, cli_overrides: dict,
                 repo: str = '', python: str = '', cfg=None) -> list[str]:
  """One shell command per point: train in `workdir/<point name>`, then (when the point's
  eval.robustness is set) `--mode=eval` for the robustness suite -- what `run` does in-process.
  Gather the finished runs with `--mode=sweep_summary`."""
  python = python or launching.default_python()
  base_spec = config_spec
  out = []
  for point in points:
    spec = point.get('config', base_spec)
    over = {**cli_overrides, **{k: v for k, v in point.items() if k not in ('config', 'name')}}
    wd = storage.join(storage.canonical(workdir), run_name(point))
    cmd = launching.shell_command(repo or launching.REPO, python,
                                  launching.launch_args(spec, wd, over))
    sub = _point_config(cfg, point, cli_overrides) if cfg is not None else None
    if sub is None or _evaluates(sub):
      cmd += f' && {python} launch.py ' + ' '.join(
          shlex.quote(a) for a in launching.launch_args(spec, wd, over, 'eval'))
    out.append(cmd)
  return out


def gather(cfg, points: list[dict], workdir: str, cli_overrides: dict | None = None) -> list[dict]:
  """The summary of a sweep whose points ran as separate jobs, read from their workdirs: a point
  without a finished run is marked 'missing' (never started) or 'incomplete' (started, no
  final summary; e.g. failed or still running). Writes the same files as `run`. A workdir
  that is a run, or holds none of the points, is not this sweep's: a FileNotFoundError, and
  nothing is written there."""
  names = [run_name(p) for p in points]
  if storage.exists(storage.join(workdir, 'config.json')):
    raise FileNotFoundError(f'--mode=sweep_summary: {workdir} is a run (it holds config.json), '
                            'not a sweep; give the workdir the sweep was run in')
  if not any(storage.isdir(storage.join(workdir, n)) for n in names):
    raise FileNotFoundError(
        f'--mode=sweep_summary: {workdir} holds none of the {len(names)} points of this sweep '
        f'({", ".join(names[:4])}{", ..." if len(names) > 4 else ""}): not this sweep\'s '
        'workdir, or its jobs have not started (check --workdir, --config and its overrides)')
  rows = []
  for point in points:
    name = run_name(point)
    wd = storage.join(workdir, name)
    sub = _point_config(cfg, point, cli_overrides or {})
    out, ev = {}, {}
    summary = storage.join(wd, 'train_summary.json')
    if storage.exists(summary):
      out = storage.read_json(summary)
      ev = out.get('eval', {})
      evals = sorted((int(m.group(1)), f) for f in storage.listdir(wd)
                     if (m := re.fullmatch(r'eval_step(\d+)\.json', f)))
      if evals and evals[-1][0] == out.get('step'):
        ev = storage.read_json(storage.join(wd, evals[-1][1]))
      status = 'done'
    else:
      status = 'incomplete' if storage.isdir(wd) else 'missing'
    rows.append(_row(name, point, sub, out, ev, status))
  storage.makedirs(workdir)
  _write_all(rows, workdir)
  return rows
