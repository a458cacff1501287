"""Canonical encodings under a byte-level BPE tokenizer, and which next tokens keep one canonical.

This is the tokenizer half of exact byte-level probabilities from a tokenized LM
(models/byte_level/exact_bpe.py is the model half). Everything here is model-free and runs on
the host.

Definitions (bytes are the text; the tokenizer is a HF `tokenizers` byte-level BPE):
  * enc(s): the tokenizer's encoding of a UTF-8 string s (no special tokens added; special
    token strings inside s are text).
  * A token sequence t is *canonical* ("valid", the papers' word) iff it is a prefix of
    enc(bytes(t) + z) for some continuation z (ending on a token boundary). Not "t ==
    enc(bytes(t))": the pre-tokenizer's regex looks ahead, so enc('\\n\\nA') is
    ['\\n', '\\n', 'A'] while enc('\\n\\n') is ['\\n\\n']; both prefixes must be reachable.
    The continuations tried are probes: the end of the text, one character of every class the
    regex tells apart (each ASCII class standing for all its members), the contraction letters
    and 're' / 've' / 'll' after an apostrophe, a character of each non-ASCII class; if bytes(t)
    ends inside a character, every completion of that character first. The text may end after
    t iff t == enc(bytes(t)) (`is_exact`).
  * `Canonical.row(tail)`: the boolean mask over the vocabulary of tokens v such that t + [v] is
    canonical, for the canonical t whose end `tail` describes. `valid_slow(tail, v)` checks the
    definition directly with the tokenizer's pre-tokenizer and BPE (tests compare the two).

How a row is computed (regex pre-tokenizer, then BPE on each piece):
  1. Pieces. Only the last pieces of t's text can be cut differently once more text follows
     (the regex looks at most two characters ahead); `Tail` holds the text from three pieces
     back. How tail + w + probe is cut depends only on the *character classes* (letters,
     digits, whitespace, the literal space and apostrophe, letters right after an apostrophe,
     other), and a run of one class is cut only at its start or before its last character: so
     tokens are grouped by the class string of their bytes (runs longer than 3 shortened), one
     representative per group is pre-tokenized after the tail's last piece(s) for every probe,
     and the outcome is cached by the tail's shortened class string. A probe is out if a piece
     starts strictly inside w; else the pieces inside the tail must re-encode to its tokens,
     w's piece either starts at w (then v must be *reachable*: enc(w) == [v]) or extends the
     tail's last token l (then (l, v) must be a valid pair), and if the piece goes on into the
     probe, (v, first token of the probe's bytes) must be a valid pair too.
  2. BPE pairs. Within one piece, a BPE encoding is the tokenizer's iff every adjacent pair is
     (BPE is "pairwise": Berglund & van der Merwe 2023; Hayase et al. 2025 use the same). A pair
     (l, r) is invalid iff some merge (x, y) with x on l's right spine and y on r's left spine
     fires while both are alive: birth(x) < rank < death(x) and birth(y) < rank <= death(y)
     (the `<=`: HF applies equal ranks leftmost first, so a crossing merge beats the same merge
     inside r). Spines and births come from running the tokenizer's BPE on each token's bytes
     (`_bpe_trace`, HF's algorithm: lowest rank first, leftmost on ties). `pair_row(l)` /
     `pair_col(r)` give all partners of one token at once from inverted spine indices.
Class membership follows Python's `unicodedata` (Unicode 15); the tokenizers library's regex
tables could differ for characters assigned in later Unicode versions.

Supported: HF `tokenizers` BPE models over the byte-level alphabet, no normalizer, pre-tokenizer
ByteLevel(add_prefix_space=False) (its GPT-2 regex, or none) optionally after Digits / Split
(Sequence; an unknown Split regex makes every ASCII character its own class), ignore_merges
off. Anything else (UnigramLM, WordPiece, SentencePiece-style, a normalizer) raises
`UnsupportedTokenizer` (a ValueError).
"""
from __future__ import annotations

import bisect
import functools
import heapq
import json
import unicodedata

import numpy as np

from data import encoders

NEW, PAIR = 1, 2  # group outcome bits: w starts a new chunk / extends the tail's last token
_INF = 1 << 40


class UnsupportedTokenizer(ValueError):
  """The tokenizer is not a byte-level BPE this module can canonicalize exactly."""


byte_alphabet = encoders.byte_level_alphabet  # alphabet character -> byte


# -- UTF-8 ---------------------------------------------------------------------------------------
def _char_len(lead: int) -> int:
  """Bytes in a UTF-8 character with this first byte; 0 for a byte that cannot start one."""
  if lead < 0x80:
    return 1
  if 0xC2 <= lead <= 0xDF:
    return 2
  if 0xE0 <= lead <= 0xEF:
    return 3
  if 0xF0 <= lead <= 0xF4:
    return 4
  return 0


def _cont_ok(prefix: bytes, b: int) -> bool:
  """Can byte b follow the partial character `prefix` (1-3 bytes, a valid lead) in UTF-8?"""
  if not 0x80 <= b <= 0xBF:
    return False
  if len(prefix) == 1:  # the second byte's range is restricted for some leads
    lead = prefix[0]
    lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF),
              0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))
    return lo <= b <= hi
  return True


