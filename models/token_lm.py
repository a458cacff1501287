"""Token LM for the byte and subword baselines: embedding -> Transformer -> readout.

Also here: the LM loss with optional chunked cross-entropy (the [B, T, V] fp32 logits never
exist at once), KV-cached generation in one jitted while-loop, parameter counting and the
training FLOPs-per-token estimate used for MFU.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models import layers
from models.layers import Cache, Dense, Embed
from models.transformer import Transformer

Array = jax.Array


def default_model_config() -> ml_collections.ConfigDict:
  """The `model.*` keys TokenLM reads, with tiny defaults."""
  c = ml_collections.ConfigDict()
  c.d_model = 64
  c.num_layers = 2
  c.num_heads = 4
  c.num_kv_heads = 2
  c.head_dim = 16
  c.mlp_dim = 128
  c.rope_base = 1e4
  c.norm_eps = 1e-6
  c.window = 0             # >0: sliding-window attention over the last `window` tokens
  c.tie_embeddings = True
  c.ce_chunk = -1          # tokens per readout chunk in the loss; 0: none; -1: auto (by
                           # platform and logits memory: `resolve_ce_chunk`)
  c.remat = 'none'         # 'none' | 'full' | 'dots' (or a bool)
  c.scan_layers = False    # lax.scan over the stacked layers (compile time flat in depth)
  layers.attention_config_keys(c)  # attention_impl: 'auto' | xla | blocked | cudnn | splash
  c.init_std = 0.02
  # input embeddings: 'learned' | 'glyph' (frozen, from rendered glyphs: models/glyphs.py;
  # needs tie_embeddings=False, the readout stays learned)
  c.input_embedding = 'learned'
  c.glyph_font = ''        # '' = DejaVu Sans from matplotlib; or a .ttf / .otf path
  c.glyph_size = 16        # pixels per character cell
  c.glyph_chars = 8        # cells per token bitmap (longer tokens are squeezed into them)
  c.glyph_seed = 0         # the fallback vectors of tokens without a renderable text
  return c


INPUT_EMBEDDINGS = ('learned', 'glyph')


class FrozenEmbed(nnx.Module):
  """A fixed input table [V, D]: an `nnx.Variable`, not a Param, so the trainer never trains
  it (its values come from the family's `frozen_params`, e.g. models/glyphs.glyph_table)."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32):
    self.dtype = dtype
    self.embedding = nnx.Variable(jnp.zeros((num_embeddings, features), jnp.float32),
                                  out_sharding=('vocab', 'embed'))

  def __call__(self, ids_BxT: Array) -> Array:
    return jnp.take(self.embedding[...], ids_BxT, axis=0).astype(self.dtype)


def _readout(h_BxTxD: Array, w: Array, tied: bool, dtype: Any) -> Array:
  """fp32 logits from hidden states; w is the [V, D] table (tied) or a [D, V] kernel."""
  eq = '...d,vd->...v' if tied else '...d,dv->...v'
  return jnp.einsum(eq, h_BxTxD.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


class TokenLM(nnx.Module):
  """Decoder-only LM over integer tokens (bytes or subwords)."""

  def __init__(self, cfg_model: ml_collections.ConfigDict, vocab_size: int,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    self.vocab_size = int(vocab_size)
    self.dtype = dtype
    self.tie_embeddings = bool(cfg_model.tie_embeddings)
    self.ce_chunk = int(cfg_model.ce_chunk)
    kind = cfg_model.get('input_embedding', 'learned')
    if kind not in INPUT_EMBEDDINGS:
      raise ValueError(f'model.input_embedding={kind!r}: expected one of {INPUT_EMBEDDINGS}')
    if kind == 'glyph':
      if self.tie_embeddings:
        raise ValueError("model.input_embedding='glyph' needs model.tie_embeddings=False: the "
                         'frozen glyph table cannot also be the trained readout')
      self.embed = FrozenEmbed(vocab_size, cfg_model.d_model, dtype=dtype)
    else:
      self.embed = Embed(vocab_size, cfg_model.d_model, dtype=dtype, init_std=cfg_model.init_std,
                         rngs=rngs)
    self.transformer = Transformer(
        cfg_model.num_layers, cfg_model.d_model, cfg_model.num_heads, cfg_model.num_kv_heads,
        cfg_model.head_dim, cfg_model.mlp_dim, rope_base=cfg_model.rope_base,
        window=cfg_model.window, dtype=dtype, remat=cfg_model.remat,
        attention_impl=layers.AttentionConfig.from_model_config(cfg_model),
        init_std=cfg_model.init_std, norm_eps=cfg_model.get('norm_eps', 1e-6),
        scan_layers=cfg_model.get('scan_layers', False), rngs=rngs)
    self.readout = (None if self.tie_embeddings else
                    Dense(cfg_model.d_model, vocab_size, axes=('embed', 'vocab'), dtype=dtype,
                          init_std=cfg_model.init_std, rngs=rngs))

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[Cache]:
    return self.transformer.init_cache(batch, max_len, dtype)

  def hidden(self, tokens_BxT: Array, positions_BxT: Array | None = None,
             segment_ids_BxT: Array | None = None, cache: list[Cache] | None = None,
             cache_index: Array | int | None = None) -> tuple[Array, list[Cache] | None]:
    """Final-norm hidden states [B, T, D] (compute dtype) and the new cache.

    positions default to arange(T) (+ cache_index when decoding)."""
    if positions_BxT is None:
      t = tokens_BxT.shape[1]
      start = 0 if cache_index is None else cache_index
      positions_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), tokens_BxT.shape)
    x_BxTxD = self.embed(tokens_BxT)
    return self.transformer(x_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_index)

  def readout_weight(self) -> Array:
    """The fp32 readout parameter: [V, D] embedding table if tied, else the [D, V] kernel."""
    return self.embed.embedding[...] if self.tie_embeddings else self.readout.kernel[...]

  def logits(self, h_BxTxD: Array) -> Array:
    """fp32 logits [B, T, V] (matmul in compute dtype, fp32 accumulation)."""
    return _readout(h_BxTxD, self.readout_weight(), self.tie_embeddings, self.dtype)

  def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None, cache: list[Cache] | None = None,
               cache_index: Array | int | None = None) -> tuple[Array, list[Cache] | None]:
    h_BxTxD, cache = self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT, cache, cache_index)
    return self.logits(h_BxTxD), cache


