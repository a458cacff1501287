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


class LMEntropy(words.EntropySource):
  """Next-byte entropies of a trained TokenLM over ByteEncoder ids."""

  def __init__(self, model: token_lm.TokenLM, bucket: int = 64):
    self.graphdef, self.params = nnx.split(model)
    self.vocab_size = int(model.vocab_size)
    self.bucket = int(bucket)
    self.fingerprint = params_fingerprint(self.params)
    graphdef = self.graphdef

    @jax.jit
    def batch_entropies(params, ids_BxT, seg_BxT):
      m = nnx.merge(graphdef, params)
      t = ids_BxT.shape[1]
      col = jnp.arange(t, dtype=jnp.int32)
      new = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool),
                             seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
      pos = col - jax.lax.cummax(jnp.where(new, col, 0), axis=1)  # from 0 in each piece
      logits, _ = m(ids_BxT, pos, seg_BxT)
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
    size = -(-t // self.bucket) * self.bucket
    pad = ((0, 0), (0, size - t))
    out = self._batch(self.params, jnp.asarray(np.pad(ids, pad)), jnp.asarray(np.pad(seg, pad)))
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
