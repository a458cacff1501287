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
  g.add_argument('--launcher', choices=('slurm', 'tpu', 'local'), default='slurm')
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
  g.add_argument('--dry', action='store_true', help='print every command, run nothing')
  g.add_argument('--max_restarts', type=int, default=20,
                 help='tpu/local --submit: restarts of a preempted or failed job')
  g.add_argument('--restart_backoff', type=float, default=60.0, help='seconds between attempts')
  g.add_argument('--spot', action='store_true',
                 help='tpu: a spot queued resource, created when missing, recreated when lost')
  g.add_argument('--accelerator_type', default='', help='tpu --spot: e.g. v5litepod-256')
  g.add_argument('--runtime_version', default='', help='tpu --spot: e.g. v2-alpha-tpuv5-lite')
  g.add_argument('--allow_dirty', action='store_true',
                 help='tpu: ship uncommitted changes to tracked files (as a stash commit)')
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

  for name in ('absl', 'gcsfs', 'google'):  # a bucket's transport errors: the message says it
    logging.getLogger(name).addFilter(_NoTraceback())
  default = sys.unraisablehook

  def unraisable(u):
    if isinstance(u.exc_value, RuntimeError) and 'Event loop is closed' in str(u.exc_value):
      return
    # reads of an unreadable checkpoint left pending by orbax after the fallback already said
    # which step it skipped and why
    tb, files = u.exc_traceback, []
    while tb is not None:
      files.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    if 'TensorStore' in str(u.exc_value) or any('orbax' in f for f in files):
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
  if args.mode == 'eval' and cfg.get('dynamic', ''):
    from train import dynamic  # pylint: disable=import-outside-toplevel
    dynamic.run(cfg, args.workdir, step=args.step)
  elif args.mode == 'eval':
    trainer.evaluate(cfg, args.workdir, step=args.step)
  elif args.mode == 'sample' and cfg.get('dynamic', ''):
    from train import dynamic  # pylint: disable=import-outside-toplevel
    dynamic.sample(cfg, args.workdir, step=args.step)
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
  """--mode=launch, --mode=sweep --sweep_jobs=..., --mode=sweep_summary: no devices needed."""
  import shlex
  import subprocess
  from train import launching, storage, sweep
  for name in ('nodes', 'gpus_per_node', 'max_restarts', 'restart_backoff'):
    low = 1 if name == 'nodes' else 0
    if getattr(args, name) < low:
      print(f'error: --{name}={getattr(args, name)}: must be >= {low}', file=sys.stderr)
      return 2
  workdir = storage.canonical(args.workdir)  # a gs:// URL is passed on untouched
  out_dir = launching.launch_dir(workdir)
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
  log_dir = os.path.join(out_dir, 'logs') if not storage.is_remote(workdir) else os.path.join(
      repo, 'slurm_logs')
  if args.mode == 'sweep':
    cmds = sweep.job_commands(args.config, module.get_sweep(cfg), workdir, overrides, repo,
                              cfg=cfg)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'sweep_commands.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(cmds) + '\n')
    if args.sweep_jobs == 'print':
      print('\n'.join(cmds))
      print(f'# {len(cmds)} jobs (also in {path}); then: python launch.py --config={args.config} '
            f'--workdir={workdir} --mode=sweep_summary')
      return 0
    text = launching.slurm_script([], f'{name}-sweep', args.nodes, args.gpus_per_node, args.time,
                                  args.partition, repo, array=len(cmds), commands_file=path,
                                  log_dir=log_dir)
    script = os.path.join(out_dir, 'sweep.sbatch')
  else:
    run_args = launching.launch_args(args.config, workdir, overrides)
    steps = None if cfg.train.flops_budget > 0 else int(cfg.train.steps)
    if args.launcher in ('tpu', 'local'):
      return _controlled_job(args, run_args, workdir, steps, out_dir, repo)
    text = launching.slurm_script(run_args, name, args.nodes, args.gpus_per_node, args.time,
                                  args.partition, repo, log_dir=log_dir)
    script = os.path.join(out_dir, 'train.sbatch')
  os.makedirs(out_dir, exist_ok=True)
  with open(script, 'w') as f:
    f.write(text)
  print(text, end='')
  print(f'# written to {script}')
  if args.submit:
    cmd = ['sbatch', script]
    print('# running: ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)
  return 0


def _controlled_job(args, run_args, workdir, steps, out_dir, repo) -> int:
  """--launcher=tpu / local: the job's commands (--dry prints them), tpu.sh for one attempt by
  hand, and with --submit the restart loop run from here until the run has finished."""
  import shlex
  from train import launching, storage
  if args.launcher == 'tpu':
    if not args.tpu or not args.zone:
      print('error: --launcher=tpu needs --tpu=NAME and --zone=ZONE', file=sys.stderr)
      return 2
    if not storage.is_remote(workdir):
      print(f'# warning: the workdir is on each worker\'s own disk ({workdir}): on a multi-host '
            'slice the hosts do not share it and it is lost with the slice; use a gs:// workdir')
    archive, commit = launching.code_archive(out_dir, repo, args.allow_dirty)
    run_args = [launching.repo_relative(a, repo) for a in run_args]  # workers cd into the copy
    job = launching.TpuJob(run_args, args.tpu, args.zone, args.project, archive, commit,
                           spot=args.spot, accelerator_type=args.accelerator_type,
                           runtime_version=args.runtime_version, poll_s=args.poll_seconds)
    script = os.path.join(out_dir, 'tpu.sh')
    with open(script, 'w') as f:
      f.write(job.script())
    print(f'# code: commit {commit} in {archive}; one attempt by hand: bash {script}')
  else:
    job = launching.LocalJob(run_args, repo=repo)
  if args.dry or not args.submit:
    for cmd in job.commands():
      print(' '.join(shlex.quote(c) for c in cmd))
    if not args.dry:
      print('# add --submit to run it (restarted until it finishes, at most '
            f'{args.max_restarts} times)')
    return 0
  return launching.restart_loop(job, workdir, steps, args.max_restarts, args.restart_backoff)


if __name__ == '__main__':
  sys.exit(main())