# fp32 logits per device above which the auto readout (`ce_chunk=-1`) is chunked. On CPU the
# chunked readout's recomputation costs ~14 % of a step at a 32k vocabulary and memory is
# plentiful, so only memory forces it; accelerators' memory (HBM) is scarcer than their FLOPs.
CE_AUTO_BYTES = {'cpu': 2 << 30, 'default': 512 << 20}


def resolve_ce_chunk(ce_chunk: int, h_BxTxD: Array, vocab_size: int,
                     platform: str | None = None) -> int:
  """Tokens per readout chunk for `model.ce_chunk` (0: none). -1 (auto): no chunking while one
  device's fp32 logits [B / batch shards, T, V] fit `CE_AUTO_BYTES[platform]` (platform:
  `jax.default_backend()`), else the largest power-of-two chunk (>= 128 tokens) whose logits
  take at most a quarter of that."""
  if ce_chunk >= 0:
    return int(ce_chunk)
  if ce_chunk != -1:
    raise ValueError(f'model.ce_chunk={ce_chunk}: expected -1 (auto), 0 (none) or > 0')
  b, t, _ = h_BxTxD.shape
  mesh, axes = layers.batch_mesh_axes(h_BxTxD, b)
  rows = b // int(np.prod([mesh.shape[a] for a in axes])) if axes else b
  platform = platform or jax.default_backend()
  budget = CE_AUTO_BYTES.get(platform, CE_AUTO_BYTES['default'])
  if 4 * rows * t * vocab_size <= budget:
    return 0
  chunk = 128
  while chunk * 2 < t and 4 * rows * chunk * 2 * vocab_size <= budget // 4:
    chunk *= 2
  return chunk


