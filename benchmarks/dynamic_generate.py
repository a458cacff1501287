"""Generation tokens/s of a pretrained LM under dynamic tokenization, per prompt: plain (no
merges), causal merges (KV-cached, the table grown along the prompt and the generated text) and
batch-level merges of the prompt (uncached), each with FVT and, given --hypernet, hypernetwork
embeddings.

  python benchmarks/dynamic_generate.py --prompts=README.md,train/dynamic.py \
      [--hypernet=runs/zett_100] [--chars=1000] [--max_new_tokens=64] [--budget=512] \
      [--compression=0.05] [--source=smollm2]

Each prompt is the first `--chars` characters of a file; decoding is greedy. Rates exclude the
steps that compile (`train/dynamic.py`); the plain row is the causal decoder with no table, so
it runs the same loop. Prints one Markdown table (tokens/s; the causal rows also the new
tokens generated / entries learnt).
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  opts = {'prompts': '', 'hypernet': '', 'chars': 1000, 'max_new_tokens': 64, 'budget': 512,
          'compression': 0.05, 'source': 'smollm2'}
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
    opts[k] = type(opts[k])(v)
  if not opts['prompts']:
    raise SystemExit(f'--prompts is empty: give files whose beginnings are the prompts\n{__doc__}')
  import jax
  import numpy as np
  from data import dynamic_bpe
  from train import config_lib, dynamic, launching, runs, trainer
  from train.evals import report
  launching.enable_compile_cache()  # the runs' persistent compilation cache
  methods = ['fvt'] + (['hypernet'] if opts['hypernet'] else [])
  cfg, _ = config_lib.load(f'configs/pretrained.py:{opts["source"]}')
  config_lib.override(cfg, {'model.source': opts['source'], 'sample.temperature': 0.0,
                            'sample.max_new_tokens': opts['max_new_tokens'],
                            'transfer.hypernet_workdir': opts['hypernet']})
  wd = tempfile.mkdtemp(prefix='dyn_gen_')
  setup, state, _ = trainer.restore(cfg, wd)
  enc = setup.family.encoder
  model = setup.model(state['params'])
  predictor = (runs.load_predictor(opts['hypernet'], cfg.model.source) if opts['hypernet']
               else None)
  dyn = dynamic_bpe.DynamicBPE(enc, predictor.max_pieces if predictor else 7,
                               str(cfg.dynamic_boundary))
  base_in = np.asarray(model.embed.embedding[...], np.float32)
  base_out = base_in if model.tie_embeddings else np.asarray(model.readout.kernel[...]).T
  vocab = enc.tokenizer.get_vocab(with_added_tokens=True)
  rows = []
  for path in opts['prompts'].split(','):
    with open(path, encoding='utf-8') as f:
      prompt = f.read()[:opts['chars']]
    ids = [enc.bos_id] + [int(t) for t in enc.encode(prompt)]
    row = {'prompt': f'{os.path.basename(path)} ({len(ids) - 1} tokens)'}
    emb = dynamic.Embedder('fvt', base_in, base_out, vocab, dyn.base_bytes)
    got = dynamic.generate_causal(model, dyn, emb, ids, opts['max_new_tokens'], 0)
    row['plain'] = f'{got["tokens_per_s"]:.1f}'
    for m in methods:
      emb = dynamic.Embedder(m, base_in, base_out, vocab, dyn.base_bytes, predictor)
      got = dynamic.generate_causal(model, dyn, emb, ids, opts['max_new_tokens'],
                                    opts['budget'])
      new = sum(t >= dyn.vocab for t in got['generated'])
      row[f'causal {m}'] = (f'{got["tokens_per_s"]:.1f} ({new} new / {len(got["parts"])} '
                            'entries)')
    for m in methods:
      c = cfg.copy_and_resolve_references()
      config_lib.override(c, {'sample.prompt': prompt, 'dynamic_mode': 'batch',
                              'dynamic': f'compression:{opts["compression"]}',
                              'dynamic_embeddings': m})
      got = dynamic.sample_batch_level(c, wd)
      row[f'batch {m}'] = f'{got["tokens_per_s"]:.1f}'
    rows.append(row)
    print(row, flush=True)
  print(f'backend {jax.default_backend()}, {opts["max_new_tokens"]} new tokens, greedy; '
        'tokens/s after the steps that compile')
  print(report.markdown(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == '__main__':
  main(sys.argv[1:])
