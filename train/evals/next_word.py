"""Next-word accuracy (Thawani et al. 2023, "Learn Your Tokens"): the share of words that greedy
decoding produces exactly, given the text before them. One definition for every text model,
whatever its units (bytes, BPE tokens, words), through its byte-level view
(`Family.byte_view`, models/byte_level/: exact next-byte distributions).

Definitions (the paper's whitespace words, on bytes):
  * a *word* is a maximal run of bytes that are not ASCII whitespace (space, tab, newline, CR,
    vertical tab, form feed); the paper splits its text at whitespace the same way;
  * the *context* of a word is the whole text before it, from the document start (the
    whitespace before the word included), as in the paper, whose answer starts after the space;
  * greedy decoding *produces the word* iff it emits exactly the word's bytes and then a
    *boundary*: an ASCII whitespace byte or the end of the text (so 'bank' for 'banker', or
    'bank.' for 'bank', is wrong). Since greedy decoding follows the true bytes as long as it
    is right, this holds iff the argmax of the next-byte distribution is the true byte at every
    byte of the word and a boundary after it: one teacher-forced pass over the text
    (`view.distributions`) scores every word, with no generation loop.
  * scored words: every word of a text but its first (it has no previous word in the text, or
    is cut by the window) whose boundary lies inside the text (the end of a document is a
    boundary; a word cut off by the window's end is not scored).

Texts: the validation split cut into consecutive windows of `eval.next_word_bytes` bytes (at
UTF-8 character boundaries; every model sees the same texts, inside its training context
length), each scored from the begin-of-document token as training rows that continue a
document are; `eval.next_word_texts` of them (0: all), evenly spread over the split. Greedy
decoding over exact byte distributions is tokenizer-independent: for a BPE model it is the
most likely next *byte* under the model's distribution over texts, not greedy token decoding.
"""
from __future__ import annotations

import math
import os
import re
import time

import jax
import numpy as np

from data import corpus
from train import evals
from train.evals import report
from train.metrics import log0

WHITESPACE = b' \t\n\r\x0b\x0c'
END = 256  # end of text in a next-byte distribution (models/byte_level/)
_WORD = re.compile(rb'[^ \t\n\r\x0b\x0c]+')
_BOUNDARY = np.zeros(257, bool)
_BOUNDARY[list(WHITESPACE)] = True
_BOUNDARY[END] = True


def utf8_prefix(data: bytes, n: int) -> bytes:
  """The first <= n bytes of `data`, not cutting a UTF-8 character."""
  if len(data) <= n:
    return data
  k = n
  while k > 0 and (data[k] & 0xC0) == 0x80:  # data[k] continues a character: cut before it
    k -= 1
  return data[:k]


def scored_words(text: bytes, complete: bool) -> list[tuple[int, int]]:
  """(start, end) byte spans of the words scored in `text`: all but the first, each followed
  by a boundary inside the text (or by the end of a `complete` document)."""
  spans = [m.span() for m in _WORD.finditer(text)]
  return [(a, b) for a, b in spans[1:] if b < len(text) or complete]


def greedy_hits(dist: np.ndarray, text: bytes, spans) -> tuple[np.ndarray, np.ndarray]:
  """(hit per word, right bytes per word) from next-byte log-probs `dist` [len + 1, 257]
  (row i: the distribution of byte i given text[:i])."""
  arg = np.argmax(dist, axis=1)
  x = np.frombuffer(text, np.uint8)
  hits, right = [], []
  for a, b in spans:
    ok = arg[a:b] == x[a:b]
    right.append(int(ok.sum()))
    hits.append(bool(ok.all() and _BOUNDARY[arg[b]]))
  return np.array(hits, bool), np.array(right, np.int64)


