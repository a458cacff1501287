"""A byte LM (models/token_lm.TokenLM over ByteEncoder ids) as the entropy model of BLT-style
patches (data/words.EntropySplitter): batched next-byte entropies for the data pipeline (one
jitted call per batch, rows padded to a multiple of `bucket` ids so few shapes compile), and a
KV-cached step for generation, run beside the HAT inside its jitted loop (models/hat.generate).
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import words
from models import token_lm

Array = jax.Array


def entropy(logits_xV: Array) -> Array:
  """Entropy in nats of softmax(logits) over the last axis (fp32)."""
  lp = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(lp) * lp, axis=-1)


def params_fingerprint(params) -> str:
  """sha256 (16 hex digits) of the parameter arrays, in tree order with their paths."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.dtype, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def windowed(model: token_lm.TokenLM, cfg_model, context: int
             ) -> tuple[token_lm.TokenLM, int]:
  """(`model` (built from `cfg_model`) reading at most `context` ids back, the window):
  sliding-window attention (min with its own window) over the context it was trained on,
  whatever the length of the text (RoPE makes attention depend on relative positions only).
  Same weights."""
  cfg = cfg_model.copy_and_resolve_references()
  w = int(cfg.get('window', 0))
  cfg.window = min(w, context) if w > 0 else int(context)
  abstract = nnx.eval_shape(lambda: token_lm.TokenLM(cfg, model.vocab_size, model.dtype,
                                                     rngs=nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(abstract), nnx.state(model)), cfg.window


class LMEntropy(words.EntropySource):
  """Next-byte entropies of a trained TokenLM over ByteEncoder ids. With `window` (its
  sliding-window attention, `windowed`) rows longer than `chunk` ids are computed in pieces
  that overlap by `num_layers * window` ids (its receptive field), so memory stays bounded."""

  def __init__(self, model: token_lm.TokenLM, bucket: int = 64, window: int = 0,
               num_layers: int = 0, chunk: int = 2048):
    self.graphdef, self.params = nnx.split(model)
    self.vocab_size = int(model.vocab_size)
    self.bucket = int(bucket)
    self.overlap = int(window) * int(num_layers)
    self.chunk = max(int(chunk), 2 * self.overlap)
    self.fingerprint = params_fingerprint(self.params)
    graphdef = self.graphdef

    @jax.jit
    def batch_entropies(params, ids_BxT, pos_BxT, seg_BxT):
      m = nnx.merge(graphdef, params)
      new = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool),
                             seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
      logits, _ = m(ids_BxT, pos_BxT, seg_BxT)
      h = entropy(logits)  # [B, T]: of the id after each position
      h = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
      same = (seg_BxT > 0) & ~new
      return jnp.where(same, h, 0.0)

    self._batch = batch_entropies

  def entropies(self, ids_BxT, segment_ids_BxT) -> np.ndarray:
    ids = np.asarray(ids_BxT, np.int32)
    seg = np.asarray(segment_ids_BxT, np.int32)
    b, t = ids.shape
    if t == 0:
      return np.zeros((b, 0), np.float32)
    col = np.arange(t, dtype=np.int32)
    new = np.ones((b, t), bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pos = col - np.maximum.accumulate(np.where(new, col, 0), axis=1)  # from 0 in each piece
    if self.overlap and t > self.chunk:  # pieces [a, a + step) read from a - overlap on
      step = self.chunk - self.overlap
      out = np.zeros((b, t), np.float32)
      for a in range(0, t, step):
        lo = max(a - self.overlap, 0)
        sl = slice(lo, a + step)
        part = self._entropies(ids[:, sl], pos[:, sl], seg[:, sl])
        out[:, a:a + step] = part[:, a - lo:]  # (ids before a read their full context)
      return out
    return self._entropies(ids, pos, seg)

  def _entropies(self, ids, pos, seg) -> np.ndarray:
    t = ids.shape[1]
    size = -(-t // self.bucket) * self.bucket
    pad = ((0, 0), (0, size - t))
    out = self._batch(self.params, *(jnp.asarray(np.pad(x, pad)) for x in (ids, pos, seg)))
    return np.asarray(out, np.float32)[:, :t]

  def device_args(self):
    return self.params

  def device_init(self, args, prompt_1xP, size: int):
    m = nnx.merge(self.graphdef, args)
    p = prompt_1xP.shape[1]
    cache = m.init_cache(1, size)
    logits, cache = m(prompt_1xP, jnp.arange(p, dtype=jnp.int32)[None],
                      jnp.ones((1, p), jnp.int32), cache, 0)
    h_P = entropy(logits[0])  # h_P[j]: entropy of id j + 1
    return cache, h_P[p - 1], h_P[p - 2] if p >= 2 else jnp.float32(0.0)

  def device_push(self, args, state, x, t):
    m = nnx.merge(self.graphdef, args)
    cache, h_t, _ = state
    at = lambda v: jnp.reshape(v, (1, 1)).astype(jnp.int32)
    logits, cache = m(at(x), at(t), jnp.ones((1, 1), jnp.int32), cache, t)
    return cache, entropy(logits[0, 0]), h_t
