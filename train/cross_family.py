"""Modes over finished runs of any families, through their byte-level views
(`Family.byte_view`, models/byte_level/); config: configs/cross_family.py.

  --mode=ensemble   cross-tokenizer ensembles of `ensemble.members` (two or more): each
                    member's next-byte distributions on the same validation pieces and text
                    file, the mixture weights / product exponents fitted on a held-out slice
                    of the validation split; `ensemble.md/.json/.csv` in the workdir.
  --mode=report     one table across `report.runs` (the compare sweep's workdir stands for
                    its points): parameters, training FLOPs, tokens and bytes seen, validation
                    bits per byte and the robustness suite as the runs recorded them
                    (eval_step*.json), headline metrics of a family's eval suite, bits per
                    byte through the byte view (validation pieces, text file) and byte-level
                    generation speed, measured now, and a column per lm-eval task metric
                    where a run has results (its latest WORKDIR/lm_eval/step_N.json);
                    `report.md/.json/.csv/.png`.

A member or run is a finished run's workdir (`train.runs.load_run`) or a pretrained model
without a run: 'pretrained:smollm2', 'pretrained:PATH' (a .gguf file or an HF directory, e.g.
what --mode=transfer wrote; recognized without the prefix too).
"""
from __future__ import annotations

import csv
import gc
import io
import logging
import os
import re

from data import corpus
from train import checkpoint as ckpt_lib
from train import config_lib, launching, runs, storage, trainer
from train.evals import byte_views
from train.evals import lm_eval as lm_eval_lib
from train.evals import report as tables
from train.metrics import log0

PRETRAINED = 'pretrained:'
log = logging.getLogger(__name__)


# -- members -------------------------------------------------------------------------------------
def _pretrained_source(spec: str) -> str | None:
  """The `model.source` a member spec names, or None for a run workdir."""
  if spec.startswith(PRETRAINED):
    return spec[len(PRETRAINED):]
  if spec.endswith('.gguf') and storage.isfile(spec):
    return spec
  cfg_path = storage.join(spec, 'config.json')
  if storage.isdir(spec) and storage.exists(storage.join(spec, 'tokenizer.json')) and \
      storage.exists(cfg_path):
    try:
      if 'family' not in storage.read_json(cfg_path):  # an HF model directory, not a run
        return spec
    except (OSError, ValueError):
      pass
  return None


def _name(spec: str) -> str:
  src = _pretrained_source(spec)
  base = os.path.basename(os.path.normpath(src if src is not None else spec))
  return os.path.splitext(base)[0] if base.endswith('.gguf') else base


class Member:
  """One model as a byte view, with what its run recorded (`info`: family, params, ...)."""

  def __init__(self, spec: str, what: str):
    self.spec, self.name = spec, _name(spec)
    src = _pretrained_source(spec)
    if src is not None:
      cfg, _ = config_lib.load(storage.join(launching.REPO, 'configs', 'pretrained.py'))
      config_lib.override(cfg, {'model.source': src})
      setup = trainer.Setup(cfg)
      self.family = setup.family
      model = setup.model(self.family.initial_params())
      self.info = {'family': 'pretrained', 'source': src, 'params': setup.n_params,
                   'identity': f'{PRETRAINED}{src}'}
      self.run = None
    else:
      run = runs.load_run(spec, what=what)
      self.family, self.run = run.family, run
      model = run.model()
      self.info = {'family': run.cfg.family, 'params': run.setup.n_params,
                   'identity': run.identity}
    self.view = self.family.byte_view(model)  # ValueError for a family without text
    self.view.name = self.name
    self.info['view'] = type(self.view).__name__


