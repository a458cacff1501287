"""The one transformer stack: `num_layers` pre-norm Blocks and a final RMSNorm.

Families build on it (token LM, HAT encoder/backbone/decoder, ...). Training calls it without
a cache; decoding threads a per-layer KV cache through `cache`/`cache_index`.
`remat` rematerialises each block in the backward pass ('full' keeps only block inputs,
'dots' also keeps the weight matmul outputs).

Two parameter layouts, one model (`scan_layers`):
  * unrolled (default): `layers` is a list of Blocks, the forward a Python loop (one copy of
    the block per layer in the compiled program); the KV cache is a list of per-layer dicts;
  * scanned (`scan_layers=True`): `layers` is ONE `StackedBlock` whose parameters carry a
    leading [num_layers] axis (logical axis 'layers'), the forward a `lax.scan` over it (one
    copy of the block in the program: compile time independent of depth); remat applies per
    layer inside the scan; the KV cache is one dict of [num_layers, ...] arrays, scanned with
    the layers. Iterating `layers` yields per-layer Blocks (read-only copies) in both layouts.
Both are built from the same per-layer initialisation, so a seed gives the same numbers in
either layout, and `convert_layer_layout` maps a parameter tree (checkpoint) of one layout to
the other (stacking / unstacking the per-layer leaves).
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
  raise ValueError(f'model.remat must be a bool or one of none/full/dots, got {remat!r}')


def _block_forward(block: Block, x_BxTxD: Array, positions_BxT: Array,
                   segment_ids_BxT: Array | None, context) -> Array:
  return block(x_BxTxD, positions_BxT, segment_ids_BxT, context=context)[0]


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


class StackedBlock(Block):
  """A Block whose variables carry a leading [num_layers] axis (the scanned layout, built by
  `stack_blocks`). Iterating it yields each layer as a Block of its own (copies of the slices:
  for reading, e.g. per-layer diagnostics or weight export; writes do not reach the stack)."""

  def __len__(self) -> int:
    return int(jax.tree.leaves(nnx.state(self))[0].shape[0])

  def __iter__(self):
    graphdef, state = nnx.split(self)
    for i in range(len(self)):
      yield nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose every variable is the stack of the blocks' variables along a new leading
  axis, with 'layers' prepended to its logical axes (the blocks' class is kept: StackedBlocks
  give an iterable stack)."""
  graphdef, _ = nnx.split(blocks[0])
  states = [nnx.split(b)[1] for b in blocks]

  def stack(*vs):
    out = vs[0].replace(jnp.stack([v.get_value() for v in vs]))
    names = vs[0].get_metadata().get('out_sharding')
    if names is not None:
      out.set_metadata('out_sharding', ('layers',) + tuple(names))
    return out

  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_var))


