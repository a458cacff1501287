"""The byte-level interface: `ByteLM` (a text model seen one byte at a time: next-byte
distributions over 256 bytes and end of text, scoring), the helpers every view shares (padded
sizes, renormalization) and byte-by-byte sampling of any view.

Nothing here knows a model class: each family builds its own view (train/families/*.py,
`Family.byte_view`).
"""
from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np

END = 256          # index of end-of-text in a next-byte distribution
NUM_OUTCOMES = 257
BYTE_OFFSET = 3    # ByteEncoder: byte b -> id b + 3; pad 0, bos 1, eos 2


def bucket(n: int, minimum: int = 1) -> int:
  """The next power of two >= n (KV cache sizes)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def ladder(n: int, minimum: int = 1, base: int = 8) -> int:
  """Few padded sizes, so each shape compiles once: sequence lengths 1, 8, 64, then powers of
  two (long prefills do not pay 8x padding); batch rows (base 4) 1, 4, 16, 64."""
  m, n = 1, max(int(n), minimum)
  while m < n:
    m *= base
  if m > 64:
    m = bucket(n)
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

  def loglikelihoods(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[float, bool]]:
    """For each (context, continuation): log p(continuation bytes | context bytes) (the
    document starts before the context) and whether every continuation byte is the most
    probable next byte. Default: `distributions` of each text; views override it to batch the
    model across pairs."""
    out = []
    for ctx, cont in pairs:
      d = self.distributions(bytes(ctx) + bytes(cont))
      out.append(continuation_score(d[len(ctx):len(ctx) + len(cont)], bytes(cont)))
    return out

  def token_level_completions(self, prompt: bytes, max_bytes: int, temperature: float = 0.0,
                              top_p: float = 1.0, seed: int = 0) -> dict[str, bytes | str]:
    """Token-level decodings of `prompt` to compare byte-level sampling with (`sample_compare`),
    by name: bytes after the prompt (at most `max_bytes`), or a str saying why one cannot run.
    Default: none (a view whose model has no tokens other than bytes)."""
    del prompt, max_bytes, temperature, top_p, seed
    return {}


def continuation_score(dists: np.ndarray, continuation: bytes) -> tuple[float, bool]:
  """(sum of log p of each continuation byte, whether each is the argmax) from the float32
  next-byte distributions [len(continuation), 257] before each of its bytes."""
  cont = np.frombuffer(bytes(continuation), np.uint8).astype(np.int64)
  rows = np.asarray(dists, np.float32).astype(np.float64)
  lp = float(rows[np.arange(len(cont)), cont].sum())
  return lp, bool(np.all(np.argmax(rows, axis=-1) == cont))


def bits_per_byte(view: ByteLM, text: bytes, end: bool = False) -> float:
  """Mean -log2 p per byte of `text` (the end-of-text term included when `end`)."""
  lp = view.score(text, end=end)
  return float(-lp.sum() / math.log(2) / max(1, len(text)))


def normalize(logp: np.ndarray) -> np.ndarray:
  """log-probabilities renormalized to sum to 1 (ValueError if all are -inf)."""
  m = np.max(logp)
  if not np.isfinite(m):
    raise ValueError('every outcome has probability 0')
  return logp - (m + np.log(np.sum(np.exp(logp - m))))


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
  `sample`, and the view's `token_level_completions` (a BPE view: 'plain token-level' and
  'token healing', token-level decoding with the same temperature / top_p / seed, cut at
  `max_bytes`; a str saying why where one cannot run, e.g. a plain token-level prompt that
  ends inside a character).
  Raises ValueError for a prompt the view gives probability 0 (invalid UTF-8 for BPE)."""
  prompt = bytes(prompt)
  out: dict[str, bytes | str] = {}
  byte_level = sample(view, prompt, max_bytes, temperature, top_p, seed)
  out.update(view.token_level_completions(prompt, max_bytes, temperature, top_p, seed))
  out['byte-level'] = byte_level
  return out
