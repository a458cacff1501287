"""Exact byte-level view of a BPE token LM (`ExactBPE`), and token healing (`heal_split`).

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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from data import canonical
from models.byte_level.interface import (END, NUM_OUTCOMES, ByteLM, bucket, continuation_score,
                                         ladder)
from models.byte_level.token_views import TokenFn, grow_cache, token_generate


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
    t = ladder(len(toks), 8)
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
      t = max(self.min_tokens, bucket(len(row)))
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
    t = ladder(len(suffix))
    if u.depth + t + 1 > st.cache[0]['k'].shape[1]:
      st.cache = grow_cache(st.cache, bucket(u.depth + t + 1, 128))
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
    lp, cache = self._prefill(base, bucket(len(base) + 2 * (len(prompt) - anchor) + 16, 128))
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
    lp, cache = self._prefill([s.last for s in path], bucket(len(path) + 1, 128))
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

  def token_level_completions(self, prompt: bytes, max_bytes: int, temperature: float = 0.0,
                              top_p: float = 1.0, seed: int = 0) -> dict[str, bytes | str]:
    """'plain token-level' and 'token healing' (`generate_tokens` for at most `max_bytes`
    tokens, cut at `max_bytes` bytes), or 'n/a: why' where one cannot run."""
    out: dict[str, bytes | str] = {}
    for name, heal in (('plain token-level', False), ('token healing', True)):
      try:
        out[name] = self.generate_tokens(prompt, max_bytes, heal, temperature, top_p, seed,
                                         max_bytes=max_bytes)
      except ValueError as e:
        out[name] = f'n/a: {e}'
    return out

  def loglikelihoods(self, pairs: list[tuple[bytes, bytes]], max_rows: int = 4,
                     chunk: int = 64) -> list[tuple[float, bool]]:
    """`ByteLM.loglikelihoods`, batched across pairs (the same numbers as `distributions` of
    each text, up to float rounding). Each text's lattice keeps the nodes the distributions
    before the continuation's bytes need (`_needed`) and their ancestors; each of them is one
    token of a tree over the begin token (its log-probs computed once for all pairs): a pair's
    nodes are a tree in a row with a tree mask, several pairs to a row of up to `max_tokens`
    (largest first), `max_rows` rows per forward (padded to 1 or 4 rows; a call of one
    forward to a power-of-two length, a call of several forwards to `max_tokens` each, never
    fewer rows than a forward of this call already ran: only the call's last forward has
    fewer rows, so one shape per call and few compilations per task, at the cost of padding;
    a tree over `max_tokens` nodes gets a row, and a shape, of its own). So a pair costs about one
    model position per token of its text and per node off the encoding near the
    continuation, with no prefill of its own; the context's other nodes are not evaluated.
    Pairs are taken `chunk` at a time (longest first; the rows of a chunk short of a whole
    forward go with the next chunk's) to bound the host memory of the log-probs."""
    pairs = [(bytes(c), bytes(k)) for c, k in pairs]
    out: list = [None] * len(pairs)
    root_lp, cache = self._prefill([], 1)
    shape = (1, self.min_tokens)  # the largest forward so far (up to max_tokens): later ones
    # are padded to it
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    pending: list = []
    for s in range(0, len(order), chunk):
      trees = []  # (pair index, lattice, its needed nodes, parents first)
      for i in order[s:s + chunk]:
        ctx, cont = pairs[i]
        lat = self._lattice(ctx + cont)
        lat.root.lp = root_lp[0]
        seen: dict[int, _Node] = {}
        for m in range(len(ctx), len(ctx) + len(cont)):
          for u in self._needed(lat, m):
            while u.parent is not None and id(u) not in seen:
              seen[id(u)] = u
              u = u.parent
        trees.append((i, lat, sorted(seen.values(), key=lambda u: u.depth)))
      rows, row, size = [], [], 0
      for tree in sorted(trees, key=lambda x: -len(x[2])):
        if row and size + len(tree[2]) > self.max_tokens:
          rows.append(row)
          row, size = [], 0
        row.append(tree)
        size += len(tree[2])
      rows.append(row)
      del trees
      pending += rows  # rows short of a whole forward wait for the next chunk's
      last = s + chunk >= len(order)
      if not (s == 0 and last and len(pending) <= max_rows):  # more than one forward: all of
        shape = (shape[0], max(shape[1], self.max_tokens))   # max_tokens, one shape per call
      while len(pending) >= max_rows or (last and pending):
        group, pending = pending[:max_rows], pending[max_rows:]
        b, t = self._tree_rows(cache, group, shape)
        shape = (b, min(t, self.max_tokens))
        for row in group:
          for i, lat, _ in row:
            ctx, cont = pairs[i]
            d = np.asarray([self._dist(lat, m) for m in range(len(ctx), len(ctx) + len(cont))],
                           np.float32).reshape(len(cont), NUM_OUTCOMES)
            out[i] = continuation_score(d, cont)
        del group  # frees their log-probs
    return out

  def _tree_rows(self, cache, rows: list[list], floor: tuple[int, int] = (1, 1)
                 ) -> tuple[int, int]:
    """Log-probs of the nodes of `rows` (lists of (_, lattice, nodes parents first)): one
    forward of [1 or 4 rows, a power of two tokens], at least `floor` (rows, tokens), each node
    at RoPE position = its depth, seeing the begin token (slot 0 of `cache`) and its ancestors
    in the row (padding rows and tokens see the begin token and themselves). Returns the
    forward's (rows, tokens)."""
    t = max(self.min_tokens, bucket(max(sum(len(x[2]) for x in r) for r in rows)), floor[1])
    b = max(ladder(len(rows), 1, base=4), floor[0])
    ids = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    pre = np.zeros((b, t, cache[0]['k'].shape[1]), bool)
    pre[:, :, 0] = True
    own = np.broadcast_to(np.eye(t, dtype=bool), (b, t, t)).copy()
    for r, row in enumerate(rows):
      j = 0
      for _, _, nodes in row:
        where = {}
        for v in nodes:
          ids[r, j], pos[r, j] = v.last, v.depth
          p = where.get(id(v.parent))
          if p is not None:
            own[r, j] |= own[r, p]
          where[id(v)] = j
          j += 1
    lp = self.fn.tree(cache, pre, own, ids, pos)
    for r, row in enumerate(rows):
      j = 0
      for _, _, nodes in row:
        for v in nodes:
          v.lp = lp[r, j]
          j += 1
    return b, t

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


# -- token healing ------------------------------------------------------------------------------
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
