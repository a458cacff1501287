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

from data import words


class WordFields:
  """Callable batch transform with thread-safe counters (it runs on the prefetch thread)."""

  def __init__(self, splitter, max_words: int, max_word_bytes: int):
    self.splitter, self.max_words, self.max_word_bytes = splitter, max_words, max_word_bytes
    self._lock = threading.Lock()
    self.stats = {'words': 0, 'dropped_bytes': 0, 'target_bytes': 0}

  def word_starts(self, ids) -> list[int]:
    """Word start offsets of one unpacked sequence of ids (one document, bos/eos included)."""
    ids = np.asarray(ids, np.int32)
    layout = words.batch_words(ids, np.ones_like(ids), self.splitter, len(ids) or 1,
                               self.max_word_bytes)
    return layout['word_start'][:int(layout['num_words'])].tolist()

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lay = words.batch_words(batch['inputs'], batch['segment_ids'], self.splitter,
                            self.max_words, self.max_word_bytes)
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
