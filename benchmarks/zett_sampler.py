"""Host-side cost of one ZeTT step's data: sampling a tokenizer and building the batch.

  python benchmarks/zett_sampler.py [--preset=smollm2_gpu] [--steps=5]

Runs the family's own batch builder (train/families/zett.py `_Batcher`: decode the byte rows,
count substrings of those texts + `zett.sampler_docs` documents, sample the UnigramLM, tokenize,
split every vocabulary entry into base pieces) on real training batches, for the preset's
sizes, and prints seconds per step for each part. The trainer runs this on a prefetch thread,
so it keeps up when it is shorter than the device step (compare with the `steps/s` the
training log prints for the same preset).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  opts = {'preset': 'smollm2', 'steps': 5}
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
    opts[k] = type(opts[k])(v)
  import numpy as np
  from data import pipeline, tokenizer_sampler
  from train import config_lib, families
  from train.families import zett
  cfg, _ = config_lib.load(f'configs/zett.py:{opts["preset"]}')
  fam = families.get(cfg)
  docs = fam.train_documents()
  batcher = zett._Batcher(fam, cfg.data.seq_len)  # pylint: disable=protected-access
  inner = pipeline.make_train_iterator(fam._byte_cfg(), fam.bytes, 0, 1)  # pylint: disable=protected-access
  z = cfg.zett
  times = {'texts': [], 'sample': [], 'tokenize': [], 'pieces': [], 'total': []}
  for step in range(opts['steps']):
    bb = next(inner)
    t0 = time.perf_counter()
    texts = batcher.texts(bb)
    t1 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 7, step])
    extra = [docs[int(i)][:z.sampler_doc_chars] for i in
             rng.choice(len(docs), z.sampler_docs, replace=False)]
    tok = tokenizer_sampler.sample_unigram(texts + extra, z.vocab_size, rng, z.noise_std,
                                           z.max_piece_chars, (fam.sep_string,))
    t2 = time.perf_counter()
    batcher.tokenized(tok, texts, bb['targets'].shape[0])
    t3 = time.perf_counter()
    batcher.vocab_arrays(tok)
    t4 = time.perf_counter()
    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
      times[k].append(v)
  inner.close()
  text_bytes = sum(len(t.encode()) for t in texts + extra)
  print(f'preset {opts["preset"]}: vocab {z.vocab_size}, batch {cfg.train.batch_size} x '
        f'{cfg.data.seq_len} tokens, sampler text {text_bytes / 1e3:.0f} kB per step')
  print('| part | seconds per step (median of %d) |' % opts['steps'])
  print('|---|---|')
  for k, v in times.items():
    print(f'| {k} | {np.median(v):.3f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
