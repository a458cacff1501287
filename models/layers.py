"""Layer library: Dense, Embed, RMSNorm, RoPE, SwiGLU MLP, GQA attention with KV cache, Block.

Conventions shared by every module here:
  * parameters are fp32 `nnx.Param`s annotated with logical axis names (`out_sharding`);
  * computation runs in `dtype` (weights are cast at use); norm statistics, RoPE angles and the
    attention softmax run in fp32;
  * modules hold only `nnx.Param` state, so a model splits cleanly into (graphdef, params);
  * names carry their shapes: B batch, T query length, S key length, D model width, H query
    heads, G key/value heads, K head dim, F MLP width, V vocabulary.

Attention masks are built from static shapes only (no host round-trips), so one code path
runs on CPU, GPU and TPU. The uncached (training) attention runs through `attend`, which picks
its kernel per platform in ONE place, `resolve_attention_impl` (config key
`model.attention_impl`, default 'auto'):

  TPU  'splash'   the Pallas splash-attention kernel: causal or causal + sliding-window block
                  masks (fully masked tiles are skipped), packed-document segment ids, GQA;
                  T padded to the tile sizes (`model.attention_block_q/_kv`); wrapped in
                  `shard_map` over the mesh axes that split the batch (XLA cannot partition a
                  Mosaic kernel by itself).
  GPU  'cudnn'    cuDNN fused attention. Packed documents use cuDNN's packed (ragged) layout:
                  per row, the lengths and start offsets of its runs of equal segment ids
                  (`segment_runs`), with the causal (+ window) mask applied inside each run, so
                  no [B, 1, T, T] mask is formed and tiles across documents are never
                  computed. It is exact: a `lax.cond` falls back to cuDNN with the dense
                  segment mask when a row has more than `model.attention_max_segments` runs or
                  an id occurs in two runs (and is the only branch before Hopper, whose cuDNN
                  has no packed layout). Needs bf16/fp16 compute and head_dim % 8 == 0
                  (otherwise as on CPU). Chosen over `jax.nn.dot_product_attention`'s
                  `query_seq_lengths` (one padded sequence per row: cannot separate packed
                  documents) and over the Pallas GPU kernel (segment ids but no sliding window
                  and no GQA). Not run here (no GPU): the arguments are tested by rebuilding the
                  mask they describe (`runs_mask`) and comparing XLA attention with it to the
                  reference; benchmarks/device_suite.py checks the kernel on a GPU.
  CPU  'blocked'  plain XLA ops over query blocks: for sliding-window layers (window < T) each
                  query block attends to its own and the previous key block(s), O(T * W)
                  scores instead of O(T^2); for full causal layers block n attends to keys
                  [0, (n+1) C), skipping the tiles above the diagonal. Sequences of one block
                  use 'xla' (`jax.nn.dot_product_attention`, dense masked scores).

Decoding with a cache builds one [B, 1, T, S] boolean mask from slot indices (XLA; one query
per step).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


# -- attention kernels by platform ---------------------------------------------------------------
ATTENTION_IMPLS = ('auto', 'xla', 'blocked', 'cudnn', 'splash')
_LANES = 128  # splash blocks are multiples of the TPU lane width
_BLOCK = 128  # default query block of the 'blocked' kernel (measured: benchmarks/attention.py)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How the uncached attention runs (config keys `model.attention_*`).

  impl: 'auto' (default; resolved per platform by `resolve_attention_impl`), 'xla', 'blocked',
    'cudnn' or 'splash'. '' and None mean 'auto'.
  block_q, block_kv: splash query / key tile lengths (multiples of 128; shrunk to the padded
    sequence when it is shorter). T is padded up to a multiple of both.
  window_block: query block of the 'blocked' kernel (a multiple of 8; 0: 128, or half the
    window rounded up to a multiple of 8 when that is smaller: each query block then reads its
    own and the two previous key blocks, 1.5 W keys).
  max_segments: cuDNN packed-documents bound: rows with at most this many documents use the
    packed (ragged) kernel, others the dense-mask kernel (exact either way); 0: always the
    dense mask (an escape hatch for cuDNN builds that reject packing with a sliding window).
  """
  impl: str = 'auto'
  block_q: int = 512
  block_kv: int = 512
  window_block: int = 0
  max_segments: int = 16

  def __post_init__(self):
    impl = self.impl or 'auto'
    object.__setattr__(self, 'impl', impl)
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}')
    for key in ('block_q', 'block_kv'):
      val = getattr(self, key)
      if val <= 0 or val % _LANES:
        raise ValueError(f'model.attention_{key}={val}: splash blocks must be positive '
                         f'multiples of {_LANES}')
    if self.window_block < 0 or self.window_block % 8:
      raise ValueError(f'model.attention_window_block={self.window_block}: expected 0 (auto) '
                       'or a positive multiple of 8')
    if self.max_segments < 0:
      raise ValueError(f'model.attention_max_segments={self.max_segments}: expected >= 0')

  @classmethod
  def from_model_config(cls, m) -> 'AttentionConfig':
    """From a family's `model.*` config (missing keys take the defaults above)."""
    get = lambda k, d: m.get(k, d) if hasattr(m, 'get') else getattr(m, k, d)
    return cls(impl=get('attention_impl', 'auto') or 'auto',
               block_q=int(get('attention_block_q', 512)),
               block_kv=int(get('attention_block_kv', 512)),
               window_block=int(get('attention_window_block', 0)),
               max_segments=int(get('attention_max_segments', 16)))


