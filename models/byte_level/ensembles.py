"""Ensembles of byte-level views of any tokenizers or families: two views as one `ByteLM`
(`Mixture`, `ProductOfExperts`, `fit_mixture_weight`), and any number of members from their
log-probabilities (`mix_logprobs`, `product_logprobs`, with weights / exponents fitted on
held-out bytes).
"""
from __future__ import annotations

import math

import numpy as np

from models.byte_level.interface import END, ByteLM


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
