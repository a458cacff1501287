"""Attention kernels side by side on this machine: forward + backward time of `layers.attend`
for each implementation at the shapes the presets use (two packed documents per row).

  python benchmarks/attention.py [--cases=hat_tiny_bytes,lm_small] [--impls=xla,blocked]
      [--repeats=5] [--dtype=float32]

Cases (B, T, H, G, K, window): the byte stacks of HAT tiny/small (sliding window), the token
LMs' full causal attention at tiny/small. --window_blocks=64,128 adds 'blocked' runs with those
query blocks (`model.attention_window_block`). Prints ms per call (min of --repeats after one
warm-up), the ratio to 'xla', and peak temporary bytes from the compiled program's memory
analysis. 'splash' runs in Pallas interpret mode off TPU (a correctness tool, not a CPU
kernel): listed only when asked for. 'cudnn' needs a GPU.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position

# name -> (B, T, H, G, K, window)
CASES = {
    'hat_tiny_bytes': (16, 256, 4, 4, 16, 64),
    'hat_small_bytes': (2, 4096, 8, 8, 64, 256),
    'lm_tiny': (16, 256, 4, 4, 32, 0),
    'lm_small': (4, 1024, 12, 12, 64, 0),
    'subword_small': (8, 512, 12, 12, 64, 0),
}


def parse(argv):
  opts = {'cases': ','.join(CASES), 'impls': 'xla,blocked', 'repeats': 5, 'dtype': 'float32',
          'window_blocks': ''}
  opts = cli.parse_opts(argv, opts, __doc__)
  return opts


def time_impl(case, impl, dtype, repeats, window_block=0, config=None):
  """(min ms over `repeats` jitted forward + backward calls, temp bytes of the compiled
  program; the min, as this machine is shared with other work); `config`
  (an AttentionConfig) overrides impl / window_block."""
  import jax
  import jax.numpy as jnp
  from models import layers
  b, t, h, g, k, window = case
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, k), dtype)
  kk = jax.random.normal(ks[1], (b, t, g, k), dtype)
  v = jax.random.normal(ks[2], (b, t, g, k), dtype)
  dout = jax.random.normal(ks[3], (b, t, h, k), dtype)
  seg = jnp.asarray((jnp.arange(t) >= t // 3).astype(jnp.int32) + 1)[None].repeat(b, 0)
  cfg = config or layers.AttentionConfig(impl=impl, window_block=window_block)

  def loss(q, kk, v):
    out = layers.attend(q, kk, v, seg, window=window, config=cfg)
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(q, kk, v).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', float('nan')) if mem is not None else float('nan')
  jax.block_until_ready(compiled(q, kk, v))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, kk, v))
    times.append(time.perf_counter() - t0)
  return min(times) * 1e3, temp


def main(argv):
  import jax
  import jax.numpy as jnp
  from models import layers
  opts = parse(argv)
  dtype = jnp.dtype(opts['dtype'])
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}) | dtype {dtype.name}'
        f' | forward + backward, min of {opts["repeats"]}', flush=True)
  print('| case | B x T x H/G x K, window | impl | ms | vs xla | temp MB |')
  print('|---|---|---|---|---|---|')
  blocks = [int(x) for x in opts['window_blocks'].split(',') if x]
  for name in opts['cases'].split(','):
    case = CASES[name]
    b, t, h, g, k, window = case
    base = None
    runs = [(impl, 0) for impl in opts['impls'].split(',')]
    if 'blocked' in opts['impls']:
      runs += [('blocked', c) for c in blocks]
    for impl, c in runs:
      resolved = layers.resolve_attention_impl(layers.AttentionConfig(impl=impl, window_block=c),
                                               window=window, seq_len=t, dtype=dtype, head_dim=k)
      if resolved != impl:  # e.g. 'blocked' with nothing to skip runs 'xla'
        continue
      ms, temp = time_impl(case, impl, dtype, opts['repeats'], c)
      base = ms if impl == 'xla' else base
      ratio = f'{ms / base:.2f}x' if base else '-'
      label = impl + (f' (block {c})' if c else '')
      print(f'| {name} | {b} x {t} x {h}/{g} x {k}, {window or "causal"} | {label} | {ms:.1f} | '
            f'{ratio} | {temp / 2**20:.0f} |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
