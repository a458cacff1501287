"""Entry point for every family and mode.

  python launch.py --config=configs/byte_lm.py:tiny --workdir=runs/byte_tiny [--mode=train]
      [--config.optim.lr=1e-3 ...] [--step=N]

Modes: train (default; resumes if the workdir has a checkpoint), eval (restore the latest or
--step checkpoint onto this process's devices and write validation bits per byte to
eval_step{N}.json), sample (generate from config.sample.prompt), sweep (run every point of the
config file's get_sweep(config) in its own sub-workdir and summarize).
Multi-host: pass --coordinator=HOST:PORT --num_processes=N --process_id=I (or set
NOTOKLM_COORDINATOR / NOTOKLM_NUM_PROCESSES / NOTOKLM_PROCESS_ID) and jax.distributed starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

MODES = ('train', 'eval', 'sample', 'sweep')


def parse(argv):
  from train import config_lib
  overrides, rest = config_lib.parse_argv_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='configs/FILE.py[:preset]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--mode', default='train', choices=MODES)
  p.add_argument('--step', type=int, default=None, help='checkpoint step for eval/sample')
  p.add_argument('--coordinator', default=os.environ.get('NOTOKLM_COORDINATOR'))
  p.add_argument('--num_processes', type=int,
                 default=int(os.environ.get('NOTOKLM_NUM_PROCESSES', '0')) or None)
  p.add_argument('--process_id', type=int,
                 default=int(os.environ['NOTOKLM_PROCESS_ID'])
                 if 'NOTOKLM_PROCESS_ID' in os.environ else None)
  args = p.parse_args(rest)
  return args, overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  from train import config_lib
  try:
    args, overrides = parse(argv)
    cfg, module = config_lib.load(args.config)
    config_lib.override(cfg, overrides)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  import jax
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      print('error: --coordinator needs --num_processes and --process_id', file=sys.stderr)
      return 2
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  try:
    return _run(args, cfg, module, overrides)
  except FileNotFoundError as e:  # a missing input: say which, without a traceback
    print(f'error: {e}', file=sys.stderr)
    return 1


def _run(args, cfg, module, overrides) -> int:
  from train import sweep, trainer
  if args.mode == 'train':
    out = trainer.train(cfg, args.workdir)
    return 0 if 'preempted_at' not in out else 143
  if args.mode == 'eval':
    trainer.evaluate(cfg, args.workdir, step=args.step)
    return 0
  if args.mode == 'sample':
    trainer.sample(cfg, args.workdir, step=args.step)
    return 0
  if args.mode == 'sweep':
    if not hasattr(module, 'get_sweep'):
      print(f'error: {args.config} defines no get_sweep(config)', file=sys.stderr)
      return 2
    sweep.run(cfg, module.get_sweep(cfg), args.workdir, overrides)
    return 0
  return 2


if __name__ == '__main__':
  sys.exit(main())
