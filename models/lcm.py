"""Large-Concept-style models: next-sentence-embedding prediction in a sentence space.

Rows are packed documents of sentences (data/sentences.py): `inputs` = [bos, s0, s1, ...],
`targets` = [s0, s1, ..., end-of-text], with their embeddings `input_emb` / `target_emb`
[B, S, D]. Everything is computed in the robust-normalized space, x = (e - center) / scale, with
(center, scale) fitted on the training embeddings and stored in the model (frozen parameters,
so checkpoints carry them); predictions are denormalized for metrics and decoding.

* Base-LCM (`variant='base'`): PreNet (normalize, project to d) -> causal transformer (the
  shared stack, RoPE over sentence positions, no attention across documents) -> PostNet
  (project to D, denormalize). Loss: squared error summed over channels, averaged over targets.
* Two-Tower diffusion LCM (`variant='two_tower'`): the same causal stack as contextualizer
  over the clean inputs; a denoiser of `denoiser_layers` layers reads the noisy target
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and predicts x0. Each denoiser layer has three
  sub-blocks with AdaLN modulation (shift, scale, gate from the timestep embedding; zero-init):
  a per-position "self-attention" (its mask is the diagonal, so it is v then o), cross-attention
  to the context and a SwiGLU MLP. The context is shifted by one with a zero vector first:
  query j sees [0, h_0, ..., h_j] of its own document, where h_j has read inputs up to j
  (bos, s0 .. s_{j-1}). With probability `cfg_dropout` per position only the zero vector is
  visible (classifier-free guidance training).
  Noise schedules (`schedule`): 'cosine' abar(t) = cos^2((t + 0.008)/1.008 * pi/2) and
  'sigmoid' abar(t) = sigmoid(delta - gamma * logit(t)), discretised over `timesteps` steps via
  betas and (default) rescaled to zero terminal SNR. Sampling: DDIM (eta 0, trailing spacing)
  with classifier-free guidance in epsilon space and guidance rescale; the first step (pure
  noise, abar = 0) takes the conditional x0.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models import layers
from models.layers import MLP, Dense, RMSNorm
from models.transformer import Transformer

Array = jax.Array
BOS_ID = 1


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = 'base'         # 'base' (MSE) | 'two_tower' (diffusion)
  c.d_model = 128
  c.num_layers = 4           # Base-LCM stack / Two-Tower contextualizer
  c.num_heads = 4
  c.head_dim = 32
  c.mlp_dim = 384
  c.rope_base = 1e4
  c.remat = 'none'
  c.scan_layers = False      # lax.scan over the stacked layers of the causal stack
  layers.attention_config_keys(c)  # attention_impl: 'auto' | xla | blocked | cudnn | splash
  c.denoiser_layers = 2      # two_tower only
  c.timesteps = 100          # diffusion training steps
  c.schedule = 'cosine'      # 'cosine' | 'sigmoid'
  c.sigmoid_gamma = 1.5
  c.sigmoid_delta = 0.0
  c.zero_snr = True
  c.cfg_dropout = 0.15       # conditioning dropped per position in training
  return c


# -- noise schedule -----------------------------------------------------------------------------
def alpha_bars(c) -> np.ndarray:
  """abar_t for t = 0 .. timesteps-1 (float64)."""
  n = int(c.timesteps)
  if c.schedule == 'cosine':
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  elif c.schedule == 'sigmoid':
    def f(t):
      t = min(max(t, 1e-12), 1 - 1e-12)
      z = c.sigmoid_delta - c.sigmoid_gamma * math.log(t / (1 - t))
      return 1 / (1 + math.exp(-z))
  else:
    raise ValueError(f"model.schedule={c.schedule!r}: expected 'cosine' or 'sigmoid'")
  betas = np.array([min(1 - f((i + 1) / n) / max(f(i / n), 1e-300), 0.999) for i in range(n)])
  abar = np.cumprod(1 - betas)
  if c.zero_snr:  # Lin et al. 2023: shift and scale sqrt(abar) so that the last step is pure noise
    s = np.sqrt(abar)
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    abar = s ** 2
  return abar


def timestep_features(t: Array, dim: int = 256) -> Array:
  """[cos(t f_k), sin(t f_k)] with f_k = 10000^(-k / (dim/2)) (fp32)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
  a = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)


