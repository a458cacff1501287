"""How close to this machine's limit the train steps run: each family's step against the
machine's measured matmul peak, and (token LMs, HAT) against a minimal hand-written JAX
reference step of exactly the same shapes.

  python benchmarks/cpu_efficiency.py [--runs=subword_lm:tiny,hat:tiny,...] [--steps=2]
      [--rounds=5] [--small_batch=1]

For every run: the trainer's own step (`trainer.Setup(cfg).make_train_step()`: forward,
backward, clipping, AdamW, donated state) on synthetic full rows (benchmarks/aot.host_batch:
random tokens, HAT's word layout from its batch transform), timed by
`lm_throughput.time_interleaved` (--rounds rounds of --steps steps, project and reference in
alternation; the min over rounds, as this machine is shared with other work). Achieved FLOP/s = the family's training FLOPs per step (the
trainer's MFU accounting, MaxText convention) / step time; "of peak" divides by the fp32
matmul rate measured here (best of jnp.dot at 2048^3 and 4096^3). The reference step (LM, HAT)
is written here from scratch -- parameters in plain dicts, `jax.nn.dot_product_attention`
with the causal / window / segment masks (XLA's attention), gather-then-project pooling,
`optax.adamw` -- and timed in alternation with it on the same batch: `vs ref` = project step time /
reference step time. Small presets run with --small_batch rows (few steps). Subword presets use
their vocabulary size without training a tokenizer; lexinvariant and LCM use their benchmarks'
synthetic families (benchmarks/lexinv_throughput.py, benchmarks/lcm_throughput.py).
Last, for each preset with both, the HAT and subword steps are timed again in alternation: the
HAT / subword achieved-FLOP/s ratio under the same machine load.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position

RUNS = ('byte_lm:tiny,subword_lm:tiny,hat:tiny,lexinvariant:tiny,lcm:tiny,'
        'byte_lm:small,subword_lm:small,hat:small,lcm:small')


def parse(argv):
  opts = {'runs': RUNS, 'steps': 2, 'rounds': 5, 'warmup': 1, 'small_batch': 1}
  opts = cli.parse_opts(argv, opts, __doc__)
  return opts


def matmul_peak(sizes=(2048, 4096), repeats: int = 5) -> float:
  """Best fp32 FLOP/s of a jitted jnp.dot on this backend."""
  import jax
  import jax.numpy as jnp
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
  return best


# -- the hand-written reference ------------------------------------------------------------------
def _rope(x, pos, base):
  import jax.numpy as jnp
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  ang = pos.astype(jnp.float32)[..., None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
                          x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], axis=-1)


def _rms(x, s):
  import jax
  import jax.numpy as jnp
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s


def _init_stack(key, n, d, h, g, k, f, context=0):
  import jax
  import jax.numpy as jnp
  layers = []
  for i in range(n):
    ks = jax.random.split(jax.random.fold_in(key, i), 9)
    p = {'n1': jnp.ones(d), 'n2': jnp.ones(d),
         'q': 0.02 * jax.random.normal(ks[0], (d, h, k)),
         'k': 0.02 * jax.random.normal(ks[1], (d, g, k)),
         'v': 0.02 * jax.random.normal(ks[2], (d, g, k)),
         'o': 0.02 * jax.random.normal(ks[3], (h, k, d)),
         'gate': 0.02 * jax.random.normal(ks[4], (d, f)),
         'up': 0.02 * jax.random.normal(ks[5], (d, f)),
         'down': 0.02 * jax.random.normal(ks[6], (f, d))}
    if context:
      p['cv'] = 0.02 * jax.random.normal(ks[7], (context, h * k))
      p['co'] = 0.02 * jax.random.normal(ks[8], (h * k, d))
    layers.append(p)
  return {'layers': layers, 'norm': jnp.ones(d)}


def _stack(p, x, pos, seg, window, rope_base, context=None):
  """Pre-norm blocks: attention (XLA, causal + window + segment mask), [one-key cross-attention
  add], SwiGLU; final norm."""
  import jax
  import jax.numpy as jnp
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  local = (window - 1, 0) if window > 0 else None
  for lp in p['layers']:
    h = _rms(x, lp['n1'])
    q = _rope(jnp.einsum('btd,dhk->bthk', h, lp['q']), pos, rope_base)
    k = _rope(jnp.einsum('btd,dgk->btgk', h, lp['k']), pos, rope_base)
    v = jnp.einsum('btd,dgk->btgk', h, lp['v'])
    a = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=local)
    x = x + jnp.einsum('bthk,hkd->btd', a, lp['o'])
    if context is not None:
      c, idx = context
      add = (c @ lp['cv']) @ lp['co']
      x = x + jnp.take_along_axis(add, jnp.clip(idx, 0, c.shape[1] - 1)[..., None], axis=1)
    h = _rms(x, lp['n2'])
    x = x + (jax.nn.silu(h @ lp['gate']) * (h @ lp['up'])) @ lp['down']
  return _rms(x, p['norm'])


def _nll(logits, targets, weights):
  import jax
  import jax.numpy as jnp
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, -1) - tgt) * weights) / jnp.maximum(weights.sum(), 1)


def reference_lm(cfg, vocab: int):
  """(params, loss_fn) of a token LM with cfg.model's shapes."""
  import jax
  m = cfg.model
  key = jax.random.key(0)
  params = {'embed': 0.02 * jax.random.normal(key, (vocab, m.d_model)),
            'stack': _init_stack(jax.random.fold_in(key, 1), m.num_layers, m.d_model,
                                 m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim)}
  if not m.tie_embeddings:
    params['readout'] = 0.02 * jax.random.normal(jax.random.fold_in(key, 2), (m.d_model, vocab))

  def loss(p, b):
    x = p['embed'][b['inputs']]
    h = _stack(p['stack'], x, b['positions'], b['segment_ids'], m.window, m.rope_base)
    logits = h @ (p['embed'].T if m.tie_embeddings else p['readout'])
    return _nll(logits, b['targets'], b['weights'])

  return params, loss