def attention_config_keys(c) -> None:
  """Adds the `model.attention_*` keys with their defaults to a family's model config."""
  d = AttentionConfig()
  c.attention_impl = d.impl
  c.attention_block_q = d.block_q
  c.attention_block_kv = d.block_kv
  c.attention_window_block = d.window_block
  c.attention_max_segments = d.max_segments


def _as_attention_config(x) -> AttentionConfig:
  if isinstance(x, AttentionConfig):
    return x
  return AttentionConfig(impl=x or 'auto')


def resolve_attention_impl(config, *, window: int, seq_len: int, dtype: Any, head_dim: int,
                           platform: str | None = None) -> str:
  """The kernel an uncached attention call uses: 'xla', 'blocked', 'cudnn' or 'splash'.

  The one place where `model.attention_impl` is resolved. 'auto' follows `platform` (default:
  `jax.default_backend()`, the backend this process runs on; to lower for another platform, as
  in a TPU export from a CPU host, name the kernel): TPU -> splash; GPU -> cudnn when the
  compute dtype is bf16/fp16 and head_dim a multiple of 8 up to 128, else as CPU; CPU ->
  blocked when there is something to skip (a window shorter than T, or T longer than one query
  block), else xla (measured: benchmarks/attention.py). An explicit 'blocked' with nothing to
  skip runs 'xla'.
  """
  cfg = _as_attention_config(config)
  blockable = seq_len > (cfg.window_block or _BLOCK) or 0 < window < seq_len
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  impl = cfg.impl
  if impl == 'auto':
    platform = platform or jax.default_backend()
    if platform == 'tpu':
      impl = 'splash'
    elif platform in ('gpu', 'cuda') and low_precision and head_dim % 8 == 0 and head_dim <= 128:
      impl = 'cudnn'
    else:
      impl = 'blocked' if blockable else 'xla'
  if impl == 'blocked' and not blockable:
    impl = 'xla'
  if impl == 'cudnn' and not low_precision:
    raise ValueError(f"model.attention_impl='cudnn' needs bf16/fp16 compute "
                     f"(train.compute_dtype), got {jnp.dtype(dtype).name}")
  return impl


def attend(q_BxTxHxK: Array, k_BxTxGxK: Array, v_BxTxGxK: Array,
           segment_ids_BxT: Array | None, *, window: int = 0, config: Any = 'auto') -> Array:
  """Causal self-attention [B, T, H, K] with optional segment ids and sliding window.

  Query i attends to key j iff j <= i, (segment_ids[i] == segment_ids[j] when given) and
  (i - j < window when window > 0); softmax(q.k / sqrt(K)) in fp32. GQA: H a multiple of G.
  The kernel comes from `resolve_attention_impl`; every kernel computes exactly this."""
  cfg = _as_attention_config(config)
  t, kd = q_BxTxHxK.shape[1], q_BxTxHxK.shape[3]
  impl = resolve_attention_impl(cfg, window=window, seq_len=t, dtype=q_BxTxHxK.dtype,
                                head_dim=kd)
  args = (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)
  if impl == 'splash':
    return _splash_attention(*args, window=window, block_q=cfg.block_q, block_kv=cfg.block_kv)
  if impl == 'cudnn':
    return _cudnn_attention(*args, window=window, max_segments=cfg.max_segments)
  if impl == 'blocked':
    return _blocked_attention(*args, window=window, block=cfg.window_block)
  return _xla_attention(*args, window=window)


