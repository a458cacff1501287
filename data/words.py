"""Word splitting for hierarchical byte -> word models (HAT), and the per-batch word layout.

A splitter cuts a text into words such that concatenating the words gives the text back (every
byte in exactly one word). It is chosen by a config string (`get_splitter(spec,
max_word_bytes)`):

* `whitespace` -- split at Unicode whitespace (Python's `str.isspace`). Whitespace goes with the
  *following* word, as in HAT: a word starts at a whitespace character that follows a
  non-whitespace character, so a word is a run of whitespace and then a run of non-whitespace
  (`'a  b\\tc\\n'` -> `['a', '  b', '\\tc', '\\n']`; leading whitespace opens the first word).
* `unicode` -- the HAT splitter rule (Aleph-Alpha's hat-splitter): UAX#29 word bounds, camelCase
  split, punctuation attached to the word before it ("split after punctuation"), one space
  attached to the following word, any other whitespace (tabs, newlines, runs of 2+ spaces, NBSP)
  a word of its own (`'Hello, world!'` -> `['Hello,', ' world!']`, `'a  b'` -> `['a', '  ', 'b']`).
  Built on `unicodedata` alone (no ICU / regex packages); see "unicode approximations" below.
* `ascii_whitespace` -- `whitespace` with ASCII whitespace only (space, \\t, \\n, \\v, \\f, \\r and
  0x1c-0x1f; multi-byte whitespace such as NBSP is a word character), so every decision is
  made at the byte itself (`byte_level`): the words of the paper's next-word accuracy, and the
  rule HAT's word-boundary tokens need (`model.pooling='boundary'`).
* `spacebyte` -- SpaceByte's rule on bytes: a byte is *spacelike* unless it is an ASCII
  letter/digit or a UTF-8 continuation byte (0x80-0xBF); a word starts at the first byte of every
  run of spacelike bytes (`'Hello, world!'` -> `['Hello', ', world', '!']`). Non-ASCII
  characters are spacelike by their lead byte, so `'héllo'` -> `['h', 'éllo']`.
* `fixed:N` (N >= 4) -- words of at most N bytes, filled greedily, never cutting a UTF-8
  character: a character longer than the space left starts the next word.

`max_word_bytes` (>= 4, or 0 for no cap) applies on top of every rule: a longer word is cut
greedily into pieces of at most `max_word_bytes` bytes, only at UTF-8 character boundaries (a
character that does not fit starts the next piece). The minimum is 4 because a UTF-8 character
has up to 4 bytes; with a cap >= 4 no single character ever exceeds it.

**Causality.** Every rule decides whether character (or byte) i starts a word from the text up
to and including i only, so the words of a prefix are the whole text's words except that the
last one may be cut short: `starts(text[:k]) == [s for s in starts(text) if s < k]`. This holds
for every character cut; for `spacebyte` and `fixed:N` (byte-level rules, `byte_level=True`) it
holds for every byte cut too, since their decision at a lead byte uses only the character length
the lead byte announces. The `Cursor` (from `Splitter.cursor()`) is the incremental form used for
generation: push characters (bytes for byte-level rules) one at a time; `push` says whether that
one starts a new word. `Splitter.is_new_word(prefix, next_char)` wraps it.

**Bytes that are not valid UTF-8** (rows of packed documents may start or end inside a
character) are read with Python's `surrogateescape`: each undecodable byte is a character of its
own (never whitespace, never a letter), so every rule is defined on arbitrary bytes and `split`
and `split_bytes` agree (`split_bytes(text.encode())` gives the byte offsets of `split(text)`).

**Unicode approximations** (of UAX#29 + hat-splitter; all chosen so causality holds):
  - Word_Break classes come from general categories: letters L* and Nl are ALetter (Hebrew
    letters Hebrew_Letter); Nd is Numeric; Pc (`_`) is ExtendNumLet; Mn/Mc/Me, Cf (but ZWSP),
    emoji skin-tone modifiers are Extend/Format; Zs without no-break spaces is WSegSpace;
    MidLetter/MidNum/MidNumLet/quotes are the UAX#29 code point lists (U+2044 FRACTION SLASH,
    the one non-punctuation MidNum, is treated as a symbol). Extended_Pictographic is
    approximated by code point ranges (U+2194-U+2B55 pictographs, U+1F000-U+1FAFF, ...).
  - Han ideographs and Hiragana are one word per character (plus their marks); Katakana runs
    stay together (WB13); Thai/Lao/Khmer/Myanmar runs stay together like letters (ICU would
    use a dictionary there). U+202F (narrow NBSP, ExtendNumLet in UAX#29) is whitespace.
  - UAX#29's look-ahead rules (WB6, WB7b, WB12: no break *before* `'`, `.`, `:`, `,`, `"` when a
    letter/digit follows) need no look-ahead here: those characters are punctuation, which never
    starts a word after a letter/digit anyway; the look-behind halves (WB7, WB7c, WB11) are kept,
    so `can't`, `3.14`, `1,000`, `e.g.` and Hebrew `צה"ל` are single words.
  - camelCase: a word starts at an uppercase letter (Lu) whose previous base character (marks
    skipped) is lowercase (Ll): `fooBarBaz` -> `foo|Bar|Baz`, but `HTTPServer` stays whole and
    `parseHTTPResponse` -> `parse|HTTPResponse` (the usual `HTTP|Server` needs look-ahead).
  - Combining marks, ZWJ, variation selectors and skin-tone modifiers always stay with their
    base character: `.` + U+0301 stays punctuation (hat-splitter would retype it as a word), and
    `_` joins words like a letter (hat-splitter: punctuation when alone).
  - ZWJ emoji sequences (WB3c), regional-indicator pairs (WB15/16), CR LF (WB3) and runs of
    spaces (WB3d) are single UAX#29 segments.

**Speed** (one CPU core): `whitespace`, `spacebyte` and `fixed:N` are vectorized numpy over a
whole batch; `unicode` is a per-character Python state machine (about 1-2 MB/s).

`batch_words` builds what a HAT model needs from a packed byte batch (see `data/pipeline.py`):
per-byte word ids, per-word starts / lengths / segment ids / positions and a `[W, Lw]` gather
index (-1 padded). `word_ids(starts, n)` maps bytes to word indices.
"""
from __future__ import annotations

import abc
import unicodedata

import numpy as np

MIN_WORD_BYTES = 4
SPLITTERS = ('whitespace', 'ascii_whitespace', 'unicode', 'spacebyte', 'fixed:N', 'entropy')

# --- UTF-8 byte tables -------------------------------------------------------------------------