def reference_hat(cfg, vocab: int):
  """(params, loss_fn) of a HAT with cfg.model's shapes (query pooling)."""
  import jax
  import jax.numpy as jnp
  m = cfg.model
  de, d, bh = m.byte_d_model, m.d_model, m.byte_heads
  kb = de // bh
  key = jax.random.key(0)
  nrm = lambda i, s: 0.02 * jax.random.normal(jax.random.fold_in(key, i), s)
  params = {'embed': nrm(0, (vocab, de)),
            'enc': _init_stack(jax.random.fold_in(key, 1), m.enc_layers, de, bh, bh, kb,
                               m.byte_mlp_dim),
            'pq': nrm(2, (bh, kb)), 'pk': nrm(3, (de, de)), 'pv': nrm(4, (de, de)),
            'po': nrm(5, (de, d)), 'first': nrm(6, (d,)),
            'bb': _init_stack(jax.random.fold_in(key, 7), m.num_layers, d, m.num_heads,
                              m.num_kv_heads, m.head_dim, m.mlp_dim),
            'dec': _init_stack(jax.random.fold_in(key, 8), m.dec_layers, de, bh, bh, kb,
                               m.byte_mlp_dim, context=d),
            'head': nrm(9, (de, vocab))}

  def loss(p, b):
    h = _stack(p['enc'], p['embed'][b['inputs']], b['positions'], b['segment_ids'],
               m.byte_window, m.rope_base)
    gather = b['word_gather']
    bsz, w, l = gather.shape
    x = jnp.take_along_axis(h, jnp.maximum(gather, 0).reshape(bsz, w * l)[..., None], axis=1)
    kk = (x @ p['pk']).reshape(bsz, w, l, bh, kb)
    vv = (x @ p['pv']).reshape(bsz, w, l, bh, kb)
    s = jnp.einsum('hk,bwlhk->bwhl', p['pq'], kk) * kb ** -0.5
    s = jnp.where((gather >= 0)[:, :, None, :], s, -1e30)
    words = jnp.einsum('bwhl,bwlhk->bwhk', jax.nn.softmax(s, -1), vv).reshape(bsz, w, de)
    out = _stack(p['bb'], words @ p['po'], b['word_positions'], b['word_segment_ids'], 0,
                 m.rope_base)
    wseg = b['word_segment_ids']
    prev = jnp.concatenate([jnp.broadcast_to(p['first'], out[:, :1].shape), out[:, :-1]], 1)
    same = jnp.concatenate([jnp.zeros_like(wseg[:, :1], bool), wseg[:, 1:] == wseg[:, :-1]], 1)
    ctx = jnp.where(same[..., None], prev, p['first'])
    y = _stack(p['dec'], h, b['positions'], b['segment_ids'], m.byte_window, m.rope_base,
               context=(ctx, b['word_ids']))
    return _nll(y @ p['head'], b['targets'], b['weights'])

  return params, loss


class ReferenceSetup:
  """The reference as an object `lm_throughput.time_steps` can time (init_state,
  make_train_step): value_and_grad of the loss, optax.adamw, donated state."""

  def __init__(self, params, loss, lr: float = 1e-4):
    import optax
    self.params, self.loss, self.tx = params, loss, optax.adamw(lr)

  def init_state(self):
    return {'params': self.params, 'opt': self.tx.init(self.params)}

  def make_train_step(self):
    import jax
    import optax

    def step(state, batch):
      loss, grads = jax.value_and_grad(self.loss)(state['params'], batch)
      updates, opt = self.tx.update(grads, state['opt'], state['params'])
      return {'params': optax.apply_updates(state['params'], updates), 'opt': opt}, {
          'loss': loss}

    return jax.jit(step, donate_argnums=0)


