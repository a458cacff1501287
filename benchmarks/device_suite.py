"""Every accelerator figure in one command: run it once on a GPU or TPU (about 8 minutes on one
chip), or with --dry at tiny shapes on any CPU (a test: tests/test_device_suite.py).

  python benchmarks/device_suite.py [--dry] [--out=runs/device_suite] [--only=lm_mfu,...]
      [--budget_s=480] [--peak_tflops=0]

Items (in this order; one that fails is recorded with its error and the suite goes on; once
--budget_s seconds have passed the remaining items are skipped and marked so, as are items left
out by --only):
  attention       the attention kernel `model.attention_impl='auto'` picks here against XLA's:
                  forward + backward ms at B16 x T4096 x 8 heads x 64, causal, causal + 512
                  window, packed documents; the same outputs (max abs difference vs XLA in the
                  compute dtype), for cuDNN also through its dense-mask fallback
  lm_mfu          subword LM (32k vocabulary) step time and MFU at small / 350m / 1b (one chip:
                  batch 64 / 32 / 16 rows; remat and layer scan for 350m and 1b)
  hat_vs_subword  HAT / subword training bytes/s at small and 1b (the presets match per-byte
                  FLOPs through the shared backbone sizes; subword bytes per token measured with
                  the real 32k tokenizer on the validation text)
  hat_generation  HAT cached generation (three KV caches, one jitted loop, teacher-forced on
                  English text) / byte-LM KV-cache generation, bytes/s, preset small
  lexinv          lexinvariant / standard LM step time at a 32k vocabulary (150m_bpe32k)
  zett            ZeTT hypernetwork (SmolLM2-135M-shaped frozen base, random weights): time to
                  embed a 32k vocabulary, and one training step (hypernetwork gradients through
                  the frozen LM on 32 x 512 tokens)
  lcm             LCM small (Base and Two-Tower) sentences/s and MFU
  compare         HAT vs byte LM vs subword LM at small for the same training-FLOP budget on
                  the embedded corpus: validation bits per byte and ALL-CAPS bits per byte
  hat_pretrained  the HAT built on SmolLM2-135M (configs/hat.py:from_smollm2) at batch 32 x 2048
                  bytes: conversion seconds, stage 1 (backbone frozen) and stage 2 step time,
                  bytes/s and MFU, validation bits per byte at step 0 / after stage 1 / at the
                  end (each stage at most 80 s)
  lm_eval         lm-eval requests/s on SmolLM2-135M (benchmarks/lm_eval_bench.py speed): the
                  200 requests of 50 notoklm_mc items batched against one at a time, token-level
                  against exact byte-level, distinct compiled shapes, the XLA programs each
                  path builds (dry: 2 items)
Throughput items run the trainer's own step (`trainer.Setup.make_train_step`) on synthetic full
rows, timed by `lm_throughput.time_steps` after compilation; MFU = training FLOPs per step (the
families' MaxText-convention accounting) / step time / peak, where peak is --peak_tflops or the
chip's dense bf16 peak from PEAK_TFLOPS (on CPU: the measured fp32 matmul rate). Subword presets
use their vocabulary size without a tokenizer where only shapes matter (benchmarks/aot.py).
Writes OUT/device_suite.json (every figure) and OUT/device_suite.md (the tables).

--dry: every item at tiny shapes (tiny presets, 2 rows, a few steps, small vocabularies where
the item's point survives) on whatever backend JAX has: about 2 minutes on a 2-core CPU (with
XLA_FLAGS=--xla_backend_optimization_level=0, which the test uses: compilation dominates). Run
it before spending device time. tests/test_device_suite.py runs the command end to end on a
subset of the items (--only) to stay within a test's budget.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ITEMS = ('attention', 'lm_mfu', 'hat_vs_subword', 'hat_generation', 'lexinv', 'zett', 'lcm',
         'compare', 'hat_pretrained', 'lm_eval')
# dense bf16 peak TFLOP/s per chip, by jax device_kind prefix
PEAK_TFLOPS = {'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA H800': 989.0,
               'NVIDIA A100': 312.0, 'NVIDIA L4': 121.0, 'NVIDIA B200': 2250.0,
               'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0,
               'TPU v5': 459.0, 'TPU v6 lite': 918.0, 'TPU v6e': 918.0}
NOMINAL_BYTES_PER_TOKEN = 4.0


def parse(argv):
  opts = {'dry': False, 'out': 'runs/device_suite', 'only': '', 'budget_s': 480.0,
          'peak_tflops': 0.0, 'steps': 0}
  for a in argv:
    k, eq, v = a.lstrip('-').partition('=')
    if k == 'dry' and not eq:
      opts['dry'] = True
    elif k in opts:
      opts[k] = (v.lower() in ('1', 'true', 'yes')) if isinstance(opts[k], bool) else type(
          opts[k])(v)
    else:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
  return opts


class Suite:
  """Run context: dry or not, the peak, the results, shared measurements between items."""

  def __init__(self, opts):
    import jax
    self.opts, self.dry = opts, opts['dry']
    self.backend = jax.default_backend()
    self.device = jax.devices()[0].device_kind
    self.steps = opts['steps'] or (2 if self.dry else 8)
    self.results: dict = {}
    self.shared: dict = {}
    self.t0 = time.perf_counter()
    self.peak, self.peak_source = self._peak(opts['peak_tflops'])

  def _peak(self, given):
    if given:
      return given * 1e12, '--peak_tflops'
    for prefix, tf in PEAK_TFLOPS.items():
      if self.device.startswith(prefix):
        return tf * 1e12, f'{prefix} dense bf16'
    from benchmarks import cpu_efficiency
    sizes = (512,) if self.dry else (2048, 4096)
    return cpu_efficiency.matmul_peak(sizes, repeats=2), 'measured fp32 matmul'

  def elapsed(self):
    return time.perf_counter() - self.t0

  def mfu(self, flops_per_s):
    return flops_per_s / self.peak


# -- helpers -------------------------------------------------------------------------------------
def _setup(spec: str, overrides: dict):
  from benchmarks import aot
  return aot.make_setup(aot.load_config(spec, overrides))


def _step_time(suite, setup, rows: int | None = None):
  """(seconds per step, compile seconds) of the trainer's step on synthetic full rows."""
  import numpy as np
  from benchmarks import aot, lm_throughput
  from train import partitioning
  rows = rows or setup.cfg.train.batch_size
  one = aot.host_batch(setup, 1)
  host = {k: np.repeat(x, rows, axis=0) for k, x in one.items()}
  batch = partitioning.global_batch(host, setup.mesh)
  compile_s, dt, _ = lm_throughput.time_steps(setup, batch, suite.steps, 1)
  return dt, compile_s


