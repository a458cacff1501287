"""Byte-level views of SmolLM2-135M on CPU: speed, bits per byte, boundary prompts, FIM-like.

  python benchmarks/byte_level.py                  # all parts, a few minutes on 2 CPU cores
  python benchmarks/byte_level.py --fim_n=40 --text_bytes=500 --parts=canon,score,fim

Parts:
  canon     SmolLM2's tokenizer against the definition: every next token of its own encoding
            of docs paragraphs, stdlib code and a mixed string (contractions, whitespace runs,
            CJK, emoji) must be a valid continuation (the lattice relies on it), and fast
            validity rows must equal `valid_slow` on sampled (prefix, token) pairs.
  score     a paragraph of Python's docs (pydoc_data.topics['assignment'], first --text_bytes
            bytes): token-level log-prob of its encoding (one forward over [doc] + ids + [doc])
            vs the exact byte-level score (models.byte_level.ExactBPE.score); wall time of each
            (warm: the median of --repeats runs after one untimed run), the factor, bits per
            byte of both (the end token included in both), their difference (the mass the
            model puts on non-canonical tokens along the canonical encoding, see the module
            doc of models/byte_level/exact_bpe.py) and, on a short prefix, the streaming path's
            agreement.
  examples  SmolLM2's greedy completions of prompts that end inside a token: plain token-level,
            token healing, exact byte-level.
  fim       --fim_n code lines from the standard library (textwrap, string, json.decoder,
            argparse, ...), each cut at a random byte inside the line; the prompt is up to
            --context bytes before the cut; the target is the rest of the token (of the
            tokenizer's encoding of the text) that the cut falls in, or the next token when
            the cut falls between tokens (--target_tokens=2: and the token after it; the text
            encoded ends with the line). Exact match: the greedy completion starts with the
            target. Plain token-level (the prompt's own encoding), token healing, byte-level.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import byte_level as bl  # noqa: E402
from models import pretrained  # noqa: E402
from models.byte_level import interface  # noqa: E402


def timed(fn, repeats):
  fn()
  times = []
  out = None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times)


def part_canon(view, args):
  import json.decoder  # pylint: disable=import-outside-toplevel
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  import string  # pylint: disable=import-outside-toplevel
  import textwrap  # pylint: disable=import-outside-toplevel
  c = view.c
  texts = [pydoc_data.topics.topics[k][:1500] for k in ('assignment', 'for', 'with', 'lambda',
                                                        'formatstrings')]
  texts += [inspect.getsource(m)[:3000] for m in (textwrap, string, json.decoder)]
  texts.append("x'll it's we're \n\n\nA  b\t\tc \u4e2d\u6587\U0001F44D caf\u00e9 12.5e-3\r\n  ")
  rng = random.Random(args.seed)
  t0 = time.perf_counter()
  steps = bad = pairs = mismatch = 0
  for i, text in enumerate(texts):
    b = text.encode()
    ids = c.encode(b)
    pos = 0
    sample = set(rng.sample(range(len(ids)), 4)) if i in (0, 1, 5, len(texts) - 1) else set()
    for k, t in enumerate(ids):
      tail = c.make_tail(b, pos, reversed(ids[:k]))
      row = c.row(tail)
      steps += 1
      bad += not row[t]
      if k in sample:
        for v in rng.sample(c.text_ids.tolist(), 150) + [t]:
          pairs += 1
          mismatch += bool(row[v]) != c.valid_slow(tail, v)
      pos += len(c.token_bytes[t])
  print(f'\n== canon: {steps} next-token steps of the tokenizer\'s own encodings ({len(texts)} '
        f'texts): {bad} not valid; fast rows vs valid_slow: {mismatch} mismatches of {pairs} '
        f'(prefix, token) pairs; {time.perf_counter() - t0:.1f} s')


def part_score(view, args):
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  text = pydoc_data.topics.topics['assignment'][:args.text_bytes].encode()
  ids = view.c.encode(text)
  toks = ids + [view.eos_id]

  def token_level():
    size = interface.bucket(len(toks) + 1, 128)
    lp, _ = view._prefill(toks, size)  # pylint: disable=protected-access
    return lp[np.arange(len(toks)), toks].astype(np.float64)

  tok_lp, t_tok = timed(token_level, args.repeats)
  byte_lp, t_byte = timed(lambda: view.score(text), args.repeats)
  n = len(text)
  bits_tok = -tok_lp.sum() / np.log(2) / n
  bits_byte = -byte_lp.sum() / np.log(2) / n
  print(f'\n== score: {n} bytes of pydoc_data.topics["assignment"], {len(ids)} tokens '
        f'({n / len(ids):.2f} bytes/token)')
  print(f'token-level forward  {t_tok:7.3f} s')
  print(f'byte-level score     {t_byte:7.3f} s   factor {t_byte / t_tok:.2f}x')
  print(f'bits/byte token-level {bits_tok:.5f}   byte-level {bits_byte:.5f}   '
        f'difference {bits_tok - bits_byte:.5f} bits/byte '
        f'({(tok_lp.sum() - byte_lp.sum()) * -1:.4f} nats over the text: -sum log Z along '
        f'the canonical encoding)')
  d = view.distributions(text[:40])
  short = view.score(text[:40])
  st = view.start(text[:20])
  stream = []
  for b in text[20:40]:
    stream.append(view.next_byte_logprobs(st)[b])
    st = view.advance(st, b)
  print(f'first 40 bytes: max |sum p - 1| {np.abs(np.exp(d.astype(np.float64)).sum(1) - 1).max():.1e}'
        f', max |streaming - batched| {np.abs(np.array(stream) - short[20:40]).max():.1e}')
  view.next_byte_logprobs(view.start(text[:200]))  # compile the shapes first
  t0 = time.perf_counter()
  st = view.start(text[:200])
  t_start = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in text[200:232]:
    view.next_byte_logprobs(st)
    st = view.advance(st, b)
  t_step = (time.perf_counter() - t0) / 32
  print(f'streaming: start(200-byte prompt) {t_start:.2f} s, then {t_step * 1000:.0f} ms per '
        f'byte (next_byte_logprobs + advance)')


EXAMPLES = [b'def fibonac', b'The capital of France is ', b'import numpy as n',
            'Le caf\u00e9'.encode()[:-1], b'for i in ra']


def part_examples(view, args):
  print('\n== examples: greedy completions of prompts that end inside a token')
  for prompt in EXAMPLES:
    try:
      plain = view.generate_tokens(prompt, 8)
    except ValueError:
      plain = b'(n/a: the prompt ends inside a character; a token-level prompt is text)'
    healed = view.generate_tokens(prompt, 8, heal=True)
    byte = bl.sample(view, prompt, max_bytes=24)
    print(f'{prompt!r}\n  plain   {plain!r}\n  healing {healed!r}\n  bytes   {byte!r}')


FIM_MODULES = ('textwrap', 'string', 'json.decoder', 'argparse', 'fractions', 'shlex',
               'difflib', 'dataclasses')


def fim_cases(canon, n: int, context: int, seed: int, target_tokens: int = 1):
  import importlib  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  lines = []
  for name in FIM_MODULES:
    src = inspect.getsource(importlib.import_module(name)).encode()
    off = 0
    for line in src.split(b'\n'):
      if len(line.strip()) >= 12 and not line.strip().startswith(b'#'):
        lines.append((src, off, line))
      off += len(line) + 1
  rng.shuffle(lines)
  cases = []
  for src, off, line in lines:
    if len(cases) >= n:
      break
    lead = len(line) - len(line.lstrip())
    cut = off + rng.randrange(lead + 1, len(line))
    lo = max(0, cut - context)
    while lo < cut and 0x80 <= src[lo] <= 0xBF:
      lo += 1
    hi = off + len(line)
    try:
      ids = canon.encode(src[lo:hi])
    except ValueError:
      continue
    pos = lo
    target = None
    for k, t in enumerate(ids):
      end = pos + len(canon.token_bytes[t])
      if pos <= cut < end:
        end += sum(len(canon.token_bytes[u]) for u in ids[k + 1:k + target_tokens])
        target = src[cut:end]
        break
      pos = end
    if target:
      cases.append((src[lo:cut], target))
  return cases


def part_fim(view, args):
  cases = fim_cases(view.c, args.fim_n, args.context, args.seed, args.target_tokens)
  hits = {'plain': 0, 'healing': 0, 'bytes': 0}
  times = {k: 0.0 for k in hits}
  for prompt, target in cases:
    for kind in hits:
      t0 = time.perf_counter()
      if kind == 'bytes':
        out = bl.sample(view, prompt, max_bytes=len(target))
      else:
        out = view.generate_tokens(prompt, args.fim_tokens, heal=kind == 'healing')
      times[kind] += time.perf_counter() - t0
      hits[kind] += out.startswith(target)
  n = len(cases)
  print(f'\n== fim: {n} cut code lines from {", ".join(FIM_MODULES)} (seed {args.seed}, '
        f'{args.context}-byte context, target = rest of the token the cut falls in'
        f'{f" + {args.target_tokens - 1} token(s)" if args.target_tokens > 1 else ""} (within '
        f'the line); mean target {np.mean([len(t) for _, t in cases]):.1f} bytes)')
  for kind in hits:
    print(f'{kind:8s} exact match {hits[kind]:3d}/{n} = {hits[kind] / n:.3f}   '
          f'{times[kind] / n:.2f} s/case')


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--parts', default='canon,score,examples,fim')
  ap.add_argument('--text_bytes', type=int, default=500)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--fim_n', type=int, default=40)
  ap.add_argument('--fim_tokens', type=int, default=6)
  ap.add_argument('--context', type=int, default=300)
  ap.add_argument('--target_tokens', type=int, default=1,
                  help='tokens in the target: the rest of the cut token, then more')
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()
  print('command: python benchmarks/byte_level.py ' + ' '.join(sys.argv[1:]))
  print(f'load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
  t0 = time.perf_counter()
  p = pretrained.load(pretrained.smollm2_path())
  view = pretrained.byte_view(p, name='smollm2')
  t1 = time.perf_counter()
  view.c._build_pair_index()  # pylint: disable=protected-access
  view.c._build_groups()  # pylint: disable=protected-access
  print(f'SmolLM2 load {t1 - t0:.1f} s; tokenizer structure (BPE spines of {len(view.c.text_ids)}'
        f' tokens, pre-tokenizer groups) {time.perf_counter() - t1:.1f} s')
  parts = args.parts.split(',')
  if 'canon' in parts:
    part_canon(view, args)
  if 'score' in parts:
    part_score(view, args)
  if 'examples' in parts:
    part_examples(view, args)
  if 'fim' in parts:
    part_fim(view, args)


if __name__ == '__main__':
  main()
