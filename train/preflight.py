"""Preflight: what a job needs from its devices, checked before any data or compile work.

`check(cfg, target)` refuses a config that cannot run on `target` (a device count, its hosts
and chip kind) with one message per problem, each naming the keys, the numbers and a fix; it
returns the resolved `Plan`, whose `summary()` is the job in numbers (devices, mesh, rows per
device, tokens per step, steps, total tokens, training FLOPs, time at 40 % MFU). It runs at the
start of training for the devices present (`present()`; train/trainer.py) and in
`--mode=launch` for the slice the job is written for (`tpu_target(--accelerator_type)`,
`slurm_target(--nodes, --gpus_per_node)`; train/modes/launch.py).

What is checked, and why (only what the code requires):
  * the mesh: `mesh.data x mesh.fsdp` must be the device count (`partitioning.mesh_shape`, the
    resolution `make_mesh` uses);
  * the batch: every step's rows are split over BOTH mesh axes (`partitioning.BATCH_AXES`), so
    `train.batch_size` must be a multiple of data x fsdp = the device count, at least one row
    per device -- `mesh.fsdp` moves parameters, not rows, and cannot repair it;
  * the micro-batches: with `train.grad_accum = A` the step splits the batch into A
    micro-batches, each again split over every device (train/trainer.py), so batch_size / A
    must be a multiple of the device count too;
  * the hosts: each host reads `batch_size // process_count` rows (data/pipeline.py);
  * the data on a multi-host TPU pod: each worker reads its own shard of the data from its own
    disk, and the launcher ships only the repository's committed files, so a `text:` file or a
    `tokenizer:` path must be a committed file of the repository named by its path inside it
    (the embedded `python_docs` corpus is built on each host and needs nothing).
Not checked: `data.seq_len` against the attention tiles. Every kernel of models/layers.py pads
T up to its tiles (splash: a multiple of `model.attention_block_q/_kv`; blocked: of its query
block), so no length is refused; a length off the tiles costs only the padded positions.

Layering: a foundation of train/ (imports partitioning only); the trainer and the modes call it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess

from train import partitioning

MFU = 0.4  # the utilisation the time estimate assumes

# Peak dense bf16 FLOP/s of one chip (vendor figures), for the time estimate only.
PEAK_BF16_FLOPS = {
    'v4': 275e12,
    'v5e': 197e12,
    'v5p': 459e12,
    'v6e': 918e12,
    'h100': 989e12,
}

# TPU accelerator-type names: v2/v3/v4/v5p count TensorCores (two per chip), v5litepod / v5e /
# v6e count chips. Hosts hold 4 chips, except single-host slices (up to 8 chips for v5e/v6e).
_TPU_NAMES = {  # prefix -> (chip kind, TensorCores per unit of the name's number, max 1-host chips)
    'v2': ('v2', 2, 4), 'v3': ('v3', 2, 4), 'v4': ('v4', 2, 4), 'v5p': ('v5p', 2, 4),
    'v5litepod': ('v5e', 1, 8), 'v5e': ('v5e', 1, 8), 'v6e': ('v6e', 1, 8),
}
_CHIPS_PER_HOST = 4


class PreflightError(ValueError):
  """The job cannot run on its devices; the message lists every problem with its fix (a
  ValueError: launch.py reports it in one paragraph, exit status 1)."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a job runs: `devices` (chips / GPUs), `processes` (hosts: one JAX process each),
  `chip` (a key of PEAK_BF16_FLOPS, or another name: no time estimate), `platform` ('tpu',
  'gpu', 'cpu' or '' when unknown) and `name` (for messages: 'v5litepod-256', ...)."""
  devices: int
  processes: int = 1
  chip: str = ''
  platform: str = ''
  name: str = ''
  chip_assumed: bool = False  # the chip kind is a guess (a SLURM job's GPUs): said with the time

  def describe(self) -> str:
    """'256 v5e chips (64 hosts) of v5litepod-256', '8 cpu devices of the devices present'."""
    if self.platform == 'tpu':
      what = f'{self.devices} {self.chip} chip{"s" if self.devices != 1 else ""}'
    elif self.platform == 'gpu':
      what = f'{self.devices} GPU{"s" if self.devices != 1 else ""}'
    else:
      what = f'{self.devices} {self.platform or ""} device{"s" if self.devices != 1 else ""}'
      what = what.replace('  ', ' ')
    hosts = f', {self.processes} hosts' if self.processes > 1 else ''
    return (f'{self.name}: ' if self.name else '') + f'{what}{hosts}'


def tpu_target(accelerator_type: str) -> Target:
  """The slice of a Cloud TPU accelerator type: 'v5litepod-256' -> 256 v5e chips on 64 hosts;
  'v4-32' -> 16 v4 chips (v2/v3/v4/v5p names count TensorCores, two per chip) on 4 hosts."""
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator_type.strip().lower())
  if not m or m.group(1) not in _TPU_NAMES:
    raise PreflightError(f'--accelerator_type={accelerator_type!r}: expected a Cloud TPU type '
                         f'such as v5litepod-256, v6e-64, v4-32 or v5p-128 (known generations: '
                         f'{", ".join(sorted(_TPU_NAMES))})')
  chip, per_chip, one_host = _TPU_NAMES[m.group(1)]
  n = int(m.group(2))
  if n % per_chip or n == 0:
    raise PreflightError(f'--accelerator_type={accelerator_type}: {m.group(1)} names count '
                         f'TensorCores, {per_chip} per chip; {n} is not a whole number of chips')
  chips = n // per_chip
  hosts = 1 if chips <= one_host else -(-chips // _CHIPS_PER_HOST)
  return Target(chips, hosts, chip, 'tpu', accelerator_type)


def slurm_target(nodes: int, gpus_per_node: int, chip: str = 'h100') -> Target:
  """A SLURM job: one process per node seeing its GPUs (train/launching.slurm_script). The GPU
  kind is not known from the flags; `chip` (default an H100) only sets the time estimate."""
  return Target(nodes * gpus_per_node, nodes, chip, 'gpu',
                f'{nodes} node{"s" if nodes != 1 else ""} x {gpus_per_node} GPUs',
                chip_assumed=True)


def chip_of(device_kind: str) -> str:
  """A key of PEAK_BF16_FLOPS from a JAX `device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB
  HBM3', ...), else the kind itself, lower-cased."""
  k = device_kind.lower()
  for pattern, chip in (('v5 lite', 'v5e'), ('v5e', 'v5e'), ('v6 lite', 'v6e'), ('v6e', 'v6e'),
                        ('v5p', 'v5p'), ('tpu v5', 'v5p'), ('tpu v4', 'v4'), ('h100', 'h100')):
    if pattern in k:
      return chip
  return k


def present() -> Target:
  """This process's devices (after jax.distributed has started: every host's)."""
  import jax  # pylint: disable=import-outside-toplevel
  return Target(jax.device_count(), jax.process_count(), chip_of(jax.devices()[0].device_kind),
                jax.default_backend())


@dataclasses.dataclass
class Plan:
  """A config resolved on a target: the numbers of the job (see `summary`)."""
  target: Target
  data: int
  fsdp: int
  batch: int
  grad_accum: int
  seq_len: int
  steps: int
  steps_from: str
  flops_per_token: float | None = None

  @property
  def rows_per_device(self) -> float:
    return self.batch / self.target.devices

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq_len

  @property
  def total_tokens(self) -> int:
    return self.tokens_per_step * self.steps

  @property
  def train_flops(self) -> float | None:
    return None if self.flops_per_token is None else self.flops_per_token * self.total_tokens

  @property
  def seconds(self) -> float | None:
    """Estimated wall time at MFU of the chip's peak, or None (unknown chip or FLOPs)."""
    peak = PEAK_BF16_FLOPS.get(self.target.chip)
    if peak is None or self.train_flops is None:
      return None
    return self.train_flops / (self.target.devices * peak * MFU)

  def summary(self) -> str:
    t = self.target
    per_host = f', {self.batch // t.processes} per host' if t.processes > 1 else ''
    accum = (f' ({self.grad_accum} micro-batches of {self.batch // self.grad_accum})'
             if self.grad_accum > 1 else '')
    lines = [
        f'  devices   {t.describe()}',
        f'  mesh      data {self.data} x fsdp {self.fsdp} (rows split over both, parameters '
        f'over fsdp)',
        f'  rows      {self.batch} per step = {self.rows_per_device:g} per device{per_host}'
        f'{accum}',
        f'  tokens    {self.seq_len:,} per row (data.seq_len), {self.tokens_per_step:,} per step',
        f'  steps     {self.steps:,} ({self.steps_from}) -> {self.total_tokens:.4g} tokens',
    ]
    if self.train_flops is None:
      lines.append('  FLOPs     unknown (the family was not built here)')
    else:
      lines.append(f'  FLOPs     {self.flops_per_token:.4g} per token (the family\'s accounting)'
                   f' -> {self.train_flops:.4g} for the run')
    secs = self.seconds
    if secs is not None:
      peak = PEAK_BF16_FLOPS[t.chip]
      assumed = '; assumed: the flags do not name the GPU' if t.chip_assumed else ''
      lines.append(f'  time      ~{_duration(secs)} at {MFU:.0%} MFU ({t.chip}: '
                   f'{peak / 1e12:g} TFLOP/s bf16 peak per chip{assumed})')
    else:
      lines.append(f'  time      no estimate (no peak FLOP/s known for {t.chip or "this device"})')
    return '\n'.join(lines)


def _duration(secs: float) -> str:
  if secs < 120:
    return f'{secs:.0f} s'
  if secs < 2 * 3600:
    return f'{secs / 60:.0f} min'
  if secs < 3 * 86400:
    return f'{secs / 3600:.1f} h'
  return f'{secs / 86400:.1f} days'


def _multiples(n: int, step: int) -> str:
  """'256' or '256 or 512': the multiples of `step` nearest `n`."""
  lo, hi = (n // step) * step, (n // step + 1) * step
  return f'{hi}' if lo == 0 else f'{lo} or {hi}'


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def problems(cfg, target: Target, repo: str = '') -> list[str]:
  """Every reason `cfg` cannot run on `target`, one message each (empty: it can). `repo`: the
  repository the TPU launcher ships to the workers: when given (a launch), the files a pod's
  workers would read are checked against it (on the workers themselves a missing file is
  named when the data is opened)."""
  out = []
  n = target.devices
  try:
    data, fsdp = partitioning.mesh_shape(cfg.mesh, n)
  except ValueError as e:
    out.append(str(e))
    return out
  shards = data * fsdp
  b, accum = int(cfg.train.batch_size), int(cfg.train.grad_accum)
  mesh = f'mesh data {data} x fsdp {fsdp}'
  if b < shards:
    out.append(
        f'train.batch_size={b} over {shards} batch shards ({mesh}): fewer than one '
        f'row per device. The rows of a step are split over data x fsdp, so mesh.fsdp cannot '
        f'help: use --config.train.batch_size={_multiples(b, shards)} (a multiple of {shards}), '
        f'or run on a device count that divides {b}')
  elif b % shards:
    out.append(
        f'train.batch_size={b} over {shards} batch shards ({mesh}): {b} rows do not '
        f'split evenly. The rows of a step are split over data x fsdp, so mesh.fsdp cannot '
        f'help: use --config.train.batch_size={_multiples(b, shards)} (a multiple of {shards})')
  elif accum > 1 and b % accum == 0 and (b // accum) % shards:
    out.append(
        f'train.batch_size={b} / train.grad_accum={accum} = micro-batches of {b // accum} rows '
        f'over {shards} batch shards ({mesh}): each micro-batch is split over every '
        f'device. Use --config.train.grad_accum in {_divisors(b // shards)} (divisors of {b} / {shards}), or '
        f'--config.train.batch_size={_multiples(b, shards * accum)} (a multiple of '
        f'{shards} x {accum})')
  if not out and target.processes > 1 and b % target.processes:
    out.append(f'train.batch_size={b} over {target.processes} hosts: each host reads '
               f'batch_size / hosts rows; use a multiple of {target.processes}')
  if repo and target.platform == 'tpu' and target.processes > 1:  # a launch, not the workers
    out.extend(_pod_data_problems(cfg, target, repo))
  return out


def _pod_data_problems(cfg, target: Target, repo: str) -> list[str]:
  """The local files a pod's workers would have to read: each must be a committed file of
  the repository the launcher ships, named by its path inside it."""
  out = []
  paths = []
  src = str(cfg.data.source)
  if src.startswith('text:'):
    paths += [('data.source', p) for p in src[len('text:'):].split(',') if p]
  enc = str(cfg.data.get('encoder', ''))
  if enc.startswith('tokenizer:'):
    paths.append(('data.encoder', enc[len('tokenizer:'):]))
  tracked = _tracked(repo) if paths and repo else set()
  for key, p in paths:
    rel = os.path.normpath(p)
    if os.path.isabs(p) or rel.startswith('..') or rel not in tracked:
      out.append(
          f'{key} names {p!r}, a file on this machine: the {target.processes} workers of '
          f'{target.name or "the pod"} each read their own shard of the data and have only the '
          f'committed files of the repository the launcher ships. Commit the file into the '
          f'repository and name it by its path inside it ({key}='
          f'{"text:" if key == "data.source" else "tokenizer:"}PATH/IN/REPO), or train on '
          f'data.source=python_docs (built on each host)')
  return out


def _tracked(repo: str) -> set[str]:
  r = subprocess.run(['git', '-C', repo, 'ls-files', '-z'], capture_output=True, text=True)
  return set(x for x in r.stdout.split('\0') if x) if r.returncode == 0 else set()


def plan(cfg, target: Target, flops_per_token: float | None = None, repo: str = '') -> Plan:
  """The resolved job, or a PreflightError listing every problem. `flops_per_token`: the
  family's accounting (`Family.flops_per_token`) for the FLOPs, the step count under
  `train.flops_budget` (as train/trainer.resolve_steps resolves it) and the time."""
  found = problems(cfg, target, repo)
  if found:
    head = f'preflight: this job cannot run on {target.describe()}:'
    raise PreflightError(head + ''.join(f'\n  - {p}' for p in found))
  data, fsdp = partitioning.mesh_shape(cfg.mesh, target.devices)
  b, seq = int(cfg.train.batch_size), int(cfg.data.seq_len)
  budget = float(cfg.train.flops_budget)
  if budget > 0 and flops_per_token:
    steps, how = max(1, int(budget // (flops_per_token * b * seq))), (
        f'train.flops_budget={budget:g}')
  elif budget > 0:
    steps, how = int(cfg.train.steps), 'train.flops_budget: resolved when the family is built'
  else:
    steps, how = int(cfg.train.steps), 'train.steps'
  return Plan(target, data, fsdp, b, int(cfg.train.grad_accum), seq, steps, how,
              flops_per_token)


def check(cfg, target: Target | None = None) -> Plan:
  """`plan` for `target` (default: the devices present): the check at the start of training."""
  return plan(cfg, present() if target is None else target)