def unfinished(spec: str) -> str:
  """'' for a finished run (or a pretrained model), else what is unfinished about it: no
  train_summary.json (stopped, failed or still training), or a summary of an earlier step
  than its config's train.steps (resumed to train longer and not finished)."""
  if _pretrained_source(spec) is not None:
    return ''
  try:
    steps = storage.read_json(storage.join(spec, 'config.json'))['train']['steps']
  except (OSError, ValueError, KeyError, TypeError):
    steps = None
  latest = ckpt_lib.complete_steps(storage.join(spec, 'checkpoints'))
  at = f'latest checkpoint: step {latest[-1] if latest else "none"}' + (
      f' of {steps}' if steps else '')
  path = storage.join(spec, 'train_summary.json')
  if not storage.exists(path):
    return f'unfinished ({at}; no train_summary.json)'
  done = storage.read_json(path).get('step')
  if steps and done is not None and done < steps:
    return f'unfinished (trained to step {done} of {steps}; {at})'
  return ''


def _same_member(specs: list[str], key: str) -> None:
  """Refuses a model named twice (the same workdir or pretrained source, however spelled)."""
  seen = {}
  for spec in specs:
    src = _pretrained_source(spec)
    ident = f'{PRETRAINED}{src}' if src is not None else storage.canonical(spec).rstrip('/')
    if ident in seen:
      raise ValueError(f'{key} names {ident} twice ({seen[ident]!r} and {spec!r}): an '
                       'ensemble of a model with itself measures nothing; name each model once')
    seen[ident] = spec


def _specs(text: str, key: str) -> list[str]:
  out = [s.strip() for s in str(text).split(',') if s.strip()]
  if not out:
    raise ValueError(f'{key} is empty: name finished run workdirs or pretrained:SOURCE, '
                     'comma-separated')
  return out


# -- texts -----------------------------------------------------------------------------------------
def _texts(cfg) -> tuple[list, list, list, dict]:
  """(fit pieces, validation pieces, text-file pieces, what they are)."""
  b = cfg.byte_eval
  source = corpus.get_source(cfg.data, cfg.data.eval_split)
  every = max(2, round((b.val_bytes + b.fit_bytes) / max(1, b.fit_bytes)))
  chosen = byte_views.spread(byte_views.pieces(source, b.piece_bytes),
                             b.val_bytes + b.fit_bytes if b.val_bytes > 0 else 0)
  fit, val = byte_views.split_fit(chosen, every)
  if not fit or not val:
    raise ValueError(f'the {cfg.data.eval_split} split of {cfg.data.source} gives {len(chosen)} '
                     f'piece(s) of at most {b.piece_bytes} bytes: too few for a fit slice and '
                     'an evaluation slice (lower byte_eval.piece_bytes, or more data)')
  info = {'validation': f'{byte_views.n_bytes(val):,} bytes in {len(val)} pieces of at most '
                        f'{b.piece_bytes} bytes spread over the {cfg.data.eval_split} split of '
                        f'{cfg.data.source} ({len(source)} documents)',
          'fit': f'{byte_views.n_bytes(fit):,} bytes in {len(fit)} pieces of the same split, '
                 'interleaved with the validation pieces (every '
                 f'{every}th piece): the ensemble weights are fitted there'}
  have = byte_views.n_bytes(chosen)
  if b.val_bytes > 0 and have < b.val_bytes + b.fit_bytes:
    info['warning'] = (f'byte_eval.val_bytes + fit_bytes = {b.val_bytes + b.fit_bytes:,} bytes '
                       f'asked for, but the {cfg.data.eval_split} split holds {have:,}: both '
                       'slices are smaller (a larger split: data.val_fraction / '
                       'data.val_min_bytes for a text: source)')
    print(f'warning: {info["warning"]}', flush=True)
  text = []
  if b.text_file:
    if not os.path.isfile(b.text_file):
      raise FileNotFoundError(f'byte_eval.text_file: no file {b.text_file}')
    with open(b.text_file, 'rb') as f:
      data = f.read()
    if not data:
      raise ValueError(f'byte_eval.text_file {b.text_file} is empty')
    text = byte_views.spread(byte_views.pieces([data], b.piece_bytes), b.text_bytes)
    info['text'] = (f'{byte_views.n_bytes(text):,} bytes in {len(text)} pieces spread over '
                    f'{b.text_file} ({len(data):,} bytes)')
  return fit, val, text, info


