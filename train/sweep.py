"""Sweeps declared in the config file: `get_sweep(preset)` returns a list of override dicts
(write grids with `grid(...)`). Each point trains in its own sub-workdir (resuming if it was
interrupted); a summary of final metrics is written as CSV and Markdown, and the runs'
training curves as a PNG."""
from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import re

from train import config_lib


def grid(**axes) -> list[dict]:
  """grid(**{'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]}) -> product of overrides."""
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def run_name(point: dict) -> str:
  name = ','.join(f'{k}={v}' for k, v in point.items()) or 'base'
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', name)


def run(cfg, points: list[dict], workdir: str) -> list[dict]:
  from train import trainer
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for point in points:
    sub = copy.deepcopy(cfg)
    config_lib.override(sub, point)  # fails before any training on a bad key
  for point in points:
    sub = copy.deepcopy(cfg)
    config_lib.override(sub, point)
    name = run_name(point)
    print(f'=== sweep point {name}', flush=True)
    try:
      out, status = trainer.train(sub, os.path.join(workdir, name)), 'done'
    except Exception as e:  # pylint: disable=broad-except  # one failed point must not end the sweep
      out, status = {}, f'failed: {type(e).__name__}: {e}'[:200]
      print(f'sweep point {name} {status}', flush=True)
    row = {'run': name, 'status': status, **{k: point[k] for k in point},
           'final_train_loss': out.get('train', {}).get('loss'),
           'final_train_bpb': out.get('train', {}).get('bpb'),
           'val_loss': out.get('eval', {}).get('loss'),
           'val_bpb': out.get('eval', {}).get('bpb'),
           'train_seconds': out.get('train_seconds')}
    rows.append(row)
  write_summary(rows, workdir)
  plot_curves([r['run'] for r in rows], workdir)
  return rows


def write_summary(rows: list[dict], workdir: str) -> None:
  cols = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, 'summary.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in cols) + ' |' for r in rows]
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines), flush=True)


def _curve(path: str, key: str):
  by_step = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        if key in rec:
          by_step[rec['step']] = rec[key]  # a resumed run's later record wins
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_curves(names: list[str], workdir: str, key: str = 'loss') -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in names:
    steps, vals = _curve(os.path.join(workdir, name, 'metrics.jsonl'), key)
    if steps:
      ax.plot(steps, vals, label=name)
  ax.set_xlabel('step')
  ax.set_ylabel(f'train {key}')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  path = os.path.join(workdir, f'curves_{key}.png')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