def token_nll(model: TokenLM, h_BxTxD: Array, targets_BxT: Array) -> Array:
  """Per-token negative log-likelihood [B, T] in fp32.

  With a readout chunk C (`model.ce_chunk` resolved by `resolve_ce_chunk`, 0 < C < T) the
  readout, logsumexp and target logit are computed chunk by chunk along the sequence in a
  `lax.scan` whose body is `jax.checkpoint`-ed, so only one [B, C, V] block of logits is live in
  the forward and the backward pass. T is padded up to a multiple of C (the padded positions
  are dropped).
  """
  w = model.readout_weight().astype(model.dtype)
  tied, dtype = model.tie_embeddings, model.dtype

  def nll(h_BxCxD, y_BxC):
    logits_BxCxV = _readout(h_BxCxD, w, tied, dtype)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    tgt_BxC = jnp.take_along_axis(logits_BxCxV, y_BxC[..., None], axis=-1)[..., 0]
    return lse_BxC - tgt_BxC

  b, t, d = h_BxTxD.shape
  c = resolve_ce_chunk(model.ce_chunk, h_BxTxD, model.vocab_size)
  if c <= 0 or c >= t:
    return nll(h_BxTxD, targets_BxT)
  pad = (-t) % c
  n = (t + pad) // c
  h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
  y_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  h_NxBxCxD = h_BxTxD.reshape(b, n, c, d).transpose(1, 0, 2, 3)
  y_NxBxC = y_BxT.reshape(b, n, c).transpose(1, 0, 2)
  chunk_nll = jax.checkpoint(nll)
  _, nll_NxBxC = jax.lax.scan(lambda carry, xs: (carry, chunk_nll(*xs)), None,
                              (h_NxBxCxD, y_NxBxC))
  return nll_NxBxC.transpose(1, 0, 2).reshape(b, n * c)[:, :t]


def lm_loss(model: TokenLM, batch: dict[str, Array], rng: Array | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Next-token loss = sum(nll * weights) / max(sum(weights), 1).

  batch: inputs, targets, segment_ids, positions (int32 [B, T]), weights (float32 [B, T]),
  target_bytes (int32 [B, T], UTF-8 bytes per target token, for bits-per-byte).
  metrics (fp32 scalar sums, additive across micro-batches): nll_sum, n_tokens, n_bytes.
  `rng` is unused (no dropout); it is part of the family loss interface.
  """
  del rng
  h_BxTxD, _ = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'])
  nll_BxT = token_nll(model, h_BxTxD, batch['targets'])
  weights_BxT = batch['weights'].astype(jnp.float32)
  nll_sum = jnp.sum(nll_BxT * weights_BxT)
  n_tokens = jnp.sum(weights_BxT)
  loss = nll_sum / jnp.maximum(n_tokens, 1.0)
  metrics = dict(nll_sum=nll_sum, n_tokens=n_tokens,
                 n_bytes=jnp.sum(batch['target_bytes']).astype(jnp.float32))
  return loss, metrics


def _top_p_filter(logits_BxV: Array, top_p: Array) -> Array:
  """Keeps the smallest set of most likely tokens whose probability mass reaches top_p."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = mass_before_BxV < top_p
  keep_BxV = keep_BxV.at[:, 0].set(True)
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_logits(logits_BxV: Array, temperature: Array, top_p: Array, rng: Array) -> Array:
  """int32 [B] tokens: greedy at temperature 0, else nucleus sampling with `top_p` (1: plain
  sampling). The one sampling function of every generation loop; the greedy path is a real
  branch (`lax.cond`), so it never pays for the sort, cumsum and categorical draw."""
  def greedy(_):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample(_):
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    scaled_BxV = jax.lax.cond(top_p < 1.0, lambda x: _top_p_filter(x, top_p), lambda x: x,
                              scaled_BxV)
    return jax.random.categorical(rng, scaled_BxV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(jnp.asarray(temperature) > 0, sample, greedy, None)


def decode(call, cache, prompt_BxP: Array, rng: Array, temperature, top_p, eos_id,
           max_new_tokens: int) -> Array:
  """The KV-cache sampling loop shared by the token-level families (traced inside a jit).

  `call(ids_BxT, cache, cache_index) -> (logits_BxTxV, cache)`. Prefills the prompt, then
  decodes one token at a time in a `lax.while_loop` that stops once every row emitted eos;
  tokens after a row's eos are 0. Returns int32 [B, max_new_tokens]."""
  b, p = prompt_BxP.shape
  logits_BxPxV, cache = call(prompt_BxP, cache, 0)
  rng, key = jax.random.split(rng)
  tok_B = sample_logits(logits_BxPxV[:, -1], temperature, top_p, key)
  out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok_B)

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, out_BxN, done_B, rng = carry
    prev_Bx1 = jax.lax.dynamic_slice_in_dim(out_BxN, i - 1, 1, axis=1)
    logits_Bx1xV, cache = call(prev_Bx1, cache, p + i - 1)
    rng, key = jax.random.split(rng)
    tok_B = jnp.where(done_B, 0,
                      sample_logits(logits_Bx1xV[:, 0], temperature, top_p, key))
    out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, tok_B[:, None], i, axis=1)
    return i + 1, cache, out_BxN, done_B | (tok_B == eos_id), rng

  carry = (jnp.int32(1), cache, out_BxN, tok_B == eos_id, rng)
  return jax.lax.while_loop(cond, body, carry)[2]


