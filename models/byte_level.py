"""One byte-level interface for every text model: next-byte distributions, scoring, sampling,
cross-tokenizer ensembles.

  view = byte_view(model, encoder)             # ByteLM: TokenLM over bytes or BPE, HAT, lexinvariant
  st = view.start(b'def fibonac')              # state after the prompt (KV caches inside)
  lp = view.next_byte_logprobs(st)             # float32 [257]: log p(byte | prompt), [256] = end
  st = view.advance(st, ord('c'))              # one byte more; caches reused, nothing recomputed
  view.score(text)                             # float64 [len + 1]: log p of every byte, then end
  sample(view, b'def fibonac', 32)             # greedy / temperature sampling, byte by byte
  sample_compare(view, b'def fibonac', 32)     # + plain token-level and token healing (BPE)
  Mixture(a, b, 0.7), ProductOfExperts(a, b)   # ensembles of any two views; fit_mixture_weight
  mix_logprobs, product_logprobs               # any number of members, from their log-probs;
  fit_mixture_weights, fit_product_alphas      # weights / exponents fitted on held-out bytes

What probability each view defines
----------------------------------
*Byte-native token LMs* (TokenLM over `ByteEncoder` ids: pad 0, bos 1, eos 2, byte b -> b + 3):
the model's next-id softmax restricted to the 256 byte ids and eos, renormalized. The mass on
pad, bos and the padding ids past 259 is dropped (they are not text). A document starts after
bos; end of text is eos.

*BPE token LMs* (`ExactBPE`: the subword LM, SmolLM2, tokenizer-transferred models): the exact
byte-level marginal of the model's *canonical process* Q. Q is the model's next-token
distribution restricted, at every token step, to the tokens that keep the sequence canonical
(a prefix of the tokenizer's encoding of the text so far plus some continuation; see
data/canonical.py), plus the end token where the sequence is exactly the tokenizer's encoding
of its text, and renormalized there:
    Q(t_k | t_<k) = P(t_k | t_<k) [t_<=k canonical] / Z(t_<k),
    Z(t_<k) = sum over canonical next tokens v of P(v | t_<k) + [t_<k = enc(its text)] P(end | t_<k).
Q is a proper distribution over texts (no canonical sequence is a dead end), and the only
sequence after which a text may end is its encoding, so
Q(text, end) = P(enc(text), end) / prod_k Z(enc(text)_<k): the token-level probability of the
tokenizer's encoding, raised by the mass the model puts on non-canonical tokens along it (the
figure `benchmarks/byte_level.py` reports; 0 when the model never leaves canonical encodings).
The probability that a text *starts* with the bytes x is the sum of Q over x's cover encodings
(canonical sequences whose last token reaches or crosses the end of x while the rest ends
before it, the Byte-Token Representation Lemma of Phan et al. 2025), so
    p(b | x) = Q(starts with x b) / Q(starts with x),   p(end | x) = Q(x, end) / Q(starts with x)
are exact: the 257 values sum to 1 and the chain rule holds (sum of the byte log-probs plus the
end log-prob = log Q(text, end)). Nothing is approximate but the floating point (fp32 logits,
fp64 sums). The papers prune the same invalid encodings but renormalize per byte instead of per
token (the two agree when the model never leaves canonical encodings). Padding ids and special
tokens other than the end token are pruned like non-canonical tokens. A document starts after
the begin token (SmolLM2: its document separator) and ends with the end token.
Only texts that are UTF-8 (or a prefix of it) have probability > 0: a BPE view refuses a prompt
or text with invalid UTF-8 (ValueError naming the byte); a text that ends inside a character
has end probability 0. A byte the vocabulary cannot produce raises too.

Cost: the cover encodings live in a lattice of canonical token sequences over the text (about
one node per byte). Scoring a known text evaluates every node that has a canonical cover: one
forward over the tokenizer's encoding, plus packed forwards over the other nodes: one token
per node, the subtrees that leave the encoding packed into rows of up to 256 tokens with a tree
mask, each reading the encoding's KV cache in place up to where its subtree leaves it
(`models.layers.attend_shared_prefix`; no copy of the cache per row, no node twice).
So scoring costs about one model position per byte instead of one per token, plus a validity
row per node on the host (~1 ms for SmolLM2). Streaming (start / advance) evaluates each new
node once, rewriting the tail of one cached token path.

*HAT* (`HATView`) and *lexinvariant LMs* over bytes (`byte_view(..., rng=)`: the random
embedding is drawn once per view and kept for every text it scores) are byte-level already.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import canonical
from models import layers

END = 256          # index of end-of-text in a next-byte distribution
NUM_OUTCOMES = 257
BYTE_OFFSET = 3    # ByteEncoder: byte b -> id b + 3; pad 0, bos 1, eos 2


def _bucket(n: int, minimum: int = 1) -> int:
  """The next power of two >= n (KV cache sizes)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _ladder(n: int, minimum: int = 1, base: int = 8) -> int:
  """Few padded sizes, so each shape compiles once: sequence lengths 1, 8, 64, then powers of
  two (long prefills do not pay 8x padding); batch rows (base 4) 1, 4, 16, 64."""
  m, n = 1, max(int(n), minimum)
  while m < n:
    m *= base
  if m > 64:
    m = _bucket(n)
  return m


# -- the interface -------------------------------------------------------------------------------
class ByteLM(abc.ABC):
  """A text model seen one byte at a time.

  States are opaque and owned by the caller: `advance` returns the state to use next (it may be
  the same object, updated in place), so a state is used once."""
  name: str = 'byte_lm'

  @abc.abstractmethod
  def start(self, prompt: bytes = b'') -> Any:
    """The state after the begin-of-document context and `prompt` (bytes; may be empty)."""

  @abc.abstractmethod
  def next_byte_logprobs(self, state) -> np.ndarray:
    """float32 [257]: log p(next byte | state) for bytes 0..255, and [256] = end of text.
    exp sums to 1; impossible outcomes are -inf."""

  @abc.abstractmethod
  def advance(self, state, byte: int) -> Any:
    """The state after one more byte (0..255)."""

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    """float64 [len(text) (+1)]: log p(text[i] | text[:i]) for every byte, then (end=True)
    log p(end | text). Sum: the log-probability of the document `text`."""
    text = bytes(text)
    st = self.start(b'')
    out = []
    for b in text:
      out.append(float(self.next_byte_logprobs(st)[b]))
      st = self.advance(st, b)
    if end:
      out.append(float(self.next_byte_logprobs(st)[END]))
    return np.array(out, np.float64)

  def distributions(self, text: bytes) -> np.ndarray:
    """float32 [len(text) + 1, 257]: the next-byte distribution before every byte and after
    the last one."""
    text = bytes(text)
    st = self.start(b'')
    out = [self.next_byte_logprobs(st)]
    for b in text:
      st = self.advance(st, b)
      out.append(self.next_byte_logprobs(st))
    return np.stack(out)


