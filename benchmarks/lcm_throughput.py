"""Training throughput (sentences/s) and MFU of Base-LCM and Two-Tower LCM, side by side.

  python benchmarks/lcm_throughput.py [--preset=small] [--steps=10] [--peak_tflops=989]
      [--config.train.batch_size=32 ...]

Both variants go through the real trainer step (`train.trainer.Setup.make_train_step`:
forward, backward, AdamW, donated state) on the same synthetic full rows of 384-d sentence
embeddings (one document per row), so no sentence cache is needed: the step cost depends only
on the sizes. FLOPs per sentence come from `models.lcm.flops_per_sentence` (the same numbers
the trainer's progress line uses). MFU = achieved FLOP/s / (devices * peak); peak is
--peak_tflops, or 989 (dense bf16) per H100; on CPU MFU is not reported unless given.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EMB_DIM = 384


def _family(cfg):
  """The LCM family on a synthetic sentence space (no corpus, no encoder: the step cost depends
  only on the sizes)."""
  import numpy as np
  from train.families import lcm

  class _Space:
    dim, num_docs, num_sentences, directory = EMB_DIM, 0, 0, 'synthetic'
    embeddings = np.random.default_rng(0).normal(size=(64, EMB_DIM)).astype(np.float32)

  class Bench(lcm.LCMFamily):
    def train_space(self):
      return _Space()

  return Bench(cfg)


def synthetic_batch(b: int, s: int):
  import numpy as np
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 1000, (b, s)).astype(np.int32)
  inputs[:, 0] = 1  # bos
  emb = lambda: (rng.normal(size=(b, s, EMB_DIM)) / EMB_DIM ** 0.5).astype(np.float32)
  return {'inputs': inputs, 'targets': rng.integers(3, 1000, (b, s)).astype(np.int32),
          'segment_ids': np.ones((b, s), np.int32),
          'positions': np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          'weights': np.ones((b, s), np.float32), 'target_bytes': np.full((b, s), 80, np.int32),
          'input_emb': emb(), 'target_emb': emb()}


def main(argv):
  opts = {'preset': 'small', 'steps': 10, 'warmup': 2, 'peak_tflops': 0.0}
  from benchmarks import lm_throughput
  opts, overrides = lm_throughput.parse_opts(argv, opts, __doc__)
  import jax
  from train import config_lib, partitioning, trainer
  peak = opts['peak_tflops'] or (989.0 if jax.default_backend() == 'gpu' else 0.0)
  print(f'backend {jax.default_backend()} | devices {jax.device_count()} '
        f'({jax.devices()[0].device_kind}) | preset {opts["preset"]}', flush=True)
  rows = {}
  for variant in ('base', 'two_tower'):
    cfg, _ = config_lib.load(f'configs/lcm.py:{opts["preset"]}')
    config_lib.override(cfg, dict(overrides, **{'model.variant': variant}))
    setup = trainer.Setup(cfg, _family(cfg))
    b, s = cfg.train.batch_size, cfg.data.seq_len
    batch = partitioning.global_batch(synthetic_batch(b, s), setup.mesh)
    compile_s, dt, m = lm_throughput.time_steps(setup, batch, opts['steps'], opts['warmup'])
    tflops = setup.flops_per_step / dt / 1e12
    rows[variant] = {'params_M': setup.n_params / 1e6, 'compile_s': compile_s,
                     'step_ms': dt * 1e3, 'sentences_per_s': b * s / dt, 'tflops_per_s': tflops,
                     'mfu': tflops / (peak * jax.device_count()) if peak else float('nan'),
                     'loss': float(jax.device_get(m['loss_mean']))}
    print(f'{variant}: {rows[variant]} | batch {b} x {s} sentences | d {cfg.model.d_model} x '
          f'{cfg.model.num_layers} layers (+{cfg.model.denoiser_layers} denoiser)'
          if variant == 'two_tower' else
          f'{variant}: {rows[variant]} | batch {b} x {s} sentences | d {cfg.model.d_model} x '
          f'{cfg.model.num_layers} layers', flush=True)
  cols = ['params_M', 'compile_s', 'step_ms', 'sentences_per_s', 'tflops_per_s', 'mfu']
  print('| variant | ' + ' | '.join(cols) + ' |')
  print('|---' * (len(cols) + 1) + '|')
  for name, r in rows.items():
    print(f'| {name} | ' + ' | '.join(f'{r[c]:.4g}' for c in cols) + ' |')
  return rows


if __name__ == '__main__':
  main(sys.argv[1:])
