"""The optimizer every family trains with: AdamW (decoupled weight decay on matrices only)
after global-norm clipping, on a learning-rate schedule (`config.optim.schedule`):

* 'cosine' (default): linear warmup, then cosine decay to `lr * min_lr_ratio` at `train.steps`.
  Its shape depends on `train.steps` everywhere: extending a run (a larger `train.steps`)
  re-stretches the decay, so the learning rate at the resumed step jumps (up).
* 'wsd' (warmup-stable-decay, for runs meant to be extended): linear warmup, the peak `lr`
  held, then a linear decay to `lr * min_lr_ratio` over the last `optim.decay_frac` of
  `train.steps`. Before the decay the rate does not depend on `train.steps`: a run extended
  from a checkpoint of its stable phase goes on as if it had been started with the longer
  schedule.

`extension_note` says what a resume with another schedule does to the rate (the trainer logs
it and writes it into the run's config history).

Staged training (`config.optim.stages`, a sub-config only some presets have, e.g. a HAT built on
a pretrained LM, configs/hat.py:from_smollm2): one part of the parameters (`part`: the name of
a top-level parameter subtree, e.g. 'backbone') is frozen for the first `freeze_steps` steps --
its gradients are zeroed before the global-norm clip, so the clip sees only what trains, and
its updates are exactly -0.0, so every frozen parameter stays bitwise unchanged (p + -0.0 == p
for every float p) -- then trains at `lr_ratio` times the schedule's rate, ramped from 0 over
`warmup_steps` steps. Without `stages` (or with an empty `part`) nothing changes."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'wsd')


def make_schedule(cfg_optim, total_steps: int):
  """The learning rate as a function of the step (`optax` schedule)."""
  warmup = min(cfg_optim.warmup_steps, max(total_steps - 1, 0))
  kind = cfg_optim.get('schedule', 'cosine')
  end = cfg_optim.lr * cfg_optim.min_lr_ratio
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg_optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  if kind != 'wsd':
    raise ValueError(f'optim.schedule={kind!r}: one of {SCHEDULES}')
  decay = wsd_decay_steps(cfg_optim, total_steps)
  decay_start = max(total_steps - decay, warmup)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    up = cfg_optim.lr * step / max(warmup, 1)
    frac = jnp.clip((step - decay_start) / max(decay, 1), 0.0, 1.0)
    down = cfg_optim.lr + (end - cfg_optim.lr) * frac
    return jnp.where(step < warmup, up, down)

  return schedule


def wsd_decay_steps(cfg_optim, total_steps: int) -> int:
  """The steps of a WSD schedule's final decay: `decay_frac` of `total_steps` (at least 1)."""
  return max(1, int(round(cfg_optim.get('decay_frac', 0.2) * total_steps)))


def make_optimizer(cfg_optim, total_steps: int):
  schedule = make_schedule(cfg_optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=cfg_optim.b1, b2=cfg_optim.b2, eps=cfg_optim.eps,
                      weight_decay=cfg_optim.weight_decay, mask=decay_mask)
  stages = cfg_optim.get('stages')
  if stages is None or not stages.get('part', ''):
    return optax.chain(optax.clip_by_global_norm(cfg_optim.clip_norm), adamw), schedule
  check_stages(stages)
  in_part = _part_test(str(stages.part))
  freeze = int(stages.freeze_steps)
  tx = optax.chain(
      _staged_part(in_part, lambda step: jnp.where(step < freeze, 0.0, 1.0), zero_sign=False),
      optax.clip_by_global_norm(cfg_optim.clip_norm), adamw,
      _staged_part(in_part, functools.partial(stage_factor, stages), zero_sign=True))
  return tx, schedule


def check_stages(stages) -> None:
  """A ValueError naming the `optim.stages` key that is out of range."""
  for key in ('freeze_steps', 'lr_ratio', 'warmup_steps'):
    if not stages[key] >= 0:
      raise ValueError(f'optim.stages.{key}={stages[key]!r}: must be >= 0')