# -- modules -----------------------------------------------------------------------------------
class DenoiserLayer(nnx.Module):

  def __init__(self, c, dtype: Any, rngs: nnx.Rngs):
    d, h, k = c.d_model, c.num_heads, c.head_dim
    dense = lambda i, o, std=0.02: Dense(i, o, dtype=dtype, init_std=std, rngs=rngs)
    out_std = 0.02 / math.sqrt(2 * c.denoiser_layers)
    self.num_heads, self.head_dim, self.dtype = h, k, dtype
    self.modulation = Dense(d, 9 * d, use_bias=True, dtype=dtype, init_std=0.0, rngs=rngs)
    self.self_norm, self.cross_norm, self.mlp_norm = (RMSNorm(d, dtype=dtype) for _ in range(3))
    self.self_v, self.self_o = dense(d, d), dense(d, d, out_std)
    self.q, self.k, self.v = dense(d, h * k), dense(d, h * k), dense(d, h * k)
    self.o = dense(h * k, d, out_std)
    self.mlp = MLP(d, c.mlp_dim, dtype=dtype, init_std=0.02, out_init_std=out_std, rngs=rngs)

  def __call__(self, x_BxSxD: Array, temb_BxSxD: Array, ctx_BxCxD: Array,
               mask_BxSxC: Array) -> Array:
    mods = jnp.split(self.modulation(temb_BxSxD).astype(jnp.float32), 9, axis=-1)
    def modulated(norm, x, shift, scale):
      return (norm(x).astype(jnp.float32) * (1 + scale) + shift).astype(self.dtype)
    def gated(x, gate, y):
      return (x.astype(jnp.float32) + gate * y.astype(jnp.float32)).astype(self.dtype)
    h = modulated(self.self_norm, x_BxSxD, mods[0], mods[1])
    x_BxSxD = gated(x_BxSxD, mods[2], self.self_o(self.self_v(h)))
    h = modulated(self.cross_norm, x_BxSxD, mods[3], mods[4])
    b, s, _ = h.shape
    c = ctx_BxCxD.shape[1]
    q = self.q(h).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k(ctx_BxCxD).reshape(b, c, self.num_heads, self.head_dim)
    v = self.v(ctx_BxCxD).reshape(b, c, self.num_heads, self.head_dim)
    a = jax.nn.dot_product_attention(q, k, v, mask=mask_BxSxC[:, None])
    x_BxSxD = gated(x_BxSxD, mods[5], self.o(a.reshape(b, s, -1)))
    h = modulated(self.mlp_norm, x_BxSxD, mods[6], mods[7])
    return gated(x_BxSxD, mods[8], self.mlp(h))


class Denoiser(nnx.Module):

  def __init__(self, c, emb_dim: int, dtype: Any, rngs: nnx.Rngs):
    d = c.d_model
    self.dtype = dtype
    self.inp = Dense(emb_dim, d, use_bias=True, dtype=dtype, rngs=rngs)
    self.t1 = Dense(256, d, use_bias=True, dtype=dtype, init_std=0.02, rngs=rngs)
    self.t2 = Dense(d, d, use_bias=True, dtype=dtype, init_std=0.02, rngs=rngs)
    self.layers = nnx.List([DenoiserLayer(c, dtype, rngs) for _ in range(c.denoiser_layers)])
    self.norm = RMSNorm(d, dtype=dtype)
    self.out = Dense(d, emb_dim, use_bias=True, dtype=dtype, init_std=0.02, rngs=rngs)

  def __call__(self, xt_BxSxE: Array, t_BxS: Array, ctx_BxCxD: Array,
               mask_BxSxC: Array) -> Array:
    temb = jax.nn.silu(self.t2(jax.nn.silu(self.t1(timestep_features(t_BxS)))))
    x = self.inp(xt_BxSxE)
    for layer in self.layers:
      x = layer(x, temb, ctx_BxCxD, mask_BxSxC)
    return self.out(self.norm(x), out_dtype=jnp.float32)


