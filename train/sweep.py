"""Sweeps declared in the config file: `get_sweep(config)` returns a list of override dicts
(write grids with `grid(...)`). Each point trains in its own sub-workdir (resuming if it was
interrupted); a summary of final metrics is written as CSV and Markdown, and the runs'
training curves as a PNG."""
from __future__ import annotations

import copy
import itertools
import re
import shlex

from train import config_lib, launching, storage, trainer
from train.evals import report
from train.metrics import log0


def grid(**axes) -> list[dict]:
  """grid(**{'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]}) -> product of overrides."""
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


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


def run(cfg, points: list[dict], workdir: str, cli_overrides: dict | None = None) -> list[dict]:
  """Trains every point in `workdir/<point name>` (resuming finished or interrupted runs),
  evaluates it (validation bits per byte and, unless eval.robustness is '', the robustness
  suite), and writes summary.csv / summary.md / curves_loss.png / bpb_vs_flops.png. A point
  stopped by SIGTERM / SIGINT (checkpointed) ends the sweep there: its row says 'stopped by
  SIGTERM at step N' and later points are 'not started'; rerunning the command resumes."""
  cli_overrides = cli_overrides or {}
  subs = [_point_config(cfg, p, cli_overrides) for p in points]  # bad keys fail before training
  workdir = storage.check_workdir(workdir)
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
  names = [r['run'] for r in rows if storage.isdir(storage.join(workdir, r['run']))]
  report.plot_curves(names, workdir)
  report.plot_eval_vs_flops(names, workdir)


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
