"""Write the multi-host job of this same config and workdir (--launcher); --submit runs it.

--launcher=slurm writes an sbatch script (WORKDIR/launch/train.sbatch); --launcher=tpu prints
the commands of a TPU pod run (ship the code, set up, start on every worker; tpu.sh for one
attempt by hand) and --launcher=local those of this machine; with --submit both are run and
restarted until the run has finished (train/launching.py). Uses no devices.
"""
from __future__ import annotations

import os
import shlex
import sys

from train import launching, modes, storage
from train.modes import _flags, _jobs


class Mode(modes.Mode):
  devices = False

  def add_flags(self, flags) -> None:
    flags.add_argument('--launcher', choices=('slurm', 'tpu', 'local'), default='slurm')
    _jobs.add_flags(flags)
    flags.add_argument('--tpu', default='', help='TPU VM (pod slice) name')
    flags.add_argument('--zone', default='')
    flags.add_argument('--project', default='')
    flags.add_argument('--dry', action='store_true', help='print every command, run nothing')
    flags.add_argument('--spot', action='store_true',
                       help='tpu: a spot queued resource, created when missing, recreated when '
                            'lost')
    flags.add_argument('--accelerator_type', default='', help='tpu --spot: e.g. v5litepod-256')
    flags.add_argument('--runtime_version', default='',
                       help='tpu --spot: e.g. v2-alpha-tpuv5-lite')
    flags.add_argument('--allow_dirty', action='store_true',
                       help='tpu: ship uncommitted changes to tracked files (as a stash commit)')
    _flags.poll_seconds(flags)

  def run(self, args, cfg, module, overrides) -> int:
    if _jobs.check_counts(args):
      return 2
    _preflight(args, cfg)  # before anything is written: a job that cannot run is refused
    where = _jobs.place(args)
    run_args = launching.launch_args(args.config, where.workdir, overrides)
    steps = None if cfg.train.flops_budget > 0 else int(cfg.train.steps)
    if args.launcher in ('tpu', 'local'):
      return _controlled_job(args, run_args, where.workdir, steps, where.out_dir, where.repo)
    text = launching.slurm_script(run_args, where.name, args.nodes, args.gpus_per_node,
                                  args.time, args.partition, where.repo, log_dir=where.log_dir)
    return _jobs.write_script(args, where.out_dir, 'train.sbatch', text)


def _preflight(args, cfg) -> None:
  """The job checked on the devices it is written for (train/preflight.py) and its summary
  printed; a PreflightError (exit 1) when it cannot run there. tpu: the slice of
  --accelerator_type; slurm: --nodes x --gpus_per_node; local: checked when training starts
  (finding this machine's devices here would claim the accelerator the job is about to use)."""
  from train import preflight  # pylint: disable=import-outside-toplevel
  if args.launcher == 'tpu':
    if not args.accelerator_type:
      print('# preflight: the slice\'s size is not known here (pass --accelerator_type=..., e.g. '
            'v5litepod-256, to check the batch and mesh against it); checked when training '
            'starts')
      return
    target = preflight.tpu_target(args.accelerator_type)
  elif args.launcher == 'slurm':
    target = preflight.slurm_target(args.nodes, args.gpus_per_node)
  else:
    print('# preflight: checked against this machine\'s devices when training starts')
    return
  job = preflight.plan(cfg, target, _flops_per_token(cfg),
                       repo=args.repo or launching.REPO)
  print(f'# preflight: {args.config} on {target.name}: fits')
  print('\n'.join('#' + line for line in job.summary().splitlines()))
  if target.processes > 1:
    for note in _local_data(cfg):
      print(f'# warning: {note}')


def _local_data(cfg) -> list[str]:
  """What a multi-host job reads from each worker's own disk: the launchers ship the code, not
  the data, so such a path must exist on every worker (a gcsfuse mount at the same path, or a
  copy); a gs:// URL needs neither."""
  d = cfg.data
  out = []
  for key in ('source', 'eval_source'):
    spec = str(d.get(key, '') or '')
    kind, _, rest = spec.partition(':')
    if key == 'eval_source':  # patterns without a prefix
      kind, rest = 'shards', spec
    if kind not in ('shards', 'text') or not rest:
      continue
    local = [p for p in rest.split(',') if p and not storage.is_remote(p)]
    if local:
      out.append(f'data.{key} reads {", ".join(local)} on each worker\'s own disk: the job ships '
                 'the code, not the data (mount the bucket with gcsfuse at that path on every '
                 'worker, or use a gs:// URL)')
  if str(d.get('data_dir', '') or '') and str(d.get('source', '')).startswith('tfds:'):
    out.append(f'data.data_dir={d.data_dir} is on each worker\'s own disk: every worker needs '
               'the prepared dataset there (a gcsfuse mount of the bucket at that path, or a '
               'copy)')
  return out


def _flops_per_token(cfg) -> float | None:
  """The family's training FLOPs per position (its own accounting), or None when the family
  cannot be built on this machine (e.g. pretrained weights that only the workers have)."""
  from train import families  # pylint: disable=import-outside-toplevel
  c = cfg.copy_and_resolve_references()
  c.train.compute_dtype = 'float32'  # 'auto' would start this machine's accelerator
  try:
    return float(families.get(c).flops_per_token())
  except Exception as e:  # pylint: disable=broad-except
    print(f'# preflight: no FLOPs ({type(e).__name__}: {e})')
    return None


def _controlled_job(args, run_args, workdir, steps, out_dir, repo) -> int:
  """--launcher=tpu / local: the job's commands (--dry prints them), tpu.sh for one attempt by
  hand, and with --submit the restart loop run from here until the run has finished."""
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
