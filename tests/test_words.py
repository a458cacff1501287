"""Tests of data/words.py: word splitters, causality, the cap, the cursor, the batch layout."""
import sys

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from data import encoders
from data import pipeline
from data import words

PROPS = hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None)
FEW = hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)

SPECS = [('whitespace', 0), ('unicode', 0), ('spacebyte', 0), ('fixed:4', 0), ('fixed:7', 0),
         ('whitespace', 4), ('unicode', 5), ('spacebyte', 6), ('fixed:9', 4), ('unicode', 16),
         ('ascii_whitespace', 5)]
SPLITTERS = [words.get_splitter(s, m) for s, m in SPECS]
IDS = [f'{s}/{m}' for s, m in SPECS]

# --- Strategies -----------------------------------------------------------------------------------

EMOJI = ['👨', '👩', '👧', '👦', '👍', '🏳', '❤', '🌈', '😀', '🙂', '⚧', '\u200d', '\ufe0f',
         '\U0001F3FB', '\U0001F3FD', '\U0001F3FF', '🇩', '🇪', '🇫', '🇷', '\U000E0067',
         '\U000E007F', '\u20e3', '1', ' ', 'a']
RTL = (list('שלוםעולםצהל') + ['\u05b4', '\u05bc', '\u05f4', '\u05f3'] + list('مرحباالعالم') +
       ['\u064e', '\u0651', '\u0660', '\u0669', '\u060c', '\u061f', '\u200f', '\u200e'] +
       list(' "\'.,:-1'))
COMBINING = list('aeiouAEIO ') + [chr(c) for c in (0x300, 0x301, 0x308, 0x327, 0x20DD, 0x0951,
                                                     0x093F, 0x200D, 0x200C)]
CONTROL = [chr(c) for c in range(0, 0x20)] + ['\x7f', '\x85', '\u2028', '\u2029', '\r\n', 'a',
                                              ' ', '\u00a0', '\u3000', '\u2003', '\u200b']
MIXED = list('aZ ') + ['中', '文', 'ひ', 'ら', 'カ', 'タ', 'ー', 'ก', 'ไ', 'Ж', 'ж', 'Ω', 'ω',
                       '한', '국', '。', '、', '１', 'ｶ', '_', 'é', '\u0301']
CAMEL = list('abcxyzABCXYZ_0189.( )') + ['É', 'é', '\u0301']
DIGITS = list('0123456789.,:;\'"-+$%/ ') + ['\u2044', '½', '²', '٣', 'a', 'Z']


def _joined(alphabet, max_size=24):
  return st.lists(st.sampled_from(alphabet), max_size=max_size).map(''.join)


TEXTS = st.one_of(
    st.text(st.characters(codec='utf-8'), max_size=24),
    _joined(EMOJI), _joined(RTL), _joined(COMBINING), _joined(CONTROL), _joined(MIXED),
    _joined(CAMEL), _joined(DIGITS),
    st.lists(st.one_of(st.sampled_from(EMOJI + RTL + COMBINING + CONTROL + MIXED + CAMEL),
                       st.characters(codec='utf-8')), max_size=24).map(''.join),
)
BYTES = st.one_of(st.binary(max_size=32), TEXTS.map(lambda t: t.encode('utf-8')))


def _all_starts(sp, data: bytes):
  """Starts from the three code paths: flat (vectorized), cursor.feed, cursor.push."""
  flat = sp.split_bytes(data)
  fed = sp.cursor().feed(data)
  assert flat == fed, (sp, data)
  return flat


def _units(sp, data: bytes):
  """(offset, unit bytes) of the units a cursor consumes."""
  if sp.byte_level:
    return [(i, data[i:i + 1]) for i in range(len(data))]
  out, pos = [], 0
  for ch in data.decode('utf-8', 'surrogateescape'):
    b = ch.encode('utf-8', 'surrogateescape')
    out.append((pos, b))
    pos += len(b)
  return out


# --- Round trip, cap, consistency ----------------------------------------------------------------


@pytest.mark.parametrize('sp', SPLITTERS, ids=IDS)
@PROPS
@hypothesis.given(text=TEXTS)
def test_round_trip_and_cap(sp, text):
  ws = sp.split(text)
  assert ''.join(ws) == text
  assert all(ws)
  data = text.encode('utf-8')
  starts = sp.split_bytes(data)
  offsets = np.cumsum([0] + [len(w.encode('utf-8')) for w in ws]).tolist()
  assert starts == offsets[:len(ws)]
  cap = sp._cap  # pylint: disable=protected-access
  for w in ws:
    b = w.encode('utf-8')
    b.decode('utf-8')  # never cut inside a character
    if cap:
      assert len(b) <= cap, (sp, text, ws)