class LCM(nnx.Module):
  """Base-LCM or Two-Tower LCM over sentence embeddings of dimension `emb_dim`."""

  def __init__(self, c: ml_collections.ConfigDict, emb_dim: int, center, scale,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    if c.variant not in ('base', 'two_tower'):
      raise ValueError(f"model.variant={c.variant!r}: expected 'base' or 'two_tower'")
    self.variant, self.emb_dim, self.dtype = c.variant, emb_dim, dtype
    d = c.d_model
    # The normalizer: frozen (stop_gradient), saved with the model.
    self.center = nnx.Param(jnp.asarray(center, jnp.float32).reshape(emb_dim))
    self.scale = nnx.Param(jnp.asarray(scale, jnp.float32).reshape(emb_dim))
    self.start = nnx.Param(jnp.zeros((emb_dim,), jnp.float32))  # the bos input, learned
    self.prenet = Dense(emb_dim, d, use_bias=True, dtype=dtype, rngs=rngs)
    self.body = Transformer(c.num_layers, d, c.num_heads, c.num_heads, c.head_dim, c.mlp_dim,
                            rope_base=c.rope_base, dtype=dtype, remat=c.remat,
                            attention_impl=layers.AttentionConfig.from_model_config(c),
                            scan_layers=c.get('scan_layers', False), rngs=rngs)
    if c.variant == 'base':
      self.postnet = Dense(d, emb_dim, use_bias=True, dtype=dtype, init_std=0.02, rngs=rngs)
      self.denoiser = None
    else:
      self.postnet = None
      self.denoiser = Denoiser(c, emb_dim, dtype, rngs)

  def normalize(self, e: Array) -> Array:
    center, scale = (jax.lax.stop_gradient(p[...]) for p in (self.center, self.scale))
    return (e.astype(jnp.float32) - center) / scale

  def denormalize(self, x: Array) -> Array:
    center, scale = (jax.lax.stop_gradient(p[...]) for p in (self.center, self.scale))
    return x.astype(jnp.float32) * scale + center

  def context(self, input_emb_BxSxE: Array, inputs_BxS: Array, positions_BxS: Array,
              segment_ids_BxS: Array) -> Array:
    """Causal hidden states h [B, S, d]: h_j has read inputs 0..j of its document."""
    x = self.normalize(input_emb_BxSxE)
    x = jnp.where((inputs_BxS == BOS_ID)[..., None], self.start[...], x)
    h, _ = self.body(self.prenet(x), positions_BxS, segment_ids_BxS)
    return h

  def predict_base(self, h_BxSxD: Array) -> Array:
    """Base-LCM: the normalized next-sentence prediction at every position."""
    return self.postnet(h_BxSxD, out_dtype=jnp.float32)


def context_mask(segment_ids_BxS: Array, drop_BxS: Array | None = None) -> Array:
  """Cross-attention mask [B, S, S+1] of the shifted context [0, h_0 .. h_{S-1}]: query j sees
  the zero vector and h_k for k <= j of its own segment (only the zero vector where dropped)."""
  s = segment_ids_BxS.shape[1]
  j = jnp.arange(s)[:, None]
  k = jnp.arange(s)[None, :]
  same = (segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]) & (
      segment_ids_BxS[:, :, None] > 0)
  seen = same & (k <= j)[None]
  if drop_BxS is not None:
    seen = seen & ~drop_BxS[..., None]
  zero = jnp.ones(seen.shape[:2] + (1,), bool)
  return jnp.concatenate([zero, seen], axis=-1)


def shifted_context(h_BxSxD: Array) -> Array:
  return jnp.concatenate([jnp.zeros_like(h_BxSxD[:, :1]), h_BxSxD], axis=1)


