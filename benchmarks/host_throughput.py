"""Host data throughput: what one host's input pipeline delivers, next to what the `1b` presets
demand of one host on a v5e-256 slice (4 chips per host) and on an 8 x H100 node.

  python benchmarks/host_throughput.py [--seconds=20] [--procs=1] [--workers=0,1,2]
      [--bpe_threads=1] [--rows=8] [--source=] [--mfu=0.4]
      [--configs=configs/byte_lm.py:1b,configs/subword_lm.py:1b,configs/hat.py:1b]

For each config: the family's own train iterator (`Family.train_iterator`: reading the corpus,
tokenizing -- bytes, BPE at the preset's 32k vocabulary, or bytes split into HAT words --
and packing into rows of the preset's seq_len), `--rows` rows per batch, the prefetch thread
off, pulled for `--seconds` after a warm-up batch, once per `--workers` value W
(`data.workers`: 0 builds the batches in the pulling process, W >= 1 in W worker processes,
data/host_workers.py). For subword (BPE) configs, each W is measured again with
`RAYON_NUM_THREADS=--bpe_threads` (HF tokenizers' own thread pool, default one thread per
core; 0: not measured), which gives the rate per tokenizer thread. Each of `--procs` processes
is a separate iterator over its own share (process_index i of n), run at the same time, so the
sum is what n hosts' pipelines deliver on this machine. Printed per row: positions/s (tokens;
bytes for the byte LM and HAT; padding not counted), and the demand per host: chips per host x
peak bf16 FLOP/s x --mfu / the family's training FLOPs per position (its own accounting,
`Family.flops_per_token`), and the headroom (delivered / demanded).
`--source=shards:GLOB` measures a sharded corpus instead of the preset's default source.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli  # pylint: disable=wrong-import-position

# (name, chip, chips per host) of the two targets the issue of scale names.
HOSTS = (('v5e-256 host', 'v5e', 4), ('8xH100 node', 'h100', 8))


def parse(argv):
  opts = {'seconds': 20.0, 'procs': '1', 'workers': '0,1,2', 'bpe_threads': 1, 'rows': 8,
          'mfu': 0.4, 'source': '',
          'configs': 'configs/byte_lm.py:1b,configs/subword_lm.py:1b,configs/hat.py:1b'}
  return cli.parse_opts(argv, opts, __doc__)


def _config(spec: str, rows: int, source: str, workers: int = 0):
  from benchmarks import aot
  over = {'train.batch_size': rows, 'data.prefetch': 0, 'data.workers': workers}
  if source:
    over['data.source'] = source
  return aot.load_config(spec, over)


def _pull(spec: str, rows: int, source: str, seconds: float, index: int, count: int, out,
          workers: int = 0):
  """One process: its share's iterator, warm-up batch, then batches for `seconds`."""
  from train import families
  cfg = _config(spec, rows, source, workers)
  fam = families.get(cfg)
  it = fam.train_iterator(index, count)
  try:
    batch = next(it)  # warm-up: opens files, builds the tokenizer
    key = 'inputs' if 'inputs' in batch else next(iter(batch))
    positions = n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      batch = next(it)
      positions += int(batch[key].size)
      if 'segment_ids' in batch:  # real (non-padding) positions only
        positions -= int((batch['segment_ids'] == 0).sum())
      n += 1
    dt = time.perf_counter() - t0
  finally:
    it.close()
  out.put({'index': index, 'batches': n, 'positions': positions, 'seconds': dt})


def measure(spec: str, rows: int, source: str, seconds: float, procs: int, workers: int = 0,
            threads: int = 0) -> dict:
  """`procs` processes pulling at once, each with `workers` data workers; `threads` > 0:
  RAYON_NUM_THREADS (the tokenizer's pool) in all of them."""
  ctx = mp.get_context('spawn')
  q = ctx.Queue()
  ps = [ctx.Process(target=_pull, args=(spec, rows, source, seconds, i, procs, q, workers))
        for i in range(procs)]
  old = os.environ.get('RAYON_NUM_THREADS')
  if threads:
    os.environ['RAYON_NUM_THREADS'] = str(threads)  # inherited by the spawned processes
  try:
    for p in ps:
      p.start()
  finally:
    if threads:
      if old is None:
        os.environ.pop('RAYON_NUM_THREADS')
      else:
        os.environ['RAYON_NUM_THREADS'] = old
  got = [q.get() for _ in ps]
  for p in ps:
    p.join()
    if p.exitcode:
      raise SystemExit(f'{spec}: a measuring process failed (exit {p.exitcode})')
  return {'positions_per_s': sum(g['positions'] / g['seconds'] for g in got),
          'batches': sum(g['batches'] for g in got)}


def flops_per_position(spec: str, source: str) -> float:
  from benchmarks import aot
  from train import families
  cfg = _config(spec, 8, source)
  cfg.train.compute_dtype = 'float32'
  with aot.vocab_only_encoders():
    return float(families.get(cfg).flops_per_token())


def _is_subword(spec: str, source: str) -> bool:
  return str(_config(spec, 8, source).data.encoder) != 'bytes'


def main(argv):
  opts = parse(argv)
  from train import preflight
  procs = [int(p) for p in opts['procs'].split(',') if p]
  workers = [int(w) for w in opts['workers'].split(',') if w]
  print(f'# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start',
        flush=True)
  rows = []
  for spec in [s for s in opts['configs'].split(',') if s]:
    fpp = flops_per_position(spec, opts['source'])
    demand = {name: chips * preflight.PEAK_BF16_FLOPS[chip] * opts['mfu'] / fpp
              for name, chip, chips in HOSTS}
    threads = [0] + ([opts['bpe_threads']] if opts['bpe_threads'] and
                     _is_subword(spec, opts['source']) else [])
    for n in procs:
      for w in workers:
        for t in threads:
          m = measure(spec, opts['rows'], opts['source'], opts['seconds'], n, w, t)
          row = {'config': spec, 'procs': n, 'workers': w, 'threads': t or 'default', **m,
                 'flops_per_position': fpp}
          for name, d in demand.items():
            row[f'demand {name}'] = d
            row[f'headroom {name}'] = m['positions_per_s'] / d
          rows.append(row)
          print(json.dumps(row), flush=True)
  print(f'# load average {os.getloadavg()[0]:.1f} at the end')
  print()
  names = [h[0] for h in HOSTS]
  print('| config | processes | data.workers | tokenizer threads | positions/s | GFLOP/position | '
        + ' | '.join(f'demand/host {n} | headroom {n}' for n in names) + ' |')
  print('|' + '---|' * (6 + 2 * len(names)))
  for r in rows:
    print(f"| {r['config']} | {r['procs']} | {r['workers']} | {r['threads']} | "
          f"{r['positions_per_s']:,.0f} | {r['flops_per_position'] / 1e9:.2f} | "
          + ' | '.join(f"{r[f'demand {n}']:,.0f} | {r[f'headroom {n}']:.2f}x" for n in names)
          + ' |')


if __name__ == '__main__':
  main(sys.argv[1:])