@pytest.mark.parametrize('sp', SPLITTERS, ids=IDS)
@PROPS
@hypothesis.given(data=BYTES)
def test_flat_cursor_and_is_new_word_agree(sp, data):
  starts = _all_starts(sp, data)
  if data:
    assert starts[0] == 0
  assert starts == sorted(set(starts))
  # The words of invalid UTF-8 still cover every byte, and cuts fall between decoded characters.
  bounds = starts + [len(data)]
  assert b''.join(data[a:b] for a, b in zip(bounds[:-1], bounds[1:])) == data
  decoded = ''.join(data[a:b].decode('utf-8', 'surrogateescape')
                    for a, b in zip(bounds[:-1], bounds[1:]))
  assert decoded == data.decode('utf-8', 'surrogateescape')
  cursor = sp.cursor()
  pushed = [off for off, unit in _units(sp, data) if cursor.push(unit)]
  assert pushed == starts
  for off, unit in _units(sp, data)[:12]:
    assert sp.is_new_word(data[:off], unit) == (off in starts), (sp, data, off)


@pytest.mark.parametrize('sp', SPLITTERS, ids=IDS)
@FEW
@hypothesis.given(text=TEXTS)
def test_cursor_copy_and_whole_chars(sp, text):
  data = text.encode('utf-8')
  starts = sp.split_bytes(data)
  cursor, pos, got = sp.cursor(), 0, []
  for ch in text:  # whole characters work for byte-level splitters too
    b = ch.encode('utf-8')
    fork = cursor.copy()
    if cursor.push(b):
      got.append(pos)
    pos += len(b)
    fork.push(b'.')  # a fork does not disturb the original
  assert got == starts


# --- Causality -----------------------------------------------------------------------------------


def _check_prefix(sp, data: bytes, full: list[int], k: int):
  pre = sp.split_bytes(data[:k])
  assert pre == [s for s in full if s < k], (sp, data, k)


@pytest.mark.parametrize('sp', SPLITTERS, ids=IDS)
@PROPS
@hypothesis.given(text=TEXTS)
def test_causal_at_character_cuts(sp, text):
  full_words = sp.split(text)
  data = text.encode('utf-8')
  full = sp.split_bytes(data)
  k_bytes = 0
  for k in range(len(text) + 1):
    pw = sp.split(text[:k])
    if pw:  # every word but the last is final; the last is a prefix of the final one
      assert pw[:-1] == full_words[:len(pw) - 1]
      assert full_words[len(pw) - 1].startswith(pw[-1])
    _check_prefix(sp, data, full, k_bytes)
    if k < len(text):
      k_bytes += len(text[k].encode('utf-8'))


@pytest.mark.parametrize('sp', [s for s in SPLITTERS if s.byte_level],
                         ids=[i for s, i in zip(SPLITTERS, IDS) if s.byte_level])
@PROPS
@hypothesis.given(data=BYTES)
def test_byte_level_splitters_causal_at_byte_cuts(sp, data):
  full = sp.split_bytes(data)
  for k in range(len(data) + 1):
    _check_prefix(sp, data, full, k)


# --- Pinned examples -----------------------------------------------------------------------------

