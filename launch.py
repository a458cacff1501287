"""Entry point for every family and mode.

  python launch.py --config=configs/byte_lm.py:tiny --workdir=runs/byte_tiny [--mode=train]
      [--config.optim.lr=1e-3 ...] [--step=N]

Modes: train (default; resumes if the workdir has a checkpoint), eval (restore the latest or
--step checkpoint onto this process's devices and write validation bits per byte to
eval_step{N}.json), sample (generate from config.sample.prompt), sweep (run every point of the
config file's get_sweep(config) in its own sub-workdir and summarize; with --sweep_jobs=print or
slurm, write one independent job per point instead), sweep_summary (gather the points' finished
runs), evaluator (follow the workdir and evaluate every new checkpoint once), launch (write the
per-host command for a TPU pod, --launcher=tpu, or an sbatch script, --launcher=slurm, for this
same config and workdir; --submit runs it), transfer (a pretrained model with a new tokenizer,
see train/transfer.py), export (a token LM's checkpoint as an HF-format directory), ensemble
and report (over finished runs of any families, through their byte-level views: cross-tokenizer
ensembles, one table across families; --config=configs/cross_family.py, train/cross_family.py).
Multi-host: on a SLURM step or a TPU pod slice jax.distributed starts from the environment;
elsewhere pass --coordinator=HOST:PORT --num_processes=N --process_id=I (or set
NOTOKLM_COORDINATOR / NOTOKLM_NUM_PROCESSES / NOTOKLM_PROCESS_ID). See train/launching.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

MODES = ('train', 'eval', 'sample', 'sweep', 'sweep_summary', 'evaluator', 'launch', 'transfer',
         'export', 'ensemble', 'report')


def parse(argv):
  from train import config_lib
  overrides, rest = config_lib.parse_argv_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='configs/FILE.py[:preset]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--mode', default='train', choices=MODES)
  p.add_argument('--step', type=int, default=None, help='checkpoint step for eval/sample')
  p.add_argument('--debug', action='store_true',
                 help="show the traceback of an error that is reported as the user's mistake")
  p.add_argument('--coordinator', default=os.environ.get('NOTOKLM_COORDINATOR'))
  p.add_argument('--num_processes', type=int,
                 default=int(os.environ.get('NOTOKLM_NUM_PROCESSES', '0')) or None)
  p.add_argument('--process_id', type=int,
                 default=int(os.environ['NOTOKLM_PROCESS_ID'])
                 if 'NOTOKLM_PROCESS_ID' in os.environ else None)
  g = p.add_argument_group('evaluator')
  g.add_argument('--poll_seconds', type=float, default=30.0)
  g.add_argument('--max_idle_seconds', type=float, default=0.0,
                 help='exit with an error after this long without a new checkpoint (0: never)')
  g = p.add_argument_group('launch and sweep jobs')
  g.add_argument('--launcher', choices=('slurm', 'tpu'), default='slurm')
  g.add_argument('--sweep_jobs', choices=('', 'print', 'slurm'), default='')
  g.add_argument('--submit', action='store_true', help='run the written script / command')
  g.add_argument('--nodes', type=int, default=1)
  g.add_argument('--gpus_per_node', type=int, default=8)
  g.add_argument('--partition', default='')
  g.add_argument('--time', default='24:00:00')
  g.add_argument('--tpu', default='', help='TPU VM (pod slice) name')
  g.add_argument('--zone', default='')
  g.add_argument('--project', default='')
  g.add_argument('--repo', default='', help='repository path on the hosts (default: this one)')
  args = p.parse_args(rest)
  return args, overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  debug = '--debug' in argv
  if not debug:
    _quiet_background_errors()
  from train import config_lib
  try:
    args, overrides = parse(argv)
    cfg, module = config_lib.load(args.config)
    config_lib.override(cfg, overrides)
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    return _main(args, cfg, module, overrides)
  except config_lib.ConfigError as e:
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  except _user_errors() as e:
    if debug:
      raise
    # a user's mistake (a bad input, a busy or unusable workdir, a checkpoint to act on, a
    # stopped non-finite step): one paragraph, no traceback. Leave at once: a failed async
    # checkpoint write leaves orbax threads whose shutdown would bury the message.
    print(f'error: {_message(e)}\n(--debug shows the traceback)', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _quiet_background_errors() -> None:
  """A failed asynchronous checkpoint write (full disk, read-only directory) makes orbax's
  writer threads log their tracebacks and leaves asyncio callbacks on a closed loop: hundreds of
  lines before the one message that matters. Without --debug those lines are dropped (the
  errors themselves still end the run with the message)."""
  class _NoTraceback(logging.Filter):
    def filter(self, record):
      record.exc_info, record.exc_text = None, None
      return True

  logging.getLogger('absl').addFilter(_NoTraceback())
  default = sys.unraisablehook

  def unraisable(u):
    if isinstance(u.exc_value, RuntimeError) and 'Event loop is closed' in str(u.exc_value):
      return
    default(u)

  sys.unraisablehook = unraisable


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that report a user's mistake (the code raises them with a message naming the
  input); anything else is a bug and keeps its traceback."""
  from train import checkpoint, storage  # pylint: disable=import-outside-toplevel
  return (ValueError, OSError, FloatingPointError, TimeoutError, checkpoint.CheckpointError,
          storage.WorkdirError)


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e.strerror or ''):
    return f'{e.strerror or type(e).__name__}: {e.filename}'
  return str(e) or type(e).__name__


