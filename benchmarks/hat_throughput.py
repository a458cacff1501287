"""HAT throughput against the baselines, measured side by side in one process.

  python benchmarks/hat_throughput.py [--preset=tiny] [--steps=10] [--new_bytes=200] \
      [--compare_workdir=runs/compare]

Training: bytes/s of an optimizer step for HAT, the byte LM and the subword LM (configs
hat/byte_lm/subword_lm at --preset), on real packed batches prepared beforehand (data loading
excluded), after compilation. Bytes per step = UTF-8 bytes of the targets in the batch.
Generation: bytes/s of HAT's cached word-by-word generation (three KV caches, one jitted loop)
against the byte LM's KV-cache generation, `--new_bytes` bytes after the same prompt, after a
warm-up call. HAT's loop emits validation text (teacher forcing), so its words have real
lengths -- a backbone step per real word -- whatever the weights; the byte LM's cost per byte
does not depend on what it emits. --steps=0 skips the training measurement (e.g. generation
only at --preset=small on a CPU). With --compare_workdir (a finished `configs/compare.py`
sweep) the trained checkpoints are used; else random initialization.
Prints a table and the two ratios the HAT issue asks for.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def parse(argv):
  opts = {'preset': 'tiny', 'steps': 10, 'new_bytes': 200, 'compare_workdir': '',
          'prompt': 'def main(argv):\n    '}
  opts = cli.parse_opts(argv, opts, __doc__)
  return opts


def _setup(name, opts):
  """(setup, state): the trained run `compare_workdir/name` if it exists, else a fresh model."""
  from train import config_lib, runs, trainer
  wd = os.path.join(opts['compare_workdir'], name) if opts['compare_workdir'] else ''
  if wd and os.path.isdir(os.path.join(wd, 'checkpoints')):
    run = runs.load_run(wd)
    return run.setup, run.state
  cfg, _ = config_lib.load(f'configs/{name}.py:{opts["preset"]}')
  setup = trainer.Setup(cfg)
  return setup, setup.init_state()


def train_rate(setup, state, steps):
  import jax
  from train import partitioning
  it = setup.family.train_iterator(0, 1)
  local = [next(it) for _ in range(steps + 2)]
  it.close()
  nbytes = [float(b['target_bytes'].sum()) for b in local]
  batches = [partitioning.global_batch(b, setup.mesh) for b in local]
  step = setup.make_train_step()
  for b in batches[:2]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[2:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  return sum(nbytes[2:]) / dt, dt / steps


def real_text(setup, n_bytes):
  """`n_bytes` of validation text (documents joined), for realistic word lengths."""
  from data import corpus
  src = corpus.get_source(setup.cfg.data, 'validation')
  out = b''
  for doc in src:
    out += doc.encode() + b'\n'
    if len(out) >= n_bytes:
      break
  return out[:n_bytes].decode('utf-8', 'ignore').encode()


def gen_rate(name, setup, state, opts, text: bytes | None = None):
  """(bytes/s, bytes, words or None, text). HAT emits validation text (or `text`) through its
  generation loop (teacher forcing: the same per-byte work, sampling included, and real word
  lengths, which a random or tiny model's free text would not have); the byte LM's cost does
  not depend on the text it emits. Both: one warm-up call (compiles), then one timed call."""
  import jax
  import numpy as np
  from models import hat, token_lm
  fam = setup.family
  model = setup.model(state['params'])
  enc = fam.encoder
  prompt = [enc.bos_id] + list(enc.encode(opts['prompt']))
  n = opts['new_bytes']
  if name == 'hat':
    forced = [int(b) + enc.OFFSET for b in (text[:n] if text else real_text(setup, n))]
    n = len(forced)
    run = lambda: hat.generate(model, prompt, fam.splitter, n, forced=forced,
                               max_word_bytes=setup.cfg.data.max_word_bytes)
  else:
    ids = np.asarray(prompt, np.int32)[None]
    run = lambda: np.asarray(token_lm.generate(model, ids, n, rng=jax.random.key(0)))[0].tolist()
  run()
  t0 = time.perf_counter()
  out = run()
  dt = time.perf_counter() - t0
  n_words = None
  if name == 'hat':
    lw = setup.cfg.data.max_word_bytes
    n_words = (len(hat.host_word_starts(fam.splitter, lw, prompt + out))
               - len(hat.host_word_starts(fam.splitter, lw, prompt)))
  return len(out) / dt, len(out), n_words, enc.decode(np.asarray(out))


def main(argv):
  import jax
  opts = parse(argv)
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}) | preset '
        f'{opts["preset"]} | checkpoints: {opts["compare_workdir"] or "random init"}', flush=True)
  rows = {}
  for name in ('hat', 'byte_lm', 'subword_lm'):
    setup, state = _setup(name, opts)
    row = {'flops_per_step': setup.flops_per_step}
    if name in ('hat', 'byte_lm'):  # before training: the train step donates `state`
      g, n, n_words, text = gen_rate(name, setup, state, opts)
      row.update(gen_bytes_per_s=g, gen_bytes=n, gen_words=n_words)
      print(f'--- {name} generated: {text[:120]!r}', flush=True)
    if opts['steps'] > 0:
      rate, step_s = train_rate(setup, state, opts['steps'])
      row.update(train_bytes_per_s=rate, step_ms=step_s * 1e3)
    rows[name] = row
  print('| model | step ms | train bytes/s | GFLOP/step | generation bytes/s |')
  print('|---|---|---|---|---|')
  for name, r in rows.items():
    gen = '-'
    if 'gen_bytes_per_s' in r:
      gen = f"{r['gen_bytes_per_s']:.1f} ({r['gen_bytes']} B"
      gen += f", {r['gen_words']} words)" if r['gen_words'] else ')'
    train = (f"{r['step_ms']:.1f} | {r['train_bytes_per_s']:.0f}" if 'step_ms' in r
             else '- | -')
    print(f"| {name} | {train} | {r['flops_per_step'] / 1e9:.2f} | {gen} |")
  if opts['steps'] > 0:
    print(f"HAT / subword training bytes/s: "
          f"{rows['hat']['train_bytes_per_s'] / rows['subword_lm']['train_bytes_per_s']:.2f}x")
  print(f"HAT / byte LM generation bytes/s: "
        f"{rows['hat']['gen_bytes_per_s'] / rows['byte_lm']['gen_bytes_per_s']:.2f}x")


if __name__ == '__main__':
  main(sys.argv[1:])