def _check(cfg, section: str) -> None:
  if section not in cfg or 'byte_eval' not in cfg:
    raise config_lib.ConfigError(f'this mode reads {section}.* and byte_eval.*: use '
                                 '--config=configs/cross_family.py')


# -- --mode=ensemble -------------------------------------------------------------------------------
def ensemble(cfg, workdir: str) -> dict:
  """Scores every member on the fit, validation and text pieces, fits the ensembles on the fit
  pieces and writes the table (see module doc); returns {'rows', 'summary', 'info'}."""
  _check(cfg, 'ensemble')
  specs = _specs(cfg.ensemble.members, 'ensemble.members')
  if len(specs) < 2:
    raise ValueError(f'ensemble.members names {len(specs)} model ({specs[0]}): an ensemble '
                     'needs two or more')
  kinds = [k.strip() for k in cfg.ensemble.kinds.split(',') if k.strip()]
  bad = [k for k in kinds if k not in byte_views.KINDS]
  if bad:
    raise config_lib.ConfigError(f'ensemble.kinds: unknown {bad}; expected some of '
                                 f'{list(byte_views.KINDS)}')
  for spec in specs:  # before anything is read or loaded
    if storage.is_remote(spec):  # the bucket and the credentials first, in one message
      storage.check_bucket(spec, f'ensemble.members: {spec}')
    if _pretrained_source(spec) is None and not storage.isdir(spec):
      raise FileNotFoundError(f'ensemble.members: no run directory {spec}')
  _same_member(specs, 'ensemble.members')
  partial = {spec: why for spec in specs if (why := unfinished(spec))}
  for spec, why in partial.items():
    log.warning('ensemble.members: %s is %s; its latest checkpoint is used, and the table '
                'marks it', spec, why)
  workdir = storage.check_workdir(workdir)
  storage.check_not_a_run(workdir, 'ensemble')
  fit, val, text, info = _texts(cfg)
  names, scored = [], {'fit': [], 'validation': [], 'text': []}
  for spec in specs:
    m = Member(spec, 'ensemble.members')
    if m.name in names:
      m.name = m.view.name = f'{m.name}#{len(names)}'
    names.append(m.name)
    if spec in partial:
      m.info['status'] = partial[spec]
    info[f'member {m.name}'] = ', '.join(f'{k} {v}' for k, v in m.info.items())
    for key, items in (('fit', fit), ('validation', val), ('text', text)):
      if items:
        what = 'validation split' if key != 'text' else cfg.byte_eval.text_file
        s = byte_views.score(m.view, items, what)
        scored[key].append(s)
        log0(f'{m.name}: {key} {s.bpb():.4f} bits per byte ({s.n_bytes} bytes, '
             f'{s.seconds:.1f} s)')
    del m
    gc.collect()
  evals = {k: v for k, v in scored.items() if k != 'fit' and v}
  rows, summary = byte_views.ensemble_table(names, scored['fit'], evals, kinds)
  md = byte_views.write_ensemble(rows, summary, info, workdir)
  log0(md.rstrip('\n'))
  return {'rows': rows, 'summary': summary, 'info': info}


