"""Units drawn by each HAT splitter on real text: length statistics and a rendering.

  python benchmarks/units.py --patcher=runs/byte_tiny [--target_len=4] [--max_word_bytes=16] \
      [--bytes=20000] [--text_file=PATH] [--render_bytes=300]

Texts: the first `--bytes` bytes of the embedded corpus's validation split ('normal'), the same
with its spaces removed ('no spaces'), and optionally `--text_file` (e.g. a CJK text). Splitters:
whitespace, unicode, spacebyte, and entropy patches (both rules) from the byte-LM run
`--patcher`, each threshold calibrated on the training split (its first 256 rows) to
`--target_len` bytes per unit, as `data.splitter='entropy'` does. For each text and splitter:
bytes per unit (mean, std, median, 90th percentile, max) and the share of units the
`--max_word_bytes` cap cut; then a Markdown rendering of the start of each text with `|` before
every unit. Each text is split as one document (after a bos id).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def main(argv) -> None:
  opts = cli.parse_opts(argv, {'patcher': '', 'target_len': 4.0, 'max_word_bytes': 16,
                               'bytes': 20_000, 'text_file': '', 'render_bytes': 300}, __doc__)
  if not opts['patcher']:
    raise SystemExit(f'--patcher=RUN (a finished byte-LM run) is needed\n{__doc__}')
  import numpy as np  # pylint: disable=import-outside-toplevel
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


if __name__ == '__main__':
  main(sys.argv[1:])
