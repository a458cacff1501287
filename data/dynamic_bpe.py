"""Dynamic tokenization: batch-level BPE merges on top of a model's own tokenization (Feher,
Vulić, Minixhofer 2024, "Retrofitting (Large) Language Models with Dynamic Tokenization").

Given one batch of packed token rows (data/pipeline.py: inputs, targets, segment_ids, positions,
weights, target_bytes), the most frequent adjacent pair of tokens across the whole batch is
merged into a new token, everywhere it occurs, and again, until a merge budget is spent
(`merges:N`) or the batch's scored tokens shrank by a fraction (`compression:F`). A pair may
merge only when
  * neither token is a special (document separators stay single tokens),
  * their text stays one pretoken of the tokenizer's own pre-tokenizer (merges never cross
    word, digit or punctuation boundaries; whitespace merges only with whitespace), as in the
    paper's `pretokens` boundary -- or, with boundary 'words', one whitespace-delimited word,
  * the new token spells at most `max_parts` base tokens (the hypernetwork's `max_pieces`),
  * the left token is not the first token of a row's segment: that token is the segment's
    first *input*, whose bytes the previous row (or nothing, for a separator) already scored.
So the merged rows' targets still spell every scored byte of the original targets exactly once:
the bits per byte of a merged batch count each byte once (`check_bytes`).

New tokens get ids `vocab_size + k` in the order they were made; `parts[k]` is the tuple of
base ids a new token spells (flattened, so a merge of merges lists base tokens only).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from data import encoders

SPACELIKE = ' \n\t\r'


def parse_spec(spec: str) -> list[tuple[str, float]]:
  """'merges:64,256' or 'compression:0.1,0.2' -> [('merges', 64), ...]. A budget of 0 merges,
  a compression outside (0, 1) or an unknown kind is a ValueError naming `dynamic`."""
  spec = str(spec or '').strip()
  kind, sep, values = spec.partition(':')
  if not sep or kind not in ('merges', 'compression') or not values.strip():
    raise ValueError(f"dynamic={spec!r}: expected 'merges:N[,N...]' (a merge budget per batch) "
                     "or 'compression:F[,F...]' (the fraction of tokens to remove, 0 < F < 1)")
  out = []
  for v in values.split(','):
    v = v.strip()
    try:
      x = int(v) if kind == 'merges' else float(v)
    except ValueError:
      raise ValueError(f'dynamic={spec!r}: {v!r} is not a number') from None
    if kind == 'merges' and x < 1:
      raise ValueError(f'dynamic={spec!r}: a merge budget of {x} merges nothing; the plain '
                       '--mode=eval (no dynamic) is the run without merges')
    if kind == 'compression' and not 0.0 < x < 1.0:
      raise ValueError(f'dynamic={spec!r}: compression {x} is not a fraction in (0, 1) of the '
                       'tokens to remove')
    out.append((kind, x))
  return out


BOUNDARIES = ('pretokens', 'words')


class PairRule:
  """Whether two tokens (given by their bytes) may merge: see the module doc. `boundary`
  'pretokens' keeps merges inside one pretoken of the tokenizer's pre-tokenizer; 'words' inside
  one whitespace-delimited word (punctuation and digits then merge with letters: more
  compression, further from what the model was trained on)."""

  def __init__(self, tokenizer, boundary: str = 'pretokens'):
    if boundary not in BOUNDARIES:
      raise ValueError(f'dynamic_boundary={boundary!r}: expected one of {BOUNDARIES}')
    self.pre = tokenizer.pre_tokenizer if boundary == 'pretokens' else None
    self._cache: dict[bytes, bool] = {}

  def __call__(self, left: bytes, right: bytes) -> bool:
    key = left + b'\x00' + right
    got = self._cache.get(key)
    if got is None:
      got = self._cache[key] = self._ok(left + right)
    return got

  def _ok(self, joined: bytes) -> bool:
    try:
      text = joined.decode('utf-8')
    except UnicodeDecodeError:
      # a piece of a multi-byte character: no pretoken test possible; merge unless it holds
      # whitespace inside (as the reference implementation does)
      return not any(c in joined[1:] for c in SPACELIKE.encode())
    if any(c in SPACELIKE for c in text[1:]) and not all(c in SPACELIKE for c in text):
      return False
    if text == '\n\n':  # some pre-tokenizers split '\n\n' in context: never merge it
      return False
    if self.pre is None:
      return True
    return len(self.pre.pre_tokenize_str(text)) == 1


@dataclasses.dataclass
class Merged:
  """One batch after dynamic merges."""
  batch: dict[str, np.ndarray]   # the rows re-packed (same keys and shapes as the input)
  parts: list[tuple[int, ...]]   # base ids spelled by new token vocab_size + k
  merges: int                    # merges made
  tokens_before: int             # scored tokens (weights > 0) before / after
  tokens_after: int
  exhausted: bool                # stopped because no pair could merge any more


def token_bytes_table(encoder: encoders.BPEEncoder) -> list[bytes]:
  """The bytes each base id spells (b'' for specials and unused ids), for byte-level BPE."""
  alphabet = encoders.byte_level_alphabet()
  tok = encoder.tokenizer
  out = []
  special = getattr(encoder, '_special', set())
  for i in range(encoder.vocab_size):
    s = tok.id_to_token(i) if i < encoder.true_vocab_size else None
    if s is None or i in special:
      out.append(b'')
    elif all(c in alphabet for c in s):
      out.append(bytes(alphabet[c] for c in s))
    else:
      out.append(s.encode('utf-8'))
  return out


class DynamicBPE:
  """Batch-level merges for one model tokenizer (`encoder`: a byte-level `BPEEncoder`)."""

  def __init__(self, encoder: encoders.BPEEncoder, max_parts: int, boundary: str = 'pretokens'):
    self.encoder = encoder
    self.vocab = int(encoder.vocab_size)
    self.base_bytes = token_bytes_table(encoder)
    self.special = set(getattr(encoder, '_special', set()))
    self.rule = PairRule(encoder.tokenizer, boundary)
    self.max_parts = int(max_parts)

  def _segments(self, batch) -> list[tuple[int, list[int], list[int]]]:
    """(row, columns, tokens) per segment: tokens = [first input] + targets."""
    out = []
    for r in range(batch['inputs'].shape[0]):
      seg, w = batch['segment_ids'][r], batch['weights'][r]
      for s in np.unique(seg[(seg > 0) & (w > 0)]):
        cols = np.flatnonzero((seg == s) & (w > 0))
        toks = [int(batch['inputs'][r, cols[0]])] + [int(t) for t in batch['targets'][r, cols]]
        out.append((r, cols, toks))
    return out

  def merge(self, batch: dict[str, np.ndarray], kind: str = 'merges', value: float = 0
            ) -> Merged:
    """Merges on one batch: `kind` 'merges' (a budget of `value` merges, 0 = none) or
    'compression' (until the scored tokens shrank by the fraction `value`)."""
    segs = self._segments(batch)
    seqs = [toks for _, _, toks in segs]
    parts: list[tuple[int, ...]] = []
    nbytes: list[bytes] = []

    def spelled(t):
      return self.base_bytes[t] if t < self.vocab else nbytes[t - self.vocab]

    def nparts(t):
      return 1 if t < self.vocab else len(parts[t - self.vocab])

    valid: dict[tuple[int, int], bool] = {}

    def ok(a, b):
      v = valid.get((a, b))
      if v is None:
        v = (a not in self.special and b not in self.special
             and nparts(a) + nparts(b) <= self.max_parts
             and bool(spelled(a)) and bool(spelled(b)) and self.rule(spelled(a), spelled(b)))
        valid[(a, b)] = v
      return v

    before = sum(len(s) - 1 for s in seqs)
    goal = (int(value) if kind == 'merges'
            else int(np.ceil(before * (1.0 - float(value)))))
    after, merges, exhausted = before, 0, False
    while (merges < goal) if kind == 'merges' else (after > goal):
      counts = collections.Counter()
      for s in seqs:
        for i in range(1, len(s) - 1):  # the left token is never the segment's first input
          if ok(s[i], s[i + 1]):
            counts[(s[i], s[i + 1])] += 1
      if not counts:
        exhausted = True
        break
      (a, b), _ = counts.most_common(1)[0]
      new = self.vocab + len(parts)
      pa = (a,) if a < self.vocab else parts[a - self.vocab]
      pb = (b,) if b < self.vocab else parts[b - self.vocab]
      parts.append(pa + pb)
      nbytes.append(spelled(a) + spelled(b))
      for j, s in enumerate(seqs):
        out, i = s[:1], 1
        while i < len(s):
          if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
            out.append(new)
            i += 2
          else:
            out.append(s[i])
            i += 1
        after -= len(s) - len(out)
        seqs[j] = out
      merges += 1
    return Merged(self._repack(batch, segs, seqs, nbytes), parts, merges, before, after,
                  exhausted)

  def _repack(self, batch, segs, seqs, nbytes) -> dict[str, np.ndarray]:
    b, t = batch['inputs'].shape
    out = {k: np.zeros((b, t), v.dtype) for k, v in batch.items()}
    out['inputs'][:] = out['targets'][:] = self.encoder.pad_id  # padding as the packer pads
    col = np.zeros(b, np.int64)
    sid = np.zeros(b, np.int64)
    for (r, _, _), s in zip(segs, seqs):
      n = len(s) - 1
      sid[r] += 1
      sl = slice(col[r], col[r] + n)
      out['inputs'][r, sl] = s[:-1]
      out['targets'][r, sl] = s[1:]
      out['segment_ids'][r, sl] = sid[r]
      out['positions'][r, sl] = np.arange(n)
      out['weights'][r, sl] = 1.0
      out['target_bytes'][r, sl] = [len(self.base_bytes[x]) if x < self.vocab
                                    else len(nbytes[x - self.vocab]) for x in s[1:]]
      col[r] += n
    return out


def check_bytes(before: dict[str, np.ndarray], after: Merged, base_bytes: list[bytes],
                vocab: int) -> None:
  """Raises if the merged rows' targets do not spell the original targets' bytes exactly once
  (in order, row by row)."""
  spell = [b''.join(base_bytes[x] for x in p) for p in after.parts]
  for r in range(before['targets'].shape[0]):
    w0, w1 = before['weights'][r] > 0, after.batch['weights'][r] > 0
    want = b''.join(base_bytes[x] for x in before['targets'][r][w0])
    got = b''.join(base_bytes[x] if x < vocab else spell[x - vocab]
                   for x in after.batch['targets'][r][w1])
    if want != got:
      raise AssertionError(f'row {r}: merged targets spell {len(got)} bytes, the original '
                           f'{len(want)}')
    if int(after.batch['target_bytes'][r].sum()) != int(before['target_bytes'][r].sum()):
      raise AssertionError(f'row {r}: target_bytes sum changed')