def _segment_mask(segment_ids_BxT: Array | None) -> Array | None:
  if segment_ids_BxT is None:
    return None
  return segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]


def _xla_attention(q, k, v, seg, *, window):
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(seg), is_causal=True,
                                      local_window_size=local, implementation='xla')


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _blocked_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, *, window: int,
                       block: int = 0):
  """The 'blocked' kernel: sliding-window tiles (`_blocked_local_attention`) for 0 < window < T,
  else causal query blocks (`_blocked_causal_attention`)."""
  t = q_BxTxHxK.shape[1]
  if 0 < window < t:
    c = block or min(_BLOCK, _round_up(max(window // 2, 8), 8))
    return _blocked_local_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, window=window,
                                    block=c)
  return _blocked_causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, block=block or _BLOCK)


def _blocked_causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, *, block: int):
  """Causal attention by query blocks of C positions: block n attends to keys [0, (n+1) C)
  only, so the tiles above the diagonal (about half the scores) are never formed, and the
  causal mask is only needed on the diagonal tile. T / C blocks, unrolled (their key lengths
  differ); plain XLA ops, differentiated by autodiff."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r = h // g
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    q_BxCxGxRxK = q_BxTxHxK[:, lo:hi].reshape(b, hi - lo, g, r, kd)
    scores = jnp.einsum('bcgrk,bsgk->bgrcs', q_BxCxGxRxK, k_BxTxGxK[:, :hi],
                        preferred_element_type=jnp.float32) * kd ** -0.5
    allowed = jnp.asarray(np.arange(hi)[None, :] <= np.arange(lo, hi)[:, None])[None]
    if seg_BxT is not None:
      allowed = allowed & (seg_BxT[:, lo:hi, None] == seg_BxT[:, None, :hi])
    scores = jnp.where(allowed[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxTxGxK.dtype)
    outs.append(jnp.einsum('bgrcs,bsgk->bcgrk', probs, v_BxTxGxK[:, :hi]).reshape(
        b, hi - lo, h, kd))
  return jnp.concatenate(outs, axis=1)


def _blocked_local_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, *, window: int,
                             block: int):
  """Sliding-window attention in O(T * W): T is cut into query blocks of C positions; block n
  attends to the keys of blocks n - P .. n (P = ceil((W - 1) / C)), a [C, (P + 1) C] score tile
  per block instead of a row of T keys. The masks (causal, window, segments, the zero keys
  before position 0) apply inside the tile; every query keeps its own key, so no row is empty.
  Plain XLA ops (einsum, softmax), differentiated by autodiff."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r = h // g
  c = min(block, _round_up(t, 8))
  p = -(-(window - 1) // c)            # previous key blocks each query block needs
  n = -(-t // c)
  tp = n * c

  def pad_t(x, front=0):
    return jnp.pad(x, [(0, 0), (front, tp - t)] + [(0, 0)] * (x.ndim - 2))

  def windows(x):  # [B, T, ...] -> [B, N, (P+1) C, ...]: key blocks n-P .. n for each block n
    xp = pad_t(x, front=p * c).reshape(b, n + p, c, *x.shape[2:])
    return jnp.concatenate([xp[:, i:i + n] for i in range(p + 1)], axis=2)

  q_BxNxCxGxRxK = pad_t(q_BxTxHxK).reshape(b, n, c, g, r, kd)
  k_BxNxSxGxK, v_BxNxSxGxK = windows(k_BxTxGxK), windows(v_BxTxGxK)
  s = (p + 1) * c
  q_pos_NxC = (np.arange(n) * c)[:, None] + np.arange(c)[None]
  k_pos_NxS = ((np.arange(n) - p) * c)[:, None] + np.arange(s)[None]
  diff_NxCxS = q_pos_NxC[:, :, None] - k_pos_NxS[:, None, :]
  allowed = (diff_NxCxS >= 0) & (diff_NxCxS < window) & (k_pos_NxS[:, None, :] >= 0)
  allowed_BxNxCxS = jnp.asarray(allowed)[None]
  if seg_BxT is not None:
    seg1_BxT = seg_BxT.astype(jnp.int32) + 1   # padded positions: id 0 after the shift
    seg_q_BxNxC = pad_t(seg1_BxT).reshape(b, n, c)
    seg_k_BxNxS = windows(seg1_BxT)
    allowed_BxNxCxS = allowed_BxNxCxS & (seg_q_BxNxC[..., None] == seg_k_BxNxS[:, :, None, :])
  scores = jnp.einsum('bncgrk,bnsgk->bngrcs', q_BxNxCxGxRxK, k_BxNxSxGxK,
                      preferred_element_type=jnp.float32) * kd ** -0.5
  scores = jnp.where(allowed_BxNxCxS[:, :, None, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxTxGxK.dtype)
  out = jnp.einsum('bngrcs,bnsgk->bncgrk', probs, v_BxNxSxGxK)
  return out.reshape(b, tp, h, kd)[:, :t]


def segment_runs(segment_ids_BxT: Array, max_segments: int) -> tuple[Array, Array, Array]:
  """cuDNN's packed-layout arguments for rows of packed documents.

  Returns (seqlen [B, M] int32: the length of each run of equal consecutive segment ids, -1
  after the last run; offsets [B, M + 1] int32: each run's start, -1 padded; ok: bool scalar,
  True when every row has at most M = `max_segments` runs and no id occurs in two runs, i.e.
  when attention restricted to runs equals attention restricted to equal ids). Every position
  lies in a run (padding included), so every query has keys."""
  b, t = segment_ids_BxT.shape
  seg = segment_ids_BxT.astype(jnp.int32)
  start_BxT = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  n_runs_B = start_BxT.sum(-1)
  first = lambda row: jnp.nonzero(row, size=max_segments + 1, fill_value=t)[0]
  starts_BxM1 = jax.vmap(first)(start_BxT).astype(jnp.int32)  # t past the last run
  valid_BxM = starts_BxM1[:, :-1] < t
  seqlen_BxM = jnp.where(valid_BxM, starts_BxM1[:, 1:] - starts_BxM1[:, :-1], -1)
  offsets_BxM1 = jnp.where(starts_BxM1 < t, starts_BxM1, -1).at[:, -1].set(-1)
  sorted_BxT = jnp.sort(seg, axis=-1)
  distinct_B = 1 + (sorted_BxT[:, 1:] != sorted_BxT[:, :-1]).sum(-1)
  ok = jnp.all((n_runs_B <= max_segments) & (distinct_B == n_runs_B))
  return seqlen_BxM, offsets_BxM1.astype(jnp.int32), ok


def runs_mask(seqlen_BxM: Array, offsets_BxM1: Array, t: int) -> Array:
  """[B, 1, T, T] bool: i and j lie in the same run described by `segment_runs`' arguments
  (what cuDNN's packed layout computes; used to test those arguments on any platform)."""
  pos_T = jnp.arange(t)
  start_BxM = offsets_BxM1[:, :-1]
  inside_BxMxT = ((pos_T[None, None] >= start_BxM[..., None])
                  & (pos_T[None, None] < (start_BxM + seqlen_BxM)[..., None])
                  & (seqlen_BxM[..., None] > 0))
  run_BxT = jnp.where(inside_BxMxT.any(1), jnp.argmax(inside_BxMxT, axis=1), -1)
  return (run_BxT[:, :, None] == run_BxT[:, None, :])[:, None]


def _cudnn_attention(q, k, v, seg, *, window: int, max_segments: int):
  """cuDNN fused attention (see the module doc): causal (+ sliding window) with packed runs."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax.nn's own cuDNN entry
  scale = q.shape[-1] ** -0.5
  sliding = window if window > 0 else None
  if seg is None:
    return cudnn.dot_product_attention(q, k, v, scale=scale, mask_type=cudnn.MaskType.CAUSAL,
                                       sliding_window_length=sliding)

  def dense(q, k, v, seg):
    local = (window - 1, 0) if window > 0 else None
    return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(seg), is_causal=True,
                                        local_window_size=local, implementation='cudnn')

  if max_segments == 0 or not _cudnn_packed_supported(cudnn):
    return dense(q, k, v, seg)
  seqlen, offsets, ok = segment_runs(seg, max_segments)

  def packed(q, k, v, seg):
    del seg
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
        scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL, sliding_window_length=sliding)

  return jax.lax.cond(ok, packed, dense, q, k, v, seg)


def _cudnn_packed_supported(cudnn) -> bool:
  """cuDNN's packed layout needs a Hopper-or-later GPU (JAX checks it when tracing)."""
  try:
    return bool(cudnn.check_compute_capability('9.0'))
  except Exception:  # pylint: disable=broad-except
    return False


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, heads: int, window: int, block_q: int, block_kv: int,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  shape = (t, t)
  mask = (sa.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window > 0
          else sa.CausalMask(shape))
  sizes = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def batch_mesh_axes(x: Array, batch: int) -> tuple[Any, tuple[str, ...]]:
  """(mesh, axes): the mesh `x` lives on and its axes (in order) over which the batch is split,
  as many as divide `batch`; (None, ()) on one device."""
  mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
  if mesh is None or not mesh.axis_names or math.prod(mesh.axis_sizes) == 1:
    return None, ()
  axes, size = [], 1
  for name, n in zip(mesh.axis_names, mesh.axis_sizes):
    if n > 1 and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  return mesh, tuple(axes)


def _splash_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, *, window: int, block_q: int,
                      block_kv: int):
  """Splash attention: the TPU Mosaic kernel, or Pallas interpret mode on other platforms,
  chosen at lowering time by `lax.platform_dependent`, so one traced program exports for TPU
  from a CPU host and runs (slowly) on CPU in tests."""
  b, t, h, kd = q_BxTxHxK.shape
  tp = _round_up(t, _LANES)
  bq, bkv = min(block_q, tp), min(block_kv, tp)
  tp = _round_up(tp, math.lcm(bq, bkv))
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  q = pad(q_BxTxHxK * jnp.asarray(kd ** -0.5, q_BxTxHxK.dtype))
  args = (q, pad(k_BxTxGxK), pad(v_BxTxGxK))
  if seg_BxT is not None:  # without segments, the padded keys come after every real query
    args += (jnp.pad(seg_BxT.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1),)

  def run(interpret, q, k, v, seg=None):
    kernel = _splash_kernel(tp, h, window, bq, bkv, interpret)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T, K]
    if seg is None:
      out = jax.vmap(kernel)(qt, kt, vt)
    else:
      from jax.experimental.pallas.ops.tpu import splash_attention as sa
      out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
          qt, kt, vt, seg)
    return jnp.swapaxes(out, 1, 2)

  def local(*a):  # this device's rows
    return jax.lax.platform_dependent(*a, tpu=functools.partial(run, False),
                                      default=functools.partial(run, True))

  mesh, axes = batch_mesh_axes(q, b)
  if axes:
    spec = jax.sharding.PartitionSpec(axes)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                          check_vma=False)
  return local(*args)[:, :t]