_IS_CONT = np.zeros(256, bool)
_IS_CONT[0x80:0xC0] = True
# Bytes a unit starting with this byte needs in the current word: a lead byte announces its
# character's length (valid UTF-8: exactly the character's length); anything else needs 1.
_NEED = np.ones(256, np.int64)
_NEED[0xC0:0xE0] = 2
_NEED[0xE0:0xF0] = 3
_NEED[0xF0:0xF8] = 4
_NEED_LIST = [int(x) for x in _NEED]

_SPACELIKE = np.ones(256, bool)
for _lo, _hi in ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x80, 0xBF)):
  _SPACELIKE[_lo:_hi + 1] = False
_SPACELIKE_LIST = [bool(x) for x in _SPACELIKE]

# Python's str.isspace() characters (tests check this list against all of Unicode).
WHITESPACE = ('\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680' +
              ''.join(chr(c) for c in range(0x2000, 0x200B)) + '\u2028\u2029\u202f\u205f\u3000')
_ASCII_WS = np.zeros(256, bool)
for _c in WHITESPACE:
  if ord(_c) < 0x80:
    _ASCII_WS[ord(_c)] = True
_MB_WS = {}  # multi-byte whitespace: lead byte -> set of encodings
for _c in WHITESPACE:
  _e = _c.encode('utf-8')
  if len(_e) > 1:
    _MB_WS.setdefault(_e[0], set()).add(_e)
_WS_LEADS = np.array(sorted(_MB_WS), np.uint8)
_WS2 = np.array(sorted((e[0] << 8) | e[1] for s in _MB_WS.values() for e in s if len(e) == 2))
_WS3 = np.array(sorted((e[0] << 16) | (e[1] << 8) | e[2] for s in _MB_WS.values() for e in s
                       if len(e) == 3))


def _char_len(ch: str) -> tuple[int, int]:
  """(bytes, need) of one character of a surrogateescape-decoded string."""
  cp = ord(ch)
  if cp < 0x80:
    return 1, 1
  if cp < 0x800:
    return 2, 2
  if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte
    return 1, _NEED_LIST[cp - 0xDC00]
  if cp < 0x10000:
    return 3, 3
  return 4, 4


def _decode(data: bytes) -> str:
  return data.decode('utf-8', 'surrogateescape')


def _encode(text: str) -> bytes:
  return text.encode('utf-8', 'surrogateescape')


# --- The max_word_bytes cap ---------------------------------------------------------------------


def _apply_cap(buf: np.ndarray, starts: np.ndarray, cap: int) -> np.ndarray:
  """Cuts words (`starts`: bool mask, True at 0) longer than `cap` greedily (vectorized).

  Byte i opens a new piece when `(i - piece_start) + need(i) > cap`, `need` being the length a
  lead byte announces (1 for other bytes). Since need <= 4 <= cap, the cut after a piece start p
  is the first of the four bytes p+cap-3 .. p+cap (inside the word) with i + need(i) > p + cap:
  p + cap itself unless a character straddles it. Each round cuts one piece off every long word,
  after first taking all at once the pieces of a stretch of ASCII (cuts every `cap` bytes).
  """
  if not cap or buf.size == 0:
    return starts
  n = buf.size
  st = np.flatnonzero(starts)
  ends = np.append(st[1:], n)
  maybe = (ends - st) > cap - 3  # shorter words fit even with a truncated character at the end
  if not maybe.any():
    return starts
  out = starts.copy()
  p, e = st[maybe], ends[maybe]
  non_ascii = np.flatnonzero(buf >= 0x80)
  offsets = np.arange(cap - 3, cap + 1, dtype=np.int64)
  while p.size:
    nxt = np.append(non_ascii, n)[np.searchsorted(non_ascii, p)]  # first non-ASCII byte >= p
    k = np.maximum(np.minimum(nxt - p - 1, e - p - 1), 0) // cap   # cuts p + cap, ..., p + k cap
    if k.any():
      reps = np.repeat(p, k)
      first = np.repeat(np.cumsum(k) - k, k)
      out[reps + cap * (np.arange(reps.size) - first + 1)] = True
      p = p + k * cap
    cand = p[:, None] + offsets
    ok = (cand < e[:, None]) & (cand + _NEED[buf[np.minimum(cand, n - 1)]] > (p + cap)[:, None])
    keep = ok.any(axis=1)
    p = cand[keep, ok[keep].argmax(axis=1)]
    e = e[keep]
    out[p] = True
  return out


# --- Rules: the per-character (or per-byte) state machines --------------------------------------


class _Rule(abc.ABC):
  """Uncapped boundary decisions, one unit at a time (a fresh rule is at a text start)."""

  @abc.abstractmethod
  def step(self, unit) -> bool:
    """Whether `unit` (a str character, or an int byte for byte-level rules) starts a word."""

  def copy(self):
    new = object.__new__(type(self))
    for k in self.__slots__:
      setattr(new, k, getattr(self, k))
    return new


class _SpaceByteRule(_Rule):
  __slots__ = ('prev',)

  def __init__(self):
    self.prev = None  # spacelike-ness of the previous byte (None: text start)

  def step(self, b: int) -> bool:
    s = _SPACELIKE_LIST[b]
    new = self.prev is None or (s and not self.prev)
    self.prev = s
    return new


class _FixedRule(_Rule):
  __slots__ = ('started',)

  def __init__(self):
    self.started = False

  def step(self, b: int) -> bool:
    new, self.started = not self.started, True
    return new


class _AsciiWhitespaceRule(_Rule):
  __slots__ = ('prev',)

  def __init__(self):
    self.prev = None  # whether the previous byte was ASCII whitespace (None: text start)

  def step(self, b: int) -> bool:
    ws = bool(_ASCII_WS[b])
    new = self.prev is None or (ws and not self.prev)
    self.prev = ws
    return new


class _WhitespaceRule(_Rule):
  __slots__ = ('prev',)

  def __init__(self):
    self.prev = None  # whether the previous character was whitespace (None: text start)

  def step(self, ch: str) -> bool:
    ws = ch.isspace()
    new = self.prev is None or (ws and not self.prev)
    self.prev = ws
    return new


# Word_Break classes (approximate, see the module doc).
(_OTHER, _CR, _LF, _NL, _ZWJ, _EXT, _RI, _HL, _AL, _SQ, _DQ, _MNL, _ML, _MN, _NUM, _KATA, _ENL,
 _WSS) = range(18)
