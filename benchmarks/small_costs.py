"""Two smaller costs side by side on this machine: HAT's word pooling (keys/values projected
over the row's bytes then gathered, vs gathered then projected) and the chunked readout of the
token LM at a 32k vocabulary (`model.ce_chunk`: 0 = whole [B, T, V] logits, 256 = the old
presets' fixed chunk, -1 = auto).

  python benchmarks/small_costs.py [--pool_presets=tiny,small] [--lm=configs/subword_lm.py:small]
      [--lm_batch=2] [--rounds=5]

Pooling: forward + backward of `HAT.pool` alone (the trainer's shapes: B x W x Lw gathered slots
from B x T encoder states), `project_first` True / False, min over --rounds of jitted calls, with
the FLOPs of the key/value projections. Readout: the trainer's whole step at each ce_chunk,
measured in alternation (`lm_throughput.time_interleaved`; min over rounds).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def parse(argv):
  opts = {'pool_presets': 'tiny,small', 'pool_batch': 0, 'lm': 'configs/subword_lm.py:small',
          'lm_batch': 2, 'rounds': 5, 'chunks': '0,256,-1'}
  opts = cli.parse_opts(argv, opts, __doc__)
  return opts


def pooling(preset: str, rounds: int, batch: int = 0) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from benchmarks import aot
  cfg = aot.load_config(f'configs/hat.py:{preset}',
                        {'train.batch_size': batch or (16 if preset == 'tiny' else 2)})
  setup = aot.make_setup(cfg)
  model = setup.family.build_model(nnx.Rngs(0))
  b = cfg.train.batch_size
  one = aot.host_batch(setup, 1)
  gather = jnp.asarray(np.repeat(one['word_gather'], b, axis=0))
  t, de = cfg.data.seq_len, cfg.model.byte_d_model
  h = jax.random.normal(jax.random.key(0), (b, t, de))
  graphdef, params = nnx.split(model)
  rows = []
  _, w, lw = gather.shape
  for first in (False, True):
    f = jax.jit(jax.grad(lambda p, h, first=first: jnp.sum(
        nnx.merge(graphdef, p).pool(h, gather, project_first=first) ** 2), argnums=(0, 1)))
    jax.block_until_ready(f(params, h))
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, h))
      times.append(time.perf_counter() - t0)
    slots = t if first else w * lw
    rows.append({'preset': preset, 'batch': b, 'T': t, 'W x Lw': w * lw,
                 'order': 'project, then gather' if first else 'gather, then project',
                 'projected_slots': slots, 'kv_gflop': 6 * 2 * de * de * slots * b / 1e9,
                 'ms': min(times) * 1e3})
  return rows


def readout(spec: str, batch: int, chunks: list[int], rounds: int) -> list[dict]:
  import jax
  from benchmarks import aot, lm_throughput
  from models import token_lm
  from train import partitioning
  runs, setups = {}, {}
  for c in chunks:
    setup = aot.make_setup(aot.load_config(spec, {'train.batch_size': batch,
                                                 'model.ce_chunk': c}))
    host = aot.host_batch(setup, 1)
    import numpy as np
    host = {k: np.repeat(x, batch, axis=0) for k, x in host.items()}
    runs[c] = (setup.make_train_step(), setup.init_state(),
               partitioning.global_batch(host, setup.mesh))
    setups[c] = setup
  times = lm_throughput.time_interleaved(runs, 1, rounds)
  out = []
  for c in chunks:
    s = setups[c]
    t, v = s.cfg.data.seq_len, s.family.encoder.vocab_size
    h = jax.ShapeDtypeStruct((batch, t, s.cfg.model.d_model), s.family.dtype)
    resolved = token_lm.resolve_ce_chunk(c, h, v)
    out.append({'ce_chunk': c, 'resolved': resolved, 'step_s': times[c][0],
                'vs_unchunked': times[c][0] / times[chunks[0]][0] if chunks[0] == 0 else None,
                'logits_MB': 4 * batch * t * v / 2 ** 20})
  return out


def main(argv):
  import jax
  opts = parse(argv)
  print(f'backend {jax.default_backend()} | {os.cpu_count()} CPUs', flush=True)
  print('| HAT preset | batch | T | W x Lw | order | projected slots per row | k/v GFLOP '
        '(fwd + bwd) | pool fwd + bwd ms |')
  print('|---|---|---|---|---|---|---|---|')
  for preset in [p for p in opts['pool_presets'].split(',') if p]:
    for r in pooling(preset, opts['rounds'], opts['pool_batch']):
      print(f"| {r['preset']} | {r['batch']} | {r['T']} | {r['W x Lw']} | {r['order']} | "
            f"{r['projected_slots']} | {r['kv_gflop']:.2f} | {r['ms']:.1f} |", flush=True)
  if opts['lm']:
    chunks = [int(c) for c in opts['chunks'].split(',')]
    print(f"\n{opts['lm']} at batch {opts['lm_batch']}: train step by model.ce_chunk")
    print('| ce_chunk | resolves to | fp32 logits MB | step s | vs unchunked |')
    print('|---|---|---|---|---|')
    for r in readout(opts['lm'], opts['lm_batch'], chunks, opts['rounds']):
      rel = f"{r['vs_unchunked']:.3f}x" if r['vs_unchunked'] else '-'
      print(f"| {r['ce_chunk']} | {r['resolved']} | {r['logits_MB']:.0f} | {r['step_s']:.3f} | "
            f"{rel} |", flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
