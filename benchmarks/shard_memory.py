"""Peak memory of a run on a directory of parquet shards, at two corpus sizes.

  python benchmarks/shard_memory.py [--mb=20] [--factor=10] [--dir=/tmp/notoklm_shard_memory]
      [--steps=60]

Writes parquet shards (FineWeb-style: a `text` column, row groups of 256 documents, 8 MB per
file; deterministic) of --mb megabytes and of --factor times that, then runs the README's tiny
byte-LM command on each (`launch.py --config=configs/byte_lm.py:tiny
--config.data.source=shards:DIR`, --steps steps, evaluation and a checkpoint included) in a
fresh process, and prints each run's peak RSS (ru_maxrss of the child) and wall time. A
streamed source holds one shuffle chunk and one row group, so the peak must not grow with the
corpus.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli  # pylint: disable=wrong-import-position

WORDS = ('the of and to in is that for it as with was on be by this are from or an which at '
         'not have but they one all were their can has more its also been new when there other '
         'data model token word byte text shard bucket parquet stream host epoch row').split()
FILE_MB = 8


def write_shards(d: str, mb: int, seed: int = 0) -> int:
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(d, exist_ok=True)
  rng = random.Random(seed)
  total, k = 0, 0
  while total < mb << 20:
    docs, size = [], 0
    while size < min(FILE_MB, mb) << 20:
      doc = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(50, 800)))
      docs.append(doc)
      size += len(doc) + 1
    pq.write_table(pa.table({'text': docs}), os.path.join(d, f'part-{k:05d}.parquet'),
                   row_group_size=256)
    total += size
    k += 1
  return total


def run(d: str, workdir: str, steps: int) -> dict:
  """One run in a fresh measuring process (ru_maxrss of children is a maximum over all of a
  process's children, so each size gets its own parent)."""
  p = subprocess.run([sys.executable, __file__, f'--one={d},{workdir},{steps}'],
                     capture_output=True, text=True, cwd=ROOT)
  if p.returncode:
    raise SystemExit(p.stdout[-2000:] + p.stderr[-3000:])
  return json.loads(p.stdout.strip().splitlines()[-1])


def one(d: str, workdir: str, steps: int) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=configs/byte_lm.py:tiny',
         f'--workdir={workdir}', f'--config.data.source=shards:{d}',
         f'--config.train.steps={steps}', f'--config.ckpt.every={steps}',
         '--config.train.eval_batches=4']
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  wall = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f'run on {d} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}')
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  summary = json.load(open(os.path.join(workdir, 'train_summary.json')))
  return {'peak_rss_mb': round(peak / 1024, 1), 'seconds': round(wall, 1),
          'val_bpb': summary['eval'].get('bpb'), 'shard_files': summary['data'].get('shard_files'),
          'shard_bytes': summary['data'].get('shard_bytes')}


def main(argv):
  if argv and argv[0].startswith('--one='):
    d, workdir, steps = argv[0][len('--one='):].split(',')
    print(json.dumps(one(d, workdir, int(steps))))
    return
  opts = cli.parse_opts(argv, {'mb': 20, 'factor': 10, 'dir': '/tmp/notoklm_shard_memory',
                               'steps': 60}, __doc__)
  rows = []
  for mb in (opts['mb'], opts['mb'] * opts['factor']):
    d = os.path.join(opts['dir'], f'corpus_{mb}mb')
    if not os.path.isdir(d):
      t0 = time.perf_counter()
      n = write_shards(d, mb)
      print(f'wrote {d}: {n / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s', flush=True)
    r = {'corpus_mb': mb, **run(d, os.path.join(opts['dir'], f'run_{mb}mb'), opts['steps'])}
    print(json.dumps(r), flush=True)
    rows.append(r)
  print('\n| corpus | shard files | peak RSS (MiB) | wall (s) | val bits/byte |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['corpus_mb']} MB | {r['shard_files']} | {r['peak_rss_mb']:.0f} | "
          f"{r['seconds']:.0f} | {r['val_bpb']:.3f} |")


if __name__ == '__main__':
  main(sys.argv[1:])
