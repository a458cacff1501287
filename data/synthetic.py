"""Synthetic in-context tasks for the lexinvariant evaluations: LookUp, Permutation, Repeat.

Both are written as plain text over a symbol alphabet (lowercase letters by default), encoded
with the run's encoder, one instance per row (`[bos] + text`, no packing), and scored by the
greedy (argmax) prediction at every *answer* token with the true prefix given (teacher forcing;
for an answer of several tokens, "exact" counts an answer only if every token is right, which
is what greedy decoding of that answer would produce).

LookUp (a random mapping given in context, then queries):
    `k1v1 k2v2 ... kKvK | q1a1 q2a2 ... qQaQ`
  keys: K distinct symbols; values: symbols drawn uniformly with replacement; queries: keys
  drawn uniformly (with replacement); the answer a_i is the value of key q_i, the token right
  after q_i in the query part. (No delimiter between key and value: with `k:v` a model trained
  on Python text predicts the space that follows ':' there, and both models score 0.)

Permutation (apply a permutation of positions shown in context):
    `s1>t1 s2>t2 ... sN>tN sq>tq`
  one random permutation sigma of L positions per instance; every s is a string of L distinct
  random symbols and t = s[sigma] (t_j = s_{sigma(j)}); the model sees N worked demonstrations
  and must write the query's answer t_q (L answer tokens, each a symbol of s_q).
"""
from __future__ import annotations

import string

import numpy as np

ALPHABET = string.ascii_lowercase


def lookup_instance(rng: np.random.Generator, num_keys: int = 8, num_queries: int = 8,
                    alphabet: str = ALPHABET) -> tuple[str, list[int], dict[str, str]]:
  """-> (text, character offsets of the answers in text, the mapping)."""
  if num_keys > len(alphabet):
    raise ValueError(f'num_keys={num_keys} exceeds the alphabet size {len(alphabet)}')
  keys = rng.choice(list(alphabet), size=num_keys, replace=False)
  values = rng.choice(list(alphabet), size=num_keys, replace=True)
  mapping = dict(zip(keys.tolist(), values.tolist()))
  text = ' '.join(f'{k}{v}' for k, v in mapping.items()) + ' |'
  answers = []
  for q in rng.choice(keys, size=num_queries, replace=True).tolist():
    text += f' {q}'
    answers.append(len(text))
    text += mapping[q]
  return text, answers, mapping


def permutation_instance(rng: np.random.Generator, length: int = 4, num_demos: int = 6,
                         alphabet: str = ALPHABET) -> tuple[str, list[int], np.ndarray]:
  """-> (text, character offsets of the L answer symbols, sigma)."""
  if length > len(alphabet):
    raise ValueError(f'length={length} exceeds the alphabet size {len(alphabet)}')
  sigma = rng.permutation(length)
  while length > 1 and np.all(sigma == np.arange(length)):  # the identity is no task
    sigma = rng.permutation(length)
  parts = []
  for _ in range(num_demos + 1):
    s = rng.choice(list(alphabet), size=length, replace=False)
    parts.append((''.join(s), ''.join(s[sigma])))
  text = ' '.join(f'{s}>{t}' for s, t in parts[:-1]) + f' {parts[-1][0]}>'
  start = len(text)
  text += parts[-1][1]
  return text, list(range(start, start + length)), sigma


