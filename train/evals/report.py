"""Tables and plots of evaluation results: the one home of the Markdown / CSV / JSON table
writers and the PNG plots (sweep summaries, transfer tables, the robustness table, the
lexinvariant perplexity curves). Files are written by process 0 only."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable

import jax
import numpy as np

from train import storage


def markdown(header: list[str], rows: list[list[Any]]) -> str:
  """A Markdown table (cells already formatted, or formatted with str)."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def fmt_general(v) -> str:
  """Four significant digits for floats, '' for None (sweep summaries)."""
  return f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v))


def fmt_fixed(v) -> str:
  """Four decimals for floats (bits per byte, cosines)."""
  return f'{v:.4f}' if isinstance(v, float) else ('' if v is None else str(v))


def fmt_count(v) -> str:
  """Counts readable: 611520 -> '0.61M', 7.99e12 -> '7.99e+12'; other values as
  `fmt_general` (four significant digits)."""
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    if abs(v) >= 1e9:
      return f'{v:.3g}'
    if abs(v) >= 1e5:
      return f'{v / 1e6:.2f}M'
  return fmt_general(v)


def write_text(path: str, text: str) -> None:
  if jax.process_index() == 0:
    storage.write_text(path, text)


def write_json(path: str, obj) -> None:
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps(obj, indent=2, default=float))


def write_rows(rows: list[dict], directory: str, stem: str, formats=('md', 'csv'),
               fmt: Callable[[Any], str] = fmt_general) -> str:
  """`rows` (dicts; columns in first-seen order) as `stem.md` plus `stem.csv` / `stem.json`;
  returns the Markdown table."""
  cols = list(dict.fromkeys(k for r in rows for k in r))
  table = markdown(cols, [[fmt(r.get(c)) for c in cols] for r in rows])
  if jax.process_index() == 0:
    if 'csv' in formats:
      out = io.StringIO(newline='')
      w = csv.DictWriter(out, fieldnames=cols)
      w.writeheader()
      w.writerows(rows)
      storage.write_text(storage.join(directory, f'{stem}.csv'), out.getvalue())
    if 'json' in formats:
      storage.write_json(storage.join(directory, f'{stem}.json'), rows)
    if 'md' in formats:
      storage.write_text(storage.join(directory, f'{stem}.md'), table)
  return table