def bits_per_byte(view: ByteLM, text: bytes, end: bool = False) -> float:
  """Mean -log2 p per byte of `text` (the end-of-text term included when `end`)."""
  lp = view.score(text, end=end)
  return float(-lp.sum() / math.log(2) / max(1, len(text)))


def _normalize(logp: np.ndarray) -> np.ndarray:
  m = np.max(logp)
  if not np.isfinite(m):
    raise ValueError('every outcome has probability 0')
  return logp - (m + np.log(np.sum(np.exp(logp - m))))


# -- token-level models as the views call them -----------------------------------------------
def _scanned_layers(model) -> int:
  """The number of layers of a token LM whose stack is scanned (`model.scan_layers`: its KV
  cache is one dict of [layers, ...] arrays), else 0. The views keep per-layer caches (a list
  of dicts, batch on axis 0 and slots on axis 1) either way."""
  t = getattr(model, 'transformer', None)
  return int(t.num_layers) if getattr(t, 'scan_layers', False) else 0


def _per_layer(cache, n: int) -> list:
  return [jax.tree.map(lambda x, i=i: x[i], cache) for i in range(n)]


def _apply(graphdef, params, draw, ids, positions, segment_ids, cache, index):
  m = nnx.merge(graphdef, params)
  n_scanned = _scanned_layers(m)
  if n_scanned:  # the views' per-layer caches, stacked for the scanned stack and back
    cache = jax.tree.map(lambda *xs: jnp.stack(xs), *cache)
  if draw is None:
    logits, cache = m(ids, positions, segment_ids, cache=cache, cache_index=index)
  else:  # one random embedding for every row
    b = ids.shape[0]
    d = {k: (v if k == 'gauss' and v.ndim == 2 else jnp.broadcast_to(v, (b,) + v.shape[1:]))
         for k, v in draw.items()}
    logits, cache = m(ids, d, positions, segment_ids, cache=cache, cache_index=index)
  if n_scanned:
    cache = _per_layer(cache, n_scanned)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=6)
def _forward(graphdef, params, draw, ids, positions, segment_ids, cache, index):
  return _apply(graphdef, params, draw, ids, positions, segment_ids, cache, index)


@functools.partial(jax.jit, static_argnums=0)
def _forward_tree(graphdef, params, draw, trunk_cache, prefix_visible_BxTxS, own_visible_BxTxT,
                  ids, positions):
  cache = [layers.shared_prefix_cache(c, prefix_visible_BxTxS, own_visible_BxTxT)
           for c in trunk_cache]
  return _apply(graphdef, params, draw, ids, positions, jnp.ones_like(ids), cache, 0)[0]


class TokenFn:
  """A token-level LM (TokenLM, or LexinvariantLM with one fixed random embedding `draw` for
  batch 1) as the views call it: a jitted cached forward giving fp32 log-softmax over the
  model's whole vocabulary. Views of models with one structure share the compiled code."""

  def __init__(self, model, draw: dict | None = None):
    self.graphdef, self.params = nnx.split(model)
    self.draw = draw
    self.vocab_size = int(model.vocab_size)
    self._model = model

  def init_cache(self, batch: int, size: int) -> list:
    """Empty per-layer KV caches (also for a scanned stack: see `_scanned_layers`)."""
    cache = self._model.init_cache(batch, size)
    n = _scanned_layers(self._model)
    return _per_layer(cache, n) if n else cache

  def __call__(self, ids, positions, cache, index: int):
    """ids/positions int [B, T] written at slots index..; returns (host float32 [B, T, V] log
    probs, the new cache; the old one is donated)."""
    ids = jnp.asarray(ids, jnp.int32)
    lp, cache = _forward(self.graphdef, self.params, self.draw, ids,
                         jnp.asarray(positions, jnp.int32), jnp.ones_like(ids), cache,
                         jnp.int32(index))
    return np.asarray(lp), cache

  def tree(self, trunk_cache, prefix_visible, own_visible, ids, positions):
    """Tokens that continue a one-row cache in a tree: token t of row b sees the cache slots
    where prefix_visible[b, t] is nonzero and the row's tokens u where own_visible[b, t, u] is
    (its ancestors and itself); RoPE positions `positions`. The cache is read in place
    (layers.attend_shared_prefix) and not changed. Returns host fp32 log-probs [B, T, V]."""
    return np.asarray(_forward_tree(
        self.graphdef, self.params, self.draw, trunk_cache, jnp.asarray(prefix_visible, bool),
        jnp.asarray(own_visible, bool), jnp.asarray(ids, jnp.int32),
        jnp.asarray(positions, jnp.int32)))


def _grow(cache, size: int):
  """The cache with its slot axis padded to `size` (empty slots: segment 0)."""
  def pad(a):
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, size - a.shape[1])
    return jnp.pad(a, widths)
  return [{k: pad(v) for k, v in c.items()} for c in cache]


# -- byte-native token LMs -----------------------------------------------------------------------
@dataclasses.dataclass
class _ByteState:
  cache: Any
  n: int                # slots used (bos + bytes fed)
  logprobs: np.ndarray  # float32 [257] after the last fed id


class ByteTokenLM(ByteLM):
  """A token LM over ByteEncoder ids (the byte LM; a lexinvariant byte model via `TokenFn` with
  a fixed draw). Next byte = softmax over ids 3..258 (bytes) and 2 (eos), renormalized."""

  def __init__(self, fn: TokenFn, name: str = 'bytes', bos_id: int = 1, eos_id: int = 2,
               chunk: int = 256):
    if fn.vocab_size < 256 + BYTE_OFFSET:
      raise ValueError(f'a byte LM needs at least {256 + BYTE_OFFSET} ids, got {fn.vocab_size}')
    self.fn, self.name, self.bos_id, self.eos_id, self.chunk = fn, name, bos_id, eos_id, chunk
    self._take = np.concatenate([np.arange(BYTE_OFFSET, 256 + BYTE_OFFSET), [eos_id]])

  def _outcomes(self, lp_V) -> np.ndarray:
    return _normalize(np.asarray(lp_V, np.float64)[self._take]).astype(np.float32)

  def _feed(self, st: _ByteState, ids: list[int]) -> _ByteState:
    """Feeds ids at slots n.. in chunks of padded length (a few shapes)."""
    for i in range(0, len(ids), self.chunk):
      part = ids[i:i + self.chunk]
      t = _ladder(len(part))
      need = st.n + t
      size = st.cache[0]['k'].shape[1]
      if need > size:
        st.cache = _grow(st.cache, _bucket(need, 128))
      pad = part + [0] * (t - len(part))
      lp, st.cache = self.fn([pad], [list(range(st.n, st.n + t))], st.cache, st.n)
      st.logprobs = self._outcomes(np.asarray(lp[0, len(part) - 1]))
      st.n += len(part)
    return st

  def start(self, prompt: bytes = b'') -> _ByteState:
    st = _ByteState(self.fn.init_cache(1, _bucket(len(prompt) + 2, 128)), 0, None)
    return self._feed(st, [self.bos_id] + [b + BYTE_OFFSET for b in bytes(prompt)])

  def next_byte_logprobs(self, state: _ByteState) -> np.ndarray:
    return state.logprobs

  def advance(self, state: _ByteState, byte: int) -> _ByteState:
    return self._feed(state, [int(byte) + BYTE_OFFSET])

  def distributions(self, text: bytes) -> np.ndarray:
    ids = [self.bos_id] + [b + BYTE_OFFSET for b in bytes(text)]
    t = _ladder(len(ids), 8)
    cache = self.fn.init_cache(1, t)
    lp, _ = self.fn([ids + [0] * (t - len(ids))], [list(range(t))], cache, 0)
    lp = np.asarray(lp[0, :len(ids)], np.float64)[:, self._take]
    return (lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)).astype(np.float32)

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    text = bytes(text)
    d = self.distributions(text).astype(np.float64)
    out = d[np.arange(len(text)), np.frombuffer(text, np.uint8)]
    return np.concatenate([out, d[-1:, END]]) if end else out