def _encode_rows(encoder, items, seq_len: int) -> dict[str, np.ndarray]:
  """Rows of `[bos] + encode(text)` with an `answer` mask over the *targets* of answer chars.
  Needs a character-aligned encoder (one token per ASCII character, e.g. bytes)."""
  b = len(items)
  out = {k: np.zeros((b, seq_len), np.int32) for k in
         ('inputs', 'targets', 'segment_ids', 'positions', 'target_bytes')}
  out['weights'] = np.zeros((b, seq_len), np.float32)
  out['answer'] = np.zeros((b, seq_len), np.float32)
  out['answer_id'] = np.zeros((b, seq_len), np.int32)  # answer number within the row (from 1)
  for r, (text, offsets) in enumerate(items):
    ids = encoder.encode(text)
    if len(ids) != len(text):
      raise ValueError('synthetic tasks need an encoder with one token per ASCII character '
                       f'(got {len(ids)} tokens for {len(text)} characters)')
    d = np.concatenate([[encoder.bos_id], ids]).astype(np.int32)
    n = len(d) - 1
    if n > seq_len:
      raise ValueError(f'instance of {n} tokens exceeds seq_len={seq_len}')
    out['inputs'][r, :n], out['targets'][r, :n] = d[:-1], d[1:]
    out['segment_ids'][r, :n] = 1
    out['positions'][r, :n] = np.arange(n)
    out['weights'][r, :n] = 1.0
    out['target_bytes'][r, :n] = 1
    # character i of text is token i + 1 of d, i.e. the target at input position i
    out['answer'][r, offsets] = 1.0
    for j, off in enumerate(offsets):
      out['answer_id'][r, off] = j + 1
  return out


def lookup_batch(encoder, n: int, seq_len: int, seed: int = 0, num_keys: int = 8,
                 num_queries: int = 8, alphabet: str = ALPHABET) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, 1])
  items = [lookup_instance(rng, num_keys, num_queries, alphabet)[:2] for _ in range(n)]
  return _encode_rows(encoder, items, seq_len)  # one token per answer


def permutation_batch(encoder, n: int, seq_len: int, seed: int = 0, length: int = 4,
                      num_demos: int = 6) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, 2])
  items = [permutation_instance(rng, length, num_demos)[:2] for _ in range(n)]
  out = _encode_rows(encoder, items, seq_len)
  out['answer_id'] = (out['answer'] > 0).astype(np.int32)  # the L tokens form one answer
  return out


def repeat_batch(encoder, n: int, seq_len: int, seed: int = 0, length: int = 48,
                 copies: int = 3, alphabet: str = ALPHABET) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, 3])
  items = []
  for _ in range(n):
    s = ''.join(rng.choice(list(alphabet), size=length))
    items.append((s * copies, list(range(length, length * copies))))
  out = _encode_rows(encoder, items, seq_len)
  copy = np.arange(seq_len) // length + 1   # the target at input position i is character i
  out['answer_id'] = np.where(out['answer'] > 0, copy[None], 0).astype(np.int32)
  out['copy'] = np.where(out['weights'] > 0, copy[None], 0).astype(np.int32)
  return out


def by_copy(nll_BxT: np.ndarray, pred_BxT: np.ndarray, batch: dict[str, np.ndarray]
            ) -> list[dict[str, float]]:
  """Per copy of a `repeat_batch`: mean target loss and greedy accuracy (copy 1 without its
  first symbol, which follows bos)."""
  out = []
  for c in range(1, int(batch['copy'].max()) + 1):
    m = (batch['copy'] == c) & (batch['positions'] > 0)
    out.append({'copy': c, 'loss': float(nll_BxT[m].mean()),
                'accuracy': float((pred_BxT[m] == batch['targets'][m]).mean())})
  return out


def score(pred_BxT: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Token accuracy over answer tokens, and exact-match accuracy over answers (an answer is
  the set of tokens with the same (row, answer_id))."""
  ans = batch['answer'] > 0
  correct = (pred_BxT == batch['targets']) & ans
  token_acc = float(correct.sum() / max(ans.sum(), 1))
  n_answers = n_exact = 0
  for r in range(ans.shape[0]):
    ids = batch['answer_id'][r]
    for a in np.unique(ids[ans[r]]):
      sel = ans[r] & (ids == a)
      n_answers += 1
      n_exact += int(correct[r][sel].all())
  return {'token_accuracy': token_acc, 'exact_accuracy': n_exact / max(n_answers, 1),
          'n_answers': n_answers}
