"""Units drawn on real text: length statistics and a rendering, by splitter or by trained run.

  python benchmarks/units.py --patcher=runs/byte_tiny [--target_len=4] [--max_word_bytes=16] \
      [--bytes=20000] [--text_file=PATH] [--render_bytes=300]
  python benchmarks/units.py --sweep=runs/units [--text_file=benchmarks/texts/cjk.txt] \
      [--bytes=2000] [--gen_bytes=32] [--out=FILE.md]

With --patcher (splitters only, no trained model but the patcher):

Texts: the first `--bytes` bytes of the embedded corpus's validation split ('normal'), the same
with its spaces removed ('no spaces'), and optionally `--text_file` (e.g. a CJK text). Splitters:
whitespace, unicode, spacebyte, and entropy patches (both rules) from the byte-LM run
`--patcher`, each threshold calibrated on the training split (its first 256 rows) to
`--target_len` bytes per unit, as `data.splitter='entropy'` does. For each text and splitter:
bytes per unit (mean, std, median, 90th percentile, max) and the share of units the
`--max_word_bytes` cap cut; then a Markdown rendering of the start of each text with `|` before
every unit. Each text is split as one document (after a bos id).

With --sweep (the finished runs of a sweep, e.g. configs/units.py's; points trained without a
FLOP budget, such as the patcher, are left out): every run through its byte view
(`Family.byte_view`) on the same texts, the first `--bytes` bytes of the validation split
('normal'), the same with its spaces removed ('no spaces') and `--text_file`, each cut into
pieces of at most 200 bytes scored as documents (train/evals/byte_views.py, as the `held_out`
evaluator does). Per run and text: bits per byte and the units the model itself used on those
pieces (a HAT's word starts as its view decided them, learned boundaries included; a subword
LM's tokens; a byte LM's bytes): mean, std, median, p90, max and the share within 3 bytes of
the 16-byte cap. One table joins what the sweep recorded (validation bits per byte, ALL-CAPS
and character-noise robustness, next-word accuracy and the byte accuracy within words) with
the unit lengths on the normal text, training bytes/s (bytes trained on over the training
loop's wall time, the first step's compilation included) and generation bytes/s (greedy, `--gen_bytes` bytes after 'def ', the
median of 3 after a warm-up, through the byte view: `byte_views.generation_speed`). Then the
first piece of each text with `|` before every unit, per run. A HAT with learned chunking or
entropy patches is scored through its training forward over each piece (its byte view's
`distributions_and_starts`, models/hat_view.py): the same boundaries and distributions as
byte by byte, without the loop.
Measurements are cached in WORKDIR/units_benchmark.json: a rerun measures only new runs.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def main(argv) -> None:
  opts = cli.parse_opts(argv, {'patcher': '', 'target_len': 4.0, 'max_word_bytes': 16,
                               'bytes': 0, 'text_file': '', 'render_bytes': 300, 'sweep': '',
                               'gen_bytes': 32, 'out': ''}, __doc__)
  if opts['sweep']:
    opts['bytes'] = opts['bytes'] or 2_000
    return _sweep(opts)
  opts['bytes'] = opts['bytes'] or 20_000
  if not opts['patcher']:
    raise SystemExit(f'--patcher=RUN (a finished byte-LM run) or --sweep=WORKDIR is needed\n'
                     f'{__doc__}')
  from data import corpus, words  # pylint: disable=import-outside-toplevel
  from train import config_lib, families  # pylint: disable=import-outside-toplevel
  cap = opts['max_word_bytes']
  cfg, _ = config_lib.load('configs/hat.py:tiny')
  config_lib.override(cfg, {'data.splitter': 'entropy', 'data.patcher': opts['patcher'],
                            'data.max_word_bytes': cap,
                            'data.patch_target_len': opts['target_len']})
  splitters = {s: words.get_splitter(s, cap) for s in ('whitespace', 'unicode', 'spacebyte')}
  for rule in words.PATCH_RULES:
    config_lib.override(cfg, {'data.patch_rule': rule})
    fam = families.get(cfg)
    rec = fam.patcher_record
    splitters[f'entropy {rule}'] = fam.splitter
    print(f'entropy {rule}: threshold {rec["threshold"]:.4f} nats, {rec["calibrated_len"]:.3f} '
          f'bytes per unit on the training rows (patcher {rec["workdir"]}@{rec["step"]})')
  source = corpus.get_source(cfg.data, cfg.data.eval_split)
  text, i = '', 0
  while len(text.encode()) < opts['bytes'] and i < len(source):
    text += source[i] + '\n'
    i += 1
  text = text.encode()[:opts['bytes']].decode('utf-8', 'ignore')
  texts = {'normal': text, 'no spaces': text.replace(' ', '')}
  if opts['text_file']:
    with open(opts['text_file'], encoding='utf-8') as f:
      texts[os.path.basename(opts['text_file'])] = f.read()[:opts['bytes']]
  rows = []
  for tname, t in texts.items():
    data = t.encode()
    for sname, sp in splitters.items():
      lens = np.diff(np.append(sp.starts(data), len(data)))
      rows.append((tname, sname, len(data), len(lens), lens.mean(), lens.std(),
                   np.median(lens), np.percentile(lens, 90), lens.max(), (lens >= cap - 3).mean()))
  print('\n| text | splitter | bytes | units | mean | std | median | p90 | max | at cap (>= cap-3) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} | '
          f'{r[7]:.0f} | {r[8]} | {r[9]:.1%} |')
  for tname, t in texts.items():
    data = t.encode()[:opts['render_bytes']]
    print(f'\n### {tname}\n')
    for sname, sp in splitters.items():
      bounds = sp.starts(data).tolist() + [len(data)]
      pieces = [data[a:b].decode('utf-8', 'backslashreplace') for a, b in zip(bounds, bounds[1:])]
      shown = '|'.join(p.replace('\n', '⏎') for p in pieces)
      print(f'- **{sname}**: `{shown}`')


PIECE_BYTES = 200
CAP = 16


def _texts(cfg_data, n: int, text_file: str) -> dict[str, bytes]:
  """'normal' (the first `n` bytes of the validation split), 'no spaces', and the text file's
  first `n` bytes (cut at a character start)."""
  from data import corpus  # pylint: disable=import-outside-toplevel
  source = corpus.get_source(cfg_data, cfg_data.eval_split)
  text, i = '', 0
  while len(text.encode()) < n and i < len(source):
    text += source[i] + '\n'
    i += 1
  text = text.encode()[:n].decode('utf-8', 'ignore')
  out = {'normal': text.encode(), 'no spaces': text.replace(' ', '').encode()}
  if text_file:
    if not os.path.isfile(text_file):
      raise SystemExit(f'--text_file={text_file}: no such file')
    with open(text_file, encoding='utf-8') as f:
      data = f.read().encode()[:n].decode('utf-8', 'ignore')
    out[os.path.basename(text_file)] = data.encode()
  return out


def _units(member, state, piece: bytes) -> np.ndarray:
  """Byte lengths of the units `member`'s model used on `piece` (scored as a document)."""
  starts = getattr(state, 'word_starts', None)
  if starts is not None:  # a HAT: its word starts over [bos] + bytes, as the view decided them
    s = sorted({0} | {int(x) - 1 for x in starts if 1 <= x <= len(piece)})
    return np.diff(np.append(s, len(piece)))
  enc = member.family.encoder
  if hasattr(enc, 'token_bytes'):  # a subword LM: its tokens
    return enc.token_bytes[np.asarray(enc.encode(piece.decode('utf-8', 'ignore')))]
  return np.ones(len(piece), np.int64)  # a byte LM: bytes


