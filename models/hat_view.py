"""HAT (models/hat.py) as a byte-level view (`models.byte_level.ByteLM`): `HATView` steps the
model one byte at a time with its three KV caches; `HATBoundaryView` sums over the word-boundary
tokens of a HAT that has them; `HATLearnedView` decides learned boundaries byte by byte.
`byte_view` picks the one the model needs.

Where every boundary is decided by the time its byte arrives (learned chunking; a byte-level
splitter such as entropy patches), a whole text's next-byte distributions are those of the
training forward over the text, so `distributions` runs that one jitted forward instead of
stepping (`HATView.distributions_and_starts`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import hat_data
from models import hat
from models.byte_level.interface import BYTE_OFFSET, ByteLM, bucket, normalize


@dataclasses.dataclass
class _HATState:
  ids: list
  size: int
  h_all: Any
  enc_c: Any
  bb_c: Any
  dec_c: Any
  contexts: list
  starts_done: list
  word_starts: list
  logits: Any
  unit_p: list = dataclasses.field(default_factory=list)  # learned chunking: P of each unit


# the fewest ids a one-pass forward is padded to (then powers of two: `bucket`)
FORWARD_MIN = 64


class HATView(ByteLM):
  """A HAT model (models/hat.py) one byte at a time, with its three KV caches: the same
  computation as `hat.generate` on the host path (words finished when the splitter says a new
  one began, the decoder re-reading the bytes of a word whose start was decided late). Next
  byte = softmax over the byte ids and eos, renormalized (pad, bos and padding ids dropped).
  `score` runs these steps byte by byte, so it is the generation-time probability; the
  training-time forward over a whole text differs only where a word start is decided late.

  `distributions` (and so `loglikelihoods`, next-word accuracy, held-out scoring) runs that
  training forward once over the whole text instead, where no start can be decided late: with
  a byte-level splitter (`splitter.byte_level`: entropy patches, whose H(i) reads bytes < i;
  spacebyte, fixed:N, ascii_whitespace), the causal byte encoder and no boundary tokens. The
  text's word starts are computed once (entropy patches: one patcher call over the text),
  the row is padded to a power of two of at least `FORWARD_MIN` ids (`bucket`: few programs
  compile) with one word slot per position, so words never outnumber slots. Texts of more than
  `max_forward` ids (bos included; one forward's memory grows with its length: T x Lw pooled
  slots, the backbone attending over T slots), and the other splitters (whitespace, unicode:
  a start may be decided after its byte) step byte by byte as `score` does."""

  def __init__(self, model, splitter, max_word_bytes: int = 16, name: str = 'hat',
               bos_id: int = 1, eos_id: int = 2, max_forward: int = 4096):
    if splitter is not None and not 0 < splitter.word_cap <= max_word_bytes:
      raise ValueError(f'{splitter!r}: a word cap in [1, max_word_bytes={max_word_bytes}] is '
                       f'needed (every word must fit the pooling width)')
    self.model, self.splitter, self.lw, self.name = model, splitter, max_word_bytes, name
    self.bos_id, self.eos_id, self.max_forward = bos_id, eos_id, int(max_forward)
    graphdef, self.params = nnx.split(model)
    ones = lambda: jnp.ones((1, 1), jnp.int32)

    @jax.jit
    def enc_step(params, x, t, cache):
      m = nnx.merge(graphdef, params)
      return m.encode(jnp.reshape(x, (1, 1)), jnp.full((1, 1), t, jnp.int32), ones(), cache, t)

    @jax.jit
    def word_step(params, h_all, ids, gather, j, cache):
      m = nnx.merge(graphdef, params)
      return m.backbone(m.pool_finished(h_all, ids, gather), jnp.full((1, 1), j, jnp.int32),
                        ones(), cache, j)

    @jax.jit
    def dec_step(params, h, x, t, ctx, cache):
      m = nnx.merge(graphdef, params)
      logits, cache = m.decode(m.decoder_input(jnp.reshape(x, (1, 1)), h),
                               jnp.full((1, 1), t, jnp.int32), ones(), ctx,
                               jnp.zeros((1, 1), jnp.int32), cache, t)
      return logits[0, 0], cache

    @jax.jit
    def forward(params, batch):
      return nnx.merge(graphdef, params)(batch)[0]

    self._enc, self._word, self._dec, self._forward = enc_step, word_step, dec_step, forward
    self._take = np.concatenate([np.arange(BYTE_OFFSET, 256 + BYTE_OFFSET), [eos_id]])

  def _one_pass(self, ids: list[int]) -> tuple[np.ndarray, list[int]] | None:
    """(fp32 logits [len(ids), V], word starts) of the training forward over `ids`, or None
    where the view steps byte by byte (see the class doc)."""
    if (self.splitter is None or not self.splitter.byte_level or self.model.word_encoder
        or len(ids) > self.max_forward):
      return None
    starts = self._starts(ids)
    batch = hat.single_row_batch(ids, starts, self.lw, bucket(len(ids), FORWARD_MIN))
    return np.asarray(self._forward(self.params, batch))[:len(ids)], starts

  def distributions_and_starts(self, text: bytes) -> tuple[np.ndarray, list[int] | None]:
    """(`distributions(text)`, the word starts the model used over [bos] + text: offsets in
    its stream, None for a view whose states do not say). One forward where `_one_pass`
    holds the text, else byte by byte (the starts of the last state)."""
    text = bytes(text)
    ids = [self.bos_id] + [b + BYTE_OFFSET for b in text]
    out = self._one_pass(ids)
    if out is None:
      st = self.start(b'')
      rows = [self.next_byte_logprobs(st)]
      for b in text:
        st = self.advance(st, b)
        rows.append(self.next_byte_logprobs(st))
      starts = getattr(st, 'word_starts', None)
      return np.stack(rows), None if starts is None else list(starts)
    logits, starts = out
    lp = logits.astype(np.float64)[:, self._take]
    lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    return lp.astype(np.float32), [int(s) for s in starts]

  def distributions(self, text: bytes) -> np.ndarray:
    """See `ByteLM.distributions`; one training forward where the class doc says so."""
    return self.distributions_and_starts(text)[0]

  def _starts(self, ids) -> list[int]:
    """Word starts of the id sequence (the model's words)."""
    return list(hat.host_word_starts(self.splitter, self.lw, ids))

  def _new(self, size: int) -> _HATState:
    m = self.model
    de = m.encoder.final_norm.scale.shape[0]
    first = m.first_word[...].astype(m.dtype).reshape(1, 1, -1)
    enc_c = None if m.word_encoder else m.encoder.init_cache(1, size)
    return _HATState([], size, jnp.zeros((1, size, de), m.dtype), enc_c,
                     m.backbone.init_cache(1, size), m.decoder.init_cache(1, size), [first], [],
                     [0], None)

  def _room(self, st: _HATState) -> _HATState:
    """`st`, or when its caches are full, a state with caches twice as big (the ids replayed)."""
    if len(st.ids) + 1 > st.size:
      ids = st.ids
      st = self._new(bucket(len(ids) + 1, 2 * st.size))
      for y in ids:
        st = self._push(st, y)
    return st

  def _push(self, st: _HATState, x: int) -> _HATState:
    """One more id through the encoder, the word split, the backbone and the decoder."""
    st = self._room(st)
    t = len(st.ids)
    st.ids.append(int(x))
    if not self.model.word_encoder:  # (the intra-word encoder runs when a word is complete)
      h, st.enc_c = self._enc(self.params, jnp.int32(x), jnp.int32(t), st.enc_c)
      st.h_all = jax.lax.dynamic_update_slice_in_dim(st.h_all, h, jnp.int32(t), axis=1)
    starts = self._starts(st.ids)
    if starts[:len(st.starts_done)] != st.starts_done:
      raise RuntimeError(f'word splitter is not causal: {st.starts_done[-5:]} changed')
    rerun = t
    while len(st.starts_done) < len(starts) - 1:  # feed every finished word to the backbone
      j = len(st.starts_done)
      a, b = starts[j], starts[j + 1]
      gather = np.full((1, 1, self.lw), -1, np.int32)
      gather[0, 0, :b - a] = np.arange(a, b)
      ids_1xS = np.zeros((1, st.size), np.int32)
      ids_1xS[0, :len(st.ids)] = st.ids
      out, st.bb_c = self._word(self.params, st.h_all, jnp.asarray(ids_1xS), jnp.asarray(gather),
                                jnp.int32(j), st.bb_c)
      st.contexts.append(out)
      st.starts_done.append(a)
      rerun = min(rerun, b)
    st.word_starts = starts
    for q in range(rerun, t + 1):  # bytes of the current word read the current context
      j = int(np.searchsorted(starts, q, side='right') - 1)
      h_q = jax.lax.dynamic_slice_in_dim(st.h_all, jnp.int32(q), 1, axis=1)
      st.logits, st.dec_c = self._dec(self.params, h_q, jnp.int32(st.ids[q]), jnp.int32(q),
                                      st.contexts[j], st.dec_c)
    return st

  def start(self, prompt: bytes = b'') -> _HATState:
    prompt = bytes(prompt)
    st = self._new(bucket(len(prompt) + 2, 64))
    for x in [self.bos_id] + [b + BYTE_OFFSET for b in prompt]:
      st = self._push(st, x)
    return st

  def next_byte_logprobs(self, state: _HATState) -> np.ndarray:
    lp = np.asarray(state.logits).astype(np.float64)[self._take]
    return normalize(lp).astype(np.float32)

  def advance(self, state: _HATState, byte: int) -> _HATState:
    return self._push(state, int(byte) + BYTE_OFFSET)


@dataclasses.dataclass
class _BoundaryState:
  hat: _HATState     # the model's stream: bytes and the boundary tokens before words
  cursor: Any        # the text splitter after the text's bytes
  branch: Any = None  # `hat` with a boundary token pushed (computed when needed)
  new_word: Any = None  # bool [256]: would byte b start a word (after a boundary token)?


class HATBoundaryView(HATView):
  """A HAT with word-boundary tokens (`model.pooling='boundary'`) one text byte at a time. The
  model's stream has a boundary token B before every word the text splitter starts (data/
  hat_data.BoundaryByteEncoder; the splitter decides at the word's first byte), so a text's
  stream is known byte by byte, and the probability of the next byte b is that of its stream:
      p(b | x) = P(B | s) P(b | s B)   if b starts a word after x,     P(b | s) otherwise,
      p(end | x) = P(eos | s)          (s: the stream of x; no boundary before eos)
  renormalized over the 257 outcomes (mass on streams no text produces is dropped: the
  probability of a text is that of its stream, divided along the way by the mass kept). The
  branch s B costs one more encoder / backbone / decoder step per byte; advancing by a byte
  that starts a word reuses it."""

  def __init__(self, model, splitter, max_word_bytes: int = 16, name: str = 'hat',
               bos_id: int = 1, eos_id: int = 2):
    super().__init__(model, splitter, max_word_bytes + 1, name, bos_id, eos_id)
    self.boundary = int(model.boundary_id)
    self.words = hat_data.BoundaryWords(self.boundary, splitter.word_cap)
    self._new_word_cache: dict = {}
    if not splitter.byte_level:
      raise ValueError(f'{splitter!r}: a HAT with word-boundary tokens needs a splitter that '
                       "decides at a word's first byte")

  def _starts(self, ids) -> list[int]:
    return self.words.host_starts(ids)

  def _one_pass(self, ids):
    """None: a text's probability sums over its streams, byte by byte."""
    del ids
    return None

  @staticmethod
  def _copy(st: _HATState) -> _HATState:
    return dataclasses.replace(st, ids=list(st.ids), contexts=list(st.contexts),
                               starts_done=list(st.starts_done),
                               word_starts=list(st.word_starts))

  def start(self, prompt: bytes = b'') -> _BoundaryState:
    prompt = bytes(prompt)
    st = self._new(bucket(2 * len(prompt) + 2, 64))
    cursor = self.splitter.cursor()
    st = self._push(st, self.bos_id)
    for b in prompt:
      if cursor.push(bytes([b])):
        st = self._push(st, self.boundary)
      st = self._push(st, b + BYTE_OFFSET)
    return _BoundaryState(st, cursor)

  def _prepare(self, state: _BoundaryState):
    if state.new_word is None:
      c = state.cursor
      key = (tuple(getattr(c._rule, k) for k in c._rule.__slots__), c._piece)  # pylint: disable=protected-access
      hit = self._new_word_cache.get(key)
      if hit is None:  # a byte-level rule's decision depends on this small state only
        hit = np.array([c.copy().push(bytes([b])) for b in range(256)])
        self._new_word_cache[key] = hit
      state.new_word = hit
    if state.branch is None and state.new_word.any():
      state.branch = self._push(self._copy(state.hat), self.boundary)

  def outcome_logprobs(self, state: _BoundaryState) -> np.ndarray:
    """float64 [257] log-probabilities of the next byte's stream (boundary included where the
    byte starts a word) and of the end, before renormalization over the 257 outcomes."""
    self._prepare(state)
    lp = np.asarray(jax.nn.log_softmax(state.hat.logits.astype(jnp.float32)), np.float64)
    out = np.concatenate([lp[BYTE_OFFSET:256 + BYTE_OFFSET], [lp[self.eos_id]]])
    if state.branch is not None:
      after = np.asarray(jax.nn.log_softmax(state.branch.logits.astype(jnp.float32)), np.float64)
      via = lp[self.boundary] + after[BYTE_OFFSET:256 + BYTE_OFFSET]
      out[:256] = np.where(state.new_word, via, out[:256])
    return out

  def next_byte_logprobs(self, state: _BoundaryState) -> np.ndarray:
    return normalize(self.outcome_logprobs(state)).astype(np.float32)

  def advance(self, state: _BoundaryState, byte: int) -> _BoundaryState:
    self._prepare(state)
    b = int(byte)
    st = state.branch if state.new_word[b] else state.hat
    state.cursor.push(bytes([b]))
    return _BoundaryState(self._push(st, b + BYTE_OFFSET), state.cursor)


class HATLearnedView(HATView):
  """A HAT with learned chunking (`model.chunking='learned'`) one byte at a time: the router
  decides each byte's boundary as it arrives (from its encoder state and the previous
  byte's), as `hat.generate` does; at a boundary the finished unit (its last
  `model.max_unit_bytes` bytes, as in training) goes through the backbone and the smoothing,
  and the byte is decoded with the new context. No splitter is read. Equals the training-time
  forward of the whole text as long as the text's units fit the training rows' `max_units`.

  `distributions` is that forward (`HAT.chunked`) over the whole text at once, with one unit
  slot per position (no unit is ever merged for want of slots), padded as `HATView`'s; texts
  of more than `max_forward` ids step byte by byte."""

  def __init__(self, model, splitter=None, max_word_bytes: int = 16, name: str = 'hat',
               bos_id: int = 1, eos_id: int = 2, max_forward: int = 4096):
    del max_word_bytes  # the units are pooled from the model's max_unit_bytes, as in training
    super().__init__(model, None, model.max_unit_bytes, name, bos_id, eos_id, max_forward)
    graphdef, _ = nnx.split(model)

    @jax.jit
    def forward(params, batch):
      out = nnx.merge(graphdef, params).chunked(batch, max_units=batch['inputs'].shape[1])
      return out['logits'][0], out['b'][0]

    self._forward = forward

    @jax.jit
    def route_step(params, h, h_prev):
      m = nnx.merge(graphdef, params)
      return m.route(h, h_prev, jnp.zeros((1, 1), bool))[0, 0]

    @jax.jit
    def unit_step(params, h_all, gather, j, cache, p_unit, ctx_prev):
      out, cache = word_step(params, h_all, gather, j, cache)
      p_unit = p_unit.astype(out.dtype)
      return p_unit * out + (1 - p_unit) * ctx_prev, cache

    @jax.jit
    def word_step(params, h_all, gather, j, cache):
      m = nnx.merge(graphdef, params)
      return m.backbone(m.pool(h_all, gather), jnp.full((1, 1), j, jnp.int32),
                        jnp.ones((1, 1), jnp.int32), cache, j)

    self._route, self._unit = route_step, unit_step

  def _one_pass(self, ids: list[int]) -> tuple[np.ndarray, list[int]] | None:
    if len(ids) > self.max_forward:
      return None
    logits, b = self._forward(self.params,
                              hat.learned_row_batch(ids, bucket(len(ids), FORWARD_MIN)))
    return np.asarray(logits)[:len(ids)], np.flatnonzero(np.asarray(b)[:len(ids)]).tolist()

  def _push(self, st: _HATState, x: int) -> _HATState:
    st = self._room(st)
    t = len(st.ids)
    st.ids.append(int(x))
    h, st.enc_c = self._enc(self.params, jnp.int32(x), jnp.int32(t), st.enc_c)
    st.h_all = jax.lax.dynamic_update_slice_in_dim(st.h_all, h, jnp.int32(t), axis=1)
    if t == 0:  # a document's first byte starts its first unit (P = 1)
      st.word_starts, st.unit_p = [0], [1.0]
    else:
      h_prev = jax.lax.dynamic_slice_in_dim(st.h_all, jnp.int32(t - 1), 1, axis=1)
      p_t = float(self._route(self.params, h, h_prev))
      if p_t >= 0.5:  # the unit [a, t) is finished: through the backbone and the smoothing
        j, a = len(st.starts_done), st.word_starts[-1]
        first = max(a, t - self.lw)
        gather = np.full((1, 1, self.lw), -1, np.int32)
        gather[0, 0, :t - first] = np.arange(first, t)
        ctx, st.bb_c = self._unit(self.params, st.h_all, jnp.asarray(gather), jnp.int32(j),
                                  st.bb_c, jnp.float32(st.unit_p[-1]), st.contexts[-1])
        st.contexts.append(ctx)
        st.starts_done.append(a)
        st.word_starts = st.word_starts + [t]
        st.unit_p = st.unit_p + [p_t]
    st.logits, st.dec_c = self._dec(self.params, h, jnp.int32(x), jnp.int32(t),
                                    st.contexts[-1], st.dec_c)
    return st


def byte_view(model: hat.HAT, splitter, max_word_bytes: int = 16, name: str | None = None
              ) -> HATView:
  """The byte-level view of a HAT with its word `splitter` (words.get_splitter): with
  word-boundary tokens (`model.boundary_id`) a `HATBoundaryView`, which sums over them; with
  learned chunking a `HATLearnedView` (the splitter is not read); else a `HATView`."""
  if model.learned:
    return HATLearnedView(model, None, max_word_bytes, name or 'hat')
  view = HATView if model.boundary_id is None else HATBoundaryView
  return view(model, splitter, max_word_bytes, name or 'hat')