_AH = (_AL, _HL)
_NEWLINES = (_CR, _LF, _NL)
# hat-splitter token kinds of a character: the start of a Space / Whitespace / Punctuation / Word
_T_SPACE, _T_WS, _T_PUNCT, _T_WORD = range(4)
# Kind of the finished token before a boundary: exactly ' ', all whitespace, anything else.
_L_SPACE, _L_WS, _L_OTHER = range(3)

_MIDNUMLET = {0x2E, 0x2018, 0x2019, 0x2024, 0xFE52, 0xFF07, 0xFF0E}
_MIDLETTER = {0x3A, 0xB7, 0x387, 0x55F, 0x5F4, 0x2027, 0xFE13, 0xFE55, 0xFF1A}
_MIDNUM = {0x2C, 0x3B, 0x37E, 0x589, 0x60C, 0x60D, 0x66C, 0x7F8, 0xFE10, 0xFE14, 0xFE50, 0xFE54,
           0xFF0C, 0xFF1B}
_NEWLINE_CPS = {0x0B, 0x0C, 0x85, 0x2028, 0x2029}
_NOBREAK_SPACES = {0xA0, 0x2007, 0x202F}
_KATAKANA = ((0x30A1, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF), (0x32D0, 0x32FE),
             (0x3300, 0x3357), (0xFF66, 0xFF9D))
_IDEOGRAPHIC = ((0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B), (0x3041, 0x309F),
                (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x1B000, 0x1B16F),
                (0x20000, 0x3FFFF))
