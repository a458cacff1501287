"""Training-step throughput and MFU of the LM configs, on synthetic full rows (no data loading).

  python benchmarks/lm_throughput.py --config=configs/byte_lm.py:small [--config=...] \
      [--steps=20] [--peak_tflops=989] [--config.train.batch_size=64 ...]

FLOPs per token (MaxText convention, `models.token_lm.flops_per_token`):
  N_matmul = L * (D*H*K + 2*D*G*K + H*K*D + 3*D*F) + D*V
  flops/token = 6 * N_matmul + 12 * L * H*K * S_eff,  S_eff = T/2 for causal attention
(L layers, D width, H query heads, G kv heads, K head dim, F MLP width, V vocab, T seq len).
MFU = tokens/s * flops/token / (devices * peak FLOP/s). Peak: --peak_tflops, or 989 (dense
bf16) per H100; on CPU MFU is not reported unless --peak_tflops is given.
Overrides after a --config apply to that config (same syntax as launch.py).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_opts(argv, opts: dict, doc: str) -> tuple[dict, dict]:
  """(`opts` updated from --NAME=VALUE, config overrides from --config.KEY=VALUE)."""
  overrides = {}
  for a in argv:
    if a.startswith('--config.'):
      k, val = a[len('--config.'):].split('=', 1)
      overrides[k] = val
    elif a.startswith('--') and '=' in a and a[2:].split('=', 1)[0] in opts:
      k, val = a[2:].split('=', 1)
      opts[k] = type(opts[k])(val)
    else:
      raise SystemExit(f'unknown argument {a!r}\n{doc}')
  return opts, overrides


def parse(argv):
  runs, opts = [], {'steps': 10, 'warmup': 2, 'peak_tflops': 0.0}
  for a in argv:
    if a.startswith('--config='):
      runs.append((a.split('=', 1)[1], {}))
    elif a.startswith('--config.'):
      k, v = a[len('--config.'):].split('=', 1)
      runs[-1][1][k] = v
    elif a.startswith('--') and '=' in a and a[2:].split('=')[0] in opts:
      k, v = a[2:].split('=', 1)
      opts[k] = type(opts[k])(v)
    else:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
  if not runs:
    raise SystemExit(__doc__)
  return runs, opts


def synthetic_batch(b: int, t: int, v: int) -> dict:
  """Full rows of random tokens (no padding, one segment per row), host-local numpy."""
  import numpy as np
  tokens = np.random.default_rng(0).integers(3, min(v, 50_000), size=(b, t + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((b, t), np.int32),
          'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          'weights': np.ones((b, t), np.float32), 'target_bytes': np.ones((b, t), np.int32)}


def time_steps(setup, batch, steps: int, warmup: int):
  """(compile seconds, seconds per train step after warm-up, last step's metrics) of
  `setup`'s jitted train step on a fresh state."""
  import jax
  state = setup.init_state()
  step = setup.make_train_step()
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return compile_s, (time.perf_counter() - t0) / steps, m


def time_interleaved(runs: dict, steps: int, rounds: int, warmup: int = 1,
                     final_states: dict | None = None) -> dict:
  """Seconds per step of several jitted steps measured in alternation: `runs` maps a name to
  (step, state, batch) (the state is donated); every round times `steps` consecutive steps of
  each run in turn; returns {name: (min, median) over rounds}. On a machine shared with other
  work, the min over interleaved rounds compares the runs under the same conditions.
  `final_states` (a dict) receives each run's last state, to time it again later."""
  import jax
  import numpy as np
  states = {}
  for name, (step, state, batch) in runs.items():
    for _ in range(warmup + 1):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    states[name] = state
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (step, _, batch) in runs.items():
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = step(state, batch)
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - t0) / steps)
      states[name] = state
  if final_states is not None:
    final_states.update(states)
  return {name: (min(ts), float(np.median(ts))) for name, ts in times.items()}


def bench(spec: str, overrides: dict, opts: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from train import config_lib, partitioning, trainer
  cfg, _ = config_lib.load(spec)
  config_lib.override(cfg, overrides)
  setup = trainer.Setup(cfg)
  fam = setup.family
  b, t = cfg.train.batch_size, cfg.data.seq_len
  v = fam.encoder.vocab_size
  batch = partitioning.global_batch(synthetic_batch(b, t, v), setup.mesh)
  compile_s, dt, _ = time_steps(setup, batch, opts['steps'], opts['warmup'])
  tok_s = b * t / dt
  fpt = fam.flops_per_token()
  peak = opts['peak_tflops'] or (989.0 if jax.default_backend() == 'gpu' else 0.0)
  out = {'config': spec + ''.join(f' {k}={v}' for k, v in overrides.items()),
         'params_M': setup.n_params / 1e6, 'batch': b, 'seq_len': t,
         'dtype': jnp.dtype(fam.dtype).name, 'compile_s': compile_s, 'step_ms': dt * 1e3,
         'tokens_per_s': tok_s, 'tflops_per_s': tok_s * fpt / 1e12,
         'flops_per_token_G': fpt / 1e9}
  out['mfu'] = out['tflops_per_s'] / (peak * jax.device_count()) if peak else float('nan')
  return out


def main(argv):
  import jax
  runs, opts = parse(argv)
  print(f'backend {jax.default_backend()} | devices {jax.device_count()} '
        f'({jax.devices()[0].device_kind})', flush=True)
  rows = [bench(spec, ov, opts) for spec, ov in runs]
  cols = ['config', 'params_M', 'batch', 'seq_len', 'dtype', 'compile_s', 'step_ms',
          'tokens_per_s', 'tflops_per_s', 'mfu']
  fmt = lambda x: f'{x:.4g}' if isinstance(x, float) else str(x)
  print('| ' + ' | '.join(cols) + ' |')
  print('|' + '---|' * len(cols))
  for r in rows:
    print('| ' + ' | '.join(fmt(r[c]) for c in cols) + ' |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
