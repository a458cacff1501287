"""Layer library: Dense, Embed, RMSNorm, RoPE, SwiGLU MLP, GQA attention with KV cache, Block.

Conventions shared by every module here:
  * parameters are fp32 `nnx.Param`s annotated with logical axis names (`out_sharding`);
  * computation runs in `dtype` (weights are cast at use); norm statistics, RoPE angles and the
    attention softmax run in fp32;
  * modules hold only `nnx.Param` state, so a model splits cleanly into (graphdef, params);
  * names carry their shapes: B batch, T query length, S key length, D model width, H query
    heads, G key/value heads, K head dim, F MLP width, V vocabulary.

Attention masks are built from static shapes only (no host round-trips), so one code path
runs on CPU, GPU and TPU. Training (no cache) passes `is_causal=True` and the sliding window as
`local_window_size` to `jax.nn.dot_product_attention`, so a fused backend (cuDNN) can skip
masked blocks; the segment mask is the only dense mask and is omitted when no segment ids are
given. Decoding with a cache builds one [B, 1, T, S] boolean mask from slot indices.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Axes = tuple[str | None, ...]
Cache = dict[str, Array]


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> Array:
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Dense(nnx.Module):
  """y = x @ W (+ b). W is [in, out] with logical axes `axes`; no bias by default.

  `init_std=None` uses 1/sqrt(in_features).
  """

  def __init__(self, in_features: int, out_features: int, *, axes: Axes = (None, None),
               use_bias: bool = False, dtype: Any = jnp.float32,
               init_std: float | None = None, rngs: nnx.Rngs):
    std = in_features ** -0.5 if init_std is None else init_std
    self.dtype = dtype
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), std),
                            out_sharding=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), out_sharding=(axes[1],))
                 if use_bias else None)

  def __call__(self, x_BxTxD: Array, *, out_dtype: Any = None) -> Array:
    """`out_dtype=jnp.float32` gives fp32 accumulation/output for low-precision compute."""
    out_dtype = self.dtype if out_dtype is None else out_dtype
    y_BxTxF = jnp.einsum('...d,df->...f', x_BxTxD.astype(self.dtype),
                         self.kernel[...].astype(self.dtype), preferred_element_type=out_dtype)
    if self.bias is not None:
      y_BxTxF = y_BxTxF + self.bias[...].astype(out_dtype)
    return y_BxTxF


class Embed(nnx.Module):
  """Token embedding table [V, D] ('vocab', 'embed'); `attend` is the tied readout."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), init_std),
                               out_sharding=('vocab', 'embed'))

  def __call__(self, ids_BxT: Array) -> Array:
    return jnp.take(self.embedding[...], ids_BxT, axis=0).astype(self.dtype)

  def attend(self, x_BxTxD: Array) -> Array:
    """Logits x @ E^T in fp32 (matmul in `dtype`, fp32 accumulation)."""
    return jnp.einsum('...d,vd->...v', x_BxTxD.astype(self.dtype),
                      self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """RMS normalisation with a learned scale ('norm'); statistics in fp32."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=('norm',))

  def __call__(self, x_BxTxD: Array) -> Array:
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    ms_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
    y_BxTxD = x32_BxTxD * jax.lax.rsqrt(ms_BxTx1 + self.eps) * self.scale[...]
    return y_BxTxD.astype(self.dtype)


class LayerNorm(nnx.Module):
  """Layer normalisation with scale and bias (BERT-style encoders); statistics in fp32."""

  def __init__(self, features: int, *, eps: float = 1e-12, dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), out_sharding=('norm',))

  def __call__(self, x_BxTxD: Array) -> Array:
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    mean_BxTx1 = jnp.mean(x32_BxTxD, axis=-1, keepdims=True)
    var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD - mean_BxTx1), axis=-1, keepdims=True)
    y_BxTxD = (x32_BxTxD - mean_BxTx1) * jax.lax.rsqrt(var_BxTx1 + self.eps)
    return (y_BxTxD * self.scale[...] + self.bias[...]).astype(self.dtype)


def rope(x_BxTxHxK: Array, positions_BxT: Array, base: float = 1e4) -> Array:
  """Rotary position embedding, rotate-half convention, angles and rotation in fp32.

  Channel i < K/2 is paired with channel i + K/2 and rotated by position * base^(-2i/K).
  """
  k = x_BxTxHxK.shape[-1]
  half = k // 2
  inv_freq_Kh = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / k)
  angle_BxTxKh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Kh
  sin_BxTx1xKh = jnp.sin(angle_BxTxKh)[:, :, None, :]
  cos_BxTx1xKh = jnp.cos(angle_BxTxKh)[:, :, None, :]
  x32 = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos_BxTx1xKh - x2 * sin_BxTx1xKh,
                         x2 * cos_BxTx1xKh + x1 * sin_BxTx1xKh], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype: Any = jnp.float32,
               init_std: float = 0.02, out_init_std: float | None = None, rngs: nnx.Rngs):
    out_init_std = init_std if out_init_std is None else out_init_std
    self.gate = Dense(d_model, mlp_dim, axes=('embed', 'mlp'), dtype=dtype, init_std=init_std,
                      rngs=rngs)
    self.up = Dense(d_model, mlp_dim, axes=('embed', 'mlp'), dtype=dtype, init_std=init_std,
                    rngs=rngs)
    self.down = Dense(mlp_dim, d_model, axes=('mlp', 'embed'), dtype=dtype,
                      init_std=out_init_std, rngs=rngs)

  def __call__(self, x_BxTxD: Array) -> Array:
    h_BxTxF = jax.nn.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD)
    return self.down(h_BxTxF)


class Attention(nnx.Module):
  """Causal multi-head attention with GQA, RoPE, segment masks, sliding window and KV cache.

  Parameters: q [D, H, K] ('embed', 'heads', 'head_dim'), k and v [D, G, K]
  ('embed', 'kv_heads', 'head_dim'), o [H, K, D] ('heads', 'head_dim', 'embed').

  Masking: query i attends to key j iff j <= i, segment_ids[i] == segment_ids[j] (when
  segment ids are given; padding is segment 0 and only sees padding, so no row is empty), and,
  with `window > 0`, i - j < window. Indices are positions in the row (cache slots when
  decoding); the `positions` input only feeds RoPE.

  `causal=False` (a bidirectional encoder, e.g. HAT's intra-word encoder, whose segment ids are
  word ids): query i attends to every key j of its segment with |i - j| < window (window > 0),
  earlier and later alike. Uncached calls only (`bidirectional_attention`).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_base: float = 1e4, window: int = 0, dtype: Any = jnp.float32,
               attention_impl: str | None = None, init_std: float = 0.02,
               out_init_std: float | None = None, causal: bool = True, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}')
    if head_dim % 2:
      raise ValueError(f'head_dim={head_dim} must be even for RoPE')
    out_init_std = init_std if out_init_std is None else out_init_std
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_base = float(rope_base)
    self.window = int(window)
    self.dtype = dtype
    self.attention_impl = attention_impl or None
    self.causal = bool(causal)
    self.q = nnx.Param(_normal(rngs, (d_model, num_heads, head_dim), init_std),
                       out_sharding=('embed', 'heads', 'head_dim'))
    self.k = nnx.Param(_normal(rngs, (d_model, num_kv_heads, head_dim), init_std),
                       out_sharding=('embed', 'kv_heads', 'head_dim'))
    self.v = nnx.Param(_normal(rngs, (d_model, num_kv_heads, head_dim), init_std),
                       out_sharding=('embed', 'kv_heads', 'head_dim'))
    self.o = nnx.Param(_normal(rngs, (num_heads, head_dim, d_model), out_init_std),
                       out_sharding=('heads', 'head_dim', 'embed'))

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """Empty cache: k, v [B, S, G, K] in `dtype` (default: compute dtype), segment_ids [B, S]."""
    dtype = self.dtype if dtype is None else dtype
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                segment_ids=jnp.zeros((batch, max_len), jnp.int32))

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None = None,
               cache: Cache | None = None, cache_index: Array | int | None = None
               ) -> tuple[Array, Cache | None]:
    """Returns (y_BxTxD, new_cache). With `cache`, the T new keys/values are written at slots
    [cache_index, cache_index + T) (the caller keeps cache_index + T <= S) and queries attend
    to every cached slot <= their own (and within the window)."""
    dt = self.dtype
    x_BxTxD = x_BxTxD.astype(dt)
    q_BxTxHxK, k_BxTxGxK = self._qk(x_BxTxD, positions_BxT)
    v_BxTxGxK = jnp.einsum('btd,dgk->btgk', x_BxTxD, self.v[...].astype(dt))

    if cache is None and not self.causal:
      out_BxTxHxK = bidirectional_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT,
                                            self.window)
      new_cache = None
    elif cache is None:
      mask_Bx1xTxT = None
      if segment_ids_BxT is not None:
        mask_Bx1xTxT = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
      local = (self.window - 1, 0) if self.window > 0 else None
      out_BxTxHxK = jax.nn.dot_product_attention(
          q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask_Bx1xTxT, is_causal=True,
          local_window_size=local, implementation=self.attention_impl)
      new_cache = None
    else:
      if not self.causal:
        raise ValueError('a bidirectional attention layer has no KV cache (decode whole blocks)')
      b, t = x_BxTxD.shape[:2]
      s = cache['k'].shape[1]
      idx = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
      if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((b, t), jnp.int32)
      k_BxSxGxK = jax.lax.dynamic_update_slice(
          cache['k'], k_BxTxGxK.astype(cache['k'].dtype), (0, idx, 0, 0))
      v_BxSxGxK = jax.lax.dynamic_update_slice(
          cache['v'], v_BxTxGxK.astype(cache['v'].dtype), (0, idx, 0, 0))
      seg_BxS = jax.lax.dynamic_update_slice(
          cache['segment_ids'], segment_ids_BxT.astype(jnp.int32), (0, idx))
      q_slot_T = idx + jnp.arange(t, dtype=jnp.int32)
      k_slot_S = jnp.arange(s, dtype=jnp.int32)
      diff_TxS = q_slot_T[:, None] - k_slot_S[None, :]
      allowed_TxS = diff_TxS >= 0
      if self.window > 0:
        allowed_TxS &= diff_TxS < self.window
      mask_Bx1xTxS = allowed_TxS[None, None] & (
          segment_ids_BxT[:, None, :, None] == seg_BxS[:, None, None, :])
      # Decoding masks are arbitrary (offset queries), so leave the backend choice to JAX.
      out_BxTxHxK = jax.nn.dot_product_attention(
          q_BxTxHxK, k_BxSxGxK.astype(dt), v_BxSxGxK.astype(dt), mask=mask_Bx1xTxS)
      new_cache = dict(k=k_BxSxGxK, v=v_BxSxGxK, segment_ids=seg_BxS)

    y_BxTxD = jnp.einsum('bthk,hkd->btd', out_BxTxHxK.astype(dt), self.o[...].astype(dt))
    return y_BxTxD, new_cache

  def _qk(self, x_BxTxD: Array, positions_BxT: Array) -> tuple[Array, Array]:
    dt = self.dtype
    q_BxTxHxK = jnp.einsum('btd,dhk->bthk', x_BxTxD, self.q[...].astype(dt))
    k_BxTxGxK = jnp.einsum('btd,dgk->btgk', x_BxTxD, self.k[...].astype(dt))
    return (rope(q_BxTxHxK, positions_BxT, self.rope_base),
            rope(k_BxTxGxK, positions_BxT, self.rope_base))

  def weights(self, x_BxTxD: Array, positions_BxT: Array,
              segment_ids_BxT: Array | None = None) -> Array:
    """The attention distribution of the uncached call (fp32 [B, H, T, T], rows sum to 1):
    the same projections, causal / segment / window masks and 1/sqrt(head_dim) scaling, for
    diagnostics (which heads attend by position)."""
    q_BxTxHxK, k_BxTxGxK = self._qk(x_BxTxD.astype(self.dtype), positions_BxT)
    k_BxTxHxK = jnp.repeat(k_BxTxGxK, self.num_heads // self.num_kv_heads, axis=2)
    s_BxHxTxT = jnp.einsum('bthk,bshk->bhts', q_BxTxHxK, k_BxTxHxK,
                           preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    t = x_BxTxD.shape[1]
    diff_TxT = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    if not self.causal:
      diff_TxT = jnp.abs(diff_TxT)
    allowed = (diff_TxT >= 0) & ((diff_TxT < self.window) if self.window > 0 else True)
    allowed_Bx1xTxT = jnp.broadcast_to(allowed, (x_BxTxD.shape[0], 1, t, t))
    if segment_ids_BxT is not None:
      allowed_Bx1xTxT &= segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
    return jax.nn.softmax(jnp.where(allowed_Bx1xTxT, s_BxHxTxT, -jnp.inf), axis=-1)


def bidirectional_attention(q_BxTxHxK: Array, k_BxTxGxK: Array, v_BxTxGxK: Array,
                            segment_ids_BxT: Array | None, window: int = 0) -> Array:
  """Non-causal attention: every query sees the keys of its segment (all keys without segment
  ids) within `window` positions either side (0: no window). Portable XLA path with a dense
  [B, 1, T, T] mask (the segment-mask cost of the causal layers)."""
  t = q_BxTxHxK.shape[1]
  mask = None
  if segment_ids_BxT is not None:
    mask = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
  if window > 0:
    near_TxT = jnp.abs(jnp.arange(t)[:, None] - jnp.arange(t)[None, :]) < window
    mask = near_TxT[None, None] if mask is None else mask & near_TxT[None, None]
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask,
                                      is_causal=False)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)); [x + cross(c)]; x + mlp(norm(x)).

  With `context_dim > 0` the block also attends to ONE context vector per position (HAT's byte
  decoder reading the previous word's backbone output). A softmax over a single key is 1, so
  that cross-attention is exactly `o(v(c))`: no scores are formed. The vectors live at a coarser
  level ([B, W, C]) and are projected there, then gathered per position by an index [B, T].
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               mlp_dim: int, *, rope_base: float = 1e4, window: int = 0,
               dtype: Any = jnp.float32, attention_impl: str | None = None,
               init_std: float = 0.02, out_init_std: float | None = None,
               context_dim: int = 0, norm_eps: float = 1e-6, causal: bool = True,
               rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype)
    self.attn = Attention(d_model, num_heads, num_kv_heads, head_dim, rope_base=rope_base,
                          window=window, dtype=dtype, attention_impl=attention_impl,
                          init_std=init_std, out_init_std=out_init_std, causal=causal,
                          rngs=rngs)
    if context_dim:
      self.cross_v = Dense(context_dim, num_heads * head_dim, axes=('embed', 'heads'),
                           dtype=dtype, init_std=init_std, rngs=rngs)
      self.cross_o = Dense(num_heads * head_dim, d_model, axes=('heads', 'embed'), dtype=dtype,
                           init_std=out_init_std, rngs=rngs)
    else:
      self.cross_v = self.cross_o = None
    self.mlp_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype)
    self.mlp = MLP(d_model, mlp_dim, dtype=dtype, init_std=init_std, out_init_std=out_init_std,
                   rngs=rngs)

  def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None = None,
               cache: Cache | None = None, cache_index: Array | int | None = None,
               context: tuple[Array, Array] | None = None) -> tuple[Array, Cache | None]:
    """`context = (c_BxWxC, index_BxT)`: position t reads c[index[t]] (index clipped to W)."""
    a_BxTxD, new_cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT,
                                   cache, cache_index)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.cross_v is not None:
      if context is None:
        raise ValueError('this block was built with context_dim > 0 and needs `context`')
      c_BxWxC, index_BxT = context
      add_BxWxD = self.cross_o(self.cross_v(c_BxWxC))
      index_BxT = jnp.clip(index_BxT, 0, add_BxWxD.shape[1] - 1)
      x_BxTxD = x_BxTxD + jnp.take_along_axis(add_BxWxD, index_BxT[..., None], axis=1)
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD, new_cache
