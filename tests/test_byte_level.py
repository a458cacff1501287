"""Byte-level views (models/byte_level/, models/hat_view.py, data/canonical.py): normalization,
the chain rule against brute-force enumeration of token encodings, the byte-native /
lexinvariant / HAT views against their models' own log-probs, ensembles, token healing, bad
input.

One tiny random TokenLM (vocab 384) is the byte LM and the LM under two tiny BPE tokenizers, so
every view shares one set of compiled functions."""
import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

from data import canonical, encoders, words
from models import byte_level as bl
from models import hat, hat_view, lexinvariant, token_lm
from train.families import lm

TEXTS = ["the cat sat on the mat. it's the hat!", 'hello world  hello\n\nworld 123 4567',
         'def fib(n):\n    return n if n < 2 else fib(n - 1)',
         "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001F44D they'll we're", 'the theme then there  the other']
ASCII = [t for t in TEXTS if t.isascii()]
KEEP = list(range(3, 259)) + [2]  # ByteEncoder ids of bytes 0..255, then eos


@nnx.jit
def _token_logprobs(model, ids):
  """Reference: fp32 log-softmax of a full uncached forward [T, V]."""
  return jax.nn.log_softmax(model(ids)[0][0], -1)


def _byte_logprobs(lp):
  """Byte-id log-probs [T, V] -> [T, 257] renormalized over bytes + eos."""
  keep = np.asarray(lp, np.float64)[:, KEEP]
  return keep - np.logaddexp.reduce(keep, axis=1, keepdims=True)


def _tokenizer(texts, vocab, alphabet):
  tok = Tokenizer(tok_models.BPE())
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=['<pad>', '<bos>', '<eos>'],
                                initial_alphabet=alphabet, show_progress=False)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts * 20, trainer)
  return tok


@pytest.fixture(scope='module')
def tok():
  """Every byte is a token; merges over English, code, CJK, an emoji (partial-UTF-8 tokens)."""
  return _tokenizer(TEXTS, 320, pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope='module')
def ascii_tok():
  """Only the characters of ASCII texts: every token is ASCII; 'é' cannot be encoded."""
  return _tokenizer(ASCII, 150, [])