def eval_texts(cfg) -> list[tuple[bytes, bool]]:
  """(text, ends its document?) pairs for the next-word evaluation (see the module doc)."""
  source = corpus.get_source(cfg.data, cfg.data.eval_split)
  n_bytes = int(cfg.eval.get('next_word_bytes', 200))
  windows = []
  for doc in source:  # (in order; a streamed source has no random access)
    data = doc.encode('utf-8')
    while data:
      text = utf8_prefix(data, n_bytes) or data[:n_bytes]
      data = data[len(text):]
      windows.append((text, not data))
  n = int(cfg.eval.get('next_word_texts', 0))
  if 0 < n < len(windows):
    windows = [windows[int(i)] for i in np.linspace(0, len(windows) - 1, n).round()]
  elif n > len(windows):
    log0(f'next-word accuracy: warning: eval.next_word_texts={n} asked for more texts than the '
         f'{cfg.data.eval_split} split holds ({len(windows)} of {n_bytes} bytes); scoring '
         f'{len(windows)} (a larger split: data.val_fraction / data.val_min_bytes for a text: '
         'source)')
  return windows


def score_view(view, texts) -> dict:
  """Next-word accuracy of a `ByteLM` on `texts` ((bytes, complete) pairs). Texts the view
  cannot score (a byte its vocabulary cannot produce) are skipped and counted."""
  hits, right, lens, skipped, n_bytes = [], [], [], 0, 0
  t0 = time.perf_counter()
  for text, complete in texts:
    spans = scored_words(text, complete)
    if not spans:
      continue
    try:
      dist = view.distributions(text)
    except ValueError:
      skipped += 1
      continue
    h, r = greedy_hits(np.asarray(dist), text, spans)
    hits.append(h)
    right.append(r)
    lens.append(np.array([b - a for a, b in spans]))
    n_bytes += len(text)
  hits = np.concatenate(hits) if hits else np.zeros(0, bool)
  right = np.concatenate(right) if right else np.zeros(0)
  lens = np.concatenate(lens) if lens else np.zeros(0)
  n = int(hits.size)
  return {'accuracy': float(hits.mean()) if n else math.nan,
          'byte_accuracy': float(right.sum() / max(lens.sum(), 1)),
          'n_words': n, 'mean_word_bytes': float(lens.mean()) if n else math.nan,
          'n_texts': len(texts) - skipped, 'skipped_texts': skipped, 'text_bytes': n_bytes,
          'seconds': time.perf_counter() - t0}


def _local_params(params):
  """The parameters as arrays this process can read whole (gathered across hosts)."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(params, tiled=True)


def run(setup, params, workdir: str, step: int, texts=None) -> dict | None:
  """Next-word accuracy of the run's model (None for a family without a byte-level view);
  writes `next_word_step{N}.md`. `texts`: a function returning `eval_texts(setup.cfg)` (read
  only for a family with a view); default: read them."""
  cfg, fam = setup.cfg, setup.family
  try:
    view = fam.byte_view(setup.model(_local_params(params)))
  except ValueError as e:
    log0(f'next-word accuracy: skipped ({e})')
    return None
  res = score_view(view, eval_texts(cfg) if texts is None else texts())
  table = report.markdown(
      ['model', 'next-word accuracy', 'byte accuracy in words', 'words', 'texts', 'seconds'],
      [[fam.name, f'{res["accuracy"]:.4f}', f'{res["byte_accuracy"]:.4f}', res['n_words'],
        res['n_texts'], f'{res["seconds"]:.1f}']])
  log0(table.rstrip('\n'))
  report.write_text(os.path.join(workdir, f'next_word_step{step}.md'), table)
  return res


class Evaluator(evals.Evaluator):
  """Evaluator type 'next_word' (`eval.next_word`: False to skip; `eval.next_word_bytes`,
  `eval.next_word_texts`): results under its name. Holds the validation windows across
  calls."""

  order = 20

  def __init__(self, name, cfg, options):
    super().__init__(name, cfg, options)
    self.texts = None

  def run(self, setup, params, workdir, step, earlier):
    del earlier
    if not self.cfg.eval.get('next_word', True):
      return None
    return run(setup, params, workdir, step, self._texts)

  def _texts(self):
    if self.texts is None:
      self.texts = eval_texts(self.cfg)
    return self.texts