FAMILY = '👨\u200d👩\u200d👧'
PINNED = {
    'whitespace': [
        ('Hello, world!', ['Hello,', ' world!']),
        ('fooBarBaz', ['fooBarBaz']),
        ('a  b\tc\n', ['a', '  b', '\tc', '\n']),
        ('  lead', ['  lead']),
        ('שלום עולם', ['שלום', ' עולם']),
        (FAMILY + ' hi', [FAMILY, ' hi']),
        ('e\u0301', ['e\u0301']),
        ('a\u3000b\u00a0c', ['a', '\u3000b', '\u00a0c']),
        ('x\r\ny', ['x', '\r\ny']),
    ],
    'unicode': [
        ('Hello, world!', ['Hello,', ' world!']),
        ('fooBarBaz', ['foo', 'Bar', 'Baz']),
        ('parseHTTPResponse iPhone', ['parse', 'HTTPResponse', ' i', 'Phone']),
        ('a  b\tc\n', ['a', '  ', 'b', '\t', 'c', '\n']),
        ('שלום עולם', ['שלום', ' עולם']),
        ('צה"ל', ['צה"ל']),
        ('مرحبا بالعالم!', ['مرحبا', ' بالعالم!']),
        (FAMILY + '👍🏽 ok', [FAMILY, '👍🏽', ' ok']),
        ('🇩🇪🇫🇷', ['🇩🇪', '🇫🇷']),
        ('e\u0301', ['e\u0301']),
        ('cafe\u0301 ok', ['cafe\u0301', ' ok']),
        ("can't stop", ["can't", ' stop']),
        ('3.14, 1,000.5%', ['3.14,', ' 1,000.5%']),
        ('e.g. x', ['e.g.', ' x']),
        ('中文字', ['中', '文', '字']),
        ('カタカナです', ['カタカナ', 'で', 'す']),
        ('x = foo(bar)', ['x', ' =', ' foo(', 'bar)']),
        ('__init__(self)', ['__init__(', 'self)']),
        ('a\r\n\r\nb', ['a', '\r\n', '\r\n', 'b']),
        ('$5', ['$', '5']),
    ],
    'spacebyte': [
        ('Hello, world!', ['Hello', ', world', '!']),
        ('fooBarBaz', ['fooBarBaz']),
        ('a  b\tc\n', ['a', '  b', '\tc', '\n']),
        ('héllo', ['h', 'éllo']),
        ('e\u0301', ['e', '\u0301']),
        ('שלום', ['ש', 'ל', 'ו', 'ם']),
        (FAMILY, ['👨', '\u200d', '👩', '\u200d', '👧']),
    ],
    'fixed:4': [
        ('Hello, world!', ['Hell', 'o, w', 'orld', '!']),
        ('aé€😀', ['aé', '€', '😀']),
        ('e\u0301', ['e\u0301']),
        ('שלום', ['של', 'ום']),
        (FAMILY, ['👨', '\u200d', '👩', '\u200d', '👧']),
    ],
}


@pytest.mark.parametrize('spec,text,expected',
                         [(s, t, e) for s, cases in PINNED.items() for t, e in cases])
def test_pinned_examples(spec, text, expected):
  assert words.get_splitter(spec, 0).split(text) == expected


def test_cap_on_top_of_rules():
  # Matches hat-splitter's split_with_limit example.
  for spec in ('unicode', 'whitespace'):
    assert words.get_splitter(spec, 4).split('Hello, world!') == ['Hell', 'o,', ' wor', 'ld!']
  assert words.get_splitter('unicode', 4).split('ab€€') == ['ab', '€', '€']
  assert words.get_splitter('spacebyte', 5).split('abcdefgh😀') == ['abcde', 'fgh', '😀']
  assert words.get_splitter('fixed:8', 5).split('abcdefgh') == ['abcde', 'fgh']
  assert words.get_splitter('whitespace', 5).split('😀😀a') == ['😀', '😀a']
  # The cap continues the uncut word's state: 'can't' is one UAX#29 word cut into pieces.
  assert words.get_splitter('unicode', 4).split("xcan't") == ['xcan', "'t"]


def test_cursor_api():
  sp = words.get_splitter('unicode', 0)
  assert sp.is_new_word(b'', b'a')
  assert not sp.is_new_word(b'Hello', b',')
  assert sp.is_new_word(b'Hello,', b' ')
  assert not sp.is_new_word(b'Hello, ', b'w')
  assert sp.is_new_word(b'foo', b'B')
  with pytest.raises(ValueError):
    sp.cursor().push(b'a b')
  sb = words.get_splitter('spacebyte', 0)
  c = sb.cursor()
  assert [c.push(bytes([b])) for b in 'a é'.encode()] == [True, True, False, False]
  assert sb.byte_level and not sp.byte_level


def test_bad_specs():
  for spec, cap in (('nope', 8), ('fixed:3', 8), ('fixed:x', 8), ('unicode', 3), ('unicode', -1),
                    ('unicode', 2.5)):
    with pytest.raises(ValueError):
      words.get_splitter(spec, cap)
  assert words.get_splitter(' fixed:16 ', 0).n == 16


def test_whitespace_list_is_python_isspace():
  assert set(words.WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}


def test_word_ids():
  np.testing.assert_array_equal(words.word_ids([0, 2, 3], 6), [0, 0, 1, 2, 2, 2])
  assert words.word_ids([], 0).shape == (0,)
  with pytest.raises(ValueError):
    words.word_ids([1, 2], 4)
  sp = words.get_splitter('unicode', 8)
  data = 'Hello, wonderful world!'.encode()
  ids = words.word_ids(sp.split_bytes(data), len(data))
  assert ids.dtype == np.int32 and ids[-1] == len(sp.split(data.decode())) - 1