# -- exact byte-level view of a BPE token LM ----------------------------------------------------
class _Node:
  """A canonical token sequence whose bytes are a prefix of the text: the lattice node of its
  last token. `depth`: KV-cache slot of that token (begin token at slot 0)."""
  __slots__ = ('end', 'parent', 'last', 'depth', 'complete', 'children', 'lp', 'row', 'logq',
               'logz', 'exact')

  def __init__(self, end, parent, last, depth, complete):
    self.end, self.parent, self.last, self.depth, self.complete = end, parent, last, depth, complete
    self.children, self.lp, self.row, self.logq, self.logz = [], None, None, None, None
    self.exact = None  # is the path the tokenizer's encoding of its text (may the text end)?


class _Lattice:
  """All canonical token sequences whose bytes are a prefix of the text seen so far (from a root
  at a stable chunk boundary: the begin token, or a prompt prefix in the KV cache)."""

  def __init__(self, canon: canonical.Canonical, root_depth: int = 0, origin: int = 0):
    self.c = canon
    self.origin = origin            # absolute byte offset of x[0]
    self.x = bytearray()
    self.root = _Node(origin, None, -1, root_depth, True)
    self.root.logq = 0.0
    self.at: dict[int, list[_Node]] = {origin: [self.root]}
    self.partial = b''

  @property
  def end(self) -> int:
    return self.origin + len(self.x)

  def text(self, a: int, b: int) -> bytes:
    return bytes(self.x[a - self.origin:b - self.origin])

  @staticmethod
  def tokens_rev(u: _Node):
    while u.parent is not None:
      yield u.last
      u = u.parent

  def row(self, u: _Node) -> np.ndarray:
    if u.row is None:
      u.row = self.c.row(self.c.make_tail(self.x, u.end - self.origin, self.tokens_rev(u)))
    return u.row

  def eos_ok(self, u: _Node) -> bool:
    """May the text end after u (u's path is the encoding of its text)?"""
    if u.exact is None:
      u.exact = u.complete and (u.parent is None or self.c.is_exact(
          self.c.make_tail(self.x, u.end - self.origin, self.tokens_rev(u))))
    return u.exact

  def extend(self, b: int):
    """One more byte: the nodes whose last token ends at it. Raises ValueError (naming the
    absolute byte offset) if the byte cannot continue UTF-8 text or no canonical sequence
    covers the text any more."""
    m = self.end + 1
    where = f'byte {m - 1} (0x{b:02x})'
    if self.partial:
      if not canonical._cont_ok(self.partial, b):  # pylint: disable=protected-access
        raise ValueError(f'{where} is not valid UTF-8 here: a BPE model gives it probability 0')
      p = self.partial + bytes([b])
      self.partial = b'' if len(p) == canonical._char_len(p[0]) else p  # pylint: disable=protected-access
    else:
      k = canonical._char_len(b)  # pylint: disable=protected-access
      if k == 0:
        raise ValueError(f'{where} is not valid UTF-8 here: a BPE model gives it probability 0')
      self.partial = bytes([b]) if k > 1 else b''
    self.x.append(b)
    new = []
    for j in range(max(self.origin, m - self.c.max_len), m):
      v = self.c.by_bytes.get(self.text(j, m))
      if v is None:
        continue
      for u in self.at.get(j, ()):
        if self.row(u)[v]:
          node = _Node(m, u, v, u.depth + 1, not self.partial)
          u.children.append(node)
          new.append(node)
    self.at[m] = new
    if not new and not any(self.covers(u, m).size for j in range(max(self.origin, m - self.c.max_len), m)
                           for u in self.at.get(j, ())):
      raise ValueError(f'{where}: no token sequence of the tokenizer produces this text (a byte '
                       f'the vocabulary cannot encode?)')

  def window(self, m: int):
    for j in range(max(self.origin, m - self.c.max_len), m + 1):
      yield from self.at.get(j, ())

  def covers(self, u: _Node, m: int) -> np.ndarray:
    """Sorted-order indices of the canonical tokens v after u that reach past byte m (u ends
    before m): bytes(v) starts with text[u.end:m] and is longer."""
    c = self.c
    a, b = c.prefix_range(self.text(u.end, m))
    if a == b:
      return np.zeros(0, np.int64)
    k = np.arange(a, b)
    k = k[c.sorted_lengths[a:b] > m - u.end]
    return k[self.row(u)[c.sorted_ids[k]]]