# -- --mode=report --------------------------------------------------------------------------------
def _expand(spec: str) -> list[tuple[str, str]]:
  """A sweep workdir stands for its points (in summary.csv's order when there is one):
  [(workdir, the sweep's status of the point: '' for a run given directly or a point the
  sweep finished)]. A point the sweep's summary lists without a run (it failed before its
  config was written, or never started) is kept, with its status, so the table shows it."""
  if storage.is_remote(spec):  # the bucket and the credentials first, in one message
    storage.check_bucket(spec, f'report.runs: {spec}')
  if _pretrained_source(spec) is not None or storage.exists(storage.join(spec, 'config.json')):
    return [(spec, '')]
  if not storage.isdir(spec):
    raise FileNotFoundError(f'report.runs: no run directory {spec}')
  status = {}
  summary = storage.join(spec, 'summary.csv')
  if storage.exists(summary):
    status = {r['run']: r.get('status') or ''
              for r in csv.DictReader(io.StringIO(storage.read_text(summary)))}
  subs = sorted(d for d in storage.listdir(spec)
                if storage.exists(storage.join(spec, d, 'config.json')))
  if not subs and not status:
    raise FileNotFoundError(f'report.runs: {spec} is neither a run (no config.json) nor a '
                            'sweep with finished points')
  subs = [d for d in status if d in subs or status[d] != 'done'] + [
      d for d in subs if d not in status]
  return [(storage.join(spec, d), '' if status.get(d, 'done') == 'done' else status[d])
          for d in subs]


def _recorded(spec: str) -> dict:
  """What a run recorded: its train summary, config and latest evaluation (eval_step{N}.json
  of its final step, else the latest one, else the end-of-training evaluation)."""
  out = {}
  if _pretrained_source(spec) is not None:
    return out
  path = storage.join(spec, 'train_summary.json')
  summary = storage.read_json(path) if storage.exists(path) else {}
  cfg = storage.read_json(storage.join(spec, 'config.json'))
  evals = sorted((int(m.group(1)), f) for f in storage.listdir(spec)
                 if (m := re.fullmatch(r'eval_step(\d+)\.json', f)))
  ev = summary.get('eval') or {}  # the end-of-training evaluation, unless --mode=eval ran
  if evals:
    final = [e for e in evals if e[0] == summary.get('step')]
    ev = storage.read_json(storage.join(spec, (final or evals)[-1][1]))
  out['steps'] = summary.get('step')
  out['params'] = summary.get('params')
  out['train_flops'] = summary.get('train_flops')
  if summary.get('step'):
    tokens = summary['step'] * cfg['train']['batch_size'] * cfg['data']['seq_len']
    out['tokens_seen'] = tokens
    if ev.get('n_tokens') and ev.get('n_bytes'):  # a family that models no bytes has none
      out['bytes_seen'] = tokens * ev['n_bytes'] / ev['n_tokens']
  if ev:
    out['val_bpb'] = ev.get('bpb')
    for kind, r in (ev.get('robustness') or {}).items():
      out[f'{kind}_bpb'] = r.get('bpb')
    out.update(ev.get('row') or {})
  return out


def _lm_eval_columns(spec: str) -> dict:
  """A run's latest lm-eval results (`--mode=lm_eval` or the `lm_eval` evaluator:
  WORKDIR/lm_eval/step_N.json of the highest N): {'lm_eval_step': N, 'TASK/METRIC': value}
  (stderr left out); {} for a pretrained model or a run without any."""
  if _pretrained_source(spec) is not None:
    return {}
  folder = storage.join(spec, 'lm_eval')
  if not storage.isdir(folder):
    return {}
  steps = sorted((int(m.group(1)), f) for f in storage.listdir(folder)
                 if (m := re.fullmatch(r'step_(\d+)\.json', f)))
  if not steps:
    return {}
  step, name = steps[-1]
  rec = storage.read_json(storage.join(folder, name))
  out = {'lm_eval_step': step}
  for task, metrics in sorted(lm_eval_lib.metrics_of(rec).items()):
    out.update({f'{task}/{k}': v for k, v in metrics.items() if not k.endswith('_stderr')})
  return out


