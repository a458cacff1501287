"""Seeded text perturbations for the robustness suite (bits per byte under noise).

  caps      the whole text upper-cased
  permute   in every word, `frac` of its characters (picked in pairs) rotate places
  delete    in every word, `frac` of its characters deleted
  replace   in every word, `frac` of its characters replaced by a random lowercase ASCII letter

The number of characters touched in an n-character word is n*frac rounded stochastically, so
the expected fraction is `frac` for short words too. Words are maximal runs of
non-whitespace; whitespace is kept as it is. The randomness of a
document depends only on (seed, document index), so every model sees the same noisy text.
"""
from __future__ import annotations

import re

import numpy as np

KINDS = ('caps', 'permute', 'delete', 'replace')
_WORD = re.compile(r'\S+')
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'


def _round(x: float, rng) -> int:
  """x rounded up with probability frac(x): unbiased, so short words get `frac` on average."""
  k = int(x)
  return k + int(rng.random() < x - k)


def perturb(text: str, kind: str, frac: float, rng: np.random.Generator) -> str:
  if kind == 'caps':
    return text.upper()
  if kind not in KINDS:
    raise ValueError(f'unknown perturbation {kind!r}; known: {KINDS}')

  def one(m):
    w = list(m.group(0))
    n = len(w)
    if kind == 'permute':  # characters move in pairs (or more): n*frac/2 pairs on average
      k = min(2 * _round(n * frac / 2, rng), n if n >= 2 else 0)
    else:
      k = min(_round(n * frac, rng), n)
    if k == 0:
      return m.group(0)
    if kind == 'permute':
      idx = rng.choice(len(w), size=min(k, len(w)), replace=False)
      vals = [w[i] for i in idx]
      for i, v in zip(idx, np.roll(np.array(vals, dtype=object), 1)):
        w[i] = v
      return ''.join(w)
    idx = set(rng.choice(len(w), size=k, replace=False).tolist())
    if kind == 'delete':
      return ''.join(c for i, c in enumerate(w) if i not in idx)
    return ''.join(_LETTERS[rng.integers(26)] if i in idx else c for i, c in enumerate(w))

  return _WORD.sub(one, text)


class PerturbedSource:
  """A DocSource view whose documents are perturbed with `kind` (seeded per document)."""

  def __init__(self, source, kind: str, frac: float = 0.1, seed: int = 0):
    if kind not in KINDS:
      raise ValueError(f'unknown perturbation {kind!r}; known: {KINDS}')
    self.source, self.kind, self.frac, self.seed = source, kind, frac, seed
    self.name = f'{source.name}[{kind}]'
    self.stats = getattr(source, 'stats', {})
    self.streamed = getattr(source, 'streamed', False)  # read in order (data/shards.py)

  def __len__(self):
    return len(self.source)

  def _perturb(self, i: int, text: str) -> str:
    rng = np.random.default_rng([self.seed, int(i), KINDS.index(self.kind)])
    return perturb(text, self.kind, self.frac, rng)

  def __getitem__(self, i: int) -> str:
    return self._perturb(i, self.source[i])

  def __iter__(self):
    texts = iter(self.source) if self.streamed else (self.source[i] for i in range(len(self)))
    return (self._perturb(i, t) for i, t in enumerate(texts))