class ExactBPE(ByteLM):
  """Exact next-byte probabilities of a BPE token LM (module doc: the canonical process Q).

  fn: the model as a `TokenFn`; tokenizer: its HF `tokenizers` byte-level BPE; bos_id: the
  token a document starts after; eos_id: the token that ends it. Raises
  `canonical.UnsupportedTokenizer` (a ValueError) for tokenizers it cannot canonicalize."""

  def __init__(self, fn: TokenFn, tokenizer, bos_id: int, eos_id: int, name: str = 'bpe',
               max_tokens: int = 256, min_tokens: int = 8):
    """max_tokens: tokens per packed branch forward (whole subtrees of the lattice off the
    cached path; a row is padded to a power of two between min_tokens and max_tokens, so few
    shapes compile)."""
    self.fn, self.name, self.bos_id, self.eos_id = fn, name, int(bos_id), int(eos_id)
    self.canon = canonical.Canonical(tokenizer, fn.vocab_size)
    self.max_tokens, self.min_tokens = max_tokens, min_tokens

  # -- model evaluation --------------------------------------------------------------------
  def _logq(self, u: _Node, lat: _Lattice) -> float:
    """log Q(path of u) relative to the lattice root (needs the log-probs of the ancestors
    whose children have no log Q yet)."""
    chain = []
    while u.logq is None:
      chain.append(u)
      u = u.parent
    for v in reversed(chain):
      p = v.parent
      v.logq = p.logq + float(p.lp[v.last]) - self._logz(p, lat)
    return chain[0].logq if chain else u.logq

  def _logz(self, u: _Node, lat: _Lattice) -> float:
    if u.logz is None:
      lp = u.lp[lat.row(u)].astype(np.float64)
      terms = [lp] + ([np.array([u.lp[self.eos_id]], np.float64)] if lat.eos_ok(u) else [])
      t = np.concatenate(terms)
      m = t.max()
      u.logz = float(m + np.log(np.exp(t - m).sum()))
    return u.logz

  def _prefill(self, ids: list[int], size: int):
    """Runs [bos] + ids into a fresh one-row cache of `size` slots; (log-probs [T, V], cache)."""
    toks = [self.bos_id] + list(ids)
    t = _ladder(len(toks), 8)
    cache = self.fn.init_cache(1, max(size, t))
    lp, cache = self.fn([toks + [0] * (t - len(toks))], [list(range(t))], cache, 0)
    return np.asarray(lp[0, :len(toks)]), cache

  def _branches(self, cache, cached: _Node, leaves: list[_Node]):
    """Log-probs for `leaves` and their ancestors off the cached path, each node evaluated
    once: the subtrees hanging off the path are packed into rows of at most `max_tokens`
    tokens (whole subtrees; a larger one gets a row of its own), one token per node at RoPE
    position = its depth, reading the path's KV cache in place up to the path node its
    subtree leaves from, and attending to its ancestors in the row (a tree mask)."""
    on_path = set()
    u = cached
    while u is not None:
      on_path.add(id(u))
      u = u.parent
    tree_of: dict[int, int] = {}       # node -> its subtree (the root's id)
    trees: dict[int, list[_Node]] = {}  # parents before children
    for leaf in leaves:
      chain, u = [], leaf
      while id(u) not in on_path and id(u) not in tree_of:
        chain.append(u)
        u = u.parent
      if not chain:
        continue
      root = id(chain[-1]) if id(u) in on_path else tree_of[id(u)]
      for v in reversed(chain):
        tree_of[id(v)] = root
        trees.setdefault(root, []).append(v)
    rows, row = [], []
    for tree in trees.values():
      if row and len(row) + len(tree) > self.max_tokens:
        rows.append(row)
        row = []
      row = row + tree
    if row:
      rows.append(row)
    size = cache[0]['k'].shape[1]
    for row in rows:
      t = max(self.min_tokens, _bucket(len(row)))
      ids = np.zeros((1, t), np.int32)
      pos = np.zeros((1, t), np.int32)
      pre = np.zeros((1, t, size), bool)
      own = np.eye(t, dtype=bool)[None]
      pre[0, len(row):, 0] = True  # padding tokens see the begin token and themselves
      where = {}
      for i, v in enumerate(row):
        ids[0, i], pos[0, i] = v.last, v.depth
        p = where.get(id(v.parent))
        if p is None:  # the parent is on the cached path: the cache up to it
          pre[0, i, :v.parent.depth + 1] = True
        else:
          pre[0, i] = pre[0, p]
          own[0, i] |= own[0, p]
        where[id(v)] = i
      lp = self.fn.tree(cache, pre, own, ids, pos)
      for i, v in enumerate(row):
        if v.lp is None:
          v.lp = lp[0, i]

  def _eval(self, st, nodes: list[_Node]):
    """Makes sure `nodes` have log-probs, and so do the ancestors their log Q needs
    (streaming: one rewritten cache row for a single new node, else batched branches)."""
    missing: dict[int, _Node] = {}
    for u in nodes:
      if u.lp is None:
        missing[id(u)] = u
      a = u
      while a.logq is None:
        if a.parent.lp is None:
          missing[id(a.parent)] = a.parent
        a = a.parent
    if not missing:
      return
    on_path = set()
    a = st.cached
    while a is not None:
      on_path.add(id(a))
      a = a.parent
    if any(k in on_path for k in missing):  # freed log-probs on the cached path: recompute
      for k in [k for k in missing if k in on_path]:
        self._rewrite(st, missing.pop(k), again=True)
      if not missing:
        return
    inner = set()
    for u in missing.values():
      a = u.parent
      while id(a) not in on_path:
        inner.add(id(a))
        a = a.parent
    leaves = [u for k, u in missing.items() if k not in inner]
    if len(leaves) == 1:
      self._rewrite(st, leaves[0])
      return
    self._branches(st.cache, st.cached, leaves)

  def _rewrite(self, st, u: _Node, again: bool = False):
    """Moves the cached path to u (writes its tokens after the common ancestor; `again`: u is
    on the cached path already, recompute its log-probs)."""
    on_path = set()
    a = st.cached
    while a is not None:
      on_path.add(id(a))
      a = a.parent
    if again:
      suffix, a = [u], u.parent
    else:
      suffix, a = [], u
      while id(a) not in on_path:
        suffix.append(a)
        a = a.parent
      suffix.reverse()
    t = _ladder(len(suffix))
    if u.depth + t + 1 > st.cache[0]['k'].shape[1]:
      st.cache = _grow(st.cache, _bucket(u.depth + t + 1, 128))
    ids = [s.last for s in suffix] + [0] * (t - len(suffix))
    pos = list(range(a.depth + 1, a.depth + 1 + t))
    lp, st.cache = self.fn([ids], [pos], st.cache, a.depth + 1)
    lp = np.asarray(lp[0])
    for k, s in enumerate(suffix):
      if s.lp is None:
        s.lp = lp[k]
    if not again:
      st.cached = u

  # -- distributions --------------------------------------------------------------------------
  def _needed(self, lat: _Lattice, m: int) -> list[_Node]:
    """Nodes whose log-probs the distribution of the byte after text[:m] needs."""
    return [u for u in lat.window(m) if u.end == m or lat.covers(u, m).size]

  def _dist(self, lat: _Lattice, m: int) -> np.ndarray:
    """float64 [257] log p(next | text[:m]) from the nodes' log-probs."""
    c = self.c
    parts = []
    for u in lat.window(m):
      if u.end < m:
        k = lat.covers(u, m)
        if not k.size:
          continue
        p = np.exp(u.lp[c.sorted_ids[k]].astype(np.float64))
        vec = np.bincount(c.sorted_next[k, m - u.end], p, minlength=NUM_OUTCOMES)
      else:
        row = lat.row(u)
        ids = c.text_ids[row[c.text_ids]]
        p = np.exp(u.lp[ids].astype(np.float64))
        vec = np.bincount(c.first_byte[ids], p, minlength=NUM_OUTCOMES)
        if lat.eos_ok(u):
          vec[END] += math.exp(float(u.lp[self.eos_id]))
      parts.append((self._logq(u, lat) - self._logz(u, lat), vec))
    if not parts:
      raise ValueError('no continuation has probability > 0')
    top = max(w for w, _ in parts)
    acc = sum(math.exp(w - top) * vec for w, vec in parts)
    with np.errstate(divide='ignore'):
      return np.log(acc) - np.log(acc.sum())

  @property
  def c(self) -> canonical.Canonical:
    return self.canon

  # -- streaming --------------------------------------------------------------------------------
  def start(self, prompt: bytes = b'') -> '_BPEState':
    prompt = bytes(prompt)
    try:
      cb, _ = canonical.utf8_split(prompt)
    except ValueError as e:
      raise ValueError(f'prompt {prompt[:40]!r}...: {e}: a BPE model gives it probability 0'
                       ) from e
    base, anchor = [], 0
    if cb > 64:  # all but the last pieces go into the KV cache in one forward
      try:
        ids = self.c.encode(prompt[:cb])
      except ValueError as e:
        raise ValueError(f'prompt {prompt[:40]!r}...: {e}') from e
      tail = self.c.make_tail(prompt, cb, reversed(ids))
      anchor = cb - len(tail.text)
      base = ids[:len(ids) - len(tail.tokens)]
    lp, cache = self._prefill(base, _bucket(len(base) + 2 * (len(prompt) - anchor) + 16, 128))
    lat = _Lattice(self.c, root_depth=len(base), origin=anchor)
    lat.root.lp = lp[-1]
    try:
      for b in prompt[anchor:]:
        lat.extend(b)
    except ValueError as e:
      raise ValueError(f'prompt {prompt[:40]!r}...: {e}') from e
    st = _BPEState(lat, cache, lat.root)
    return st

  def next_byte_logprobs(self, state: '_BPEState') -> np.ndarray:
    lat, m = state.lat, state.lat.end
    self._eval(state, self._needed(lat, m))
    return self._dist(lat, m).astype(np.float32)

  def advance(self, state: '_BPEState', byte: int) -> '_BPEState':
    lat = state.lat
    lat.extend(int(byte))
    old = lat.at.get(lat.end - self.c.max_len - 1, ())
    for u in old:  # out of the window: give the children their log Q, then free the arrays
      if u.lp is not None and u.logq is not None:
        for ch in u.children:
          self._logq(ch, lat)
        u.lp = None
        u.row = None
    return state

  # -- whole texts (batched) ------------------------------------------------------------------
  def _lattice(self, text: bytes) -> _Lattice:
    try:
      canonical.utf8_split(text)
    except ValueError as e:
      raise ValueError(f'text {text[:40]!r}...: {e}: a BPE model gives it probability 0') from e
    lat = _Lattice(self.c)
    for b in text:
      lat.extend(b)
    return lat

  def _eval_all(self, lat: _Lattice, nodes: list[_Node]):
    """Log-probs for `nodes`: one forward over a full-length path, one batched forward for the
    others (their divergent tokens on top of its KV cache)."""
    n = lat.end
    ends = [e for e in sorted(lat.at) if lat.at[e]]
    trunk_end = lat.at[ends[-1]]
    trunk = next((u for u in trunk_end if lat.eos_ok(u)), trunk_end[0])
    path = []
    u = trunk
    while u.parent is not None:
      path.append(u)
      u = u.parent
    path.reverse()
    if trunk.end == n and lat.eos_ok(trunk) and n:
      ids = self.c.encode(lat.text(0, n))
      if ids != [s.last for s in path]:
        raise RuntimeError('internal: the lattice path differs from the tokenizer\'s encoding')
    on_trunk = {id(lat.root)} | {id(s) for s in path}
    rest = [u for u in nodes if id(u) not in on_trunk]
    lp, cache = self._prefill([s.last for s in path], _bucket(len(path) + 1, 128))
    lat.root.lp = lp[0]
    for k, s in enumerate(path):
      s.lp = lp[k + 1]
    if rest:
      ids_rest = {id(u) for u in rest}
      leaves = [u for u in rest if not any(id(ch) in ids_rest for ch in u.children)]
      self._branches(cache, trunk, leaves)

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    text = bytes(text)
    c, lat = self.c, self._lattice(text)
    n = len(text)
    needed = []
    first_ranges = {}
    for j in sorted(lat.at):
      for u in lat.at[j]:
        if j < n:
          a, b = first_ranges.setdefault(j, c.prefix_range(text[j:j + 1]))
          if a < b and lat.row(u)[c.sorted_ids[a:b]].any():
            needed.append(u)
        elif end and lat.eos_ok(u):
          needed.append(u)
    self._eval_all(lat, needed)
    logp = np.full(n + 1, -np.inf)  # log Q(text starts with text[:k])
    logp[0] = 0.0
    terms: list[list[float]] = [[] for _ in range(n + 1)]
    end_terms = []
    for u in needed:
      w = self._logq(u, lat) - self._logz(u, lat)
      if u.end == n:
        end_terms.append(w + float(u.lp[self.eos_id]))
        continue
      row = lat.row(u)
      a, b = first_ranges[u.end]
      for k in range(u.end + 1, min(n, u.end + c.max_len) + 1):
        a, b = c.prefix_range(text[u.end:k], a, b)
        if a == b:
          break
        ids = c.sorted_ids[a:b]
        s = float(np.exp(u.lp[ids[row[ids]]].astype(np.float64)).sum())
        if s > 0:
          terms[k].append(w + math.log(s))
    for k in range(1, n + 1):
      if terms[k]:
        t = np.array(terms[k])
        logp[k] = t.max() + math.log(np.exp(t - t.max()).sum())
    with np.errstate(invalid='ignore'):
      out = np.diff(logp)
    if end:
      e = -np.inf
      if end_terms:
        t = np.array(end_terms)
        e = t.max() + math.log(np.exp(t - t.max()).sum())
      out = np.concatenate([out, [e - logp[n]]])
    return out

  def generate_tokens(self, prompt: bytes, max_new_tokens: int, heal: bool = False,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                      max_bytes: int | None = None) -> bytes:
    """The token-level completion of `prompt` (bytes after it, up to the end token; greedy at
    temperature 0): plain (the prompt's encoding as the context), or with token healing (its
    last token removed and the first new token constrained to start with that token's bytes).
    `max_bytes`: stop once that many bytes follow the prompt, and cut there."""
    stop = (self.eos_id,)
    rng = np.random.default_rng(seed)
    if heal:
      ids, removed, allowed = heal_split(self.c, bytes(prompt))
    else:
      removed, allowed = b'', None
      try:
        ids = self.c.encode(bytes(prompt))
      except ValueError as e:
        raise ValueError(f'prompt {bytes(prompt)[-20:]!r}: a token-level prompt must be text '
                         f'the tokenizer encodes ({e})') from e
    tb = self.c.token_bytes
    done = None
    if max_bytes is not None:
      done = lambda out: sum(len(tb[t] or b'') for t in out) - len(removed) >= max_bytes
    out = token_generate(self.fn, [self.bos_id] + ids, max_new_tokens, stop, allowed,
                         temperature, top_p, rng, done)
    text = b''.join(tb[t] or b'' for t in out if t != self.eos_id)[len(removed):]
    return text if max_bytes is None else text[:max_bytes]

  def distributions(self, text: bytes) -> np.ndarray:
    text = bytes(text)
    lat = self._lattice(text)
    nodes = [u for j in sorted(lat.at) for u in lat.at[j]]
    self._eval_all(lat, nodes)
    return np.stack([self._dist(lat, m) for m in range(len(text) + 1)]).astype(np.float32)


