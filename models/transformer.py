"""The one transformer stack: `num_layers` pre-norm Blocks and a final RMSNorm.

Families build on it (token LM, HAT encoder/backbone/decoder, ...). Training calls it without
a cache; decoding threads a per-layer KV cache (a list of dicts) through `cache`/`cache_index`.
`remat` rematerialises each block in the backward pass ('full' keeps only block inputs,
'dots' also keeps the weight matmul outputs).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Block, Cache, RMSNorm

Array = jax.Array

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_mode(remat: bool | str | None) -> str | None:
  if remat is None or remat is False or remat in ('', 'none'):
    return None
  if remat is True:
    return 'full'
  if remat in _REMAT_POLICIES:
    return remat
  raise ValueError(f'remat must be a bool or one of none/full/dots, got {remat!r}')


def _block_forward(block: Block, x_BxTxD: Array, positions_BxT: Array,
                   segment_ids_BxT: Array | None, context) -> Array:
  return block(x_BxTxD, positions_BxT, segment_ids_BxT, context=context)[0]


class Transformer(nnx.Module):
  """Stack of Blocks + final norm.

  Output projections (attention o, MLP down) are initialised with
  init_std / sqrt(2 * num_layers) (GPT-2 style); everything else with init_std.
  `causal=False`: bidirectional self-attention within segments (see `Attention`).
  """

  def __init__(self, num_layers: int, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, mlp_dim: int, *, rope_base: float = 1e4, window: int = 0,
               dtype: Any = jnp.float32, remat: bool | str | None = False,
               attention_impl: str | None = None, init_std: float = 0.02,
               context_dim: int = 0, norm_eps: float = 1e-6, causal: bool = True,
               rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.dtype = dtype
    self.remat = _remat_mode(remat)
    out_init_std = init_std / (2 * num_layers) ** 0.5
    self.layers = nnx.List([
        Block(d_model, num_heads, num_kv_heads, head_dim, mlp_dim, rope_base=rope_base,
              window=window, dtype=dtype, attention_impl=attention_impl, init_std=init_std,
              out_init_std=out_init_std, context_dim=context_dim, norm_eps=norm_eps,
              causal=causal, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[Cache]:
    """One empty KV cache per layer (see `Attention.init_cache`)."""
    return [layer.attn.init_cache(batch, max_len, dtype) for layer in self.layers]

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None = None,
               cache: list[Cache] | None = None, cache_index: Array | int | None = None,
               context: tuple[Array, Array] | None = None
               ) -> tuple[Array, list[Cache] | None]:
    """Returns (y_BxTxD after the final norm, new_cache or None).

    `context = (c_BxWxC, index_BxT)` feeds every block's one-key cross-attention (only for
    stacks built with `context_dim > 0`, see `Block`)."""
    x_BxTxD = x_BxTxD.astype(self.dtype)
    if cache is None:
      if self.remat is None:
        fwd = _block_forward
      else:
        fwd = nnx.remat(_block_forward, policy=_REMAT_POLICIES[self.remat])
      for layer in self.layers:
        x_BxTxD = fwd(layer, x_BxTxD, positions_BxT, segment_ids_BxT, context)
      return self.final_norm(x_BxTxD), None
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache, strict=True):
      x_BxTxD, c = layer(x_BxTxD, positions_BxT, segment_ids_BxT, layer_cache, cache_index,
                         context)
      new_cache.append(c)
    return self.final_norm(x_BxTxD), new_cache
