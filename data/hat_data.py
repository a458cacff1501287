"""Word-level fields for HAT batches: a batch transform over packed byte batches.

Given a packed batch from `data.pipeline` (ByteEncoder ids: pad 0, bos 1, eos 2, byte + 3) and a
word splitter, adds the layout from `data.words.batch_words` (T bytes, at most W words of at
most Lw bytes per row):

  word_ids          int32 [B, T]     word index of each input byte (-1: padding)
  word_gather       int32 [B, W, Lw] positions of each word's bytes in the row (-1: none)
  word_segment_ids  int32 [B, W]     document piece of each word (0: padding word)
  word_positions    int32 [B, W]     index of the word inside its document piece

Bytes of words past the W-th stay as encoder context but get weight 0 (counted in
`stats['dropped_bytes']`): choose `data.max_words` so that this stays rare; the run summary
reports it with the mean bytes per word.
"""
from __future__ import annotations

import threading

import numpy as np

from data import encoders, words


class WordFields:
  """Callable batch transform with thread-safe counters (it runs on the prefetch thread).

  `boundary_id`: the rows hold HAT's word-boundary tokens (`BoundaryByteEncoder`): words start
  at them (and at specials and row starts), and hold up to `max_word_bytes` + 1 tokens."""

  def __init__(self, splitter, max_words: int, max_word_bytes: int,
               boundary_id: int | None = None):
    self.splitter, self.max_words, self.max_word_bytes = splitter, max_words, max_word_bytes
    self.boundary_id = boundary_id
    # gather slots per word: the word's bytes, and its boundary token
    self.word_len = max_word_bytes + (boundary_id is not None)
    self._lock = threading.Lock()
    self.stats = {'words': 0, 'dropped_bytes': 0, 'target_bytes': 0}

  def __getstate__(self):  # pickled into data workers (data/host_workers.py): not the lock
    return {k: v for k, v in self.__dict__.items() if k != '_lock'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _layout(self, inputs, segment_ids, num_words):
    if self.boundary_id is None:
      return words.batch_words(inputs, segment_ids, self.splitter, num_words, self.word_len)
    return words.batch_words(inputs, segment_ids, None, num_words, self.word_len,
                             boundary_id=self.boundary_id)

  def word_starts(self, ids) -> list[int]:
    """Word start offsets of one unpacked sequence of ids (one document, bos/eos included)."""
    ids = np.asarray(ids, np.int32)
    layout = self._layout(ids, np.ones_like(ids), len(ids) or 1)
    return layout['word_start'][:int(layout['num_words'])].tolist()

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lay = self._layout(batch['inputs'], batch['segment_ids'], self.max_words)
    over = lay['byte_word'] >= self.max_words  # bytes of words that did not fit
    weights = np.where(over, 0, batch['weights']).astype(batch['weights'].dtype)
    target_bytes = np.where(over, 0, batch['target_bytes']).astype(np.int32)
    word_ids = np.where(over, -1, lay['byte_word']).astype(np.int32)
    with self._lock:
      self.stats['words'] += int(np.minimum(lay['num_words'], self.max_words).sum())
      self.stats['dropped_bytes'] += int(batch['target_bytes'][over].sum())
      self.stats['target_bytes'] += int(batch['target_bytes'].sum())
    return {**batch, 'weights': weights, 'target_bytes': target_bytes, 'word_ids': word_ids,
            'word_gather': lay['word_gather'], 'word_segment_ids': lay['word_segment_ids'],
            'word_positions': lay['word_positions']}


def check_boundary_id(boundary_id: int, vocab_size: int = encoders.BYTE_VOCAB_SIZE) -> int:
  """`model.boundary_id`, checked: an id the ByteEncoder leaves free, [259, vocab_size)."""
  b = int(boundary_id)
  if 0 <= b < encoders.BYTE_OFFSET:
    raise ValueError(f'model.boundary_id={b} collides with a special token (pad 0, bos 1, eos 2)'
                     f'; pick an id in [{encoders.BYTE_IDS}, {vocab_size})')
  if encoders.BYTE_OFFSET <= b < encoders.BYTE_IDS:
    v = b - encoders.BYTE_OFFSET
    raise ValueError(f'model.boundary_id={b} collides with the byte 0x{v:02x} ({chr(v)!r}): ids '
                     f'{encoders.BYTE_OFFSET}..{encoders.BYTE_IDS - 1} are the bytes 0..255; '
                     f'pick an id in [{encoders.BYTE_IDS}, {vocab_size})')
  if not encoders.BYTE_IDS <= b < vocab_size:
    raise ValueError(f'model.boundary_id={b} is outside the byte vocabulary: pick an id in '
                     f'[{encoders.BYTE_IDS}, {vocab_size})')
  return b


class BoundaryByteEncoder(encoders.ByteEncoder):
  """UTF-8 bytes (ByteEncoder ids) with a word-boundary token before every word of the text
  (Thawani et al. 2023's prefix CLS token, HAT `model.pooling='boundary'`): `encode('ab cd')`
  with the ascii_whitespace splitter is [B a b B ' ' c d]. The boundary stands for no byte
  (`token_bytes` 0, so bits per byte count the text's bytes) and `decode` drops it. The
  splitter must decide a word start at the word's first byte (`splitter.byte_level`), so that
  a text's boundary tokens are known byte by byte (generation, byte-level scoring)."""

  def __init__(self, splitter: words.Splitter, boundary_id: int):
    super().__init__()
    if not splitter.byte_level:
      raise ValueError("model.pooling='boundary' needs a splitter that decides every word start "
                       "at the word's first byte (data.splitter ascii_whitespace, spacebyte or "
                       f'fixed:N), not data.splitter={splitter.name!r} (it may decide a word '
                       'start only after a multi-byte character)')
    self.splitter, self.boundary_id = splitter, check_boundary_id(boundary_id, self.vocab_size)
    self.name = f'bytes+boundary({splitter.name})'

  def encode(self, text: str) -> np.ndarray:
    ids = super().encode(text)
    starts = self.splitter.starts(text.encode('utf-8'))
    return np.insert(ids, starts, self.boundary_id).astype(np.int32)


def boundary_word_starts(ids, boundary_id: int, byte_offset: int = encoders.BYTE_OFFSET
                         ) -> list[int]:
  """Word starts of one sequence with boundary tokens: at each boundary, special and the id
  after a special (and 0)."""
  ids = np.asarray(ids, np.int64)
  if ids.size == 0:
    return []
  special = ids < byte_offset
  start = (ids == boundary_id) | special
  start[1:] |= special[:-1]
  start[0] = True
  return np.flatnonzero(start).tolist()


class BoundaryWords:
  """The word rule of a stream with boundary tokens, in the form HAT generation takes a splitter
  (models/hat.generate): a word starts at a boundary token, at a special and after one; a word
  holds at most `max_word_bytes` bytes after its boundary (`word_cap` = that + 1 tokens). The
  model, not a text rule, decides where words end: generation emits the boundary token."""
  device_split = True
  byte_level = True

  def __init__(self, boundary_id: int, max_word_bytes: int):
    self.boundary_id, self.max_word_bytes = int(boundary_id), int(max_word_bytes)
    self.name = f'boundary:{self.boundary_id}'

  @property
  def word_cap(self) -> int:
    return self.max_word_bytes + 1

  def __repr__(self):
    return f'BoundaryWords({self.boundary_id}, max_word_bytes={self.max_word_bytes})'

  def __eq__(self, other):
    return (type(self) is type(other) and self.boundary_id == other.boundary_id
            and self.max_word_bytes == other.max_word_bytes)

  def __hash__(self):
    return hash((type(self).__name__, self.boundary_id, self.max_word_bytes))

  def host_starts(self, ids) -> list[int]:
    return boundary_word_starts(ids, self.boundary_id)

  def device_args(self):  # no state beside the model's (words.Splitter.device_step)
    return None

  def device_init(self, args, prompt_1xP, size: int):
    del args, prompt_1xP, size

  def device_step(self, args, state, ids_S, t, cur_start, byte_offset: int = encoders.BYTE_OFFSET):
    del args
    return self.device_new_start(ids_S, t, cur_start, byte_offset), state

  def device_new_start(self, ids_S, t, cur_start, byte_offset: int = encoders.BYTE_OFFSET):
    """Traceable: t if id t opens a word (a boundary, a special, the id after a special, or a
    word over the cap: a safety net, generation masks bytes that would overflow), else -1."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    x, prev = ids_S[t], ids_S[jnp.maximum(t - 1, 0)]
    new = (x == self.boundary_id) | (x < byte_offset) | (prev < byte_offset) | (
        t - cur_start + 1 > self.word_cap)
    return jnp.where(new & (t > cur_start), t, -1).astype(jnp.int32)