def _score(member, items) -> tuple[float, list[np.ndarray]]:
  """Bits per byte of `member`'s byte view on `items` (pieces, each a document) and the units
  of every piece, from one pass of the view (a HAT's `distributions_and_starts`: one training
  forward for learned chunking and entropy patches, byte by byte for the other splitters)."""
  import types  # pylint: disable=import-outside-toplevel
  from train.evals import byte_views  # pylint: disable=import-outside-toplevel
  view, rows, units = member.view, [], []
  both = getattr(view, 'distributions_and_starts', None)
  for p, end in items:
    d, starts = both(p) if both else (view.distributions(p), None)
    rows.append(d if end else d[:-1])
    units.append(_units(member, types.SimpleNamespace(word_starts=starts), p))
  scored = byte_views.Scored(np.concatenate(rows).astype(np.float32),
                             byte_views.targets_of(items), byte_views.n_bytes(items), 0.0)
  return scored.bpb(), units


def _stats(lens: np.ndarray, capped: bool) -> dict:
  return {'mean': lens.mean(), 'std': lens.std(), 'median': np.median(lens),
          'p90': np.percentile(lens, 90), 'max': lens.max(),
          'at_cap': (lens >= CAP - 3).mean() if capped else None}


def _recorded(wd: str) -> dict:
  """What the sweep recorded for a run: its config, train summary and final evaluation, and
  training bytes/s (bytes of its metrics.jsonl over the training loop's seconds)."""
  import json  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel

  def read(name):
    with open(os.path.join(wd, name)) as f:
      return json.load(f)
  cfg, summary = read('config.json'), read('train_summary.json')
  ev = summary.get('eval') or {}
  evals = sorted((int(m.group(1)), f) for f in os.listdir(wd)
                 if (m := re.fullmatch(r'eval_step(\d+)\.json', f)))
  if evals and evals[-1][0] == summary.get('step'):
    ev = read(evals[-1][1])
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    nbytes = sum(json.loads(line).get('n_bytes', 0.0) for line in f if line.strip())
  rob = ev.get('robustness') or {}
  return {'cfg': cfg, 'steps': summary.get('step'), 'params': summary.get('params'),
          'train_flops': summary.get('train_flops'), 'val_bpb': ev.get('bpb'),
          'caps_bpb': (rob.get('caps') or {}).get('bpb'),
          'replace_bpb': (rob.get('replace') or {}).get('bpb'),
          'next_word': (ev.get('next_word') or {}).get('accuracy'),
          'next_word_bytes': (ev.get('next_word') or {}).get('byte_accuracy'),
          'train_bytes_per_s': nbytes / summary['train_seconds']}