@dataclasses.dataclass
class _BPEState:
  lat: _Lattice
  cache: Any
  cached: _Node   # the node whose token path the one-row cache holds


# -- token-level generation on the same model (baselines for byte-level sampling) -------------
def heal_split(canon: canonical.Canonical, prompt: bytes) -> tuple[list[int], bytes, np.ndarray]:
  """Token healing's view of a prompt: (the prompt's encoding without its last token, the
  bytes backed up, the ids whose bytes start with them: what the first new token may be). A
  prompt that ends inside a character backs up those bytes too (the last token with them if
  some token starts with both, else only them)."""
  prompt = bytes(prompt)
  n, partial = canonical.utf8_split(prompt)
  ids = canon.encode(prompt[:n])
  if not ids and not partial:
    return [], b'', canon.text_ids.copy()
  removed = (canon.token_bytes[ids[-1]] if ids else b'') + partial
  a, b = canon.prefix_range(removed)
  if ids and a == b:  # no token continues the last token into the partial character
    removed = partial
    a, b = canon.prefix_range(removed)
    return ids, removed, np.sort(canon.sorted_ids[a:b])
  return ids[:-1], removed, np.sort(canon.sorted_ids[a:b])


def token_generate(fn: TokenFn, ids: list[int], max_new: int, stop_ids=(),
                   first_allowed: np.ndarray | None = None, temperature: float = 0.0,
                   top_p: float = 1.0, rng: np.random.Generator | None = None,
                   done: Callable[[list[int]], bool] | None = None) -> list[int]:
  """Token-level decoding with a KV cache (host loop; greedy at temperature 0, else nucleus
  sampling as `pick`): `ids` is the full context (begin token included); `first_allowed`
  restricts the first new token. Stops after a stop id, or when `done(tokens so far)`."""
  size = _bucket(len(ids) + max_new + 1, 128)
  cache = fn.init_cache(1, size)
  t = _ladder(len(ids))
  lp, cache = fn([list(ids) + [0] * (t - len(ids))], [list(range(t))], cache, 0)
  lp = np.asarray(lp[0, len(ids) - 1])
  out = []
  for i in range(max_new):
    if i == 0 and first_allowed is not None:
      masked = np.full_like(lp, -np.inf)
      masked[first_allowed] = lp[first_allowed]
      lp = masked
    tok = pick(lp, temperature, top_p, rng)
    out.append(tok)
    if tok in stop_ids or (done is not None and done(out)):
      break
    n = len(ids) + i
    lp, cache = fn([[tok]], [[n]], cache, n)
    lp = np.asarray(lp[0, 0])
  return out