# -- plots ---------------------------------------------------------------------------------------
def save_png(fig, path: str, dpi: int = 120) -> None:
  """A matplotlib figure as a PNG at `path` (a local file or a bucket object; process 0)."""
  if jax.process_index() == 0:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    storage.write_bytes(path, buf.getvalue())


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def read_curve(path: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` in a metrics JSONL file; a resumed run's later record wins."""
  by_step = {}
  if storage.exists(path):
    for line in storage.read_text(path).splitlines():
      rec = json.loads(line)
      if key in rec:
        by_step[rec['step']] = rec[key]
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _bytes_seen(path: str) -> dict[int, float]:
  """step -> UTF-8 bytes trained on up to that step (metrics.jsonl `n_bytes` summed); {} for a
  run that did not log them."""
  steps, vals = read_curve(path, 'n_bytes')
  out, total = {}, 0.0
  for s, v in zip(steps, vals):
    total += v
    out[s] = total
  return out


def plot_bpb_curves(names: list[str], workdir: str) -> str:
  """Training and validation bits per byte of each run `workdir/<name>` -- a unit every family
  shares, unlike its loss (nats per token, per byte or per word) -- against the bytes it has
  trained on (left) and its training FLOPs (right). Training curves are thin lines (a running
  mean over 1/20 of the run), validation points are markers of the same colour."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
  for i, name in enumerate(names):
    run = storage.join(workdir, name)
    summary = storage.join(run, 'train_summary.json')
    per_step = storage.read_json(summary).get('flops_per_step') if storage.exists(summary) else None
    seen = _bytes_seen(storage.join(run, 'metrics.jsonl'))
    steps, vals = read_curve(storage.join(run, 'metrics.jsonl'), 'bpb')
    vsteps, vvals = read_curve(storage.join(run, 'eval_metrics.jsonl'), 'bpb')
    color = f'C{i % 10}'
    if steps:
      k = max(1, len(vals) // 20)
      smooth = np.convolve(vals, np.ones(k) / k, mode='valid')
      steps = steps[k - 1:]
    for ax, x_of in ((axes[0], lambda s: seen.get(s)),
                     (axes[1], lambda s: s * per_step if per_step else None)):
      if steps:
        pts = [(x_of(s), v) for s, v in zip(steps, smooth) if x_of(s)]
        if pts:
          ax.plot(*zip(*pts), color=color, lw=1, alpha=0.6, label=f'{name} (train)')
      vpts = [(x_of(s), v) for s, v in zip(vsteps, vvals) if x_of(s)]
      if vpts:
        ax.plot(*zip(*vpts), color=color, marker='o', lw=1.5, label=f'{name} (validation)')
  axes[0].set_xlabel('UTF-8 bytes trained on')
  axes[1].set_xlabel('training FLOPs')
  axes[0].set_ylabel('bits per byte (lower is better)')
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  for ax in axes:
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0))
  fig.suptitle('bits per byte: training (thin, running mean) and validation (markers)',
               fontsize=10)
  path = storage.join(workdir, 'curves_bpb.png')
  fig.tight_layout()
  save_png(fig, path, dpi=120)
  plt.close(fig)
  return path


def equal_flops(rows: list[dict], tolerance: float = 0.05) -> bool:
  """Whether the finished rows' training FLOPs are all within `tolerance` of each other (an
  equal-FLOP comparison: one x value, drawn as bars instead)."""
  f = [r.get('train_flops') for r in rows if isinstance(r.get('train_flops'), (int, float))]
  return len(f) >= 2 and max(f) <= (1 + tolerance) * min(f)


def plot_eval_vs_flops(names: list[str], workdir: str, rows: list[dict] | None = None,
                       group_keys: list[str] | None = None) -> str:
  """Validation bits per byte of each run against its training FLOPs so far; when the runs
  were given equal FLOPs (`rows`: the sweep's summary rows), bars of each point's final value
  instead (rows equal in `group_keys`, i.e. the seeds of one point, share a bar: every seed a
  dot, mean +- std), as one x value would hide them."""
  plt = _pyplot()
  if rows is not None and equal_flops(rows):
    groups: dict[str, list] = {}
    for r in rows:
      v = r.get('val_bpb')
      if isinstance(v, (int, float)):
        label = (','.join(f'{k}={r.get(k)}' for k in group_keys if r.get(k) is not None)
                 if group_keys is not None else str(r['run']))
        groups.setdefault(label or str(r['run']), []).append(v)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) + 2), 4.5))
    for i, (label, vals) in enumerate(groups.items()):
      mean = float(np.mean(vals))
      ax.bar(i, mean, color=f'C{i % 10}', alpha=0.5,
             yerr=float(np.std(vals, ddof=1)) if len(vals) > 1 else None, capsize=6)
      ax.scatter([i] * len(vals), vals, color='k', s=14, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha='right', fontsize=8)
    lo = min(min(v) for v in groups.values()) if groups else 0
    hi = max(max(v) for v in groups.values()) if groups else 1
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-9) - 0.05), hi + 0.15 * (hi - lo + 1e-9) + 0.05)
    f = [r['train_flops'] for r in rows if isinstance(r.get('train_flops'), (int, float))]
    ax.set_title(f'equal training FLOPs ({min(f):.3g})', fontsize=10)
    ax.set_ylabel('validation bits per byte (lower is better)')
    ax.grid(alpha=0.3, axis='y')
  else:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
      summary = storage.join(workdir, name, 'train_summary.json')
      if not storage.exists(summary):
        continue
      per_step = storage.read_json(summary)['flops_per_step']
      steps, vals = read_curve(storage.join(workdir, name, 'eval_metrics.jsonl'), 'bpb')
      if steps:
        ax.plot([s * per_step for s in steps], vals, marker='o', label=name)
    ax.set_xscale('log')
    ax.set_xlabel('training FLOPs')
    ax.set_ylabel('validation bits per byte')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  path = storage.join(workdir, 'bpb_vs_flops.png')
  fig.tight_layout()
  save_png(fig, path, dpi=120)
  plt.close(fig)
  return path


def plot_metric_vs_keys(rows: list[dict], keys: list[str], workdir: str,
                        metric: str = 'val_bpb') -> list[str]:
  """For each swept key: `metric` of every finished row against the key's value (other values
  than numbers as categories); rows that
  differ in other keys are separate lines (labelled by those keys), each seed a dot and the
  mean a line. Numbers on a log axis when they span a factor of 3 or more. Writes
  `<metric>_vs_<key>.png`; returns the paths."""
  plt = _pyplot()
  paths = []
  for key in keys:
    if key == 'seed':
      continue
    done = [r for r in rows if isinstance(r.get(metric), (int, float)) and key in r]
    values = list(dict.fromkeys(r[key] for r in done))
    if len(values) < 2:
      continue
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    others = [k for k in keys if k not in (key, 'seed')]
    lines: dict[str, dict] = {}
    for r in done:
      label = ', '.join(f'{k}={r.get(k)}' for k in others) or metric
      lines.setdefault(label, {}).setdefault(r[key], []).append(r[metric])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pos = (lambda v: v) if numeric else (lambda v: values.index(v))
    for i, (label, by_value) in enumerate(lines.items()):
      xs = sorted(by_value, key=lambda v: pos(v))
      color = f'C{i % 10}'
      for x in xs:
        ax.scatter([pos(x)] * len(by_value[x]), by_value[x], color=color, s=14, alpha=0.7)
      ax.plot([pos(x) for x in xs], [float(np.mean(by_value[x])) for x in xs], color=color,
              marker='s', markersize=4, label=f'{label} (mean; dots: each seed)')
    if numeric and min(values) > 0 and max(values) / min(values) >= 3:
      ax.set_xscale('log')
    if not numeric:
      ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20, ha='right',
                    fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel(f'{metric} (lower is better)' if metric.endswith('bpb') else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = storage.join(workdir, f'{metric}_vs_{key.replace("/", "_")}.png')
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_seeds(summary: dict, workdir: str) -> str:
  """The spread across seeds (train/sweep.py `seed_summary`): each point of the sweep on the x
  axis, every seed's value as a dot and the mean +- std as an error bar."""
  plt = _pyplot()
  groups = summary['groups']
  fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 4.5))
  for i, g in enumerate(groups):
    vals = [v for _, v in g['values']]
    if vals:
      jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else [0.0]
      ax.scatter(i + np.asarray(jitter), vals, s=18, color='C0', alpha=0.6,
                 label='each seed' if i == 0 else None)
    if g['mean'] is not None:
      ax.errorbar(i, g['mean'], yerr=g['std'] if g['n'] > 1 else None, fmt='_', color='C3',
                  markersize=18, capsize=6, lw=1.5,
                  label='mean +- std' if i == 0 else None)
  ax.set_xticks(range(len(groups)), [g['label'] for g in groups], rotation=20, ha='right',
                fontsize=8)
  ax.set_xlim(-0.6, len(groups) - 0.4)
  ax.set_ylabel(f"{summary['metric']} (validation bits per byte; lower is better)"
                if summary['metric'] == 'val_bpb' else summary['metric'])
  ax.set_title('spread across seeds')
  ax.grid(alpha=0.3, axis='y')
  ax.legend(fontsize=8)
  path = storage.join(workdir, f"seeds_{summary['metric']}.png")
  fig.tight_layout()
  save_png(fig, path, dpi=120)
  plt.close(fig)
  return path


def plot_ppl_by_position(path: str, per_pos: dict, count: np.ndarray, names: list[str],
                         title: str) -> None:
  """Perplexity against the context position for each model, and (two models) their ratio."""
  plt = _pyplot()
  valid = np.flatnonzero(count > 0)
  x = valid + 1
  fig, axes = plt.subplots(1, 2 if len(names) == 2 else 1, figsize=(11, 4), squeeze=False)
  ax = axes[0, 0]
  for n in names:
    ax.plot(x, np.exp(np.asarray(per_pos[n])[valid]), label=n)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('context position (tokens into the document) + 1')
  ax.set_ylabel('perplexity')
  ax.set_title(title)
  ax.legend()
  if len(names) == 2:
    ax = axes[0, 1]
    ratio = np.exp(np.asarray(per_pos[names[0]])[valid] - np.asarray(per_pos[names[1]])[valid])
    ax.plot(x, ratio, color='C2')
    ax.axhline(1.0, color='gray', ls='--', lw=1)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('context position + 1')
    ax.set_ylabel(f'ppl {names[0]} / ppl {names[1]}')
    ax.set_title('perplexity ratio')
  fig.tight_layout()
  save_png(fig, path, dpi=110)
  plt.close(fig)


def plot_cross_family(rows: list[dict], path: str) -> str | None:
  """The cross-family report (train/cross_family.py) in four panels: bits per byte of each run
  (validation as recorded, through the byte view, text file), validation bits per byte against
  training FLOPs, the robustness suite, and byte-level generation speed."""
  if jax.process_index() != 0 or not rows:
    return None
  plt = _pyplot()
  names = [r['run'] for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))

  def bars(ax, keys, labels, title, ylabel):
    keys = [(k, l) for k, l in zip(keys, labels) if any(r.get(k) is not None for r in rows)]
    w = 0.8 / max(1, len(keys))
    for i, (k, label) in enumerate(keys):
      vals = [r.get(k) if r.get(k) is not None else np.nan for r in rows]
      ax.bar(x + (i - (len(keys) - 1) / 2) * w, vals, w, label=label)
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis='y')
    if keys:
      ax.legend(fontsize=7)

  bars(axes[0, 0], ['val_bpb', 'val_bpb_byte_view', 'text_bpb'],
       ['validation (recorded)', 'validation pieces (byte view)', 'text file (byte view)'],
       'bits per byte (lower is better)', 'bits per byte')
  ax = axes[0, 1]
  for r in rows:
    if r.get('bytes_seen') and r.get('val_bpb') is not None:
      ax.scatter(r['bytes_seen'], r['val_bpb'])
      ax.annotate(f"{r['run']} ({fmt_count(r.get('train_flops'))} FLOPs)",
                  (r['bytes_seen'], r['val_bpb']), fontsize=8)
  ax.set_xscale('log')
  ax.set_xlabel('training bytes seen (tokens seen x bytes per token)')
  ax.set_ylabel('validation bits per byte (recorded)')
  ax.set_title('bits per byte vs training data')
  ax.grid(alpha=0.3)
  bars(axes[1, 0], ['val_bpb', 'caps_bpb', 'permute_bpb', 'delete_bpb', 'replace_bpb'],
       ['clean', 'ALL CAPS', 'permute', 'delete', 'replace'], 'robustness suite (recorded)',
       'bits per byte')
  bars(axes[1, 1], ['gen_bytes_per_s'], ['greedy, through the byte view'],
       'byte-level generation speed', 'bytes / s')
  fig.tight_layout()
  save_png(fig, path, dpi=110)
  plt.close(fig)
  return path