def utf8_split(b: bytes) -> tuple[int, bytes]:
  """(length of the longest prefix of b ending at a character boundary, the partial character
  after it). Raises ValueError naming the first byte that no UTF-8 text can have there."""
  i, n = 0, len(b)
  while i < n:
    k = _char_len(b[i])
    if k == 0:
      raise ValueError(f'byte {i} (0x{b[i]:02x}) is not valid UTF-8 here')
    for m in range(1, k):
      if i + m >= n:
        return i, bytes(b[i:])
      if not _cont_ok(b[i:i + m], b[i + m]):
        raise ValueError(f'byte {i + m} (0x{b[i + m]:02x}) is not valid UTF-8 here')
    i += k
  return n, b''


def partial_ok(prefix: bytes) -> bool:
  """Is `prefix` (possibly empty) a proper prefix of some UTF-8 character?"""
  if not prefix:
    return True
  k = _char_len(prefix[0])
  if not 1 < k or len(prefix) >= k:
    return False
  return all(_cont_ok(prefix[:m], prefix[m]) for m in range(1, len(prefix)))


# -- character classes as a regex pre-tokenizer sees them --------------------------------------
_WHITE_SPACE = frozenset('\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000'
                         + ''.join(chr(c) for c in range(0x2000, 0x200B)))


def _char_class(c: str, fine: bool) -> str:
  """A representative character with the same membership in every set the pre-tokenizer's regex
  tests: \\p{L}, \\p{N}, \\s, and the literal characters it names. `fine` keeps every ASCII
  character that is not a letter or digit as itself (for regexes we do not know)."""
  if c in " '":
    return c
  o = ord(c)
  if o < 128:
    if c.isalpha():
      return 'a'
    if c.isdigit():
      return '0'
    if fine or c in _WHITE_SPACE:
      return c if fine else '\t'
    return '.'
  if c in _WHITE_SPACE:
    return '\u2000'
  cat = unicodedata.category(c)
  if cat[0] == 'L':
    return '\u00e9'  # é: a non-ASCII letter
  if cat[0] == 'N':
    return '\u0663'  # Arabic-Indic three: a non-ASCII digit
  return '\u2014'    # em dash: non-ASCII other


def _signature(chars: str, fine: bool, before: str = '') -> str:
  """The class string of `chars` (following the text `before`): characters within two of an
  apostrophe keep their identity (contractions: 's 'll ...), the rest map to their class."""
  ctx = before[-2:] + chars
  out = []
  for i, c in enumerate(chars):
    j = i + len(ctx) - len(chars)
    near = "'" in ctx[max(0, j - 2):j]
    out.append(c if (near and ord(c) < 128) else _char_class(c, fine))
  return ''.join(out)


def _compress(text: str, fine: bool, keep_digits: bool) -> tuple[str, str, list[int]]:
  """Runs of one class longer than 3 shortened to their first and last two characters (a regex
  pre-tokenizer cuts a run only at its start or before its last character). Returns (the
  shortened text, its signature, the index in `text` of each kept character + len(text)).
  `keep_digits`: digits are cut one by one (Digits pre-tokenizer), never shortened."""
  sig = _signature(text, fine)
  kept = []
  i, n = 0, len(text)
  while i < n:
    j = i
    while j + 1 < n and sig[j + 1] == sig[i]:
      j += 1
    if j - i + 1 > 3 and not (keep_digits and sig[i] in '0\u0663'):
      kept += [i, j - 1, j]
    else:
      kept += list(range(i, j + 1))
    i = j + 1
  return ''.join(text[k] for k in kept), ''.join(sig[k] for k in kept), kept + [n]


@functools.lru_cache(maxsize=None)
def _rests(partial: bytes) -> tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...]:
  """For a partial character: (class, a completing character of that class, the code point
  runs (first, last) of every completion of that class), one entry per class a completion can
  have. The completions of a UTF-8 prefix are one contiguous range of code points."""
  k = _char_len(partial[0])
  lo_b, hi_b = bytearray(partial), bytearray(partial)
  for m in range(len(partial), k):
    ok = [b for b in range(0x80, 0xC0) if _cont_ok(bytes(lo_b[:m]), b)]
    lo_b.append(ok[0])
    hi_b.append([b for b in range(0x80, 0xC0) if _cont_ok(bytes(hi_b[:m]), b)][-1])
  lo, hi = ord(bytes(lo_b).decode('utf-8')), ord(bytes(hi_b).decode('utf-8'))
  runs: dict[str, list[list[int]]] = {}
  rep: dict[str, str] = {}
  prev = None
  for cp in range(lo, hi + 1):
    c = chr(cp)
    if c in _WHITE_SPACE:
      cls = '\u2000'
    else:
      cat = unicodedata.category(c)[0]
      cls = '\u00e9' if cat == 'L' else '\u0663' if cat == 'N' else '\u2014'
    if cls == prev:
      runs[cls][-1][1] = cp
    else:
      runs.setdefault(cls, []).append([cp, cp])
      rep.setdefault(cls, c)
      prev = cls
  return tuple((cls, rep[cls], tuple(map(tuple, runs[cls]))) for cls in sorted(runs))