# -- ensembles -------------------------------------------------------------------------------------
class Mixture(ByteLM):
  """Byte-level interpolation: p(b | x) = w p_a(b | x) + (1 - w) p_b(b | x) at every byte, for
  any two views (any tokenizers or families)."""

  def __init__(self, a: ByteLM, b: ByteLM, weight: float = 0.5):
    if not 0.0 <= weight <= 1.0:
      raise ValueError(f'mixture weight {weight} not in [0, 1]')
    self.a, self.b, self.weight = a, b, float(weight)
    self.name = f'mix({a.name}:{weight:.3g},{b.name})'

  def _mix(self, la, lb):
    return mix_logprobs(np.stack([np.asarray(la, np.float64), np.asarray(lb, np.float64)]),
                        [self.weight, 1.0 - self.weight])

  def start(self, prompt: bytes = b''):
    return [self.a.start(prompt), self.b.start(prompt)]

  def next_byte_logprobs(self, state) -> np.ndarray:
    return self._mix(self.a.next_byte_logprobs(state[0]),
                     self.b.next_byte_logprobs(state[1])).astype(np.float32)

  def advance(self, state, byte: int):
    return [self.a.advance(state[0], byte), self.b.advance(state[1], byte)]

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    return self._mix(self.a.score(text, end), self.b.score(text, end))

  def distributions(self, text: bytes) -> np.ndarray:
    return self._mix(self.a.distributions(text), self.b.distributions(text)).astype(np.float32)


class ProductOfExperts(ByteLM):
  """p(b | x) proportional to p_a(b | x)^alpha_a p_b(b | x)^alpha_b, renormalized over the 257
  outcomes at every byte (alphas 1, 1: the plain product of the next-byte distributions)."""

  def __init__(self, a: ByteLM, b: ByteLM, alphas: tuple[float, float] = (1.0, 1.0)):
    self.a, self.b, self.alphas = a, b, (float(alphas[0]), float(alphas[1]))
    self.name = f'poe({a.name},{b.name})'

  def _combine(self, la, lb):
    return product_logprobs(np.stack([np.asarray(la, np.float64), np.asarray(lb, np.float64)]),
                            self.alphas)

  def start(self, prompt: bytes = b''):
    return [self.a.start(prompt), self.b.start(prompt)]

  def next_byte_logprobs(self, state) -> np.ndarray:
    return self._combine(self.a.next_byte_logprobs(state[0]),
                         self.b.next_byte_logprobs(state[1])).astype(np.float32)

  def advance(self, state, byte: int):
    return [self.a.advance(state[0], byte), self.b.advance(state[1], byte)]

  def distributions(self, text: bytes) -> np.ndarray:
    return self._combine(self.a.distributions(text), self.b.distributions(text)).astype(
        np.float32)

  def score(self, text: bytes, end: bool = True) -> np.ndarray:
    text = bytes(text)
    d = self._combine(self.a.distributions(text), self.b.distributions(text))
    out = d[np.arange(len(text)), np.frombuffer(text, np.uint8)]
    return np.concatenate([out, d[-1:, END]]) if end else out


def fit_mixture_weight(a: ByteLM, b: ByteLM, text: bytes, end: bool = False,
                       iters: int = 60) -> tuple[float, float]:
  """The weight w of `Mixture(a, b, w)` that maximizes the likelihood of `text` (held-out
  bytes), and the mixture's bits per byte there. The log-likelihood is concave in w, so a
  golden-section search on [0, 1] finds the maximum."""
  sa, sb = a.score(text, end), b.score(text, end)
  n = max(1, len(sa))

  def bits(w):
    with np.errstate(divide='ignore'):
      lp = np.logaddexp(np.log(w) + sa, np.log1p(-w) + sb) if 0 < w < 1 else (sa if w else sb)
    return float(-lp.sum() / math.log(2) / n)

  lo, hi = 0.0, 1.0
  g = (math.sqrt(5) - 1) / 2
  x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
  f1, f2 = bits(x1), bits(x2)
  for _ in range(iters):
    if f1 < f2:
      hi, x2, f2 = x2, x1, f1
      x1 = hi - g * (hi - lo)
      f1 = bits(x1)
    else:
      lo, x1, f1 = x1, x2, f2
      x2 = lo + g * (hi - lo)
      f2 = bits(x2)
  best = min([(f1, x1), (f2, x2), (bits(0.0), 0.0), (bits(1.0), 1.0)])
  return best[1], best[0]


