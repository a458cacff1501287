"""Evaluations through the byte-level view of any text model (models/byte_level/): bits per
byte of texts, cross-tokenizer ensembles (mixture and product of experts, weights fitted on a
held-out slice) and byte-level generation speed. Every member is seen only as a `ByteLM`, so
models of any family and tokenizer compare and combine on the same bytes.

Texts are cut into pieces of at most `piece_bytes` bytes (after the last newline in the window
when there is one in its second half, else at a UTF-8 character boundary), and every piece is
scored as a document of its own: the same bytes and contexts for every member, within the
context length the small models were trained on. Bits per byte = the negative log2-probability
of the pieces' bytes, plus the end of text after a document's last piece (as the trainer's
evaluation counts its end token), over the number of bytes.
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import numpy as np

from models import byte_level as bl
from train.evals import report


# -- texts ---------------------------------------------------------------------------------------
def cut(text: bytes, piece_bytes: int) -> list[bytes]:
  """`text` in pieces of at most `piece_bytes` bytes, cut after a newline in the second half
  of the window when there is one, else at the last UTF-8 character start (never inside a
  character, unless the text is not UTF-8 there)."""
  if piece_bytes < 8:
    raise ValueError(f'piece_bytes={piece_bytes}: must be >= 8')
  out, i, n = [], 0, len(text)
  while i < n:
    j = min(n, i + piece_bytes)
    if j < n:
      nl = text.rfind(b'\n', i + piece_bytes // 2, j)
      if nl >= 0:
        j = nl + 1
      else:
        k = j
        while k > i + 1 and 0x80 <= text[k] <= 0xBF:  # text[k] would start the next piece
          k -= 1
        j = k if k > i + 1 else j
    out.append(text[i:j])
    i = j
  return out


def pieces(docs: Iterable[str | bytes], piece_bytes: int) -> list[tuple[bytes, bool]]:
  """Every document cut into pieces: (bytes, is the document's last piece)."""
  out = []
  for d in docs:
    b = d.encode('utf-8') if isinstance(d, str) else bytes(d)
    parts = cut(b, piece_bytes)
    out += [(p, k == len(parts) - 1) for k, p in enumerate(parts)]
  return out


def spread(items: list, n_bytes: int) -> list:
  """Pieces evenly spaced over `items` with about `n_bytes` bytes in all (0: every piece)."""
  total = sum(len(p) for p, _ in items)
  if n_bytes <= 0 or n_bytes >= total:
    return list(items)
  keep = max(1, round(len(items) * n_bytes / total))
  idx = np.unique(np.linspace(0, len(items) - 1, keep).round().astype(int))
  return [items[i] for i in idx]


def split_fit(items: list, every: int = 5) -> tuple[list, list]:
  """(held-out fit slice: every `every`-th piece, the rest): interleaved, so both span the
  whole text."""
  return items[::every], [x for i, x in enumerate(items) if i % every]


def n_bytes(items) -> int:
  return sum(len(p) for p, _ in items)


# -- one member on pieces -----------------------------------------------------------------------
class Scored:
  """One member's next-byte distributions on a list of pieces: `dists` [N, 257] float32 at
  every scored outcome (each byte, and the end of text after a document's last piece),
  `targets` [N] (0..255, 256 = end), `logp` [N] the log-probabilities of the targets."""

  def __init__(self, dists: np.ndarray, targets: np.ndarray, n_text_bytes: int, seconds: float):
    self.dists, self.targets, self.n_bytes, self.seconds = dists, targets, n_text_bytes, seconds
    self.logp = dists[np.arange(len(targets)), targets].astype(np.float64)

  def bpb(self, logp: np.ndarray | None = None) -> float:
    lp = self.logp if logp is None else logp
    return float(-lp.sum() / math.log(2) / max(1, self.n_bytes))


def targets_of(items) -> np.ndarray:
  out = []
  for p, end in items:
    out += list(p) + ([bl.END] if end else [])
  return np.asarray(out, np.int64)


def score(view: bl.ByteLM, items: list[tuple[bytes, bool]], what: str = '') -> Scored:
  """`view`'s distributions on every piece. A piece the view cannot score (invalid UTF-8 or
  a byte its vocabulary cannot encode, for a BPE model) is a ValueError naming `what`, the
  piece's offset and the view."""
  rows = []
  t0 = time.perf_counter()
  off = 0
  for p, end in items:
    try:
      d = view.distributions(p)
    except ValueError as e:
      raise ValueError(f'{what or "text"}: the piece at byte {off} ({p[:30]!r}...) cannot be '
                       f'scored by {view.name!r}: {e}') from None
    rows.append(d if end else d[:-1])
    off += len(p)
  return Scored(np.concatenate(rows).astype(np.float32), targets_of(items), n_bytes(items),
                time.perf_counter() - t0)


# -- ensembles -----------------------------------------------------------------------------------
KINDS = ('mixture', 'poe', 'poe_fit')


def ensemble_table(names: list[str], fit: list[Scored], evals: dict[str, list[Scored]],
                   kinds: Iterable[str] = KINDS) -> tuple[list[dict], dict]:
  """Rows (members, then each ensemble kind) with bits per byte on the held-out fit slice and
  on every evaluation set in `evals` ({column: one Scored per member}), and a summary: the
  best member and the best ensemble on each set, and whether the ensemble beats the member.
  Kinds: 'mixture' (weights fitted on the fit slice by EM), 'poe' (product of the next-byte
  distributions, exponents 1), 'poe_fit' (exponents fitted on the fit slice)."""
  kinds = [k for k in kinds if k]
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f'ensemble kind(s) {bad}: expected some of {list(KINDS)}')
  sets = {'fit': fit, **evals}
  rows = [{'model': n, 'kind': 'member', 'weights': '',
           **{f'{k}_bpb': s[i].bpb() for k, s in sets.items()}} for i, n in enumerate(names)]
  label = '+'.join(names)
  for kind in kinds:
    if kind == 'mixture':
      w = bl.fit_mixture_weights(np.stack([s.logp for s in fit]))
      combine = lambda ss, w=w: bl.mix_logprobs(np.stack([s.logp for s in ss]), w)
    else:
      w = (np.ones(len(names)) if kind == 'poe' else
           bl.fit_product_alphas(np.stack([s.dists for s in fit]), fit[0].targets))

      def combine(ss, w=w):
        d = bl.product_logprobs(np.stack([s.dists for s in ss]), w)
        return d[np.arange(len(ss[0].targets)), ss[0].targets]
    rows.append({'model': label, 'kind': kind,
                 'weights': ' / '.join(f'{x:.3f}' for x in w),
                 **{f'{k}_bpb': ss[0].bpb(combine(ss)) for k, ss in sets.items()}})
  summary = {}
  for k in sets:
    col = f'{k}_bpb'
    members = [r for r in rows if r['kind'] == 'member']
    ens = [r for r in rows if r['kind'] != 'member']
    bm = min(members, key=lambda r: r[col])
    out = {'best_member': bm['model'], 'best_member_bpb': bm[col]}
    if ens:
      be = min(ens, key=lambda r: r[col])
      out.update(best_ensemble=be['kind'], best_ensemble_bpb=be[col],
                 gain_bpb=bm[col] - be[col], beats_best_member=be[col] < bm[col])
    summary[k] = out
  return rows, summary