def loss(model: LCM, batch: dict, rng: Array, cfg_model) -> tuple[Array, dict]:
  """Mean over targets of the channel-summed squared error in normalized space.

  Metric sums: nll_sum (= that error summed) and n_tokens (targets), so the trainer's 'loss'
  is the mean error and its progress line counts sentences/s (no bits per byte here)."""
  w = batch['weights']
  x0 = model.normalize(batch['target_emb'])
  h = model.context(batch['input_emb'], batch['inputs'], batch['positions'],
                    batch['segment_ids'])
  if model.variant == 'base':
    pred = model.predict_base(h)
  else:
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    abar = jnp.asarray(alpha_bars(cfg_model), jnp.float32)
    t = jax.random.randint(k_t, w.shape, 0, abar.shape[0])
    a = abar[t][..., None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * jax.random.normal(k_eps, x0.shape)
    drop = jax.random.bernoulli(k_drop, cfg_model.cfg_dropout, w.shape)
    pred = model.denoiser(xt, t, shifted_context(h), context_mask(batch['segment_ids'], drop))
  err = jnp.sum(jnp.square(pred - x0), axis=-1)
  n = jnp.sum(w)
  total = jnp.sum(err * w)
  sums = {'nll_sum': total, 'n_tokens': n}
  return total / jnp.maximum(n, 1.0), sums


def ddim_sample(model: LCM, h_BxSxD: Array, segment_ids_BxS: Array, key: Array, cfg_model, *,
                steps: int, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                initial_noise_scale: float = 1.0) -> Array:
  """Two-Tower: normalized x0 predictions at every position, by DDIM from noise.

  Guidance (scale w != 1) mixes conditional and unconditional (zero vector only) predictions
  in epsilon space, eps = eps_u + w (eps_c - eps_u), rescaled toward the conditional's
  per-vector standard deviation: eps *= phi * std(eps_c) / std(eps) + (1 - phi)."""
  abar_np = alpha_bars(cfg_model)
  n = len(abar_np)
  if not 1 <= steps <= n:
    raise ValueError(f'inference steps {steps} not in [1, {n}]')
  ts = (np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1)
  prev = ts - n // steps
  abar_prev = np.where(prev >= 0, abar_np[np.maximum(prev, 0)], 1.0)
  b, s = segment_ids_BxS.shape
  ctx = shifted_context(h_BxSxD)
  mask_c = context_mask(segment_ids_BxS)
  guided = guidance_scale != 1.0
  if guided:
    ctx = jnp.concatenate([ctx, ctx])
    mask_u = jnp.zeros_like(mask_c).at[..., 0].set(True)
    mask = jnp.concatenate([mask_c, mask_u])
  else:
    mask = mask_c
  x = initial_noise_scale * jax.random.normal(key, (b, s, model.emb_dim), jnp.float32)

  def body(carry, inp):
    x, _ = carry
    t, a_t, a_p = inp
    xin = jnp.concatenate([x, x]) if guided else x
    tt = jnp.full(xin.shape[:2], t, jnp.int32)
    x0 = model.denoiser(xin, tt, ctx, mask)
    sq = jnp.sqrt(jnp.maximum(1 - a_t, 1e-12))
    if guided:
      x0c, x0u = x0[:b], x0[b:]
      ec = (x - jnp.sqrt(a_t) * x0c) / sq
      eu = (x - jnp.sqrt(a_t) * x0u) / sq
      eg = eu + guidance_scale * (ec - eu)
      f = (guidance_rescale * jnp.std(ec, axis=-1, keepdims=True)
           / jnp.maximum(jnp.std(eg, axis=-1, keepdims=True), 1e-12) + (1 - guidance_rescale))
      eg = eg * f
      x0g = (x - sq * eg) / jnp.sqrt(jnp.maximum(a_t, 1e-12))
      pure_noise = a_t < 1e-8  # abar = 0: epsilon says nothing about x0; take the conditional
      x0 = jnp.where(pure_noise, x0c, x0g)
      eps = jnp.where(pure_noise, ec, eg)
    else:
      eps = (x - jnp.sqrt(a_t) * x0) / sq
    x_prev = jnp.sqrt(a_p) * x0 + jnp.sqrt(1 - a_p) * eps
    return (x_prev, x0), None

  inputs = (jnp.asarray(ts, jnp.int32), jnp.asarray(abar_np[ts], jnp.float32),
            jnp.asarray(abar_prev, jnp.float32))
  (_, x0), _ = jax.lax.scan(body, (x, x), inputs)
  return x0


def predict(model: LCM, batch: dict, key: Array, cfg_model, cfg_lcm,
            temperature: float = 0.0) -> Array:
  """Raw-space next-sentence predictions [B, S, E] at every position of a batch (teacher-forced
  context). Base-LCM adds N(0, temperature^2) noise in normalized space (0: deterministic)."""
  h = model.context(batch['input_emb'], batch['inputs'], batch['positions'],
                    batch['segment_ids'])
  if model.variant == 'base':
    x = model.predict_base(h)
    if temperature > 0:
      x = x + temperature * jax.random.normal(key, x.shape)
  else:
    x = ddim_sample(model, h, batch['segment_ids'], key, cfg_model,
                    steps=cfg_lcm.inference_steps, guidance_scale=cfg_lcm.guidance_scale,
                    guidance_rescale=cfg_lcm.guidance_rescale,
                    initial_noise_scale=cfg_lcm.initial_noise_scale)
  return model.denormalize(x)


def flops_per_sentence(c, emb_dim: int, seq_len: int) -> float:
  """Training FLOPs per sentence position: 6 x matmul parameters + causal attention."""
  d, hk = c.d_model, c.num_heads * c.head_dim
  body = c.num_layers * (4 * d * hk + 3 * d * c.mlp_dim) + 2 * emb_dim * d
  attn = c.num_layers * 6 * seq_len * hk  # 12 L S d, halved for causal
  if c.variant == 'two_tower':
    body += c.denoiser_layers * (9 * d * d + 2 * d * d + 4 * d * hk + 3 * d * c.mlp_dim)
    body += 256 * d + d * d
    attn += c.denoiser_layers * 6 * seq_len * hk
  return 6.0 * body + attn