# --- Batch layout ----------------------------------------------------------------------------------

DOCS = ['Hello, world!', 'fooBarBaz = 3.14\n\tx', 'שלום עולם ' + FAMILY, 'a  b\tc\n', '',
        'e\u0301\u0301 ' * 5, 'xyz' * 9, '中文字 and more text here']


def _check_layout(sp, batch, out, n_w, lw):
  enc = encoders.ByteEncoder()
  inputs, seg = batch['inputs'], batch['segment_ids']
  nb, nt = inputs.shape
  for r in range(nb):
    valid = seg[r] > 0
    bw = out['byte_word'][r]
    assert ((bw >= 0) == valid).all()
    # Reference: specials alone, every run of bytes between specials / segment changes split.
    ref_starts, t = [], 0
    while t < nt:
      if not valid[t]:
        t += 1
        continue
      if inputs[r, t] < enc.OFFSET:
        ref_starts.append(t)
        t += 1
        continue
      e = t
      while e < nt and valid[e] and inputs[r, e] >= enc.OFFSET and seg[r, e] == seg[r, t]:
        e += 1
      run = bytes((inputs[r, t:e] - enc.OFFSET).astype(np.uint8).tolist())
      ref_starts += [t + s for s in sp.split_bytes(run)]
      t = e
    assert out['num_words'][r] == len(ref_starts)
    ends = ref_starts[1:] + [int(np.flatnonzero(valid).max()) + 1 if valid.any() else 0]
    for w, (a, b) in enumerate(zip(ref_starts, ends)):
      assert (bw[a:b] == w).all()
      np.testing.assert_array_equal(out['byte_pos_in_word'][r, a:b], np.arange(b - a))
      if w >= n_w:
        continue
      assert out['word_start'][r, w] == a and out['word_len'][r, w] == b - a <= lw
      g = out['word_gather'][r, w]
      np.testing.assert_array_equal(g[:b - a], np.arange(a, b))
      assert (g[b - a:] == -1).all()
      assert out['word_segment_ids'][r, w] == seg[r, a]
    nw = min(len(ref_starts), n_w)
    assert (out['word_len'][r, nw:] == 0).all() and (out['word_gather'][r, nw:] == -1).all()
    assert (out['word_segment_ids'][r, nw:] == 0).all()
    # Word positions count from 0 in each segment.
    pos, prev_seg = -1, None
    for w in range(nw):
      s = out['word_segment_ids'][r, w]
      pos = pos + 1 if s == prev_seg else 0
      prev_seg = s
      assert out['word_positions'][r, w] == pos
    # Every real byte in exactly one gathered word (when all words fit).
    if len(ref_starts) <= n_w:
      g = out['word_gather'][r].reshape(-1)
      g = g[g >= 0]
      assert sorted(g.tolist()) == np.flatnonzero(valid).tolist()
      np.testing.assert_array_equal(inputs[r, g], inputs[r, np.sort(g)])


@pytest.mark.parametrize('spec', ['whitespace', 'unicode', 'spacebyte', 'fixed:6'])
@pytest.mark.parametrize('seq_len,n_w,lw', [(32, 40, 8), (64, 6, 5), (17, 32, 4)])
def test_batch_words_layout(spec, seq_len, n_w, lw):
  enc = encoders.ByteEncoder()
  sp = words.get_splitter(spec, lw)
  batch = pipeline.pack([pipeline.document_tokens(enc, d) for d in DOCS], seq_len)
  out = words.batch_words(batch['inputs'], batch['segment_ids'], sp, n_w, lw)
  assert out['word_gather'].shape == (batch['inputs'].shape[0], n_w, lw)
  assert all(v.dtype == np.int32 for v in out.values())
  _check_layout(sp, batch, out, n_w, lw)
  one = words.batch_words(batch['inputs'][0], batch['segment_ids'][0], sp, n_w, lw)
  for k, v in one.items():
    np.testing.assert_array_equal(v, out[k][0])


@FEW
@hypothesis.given(docs=st.lists(TEXTS, min_size=1, max_size=5), seq_len=st.integers(4, 48))
def test_batch_words_property(docs, seq_len):
  enc = encoders.ByteEncoder()
  batch = pipeline.pack([pipeline.document_tokens(enc, d) for d in docs], seq_len)
  for spec in ('whitespace', 'unicode', 'spacebyte', 'fixed:5'):
    sp = words.get_splitter(spec, 6)
    out = words.batch_words(batch['inputs'], batch['segment_ids'], sp, 12, 6)
    _check_layout(sp, batch, out, 12, 6)