def _main(args, cfg, module, overrides) -> int:
  if args.mode in ('launch', 'sweep_summary') or (args.mode == 'sweep' and args.sweep_jobs):
    return _write_jobs(args, cfg, module, overrides)  # no devices needed
  from train import launching
  launching.enable_compile_cache()
  how = launching.init_distributed(args.coordinator, args.num_processes, args.process_id)
  if how != 'single':
    import jax
    print(f'jax.distributed ({how}): process {jax.process_index()} of {jax.process_count()}',
          flush=True)
  return _run(args, cfg, module, overrides)


def _run(args, cfg, module, overrides) -> int:
  from train import cross_family, evaluator, sweep, trainer, transfer
  if args.mode == 'train':
    out = trainer.train(cfg, args.workdir)
    return {None: 0, 'SIGTERM': 143, 'SIGINT': 130}.get(out.get('signal'), 0)
  if args.mode == 'eval':
    trainer.evaluate(cfg, args.workdir, step=args.step)
  elif args.mode == 'sample':
    trainer.sample(cfg, args.workdir, step=args.step)
  elif args.mode == 'sweep':
    if not hasattr(module, 'get_sweep'):
      print(f'error: {args.config} defines no get_sweep(config)', file=sys.stderr)
      return 2
    _, stopped = sweep.run(cfg, module.get_sweep(cfg), args.workdir, overrides)
    return {None: 0, 'SIGTERM': 143, 'SIGINT': 130}[stopped]
  elif args.mode == 'export':
    trainer.export_hf(cfg, args.workdir, step=args.step)
  elif args.mode == 'transfer':
    transfer.run(cfg, args.workdir)
  elif args.mode == 'ensemble':
    cross_family.ensemble(cfg, args.workdir)
  elif args.mode == 'report':
    cross_family.report(cfg, args.workdir)
  elif args.mode == 'evaluator':
    evaluator.run(cfg, args.workdir, args.poll_seconds, args.max_idle_seconds)
  else:
    return 2
  return 0


def _write_jobs(args, cfg, module, overrides) -> int:
  """--mode=launch, --mode=sweep --sweep_jobs=..., --mode=sweep_summary: text and files only."""
  import shlex
  import subprocess
  from train import launching, sweep
  workdir = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(workdir, 'launch'), exist_ok=True)
  name = os.path.basename(workdir.rstrip('/')) or 'notoklm'
  repo = args.repo or os.path.dirname(os.path.abspath(__file__))
  if args.mode in ('sweep', 'sweep_summary') and not hasattr(module, 'get_sweep'):
    print(f'error: {args.config} defines no get_sweep(config)', file=sys.stderr)
    return 2
  if args.mode == 'sweep_summary':
    rows = sweep.gather(cfg, module.get_sweep(cfg), workdir, overrides)
    missing = [r['run'] for r in rows if r['status'] != 'done']
    print(f'{len(rows) - len(missing)} of {len(rows)} points done'
          + (f'; not done: {", ".join(missing)}' if missing else ''))
    return 0
  if args.mode == 'sweep':
    cmds = sweep.job_commands(args.config, module.get_sweep(cfg), workdir, overrides, repo,
                              cfg=cfg)
    path = os.path.join(workdir, 'launch', 'sweep_commands.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(cmds) + '\n')
    if args.sweep_jobs == 'print':
      print('\n'.join(cmds))
      print(f'# {len(cmds)} jobs (also in {path}); then: python launch.py --config={args.config} '
            f'--workdir={workdir} --mode=sweep_summary')
      return 0
    text = launching.slurm_script([], f'{name}-sweep', args.nodes, args.gpus_per_node, args.time,
                                  args.partition, repo, array=len(cmds), commands_file=path,
                                  log_dir=os.path.join(workdir, 'launch', 'logs'))
    script = os.path.join(workdir, 'launch', 'sweep.sbatch')
  else:
    run_args = launching.launch_args(args.config, workdir, overrides)
    if args.launcher == 'tpu':
      if not args.tpu or not args.zone:
        print('error: --launcher=tpu needs --tpu=NAME and --zone=ZONE', file=sys.stderr)
        return 2
      text = '#!/bin/bash\n' + launching.tpu_command(run_args, args.tpu, args.zone,
                                                      args.project, repo) + '\n'
      script = os.path.join(workdir, 'launch', 'tpu.sh')
    else:
      text = launching.slurm_script(run_args, name, args.nodes, args.gpus_per_node, args.time,
                                    args.partition, repo,
                                    log_dir=os.path.join(workdir, 'launch', 'logs'))
      script = os.path.join(workdir, 'launch', 'train.sbatch')
  with open(script, 'w') as f:
    f.write(text)
  print(text, end='')
  print(f'# written to {script}')
  if args.submit:
    cmd = ['sbatch', script] if script.endswith('.sbatch') else ['bash', script]
    print('# running: ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)
  return 0


if __name__ == '__main__':
  sys.exit(main())
