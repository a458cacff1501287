"""The optimizer every family trains with: AdamW (decoupled weight decay on matrices only)
after global-norm clipping, on a linear-warmup + cosine-decay learning-rate schedule
(`config.optim`)."""
from __future__ import annotations

import jax
import optax


def make_optimizer(cfg_optim, total_steps: int):
  warmup = min(cfg_optim.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg_optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg_optim.lr * cfg_optim.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg_optim.clip_norm),
      optax.adamw(schedule, b1=cfg_optim.b1, b2=cfg_optim.b2, eps=cfg_optim.eps,
                  weight_decay=cfg_optim.weight_decay, mask=decay_mask))
  return tx, schedule