class Attention(nnx.Module):
  """Causal multi-head attention with GQA, RoPE, segment masks, sliding window and KV cache.

  Parameters: q [D, H, K] ('embed', 'heads', 'head_dim'), k and v [D, G, K]
  ('embed', 'kv_heads', 'head_dim'), o [H, K, D] ('heads', 'head_dim', 'embed').

  Masking: query i attends to key j iff j <= i, segment_ids[i] == segment_ids[j] (when
  segment ids are given; padding is segment 0 and only sees padding, so no row is empty), and,
  with `window > 0`, i - j < window. Indices are positions in the row (cache slots when
  decoding); the `positions` input only feeds RoPE. `attention_impl`: a kernel name or an
  `AttentionConfig` (see `attend`).

  `causal=False` (a bidirectional encoder, e.g. HAT's intra-word encoder, whose segment ids are
  word ids): query i attends to every key j of its segment with |i - j| < window (window > 0),
  earlier and later alike. Uncached calls only (`bidirectional_attention`).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_base: float = 1e4, window: int = 0, dtype: Any = jnp.float32,
               attention_impl: str | AttentionConfig | None = None, init_std: float = 0.02,
               out_init_std: float | None = None, causal: bool = True,
               rngs: nnx.Rngs):
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
    self.attention = _as_attention_config(attention_impl)
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
      out_BxTxHxK = attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT,
                           window=self.window, config=self.attention)
      new_cache = None
    elif 'prefix_k' in cache:  # rows continuing one shared cache, read in place
      out_BxTxHxK = attend_shared_prefix(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, positions_BxT, cache,
                                         self.window)
      new_cache = cache
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
               dtype: Any = jnp.float32, attention_impl: str | AttentionConfig | None = None,
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
    """`context = (c_BxWxC, index_BxT)`: position t reads c[index[t]] (index clipped to W);
    `(c_BxWxC, index_BxT, scale_BxT)`: what position t reads is multiplied by scale[t] (HAT's
    learned chunking passes a straight-through factor that is 1 in the forward pass)."""
    a_BxTxD, new_cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT,
                                   cache, cache_index)
    x_BxTxD = x_BxTxD + a_BxTxD
    if self.cross_v is not None:
      if context is None:
        raise ValueError('this block was built with context_dim > 0 and needs `context`')
      c_BxWxC, index_BxT, *scale = context
      add_BxWxD = self.cross_o(self.cross_v(c_BxWxC))
      index_BxT = jnp.clip(index_BxT, 0, add_BxWxD.shape[1] - 1)
      add_BxTxD = jnp.take_along_axis(add_BxWxD, index_BxT[..., None], axis=1)
      if scale:
        add_BxTxD = add_BxTxD * scale[0][..., None].astype(add_BxTxD.dtype)
      x_BxTxD = x_BxTxD + add_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return x_BxTxD, new_cache



# -- branches over one shared KV cache -----------------------------------------------------------
def shared_prefix_cache(cache: Cache, prefix_visible_BxTxS: Array,
                        own_visible_BxTxT: Array | None = None) -> Cache:
  """A layer's cache for `attend_shared_prefix`: one cache row (k, v [1, S, G, K]) read in place
  by every query of a [B, T] call. Query t of row b sees the cached slots where
  prefix_visible[b, t] is nonzero, and the call's own tokens u where own_visible[b, t, u] is
  nonzero (default: u <= t). Nothing is written into the shared arrays (a token tree over one
  prefix: each token sees the prefix up to where its branch leaves it, and its ancestors)."""
  out = dict(prefix_k=cache['k'], prefix_v=cache['v'], prefix_visible=prefix_visible_BxTxS)
  if own_visible_BxTxT is not None:
    out['own_visible'] = own_visible_BxTxT
  return out


def attend_shared_prefix(q_BxTxHxK: Array, k_BxTxGxK: Array, v_BxTxGxK: Array,
                         positions_BxT: Array, cache: Cache, window: int = 0) -> Array:
  """Attention of a [B, T] call to one shared cache row (`shared_prefix_cache`) and to its own
  tokens, without copying the cache per row: the scores against the S cached keys and against
  the T own keys share one fp32 softmax. With `window`, key slot / position j is visible to a
  query at position p only if p - j < window (cached slots are positions). Every query must see
  at least one key (its own token, normally)."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r = h // g
  dt = q_BxTxHxK.dtype
  pk_SxGxK = cache['prefix_k'][0].astype(dt)
  pv_SxGxK = cache['prefix_v'][0].astype(dt)
  s = pk_SxGxK.shape[0]
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, r, kd)
  pre_BxGxRxTxS = jnp.einsum('btgrk,sgk->bgrts', q_BxTxGxRxK, pk_SxGxK,
                             preferred_element_type=jnp.float32) * kd ** -0.5
  own_BxGxRxTxT = jnp.einsum('btgrk,bugk->bgrtu', q_BxTxGxRxK, k_BxTxGxK.astype(dt),
                             preferred_element_type=jnp.float32) * kd ** -0.5
  seen_BxTxS = jnp.broadcast_to(cache['prefix_visible'] != 0, (b, t, s))
  if 'own_visible' in cache:
    own_seen_BxTxT = jnp.broadcast_to(cache['own_visible'] != 0, (b, t, t))
  else:
    own_seen_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  if window > 0:
    p_BxT = positions_BxT.astype(jnp.int32)
    seen_BxTxS &= (p_BxT[:, :, None] - jnp.arange(s)[None, None, :]) < window
    own_seen_BxTxT &= (p_BxT[:, :, None] - p_BxT[:, None, :]) < window
  scores = jnp.concatenate([jnp.where(seen_BxTxS[:, None, None], pre_BxGxRxTxS, -jnp.inf),
                            jnp.where(own_seen_BxTxT[:, None, None], own_BxGxRxTxT, -jnp.inf)],
                           axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out_BxTxGxRxK = (jnp.einsum('bgrts,sgk->btgrk', probs[..., :s], pv_SxGxK)
                   + jnp.einsum('bgrtu,bugk->btgrk', probs[..., s:], v_BxTxGxK.astype(dt)))
  return out_BxTxGxRxK.reshape(b, t, h, kd)