# -- ensembles of any number of members, from their log-probabilities -------------------------
def mix_logprobs(logps: np.ndarray, weights) -> np.ndarray:
  """log sum_k w_k p_k: the mixture of M members' log-probabilities `logps` [M, ...] (of the
  same outcomes, or whole next-byte distributions) with weights [M] (summing to 1)."""
  logps = np.asarray(logps, np.float64)
  with np.errstate(divide='ignore'):
    lw = np.log(np.asarray(weights, np.float64))
  return np.logaddexp.reduce(lw.reshape((-1,) + (1,) * (logps.ndim - 1)) + logps, axis=0)


def product_logprobs(dists: np.ndarray, alphas) -> np.ndarray:
  """The product of experts of M members' next-byte distributions `dists` [M, ..., 257]:
  p(b) proportional to prod_k p_k(b)^alpha_k, renormalized over the last axis (alpha_k = 0
  leaves member k out; an outcome one included member rules out stays impossible)."""
  dists = np.asarray(dists, np.float64)
  t = np.zeros(dists.shape[1:])
  for a, d in zip(alphas, dists):
    if a:
      t = t + float(a) * d
  m = np.max(t, axis=-1, keepdims=True)
  if not np.all(np.isfinite(m)):
    raise ValueError('the experts share no outcome of probability > 0')
  return t - (m + np.log(np.sum(np.exp(t - m), axis=-1, keepdims=True)))


def fit_mixture_weights(logps: np.ndarray, iters: int = 500, tol: float = 1e-12) -> np.ndarray:
  """Mixture weights [M] maximizing the likelihood of held-out outcomes, from each member's
  log-probabilities of them `logps` [M, N] (EM: the log-likelihood is concave in the weights,
  so EM converges to the maximum)."""
  logps = np.asarray(logps, np.float64)
  m = logps.shape[0]
  w = np.full(m, 1.0 / m)
  prev = -np.inf
  for _ in range(iters):
    with np.errstate(divide='ignore'):
      r = np.log(w)[:, None] + logps
    z = np.logaddexp.reduce(r, axis=0)
    ll = float(z.mean())
    w = np.exp(r - z).mean(axis=1)
    w /= w.sum()
    if ll - prev < tol:
      break
    prev = ll
  return w