def _english_text(n: int) -> bytes:
  """English prose from the standard library's docstrings (no dataset needed)."""
  import argparse
  import collections
  import json as json_mod
  import re
  import string
  import textwrap
  out = b''
  for mod in (json_mod, re, argparse, collections, string, textwrap):
    for name in sorted(dir(mod)):
      doc = getattr(getattr(mod, name), '__doc__', None)
      if isinstance(doc, str) and len(doc) > 200:
        out += doc.encode('utf-8') + b'\n'
      if len(out) >= n:
        return out[:n]
  return (out * (n // max(len(out), 1) + 1))[:n]


# -- items ---------------------------------------------------------------------------------------
def item_attention(suite):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import attention as attn_bench
  from models import layers
  dtype = jnp.float32 if suite.backend == 'cpu' else jnp.bfloat16
  auto = layers.resolve_attention_impl('auto', window=0, seq_len=4096, dtype=dtype, head_dim=64)
  impls = ['xla'] + ([auto] if auto != 'xla' else [])
  b, t = (2, 256) if suite.dry else (16, 4096)
  window = 64 if suite.dry else 512
  rows = []
  for name, win in (('causal', 0), (f'causal + window {window}', window)):
    for impl in impls + (['blocked'] if 'blocked' not in impls and suite.backend == 'cpu' else []):
      cfg = layers.AttentionConfig(impl=impl)
      ms, temp = attn_bench.time_impl((b, t, 8, 8, 64, win), impl, dtype, 3 if suite.dry else 10,
                                      config=cfg)
      rows.append({'case': f'{name}, 2 documents', 'impl': impl, 'ms': ms,
                   'temp_MB': temp / 2 ** 20})
  # exactness against XLA in the compute dtype: GQA, window, documents + padding
  ks = jax.random.split(jax.random.key(0), 3)
  tt = 256
  q = jax.random.normal(ks[0], (2, tt, 8, 64), dtype)
  k = jax.random.normal(ks[1], (2, tt, 4, 64), dtype)
  v = jax.random.normal(ks[2], (2, tt, 4, 64), dtype)
  seg = jnp.asarray(np.stack([np.r_[np.full(100, 1), np.full(120, 2), np.zeros(36)],
                              np.full(tt, 3)]).astype(np.int32))
  checks = []
  configs = [layers.AttentionConfig(impl=i) for i in impls if i != 'xla']
  if auto == 'cudnn':  # the dense-mask branch: more documents than max_segments
    configs.append(layers.AttentionConfig(impl='cudnn', max_segments=1))
  if suite.backend == 'cpu' and 'blocked' not in impls:
    configs.append(layers.AttentionConfig(impl='blocked'))
  for cfg in configs:
    for win in (0, 48):
      f = jax.jit(lambda q, k, v, s, cfg=cfg, win=win: (
          layers.attend(q, k, v, s, window=win, config=cfg),
          layers.attend(q, k, v, s, window=win, config='xla')))
      got, want = f(q, k, v, seg)
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      checks.append({'impl': cfg.impl, 'max_segments': cfg.max_segments, 'window': win,
                     'max_abs_diff_vs_xla': err})
  md = ['| case | impl | ms (fwd + bwd) | temp MB |', '|---|---|---|---|']
  md += [f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | {r['temp_MB']:.0f} |" for r in rows]
  md += ['', '| impl | window | max abs diff vs xla |', '|---|---|---|']
  md += [f"| {c['impl']}" + (' (dense-mask branch)' if c['max_segments'] == 1 else '') +
         f" | {c['window']} | {c['max_abs_diff_vs_xla']:.2e} |" for c in checks]
  return {'auto': auto, 'dtype': jnp.dtype(dtype).name, 'shape': [b, t, 8, 64], 'rows': rows,
          'checks': checks}, md


LM_PRESETS = {'small': {'train.batch_size': 64},
              '350m': {'train.batch_size': 32, 'model.scan_layers': True},
              '1b': {'train.batch_size': 16}}


def _lm_row(suite, preset):
  """Subword LM step figures at `preset` (cached: hat_vs_subword reuses them)."""
  key = ('lm', preset)
  if key not in suite.shared:
    real = 'tiny' if suite.dry else preset
    ov = {'train.batch_size': 2} if suite.dry else dict(LM_PRESETS[preset])
    setup = _setup(f'configs/subword_lm.py:{real}', ov)
    dt, compile_s = _step_time(suite, setup)
    b, t = setup.cfg.train.batch_size, setup.cfg.data.seq_len
    suite.shared[key] = {'preset': real, 'batch': b, 'seq_len': t, 'step_s': dt,
                         'compile_s': compile_s, 'tokens_per_s': b * t / dt,
                         'tflops_per_s': setup.flops_per_step / dt / 1e12,
                         'mfu': suite.mfu(setup.flops_per_step / dt),
                         'params_M': setup.n_params / 1e6}
  return suite.shared[key]


def item_lm_mfu(suite):
  presets = ('small',) if suite.dry else ('small', '350m', '1b')
  rows = {p: _lm_row(suite, p) for p in presets}
  md = ['| preset | params (M) | batch x seq | step s | tokens/s | TFLOP/s | MFU |',
        '|---|---|---|---|---|---|---|']
  md += [f"| {r['preset']} | {r['params_M']:.0f} | {r['batch']} x {r['seq_len']} | "
         f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | "
         f"{r['mfu']:.1%} |" for r in rows.values()]
  return rows, md


HAT_BATCH = {'small': 16, '1b': 4}


def _subword_bytes_per_token(suite) -> tuple[float, str]:
  """UTF-8 bytes per token of the subword presets' 32k BPE on validation text."""
  if suite.dry:
    return NOMINAL_BYTES_PER_TOKEN, 'nominal (dry run)'
  try:
    from benchmarks import aot
    from data import corpus, encoders
    cfg = aot.load_config('configs/subword_lm.py:small')
    enc = encoders.get_encoder(cfg.data)
    n_bytes = n_tokens = 0
    for i, doc in enumerate(corpus.get_source(cfg.data, 'validation')):
      n_bytes += len(doc.encode('utf-8'))
      n_tokens += len(enc.encode(doc))
      if i >= 200:
        break
    return n_bytes / n_tokens, f'measured ({n_tokens} validation tokens)'
  except Exception as e:  # pylint: disable=broad-except
    return NOMINAL_BYTES_PER_TOKEN, f'nominal ({type(e).__name__}: {e})'


def item_hat_vs_subword(suite):
  bpt, bpt_source = _subword_bytes_per_token(suite)
  rows = {}
  for preset in (('small',) if suite.dry else ('small', '1b')):
    real = 'tiny' if suite.dry else preset
    setup = _setup(f'configs/hat.py:{real}',
                   {'train.batch_size': 2 if suite.dry else HAT_BATCH[preset]})
    dt, _ = _step_time(suite, setup)
    b, t = setup.cfg.train.batch_size, setup.cfg.data.seq_len
    lm = _lm_row(suite, preset)
    hat_bps = b * t / dt
    lm_bps = lm['tokens_per_s'] * bpt
    rows[preset] = {'preset': real, 'hat_batch': b, 'hat_bytes_per_row': t, 'hat_step_s': dt,
                    'hat_bytes_per_s': hat_bps, 'hat_mfu': suite.mfu(setup.flops_per_step / dt),
                    'subword_bytes_per_s': lm_bps, 'subword_mfu': lm['mfu'],
                    'ratio': hat_bps / lm_bps}
  md = [f'subword bytes per token: {bpt:.2f} ({bpt_source})', '',
        '| preset | HAT bytes/s | HAT MFU | subword bytes/s | subword MFU | HAT / subword |',
        '|---|---|---|---|---|---|']
  md += [f"| {r['preset']} | {r['hat_bytes_per_s']:.0f} | {r['hat_mfu']:.1%} | "
         f"{r['subword_bytes_per_s']:.0f} | {r['subword_mfu']:.1%} | {r['ratio']:.2f}x |"
         for r in rows.values()]
  return {'bytes_per_token': bpt, 'bytes_per_token_source': bpt_source, 'rows': rows}, md


def item_hat_generation(suite):
  from benchmarks import hat_throughput
  preset = 'tiny' if suite.dry else 'small'
  opts = {'preset': preset, 'compare_workdir': '', 'new_bytes': 48 if suite.dry else 400,
          'prompt': 'The following section describes '}
  text = _english_text(4096)
  out = {}
  for name in ('hat', 'byte_lm'):
    setup, state = hat_throughput._setup(name, opts)  # pylint: disable=protected-access
    rate, n, words, _ = hat_throughput.gen_rate(name, setup, state, opts, text=text)
    out[name] = {'bytes_per_s': rate, 'bytes': n, 'words': words}
  out['ratio'] = out['hat']['bytes_per_s'] / out['byte_lm']['bytes_per_s']
  md = ['| model | generated bytes | words | bytes/s |', '|---|---|---|---|',
        f"| HAT {preset} | {out['hat']['bytes']} | {out['hat']['words']} | "
        f"{out['hat']['bytes_per_s']:.1f} |",
        f"| byte LM {preset} | {out['byte_lm']['bytes']} | - | "
        f"{out['byte_lm']['bytes_per_s']:.1f} |",
        '', f"HAT / byte LM generation bytes/s: {out['ratio']:.2f}x"]
  return out, md


def item_lexinv(suite):
  from benchmarks import aot, lexinv_throughput
  vocab = 4096 if suite.dry else 32768
  preset = 'tiny' if suite.dry else '150m_bpe32k'
  rows = {}
  for name, p in (('standard', preset + '_lm'), ('lexinvariant', preset)):
    ov = {'train.batch_size': 2, 'model.num_layers': 1} if suite.dry else {}
    cfg = aot.load_config(f'configs/lexinvariant.py:{p}', ov)
    rows[name] = lexinv_throughput.bench(cfg, suite.steps, 1, vocab)
  ratio = rows['lexinvariant']['step_ms'] / rows['standard']['step_ms']
  md = ['| model | step ms | tokens/s |', '|---|---|---|']
  md += [f"| {k} ({preset}, vocab {vocab}) | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} |"
         for k, r in rows.items()]
  md += ['', f'lexinvariant / standard step time: {ratio:.3f}']
  return {'preset': preset, 'vocab': vocab, 'rows': rows, 'ratio': ratio}, md


def item_zett(suite):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from benchmarks import cpu_efficiency, lm_throughput
  from models import hypernet, token_lm
  dry = suite.dry
  c_lm = token_lm.default_model_config()
  if dry:
    base_vocab, new_vocab, b, t = 1024, 512, 2, 32
    c_lm.d_model, c_lm.num_layers, c_lm.num_heads, c_lm.num_kv_heads = 64, 2, 4, 2
    c_lm.head_dim, c_lm.mlp_dim = 16, 128
  else:  # SmolLM2-135M's shape
    base_vocab, new_vocab, b, t = 49152, 32768, 32, 512
    c_lm.d_model, c_lm.num_layers, c_lm.num_heads, c_lm.num_kv_heads = 576, 30, 9, 3
    c_lm.head_dim, c_lm.mlp_dim, c_lm.rope_base = 64, 1536, 1e5
  c_hyper = hypernet.default_config()
  if dry:
    c_hyper.d_model, c_hyper.num_layers, c_hyper.mlp_dim = 64, 1, 128
  from train import families
  dtype = families.compute_dtype(_setup_cfg_dtype())
  rng = np.random.default_rng(0)
  base_in = (0.02 * rng.standard_normal((base_vocab, c_lm.d_model))).astype(np.float32)
  model = hypernet.ZettModel(c_hyper, c_lm, base_vocab, base_in, None, dtype, rngs=nnx.Rngs(0))
  p = c_hyper.max_pieces
  pieces = rng.integers(0, base_vocab, (new_vocab, p)).astype(np.int32)
  pieces[:, 1:] = np.where(rng.random((new_vocab, p - 1)) < 0.5, -1, pieces[:, 1:])
  pieces = jnp.asarray(pieces)
  graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains('hypernet')),
                                     ...)
  embed = jax.jit(lambda params, rest, pieces: nnx.merge(graphdef, params, rest).hypernet(pieces))
  jax.block_until_ready(embed(params, rest, pieces))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(embed(params, rest, pieces))
    times.append(time.perf_counter() - t0)
  embed_s = float(np.median(times))
  tokens = rng.integers(0, new_vocab, (b, t + 1)).astype(np.int32)
  batch = {'phase': np.zeros(b, np.float32), 'warm_ids': np.arange(64, dtype=np.int32),
           'warm_pieces': np.asarray(pieces[:64]), 'vocab_pieces': np.asarray(pieces),
           'vocab_shared': np.where(rng.random(new_vocab) < 0.3,
                                    rng.integers(0, base_vocab, new_vocab), -1).astype(np.int32),
           'vocab_keep': np.zeros(new_vocab, np.int32), 'inputs': tokens[:, :-1],
           'targets': tokens[:, 1:], 'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           'segment_ids': np.ones((b, t), np.int32), 'weights': np.ones((b, t), np.float32),
           'target_bytes': np.full((b, t), 4, np.int32)}
  loss = lambda params, batch: hypernet.zett_loss(nnx.merge(graphdef, params, rest), batch,
                                                  0.5)[0]
  ref = cpu_efficiency.ReferenceSetup(params, loss)  # value_and_grad + AdamW, donated state
  _, step_s, _ = lm_throughput.time_steps(ref, jax.device_put(batch), suite.steps, 1)
  out = {'base_vocab': base_vocab, 'new_vocab': new_vocab, 'embed_s': embed_s,
         'train_step_s': step_s, 'batch': [b, t]}
  md = ['| ZeTT hypernetwork | seconds |', '|---|---|',
        f'| embed a {new_vocab}-token vocabulary (device) | {embed_s:.3f} |',
        f'| training step ({b} x {t} tokens, base vocab {base_vocab}) | {step_s:.3f} |']
  return out, md


def _setup_cfg_dtype():
  """A config whose train.compute_dtype is 'auto' (bf16 on GPU/TPU, fp32 on CPU)."""
  from configs import base
  return base.get_config()


def item_lcm(suite):
  from benchmarks import aot, lcm_throughput, lm_throughput
  from train import partitioning, trainer
  preset = 'tiny' if suite.dry else 'small'
  rows = {}
  for variant in ('base', 'two_tower'):
    ov = {'model.variant': variant}
    if suite.dry:
      ov.update({'train.batch_size': 2, 'model.num_layers': 1, 'model.denoiser_layers': 1})
    cfg = aot.load_config(f'configs/lcm.py:{preset}', ov)
    setup = trainer.Setup(cfg, lcm_throughput._family(cfg))  # pylint: disable=protected-access
    b, s = setup.cfg.train.batch_size, setup.cfg.data.seq_len
    batch = partitioning.global_batch(lcm_throughput.synthetic_batch(b, s), setup.mesh)
    _, dt, _ = lm_throughput.time_steps(setup, batch, suite.steps, 1)
    rows[variant] = {'batch': b, 'sentences_per_row': s, 'step_s': dt,
                     'sentences_per_s': b * s / dt, 'mfu': suite.mfu(setup.flops_per_step / dt)}
  md = ['| LCM ' + preset + ' | sentences/s | MFU |', '|---|---|---|']
  md += [f"| {k} | {r['sentences_per_s']:.0f} | {r['mfu']:.1%} |" for k, r in rows.items()]
  return rows, md


COMPARE_BATCH = {'hat': 16, 'byte_lm': 64, 'subword_lm': 64}


def item_compare(suite):
  """Matched training FLOPs on the embedded corpus; bits per byte clean and in ALL CAPS."""
  from benchmarks import aot
  from train import trainer
  preset = 'tiny' if suite.dry else 'small'
  remaining = suite.opts['budget_s'] - suite.elapsed()
  # FLOPs per model: ~25 s of training at 35 % MFU on this chip (fewer if the budget is short)
  seconds = max(5.0, min(25.0, remaining / 3 - 40))
  budget = 0.0 if suite.dry else 0.35 * suite.peak * seconds
  out = {}
  for name in ('hat', 'byte_lm', 'subword_lm'):
    wd = os.path.join(suite.opts['out'], 'compare', name)
    if os.path.isdir(wd):
      import shutil
      shutil.rmtree(wd)
    ov = {'train.eval_every': 0, 'ckpt.every': 1_000_000, 'ckpt.async_save': False,
          'eval.robustness': 'caps', 'sample.max_new_tokens': 0,
          'train.log_every': 1_000_000}
    if suite.dry:
      ov.update({'train.steps': 2, 'train.batch_size': 2, 'train.eval_batches': 1,
                 'optim.warmup_steps': 1})
    else:
      ov.update({'train.flops_budget': budget, 'train.batch_size': COMPARE_BATCH[name],
                 'train.eval_batches': 16, 'optim.warmup_steps': 50})
    cfg = aot.load_config(f'configs/{name}.py:{preset}', ov)
    summary = trainer.train(cfg, wd)
    ev = trainer.evaluate(cfg, wd)
    caps = ev.get('robustness', {}).get('caps', {}).get('bpb')
    out[name] = {'steps': summary['step'], 'train_flops': summary['train_flops'],
                 'train_s': summary['train_seconds'], 'bpb': ev.get('bpb'), 'caps_bpb': caps,
                 'caps_ratio': caps / ev['bpb'] if caps and ev.get('bpb') else None}
  md = [f'preset {preset}' + ('' if suite.dry else f', {budget:.3g} training FLOPs per model'),
        '', '| model | steps | training FLOPs | train s | bits per byte | ALL CAPS bpb | '
        'caps / clean |', '|---|---|---|---|---|---|---|']
  for k, r in out.items():
    md.append(f"| {k} | {r['steps']} | {r['train_flops']:.3g} | {r['train_s']:.0f} | "
              f"{r['bpb']:.4f} | "
              f"{r['caps_bpb']:.4f} | {r['caps_ratio']:.3f}x |")
  return out, md


# the dry run's shapes: those of tests/test_hat_from_pretrained.py (compiled steps shared)
HAT_PRETRAINED_DRY = {
    'model.d_model': 32, 'model.byte_d_model': 16, 'model.byte_heads': 2,
    'model.byte_mlp_dim': 32, 'model.enc_layers': 1, 'model.dec_layers': 1, 'data.seq_len': 64,
    'data.max_words': 16, 'data.max_docs': 200, 'train.batch_size': 4, 'train.steps': 6,
    'optim.stages.freeze_steps': 3, 'optim.stages.warmup_steps': 1}
HAT_PRETRAINED = {'batch': 32, 'seq_len': 2048, 'max_words': 512, 'freeze_steps': 100,
                  'steps': 200, 'stage_s': 80.0}


def _tiny_llama(directory: str, seed: int = 0, d: int = 32) -> str:
  """A tiny random Llama-family LM in HF format (byte-level tokenizer, no merges; also the
  tests' pretrained model, tests/test_hat_from_pretrained.py)."""
  from flax import nnx
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from models import pretrained, token_lm
  vocab = {c: i for i, c in enumerate(['<|endoftext|>'] + sorted(set(
      pre_tokenizers.ByteLevel.alphabet())))}
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  c = token_lm.default_model_config()
  c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = (
      d, 2, 4, 2, d // 4, 2 * d)
  c.norm_eps, c.rope_base, c.tie_embeddings = 1e-5, 5e4, True
  model = token_lm.TokenLM(c, len(vocab), rngs=nnx.Rngs(seed))
  return pretrained.save_hf(model, c, tok, directory, eos_id=0)


def item_hat_pretrained(suite):
  """The HAT conversion of SmolLM2-135M (configs/hat.py:from_smollm2) at a real batch: the
  conversion itself, then stage 1 (backbone frozen, auxiliary loss) and stage 2 (everything,
  the backbone at a lower rate) on the embedded corpus, each for up to `stage_s` seconds;
  validation bits per byte at step 0, after stage 1 and at the end."""
  import jax
  import numpy as np
  from benchmarks import aot
  from train import partitioning, trainer
  dry, p = suite.dry, HAT_PRETRAINED
  ov = {'train.eval_batches': 1 if dry else 8, 'ckpt.async_save': False}
  if dry:
    path = _tiny_llama(os.path.join(suite.opts['out'], 'hat_pretrained_lm'))
    ov.update({**HAT_PRETRAINED_DRY, 'pretrained.path': path})
    stage_s = float('inf')  # the few steps, whatever the CPU's load
  else:
    ov.update({'train.batch_size': p['batch'], 'data.seq_len': p['seq_len'],
               'data.max_words': p['max_words'], 'train.steps': p['steps'],
               'optim.stages.freeze_steps': p['freeze_steps']})
    stage_s = p['stage_s']
  cfg = aot.load_config('configs/hat.py:from_smollm2', ov)
  t0 = time.perf_counter()
  setup = trainer.Setup(cfg)
  state = setup.init_state()
  jax.block_until_ready(state)
  convert_s = time.perf_counter() - t0
  fam, freeze, total = setup.family, int(cfg.optim.stages.freeze_steps), int(cfg.train.steps)
  val = fam.eval_batches(0, 1, int(cfg.train.eval_batches))
  bpb = {'step0': setup.evaluate(state['params'], val)['bpb']}
  it = fam.train_iterator(0, 1)
  step = setup.make_train_step()
  b, t = cfg.train.batch_size, cfg.data.seq_len
  rows, compile_s, n = {}, 0.0, 0
  for stage, end in (('stage1', freeze), ('stage2', total)):
    times, losses, started = [], [], time.perf_counter()
    while n < end and time.perf_counter() - started < stage_s:
      batch = partitioning.global_batch(next(it), setup.mesh)
      s0 = time.perf_counter()
      state, m = step(state, batch)
      losses.append(float(m['loss_mean']))  # blocks: the step's own time
      times.append(time.perf_counter() - s0)
      n += 1
    if n == 1 or (stage == 'stage1' and times):
      compile_s = max(compile_s, times[0])
    steady = times[1:] if stage == 'stage1' and len(times) > 1 else times
    dt = float(np.median(steady)) if steady else float('nan')
    rows[stage] = {'steps': len(times), 'step_s': dt, 'bytes_per_s': b * t / dt,
                   'mfu': suite.mfu(setup.flops_per_step / dt), 'first_loss': losses[:1],
                   'last_loss': losses[-1:]}
    bpb['after_' + stage] = setup.evaluate(state['params'], val)['bpb']
    if n < end:  # out of time: stage 2 starts only after stage 1's steps
      break
  it.close()
  out = {'source': fam.source, 'params_M': setup.n_params / 1e6, 'batch': [b, t],
         'convert_s': convert_s, 'compile_s': compile_s, 'stages': rows, 'bpb': bpb,
         'steps_done': n}
  md = [f'backbone {os.path.basename(fam.source)}, {setup.n_params / 1e6:.1f}M parameters, '
        f'batch {b} x {t} bytes; conversion {convert_s:.1f} s, first step (compile) '
        f'{compile_s:.1f} s', '',
        '| stage | steps | step s | bytes/s | MFU |', '|---|---|---|---|---|']
  md += [f"| {k} | {r['steps']} | {r['step_s']:.3f} | {r['bytes_per_s']:.0f} | "
         f"{r['mfu']:.1%} |" for k, r in rows.items()]
  md += ['', '| validation bits per byte | ' + ' | '.join(bpb) + ' |',
         '|---|' + '---|' * len(bpb), '| | ' + ' | '.join(f'{v:.4f}' for v in bpb.values())
         + ' |']
  return out, md


def item_lm_eval(suite):
  from benchmarks import lm_eval_bench
  cfg, (tok, byt) = lm_eval_bench.lms('pretrained:smollm2', 16)
  return lm_eval_bench.speed(cfg, tok, byt, 2 if suite.dry else 50)


# -- main ----------------------------------------------------------------------------------------
def main(argv):
  opts = parse(argv)
  import jax
  suite = Suite(opts)
  only = [x for x in opts['only'].split(',') if x]
  for x in only:
    if x not in ITEMS:
      raise SystemExit(f'unknown item {x!r}; items: {", ".join(ITEMS)}')
  os.makedirs(opts['out'], exist_ok=True)
  header = (f"backend {suite.backend} ({suite.device}) x {jax.device_count()} | peak "
            f"{suite.peak / 1e12:.3g} TFLOP/s ({suite.peak_source})" +
            (' | DRY RUN (tiny shapes)' if suite.dry else ''))
  print(header, flush=True)
  md = ['# Device suite', '', header, '']
  for name in ITEMS:
    if only and name not in only:
      suite.results[name] = {'skipped': 'not selected (--only)'}
      md += [f'## {name}', '', 'not run (not in --only)', '']
      continue
    if suite.elapsed() > opts['budget_s']:
      suite.results[name] = {'skipped': f'time budget of {opts["budget_s"]:.0f} s spent'}
      md += [f'## {name}', '', 'skipped (time budget spent)', '']
      print(f'[{name}] skipped: time budget spent', flush=True)
      continue
    t0 = time.perf_counter()
    try:
      result, lines = globals()[f'item_{name}'](suite)
      suite.results[name] = {'seconds': time.perf_counter() - t0, 'result': result}
      md += [f'## {name} ({time.perf_counter() - t0:.0f} s)', ''] + lines + ['']
      print(f'[{name}] {time.perf_counter() - t0:.1f} s\n' + '\n'.join(lines), flush=True)
    except Exception as e:  # pylint: disable=broad-except
      tb = traceback.format_exc()
      suite.results[name] = {'seconds': time.perf_counter() - t0,
                             'error': f'{type(e).__name__}: {e}', 'traceback': tb[-4000:]}
      md += [f'## {name}', '', f'FAILED: {type(e).__name__}: {e}', '']
      print(f'[{name}] FAILED after {time.perf_counter() - t0:.1f} s\n{tb}', flush=True)
  total = suite.elapsed()
  md.append(f'total {total:.0f} s')
  report = {'backend': suite.backend, 'device': suite.device, 'devices': jax.device_count(),
            'peak_flops': suite.peak, 'peak_source': suite.peak_source, 'dry': suite.dry,
            'total_s': total, 'items': suite.results}
  with open(os.path.join(opts['out'], 'device_suite.json'), 'w') as f:
    json.dump(report, f, indent=2, default=float)
  with open(os.path.join(opts['out'], 'device_suite.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
  print(f'total {total:.0f} s -> {opts["out"]}/device_suite.json, device_suite.md', flush=True)
  return report


if __name__ == '__main__':
  main(sys.argv[1:])