# -- the runs ------------------------------------------------------------------------------------
def project_setup(family_file: str, preset: str, overrides: dict):
  """trainer.Setup for a family config (synthetic stand-ins where the family needs data: the
  benchmark families of benchmarks/lexinv_throughput.py and benchmarks/lcm_throughput.py)."""
  from benchmarks import aot
  from train import trainer
  if family_file == 'lexinvariant':
    from benchmarks import lexinv_throughput
    vocab = int(overrides.pop('vocab', 384))
    cfg = aot.load_config(f'configs/lexinvariant.py:{preset}', overrides)
    family = lexinv_throughput._family(cfg, vocab)  # pylint: disable=protected-access
    return trainer.Setup(cfg, family)
  if family_file == 'lcm':
    from benchmarks import lcm_throughput
    cfg = aot.load_config(f'configs/lcm.py:{preset}', overrides)
    return trainer.Setup(cfg, lcm_throughput._family(cfg))  # pylint: disable=protected-access
  return aot.make_setup(aot.load_config(f'configs/{family_file}.py:{preset}', overrides))


def synthetic_rows(setup, rows: int) -> dict:
  import numpy as np
  from benchmarks import aot, lcm_throughput
  if setup.cfg.family == 'lcm':
    return lcm_throughput.synthetic_batch(rows, setup.cfg.data.seq_len)
  one = aot.host_batch(setup, 1)
  return {k: np.repeat(x, rows, axis=0) for k, x in one.items()}


def run(spec: str, opts: dict, peak: float) -> dict:
  import jax
  from benchmarks import lm_throughput
  from train import partitioning
  family_file, preset = spec.split(':')
  overrides = {}
  if preset != 'tiny':
    overrides['train.batch_size'] = opts['small_batch']
  setup = project_setup(family_file, preset, overrides)
  rows = setup.cfg.train.batch_size
  host = synthetic_rows(setup, rows)
  runs = {'project': (setup.make_train_step(), setup.init_state(),
                      partitioning.global_batch(host, setup.mesh))}
  ref = None
  if family_file in ('byte_lm', 'subword_lm'):
    ref = reference_lm(setup.cfg, setup.family.encoder.vocab_size)
  elif family_file == 'hat':
    ref = reference_hat(setup.cfg, setup.family.encoder.vocab_size)
  if ref is not None:
    r = ReferenceSetup(*ref)
    runs['reference'] = (r.make_train_step(), r.init_state(), jax.device_put(host))
  final = {}
  times = lm_throughput.time_interleaved(runs, opts['steps'], opts['rounds'], opts['warmup'],
                                         final_states=final)
  dt = times['project'][0]
  flops = setup.flops_per_step
  out = {'run': spec, 'batch': rows, 'seq_len': setup.cfg.data.seq_len, 'gflop': flops / 1e9,
         'step_s': dt, 'step_median_s': times['project'][1], 'gflops_s': flops / dt / 1e9,
         'of_peak': flops / dt / peak}
  if ref is not None:
    out.update(ref_s=times['reference'][0], vs_ref=dt / times['reference'][0])
  if family_file in ('hat', 'subword_lm'):  # kept for the HAT / subword comparison
    out['_run'] = (runs['project'][0], final['project'], runs['project'][2], flops)
  return out


def main(argv):
  import jax
  opts = parse(argv)
  peak = matmul_peak()
  print(f'backend {jax.default_backend()} | {os.cpu_count()} CPUs | fp32 matmul peak '
        f'{peak / 1e9:.0f} GFLOP/s (best of 2048^3, 4096^3)', flush=True)
  print('| run | batch x seq | GFLOP/step | step s | GFLOP/s | of peak | reference step s | '
        'project / reference |')
  print('|---|---|---|---|---|---|---|---|')
  results = {}
  for spec in opts['runs'].split(','):
    r = run(spec, opts, peak)
    results[spec] = r
    ref = (f"{r['ref_s']:.3f} | {r['vs_ref']:.2f}x" if 'ref_s' in r else '- | -')
    print(f"| {spec} | {r['batch']} x {r['seq_len']} | {r['gflop']:.1f} | {r['step_s']:.3f} | "
          f"{r['gflops_s']:.1f} | {r['of_peak']:.1%} | {ref} |", flush=True)
  from benchmarks import lm_throughput
  for preset in ('tiny', 'small'):
    hat, sub = results.get(f'hat:{preset}'), results.get(f'subword_lm:{preset}')
    if hat and sub:  # the two steps again, in alternation, for a like-for-like ratio
      runs = {'hat': hat.pop('_run')[:3], 'subword': sub['_run'][:3]}
      t = lm_throughput.time_interleaved(runs, opts['steps'], opts['rounds'], 0)
      ratio = (hat['gflop'] / t['hat'][0]) / (sub['gflop'] / t['subword'][0])
      print(f"HAT / subword LM achieved FLOP/s at {preset}, timed in alternation: {ratio:.2f}x "
            f"(HAT {hat['gflop'] / t['hat'][0]:.1f}, subword {sub['gflop'] / t['subword'][0]:.1f}"
            f" GFLOP/s)", flush=True)
    for r in (hat, sub):
      if r:
        r.pop('_run', None)
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