def _bind(model: TokenLM, rng: Array, batch: int):
  """(call(ids, cache, cache_index) -> (logits, cache), rng) of a token LM for `decode`."""
  del batch
  return lambda ids, cache, index: model(ids, cache=cache, cache_index=index), rng


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'bind'))
def _generate(graphdef, state, prompt_BxP, rng, temperature, top_p, eos_id, *, max_new_tokens,
              bind):
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  call, rng = bind(model, rng, b)
  return decode(call, model.init_cache(b, p + max_new_tokens), prompt_BxP, rng, temperature,
                top_p, eos_id, max_new_tokens)


def generate(model: TokenLM, prompt_ids: Array, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng: Array | None = None, eos_id: int | None = None,
             bind=_bind) -> Array:
  """Samples `max_new_tokens` continuations of equal-length prompts [B, P].

  The prompt is prefilled into a KV cache of length P + max_new_tokens, then tokens are decoded
  one at a time inside one jitted `lax.while_loop`. temperature 0 -> greedy; otherwise nucleus
  sampling with `top_p` (1.0: plain sampling). Returns int32 [B, max_new_tokens] new tokens;
  after a row emits `eos_id` (kept), its later tokens are 0 (pad), and the loop stops early
  once every row is done. `eos_id=None` never stops. `bind(model, rng, batch) -> (call,
  rng)` adapts another model with this interface (the lexinvariant LM draws its embeddings).
  """
  if max_new_tokens <= 0:
    return jnp.zeros((np.shape(prompt_ids)[0], 0), jnp.int32)
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), rng,
                   jnp.float32(temperature), jnp.float32(top_p),
                   jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=int(max_new_tokens),
                   bind=bind)


def count_params(model: nnx.Module) -> int:
  """Number of scalars in all `nnx.Param`s (a tied embedding counts once)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def flops_per_token(cfg_model: ml_collections.ConfigDict, vocab_size: int, seq_len: int
                    ) -> float:
  """Training FLOPs per token (forward + backward), MaxText convention.

    N_matmul = L * (D*H*K + 2*D*G*K + H*K*D + 3*D*F) + D*V   (non-embedding matmul params
               + the readout matmul; the embedding gather costs no FLOPs)
    flops    = 6 * N_matmul + 12 * L * (H*K) * S_eff

  S_eff is the mean number of keys a query attends to: T/2 for full causal attention (the
  causal halving of 12*L*T*H*K), and for a sliding window w < T it is
  w * (1 - w / (2T)) (= T/2 at w = T; about w for w << T, since a windowed query sees w keys,
  not w/2).
  """
  c = cfg_model
  d, l, f = c.d_model, c.num_layers, c.mlp_dim
  hk, gk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  n_matmul = l * (d * hk + 2 * d * gk + hk * d + 3 * d * f) + d * vocab_size
  t = seq_len
  w = c.window
  s_eff = t / 2 if (w <= 0 or w >= t) else w * (1 - w / (2 * t))
  return float(6 * n_matmul + 12 * l * hk * s_eff)