def _iter_rests(partial: bytes, runs):
  """The missing bytes of every completion in `runs` (see `_rests`)."""
  for a, b in runs:
    for cp in range(a, b + 1):
      yield chr(cp).encode('utf-8')[len(partial):]


# -- BPE -------------------------------------------------------------------------------------------
def _bpe_trace(units: list[int], ranks: dict) -> list[tuple]:
  """HF's BPE on one chunk given as single-byte token ids: repeatedly merge the adjacent pair of
  lowest rank (leftmost on ties). Returns the final symbols as trees (id, birth_rank, left, right)
  with leaves (byte_id, -1, None, None)."""
  n = len(units)
  ids = list(units)
  trees = [(u, -1, None, None) for u in units]
  nxt = list(range(1, n)) + [-1]
  prv = list(range(-1, n - 1))
  alive = [True] * n
  heap = []
  for i in range(n - 1):
    r = ranks.get((ids[i], ids[i + 1]))
    if r is not None:
      heap.append((r[0], i, r[1]))
  heapq.heapify(heap)
  while heap:
    rank, i, new = heapq.heappop(heap)
    if not alive[i] or nxt[i] < 0:
      continue
    j = nxt[i]
    if ranks.get((ids[i], ids[j])) != (rank, new):
      continue
    trees[i] = (new, rank, trees[i], trees[j])
    ids[i] = new
    alive[j] = False
    nxt[i] = nxt[j]
    if nxt[i] >= 0:
      prv[nxt[i]] = i
    if prv[i] >= 0:
      r = ranks.get((ids[prv[i]], new))
      if r is not None:
        heapq.heappush(heap, (r[0], prv[i], r[1]))
    if nxt[i] >= 0:
      r = ranks.get((new, ids[nxt[i]]))
      if r is not None:
        heapq.heappush(heap, (r[0], i, r[1]))
  return [trees[i] for i in range(n) if alive[i]]


def _spine(tree, side: int) -> list[tuple[int, int, int]]:
  """(token, birth, death) along a tree's left (side=2) or right (side=3) edge, leaf first; a
  node dies when the merge that makes its spine parent fires (the root never dies)."""
  nodes = []
  while tree is not None:
    nodes.append(tree)
    tree = tree[side]
  out = []
  for k in range(len(nodes) - 1, -1, -1):
    death = nodes[k - 1][1] if k > 0 else _INF
    out.append((nodes[k][0], nodes[k][1], death))
  return out


# -- the tokenizer -------------------------------------------------------------------------------
class Tail:
  """The end of a canonical token sequence: the text from a stable chunk start (`text`, bytes,
  may end inside a character) and the tokens that cover it (`tokens`)."""
  __slots__ = ('text', 'tokens', 'key')

  def __init__(self, text: bytes, tokens: tuple[int, ...]):
    self.text, self.tokens = bytes(text), tuple(tokens)
    self.key = (self.text, self.tokens)


