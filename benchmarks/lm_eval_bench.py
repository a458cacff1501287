"""lm-eval requests on SmolLM2-135M (train/evals/lm_eval.py): where token-level and exact
byte-level scoring differ, and how fast each answers a multiple-choice task.

  python benchmarks/lm_eval_bench.py --parts=boundary
  python benchmarks/lm_eval_bench.py --parts=speed --limit=50   # 200 requests of notoklm_mc

Parts:
  boundary  (context, continuation) pairs scored token-level (lm-eval's HF conventions: the whole
            string encoded, then split at the context's token count) and byte-level (the exact
            byte view, P(continuation bytes | context bytes)); for each the tokens the token
            path actually scored. Pairs on a token boundary, a continuation that starts inside a
            token, a context that ends in a space.
  speed     the first --limit items of the local task notoklm_mc (4 choices: 4 requests each):
            requests/s of the batched token-level path against one request at a time (warm: the
            batched pass runs once untimed first), and of exact byte-level scoring (batched
            across requests: its second pass, and its first, which compiles); the distinct
            compiled shapes of the token path, and the XLA programs each path builds for the
            task (`lm_eval.Compiles`: its model forwards, and all programs, the small eager
            ones included; run this part alone, or an earlier part's programs are not built
            again).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = (
    ('def fibonacci(n):', '\n    if n < 2:'),           # a token boundary
    ('The capital of France is', ' Paris'),              # a token boundary
    ('def fibon', 'acci(n):'),                           # the continuation starts mid-token
    ('The capital of France is Par', 'is'),              # mid-token: no token of its own
    ('The capital of France is ', 'Paris'),              # the context ends in a space
)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--parts', default='boundary,speed')
  p.add_argument('--limit', type=int, default=50, help='notoklm_mc items (4 requests each)')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--model', default='pretrained:smollm2')
  return p.parse_args(argv)


def lms(model_spec: str, batch_size: int):
  """(token-level LM, byte-level LM) over the model `model_spec` (as `lm_eval.model`)."""
  # pylint: disable=import-outside-toplevel
  from train import config_lib
  from train.evals import lm_eval as le
  from train.modes import lm_eval as mode
  cfg, _ = config_lib.load(os.path.join(ROOT, 'configs', 'pretrained.py'))
  config_lib.override(cfg, {'lm_eval.model': model_spec, 'lm_eval.batch_size': batch_size,
                            'lm_eval.include_path': os.path.join(ROOT, 'tests', 'data', 'lm_eval'),
                            'lm_eval.tasks': 'notoklm_mc'})
  got = mode.load(cfg, '', None)
  out = []
  for scoring in ('tokens', 'bytes'):
    c = cfg.lm_eval.copy_and_resolve_references()
    c.scoring = scoring
    out.append(le.make_lm(got.family, got.model, c, window=got.window, mesh=got.mesh))
  return cfg, out


def instances(pairs):
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  return [Instance(request_type='loglikelihood', doc={}, arguments=p, idx=i)
          for i, p in enumerate(pairs)]


def part_boundary(tok, byt):
  print('| context | continuation | token path scores | token-level log p | byte-level log p |')
  print('|---|---|---|--:|--:|')
  for ctx, cont in PAIRS:
    _, cont_ids = tok._encode_pair(ctx, cont)  # pylint: disable=protected-access
    scored = repr(tok.tok_decode(cont_ids)) if cont_ids else '(no token)'
    try:
      t = f'{tok.loglikelihood(instances([(ctx, cont)]))[0][0]:.3f}'
    except ValueError as e:
      t = f'n/a ({e})'
    b = byt.loglikelihood(instances([(ctx, cont)]))[0][0]
    print(f'| {ctx!r} | {cont!r} | {scored} | {t} | {b:.3f} |')


def speed(cfg, tok, byt, limit: int) -> tuple[dict, list[str]]:
  """The speed part: (figures, Markdown lines)."""
  from train.evals import lm_eval as le  # pylint: disable=import-outside-toplevel
  _, tasks = le.load_tasks(cfg.lm_eval)
  task = tasks['notoklm_mc']
  task.build_all_requests(limit=limit, rank=0, world_size=1)
  reqs = [r for r in task.instances if r.request_type == 'loglikelihood']
  n = len(reqs)
  with le.Compiles() as tok_compiles:
    tok.loglikelihood(reqs)  # compiles
  secs = {}
  t0 = time.perf_counter()
  batched = tok.loglikelihood(reqs)
  secs['token-level, batched'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  one = [tok.loglikelihood([r])[0] for r in reqs]
  secs['token-level, one request at a time'] = time.perf_counter() - t0
  with le.Compiles() as byte_compiles:
    t0 = time.perf_counter()
    byt.loglikelihood(reqs)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    byt.loglikelihood(reqs)
    secs['byte-level (exact)'] = time.perf_counter() - t0
  secs['byte-level (exact), first pass: compiles'] = cold
  s = list(secs.values())
  out = {'requests': n, 'batch': tok.scorer.batch, 'seconds': secs,
         'requests_per_s': {k: n / v for k, v in secs.items()},
         'batched_speedup': s[1] / s[0], 'byte_over_token': s[2] / s[0],
         'byte_over_token_cold': s[3] / s[0],
         'max_abs_batched_vs_one': max(abs(a[0] - b[0]) for a, b in zip(batched, one)),
         'compiled_shapes': sorted(tok.scorer.shapes),
         'compiles': {'token-level': tok_compiles.names, 'byte-level': byte_compiles.names}}
  md = [f'{n} requests (notoklm_mc, {limit} items); batch {tok.scorer.batch}', '',
        '| path | seconds | requests/s |', '|---|--:|--:|']
  md += [f'| {k} | {v:.2f} | {n / v:.1f} |' for k, v in secs.items()]
  md += ['', f'batched / one at a time: {out["batched_speedup"]:.1f}x; byte / token (batched): '
         f'{out["byte_over_token"]:.1f}x (its first pass, compiling: '
         f'{out["byte_over_token_cold"]:.1f}x); max |batched - one| '
         f'{out["max_abs_batched_vs_one"]:.2e}; token path: {len(tok.scorer.shapes)} distinct '
         f'compiled shapes {out["compiled_shapes"]}', '',
         '| path | XLA programs built (model forwards) | all programs built |', '|---|--:|--:|']
  for path, c in (('token-level, batched', tok_compiles), ('byte-level (exact)', byte_compiles)):
    counts = ', '.join(f'{k} x{v}' for k, v in sorted(collections.Counter(c.names).items()))
    md.append(f'| {path} | {len(c.model)} | {len(c.names)} ({counts}) |')
  return out, md


def main(argv):
  args = parse(argv)
  parts = [p.strip() for p in args.parts.split(',') if p.strip()]
  for p in parts:
    if p not in ('boundary', 'speed'):
      raise SystemExit(f'--parts: unknown part {p!r} (boundary, speed)')
  t0 = time.perf_counter()
  cfg, (tok, byt) = lms(args.model, args.batch_size)
  print(f'{args.model}: loaded in {time.perf_counter() - t0:.1f} s')
  if 'boundary' in parts:
    part_boundary(tok, byt)
  if 'speed' in parts:
    print('\n'.join(speed(cfg, tok, byt, args.limit)[1]))
  print(f'wall {time.perf_counter() - t0:.1f} s')


if __name__ == '__main__':
  main(sys.argv[1:])
