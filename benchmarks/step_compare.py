"""Trainer steps of several configs (or variants of one) timed in alternation on synthetic rows.

  python benchmarks/step_compare.py SPEC[@KEY=VALUE,...] SPEC[@...] ... [--steps=2] [--rounds=5]

  # e.g. the layer scan's step-time cost, HAT vs the subword LM
  python benchmarks/step_compare.py configs/hat.py:tiny configs/hat.py:tiny@model.scan_layers=True
  python benchmarks/step_compare.py configs/hat.py:small@train.batch_size=1 \
      configs/subword_lm.py:small@train.batch_size=1 --steps=1 --rounds=3

Each run is the trainer's own step (`trainer.Setup(cfg).make_train_step()`) on full synthetic
rows (benchmarks/aot.host_batch); `lm_throughput.time_interleaved` times --steps steps of each
run in turn for --rounds rounds (the min over rounds: this machine is shared). Prints ms per
step and achieved GFLOP/s (the family's training FLOPs per step / step time).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  import numpy as np
  from benchmarks import aot, lm_throughput
  from train import partitioning
  opts, specs = {'steps': 2, 'rounds': 5}, []
  for a in argv:
    if a.startswith('--'):
      k, _, v = a[2:].partition('=')
      if k not in opts:
        raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
      opts[k] = int(v)
    else:
      specs.append(a)
  if not specs:
    raise SystemExit(__doc__)
  runs, flops = {}, {}
  for item in specs:
    spec, _, ov = item.partition('@')
    cfg = aot.load_config(spec, dict(kv.split('=', 1) for kv in ov.split(',') if kv))
    setup = aot.make_setup(cfg)
    rows = cfg.train.batch_size
    host = {k: np.repeat(x, rows, axis=0) for k, x in aot.host_batch(setup, 1).items()}
    runs[item] = (setup.make_train_step(), setup.init_state(),
                  partitioning.global_batch(host, setup.mesh))
    flops[item] = setup.flops_per_step
  times = lm_throughput.time_interleaved(runs, opts['steps'], opts['rounds'])
  print('| run | GFLOP/step | ms/step (min) | ms/step (median) | GFLOP/s |')
  print('|---|---|---|---|---|')
  for item, (best, median) in times.items():
    print(f'| {item} | {flops[item] / 1e9:.2f} | {best * 1e3:.1f} | {median * 1e3:.1f} | '
          f'{flops[item] / best / 1e9:.1f} |', flush=True)
  return times


if __name__ == '__main__':
  main(sys.argv[1:])
