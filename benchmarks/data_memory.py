"""Peak memory of data loading on a large local text file.

  python benchmarks/data_memory.py [--mb=1024] [--dir=/tmp/notoklm_data_memory] [--batches=300]

Writes a text file of --mb megabytes (streamed; deterministic): paragraphs of sentence lines,
plus two hostile stretches -- a 64 MB line without a newline and a 128 MB paragraph without a
blank line. Then, each in a fresh process so the peaks are separate, and after the imports:
  prepare  -- `data.source=text:FILE`: scan, split and write the TFDS array_record dataset;
  load     -- the packed byte train iterator (prefetch thread) for --batches batches.
Prints each stage's peak RSS (ru_maxrss) next to the RSS right after the imports, the file
size and the throughput.
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ('the of and to in is that for it as with was on be by this are from or an which at '
         'not have but they one all were their can has more its also been new when there other '
         'data model token word byte text python function value return class import').split()


def write_file(path: str, mb: int, seed: int = 0) -> int:
  rng = random.Random(seed)
  target = mb << 20
  hostile_line, hostile_para = 64 << 20, 128 << 20
  written = 0
  with open(path, 'w', encoding='utf-8') as f:
    def emit(s):
      nonlocal written
      f.write(s)
      written += len(s.encode())

    def sentence():
      return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))).capitalize() + '. '

    while written < target:
      if written >= target // 3 and hostile_line:  # one 64 MB line
        block = ''.join(sentence() for _ in range(2000))
        n = 0
        while n < hostile_line:
          emit(block)
          n += len(block)
        emit('\n\n')
        hostile_line = 0
      elif written >= 2 * target // 3 and hostile_para:  # one 128 MB paragraph (no blank line)
        n = 0
        while n < hostile_para:
          line = sentence() + '\n'
          emit(line)
          n += len(line)
        emit('\n')
        hostile_para = 0
      else:
        emit(''.join(sentence() + '\n' for _ in range(rng.randint(1, 30))) + '\n')
  return written


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(name: str, path: str, data_dir: str, batches: int) -> dict:
  from configs import byte_lm
  from data import corpus, encoders, pipeline
  cfg = byte_lm.get_config('tiny')
  cfg.data.source = f'text:{path}'
  cfg.data.data_dir = data_dir
  cfg.data.seq_len, cfg.train.batch_size = 1024, 32
  base = _rss_mb()
  t0 = time.perf_counter()
  out = {'stage': name, 'rss_after_imports_mb': round(base, 1)}
  if name == 'prepare':
    src = corpus.get_source(cfg.data, 'train')
    out['documents'] = len(src)
    out['stats'] = {k: v for k, v in src.stats.items() if 'skip' in k or 'cut' in k}
  else:
    it = pipeline.make_train_iterator(cfg, encoders.ByteEncoder(), 0, 1)
    n_bytes = 0
    for _ in range(batches):
      n_bytes += int(next(it)['target_bytes'].sum())
    it.close()
    out['bytes'] = n_bytes
  out['seconds'] = round(time.perf_counter() - t0, 1)
  out['peak_rss_mb'] = round(_rss_mb(), 1)
  return out


def main(argv):
  opts = {'mb': 1024, 'dir': '/tmp/notoklm_data_memory', 'batches': 300}
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k == 'stage':
      name, path, data_dir, batches = v.split(',')
      print(json.dumps(stage(name, path, data_dir, int(batches))))
      return
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
    opts[k] = type(opts[k])(v)
  os.makedirs(opts['dir'], exist_ok=True)
  path = os.path.join(opts['dir'], f'big_{opts["mb"]}mb.txt')
  if not os.path.exists(path) or os.path.getsize(path) < opts['mb'] << 20:
    t0 = time.perf_counter()
    size = write_file(path, opts['mb'])
    print(f'wrote {path}: {size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s', flush=True)
  data_dir = os.path.join(opts['dir'], 'tfds')
  rows = []
  for name in ('prepare', 'load'):
    p = subprocess.run([sys.executable, __file__, f'--stage={name},{path},{data_dir},'
                        f'{opts["batches"]}'], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
    if p.returncode:
      raise SystemExit(f'{name} failed:\n{p.stderr[-3000:]}')
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  size_mb = os.path.getsize(path) / 2**20
  print(f'\nfile {size_mb:.0f} MiB')
  print('| stage | RSS after imports (MiB) | peak RSS (MiB) | seconds |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['stage']} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
          f"{r['seconds']:.0f} |")


if __name__ == '__main__':
  main(sys.argv[1:])