_PICTOGRAPHIC = ((0xA9, 0xA9), (0xAE, 0xAE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
                 (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B),
                 (0x2328, 0x2328), (0x2388, 0x2388), (0x23CF, 0x23CF), (0x23E9, 0x23F3),
                 (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB), (0x25B6, 0x25B6),
                 (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x27BF), (0x2934, 0x2935),
                 (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
                 (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
                 (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA), (0x1F400, 0x1FAFF), (0x1FC00, 0x1FFFD))


def _in(cp: int, ranges) -> bool:
  return any(lo <= cp <= hi for lo, hi in ranges)


def _word_break_class(ch: str) -> int:
  cp = ord(ch)
  cat = unicodedata.category(ch)
  if cp == 0x0D:
    return _CR
  if cp == 0x0A:
    return _LF
  if cp in _NEWLINE_CPS:
    return _NL
  if cp == 0x200D:
    return _ZWJ
  if 0x1F1E6 <= cp <= 0x1F1FF:
    return _RI
  if cat in ('Mn', 'Mc', 'Me') or 0x1F3FB <= cp <= 0x1F3FF or (cat == 'Cf' and cp != 0x200B):
    return _EXT
  if cp == 0x27:
    return _SQ
  if cp == 0x22:
    return _DQ
  if cp in _MIDNUMLET:
    return _MNL
  if cp in _MIDLETTER:
    return _ML
  if cp in _MIDNUM:
    return _MN
  if cat == 'Nd':
    return _NUM
  if cat == 'Pc':
    return _ENL
  if cat == 'Zs' and cp not in _NOBREAK_SPACES:
    return _WSS
  if _in(cp, _KATAKANA):
    return _KATA
  if _in(cp, _IDEOGRAPHIC):
    return _OTHER
  if cat[0] == 'L' or cat == 'Nl':
    if cat == 'Lo' and (0x5D0 <= cp <= 0x5F2 or 0xFB1D <= cp <= 0xFB4F):
      return _HL
    return _AL
  return _OTHER


_INFO: dict[str, tuple[int, bool, int, int]] = {}


def _char_info(ch: str) -> tuple[int, bool, int, int]:
  """(word-break class, extended pictographic, token kind, case: 1 lower 2 upper 0 other)."""
  info = _INFO.get(ch)
  if info is None:
    cat = unicodedata.category(ch)
    if ch == ' ':
      kind = _T_SPACE
    elif ch.isspace():
      kind = _T_WS
    elif cat[0] == 'P' and cat != 'Pc':
      kind = _T_PUNCT
    else:
      kind = _T_WORD
    case = 1 if cat == 'Ll' else 2 if cat == 'Lu' else 0
    info = (_word_break_class(ch), _in(ord(ch), _PICTOGRAPHIC), kind, case)
    _INFO[ch] = info
  return info


class _UnicodeRule(_Rule):
  """UAX#29 word bounds (causal form) + hat-splitter's camelCase / punctuation / space rules."""
  __slots__ = ('started', 'raw', 'prev', 'prev2', 'ri_odd', 'lower', 'last')

  def __init__(self):
    self.started = False
    self.raw = self.prev = self.prev2 = _OTHER  # last char's class; last two base classes
    self.ri_odd = False   # the run of regional indicators ending at `prev` has odd length
    self.lower = False    # the last base character is lowercase (Ll)
    self.last = _L_OTHER  # kind of the current token so far

  def _segment_break(self, wb: int, pict: bool) -> bool:
    raw, p = self.raw, self.prev
    if raw == _CR and wb == _LF:                     # WB3
      return False
    if raw in _NEWLINES or wb in _NEWLINES:          # WB3a, WB3b
      return True
    if raw == _ZWJ and pict:                         # WB3c
      return False
    if raw == _WSS and wb == _WSS:                   # WB3d
      return False
    if wb == _EXT or wb == _ZWJ:                     # WB4
      return False
    if p in _AH:
      if wb in _AH or wb == _NUM or wb == _ENL:      # WB5, WB9, WB13a
        return False
      if p == _HL and wb == _SQ:                     # WB7a
        return False
    elif p == _NUM:
      if wb == _NUM or wb in _AH or wb == _ENL:      # WB8, WB10, WB13a
        return False
    elif p == _KATA:
      if wb == _KATA or wb == _ENL:                  # WB13, WB13a
        return False
    elif p == _ENL:
      if wb in _AH or wb == _NUM or wb == _KATA or wb == _ENL:  # WB13a, WB13b
        return False
    elif p == _RI:
      if wb == _RI and self.ri_odd:                  # WB15, WB16
        return False
    elif p in (_ML, _MNL, _SQ):
      if self.prev2 in _AH and wb in _AH:            # WB7
        return False
      if self.prev2 == _NUM and wb == _NUM and p != _ML:  # WB11
        return False
    elif p == _MN:
      if self.prev2 == _NUM and wb == _NUM:          # WB11
        return False
    elif p == _DQ:
      if self.prev2 == _HL and wb == _HL:            # WB7c
        return False
    return True                                      # WB999

  def step(self, ch: str) -> bool:
    wb, pict, kind, case = _char_info(ch)
    if not self.started:
      brk, camel = True, False
    else:
      brk = self._segment_break(wb, pict)
      camel = not brk and self.lower and case == 2
    if brk or camel:
      if camel or kind <= _T_WS or not self.started:  # a camel hump and whitespace open a word
        new = True
      elif kind == _T_PUNCT:         # punctuation joins anything but whitespace
        new = self.last == _L_WS
      else:                          # a word joins only a preceding single space
        new = self.last != _L_SPACE
      self.last = _L_SPACE if kind == _T_SPACE else _L_WS if kind == _T_WS else _L_OTHER
    else:
      new = False
      if self.last != _L_OTHER:
        self.last = _L_WS if kind <= _T_WS else _L_OTHER
    if not self.started or (wb != _EXT and wb != _ZWJ) or self.raw in _NEWLINES:
      self.ri_odd = (not self.ri_odd if self.prev == _RI else True) if wb == _RI else False
      self.prev2, self.prev = self.prev, wb
      self.lower = case == 1
    self.raw = wb
    self.started = True
    return new


# --- Splitters ----------------------------------------------------------------------------------


class Cursor:
  """Incremental splitting: `push` the text's units in order; each answer says whether that unit
  starts a new word (the first unit always does). A unit is one character's UTF-8 bytes, or one
  byte for byte-level splitters (which also accept whole characters). `feed` pushes a whole byte
  string and returns the word starts in it. Exact for any text fed from its start."""

  def __init__(self, rule: _Rule, cap: int, byte_level: bool):
    self._rule, self._cap, self._byte_level = rule, cap, byte_level
    self._piece = 0  # bytes in the current word so far

  def copy(self) -> Cursor:
    new = Cursor(self._rule.copy(), self._cap, self._byte_level)
    new._piece = self._piece  # pylint: disable=protected-access
    return new

  def _cap_step(self, base: bool, need: int, nbytes: int) -> bool:
    if base or (self._cap and self._piece + need > self._cap):
      self._piece = nbytes
      return True
    self._piece += nbytes
    return False

  def _units(self, data: bytes):
    """(unit for the rule, need, nbytes) for each unit of `data`."""
    if self._byte_level:
      for b in data:
        yield b, _NEED_LIST[b], 1
    else:
      for ch in _decode(data):
        nbytes, need = _char_len(ch)
        yield ch, need, nbytes

  def push(self, unit: bytes) -> bool:
    """Whether `unit` starts a new word. Raises if a word would start inside `unit`."""
    if not unit:
      raise ValueError('push needs a non-empty unit')
    out = None
    for u, need, nbytes in self._units(bytes(unit)):
      new = self._cap_step(self._rule.step(u), need, nbytes)
      if out is None:
        out = new
      elif new:
        raise ValueError(f'a word starts inside the pushed unit {unit!r}: push one character '
                         f'(or byte, for byte-level splitters) at a time')
    return out

  def feed(self, data: bytes, offset: int = 0) -> list[int]:
    """Pushes all of `data`; returns the offsets (plus `offset`) where words start."""
    out, pos = [], offset
    step, cap_step = self._rule.step, self._cap_step
    for u, need, nbytes in self._units(bytes(data)):
      if cap_step(step(u), need, nbytes):
        out.append(pos)
      pos += nbytes
    return out


class Splitter(abc.ABC):
  """A word splitting rule plus the `max_word_bytes` cap (0: no cap)."""
  name: str
  byte_level: bool = False  # decisions need only the first byte of a character

  def __init__(self, name: str, max_word_bytes: int):
    self.name, self.max_word_bytes = name, int(max_word_bytes)

  def __repr__(self):
    return f'{type(self).__name__}({self.name!r}, max_word_bytes={self.max_word_bytes})'

  @abc.abstractmethod
  def _rule(self) -> _Rule:
    """A fresh uncapped rule state."""

  @property
  def _cap(self) -> int:
    return self.max_word_bytes

  @property
  def word_cap(self) -> int:
    """The most bytes a word can have (0: unbounded)."""
    return self._cap

  def _base_starts(self, buf: np.ndarray, run_start: np.ndarray) -> np.ndarray:
    """Uncapped word starts (bool mask) of the runs of `buf`; default: a cursor per run."""
    out = np.zeros(buf.size, bool)
    bounds = np.append(np.flatnonzero(run_start), buf.size)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
      cursor = Cursor(self._rule(), 0, self.byte_level)
      out[cursor.feed(buf[a:b].tobytes(), a)] = True
    return out

  def flat_starts(self, buf: np.ndarray, run_start: np.ndarray) -> np.ndarray:
    """Word starts (bool mask) of `buf` (uint8[N]), each run (True in `run_start`, which must be
    True at 0 when N > 0) split on its own, as if it were a separate text."""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    run_start = np.asarray(run_start, bool).reshape(-1)
    if buf.size and not run_start[0]:
      raise ValueError('run_start must be True at 0')
    return _apply_cap(buf, self._base_starts(buf, run_start) | run_start, self._cap)

  def starts(self, data: bytes) -> np.ndarray:
    """Word start byte offsets of `data` (int64; [0, ...], empty for empty data)."""
    buf = np.frombuffer(bytes(data), np.uint8)
    run_start = np.zeros(buf.size, bool)
    run_start[:1] = True
    return np.flatnonzero(self.flat_starts(buf, run_start))

  def split_bytes(self, data: bytes) -> list[int]:
    """Word start byte offsets of `data` (the first is 0); any bytes, valid UTF-8 or not."""
    return self.starts(data).tolist()

  def split(self, text: str) -> list[str]:
    """The words of `text`; `''.join(words) == text`."""
    data = _encode(text)
    bounds = self.starts(data).tolist() + [len(data)]
    return [_decode(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

  def cursor(self) -> Cursor:
    """An incremental splitter at the start of a text."""
    return Cursor(self._rule(), self._cap, self.byte_level)

  # -- on-device incremental form (generation inside a jitted loop) ------------------------------
  device_split = True  # decisions are byte patterns; False: only the host `Cursor` can decide

  def __eq__(self, other):
    return (type(self) is type(other) and self.name == other.name
            and self.max_word_bytes == other.max_word_bytes)

  def __hash__(self):
    return hash((type(self).__name__, self.name, self.max_word_bytes))

  def device_new_start(self, ids_S, t, cur_start, byte_offset: int = 3):
    """Traceable (JAX) word-start decision once id `t` of `ids_S` has arrived.

    `ids_S`: int32 ids (`ByteEncoder`: ids below `byte_offset` are specials, one-byte words, and
    the bytes after one are a fresh text) of which `[0, t]` are filled; `cur_start`: the start of
    the current (last) word. Returns the start of a new word in `(cur_start, t]` decided by id
    `t`, or -1. A byte-level rule decides at `t` itself; `whitespace` decides when a (multi-byte)
    whitespace character is complete, so the new word may start up to 2 bytes before `t` (the
    caller re-decodes those bytes with the new word's context). Matches `starts` on every prefix
    (tests/test_words.py); the `max_word_bytes` cap is applied as in `_apply_cap`.
    """
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    if not self.device_split:
      raise ValueError(f'{self!r} decides word starts on the host only')

    def byte_at(i):  # byte value at i, or -1 for a special / before the text
      v = jnp.where(i >= 0, ids_S[jnp.maximum(i, 0)], -1)
      return jnp.where(v >= byte_offset, v - byte_offset, -1)

    x, prev = byte_at(t), byte_at(t - 1)
    s = jnp.where((x < 0) | (prev < 0), t, self._device_base_start(byte_at, t))
    return self._device_capped(s, x, t, cur_start)

  def _device_capped(self, s, x, t, cur_start):
    """The uncapped decision `s` (a start <= t, or -1) with the `max_word_bytes` cap applied
    (`x`: the byte at t, -1 for a special)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    s = jnp.where(s > cur_start, s, -1)
    if self._cap:
      piece = jnp.where(s >= 0, s, cur_start)
      need = jnp.asarray(_NEED, jnp.int32)[jnp.clip(x, 0, 255)]
      s = jnp.where((s < 0) & (t - piece + need > self._cap), t, s)
    return s.astype(jnp.int32)

  # Generation with a state beside the model's (entropy patches: the patcher's KV cache). The
  # default has none: `device_step` is `device_new_start`.
  def device_args(self):
    """Arrays the device rule reads (passed into the jitted loop as arguments, never baked in
    as constants); default None."""
    return None

  def device_init(self, args, prompt_1xP, size: int):
    """Traceable: the rule's state after the prompt (ids [1, P]; room for `size` ids)."""
    del args, prompt_1xP, size
    return None

  def device_step(self, args, state, ids_S, t, cur_start, byte_offset: int = 3):
    """Traceable: (`device_new_start(ids_S, t, cur_start)`, the state after id t)."""
    del args
    return self.device_new_start(ids_S, t, cur_start, byte_offset), state

  def row_starts(self, ids_BxT: np.ndarray, segment_ids_BxT: np.ndarray, buf: np.ndarray,
                 run_start: np.ndarray) -> np.ndarray:
    """Word starts (flat bool mask) of packed rows (`batch_words`); `buf`, `run_start`: their
    flat bytes and runs. A text rule needs only the bytes: `flat_starts`."""
    del ids_BxT, segment_ids_BxT
    return self.flat_starts(buf, run_start)

  def _device_base_start(self, byte_at, t):
    """Uncapped rule: a start in [t-3, t] decided at byte t (inside one text), or -1."""
    del byte_at
    return -1 + 0 * t

  def is_new_word(self, prefix_bytes: bytes, next_char_bytes: bytes) -> bool:
    """Whether `next_char_bytes` (one character) starts a word after `prefix_bytes`.

    Exact when `prefix_bytes` is the whole text so far. The bytes of the current word alone are
    enough for `whitespace`, `spacebyte` and `fixed:N`, and for `unicode` when the current word
    did not start at a `max_word_bytes` cut (a cut word needs the text back to its uncut start).
    O(len(prefix_bytes)); generation should keep a `cursor()` per sequence instead.
    """
    cursor = self.cursor()
    cursor.feed(prefix_bytes)
    return cursor.push(next_char_bytes)


class WhitespaceSplitter(Splitter):

  def __init__(self, max_word_bytes: int):
    super().__init__('whitespace', max_word_bytes)

  def _rule(self):
    return _WhitespaceRule()

  def _device_base_start(self, byte_at, t):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    ascii_ws = jnp.asarray(_ASCII_WS)
    ws2, ws3 = jnp.asarray(_WS2, jnp.int32), jnp.asarray(_WS3, jnp.int32)

    def ws_len_ending_at(e):  # length of a whitespace character ending at byte e, else 0
      b0, b1, b2 = byte_at(e - 2), byte_at(e - 1), byte_at(e)
      one = (b2 >= 0) & ascii_ws[jnp.clip(b2, 0, 255)]
      two = (b1 >= 0) & (b2 >= 0) & jnp.any(((b1 << 8) | b2) == ws2)
      three = ((b0 >= 0) & (b1 >= 0) & (b2 >= 0)
               & jnp.any(((b0 << 16) | (b1 << 8) | b2) == ws3))
      return jnp.where(one, 1, jnp.where(two, 2, jnp.where(three, 3, 0)))

    k = ws_len_ending_at(t)
    s = t - k + 1
    return jnp.where((k > 0) & (ws_len_ending_at(s - 1) == 0), s, -1)

  def _base_starts(self, buf, run_start):
    ws_byte = _ASCII_WS[buf]
    ws_lead = ws_byte.copy()
    cand = np.flatnonzero(np.isin(buf, _WS_LEADS))
    if cand.size:  # multi-byte whitespace: C2 xx, E1/E2/E3 xx xx, all inside one run
      n = buf.size
      nxt = np.full((cand.size, 2), -1, np.int64)
      for k in (1, 2):
        idx = cand + k
        ok = idx < n
        ok[ok] &= ~run_start[idx[ok]]
        nxt[ok, k - 1] = buf[idx[ok]]
      c0 = cand.astype(np.int64)
      b0 = buf[cand].astype(np.int64)
      two = (nxt[:, 0] >= 0) & np.isin((b0 << 8) | nxt[:, 0], _WS2)
      three = (nxt[:, 1] >= 0) & np.isin((b0 << 16) | (nxt[:, 0] << 8) | nxt[:, 1], _WS3)
      ws_lead[c0[two | three]] = True
      for k, m in ((1, two | three), (2, three)):
        ws_byte[c0[m] + k] = True
    prev = np.zeros_like(ws_byte)
    prev[1:] = ws_byte[:-1]
    return run_start | (ws_lead & ~prev)


class UnicodeSplitter(Splitter):

  device_split = False  # a per-character state machine: generation splits on the host

  def __init__(self, max_word_bytes: int):
    super().__init__('unicode', max_word_bytes)

  def _rule(self):
    return _UnicodeRule()

  def _base_starts(self, buf, run_start):
    out = np.zeros(buf.size, bool)
    bounds = np.append(np.flatnonzero(run_start), buf.size).tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
      step = _UnicodeRule().step
      pos, hits = a, []
      for ch in _decode(buf[a:b].tobytes()):
        if step(ch):
          hits.append(pos)
        cp = ord(ch)
        pos += 1 if cp < 0x80 else 2 if cp < 0x800 else 1 if 0xDC80 <= cp <= 0xDCFF else (
            3 if cp < 0x10000 else 4)
      out[hits] = True
    return out


class AsciiWhitespaceSplitter(Splitter):
  byte_level = True

  def __init__(self, max_word_bytes: int):
    super().__init__('ascii_whitespace', max_word_bytes)

  def _rule(self):
    return _AsciiWhitespaceRule()

  def _device_base_start(self, byte_at, t):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    ws = jnp.asarray(_ASCII_WS)
    prev = byte_at(t - 1)
    return jnp.where(ws[jnp.clip(byte_at(t), 0, 255)]
                     & ~((prev >= 0) & ws[jnp.clip(prev, 0, 255)]), t, -1)

  def _base_starts(self, buf, run_start):
    ws = _ASCII_WS[buf]
    prev = np.zeros_like(ws)
    prev[1:] = ws[:-1]
    return run_start | (ws & ~prev)


class SpaceByteSplitter(Splitter):
  byte_level = True

  def __init__(self, max_word_bytes: int):
    super().__init__('spacebyte', max_word_bytes)

  def _rule(self):
    return _SpaceByteRule()

  def _device_base_start(self, byte_at, t):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    spacelike = jnp.asarray(_SPACELIKE)
    return jnp.where(spacelike[jnp.clip(byte_at(t), 0, 255)]
                     & ~spacelike[jnp.clip(byte_at(t - 1), 0, 255)], t, -1)

  def _base_starts(self, buf, run_start):
    s = _SPACELIKE[buf]
    prev = np.zeros_like(s)
    prev[1:] = s[:-1]
    return run_start | (s & ~prev)


class FixedSplitter(Splitter):
  byte_level = True

  def __init__(self, n: int, max_word_bytes: int):
    super().__init__(f'fixed:{n}', max_word_bytes)
    self.n = n

  @property
  def _cap(self):
    return min(self.n, self.max_word_bytes) if self.max_word_bytes else self.n

  def _rule(self):
    return _FixedRule()

  def _base_starts(self, buf, run_start):
    return run_start.copy()


# --- Entropy patches (BLT) -----------------------------------------------------------------------

PATCH_RULES = ('global', 'relative')


class EntropySource(abc.ABC):
  """Next-byte entropies of a byte LM over ByteEncoder ids, for `EntropySplitter` (the data layer
  knows only this interface; models/patcher.py implements it on a trained byte LM, the HAT family
  loads that run). Entropies are in nats, of the model's softmax over its `vocab_size` ids, so
  they lie in [0, log vocab_size)."""
  fingerprint: str   # identifies the weights (equal sources: equal fingerprints)
  vocab_size: int

  @abc.abstractmethod
  def entropies(self, ids_BxT: np.ndarray, segment_ids_BxT: np.ndarray) -> np.ndarray:
    """float32 [B, T]: at i, the entropy of the model's distribution of id i given the ids
    before it in its segment (a piece of a packed row: segment id > 0, positions from 0); 0 at
    a segment's first id and on padding."""

  @abc.abstractmethod
  def device_args(self):
    """The weights as a pytree of arrays (an argument of the jitted generation loop)."""

  @abc.abstractmethod
  def device_init(self, args, prompt_1xP, size: int):
    """Traceable: the state after the prompt: (KV cache, entropy of id P, entropy of id P-1)."""

  @abc.abstractmethod
  def device_push(self, args, state, x, t):
    """Traceable: the state after id `x` at position `t` (the entropies shift by one)."""


class EntropySplitter(Splitter):
  """BLT's entropy patches: a unit (word) starts at byte i where the patcher's entropy H(i) of
  byte i given the bytes before it exceeds `threshold` (`rule='global'`), or rises over the
  previous byte's by more than `threshold` (`rule='relative'`: H(i) - H(i-1) > threshold; BLT's
  approximate monotonicity rule). Specials and the bytes after them start units as for every
  splitter, and `max_word_bytes` caps units (never inside a UTF-8 character). H(i) depends on
  bytes < i only, so the decision at i is known before byte i arrives: causal byte by byte
  (`byte_level`). The text API (`starts`, `split`) reads each text after a bos id, as a
  document; `batch_words` reads the packed rows' own context (documents never mix)."""
  byte_level = True

  def __init__(self, source: EntropySource, rule: str, threshold: float, max_word_bytes: int):
    if rule not in PATCH_RULES:
      raise ValueError(f'data.patch_rule={rule!r}: expected one of {PATCH_RULES}')
    if not 0 < max_word_bytes:
      raise ValueError('entropy patches need a unit cap: data.max_word_bytes >= '
                       f'{MIN_WORD_BYTES}, got {max_word_bytes}')
    super().__init__('entropy', max_word_bytes)
    self.source, self.rule, self.threshold = source, rule, float(threshold)
    check_patch_threshold(rule, self.threshold, source.vocab_size)

  def __repr__(self):
    return (f'EntropySplitter({self.rule}, threshold={self.threshold:.4g}, max_word_bytes='
            f'{self.max_word_bytes}, patcher={self.source.fingerprint})')

  def __eq__(self, other):
    return (type(self) is type(other) and self.rule == other.rule
            and self.threshold == other.threshold and self.max_word_bytes == other.max_word_bytes
            and self.source.fingerprint == other.source.fingerprint)

  def __hash__(self):
    return hash(('entropy', self.rule, self.threshold, self.max_word_bytes,
                 self.source.fingerprint))

  def _rule(self):
    raise ValueError('entropy patches have no text-only rule (cursor): they need the patcher')

  def cursor(self):
    return self._rule()

  def base_starts(self, h: np.ndarray, run_start: np.ndarray,
                  threshold: float | None = None) -> np.ndarray:
    """Uncapped starts (flat bool) from flat entropies `h` (threshold: default the splitter's)."""
    thr = self.threshold if threshold is None else threshold
    if self.rule == 'global':
      return run_start | (h > thr)
    prev = np.zeros_like(h)
    prev[1:] = h[:-1]
    return run_start | (h - prev > thr)

  def row_starts(self, ids_BxT, segment_ids_BxT, buf, run_start):
    h = self.source.entropies(ids_BxT, segment_ids_BxT).reshape(-1)
    return _apply_cap(buf, self.base_starts(h, run_start), self._cap)

  def flat_starts(self, buf, run_start):
    """Each run read as a document after a bos id (one patcher call for all runs)."""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    run_start = np.asarray(run_start, bool).reshape(-1)
    if not buf.size:
      return np.zeros(0, bool)
    if not run_start[0]:
      raise ValueError('run_start must be True at 0')
    runs = np.cumsum(run_start)
    pos = np.arange(buf.size) + runs        # each run shifted by its bos and earlier bos ids
    ids = np.zeros(buf.size + runs[-1], np.int32)
    seg = np.repeat(np.arange(1, runs[-1] + 1, dtype=np.int32),
                    np.diff(np.append(np.flatnonzero(run_start), buf.size)) + 1)
    ids[pos] = buf.astype(np.int32) + 3
    ids[np.flatnonzero(run_start) + np.arange(runs[-1])] = 1  # bos
    h = self.source.entropies(ids[None], seg[None])[0][pos]
    return _apply_cap(buf, self.base_starts(h, run_start), self._cap)

  # -- generation: the patcher's KV cache beside the model's --------------------------------------
  def device_args(self):
    return self.source.device_args()

  def device_init(self, args, prompt_1xP, size: int):
    return self.source.device_init(args, prompt_1xP, size)

  def device_new_start(self, ids_S, t, cur_start, byte_offset: int = 3):
    raise ValueError('entropy patches decide with the patcher state: device_step')

  def device_step(self, args, state, ids_S, t, cur_start, byte_offset: int = 3):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    _, h_t, h_prev = state  # entropies of ids t and t-1 (the state covers ids < t)
    x_id, prev_id = ids_S[t], ids_S[jnp.maximum(t - 1, 0)]
    x = jnp.where(x_id >= byte_offset, x_id - byte_offset, -1)
    special = (x_id < byte_offset) | (prev_id < byte_offset)
    rise = h_t if self.rule == 'global' else h_t - h_prev
    s = jnp.where(special | (rise > self.threshold), t, -1)
    return self._device_capped(s, x, t, cur_start), self.source.device_push(args, state, x_id, t)


def check_patch_threshold(rule: str, threshold: float, vocab_size: int) -> None:
  """A threshold some text can cross: entropies lie in [0, log V), their rises in
  (-log V, log V)."""
  top = float(np.log(vocab_size))
  lo = 0.0 if rule == 'global' else -top
  if not lo <= threshold < top:
    raise ValueError(f'data.patch_threshold={threshold:g} ({rule} rule): no text reaches it; '
                     f'next-byte entropies of a {vocab_size}-id patcher lie in [0, {top:.3f}) '
                     f'nats{"" if rule == "global" else ", their rises in (-" + f"{top:.3f}, {top:.3f})"}'
                     f': pick a threshold in [{lo:.3f}, {top:.3f}), or set data.patch_threshold '
                     '= -1 to calibrate one to data.patch_target_len')


def calibrate_threshold(splitter: EntropySplitter, ids_BxT: np.ndarray,
                        segment_ids_BxT: np.ndarray, target: float,
                        byte_offset: int = 3) -> tuple[float, float]:
  """(threshold, mean bytes per unit reached): the threshold of `splitter.rule` whose mean unit
  length (text bytes per unit that starts at a byte; specials are units of their own and not
  counted) on these packed rows is closest to `target`, by bisection (the unit count only falls
  as the threshold rises). A target outside what any threshold gives on these rows (1 byte per
  unit up to the cap's length) is a ValueError naming `data.patch_target_len`."""
  ids = np.asarray(ids_BxT)
  seg = np.asarray(segment_ids_BxT)
  nb, nt = ids.shape
  flat, sflat = ids.reshape(-1), seg.reshape(-1)
  valid = sflat > 0
  special = (flat < byte_offset) & valid
  run_start = special | ~valid
  run_start[1:] |= (sflat[1:] != sflat[:-1]) | run_start[:-1]
  run_start[::nt] = True
  byte = valid & ~special
  if not byte.any():
    raise ValueError('data.patch_target_len: the calibration rows hold no text bytes')
  buf = flat.astype(np.uint8) - np.uint8(byte_offset)
  h = splitter.source.entropies(ids, seg).reshape(-1)
  cap = splitter._cap  # pylint: disable=protected-access

  def mean_len(thr):
    st = _apply_cap(buf, splitter.base_starts(h, run_start, thr), cap)
    return byte.sum() / max(int((st & byte).sum()), 1)

  top = float(np.log(splitter.source.vocab_size))
  lo, hi = (0.0, top) if splitter.rule == 'global' else (-top, top)
  shortest, longest = mean_len(lo - 1.0), mean_len(hi)
  if not shortest <= target <= longest:
    raise ValueError(f'data.patch_target_len={target:g}: no threshold reaches it on the '
                     f'training split (mean unit lengths from {shortest:.3f} bytes, every byte a '
                     f'unit, to {longest:.3f}, only the cap data.max_word_bytes='
                     f'{splitter.max_word_bytes} and the documents cutting): pick a target in '
                     'that range, or raise data.max_word_bytes')
  best = (abs(longest - target), hi, longest)
  for _ in range(40):
    mid = (lo + hi) / 2
    m = mean_len(mid)
    best = min(best, (abs(m - target), mid, m))
    if m < target:
      lo = mid
    else:
      hi = mid
  return float(best[1]), float(best[2])


def get_splitter(spec: str, max_word_bytes: int) -> Splitter:
  """'whitespace' | 'ascii_whitespace' | 'unicode' | 'spacebyte' | 'fixed:N', capped at `max_word_bytes` (>= 4; 0:
  no cap)."""
  if isinstance(max_word_bytes, bool) or int(max_word_bytes) != max_word_bytes:
    raise ValueError(f'max_word_bytes must be an int, got {max_word_bytes!r}')
  max_word_bytes = int(max_word_bytes)
  if max_word_bytes != 0 and max_word_bytes < MIN_WORD_BYTES:
    raise ValueError(f'max_word_bytes must be >= {MIN_WORD_BYTES} (a UTF-8 character has up to 4 '
                     f'bytes) or 0 for no cap, got {max_word_bytes}')
  spec = str(spec).strip()
  if spec == 'whitespace':
    return WhitespaceSplitter(max_word_bytes)
  if spec == 'ascii_whitespace':
    return AsciiWhitespaceSplitter(max_word_bytes)
  if spec == 'unicode':
    return UnicodeSplitter(max_word_bytes)
  if spec == 'spacebyte':
    return SpaceByteSplitter(max_word_bytes)
  if spec == 'entropy':
    raise ValueError("data.splitter='entropy' cuts with a byte LM (data.patcher, a finished "
                     'byte-LM run): the HAT family builds it (words.EntropySplitter)')
  if spec.startswith('fixed:'):
    arg = spec[len('fixed:'):]
    if not arg.isdigit() or int(arg) < MIN_WORD_BYTES:
      raise ValueError(f'{spec!r}: fixed:N needs an integer N >= {MIN_WORD_BYTES}')
    return FixedSplitter(int(arg), max_word_bytes)
  raise ValueError(f'unknown word splitter {spec!r}: expected one of {", ".join(SPLITTERS)}')


# --- Word layout of bytes and packed batches ----------------------------------------------------


def word_ids(starts, n_bytes: int) -> np.ndarray:
  """int32[n_bytes]: the index of the word each byte belongs to (`starts`: sorted, first 0)."""
  starts = np.asarray(starts, np.int64).reshape(-1)
  if n_bytes == 0:
    return np.zeros(0, np.int32)
  if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n_bytes:
    raise ValueError('starts must be strictly increasing offsets in [0, n_bytes) beginning at 0')
  mark = np.zeros(n_bytes, np.int32)
  mark[starts] = 1
  return np.cumsum(mark, dtype=np.int32) - 1


def batch_words(inputs: np.ndarray, segment_ids: np.ndarray, splitter: Splitter | None,
                num_words: int, word_len: int, byte_offset: int = 3,
                boundary_id: int | None = None) -> dict[str, np.ndarray]:
  """The word layout of packed byte rows (`ByteEncoder` ids: pad 0, bos 1, eos 2, byte b -> b+3).

  Bytes with `segment_ids > 0` are real. Each segment is split on its own; ids below
  `byte_offset` (bos/eos) are one-byte words, and the bytes between them are split as separate
  texts. `inputs`, `segment_ids`: int[B, T] (or int[T]: outputs lose the batch axis). The first
  `num_words` (W) words of a row are laid out; `splitter.max_word_bytes` must be in
  [4, word_len] so no word exceeds `word_len` (Lw) bytes. Returns int32 arrays:
    byte_word [B, T]      word index of each byte in its row, -1 on padding (may be >= W)
    byte_pos_in_word [B, T]  offset of each byte in its word (0 on padding)
    num_words [B]         words in the row (those >= W are not laid out)
    word_start, word_len [B, W]  first byte and length of each word (0, 0 for absent words)
    word_gather [B, W, Lw]  row positions of each word's bytes, -1 padded
    word_segment_ids [B, W] segment id of each word (0 for absent words)
    word_positions [B, W]   index of each word within its segment (0 for absent words)

  `boundary_id` (HAT's word-boundary tokens, data/hat_data.py): the rows already hold a
  boundary token before every word (placed by the encoder with the splitter); a word starts at
  each boundary token and at the runs' starts above, and `splitter` is not used (None). The
  ids >= byte_offset that are not the boundary are bytes.
  """
  if boundary_id is not None:
    if word_len < 2:
      raise ValueError(f'word_len={word_len}: a word needs its boundary token and a byte')
  elif not MIN_WORD_BYTES <= splitter.max_word_bytes <= word_len:
    raise ValueError(f'{splitter!r}: max_word_bytes must be in [{MIN_WORD_BYTES}, word_len='
                     f'{word_len}] so that every word fits its {word_len} gather slots')
  inputs = np.asarray(inputs)
  single = inputs.ndim == 1
  ids = np.atleast_2d(inputs)
  seg = np.atleast_2d(np.asarray(segment_ids))
  if ids.shape != seg.shape or ids.ndim != 2:
    raise ValueError(f'inputs {inputs.shape} and segment_ids {np.shape(segment_ids)} differ')
  nb, nt = ids.shape
  ids, seg = ids.reshape(-1), seg.reshape(-1)
  valid = seg > 0
  special = ids < byte_offset
  special &= valid
  # A run (split as a text of its own) starts at each row start, segment change, special, byte
  # after a special and at padding (each padding byte is a run, dropped below).
  run_start = special | ~valid
  run_start[1:] |= (seg[1:] != seg[:-1]) | run_start[:-1]
  run_start[::nt] = True
  if boundary_id is None:
    buf = ids.astype(np.uint8) - np.uint8(byte_offset)  # specials / padding: any value (run starts)
    starts = splitter.row_starts(ids.reshape(nb, nt), seg.reshape(nb, nt), buf, run_start)
  else:
    starts = run_start | (ids == boundary_id)
  starts &= valid
  starts = starts.reshape(nb, nt)
  valid = valid.reshape(nb, nt)

  byte_word = np.cumsum(starts, axis=1, dtype=np.int32)
  byte_word -= 1
  np.putmask(byte_word, ~valid, -1)
  col = np.arange(nt, dtype=np.int32)
  byte_pos = col - np.maximum.accumulate(starts * col, axis=1)
  np.putmask(byte_pos, ~valid, 0)
  n_words = starts.sum(axis=1, dtype=np.int32)

  w_cap = int(num_words)
  rows, cols = np.nonzero(starts)
  widx = byte_word[rows, cols]
  keep = widx < w_cap
  rows, cols, widx = rows[keep], cols[keep], widx[keep]
  word_start = np.zeros((nb, w_cap), np.int32)
  word_start[rows, widx] = cols
  word_seg = np.zeros((nb, w_cap), np.int32)
  word_seg[rows, widx] = seg.reshape(nb, nt)[rows, cols]
  # Length: the in-word offset of each word's last byte, plus one.
  last = valid.copy()
  last[:, :-1] &= starts[:, 1:] | ~valid[:, 1:]
  last &= byte_word < w_cap
  lr, lc = np.nonzero(last)
  lens = np.zeros((nb, w_cap), np.int32)
  lens[lr, byte_word[lr, lc]] = byte_pos[lr, lc] + 1
  slot = np.arange(word_len, dtype=np.int32)
  gather = word_start[..., None] + slot
  np.putmask(gather, slot >= lens[..., None], -1)

  w = np.arange(w_cap, dtype=np.int32)
  new_seg = np.ones((nb, w_cap), bool)
  new_seg[:, 1:] = word_seg[:, 1:] != word_seg[:, :-1]
  word_pos = w - np.maximum.accumulate(new_seg * w, axis=1)
  np.putmask(word_pos, lens == 0, 0)

  out = {'byte_word': byte_word, 'byte_pos_in_word': byte_pos, 'num_words': n_words,
         'word_start': word_start, 'word_len': lens, 'word_gather': gather,
         'word_segment_ids': word_seg, 'word_positions': word_pos}
  if single:
    out = {k: v[0] for k, v in out.items()}
  return out