def _fmt(v, spec: str = '.3f') -> str:
  return '–' if v is None else format(v, spec)


def _sweep(opts) -> None:
  import csv  # pylint: disable=import-outside-toplevel
  import gc  # pylint: disable=import-outside-toplevel
  import hashlib  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from train import config_lib, cross_family  # pylint: disable=import-outside-toplevel
  from train.evals import byte_views  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  root = opts['sweep']
  path = os.path.join(root, 'summary.csv')
  if os.path.isfile(path):
    with open(path) as f:
      names = [r['run'] for r in csv.DictReader(f) if r.get('status') == 'done']
  elif os.path.isdir(root):  # a sweep still running: the points trained so far, in their order
    done = [os.path.join(root, d, 'train_summary.json') for d in os.listdir(root)]
    names = [os.path.basename(os.path.dirname(p))
             for p in sorted((p for p in done if os.path.isfile(p)), key=os.path.getmtime)]
  else:
    raise SystemExit(f'--sweep={root}: no such sweep workdir')
  runs = {}
  for name in names:
    rec = _recorded(os.path.join(root, name))
    if rec['cfg']['train'].get('flops_budget', 0) > 0:  # the patcher trained a fixed number
      runs[name] = rec                                   # of steps: not a matched point
  if not runs:
    raise SystemExit(f'--sweep={root}: no finished run trained under a FLOP budget')
  first = next(r for r in runs.values() if not r['cfg']['data'].get('char_map'))
  data_cfg = config_lib.load('configs/hat.py:tiny')[0].data
  data_cfg.update(first['cfg']['data'])
  texts = _texts(data_cfg, opts['bytes'], opts['text_file'])
  items = {t: byte_views.pieces([b], PIECE_BYTES) for t, b in texts.items()}
  # measurements kept in the sweep workdir, so a rerun (e.g. while the sweep goes on) measures
  # only runs and texts it has not measured yet
  cache_path = os.path.join(root, 'units_benchmark.json')
  cache = {}
  if os.path.isfile(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  per_text, shown = [], {t: {} for t in texts}
  for name, rec in runs.items():
    m = None
    capped = rec['cfg']['family'] == 'hat' and rec['cfg']['model'].get('chunking') != 'learned'
    for t, it in items.items():
      key = f'{name}@{rec["steps"]}|{t}|{hashlib.sha1(texts[t]).hexdigest()[:16]}'
      if key not in cache:
        m = m or cross_family.Member(os.path.join(root, name), 'units --sweep')
        t1 = time.perf_counter()
        bpb, units = _score(m, it)
        cache[key] = {'bpb': bpb, 'units': [u.tolist() for u in units],
                      'seconds': round(time.perf_counter() - t1, 1)}
      bpb, units = cache[key]['bpb'], [np.asarray(u) for u in cache[key]['units']]
      lens = np.concatenate(units)
      per_text.append({'text': t, 'run': name, 'bpb': bpb, **_stats(lens, capped)})
      if t == 'normal':
        rec['units'] = _stats(lens, capped)
      shown[t][name] = units[0]
      print(f'{name} on {t}: {bpb:.4f} bits per byte, {lens.mean():.2f} bytes per unit '
            f'({cache[key]["seconds"]:.0f} s)', flush=True)
    key = f'{name}@{rec["steps"]}|gen|{opts["gen_bytes"]}'
    if key not in cache:
      m = m or cross_family.Member(os.path.join(root, name), 'units --sweep')
      cache[key] = byte_views.generation_speed(m.view, b'def ', opts['gen_bytes'])['bytes_per_s']
    rec['gen'] = cache[key]
    with open(cache_path, 'w') as f:
      json.dump(cache, f)
    del m
    gc.collect()
  lines = ['| run | steps | val bits/byte | bytes/unit (mean ± std) | ALL-CAPS bits/byte | '
           'char-noise bits/byte | next-word acc. (bytes) | train bytes/s | gen. bytes/s |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, r in runs.items():
    u = r['units']
    lines.append(f'| {name} | {r["steps"]} | {_fmt(r["val_bpb"])} | {u["mean"]:.2f} ± '
                 f'{u["std"]:.2f} | {_fmt(r["caps_bpb"])} | {_fmt(r["replace_bpb"])} | '
                 f'{_fmt(r["next_word"])} ({_fmt(r["next_word_bytes"])}) | '
                 f'{r["train_bytes_per_s"]:,.0f} | {r["gen"]:,.1f} |')
  lines += ['', '| text | run | bits/byte | mean | std | median | p90 | max | within 3 bytes '
            'of the cap |', '|---|---|---|---|---|---|---|---|---|']
  for r in per_text:
    lines.append(f'| {r["text"]} | {r["run"]} | {r["bpb"]:.3f} | {r["mean"]:.2f} | '
                 f'{r["std"]:.2f} | {r["median"]:.0f} | {r["p90"]:.0f} | {r["max"]} | '
                 f'{_fmt(r["at_cap"], ".1%")} |')
  for t, by_run in shown.items():
    piece = items[t][0][0]
    lines += ['', f'{t} (the first {len(piece)} bytes):', '']
    for name, lens in by_run.items():
      bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
      parts = [piece[a:b].decode('utf-8', 'backslashreplace')
               for a, b in zip(bounds, bounds[1:])]
      lines.append(f'- **{name}**: `' + '|'.join(x.replace('\n', '⏎') for x in parts) + '`')
  sizes = ', '.join(f'{t}: {byte_views.n_bytes(it):,} bytes in {len(it)} pieces'
                    for t, it in items.items())
  lines += ['', f'({sizes}; {time.perf_counter() - t0:.0f} s)']
  text = '\n'.join(lines) + '\n'
  print('\n' + text)
  if opts['out']:
    with open(opts['out'], 'w', encoding='utf-8') as f:
      f.write(text)


if __name__ == '__main__':
  main(sys.argv[1:])
