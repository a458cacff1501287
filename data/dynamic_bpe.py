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

The batch-level merges above look at the text they then score: the choice of merges carries
information about that text which nobody pays for, so their bits per byte are not those of a
predictive model. `DynamicBPE.causal` is the predictive variant (LZW-style, as zip2zip, Geng et
al. 2025): per row, the scored tokens are read left to right; at each position the longest
sequence of base tokens in the row's table so far is taken as one token, and only after that
token is chosen, the previous token extended by the first base token of this one becomes a
table entry (once the pair has been seen `min_count` times, and while the row's budget lasts).
So every entry a token uses was learnt from text scored strictly before it, and the vocabulary
at each position (base + the entries known there, `Causal.known`) is a function of the text
already scored: a decoder can rebuild it, and the bits per byte are an honest code length.
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
MODES = ('causal', 'batch')  # merges learnt from the scored prefix | chosen from the whole batch


def check_mode(mode: str, specs: list[tuple[str, float]]) -> None:
  """A ValueError for an unknown `dynamic_mode` or a setting it cannot honour: a compression
  target needs the whole text before choosing merges, which causal merges may not look at."""
  if mode not in MODES:
    raise ValueError(f'dynamic_mode={mode!r}: expected one of {MODES} (causal: merges learnt '
                     'only from text already scored, honest bits per byte; batch: merges '
                     'chosen from the whole scored batch)')
  if mode == 'causal' and any(kind != 'merges' for kind, _ in specs):
    raise ValueError("dynamic='compression:...' chooses merges from the whole batch to reach a "
                     "target; with dynamic_mode='causal' give 'merges:N' (at most N new tokens "
                     "learnt per row), or set dynamic_mode='batch'")


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


@dataclasses.dataclass
class Causal:
  """One batch after causal merges: each row has its own table, grown from its scored prefix."""
  batch: dict[str, np.ndarray]      # the rows re-packed (same keys and shapes as the input)
  parts: list[list[tuple[int, ...]]]  # per row: base ids spelled by its new token vocab + k
  known: np.ndarray                 # [B, T] int32: entries of the row's table learnt before the
                                    # target at column t was chosen (its vocabulary: vocab+known)
  learnt_at: list[list[int]]        # per row: for entry k, how many of the row's scored base
                                    # tokens had been read when it was learnt
  used_at: list[list[tuple[int, int]]]  # per row: (base position, new id) of each new token used
  tokens_before: int                # scored tokens (weights > 0) before / after
  tokens_after: int

  @property
  def merges(self) -> list[int]:
    return [len(p) for p in self.parts]


class CausalTable:
  """One row's (or one generation's) causal merge table. `match` the longest entry at a
  position, then `step` once that token is chosen (scored or generated): the previous token
  extended by the first base token of this one is counted, and becomes entry `vocab + k` once
  seen `min_count` times (while fewer than `budget` entries exist and `dyn`'s pair rule allows).
  Everything it knows comes from the tokens passed to `step` before."""

  def __init__(self, dyn: DynamicBPE, budget: int, min_count: int = 1):
    self.dyn, self.budget, self.min_count = dyn, int(budget), int(min_count)
    self.table: dict[tuple[int, ...], int] = {}
    self.parts: list[tuple[int, ...]] = []
    self.learnt_at: list[int] = []   # base tokens read when entry k was learnt
    self.seen: collections.Counter = collections.Counter()
    self.prev: tuple[int, ...] | None = None
    self.read = 0                    # base tokens passed to `step` so far

  def restart(self) -> None:
    """A new segment: no pair is formed across the boundary (the table is kept)."""
    self.prev = None

  def match(self, base, i: int) -> tuple[int, ...]:
    """The longest known entry (or the single base token) at `base[i:]`."""
    for length in range(min(self.dyn.max_parts, len(base) - i), 1, -1):
      cur = tuple(int(x) for x in base[i:i + length])
      if cur in self.table:
        return cur
    return (int(base[i]),)

  def id_of(self, cur: tuple[int, ...]) -> int:
    return cur[0] if len(cur) == 1 else self.table[cur]

  def parts_of(self, tok: int) -> tuple[int, ...]:
    return (tok,) if tok < self.dyn.vocab else self.parts[tok - self.dyn.vocab]

  def step(self, cur: tuple[int, ...]) -> int | None:
    """`cur` (base ids) was chosen; returns the id of the entry learnt from it, if any."""
    prev, self.prev = self.prev, cur
    self.read += len(cur)
    if prev is None or len(self.parts) >= self.budget:
      return None
    cand = prev + cur[:1]
    if cand in self.table or not self.dyn.joinable(prev, cur[0]):
      return None
    self.seen[cand] += 1
    if self.seen[cand] < self.min_count:
      return None
    new = self.table[cand] = self.dyn.vocab + len(self.parts)
    self.parts.append(cand)
    self.learnt_at.append(self.read - len(cur) + 1)
    return new


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

  def causal(self, batch: dict[str, np.ndarray], budget: int, min_count: int = 1) -> Causal:
    """Causal merges on one batch (`CausalTable` per row, grown along the row's segments in
    order): at most `budget` entries per row. A budget of 0 leaves the batch as it is."""
    b, t = batch['inputs'].shape
    segs = self._segments(batch)
    seqs = [toks[:1] for _, _, toks in segs]
    known_of = [[] for _ in segs]
    tables = [CausalTable(self, budget, min_count) for _ in range(b)]
    used_at = [[] for _ in range(b)]
    for j, (r, _, toks) in enumerate(segs):
      table = tables[r]
      table.restart()
      base, i = toks[1:], 0
      while i < len(base):
        cur = table.match(base, i)
        seqs[j].append(table.id_of(cur))
        known_of[j].append(len(table.parts))
        if len(cur) > 1:
          used_at[r].append((table.read, seqs[j][-1]))
        table.step(cur)
        i += len(cur)
    parts = [tb.parts for tb in tables]
    out = self._repack(batch, segs, seqs, None, parts)
    known_bt = np.zeros((b, t), np.int32)
    col = np.zeros(b, np.int64)
    for (r, _, _), known in zip(segs, known_of):
      known_bt[r, col[r]:col[r] + len(known)] = known
      col[r] += len(known)
    before = sum(len(toks) - 1 for _, _, toks in segs)
    after = sum(len(s) - 1 for s in seqs)
    return Causal(out, parts, known_bt, [tb.learnt_at for tb in tables], used_at, before, after)

  def joinable(self, left: tuple[int, ...], right: int) -> bool:
    """Whether the base-token sequence `left` may be extended by the base token `right`."""
    if len(left) + 1 > self.max_parts or right in self.special or left[0] in self.special:
      return False
    lb = b''.join(self.base_bytes[x] for x in left)
    rb = self.base_bytes[right]
    return bool(lb) and bool(rb) and self.rule(lb, rb)

  def _repack(self, batch, segs, seqs, nbytes, row_parts=None) -> dict[str, np.ndarray]:
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
      out['target_bytes'][r, sl] = [
          len(self.base_bytes[x]) if x < self.vocab
          else len(nbytes[x - self.vocab]) if row_parts is None
          else sum(len(self.base_bytes[y]) for y in row_parts[r][x - self.vocab])
          for x in s[1:]]
      col[r] += n
    return out


def check_bytes(before: dict[str, np.ndarray], after: Merged | Causal, base_bytes: list[bytes],
                vocab: int) -> None:
  """Raises if the merged rows' targets do not spell the original targets' bytes exactly once
  (in order, row by row). `after`: batch-level merges (one table) or causal ones (per row)."""
  b = before['targets'].shape[0]
  tables = after.parts if isinstance(after, Causal) else [after.parts] * b
  for r in range(b):
    spell = [b''.join(base_bytes[x] for x in p) for p in tables[r]]
    w0, w1 = before['weights'][r] > 0, after.batch['weights'][r] > 0
    want = b''.join(base_bytes[x] for x in before['targets'][r][w0])
    got = b''.join(base_bytes[x] if x < vocab else spell[x - vocab]
                   for x in after.batch['targets'][r][w1])
    if want != got:
      raise AssertionError(f'row {r}: merged targets spell {len(got)} bytes, the original '
                           f'{len(want)}')
    if int(after.batch['target_bytes'][r].sum()) != int(before['target_bytes'][r].sum()):
      raise AssertionError(f'row {r}: target_bytes sum changed')


def merge_list_bits(merges: int, vocab: int) -> float:
  """Bits to transmit a batch's merge list: the k-th merge names its two tokens among the
  `vocab + k` that exist when it is made, 2 log2(vocab + k) bits -- the cost batch-level merges
  do not pay in their bits per byte (`bpb_charged` adds it)."""
  return float(2 * np.log2(vocab + np.arange(merges, dtype=np.float64)).sum())