class Canonical:
  """Canonical encodings and next-token validity for one byte-level BPE tokenizer.

  `vocab_size`: the model's vocabulary (ids past the tokenizer's are padding: never valid).
  Token ids that are special (added) tokens or padding are not text: `token_bytes[v]` is None
  and they are never valid continuations (the end-of-text token is handled by the caller)."""

  TAIL_CHUNKS = 3

  def __init__(self, tokenizer, vocab_size: int | None = None):
    import copy  # pylint: disable=import-outside-toplevel
    state = json.loads(tokenizer.to_str())
    model = state.get('model') or {}
    if model.get('type') != 'BPE':
      raise UnsupportedTokenizer(f'exact byte-level probabilities need a BPE tokenizer; this one '
                                 f'is {model.get("type")!r}')
    if model.get('ignore_merges') or model.get('dropout') or model.get(
        'continuing_subword_prefix') or model.get('end_of_word_suffix'):
      raise UnsupportedTokenizer('BPE options ignore_merges / dropout / subword prefixes are '
                                 'not supported')
    if state.get('normalizer') is not None:
      raise UnsupportedTokenizer(f'tokenizer normalizer {state["normalizer"].get("type")} is not '
                                 f'supported (the encoding must be a function of the bytes)')
    self.fine = self._check_pretokenizer(state.get('pre_tokenizer'))
    self.digits = 'Digits' in json.dumps(state.get('pre_tokenizer'))
    alphabet = byte_alphabet()
    self.tokenizer = copy.deepcopy(tokenizer)
    self.tokenizer.encode_special_tokens = True
    self.pre = self.tokenizer.pre_tokenizer
    added = {t['id'] for t in state.get('added_tokens', [])}
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    self.vocab_size = int(vocab_size or n_tok)
    if self.vocab_size < n_tok:
      raise ValueError(f'vocab_size {self.vocab_size} < the tokenizer\'s {n_tok} tokens')
    vocab = model['vocab']
    self.token_bytes: list[bytes | None] = [None] * self.vocab_size
    for piece, i in vocab.items():
      if i in added or i >= self.vocab_size:
        continue
      if not all(c in alphabet for c in piece):
        raise UnsupportedTokenizer(f'token {i} {piece!r} is not in the byte-level alphabet')
      self.token_bytes[i] = bytes(alphabet[c] for c in piece)
    self.by_bytes = {b: i for i, b in enumerate(self.token_bytes) if b is not None}
    self.byte_token = np.array([self.by_bytes.get(bytes([b]), -1) for b in range(256)], np.int64)
    self.text_ids = np.array([i for i, b in enumerate(self.token_bytes) if b], np.int64)
    self.max_len = max(len(self.token_bytes[i]) for i in self.text_ids)
    self.lengths = np.array([len(b) if b else 0 for b in self.token_bytes], np.int64)
    # text tokens sorted by their bytes: tokens with a given prefix form a contiguous range
    order = sorted(self.text_ids.tolist(), key=lambda i: self.token_bytes[i])
    self.sorted_ids = np.array(order, np.int64)
    self.sorted_bytes = [self.token_bytes[i] for i in order]
    self.sorted_lengths = self.lengths[self.sorted_ids]
    # sorted_next[k, m]: byte m of the k-th sorted token (256 past its end)
    self.sorted_next = np.full((len(order), self.max_len + 1), 256, np.int16)
    for k, b in enumerate(self.sorted_bytes):
      self.sorted_next[k, :len(b)] = np.frombuffer(b, np.uint8)
    self.first_byte = np.full(self.vocab_size, 256, np.int64)
    self.first_byte[self.sorted_ids] = self.sorted_next[:, 0]
    self.ranks = {}
    for r, m in enumerate(model.get('merges', [])):
      a, b = m.split(' ', 1) if isinstance(m, str) else m
      ia, ib, iab = vocab.get(a), vocab.get(b), vocab.get(a + b)
      if None in (ia, ib, iab):
        continue
      self.ranks.setdefault((ia, ib), (r, iab))
    self._groups = None
    self._k_ok: dict = {}
    self._probe_cache: dict = {}
    self._pair_index = None
    self._pair_rows: dict[int, np.ndarray] = {}
    self._outcomes: dict = {}

  @staticmethod
  def _check_pretokenizer(pre) -> bool:
    """Returns whether character classes must be fine (an unknown Split regex)."""
    if pre is None:
      raise UnsupportedTokenizer('a byte-level BPE needs a ByteLevel pre-tokenizer')
    parts = pre.get('pretokenizers', []) if pre.get('type') == 'Sequence' else [pre]
    fine = False
    byte_level = False
    for p in parts:
      t = p.get('type')
      if t == 'ByteLevel':
        if p.get('add_prefix_space'):
          raise UnsupportedTokenizer('ByteLevel(add_prefix_space=True) changes the text')
        byte_level = True
      elif t == 'Digits':
        pass
      elif t == 'Split' and p.get('behavior') in ('Isolated', 'Removed', 'MergedWithPrevious',
                                                     'MergedWithNext', 'Contiguous'):
        if p.get('behavior') == 'Removed' and not p.get('invert'):
          raise UnsupportedTokenizer('a Split pre-tokenizer that removes text')
        fine = True
      else:
        raise UnsupportedTokenizer(f'pre-tokenizer {t} is not supported')
    if not byte_level:
      raise UnsupportedTokenizer('a byte-level BPE needs a ByteLevel pre-tokenizer')
    return fine

  # -- encodings ----------------------------------------------------------------------------
  def encode(self, text: bytes) -> list[int]:
    """enc(text) for UTF-8 bytes (ValueError naming the first invalid byte, or the first byte
    the vocabulary cannot encode: a tokenizer without every byte drops it silently)."""
    text = bytes(text)
    n, partial = utf8_split(text)
    if partial:
      raise ValueError(f'text ends inside a UTF-8 character (byte {n})')
    ids = self.tokenizer.encode(text.decode('utf-8'), add_special_tokens=False).ids
    got = b''.join(self.token_bytes[i] or b'' for i in ids)
    if got != text:
      k = next((i for i, (a, b) in enumerate(zip(got, text)) if a != b), min(len(got), len(text)))
      raise ValueError(f'byte {k} (0x{text[k]:02x}): the vocabulary cannot encode this text (its '
                       'tokenizer has no token for it)')
    return ids

  def chunk_starts(self, text: str) -> list[int]:
    """Byte offsets where the pre-tokenizer's pieces of `text` start."""
    out, pos = [], 0
    for piece, _ in self.pre.pre_tokenize_str(text):
      out.append(pos)
      pos += len(piece)
    return out

  def bpe(self, b: bytes) -> list[int]:
    """The tokenizer's BPE of one chunk's bytes (no pre-tokenization)."""
    alphabet = _ALPHABET_CHARS
    return [t.id for t in self.tokenizer.model.tokenize(''.join(alphabet[x] for x in b))]

  def make_tail(self, text, end: int, tokens_rev) -> Tail:
    """The `Tail` of the canonical sequence whose bytes are text[:end] (a prefix of valid
    UTF-8); `tokens_rev` yields its tokens from the last one backwards. The tail starts at the
    third-last chunk start of text[:end] that is a token boundary of the sequence (0 if none)."""
    cb = end  # last character boundary <= end
    for p in range(end - 1, max(-1, end - 4), -1):
      k = _char_len(text[p])
      if k == 1 or (k > 1 and k <= end - p):
        break
      if k > 1:
        cb = p
        break
    window = 64
    while True:
      w0 = max(0, cb - window)
      while w0 > 0 and 0x80 <= text[w0] <= 0xBF:
        w0 -= 1
      starts = [w0 + s for s in self.chunk_starts(bytes(text[w0:cb]).decode('utf-8'))]
      if w0 == 0 or len(starts) > self.TAIL_CHUNKS + 1:
        break
      window *= 4
    if w0 > 0:
      starts = starts[1:]  # the window may cut the first piece
    elif not starts or starts[0] != 0:
      starts = [0] + starts
    cands = starts[-self.TAIL_CHUNKS:]
    anchor = cands[0]
    toks, pos = [], end
    for t in tokens_rev:
      if pos <= anchor:
        break
      toks.append(t)
      pos -= int(self.lengths[t])
    if pos != anchor:  # a token crosses the anchor: fall back to an earlier chunk start
      earlier = [s for s in starts if s <= pos]
      if not earlier or earlier[-1] != pos:
        raise RuntimeError(f'token boundaries of the sequence ending at byte {end} do not align '
                           f'with the pre-tokenizer\'s chunks (anchor {anchor}, token start {pos})')
    return Tail(bytes(text[pos:end]), tuple(toks[::-1]))

  # -- structure of every token's BPE ---------------------------------------------------------
  def _build_pair_index(self):
    v = self.vocab_size
    reachable = np.zeros(v, bool)
    birth = np.full(v, -1, np.int64)
    rspines: dict[int, list] = {}
    lspines: dict[int, list] = {}
    ls_y, ls_r, ls_d = [], [], []
    rs_x, rs_l, rs_d = [], [], []
    for t in self.text_ids.tolist():
      units = [int(self.byte_token[x]) for x in self.token_bytes[t]]
      if min(units) < 0:
        continue
      out = _bpe_trace(units, self.ranks)
      if len(out) != 1 or out[0][0] != t:
        continue
      reachable[t] = True
      birth[t] = out[0][1]
      rspines[t] = _spine(out[0], 3)
      lspines[t] = _spine(out[0], 2)
      for y, _, d in lspines[t]:
        ls_y.append(y)
        ls_r.append(t)
        ls_d.append(d)
      for x, _, d in rspines[t]:
        rs_x.append(x)
        rs_l.append(t)
        rs_d.append(d)
    ls_y, ls_r, ls_d = (np.array(a, np.int64) for a in (ls_y, ls_r, ls_d))
    order = np.argsort(ls_y, kind='stable')
    ls_y, ls_r, ls_d = ls_y[order], ls_r[order], ls_d[order]
    bounds = np.searchsorted(ls_y, np.arange(v + 1))
    rs_x, rs_l, rs_d = (np.array(a, np.int64) for a in (rs_x, rs_l, rs_d))
    order = np.argsort(rs_x, kind='stable')
    rs_x, rs_l, rs_d = rs_x[order], rs_l[order], rs_d[order]
    rbounds = np.searchsorted(rs_x, np.arange(v + 1))
    by_left: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    by_right: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    tmp: dict[int, list] = {}
    tmp_r: dict[int, list] = {}
    for (a, b), (r, _) in self.ranks.items():
      tmp.setdefault(a, []).append((b, r))
      tmp_r.setdefault(b, []).append((a, r))
    for a, lst in tmp.items():
      arr = np.array(lst, np.int64)
      by_left[a] = (arr[:, 0], arr[:, 1])
    for b, lst in tmp_r.items():
      arr = np.array(lst, np.int64)
      by_right[b] = (arr[:, 0], arr[:, 1])
    self.reachable = reachable
    self._pair_index = (birth, rspines, ls_r, ls_d, bounds, by_left)
    self._col_index = (lspines, rs_l, rs_d, rbounds, by_right)
    self._cols: dict[int, np.ndarray] = {}

  def pair_row(self, left: int) -> np.ndarray:
    """bool [V]: the pairs (left, r) that BPE keeps as two tokens (both reachable, no crossing
    merge fires)."""
    row = self._pair_rows.get(left)
    if row is not None:
      return row
    if self._pair_index is None:
      self._build_pair_index()
    birth, rspines, ls_r, ls_d, bounds, by_left = self._pair_index
    row = self.reachable.copy()
    if not self.reachable[left]:
      row[:] = False
    else:
      for x, bx, dx in rspines[left]:
        ys_ranks = by_left.get(x)
        if ys_ranks is None:
          continue
        ys, ranks = ys_ranks
        sel = (ranks > bx) & (ranks < dx) & (birth[ys] < ranks)
        for y, rho in zip(ys[sel].tolist(), ranks[sel].tolist()):
          lo, hi = bounds[y], bounds[y + 1]
          if lo == hi:
            continue
          owners = ls_r[lo:hi]
          row[owners[ls_d[lo:hi] >= rho]] = False
    if len(self._pair_rows) > 4096:
      self._pair_rows.clear()
    self._pair_rows[left] = row
    return row

  def pair_col(self, right: int) -> np.ndarray:
    """bool [V]: the pairs (l, right) that BPE keeps as two tokens (see `pair_row`)."""
    col = self._cols.get(right)
    if col is not None:
      return col
    if self._pair_index is None:
      self._build_pair_index()
    birth = self._pair_index[0]
    lspines, rs_l, rs_d, rbounds, by_right = self._col_index
    col = self.reachable.copy()
    if not self.reachable[right]:
      col[:] = False
    else:
      for y, by, dy in lspines[right]:
        xs_ranks = by_right.get(y)
        if xs_ranks is None:
          continue
        xs, ranks = xs_ranks
        sel = (ranks > by) & (ranks <= dy) & (birth[xs] < ranks)
        for x, rho in zip(xs[sel].tolist(), ranks[sel].tolist()):
          lo, hi = rbounds[x], rbounds[x + 1]
          if lo == hi:
            continue
          owners = rs_l[lo:hi]
          col[owners[rs_d[lo:hi] > rho]] = False
    if len(self._cols) > 4096:
      self._cols.clear()
    self._cols[right] = col
    return col

  def _class_col(self, members: tuple[str, ...]) -> np.ndarray:
    """bool [V]: tokens v that pair validly with the single-character token of some member."""
    key = ('class',) + members
    col = self._cols.get(key)
    if col is None:
      col = np.zeros(self.vocab_size, bool)
      for ch in members:
        toks = self.bpe(ch.encode('utf-8'))
        if toks:  # a byte missing from the vocabulary cannot follow
          col |= self.pair_col(toks[0])
      self._cols[key] = col
    return col

  # -- groups of tokens that pre-tokenize alike -------------------------------------------------
  def _build_groups(self):
    """For each apostrophe context of the tail (none / ends with ' / ends with ' + 1 char): an
    int [V] group id per token (-1: never valid after a complete tail, e.g. it starts inside a
    character) and per group its representative strings (one per class of the completion of a
    trailing partial character, with the character count of the complete part)."""
    variants = []
    self._partial_tokens = []
    for vi, before in enumerate(('', "'", "'a")):
      gid = np.full(self.vocab_size, -1, np.int64)
      reps: list[tuple[tuple[str, ...], int]] = []
      index: dict = {}
      for t in self.text_ids.tolist():
        b = self.token_bytes[t]
        if _char_len(b[0]) == 0:
          continue
        try:
          n, partial = utf8_split(b)
        except ValueError:
          continue
        head = b[:n].decode('utf-8')
        comps = _rests(partial) if partial else (('', '', ()),)
        short, _, kept = _compress(head, self.fine, self.digits)
        full_sig = _signature(head, self.fine, before)
        key = (''.join(full_sig[k] for k in kept[:-1]), tuple(c[0] for c in comps))
        g = index.get(key)
        if g is None:
          g = index[key] = len(reps)
          reps.append((tuple(short + c[1] for c in comps), len(short)))
        gid[t] = g
        if partial and vi == 0:
          self._partial_tokens.append(t)
      variants.append((gid, reps))
    self._groups = variants
    self._partial_idx = np.array(self._partial_tokens, np.int64)

  # Continuations that decide how the text so far is cut into pieces. A regex pre-tokenizer
  # looks at most two characters ahead (contractions), and only at character classes, so one
  # character per class -- each class standing for all of its ASCII members -- and the
  # contraction letters after an apostrophe cover every continuation.
  _LETTERS = ''.join(chr(c) for c in range(128) if chr(c).isalpha())
  _CONTRACT = 'stremvld'

  def _probes(self, before: str) -> list[tuple[str, tuple[str, ...]]]:
    """(probe string, the ASCII characters its first character stands for) for a text ending
    in `before` (its last two characters)."""
    key = "'" in before
    cached = self._probe_cache.get(key)
    if cached is None:
      cached = self._probe_cache[key] = self._make_probes(before)
    return cached

  def _make_probes(self, before: str) -> list[tuple[str, tuple[str, ...]]]:
    if self.fine:
      out = [('', ())] + [(chr(c), (chr(c),)) for c in range(128)]
    else:
      ws = tuple(c for c in '\t\n\x0b\x0c\r')
      other = tuple(chr(c) for c in range(128) if not chr(c).isalnum() and chr(c) not in
                    _WHITE_SPACE and chr(c) != "'")
      out = [('', ()), (' ', (' ',)), ('\t', ws), ('0', tuple('0123456789')), ('.', other),
             ("'", ("'",))]
      if "'" in before:  # contractions: letters after an apostrophe are not alike
        out += [(c, (c,)) for c in self._CONTRACT] + [('re', ()), ('ve', ()), ('ll', ())]
        out.append(('a', tuple(c for c in self._LETTERS if c not in self._CONTRACT)))
      else:
        out.append(('a', tuple(self._LETTERS)))
    out += [(c, ()) for c in ('\u00e9', '\u0663', '\u3000', '\u2014')]  # non-ASCII classes
    return out

  def _alternatives(self, text: str, strs: tuple[str, ...], head: int):
    """How tail `text` + token (`strs`: its representative per completion class; `head`: the
    characters of its complete part) can continue: a set of (piece starts inside the tail, in
    characters; straddle), one per probe that leaves no piece boundary inside the token.
    straddle None: the token ends its piece; ('z', chars, members): the piece goes on with the
    probe characters `chars` (the first standing for `members`); ('p', k, chars): the token
    ends inside a character, completed by class k then `chars`."""
    tc = len(text)
    out = set()
    for k, rep in enumerate(strs):
      partial = len(rep) > head
      wl = head + 1 if partial else len(rep)
      for z, members in self._probes((text + rep)[-2:]):
        full = text + rep + z
        starts = [a for _, (a, _) in self.pre.pre_tokenize_str(full)]
        if any(tc < a < tc + wl for a in starts):
          continue
        in_tail = tuple(a for a in starts if a <= tc)
        end = tc + len(rep)
        nxt = min([a for a in starts if a >= end] + [len(full)])
        if partial:
          out.add((in_tail, ('p', k, full[end:nxt])))
        elif nxt == end:
          out.add((in_tail, None))
        else:
          out.add((in_tail, ('z', full[end:nxt], members if nxt - end == 1 else ())))
    return out

  def _completable(self, v: int, k: int, chars: str) -> bool:
    """For a token v ending inside a character: some completion of completion class k, then
    `chars`, gives a first next token that does not merge into v."""
    key = (v, k, chars)
    ok = self._k_ok.get(key)
    if ok is None:
      _, partial = utf8_split(self.token_bytes[v])
      row = self.pair_row(v)
      tail = chars.encode('utf-8')
      ok = any(row[t[0]] for r in _iter_rests(partial, _rests(partial)[k][2])
               for t in [self.bpe(r + tail)] if t)
      self._k_ok[key] = ok
    return ok

  def row(self, tail: Tail) -> np.ndarray:
    """bool [V]: tokens v such that (the sequence ending in `tail`) + [v] is canonical."""
    _, partial = utf8_split(tail.text)
    if partial:
      return self._row_pending(tail, partial)
    if self._groups is None:
      self._build_groups()
    if self._pair_index is None:
      self._build_pair_index()
    text = tail.text.decode('utf-8')
    # Only the last piece -- and the one before it when it ends with an apostrophe or a space
    # (contractions, whitespace lookahead) -- can be cut differently once more text follows;
    # the rest of the tail keeps its pieces. Outcomes are cached by the shortened class string.
    own = [a for _, (a, _) in self.pre.pre_tokenize_str(text)]
    mini_at = own[-1] if own else 0
    if len(own) >= 2 and (text[mini_at - 1] == "'" or text[mini_at - 1] in _WHITE_SPACE):
      mini_at = own[-2]
    mini, mini_sig, kept = _compress(text[mini_at:], self.fine, self.digits)
    before = mini[-2:]
    variant = 1 if before[-1:] == "'" else 2 if before[:1] == "'" and len(before) == 2 else 0
    gid, reps = self._groups[variant]
    key = (mini_sig, variant)
    entries = self._outcomes.get(key)
    if entries is None:
      by_alt: dict = {}
      for g, (strs, head) in enumerate(reps):
        for alt in self._alternatives(mini, strs, head):
          by_alt.setdefault(alt, []).append(g)
      entries = []
      for (starts, straddle), groups in by_alt.items():
        in_groups = np.zeros(len(reps) + 1, bool)
        in_groups[groups] = True
        mask = in_groups[gid] & (gid >= 0)
        if straddle is not None and straddle[0] == 'p':  # only tokens ending in a character
          entries.append((starts, straddle, self._partial_idx[mask[self._partial_idx]]))
        else:
          entries.append((starts, straddle, np.packbits(mask)))
      if len(self._outcomes) > 4096:
        self._outcomes.clear()
      self._outcomes[key] = entries
    offs = np.cumsum([0] + [len(c.encode('utf-8')) for c in text]).tolist()
    fixed = [offs[a] for a in own if a < mini_at]
    verdicts: dict = {}
    pair = self.pair_row(tail.tokens[-1]) if tail.tokens else None
    valid = np.zeros(self.vocab_size, bool)
    late = []
    for starts, straddle, packed in entries:
      code = verdicts.get(starts)
      if code is None:
        code = verdicts[starts] = self._consistent(
            tail, fixed + [offs[mini_at + kept[a]] for a in starts])
      if not code or (code == PAIR and pair is None):
        continue
      if straddle is not None and straddle[0] == 'p':
        cand = packed[(self.reachable if code == NEW else pair)[packed]]
        late.append((cand, straddle))
        continue
      m = np.unpackbits(packed, count=self.vocab_size).astype(bool)
      m &= self.reachable if code == NEW else pair
      if straddle is None:
        pass
      elif straddle[0] == 'z':
        _, chars, members = straddle
        if members:
          m &= self._class_col(members)
        else:
          toks = self.bpe(chars.encode('utf-8'))
          m &= self.pair_col(toks[0]) if toks else False
      valid |= m
    for cand, (_, k, chars) in late:  # tokens ending inside a character
      for v in cand.tolist():
        if not valid[v] and self._completable(v, k, chars):
          valid[v] = True
    return valid

  def is_exact(self, tail: Tail) -> bool:
    """Is the sequence ending in `tail` the encoding of its own text (so the text may end)?"""
    try:
      _, partial = utf8_split(tail.text)
    except ValueError:
      return False
    if partial:
      return False
    starts = self.chunk_starts(tail.text.decode('utf-8')) + [len(tail.text)]
    return self._consistent(tail, starts) == NEW

  def _consistent(self, tail: Tail, starts: list[int]) -> int:
    """Outcome bit for a chunking of tail + w whose piece starts inside the tail are `starts`
    (bytes; the last one begins w's piece): 0 if the tail's tokens are not the encoding of those
    pieces, NEW if w's piece starts at w, PAIR if it extends the tail's last token."""
    bounds = np.cumsum([0] + [int(self.lengths[t]) for t in tail.tokens]).tolist()
    end = len(tail.text)
    pos = {b: k for k, b in enumerate(bounds)}
    starts = sorted(set(starts) | {0})
    if any(s not in pos for s in starts):
      return 0
    segs = starts + [end]
    for a, b in zip(segs[:-1], segs[1:]):
      if a == b:
        continue
      if self.bpe(tail.text[a:b]) != list(tail.tokens[pos[a]:pos[b]]):
        return 0
    return NEW if starts[-1] == end else PAIR

  def _row_pending(self, tail: Tail, partial: bytes) -> np.ndarray:
    """Row for a sequence ending inside a character: candidates must continue that character;
    each is checked like `valid_slow`, with the pair rule for the BPE part (few tokens start
    with continuation bytes)."""
    valid = np.zeros(self.vocab_size, bool)
    for t in self.text_ids.tolist():
      b = self.token_bytes[t]
      if not 0x80 <= b[0] <= 0xBF or not _cont_ok(partial, b[0]):
        continue
      valid[t] = self._valid(tail, t, structural=True)
    return valid

  # -- the definition, directly -------------------------------------------------------------
  def valid_slow(self, tail: Tail, v: int) -> bool:
    return self._valid(tail, v, structural=False)

  def _valid(self, tail: Tail, v: int, structural: bool) -> bool:
    """Is (sequence ending in `tail`) + [v] canonical, i.e. a prefix of the tokenizer's
    encoding of this text followed by some continuation? Checked piece by piece with the
    tokenizer's own pre-tokenizer and BPE, for every probe continuation (each ASCII character,
    contraction letters, a character of each non-ASCII class, the end of text) and, if the text
    ends inside a character, every completion of it: the pieces must start at token boundaries,
    the pieces inside the text must re-encode to its tokens, and the piece that goes on past
    its end must encode to its tokens followed by more."""
    w = self.token_bytes[v] if 0 <= v < self.vocab_size else None
    if w is None:
      return False
    s = tail.text + w
    try:
      n, partial = utf8_split(s)
    except ValueError:
      return False
    toks = list(tail.tokens) + [v]
    bounds = np.cumsum([0] + [int(self.lengths[t]) for t in toks]).tolist()
    if bounds[-1] != len(s):
      return False
    pos = {b: k for k, b in enumerate(bounds)}
    head = s[:n].decode('utf-8')
    for _, c, runs in (_rests(partial) if partial else (('', '', None),)):
      for z, members in self._probes((head + c)[-2:]):
        # the cut into pieces depends only on character classes: once per class
        full = head + c + z
        offs = np.cumsum([0] + [len(ch.encode('utf-8')) for ch in full]).tolist()
        starts = [offs[a] for _, (a, _) in self.pre.pre_tokenize_str(full)]
        inside = [a for a in starts if a < len(s)]
        if any(a not in pos for a in inside):
          continue
        segs = sorted(set(inside) | {0})
        if not all(self.bpe(s[a:b]) == toks[pos[a]:pos[b]] for a, b in zip(segs[:-1], segs[1:])):
          continue
        q = segs[-1]
        want = toks[pos[q]:]
        full_b = full.encode('utf-8')
        done = n + len(c.encode('utf-8'))  # bytes of text + completed character
        nxt = min([a for a in starts if a >= done] + [len(full_b)])
        after = full_b[done:nxt]  # probe characters in the piece that goes on past the text
        firsts = ([m.encode('utf-8') + after[1:] for m in members]
                  if members and len(after) == 1 else [after])
        if structural:  # the same, by the pair rule: BPE(piece) == tokens, then a valid pair
          if self.bpe(s[q:]) != want:
            continue
          if not partial and not after:
            return True
          key = ('cont', v, partial, runs, tuple(firsts))
          ok = self._k_ok.get(key)
          if ok is None:
            row = self.pair_row(v)
            rests = _iter_rests(partial, runs) if partial else (b'',)
            ok = self._k_ok[key] = any(row[t[0]] for r in rests for f in firsts
                                       for t in [self.bpe(r + f)] if t)
          if ok:
            return True
          continue
        rests = _iter_rests(partial, runs) if partial else (b'',)
        if any(self.bpe(s[q:] + r + f)[:len(want)] == want for r in rests for f in firsts):
          return True
    return False

  # -- lookups ----------------------------------------------------------------------------------
  def prefix_range(self, prefix: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
    """[a, b): the sorted tokens whose bytes start with `prefix` (searching within [lo, hi))."""
    hi = len(self.sorted_bytes) if hi is None else hi
    a = bisect.bisect_left(self.sorted_bytes, prefix, lo, hi)
    b = bisect.bisect_right(self.sorted_bytes, prefix + b'\xff' * (self.max_len + 1), a, hi)
    return a, b


_ALPHABET_CHARS = {b: c for c, b in byte_alphabet().items()}
