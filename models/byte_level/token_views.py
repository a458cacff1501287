"""Token-level LMs as the byte-level views call them (`TokenFn`: a jitted cached forward), and the
view of a byte-native token LM (`ByteTokenLM`); token-level decoding on the same forward
(`token_generate`: the baselines byte-level sampling is compared with).

*Byte-native token LMs* (TokenLM over `ByteEncoder` ids: pad 0, bos 1, eos 2, byte b -> b + 3):
the model's next-id softmax restricted to the 256 byte ids and eos, renormalized. The mass on
pad, bos and the padding ids past 259 is dropped (they are not text). A document starts after
bos; end of text is eos. A lexinvariant LM over bytes is the same view of a `TokenFn` with one
random embedding drawn for the view (kept for every text it scores).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from models.byte_level.interface import (BYTE_OFFSET, END, ByteLM, bucket, continuation_score,
                                         ladder, normalize, pick)


# -- token-level models as the views call them -----------------------------------------------
def _scanned_layers(model) -> int:
  """The number of layers of a token LM whose stack is scanned (`model.scan_layers`: its KV
  cache is one dict of [layers, ...] arrays), else 0. The views keep per-layer caches (a list
  of dicts, batch on axis 0 and slots on axis 1) either way."""
  t = getattr(model, 'transformer', None)
  return int(t.num_layers) if getattr(t, 'scan_layers', False) else 0


def _per_layer(cache, n: int) -> list:
  return [jax.tree.map(lambda x, i=i: x[i], cache) for i in range(n)]


def _apply(graphdef, params, draw, ids, positions, segment_ids, cache, index):
  m = nnx.merge(graphdef, params)
  n_scanned = _scanned_layers(m)
  if n_scanned:  # the views' per-layer caches, stacked for the scanned stack and back
    cache = jax.tree.map(lambda *xs: jnp.stack(xs), *cache)
  if draw is None:
    logits, cache = m(ids, positions, segment_ids, cache=cache, cache_index=index)
  else:  # one random embedding for every row
    logits, cache = m(ids, m.repeat_draw(draw, ids.shape[0]), positions, segment_ids,
                      cache=cache, cache_index=index)
  if n_scanned:
    cache = _per_layer(cache, n_scanned)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=6)
def _forward(graphdef, params, draw, ids, positions, segment_ids, cache, index):
  return _apply(graphdef, params, draw, ids, positions, segment_ids, cache, index)


@functools.partial(jax.jit, static_argnums=0)
def _forward_tree(graphdef, params, draw, trunk_cache, prefix_visible_BxTxS, own_visible_BxTxT,
                  ids, positions):
  cache = [layers.shared_prefix_cache(c, prefix_visible_BxTxS, own_visible_BxTxT)
           for c in trunk_cache]
  return _apply(graphdef, params, draw, ids, positions, jnp.ones_like(ids), cache, 0)[0]


class TokenFn:
  """A token-level LM as the views call it: a jitted cached forward giving fp32 log-softmax over
  the model's whole vocabulary. Views of models with one structure share the compiled code.

  model: called as `model(ids, positions, segment_ids, cache=, cache_index=)` (a TokenLM), or,
  with `draw` (a random embedding for one row, kept for every call), as `model(ids, draw,
  positions, ...)` with `model.repeat_draw(draw, rows)` giving it for a batch of rows (a
  lexinvariant LM, models/lexinvariant.py). Both have `vocab_size` and `init_cache`."""

  def __init__(self, model, draw: dict | None = None):
    self.graphdef, self.params = nnx.split(model)
    self.draw = draw
    self.vocab_size = int(model.vocab_size)
    self._model = model

  def init_cache(self, batch: int, size: int) -> list:
    """Empty per-layer KV caches (also for a scanned stack: see `_scanned_layers`)."""
    cache = self._model.init_cache(batch, size)
    n = _scanned_layers(self._model)
    return _per_layer(cache, n) if n else cache

  def __call__(self, ids, positions, cache, index: int):
    """ids/positions int [B, T] written at slots index..; returns (host float32 [B, T, V] log
    probs, the new cache; the old one is donated)."""
    ids = jnp.asarray(ids, jnp.int32)
    lp, cache = _forward(self.graphdef, self.params, self.draw, ids,
                         jnp.asarray(positions, jnp.int32), jnp.ones_like(ids), cache,
                         jnp.int32(index))
    return np.asarray(lp), cache

  def tree(self, trunk_cache, prefix_visible, own_visible, ids, positions):
    """Tokens that continue a one-row cache in a tree: token t of row b sees the cache slots
    where prefix_visible[b, t] is nonzero and the row's tokens u where own_visible[b, t, u] is
    (its ancestors and itself); RoPE positions `positions`. The cache is read in place
    (layers.attend_shared_prefix) and not changed. Returns host fp32 log-probs [B, T, V]."""
    return np.asarray(_forward_tree(
        self.graphdef, self.params, self.draw, trunk_cache, jnp.asarray(prefix_visible, bool),
        jnp.asarray(own_visible, bool), jnp.asarray(ids, jnp.int32),
        jnp.asarray(positions, jnp.int32)))


def grow_cache(cache, size: int):
  """The cache with its slot axis padded to `size` (empty slots: segment 0)."""
  def pad(a):
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, size - a.shape[1])
    return jnp.pad(a, widths)
  return [{k: pad(v) for k, v in c.items()} for c in cache]


# -- byte-native token LMs -----------------------------------------------------------------------
@dataclasses.dataclass
class _ByteState:
  cache: Any
  n: int                # slots used (bos + bytes fed)
  logprobs: np.ndarray  # float32 [257] after the last fed id


class ByteTokenLM(ByteLM):
  """A token LM over ByteEncoder ids (the byte LM; a lexinvariant byte model via `TokenFn` with
  a fixed draw). Next byte = softmax over ids 3..258 (bytes) and 2 (eos), renormalized."""

  def __init__(self, fn: TokenFn, name: str = 'bytes', bos_id: int = 1, eos_id: int = 2,
               chunk: int = 256):
    if fn.vocab_size < 256 + BYTE_OFFSET:
      raise ValueError(f'a byte LM needs at least {256 + BYTE_OFFSET} ids, got {fn.vocab_size}')
    self.fn, self.name, self.bos_id, self.eos_id, self.chunk = fn, name, bos_id, eos_id, chunk
    self._take = np.concatenate([np.arange(BYTE_OFFSET, 256 + BYTE_OFFSET), [eos_id]])

  def _outcomes(self, lp_V) -> np.ndarray:
    return normalize(np.asarray(lp_V, np.float64)[self._take]).astype(np.float32)

  def _feed(self, st: _ByteState, ids: list[int]) -> _ByteState:
    """Feeds ids at slots n.. in chunks of padded length (a few shapes)."""
    for i in range(0, len(ids), self.chunk):
      part = ids[i:i + self.chunk]
      t = ladder(len(part))
      need = st.n + t
      size = st.cache[0]['k'].shape[1]
      if need > size:
        st.cache = grow_cache(st.cache, bucket(need, 128))
      pad = part + [0] * (t - len(part))
      lp, st.cache = self.fn([pad], [list(range(st.n, st.n + t))], st.cache, st.n)
      st.logprobs = self._outcomes(np.asarray(lp[0, len(part) - 1]))
      st.n += len(part)
    return st

  def start(self, prompt: bytes = b'') -> _ByteState:
    st = _ByteState(self.fn.init_cache(1, bucket(len(prompt) + 2, 128)), 0, None)
    return self._feed(st, [self.bos_id] + [b + BYTE_OFFSET for b in bytes(prompt)])

  def next_byte_logprobs(self, state: _ByteState) -> np.ndarray:
    return state.logprobs

  def advance(self, state: _ByteState, byte: int) -> _ByteState:
    return self._feed(state, [int(byte) + BYTE_OFFSET])

  def distributions(self, text: bytes) -> np.ndarray:
    ids = [self.bos_id] + [b + BYTE_OFFSET for b in bytes(text)]
    t = ladder(len(ids), 8)
    cache = self.fn.init_cache(1, t)
    lp, _ = self.fn([ids + [0] * (t - len(ids))], [list(range(t))], cache, 0)
    lp = np.asarray(lp[0, :len(ids)], np.float64)[:, self._take]
    return (lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)).astype(np.float32)

  def loglikelihoods(self, pairs: list[tuple[bytes, bytes]], rows: int = 16
                     ) -> list[tuple[float, bool]]:
    """`ByteLM.loglikelihoods`, batched: the texts sorted by length, `rows` at a time in one
    forward (rows padded to 1, 4 or 16, lengths as `distributions`: a few shapes)."""
    texts = [bytes(c) + bytes(k) for c, k in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(texts[i]))
    out: list = [None] * len(pairs)
    for s in range(0, len(order), rows):
      chunk = order[s:s + rows]
      t = ladder(len(texts[chunk[0]]) + 1, 8)
      b = ladder(len(chunk), 1, base=4)
      ids = np.zeros((b, t), np.int32)
      for r, i in enumerate(chunk):
        ids[r, :len(texts[i]) + 1] = [self.bos_id] + [x + BYTE_OFFSET for x in texts[i]]
      lp, _ = self.fn(ids, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                      self.fn.init_cache(b, t), 0)
      for r, i in enumerate(chunk):
        n, k = len(pairs[i][0]), len(pairs[i][1])
        d = np.asarray(lp[r, n:n + k], np.float64)[:, self._take]
        d = (d - np.logaddexp.reduce(d, axis=1, keepdims=True)).astype(np.float32)
        out[i] = continuation_score(d, pairs[i][1])
    return out

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    text = bytes(text)
    d = self.distributions(text).astype(np.float64)
    out = d[np.arange(len(text)), np.frombuffer(text, np.uint8)]
    return np.concatenate([out, d[-1:, END]]) if end else out


# -- token-level generation on the same model (baselines for byte-level sampling) -------------
def token_generate(fn: TokenFn, ids: list[int], max_new: int, stop_ids=(),
                   first_allowed: np.ndarray | None = None, temperature: float = 0.0,
                   top_p: float = 1.0, rng: np.random.Generator | None = None,
                   done: Callable[[list[int]], bool] | None = None) -> list[int]:
  """Token-level decoding with a KV cache (host loop; greedy at temperature 0, else nucleus
  sampling as `pick`): `ids` is the full context (begin token included); `first_allowed`
  restricts the first new token. Stops after a stop id, or when `done(tokens so far)`."""
  size = bucket(len(ids) + max_new + 1, 128)
  cache = fn.init_cache(1, size)
  t = ladder(len(ids))
  lp, cache = fn([list(ids) + [0] * (t - len(ids))], [list(range(t))], cache, 0)
  lp = np.asarray(lp[0, len(ids) - 1])
  out = []
  for i in range(max_new):
    if i == 0 and first_allowed is not None:
      masked = np.full_like(lp, -np.inf)
      masked[first_allowed] = lp[first_allowed]
      lp = masked
    tok = pick(lp, temperature, top_p, rng)
    out.append(tok)
    if tok in stop_ids or (done is not None and done(out)):
      break
    n = len(ids) + i
    lp, cache = fn([[tok]], [[n]], cache, n)
    lp = np.asarray(lp[0, 0])
  return out