def stage_factor(stages, step):
  """The staged part's learning rate relative to the schedule's at `step`: 0 in stage 1
  (step < freeze_steps), then `lr_ratio`, ramped linearly over `warmup_steps` steps."""
  step = jnp.asarray(step, jnp.float32)
  start = float(stages.freeze_steps)
  ramp = jnp.clip((step - start + 1.0) / max(float(stages.warmup_steps), 1.0), 0.0, 1.0)
  return jnp.where(step < start, 0.0, float(stages.lr_ratio) * ramp)


def _key_name(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


def _part_test(part: str):
  """path -> whether a parameter belongs to the top-level subtree `part`."""
  return lambda path: bool(path) and _key_name(path[0]) == part


class StageState(NamedTuple):
  count: jax.Array


def _staged_part(in_part, factor, zero_sign: bool) -> optax.GradientTransformation:
  """Multiplies the leaves of the staged part by `factor(step)` (the step counted here). With
  `zero_sign` a zero factor gives -0.0 (an update that leaves every parameter bitwise as it
  is, -0.0 included)."""

  def init(params):
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not any(in_part(p) for p in paths):
      names = sorted({_key_name(p[0]) for p in paths if p})
      raise ValueError(f'optim.stages.part names no parameter subtree; the top-level ones are '
                       f'{names}')
    return StageState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    f = factor(state.count)

    def scale(path, u):
      if not in_part(path):
        return u
      zero = jnp.asarray(-0.0 if zero_sign else 0.0, u.dtype)  # where: a frozen NaN stays out
      return jnp.where(f == 0, zero, u * f.astype(u.dtype))

    return (jax.tree_util.tree_map_with_path(scale, updates),
            StageState(jnp.minimum(state.count, jnp.iinfo(jnp.int32).max - 1) + 1))

  return optax.GradientTransformation(init, update)


def extension_note(old_cfg, new_cfg, step: int) -> dict | None:
  """What a resume at `step` with `new_cfg` (another `train.steps` or `optim.*`) does to the
  learning-rate schedule of `old_cfg`: None when nothing changes; a note when the rate at
  `step` is unchanged but the schedule goes on differently (a WSD run's longer stable phase);
  else a row for the run's config history ({'key': 'optim.schedule@step', 'old',
  'new': the rates at `step`, 'note': a sentence})."""
  old_steps, new_steps = int(old_cfg.train.steps), int(new_cfg.train.steps)
  old_s = make_schedule(old_cfg.optim, old_steps)
  new_s = make_schedule(new_cfg.optim, new_steps)
  if abs(float(old_s(step)) - float(new_s(step))) <= 1e-6 * max(float(old_s(step)), 1e-12):
    if new_cfg.optim.get('schedule', 'cosine') == 'wsd' and new_steps != old_steps:
      start = new_steps - wsd_decay_steps(new_cfg.optim, new_steps)
      return {'key': 'optim.schedule@step', 'old': _lr(old_s, step), 'new': _lr(new_s, step),
              'explicit': False,
              'note': f'wsd: the stable phase goes on at lr {float(new_s(step)):.3g} to step '
                      f'{start}, then decays to step {new_steps}'}
    return None
  lr_old, lr_new = _lr(old_s, step), _lr(new_s, step)
  kind = old_cfg.optim.get('schedule', 'cosine')
  if kind == 'cosine' and new_steps != old_steps:
    why = (f'the cosine decay is re-stretched from {old_steps} to {new_steps} steps')
  elif kind == 'wsd' and step > old_steps - wsd_decay_steps(old_cfg.optim, old_steps):
    why = (f'step {step} was in the WSD decay of {old_steps} steps; the new schedule puts it '
           f'{"in the stable phase" if lr_new >= new_cfg.optim.lr else "earlier in its decay"}'
           ' (a WSD run extends without a jump while it is still in its stable phase)')
  else:
    why = 'the schedule\'s settings changed'
  return {'key': 'optim.schedule@step', 'old': lr_old, 'new': lr_new, 'explicit': False,
          'note': f'{why}: the learning rate at step {step} goes from {lr_old:.3g} to '
                  f'{lr_new:.3g}' + (' (optim.schedule=\'wsd\' keeps a run extendable)'
                                     if kind == 'cosine' else '')}


def _lr(schedule, step: int) -> float:
  return float(f'{float(schedule(step)):.6g}')