@pytest.fixture(scope='module')
def model():
  cfg = token_lm.default_model_config()
  cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 32, 2, 2, 1, 16
  cfg.mlp_dim, cfg.init_std = 64, 0.5  # far from uniform: pruned mass matters
  return token_lm.TokenLM(cfg, 384, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def fn(model):
  return bl.TokenFn(model)


FEW_SHAPES = dict(max_tokens=64, min_tokens=64)  # one branch shape: few compilations


@pytest.fixture(scope='module')
def view(fn, tok):
  return bl.ExactBPE(fn, tok, bos_id=1, eos_id=2, **FEW_SHAPES)


@pytest.fixture(scope='module')
def ascii_view(fn, ascii_tok):
  return bl.ExactBPE(fn, ascii_tok, bos_id=1, eos_id=2, **FEW_SHAPES)


def test_validity_rows_match_definition(tok):
  """Pair rule vs BPE on every pair (rows and columns); fast rows vs the definition
  (`valid_slow`); every next token of the tokenizer's own encoding of a text is valid (also
  where the continuation re-cuts the text: '\\n\\n' + 'A' is ['\\n', '\\n', 'A'])."""
  c = canonical.Canonical(tok, 384)
  ids = c.text_ids.tolist()
  for t in ids[::7]:
    want = [c.bpe(c.token_bytes[t] + c.token_bytes[r]) == [t, r] for r in ids]
    np.testing.assert_array_equal(c.pair_row(t)[ids], want)
    want = [c.bpe(c.token_bytes[r] + c.token_bytes[t]) == [r, t] for r in ids]
    np.testing.assert_array_equal(c.pair_col(t)[ids], want)
  text = "x'll it's\n\nA  b \t\tc \u4e2d\u6587\U0001F44D caf\u00e9 12".encode()
  enc = c.encode(text)
  bounds = np.cumsum([0] + [len(c.token_bytes[t]) for t in enc]).tolist()
  for k, cut in enumerate(bounds[:-1]):
    tail = c.make_tail(text, cut, reversed(enc[:k]))
    row = c.row(tail)
    assert row[enc[k]], (text[:cut], c.token_bytes[enc[k]])
    if k % 3 == 0:
      assert [bool(row[v]) for v in ids[::3]] == [c.valid_slow(tail, v) for v in ids[::3]]
  assert c.is_exact(c.make_tail(text, len(text), reversed(enc)))
  head = c.make_tail(b'caf', 3, reversed(c.encode(b'caf')))  # then a lone lead byte 0xc3:
  lead = int(c.byte_token[0xC3])
  assert c.row(head)[lead] and c.valid_slow(head, lead)
  tail = canonical.Tail(b'caf\xc3', head.tokens + (lead,))  # ends inside a character
  row = c.row(tail)
  assert row.any() and [bool(row[v]) for v in ids] == [c.valid_slow(tail, v) for v in ids]


def test_next_byte_distributions_normalize(view):
  for text in (TEXTS[2][:20].encode(), TEXTS[3][:24].encode()):  # the second splits characters
    d = view.distributions(text).astype(np.float64)
    np.testing.assert_allclose(np.exp(d).sum(1), 1.0, atol=1e-6)
    score = view.score(text)
    picked = np.concatenate([d[np.arange(len(text)), np.frombuffer(text, np.uint8)],
                             d[-1:, bl.END]])
    np.testing.assert_allclose(score, picked, atol=1e-5)
    st, stream = view.start(text[:5]), []
    for b in text[5:]:
      stream.append(view.next_byte_logprobs(st)[b])
      st = view.advance(st, b)
    np.testing.assert_allclose(stream, score[5:-1], atol=1e-4)
  # a long prompt goes into the KV cache up to its last pieces: the same distribution
  long = (TEXTS[0] + ' ' + TEXTS[2]).encode()[:70]
  np.testing.assert_allclose(view.next_byte_logprobs(view.start(long)),
                             view.distributions(long)[-1], atol=1e-4)
  # a prompt ending inside a character: only its continuation bytes are possible
  lp = view.next_byte_logprobs(view.start('\u4e2d'.encode()[:2]))
  assert np.isfinite(lp[0xAD]) and np.all(np.isinf(lp[:0x80])) and np.isinf(lp[bl.END])


def _brute_force(model, tok, text: bytes, bos: int, eos: int):
  """log Q(document starts with text[:k]) for k = 0..len, and log Q(text, end), by enumerating
  every token sequence whose bytes are a prefix of the text or cover it, keeping those the
  tokenizer produces (every prefix re-encodes to itself: all tokens are ASCII here), with the
  model's probabilities from full uncached forwards renormalized over those continuations."""
  alphabet = canonical.byte_alphabet()
  vocab = {i: bytes(alphabet[c] for c in s) for s, i in tok.get_vocab().items() if i > 2}
  encode = lambda b: tok.encode(b.decode(), add_special_tokens=False).ids
  valid = lambda seq: encode(b''.join(vocab[t] for t in seq)) == list(seq)
  @functools.lru_cache(maxsize=None)
  def logp(seq):
    ids = np.zeros((1, 16), np.int32)
    ids[0, :len(seq) + 1] = (bos,) + seq
    return np.asarray(_token_logprobs(model, ids), np.float64)[len(seq)]

  @functools.lru_cache(maxsize=None)
  def logz(seq):
    lp = logp(seq)
    keep = [lp[v] for v in vocab if valid(seq + (v,))] + [lp[eos]]
    return float(np.logaddexp.reduce(keep))

  def logq(seq):
    return sum(logp(seq[:k])[seq[k]] - logz(seq[:k]) for k in range(len(seq)))

  n = len(text)
  prefixes = [[] for _ in range(n + 1)]
  end = []
  stack = [()]
  while stack:  # canonical sequences whose bytes are a prefix of the text
    seq = stack.pop()
    j = sum(len(vocab[t]) for t in seq)
    if j == n:
      end.append(logq(seq) + logp(seq)[eos] - logz(seq))
    for v, b in vocab.items():
      if not valid(seq + (v,)):
        continue
      if text[j:j + len(b)] == b and j + len(b) <= n:
        stack.append(seq + (v,))
      for k in range(j + 1, n + 1):  # seq + (v,) covers text[:k]
        if b[:k - j] == text[j:k]:
          prefixes[k].append(logq(seq) + logp(seq)[v] - logz(seq))
  return [0.0] + [float(np.logaddexp.reduce(p)) for p in prefixes[1:]], float(
      np.logaddexp.reduce(end))


def test_chain_rule_equals_brute_force_enumeration(model, ascii_view, ascii_tok):
  for text in (b'the cat', b"it's 12"):
    prefix_logq, end_logq = _brute_force(model, ascii_tok, text, 1, 2)
    score = ascii_view.score(text)
    np.testing.assert_allclose(np.cumsum(score[:-1]), prefix_logq[1:], atol=2e-5)
    np.testing.assert_allclose(score.sum(), end_logq, atol=2e-5)
    # the canonical process puts more mass on the canonical encoding than the model does
    ids = [1] + ascii_view.c.encode(text) + [2]
    lp = np.asarray(_token_logprobs(model, np.array([ids + [0] * (16 - len(ids))])))
    token_level = lp[np.arange(len(ids) - 1), ids[1:]].sum()
    assert score.sum() > token_level


def test_byte_lm_view_equals_token_logprobs(model, fn):
  view = bl.ByteTokenLM(fn)
  text = 'h\u00e9llo \x00\xff'.encode('latin-1')  # bytes are bytes: not UTF-8, still fine
  ids = [1] + [b + 3 for b in text]
  want = _byte_logprobs(_token_logprobs(model, np.array([ids + [0] * (16 - len(ids))])))
  score = view.score(text)
  np.testing.assert_allclose(score[:-1], want[np.arange(len(text)), list(text)], atol=1e-5)
  np.testing.assert_allclose(score[-1], want[len(text), -1], atol=1e-5)
  st = view.start(text[:3])
  for b in text[3:]:
    st = view.advance(st, b)
  # (the streaming path is another compiled program: float32 log-probs of ~7 agree to ~1e-6
  # relative, just past 1e-5 absolute with the tests' unoptimised XLA CPU backend)
  np.testing.assert_allclose(view.next_byte_logprobs(st), want[len(text)], atol=1e-5, rtol=1e-5)


def test_views_of_a_scanned_stack(model, fn, view, tok):
  """A scanned stack (`model.scan_layers`, on for the 350m and 1b presets; same seed, same
  weights) gives the unrolled model's byte probabilities through the byte-native and the exact
  BPE views (the views keep per-layer caches, stacked for the scanned forward)."""
  cfg = token_lm.default_model_config()
  cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 32, 2, 2, 1, 16
  cfg.mlp_dim, cfg.init_std, cfg.scan_layers = 64, 0.5, True
  sfn = bl.TokenFn(token_lm.TokenLM(cfg, 384, rngs=nnx.Rngs(0)))
  text = b'the cat'
  np.testing.assert_allclose(bl.ByteTokenLM(sfn).score(text), bl.ByteTokenLM(fn).score(text),
                             atol=1e-5)
  np.testing.assert_allclose(bl.ExactBPE(sfn, tok, bos_id=1, eos_id=2, **FEW_SHAPES).score(text),
                             view.score(text), atol=1e-5)


def test_lexinvariant_view_keeps_one_draw():
  cfg = token_lm.default_model_config()
  cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 16, 1, 2, 1, 8
  cfg.mlp_dim = 32
  enc = encoders.ByteEncoder()
  model = lexinvariant.LexinvariantLM(cfg, lexinvariant.default_lexinv_config(), enc.vocab_size,
                                      n_real=enc.true_vocab_size, rngs=nnx.Rngs(0))
  text = b'abcabcab'
  key = jax.random.key(7)
  view = lm.token_byte_view(bl.TokenFn(model, model.draw(key, 1)), enc, 'lexinv')
  ids = np.array([[1] + [b + 3 for b in text]])
  want = _byte_logprobs(nnx.jit(lambda m, i, d: m(i, d)[0][0])(model, ids, model.draw(key, 1)))
  np.testing.assert_allclose(view.score(text)[:-1], want[np.arange(len(text)), list(text)],
                             atol=1e-5)
  other = bl.ByteTokenLM(bl.TokenFn(model, model.draw(jax.random.key(8), 1)))
  assert not np.allclose(other.score(text), view.score(text))


def _tiny_hat(**kw):
  m = hat.default_model_config()
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 2, 16, 64
  m.byte_d_model, m.byte_heads, m.byte_mlp_dim, m.byte_window, m.init_std = 32, 2, 64, 8, 0.3
  m.update(kw)
  return hat.HAT(m, 384, rngs=nnx.Rngs(3))


@pytest.mark.parametrize('attention', ['causal', 'word'])
def test_hat_view_matches_forward_and_generation(attention):
  model = _tiny_hat(encoder_attention=attention)
  splitter = words.get_splitter('whitespace', 8)
  view = hat_view.byte_view(model, splitter, max_word_bytes=8)
  assert type(view) is hat_view.HATView  # pylint: disable=unidiomatic-typecheck
  text = b'def f(x): return x'
  ids = [1] + [b + 3 for b in text]
  batch = hat.single_row_batch(ids, hat.host_word_starts(splitter, 8, ids), 8)
  want = _byte_logprobs(nnx.jit(lambda m, b: m(b)[0])(model, batch))
  score = view.score(text)
  np.testing.assert_allclose(score[:-1], want[np.arange(len(text)), list(text)], atol=1e-4)
  np.testing.assert_allclose(score[-1], want[-1, -1], atol=1e-4)
  out = bl.sample(view, text[:9], max_bytes=3)  # greedy: the argmax of the forward's rows
  assert out[:1] == bytes([int(np.argmax(want[9]))])


def test_hat_view_of_multibyte_text_with_the_unicode_splitter():
  """The unicode splitter decides on characters: the view goes through the bytes of every
  character (here ’ inside a word, é, an emoji) without a completed word changing, and gives
  normalized distributions."""
  model = _tiny_hat()
  view = hat_view.byte_view(model, words.get_splitter('unicode', 8), max_word_bytes=8)
  d = view.distributions('a clause\u2019s \u00e9t\u00e9 \U0001F600.'.encode())
  np.testing.assert_allclose(np.exp(d.astype(np.float64)).sum(-1), 1.0, atol=1e-4)


def test_hat_boundary_view_sums_the_stream():
  """HAT with word-boundary tokens (and the intra-word encoder): along a text, the view's
  next-byte log-probs before renormalization (a byte that starts a word counts its boundary
  token too) sum to the forward's log-probability of the text's stream and its end; the
  renormalized distributions sum to 1."""
  from data import hat_data  # pylint: disable=import-outside-toplevel
  model = _tiny_hat(pooling='boundary', encoder_attention='word')
  splitter = words.get_splitter('ascii_whitespace', 8)
  view = hat_view.byte_view(model, splitter, max_word_bytes=8)
  assert isinstance(view, hat_view.HATBoundaryView)
  text = b'def f(x):  return x'
  stream = [1] + hat_data.BoundaryByteEncoder(splitter, 259).encode(text.decode()).tolist() + [2]
  batch = hat.single_row_batch(stream[:-1], hat_data.boundary_word_starts(stream[:-1], 259), 9)
  lp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, b: m(b)[0])(model, batch), axis=-1))
  want = sum(lp[i, stream[i + 1]] for i in range(len(stream) - 1))
  st, got = view.start(b''), 0.0
  for b in text:
    got += view.outcome_logprobs(st)[b]
    np.testing.assert_allclose(np.exp(view.next_byte_logprobs(st)).sum(), 1.0, atol=1e-5)
    st = view.advance(st, b)
  got += view.outcome_logprobs(st)[bl.END]
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_ensembles_normalize_and_fit(view, fn):
  byte_view = bl.ByteTokenLM(fn)
  text = b'the cat sat'
  mix, poe = bl.Mixture(view, byte_view, 0.3), bl.ProductOfExperts(view, byte_view)
  for e in (mix, poe):
    d = e.distributions(text).astype(np.float64)
    np.testing.assert_allclose(np.exp(d).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(e.score(text)[:-1], d[np.arange(len(text)), list(text)],
                               atol=1e-5)
  np.testing.assert_allclose(
      mix.score(text), np.logaddexp(math.log(0.3) + view.score(text),
                                    math.log(0.7) + byte_view.score(text)), atol=1e-9)
  st = mix.start(text[:4])
  np.testing.assert_allclose(mix.next_byte_logprobs(st), mix.distributions(text)[4], atol=1e-4)
  w, bits = bl.fit_mixture_weight(view, byte_view, text)
  assert 0.0 <= w <= 1.0
  assert bits <= min(bl.bits_per_byte(view, text), bl.bits_per_byte(byte_view, text)) + 1e-9


def test_token_healing_prompt(view):
  prompt = b'hello wor'  # ends inside a word: [hello, ' ', wor]; 'wor' is backed up
  ids, removed, allowed = bl.heal_split(view.c, prompt)
  full = view.c.encode(prompt)
  assert ids == full[:-1] and removed == view.c.token_bytes[full[-1]] and removed
  assert all(view.c.token_bytes[a].startswith(removed) for a in allowed)
  assert full[-1] in allowed and view.c.by_bytes[b'world'] in allowed
  healed = view.generate_tokens(prompt, 3, heal=True)  # starts with the bytes after 'wor'
  first = bl.token_generate(view.fn, [1] + ids, 1, first_allowed=allowed)[0]
  assert healed.startswith(view.c.token_bytes[first][len(removed):])
  assert isinstance(view.generate_tokens(prompt, 3), bytes)
  ids, removed, allowed = bl.heal_split(view.c, b'')  # nothing to back up: any text token
  assert ids == [] and removed == b'' and np.array_equal(allowed, view.c.text_ids)


def test_bad_input(view, ascii_view, fn):
  with pytest.raises(ValueError, match='byte 3 .* not valid UTF-8'):
    view.start(b'abc\xff')
  with pytest.raises(ValueError, match='not valid UTF-8'):
    view.score(b'\xc3(')
  assert np.all(np.isfinite(bl.ByteTokenLM(fn).score(b'abc\xff')))  # bytes are bytes
  empty = view.score(b'')  # the empty document: only the end of text
  assert empty.shape == (1,) and np.isfinite(empty[0])
  np.testing.assert_allclose(view.next_byte_logprobs(view.start(b'')), view.distributions(b'')[0],
                             atol=1e-5)
  with pytest.raises(ValueError, match='vocabulary cannot encode'):
    ascii_view.score('caf\u00e9'.encode())
  # HF tokenizers drop what the vocabulary lacks: the encoding must give back the text, also
  # for a long prompt (its start goes into the KV cache through the encoding)
  with pytest.raises(ValueError, match=r'byte 3 \(0xc3\): the vocabulary cannot encode'):
    ascii_view.c.encode('caf\u00e9 au lait'.encode())
  with pytest.raises(ValueError, match=r'prompt .*byte 3 \(0xc3\): the vocabulary cannot'):
    ascii_view.start(('caf\u00e9 ' + 'the cat sat ' * 8).encode())
  unigram = Tokenizer(tok_models.Unigram([('<unk>', 0.0), ('a', -1.0)], 0))
  with pytest.raises(ValueError, match='need a BPE tokenizer'):
    bl.ExactBPE(fn, unigram, 1, 2, **FEW_SHAPES)
  with pytest.raises(ValueError, match='no byte-level view for encoder'):
    lm.token_byte_view(fn, object(), 'x')  # a token LM's view needs its encoder's units
  lp = view.score('\u4e2d'.encode()[:2])  # ends inside a character: end of text impossible
  assert np.isinf(lp[-1]) and np.all(np.isfinite(lp[:-1]))