def fit_product_alphas(dists: np.ndarray, targets: np.ndarray, bounds=(0.05, 4.0)
                       ) -> np.ndarray:
  """Exponents [M] of `product_logprobs` maximizing the likelihood of held-out outcomes
  `targets` [N] (0..256) under the members' distributions `dists` [M, N, 257]: the negative
  log-likelihood is convex in the exponents (L-BFGS-B within `bounds`; the lower bound keeps
  every member in, so its impossible outcomes stay impossible as in the fitted product)."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  d = np.maximum(np.asarray(dists, np.float64), -1e4)  # exp(alpha * -1e4) = 0 at alpha >= 0.05
  n = d.shape[1]
  picked = d[:, np.arange(n), np.asarray(targets)]  # [M, N]

  def nll(alphas):
    t = np.einsum('m,mnv->nv', alphas, d)
    z = np.logaddexp.reduce(t, axis=1)
    p = np.exp(t - z[:, None])
    grad = -picked.mean(1) + np.einsum('nv,mnv->m', p, d) / n
    return float((z - alphas @ picked).mean()), grad

  m = d.shape[0]
  res = optimize.minimize(nll, np.ones(m), jac=True, method='L-BFGS-B', bounds=[bounds] * m)
  return np.asarray(res.x)


# -- sampling ----------------------------------------------------------------------------------
def pick(logprobs: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
         rng: np.random.Generator | None = None) -> int:
  """An outcome (0..255 byte, 256 end) from a next-byte distribution: argmax at temperature 0,
  else nucleus sampling of the tempered distribution."""
  lp = np.asarray(logprobs, np.float64)
  if temperature <= 0:
    return int(np.argmax(lp))
  z = lp / temperature
  p = np.exp(z - np.max(z))
  p /= p.sum()
  order = np.argsort(-p)
  keep = order[:max(1, int(np.searchsorted(np.cumsum(p[order]), top_p) + 1))]
  q = p[keep] / p[keep].sum()
  return int((rng or np.random.default_rng()).choice(keep, p=q))


def sample(view: ByteLM, prompt: bytes = b'', max_bytes: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, stop: bytes | None = None) -> bytes:
  """Bytes after `prompt`, one at a time from `next_byte_logprobs`, until end of text,
  `max_bytes`, or (when given) the bytes `stop` were produced (included)."""
  rng = np.random.default_rng(seed)
  st = view.start(bytes(prompt))
  out = bytearray()
  for i in range(max_bytes):
    b = pick(view.next_byte_logprobs(st), temperature, top_p, rng)
    if b == END:
      break
    out.append(b)
    if (stop and out.endswith(stop)) or i == max_bytes - 1:
      break
    st = view.advance(st, b)
  return bytes(out)


def sample_compare(view: ByteLM, prompt: bytes, max_bytes: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0) -> dict[str, bytes | str]:
  """Completions of `prompt` (at most `max_bytes` bytes after it): {'byte-level': bytes} from
  `sample`, and for a BPE view also 'plain token-level' and 'token healing' (token-level
  decoding with the same temperature / top_p / seed, cut at `max_bytes`; a str saying why
  where one cannot run, e.g. a plain token-level prompt that ends inside a character).
  Raises ValueError for a prompt the view gives probability 0 (invalid UTF-8 for BPE)."""
  prompt = bytes(prompt)
  out: dict[str, bytes | str] = {}
  byte_level = sample(view, prompt, max_bytes, temperature, top_p, seed)
  if isinstance(view, ExactBPE):
    for name, heal in (('plain token-level', False), ('token healing', True)):
      try:
        out[name] = view.generate_tokens(prompt, max_bytes, heal, temperature, top_p, seed,
                                         max_bytes=max_bytes)
      except ValueError as e:
        out[name] = f'n/a: {e}'
  out['byte-level'] = byte_level
  return out


# -- HAT ---------------------------------------------------------------------------------------
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


class HATView(ByteLM):
  """A HAT model (models/hat.py) one byte at a time, with its three KV caches: the same
  computation as `hat.generate` on the host path (words finished when the splitter says a new
  one began, the decoder re-reading the bytes of a word whose start was decided late). Next
  byte = softmax over the byte ids and eos, renormalized (pad, bos and padding ids dropped).
  `score` runs these steps byte by byte, so it is the generation-time probability; the
  training-time forward over a whole text differs only where a word start is decided late."""

  def __init__(self, model, splitter, max_word_bytes: int = 16, name: str = 'hat',
               bos_id: int = 1, eos_id: int = 2):
    from models import hat  # pylint: disable=import-outside-toplevel
    if not 0 < splitter.word_cap <= max_word_bytes:
      raise ValueError(f'{splitter!r}: a word cap in [1, max_word_bytes={max_word_bytes}] is '
                       f'needed (every word must fit the pooling width)')
    self.model, self.splitter, self.lw, self.name = model, splitter, max_word_bytes, name
    self.bos_id, self.eos_id = bos_id, eos_id
    self._hat = hat
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

    self._enc, self._word, self._dec = enc_step, word_step, dec_step
    self._take = np.concatenate([np.arange(BYTE_OFFSET, 256 + BYTE_OFFSET), [eos_id]])

  def _starts(self, ids) -> list[int]:
    """Word starts of the id sequence (the model's words)."""
    return list(self._hat.host_word_starts(self.splitter, self.lw, ids))

  def _new(self, size: int) -> _HATState:
    m = self.model
    de = m.encoder.final_norm.scale.shape[0]
    first = m.first_word[...].astype(m.dtype).reshape(1, 1, -1)
    enc_c = None if m.word_encoder else m.encoder.init_cache(1, size)
    return _HATState([], size, jnp.zeros((1, size, de), m.dtype), enc_c,
                     m.backbone.init_cache(1, size), m.decoder.init_cache(1, size), [first], [],
                     [0], None)

  def _push(self, st: _HATState, x: int) -> _HATState:
    """One more id through the encoder, the word split, the backbone and the decoder."""
    if len(st.ids) + 1 > st.size:  # grow: replay into bigger caches
      ids = st.ids
      st = self._new(_bucket(len(ids) + 1, 2 * st.size))
      for y in ids:
        st = self._push(st, y)
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
    st = self._new(_bucket(len(prompt) + 2, 64))
    for x in [self.bos_id] + [b + BYTE_OFFSET for b in prompt]:
      st = self._push(st, x)
    return st

  def next_byte_logprobs(self, state: _HATState) -> np.ndarray:
    lp = np.asarray(state.logits).astype(np.float64)[self._take]
    return _normalize(lp).astype(np.float32)

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
    from data import hat_data  # pylint: disable=import-outside-toplevel
    super().__init__(model, splitter, max_word_bytes + 1, name, bos_id, eos_id)
    self.boundary = int(model.boundary_id)
    self.words = hat_data.BoundaryWords(self.boundary, splitter.word_cap)
    self._new_word_cache: dict = {}
    if not splitter.byte_level:
      raise ValueError(f'{splitter!r}: a HAT with word-boundary tokens needs a splitter that '
                       "decides at a word's first byte")

  def _starts(self, ids) -> list[int]:
    return self.words.host_starts(ids)

  @staticmethod
  def _copy(st: _HATState) -> _HATState:
    return dataclasses.replace(st, ids=list(st.ids), contexts=list(st.contexts),
                               starts_done=list(st.starts_done),
                               word_starts=list(st.word_starts))

  def start(self, prompt: bytes = b'') -> _BoundaryState:
    prompt = bytes(prompt)
    st = self._new(_bucket(2 * len(prompt) + 2, 64))
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
    return _normalize(self.outcome_logprobs(state)).astype(np.float32)

  def advance(self, state: _BoundaryState, byte: int) -> _BoundaryState:
    self._prepare(state)
    b = int(byte)
    st = state.branch if state.new_word[b] else state.hat
    state.cursor.push(bytes([b]))
    return _BoundaryState(self._push(st, b + BYTE_OFFSET), state.cursor)


# -- one entry point -----------------------------------------------------------------------------
def byte_view(model, encoder=None, *, tokenizer=None, bos_id: int | None = None,
              eos_id: int | None = None, rng: jax.Array | None = None, splitter=None,
              max_word_bytes: int = 16, name: str | None = None) -> ByteLM:
  """The byte-level view of a family's model.

  model: token_lm.TokenLM, lexinvariant.LexinvariantLM or hat.HAT. encoder: the family's
  data encoder (ByteEncoder -> byte-native view; BPEEncoder -> exact BPE view with its
  tokenizer and bos/eos ids). Without an encoder, `tokenizer` (a HF byte-level BPE) and
  `bos_id`/`eos_id` give the exact BPE view (pretrained models: `pretrained_view`). A
  lexinvariant model draws its random embedding once from `rng` (default key 0) and keeps it
  for every text the view scores. HAT needs its word `splitter`."""
  from data import encoders  # pylint: disable=import-outside-toplevel
  from models import hat, lexinvariant  # pylint: disable=import-outside-toplevel
  if isinstance(model, hat.HAT):
    if splitter is None:
      raise ValueError('a HAT view needs the model\'s word splitter (words.get_splitter)')
    if model.boundary_id is not None:
      return HATBoundaryView(model, splitter, max_word_bytes, name or 'hat')
    return HATView(model, splitter, max_word_bytes, name or 'hat')
  draw = None
  if isinstance(model, lexinvariant.LexinvariantLM):
    draw = model.draw(jax.random.key(0) if rng is None else rng, 1)
  fn = TokenFn(model, draw)
  if isinstance(encoder, encoders.ByteEncoder):
    return ByteTokenLM(fn, name or 'bytes', encoder.bos_id, encoder.eos_id)
  if isinstance(encoder, encoders.BPEEncoder):
    tokenizer = encoder.tokenizer
    bos_id = encoder.bos_id if bos_id is None else bos_id
    eos_id = encoder.eos_id if eos_id is None else eos_id
  elif encoder is not None:
    raise ValueError(f'no byte-level view for encoder {encoder!r}: exact byte probabilities '
                     f'need the bytes encoder or a byte-level BPE tokenizer')
  if tokenizer is None:
    raise ValueError(f'{type(model).__name__} over token ids without a tokenizer: exact '
                     f'byte probabilities need its byte-level BPE (encoder= or tokenizer=)')
  if bos_id is None or eos_id is None:
    raise ValueError('the exact BPE view needs bos_id and eos_id')
  return ExactBPE(fn, tokenizer, bos_id, eos_id, name or 'bpe')


def pretrained_view(p, name: str | None = None) -> ExactBPE:
  """The exact byte-level view of a `models.pretrained.Pretrained` LM (SmolLM2, a transferred
  copy): documents between its document separator token, as the pretrained family reads
  them."""
  doc = p.meta['doc_token_id']
  return ExactBPE(TokenFn(p.model), p.tokenizer, doc, doc, name or p.meta.get('name') or 'bpe')