def report(cfg, workdir: str) -> list[dict]:
  """The cross-family table and plots (see module doc); returns the rows."""
  _check(cfg, 'report')
  specs = [s for spec in _specs(cfg.report.runs, 'report.runs') for s in _expand(spec)]
  workdir = storage.check_workdir(workdir)
  storage.check_not_a_run(workdir, 'report')
  _, val, text, info = _texts(cfg) if cfg.report.byte_eval else ([], [], [], {})
  rows, tasks = [], {}  # tasks: the lm-eval columns of any run, in first-seen order
  for spec, swept in specs:
    row = {'run': _name(spec)}
    if not storage.exists(storage.join(spec, 'config.json')) and _pretrained_source(spec) is None:
      rows.append({**row, 'status': swept})  # a sweep point without a run: failed early
      log.warning('report.runs: sweep point %s has no run: %s', row['run'], swept)
      continue
    row['status'] = swept or unfinished(spec) or 'finished'
    if row['status'] != 'finished':
      log.warning('report.runs: %s is %s; the table marks it', spec, row['status'])
    bench = _lm_eval_columns(spec)
    tasks.update(dict.fromkeys(bench))
    rec = {**_recorded(spec), **bench}
    try:
      m = Member(spec, 'report.runs')
    except ValueError as e:  # a family without a byte view: what it recorded only
      family = ('pretrained' if _pretrained_source(spec) is not None else
                storage.read_json(storage.join(spec, 'config.json')).get('family'))
      row.update(family=family, view=f'none ({e})')
      rows.append({**row, **rec})
      continue
    except FileNotFoundError as e:  # a run without a checkpoint (a point that failed early)
      if row['status'] == 'finished':
        raise
      row.update(view=f'none ({e})')
      rows.append({**row, **rec})
      continue
    row.update(family=m.info['family'], view=m.info['view'])
    row.update(rec)
    row['params'] = row.get('params') or m.info['params']
    if val:
      row['val_bpb_byte_view'] = byte_views.score(m.view, val, 'validation split').bpb()
    if text:
      row['text_bpb'] = byte_views.score(m.view, text, cfg.byte_eval.text_file).bpb()
    speed = byte_views.generation_speed(m.view, cfg.report.gen_prompt.encode(),
                                        cfg.report.gen_bytes)
    row['gen_bytes_per_s'] = speed['bytes_per_s']
    log0(f'{row["run"]}: ' + ', '.join(f'{k} {tables.fmt_count(v)}' for k, v in row.items()
                                        if k not in ('run',)))
    rows.append(row)
    del m
    gc.collect()
  order = ['run', 'status', 'family', 'view', 'params', 'train_flops', 'steps', 'tokens_seen',
           'bytes_seen', 'val_bpb', 'val_bpb_byte_view', 'text_bpb', 'caps_bpb', 'permute_bpb',
           'delete_bpb', 'replace_bpb', 'gen_bytes_per_s']
  rows = [{**{k: r.get(k) for k in order}, **{k: v for k, v in r.items() if k not in order}}
          for r in rows]
  rows = [{**{k: v for k, v in r.items() if k not in tasks}, **{k: r.get(k) for k in tasks}}
          for r in rows]  # the task columns last, in every row (None: no results)
  table = tables.write_rows(rows, workdir, 'report', formats=('csv', 'json'),
                           fmt=tables.fmt_count)
  notes = [f'- {k}: {v}' for k, v in info.items() if k != 'fit']
  notes.append('- val_bpb and the robustness columns: as the run recorded them '
               '(eval_step*.json, the whole split through the trainer); val_bpb_byte_view, '
               'text_bpb and gen_bytes_per_s (greedy, '
               f'{cfg.report.gen_bytes} bytes after {cfg.report.gen_prompt!r}, the median of 3 '
               'runs after a warm-up): measured now through the byte view')
  if tasks:
    notes.append('- TASK/METRIC columns: the latest lm-eval results of each run '
                 '(WORKDIR/lm_eval/step_N.json of step lm_eval_step, written by --mode=lm_eval '
                 'or the lm_eval evaluator); blank: none for that run')
  md = table + '\n' + '\n'.join(notes) + '\n'
  tables.write_text(storage.join(workdir, 'report.md'), md)
  tables.plot_cross_family(rows, storage.join(workdir, 'report.png'))
  log0(md.rstrip('\n'))
  return rows