def test_batch_words_eos_and_validation():
  enc = encoders.ByteEncoder()
  row = np.concatenate([[1], enc.encode('ab cd'), [2], [1], enc.encode('x'), [0, 0]])
  seg = np.array([1] * 7 + [2, 2, 0, 0])
  sp = words.get_splitter('whitespace', 4)
  out = words.batch_words(row, seg, sp, 8, 4)
  np.testing.assert_array_equal(out['byte_word'], [0, 1, 1, 2, 2, 2, 3, 4, 5, -1, -1])
  np.testing.assert_array_equal(out['word_positions'], [0, 1, 2, 3, 0, 1, 0, 0])
  np.testing.assert_array_equal(out['word_segment_ids'], [1, 1, 1, 1, 2, 2, 0, 0])
  with pytest.raises(ValueError):
    words.batch_words(row, seg, words.get_splitter('whitespace', 8), 8, 4)
  with pytest.raises(ValueError):
    words.batch_words(row, seg, words.get_splitter('whitespace', 0), 8, 4)


LONG = st.lists(st.one_of(st.integers(1, 70).map(lambda n: 'x' * n),
                          st.sampled_from(['é', '€', '😀', ' ', '\n', '中文', 'aB', '\u3000'])),
                max_size=12).map(''.join)


@pytest.mark.parametrize('spec,cap', [('whitespace', 4), ('spacebyte', 7), ('fixed:13', 0),
                                      ('fixed:64', 5), ('unicode', 6)])
@FEW
@hypothesis.given(text=LONG, cut=st.integers(0, 10**6))
def test_cap_long_words_vectorized_matches_cursor(spec, cap, text, cut):
  sp = words.get_splitter(spec, cap)
  data = text.encode('utf-8')
  data = data[:cut % (len(data) + 1)]  # may end inside a character
  starts = _all_starts(sp, data)
  cap = sp._cap  # pylint: disable=protected-access
  assert all(b - a <= cap for a, b in zip(starts, starts[1:] + [len(data)]))


@pytest.mark.parametrize('spec,cap', [('whitespace', 6), ('whitespace', 16), ('spacebyte', 5),
                                      ('fixed:5', 8), ('ascii_whitespace', 6)])
def test_device_new_start_matches_host_starts(spec, cap):
  """The traceable incremental rule used by on-device HAT generation gives, byte by byte, the
  word starts the host splitter gives for the whole sequence (ByteEncoder ids with bos/eos/pad
  specials, multi-byte and broken UTF-8, whitespace of every width)."""
  import jax
  import jax.numpy as jnp
  sp = words.get_splitter(spec, cap)
  n, rows = 80, 48
  rng = np.random.default_rng(0)
  pieces = [c.encode('utf-8', 'surrogateescape') for c in
            list('ab Z9 .,\t\n') + ['  ', '\u00a0', '\x85', '\u3000', '\u2003', '\u2028', '中',
                                    'é', '👍', '\u0301', '\udce2', '\udc80', '\udcc2']]
  seqs = np.zeros((rows, n), np.int32)
  for r in range(rows):
    ids = [1]
    while len(ids) < n:
      if rng.random() < 0.04:
        ids.append(int(rng.integers(0, 3)))  # a special: pad / bos / eos
      else:
        ids.extend(b + 3 for b in pieces[rng.integers(len(pieces))])
    seqs[r] = ids[:n]

  def scan_row(ids_S):
    def step(cur, t):
      s = sp.device_new_start(ids_S, t, cur)
      return jnp.where(s >= 0, s, cur), s
    _, new = jax.lax.scan(step, jnp.int32(0), jnp.arange(1, n))
    return new

  got = np.asarray(jax.jit(jax.vmap(scan_row))(jnp.asarray(seqs)))

  def host_starts(ids):
    lay = words.batch_words(ids, np.ones(len(ids)), sp, len(ids), 16)
    return lay['word_start'][:int(lay['num_words'])].tolist()

  for r in range(rows):
    # the host's last word start of each prefix [0, k] is what byte k decided
    expect = [host_starts(seqs[r, :k + 1])[-1] for k in range(n)]
    dev = [0]
    for s in got[r]:
      dev.append(int(s) if s >= 0 else dev[-1])
    assert dev == expect, (spec, cap, seqs[r].tolist())
    assert sorted(set(dev)) == host_starts(seqs[r])
