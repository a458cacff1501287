"""Metrics of the sentence-space families (train/families/lcm.py, sentence_decoder.py), in the
raw embedding space: l2, cosine, contrastive accuracy, paraphrase ratio (the LCM paper's), and
corpus BLEU / exact match of decoded text; `lcm_report` scores a set of next-sentence
predictions and writes the table, `round_trip` scores a decoder on true embeddings."""
from __future__ import annotations

import collections
import math
import os

import numpy as np

from train.evals import report
from train.metrics import log0


def l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                      1e-12)


def contrastive_accuracy(pred: np.ndarray, target: np.ndarray, doc: np.ndarray,
                         max_negatives: int = 4096, seed: int = 0) -> np.ndarray:
  """Per prediction: the fraction of negatives (targets of OTHER documents; at most
  `max_negatives` drawn once) farther from the prediction than its own target (0.5: chance)."""
  pred, target, doc = np.asarray(pred, np.float64), np.asarray(target, np.float64), np.asarray(doc)
  pool = np.arange(len(target))
  if len(pool) > max_negatives:
    pool = np.sort(np.random.default_rng(seed).choice(len(pool), max_negatives, replace=False))
  pos = ((pred - target) ** 2).sum(-1)
  out = np.zeros(len(pred))
  for s in range(0, len(pred), 512):
    p = pred[s:s + 512]
    d = ((p ** 2).sum(-1)[:, None] - 2 * p @ target[pool].T + (target[pool] ** 2).sum(-1)[None])
    other = doc[s:s + 512, None] != doc[pool][None]
    farther = (d > pos[s:s + 512, None]) & other
    out[s:s + 512] = farther.sum(1) / np.maximum(other.sum(1), 1)
  return out


def paraphrase_ratio(pred: np.ndarray, target: np.ndarray,
                     contexts: list[np.ndarray]) -> float:
  """Mean over predictions of the largest cosine to a context sentence, over the same mean for
  the true next sentences (a ratio of means: per-item ratios explode where a true sentence is
  unlike its context). Above 1: predictions stay closer to what was already said than the
  real continuations do, i.e. they paraphrase the context."""
  p = np.mean([cosine(pred[i][None], c).max() for i, c in enumerate(contexts)])
  t = np.mean([cosine(target[i][None], c).max() for i, c in enumerate(contexts)])
  return float(p / max(t, 1e-6))


def bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
  """Corpus BLEU (whitespace tokens, up to 4-grams, brevity penalty), in [0, 100]. An n-gram
  order without any match counts as 1 / (2^k * total) for its k-th such order ("exp"
  smoothing, so short corpora do not collapse to 0); no unigram match at all gives 0."""
  match, total = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for h, r in zip(hypotheses, references, strict=True):
    ht, rt = h.split(), r.split()
    hyp_len, ref_len = hyp_len + len(ht), ref_len + len(rt)
    for n in range(1, max_n + 1):
      hc = collections.Counter(tuple(ht[i:i + n]) for i in range(len(ht) - n + 1))
      rc = collections.Counter(tuple(rt[i:i + n]) for i in range(len(rt) - n + 1))
      match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
      total[n - 1] += max(len(ht) - n + 1, 0)
  if hyp_len == 0 or match[0] == 0:
    return 0.0
  logp, k = 0.0, 1
  for m, t in zip(match, total):
    if t == 0:
      return 0.0
    if m == 0:
      k *= 2
    logp += math.log(m / t if m > 0 else 1 / (k * t)) / max_n
  bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
  return 100.0 * bp * math.exp(logp)


def round_trip_metrics(hyps: list[str], refs: list[str]) -> dict:
  """Exact match (stripped) and corpus BLEU of decoded sentences against the true ones."""
  return {'sentences': len(refs),
          'exact_match': float(np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs)])),
          'bleu': bleu(hyps, refs)}


def round_trip(decoder, emb: np.ndarray, refs: list[str], encode=None) -> dict:
  """A sentence decoder on the true embeddings `emb` of `refs`: exact match and BLEU, and with
  `encode` (texts -> embeddings, the space's encoder) the round-trip l2 of the decoded text."""
  hyps = decoder.decode(emb)
  out = round_trip_metrics(hyps, refs)
  if encode is not None:
    out['round_trip_l2'] = float(l2(encode(hyps), emb).mean())
  log0('decoder round trip on validation sentences: ' + ', '.join(
      f'{k} {v:.4g}' for k, v in out.items()))
  for h, r in list(zip(hyps, refs))[:3]:
    log0(f'  true:    {r}\n  decoded: {h}')
  return out


def lcm_report(pred, target, prev, doc, contexts, *, name: str, step: int, workdir: str,
               decoder=None, encode=None, refs=None, max_sentences: int = 256) -> dict:
  """Scores next-sentence predictions `pred` [N, D] against the true next embeddings `target`,
  with the copy-the-previous-sentence baseline (`prev`); `doc` [N] the document of each
  target (contrastive negatives come from other documents), `contexts` the embeddings of each
  target's preceding sentences (paraphrase ratio). With a `decoder` (and `encode`, `refs`: the
  true next sentences' texts) the first `max_sentences` predictions are decoded: round-trip l2,
  and the decoder's own exact match / BLEU on the true embeddings. Writes
  `lcm_metrics_step{step}.md`; returns (metrics, headline row)."""
  res = {'targets': len(pred)}
  res['l2'] = float(l2(pred, target).mean())
  res['contrastive_acc'] = float(contrastive_accuracy(pred, target, doc).mean())
  res['paraphrase_ratio'] = paraphrase_ratio(pred, target, contexts)
  res['copy_prev_l2'] = float(l2(prev, target).mean())
  res['copy_prev_contrastive_acc'] = float(contrastive_accuracy(prev, target, doc).mean())
  if decoder is not None:
    n = min(len(pred), max_sentences)
    texts = decoder.decode(pred[:n])
    res['round_trip_l2'] = float(l2(encode(texts), target[:n]).mean())
    rt = round_trip_metrics(decoder.decode(target[:n]), refs[:n])
    res['decoder_exact_match'], res['decoder_bleu'] = rt['exact_match'], rt['bleu']
    res['round_trip_sentences'] = n
    for t, p in list(zip(refs, texts))[:4]:
      log0(f'  true next: {t}\n  predicted: {p}')
  cols = [k for k in ('l2', 'round_trip_l2', 'contrastive_acc', 'paraphrase_ratio',
                      'decoder_exact_match', 'decoder_bleu') if k in res]
  table = report.markdown(
      ['model'] + cols,
      [[f'{name} (step {step})'] + [f'{res[k]:.4f}' for k in cols],
       ['copy previous sentence', f'{res["copy_prev_l2"]:.4f}']
       + ['' if k != 'contrastive_acc' else f'{res["copy_prev_contrastive_acc"]:.4f}'
          for k in cols[1:]]])
  log0(f'LCM metrics on {len(pred)} validation targets:\n{table}')
  report.write_text(os.path.join(workdir, f'lcm_metrics_step{step}.md'), table)
  return res, {k: res[k] for k in cols}
