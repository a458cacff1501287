"""Time to predict a whole vocabulary's embeddings with a trained hypernetwork.

  python benchmarks/zett_predict.py --workdir=runs/zett_smollm2 [--vocab=32768] [--repeat=3]

Takes the first `--vocab` token strings of the base tokenizer as the "new" vocabulary, splits
them into base pieces (host) and runs the jitted hypernetwork over all of them in chunks of
4096 (device); prints both times (the device time after one compiling call).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  opts = {'workdir': '', 'vocab': 32768, 'repeat': 3}
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
    opts[k] = type(opts[k])(v)
  import jax
  import numpy as np
  from models import hypernet
  from train import config_lib, runs
  from train.families import pretrained
  cfg = config_lib.load_saved(opts['workdir'])
  predict = runs.load_predictor(opts['workdir'], cfg.model.source)
  tok = pretrained.load_source(cfg.model.source).tokenizer
  strings = [tok.id_to_token(i) or '' for i in range(opts['vocab'])]
  t0 = time.perf_counter()
  hypernet.piece_ids(tok, strings, cfg.hypernet.max_pieces)
  pieces_s = time.perf_counter() - t0
  predict(strings)  # compile
  times = []
  for _ in range(opts['repeat']):
    t0 = time.perf_counter()
    e_in, _ = predict(strings)
    jax.block_until_ready(e_in)
    times.append(time.perf_counter() - t0)
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}) | vocab '
        f'{opts["vocab"]} | hypernetwork {cfg.hypernet.num_layers} layers d {cfg.hypernet.d_model}')
  print(f'base pieces (host): {pieces_s:.3f} s | pieces + prediction: median '
        f'{np.median(times):.3f} s over {opts["repeat"]} runs')


if __name__ == '__main__':
  main(sys.argv[1:])