class Transformer(nnx.Module):
  """Stack of Blocks + final norm.

  Output projections (attention o, MLP down) are initialised with
  init_std / sqrt(2 * num_layers) (GPT-2 style); everything else with init_std.
  `causal=False`: bidirectional self-attention within segments (see `Attention`).
  """

  def __init__(self, num_layers: int, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, mlp_dim: int, *, rope_base: float = 1e4, window: int = 0,
               dtype: Any = jnp.float32, remat: bool | str | None = False,
               attention_impl: Any = None, init_std: float = 0.02,
               context_dim: int = 0, norm_eps: float = 1e-6, scan_layers: bool = False,
               causal: bool = True,
               rngs: nnx.Rngs):
    if num_layers < 1:
      raise ValueError(f'num_layers={num_layers}: a stack needs at least one layer')
    if not isinstance(scan_layers, (bool, int)):
      raise ValueError(f'model.scan_layers={scan_layers!r}: expected a bool')
    self.num_layers = num_layers
    self.dtype = dtype
    self.remat = _remat_mode(remat)
    self.scan_layers = bool(scan_layers)
    out_init_std = init_std / (2 * num_layers) ** 0.5
    block = StackedBlock if self.scan_layers else Block
    blocks = [
        block(d_model, num_heads, num_kv_heads, head_dim, mlp_dim, rope_base=rope_base,
              window=window, dtype=dtype, attention_impl=attention_impl, init_std=init_std,
              out_init_std=out_init_std, context_dim=context_dim, norm_eps=norm_eps,
              causal=causal, rngs=rngs)
        for _ in range(num_layers)]
    self.layers = stack_blocks(blocks) if self.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[Cache] | Cache:
    """Empty KV caches (see `Attention.init_cache`): a list with one per layer, or (scanned)
    one dict of [num_layers, ...] arrays."""
    if not self.scan_layers:
      return [layer.attn.init_cache(batch, max_len, dtype) for layer in self.layers]
    one = self.layers.attn.init_cache(batch, max_len, dtype)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_layers, *x.shape)), one)

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None = None,
               cache: list[Cache] | Cache | None = None, cache_index: Array | int | None = None,
               context: tuple[Array, Array] | None = None
               ) -> tuple[Array, list[Cache] | Cache | None]:
    """Returns (y_BxTxD after the final norm, new_cache or None).

    `context = (c_BxWxC, index_BxT)` feeds every block's one-key cross-attention (only for
    stacks built with `context_dim > 0`, see `Block`)."""
    x_BxTxD = x_BxTxD.astype(self.dtype)
    if self.scan_layers:
      x_BxTxD, new_cache = self._scan(x_BxTxD, positions_BxT, segment_ids_BxT, cache,
                                      cache_index, context)
      return self.final_norm(x_BxTxD), new_cache
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

  def _scan(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_index, context):
    """`lax.scan` over the stacked block: carry x, per-layer parameters (and cache) as xs."""
    graphdef, params = nnx.split(self.layers)

    if cache is None:
      def body(x, layer_params):
        return _block_forward(nnx.merge(graphdef, layer_params), x, positions_BxT,
                              segment_ids_BxT, context), None
      if self.remat is not None:
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
      x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, params)
      return x_BxTxD, None

    def cached_body(x, xs):
      layer_params, layer_cache = xs
      return nnx.merge(graphdef, layer_params)(x, positions_BxT, segment_ids_BxT, layer_cache,
                                               cache_index, context)

    return jax.lax.scan(cached_body, x_BxTxD, (params, cache))


def convert_layer_layout(tree, scanned: bool):
  """Maps a tree holding parameters (a checkpoint's `state['params']` pure dict, or its
  `opt_state`, whose Adam moments nest the same way inside tuples) between the two layouts of
  every Transformer in it: `scanned=True` stacks `layers: {0: {...}, 1: {...}, ...}` into `layers: {...}` with a
  leading [num_layers] axis; `scanned=False` splits it back. Other entries are returned as they
  are. Round trip: convert_layer_layout(convert_layer_layout(t, True), False) == t."""

  def per_layer(d):
    return isinstance(d, dict) and d and all(isinstance(k, int) for k in d)

  def walk(node):
    if isinstance(node, tuple) and hasattr(node, '_fields'):   # e.g. optax's ScaleByAdamState
      return type(node)(*(walk(x) for x in node))
    if isinstance(node, (tuple, list)):
      return type(node)(walk(x) for x in node)
    if not isinstance(node, dict):
      return node
    out = {}
    for key, sub in node.items():
      if key == 'layers' and isinstance(sub, dict):
        if scanned and per_layer(sub):
          layers = [walk(sub[i]) for i in range(len(sub))]
          out[key] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
          continue
        if not scanned and not per_layer(sub) and _looks_stacked(sub):
          n = jax.tree.leaves(sub)[0].shape[0]
          out[key] = {i: jax.tree.map(lambda x, i=i: x[i], sub) for i in range(n)}
          continue
      out[key] = walk(sub)
    return out

  return walk(tree)


def _looks_stacked(d) -> bool:
  """A Block's parameters stacked on a leading axis: a dict holding an 'attn' entry."""
  return isinstance(d, dict) and 'attn' in d and 'mlp' in d