def write_ensemble(rows: list[dict], summary: dict, info: dict, directory: str,
                   stem: str = 'ensemble') -> str:
  """`stem.md` (the table, what was scored, whether the ensemble beats its best member),
  `stem.json` (rows, summary, info) and `stem.csv`; returns the Markdown."""
  table = report.write_rows(rows, directory, stem, formats=('csv',), fmt=report.fmt_fixed)
  lines = [table]
  for k, s in summary.items():
    if 'best_ensemble' not in s or k == 'fit':  # fitted there: no verdict
      continue
    verdict = ('beats' if s['beats_best_member'] else 'does NOT beat')
    lines.append(f'- {k}: the best ensemble ({s["best_ensemble"]}, {s["best_ensemble_bpb"]:.4f}) '
                 f'{verdict} the best member ({s["best_member"]}, {s["best_member_bpb"]:.4f}) '
                 f'by {s["gain_bpb"]:+.4f} bits per byte')
  for k, v in info.items():
    lines.append(f'- {k}: {v}')
  md = '\n'.join(lines) + '\n'
  report.write_text(f'{directory}/{stem}.md', md)
  report.write_json(f'{directory}/{stem}.json', {'rows': rows, 'summary': summary,
                                                  'info': info})
  return md


# -- speed -----------------------------------------------------------------------------------------
def generation_speed(view: bl.ByteLM, prompt: bytes = b'def ', n: int = 64,
                     repeats: int = 3) -> dict:
  """Greedy byte-level generation through the view, after one warm-up run (compilation): the
  median of `repeats` timed runs, {'bytes', 'seconds', 'bytes_per_s'} (fewer bytes when the
  model ends the text)."""
  bl.sample(view, prompt, n)
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    out = bl.sample(view, prompt, n)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  return {'bytes': len(out), 'seconds': dt, 'bytes_per_s': len(out) / dt if dt > 0 else None}
