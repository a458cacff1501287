"""Compile time of the trainer's step with and without `model.scan_layers`, on this machine.

  python benchmarks/compile_time.py [--configs=configs/subword_lm.py:1b,configs/hat.py:1b]
      [--scan=false,true] [--batch_size=0] [--config.KEY=VALUE ...]

For each config and scan setting: `trainer.Setup(cfg)`, then the trainer's jitted train step
lowered with abstract state and batch (no parameters are allocated, nothing is trained) and
compiled for this backend. Prints trace + lowering seconds, XLA compile seconds and the
program's peak temporary bytes. --batch_size=0 keeps the preset's global batch. Subword
presets use their vocabulary size without training a tokenizer (benchmarks/aot.py).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def parse(argv):
  opts = {'configs': 'configs/subword_lm.py:1b,configs/hat.py:1b', 'scan': 'false,true',
          'batch_size': 0}
  over = [a for a in argv if a.lstrip('-').startswith('config.')]
  overrides = dict(a.lstrip('-')[len('config.'):].partition('=')[::2] for a in over)
  return cli.parse_opts([a for a in argv if a not in over], opts, __doc__), overrides


def measure(spec: str, scan: bool, overrides: dict, batch_size: int = 0) -> dict:
  from benchmarks import aot
  cfg = aot.load_config(spec, {**overrides, 'model.scan_layers': scan})
  t0 = time.perf_counter()
  setup = aot.make_setup(cfg)
  setup_s = time.perf_counter() - t0
  lowered, lower_s = aot.lower_train_step(setup, batch_size or None)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {'config': spec, 'scan_layers': scan, 'params_M': setup.n_params / 1e6,
          'layers': cfg.model.num_layers, 'setup_s': setup_s, 'lower_s': lower_s,
          'compile_s': compile_s, 'temp_GB': getattr(mem, 'temp_size_in_bytes', 0) / 1e9}


def main(argv):
  import jax
  opts, overrides = parse(argv)
  print(f'backend {jax.default_backend()} | devices {jax.device_count()}', flush=True)
  print('| config | scan_layers | params (M) | trace + lower s | compile s | temp GB |')
  print('|---|---|---|---|---|---|')
  for spec in opts['configs'].split(','):
    for scan in opts['scan'].split(','):
      r = measure(spec, scan.lower() in ('1', 'true', 'yes'), overrides, opts['batch_size'])
      print(f"| {r['config']} | {r['scan_layers']} | {r['params_M']:.0f} | {r['lower_s']:.1f} | "
            f"{r['compile_s']:.1f} | {r['temp_GB']:.1f} |", flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
