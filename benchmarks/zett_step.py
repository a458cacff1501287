"""Where a ZeTT training step spends its time: the hypernetwork over the sampled vocabulary vs
the frozen base LM over the batch's tokens, forward + backward, side by side in one process.

  python benchmarks/zett_step.py [--preset=smollm2] [--repeat=3] [--batch_size=0] [--seq_len=0] \
      [--packed_slots=2.5]

Builds the zett family of `configs/zett.py:PRESET` (0 keeps the preset's batch / length), takes
one real post-warm-up batch (a sampled tokenizer, its vocabulary as base pieces, the text
tokenized with it) and times, jitted, each after one compiling call (median of `--repeat`):
  full      the loss and its gradient w.r.t. the hypernetwork (what a training step computes,
            without the optimizer update);
  hypernet  the hypernetwork alone: predict the whole vocabulary, backward from a fixed
            random cotangent;
  lm        the frozen LM alone on fixed embedding tables: forward, cross-entropy over the
            sampled vocabulary, backward to the tables;
and, with the vocabulary's pieces packed (`hypernet.packed_slots` slots per token, rows of 8:
models/hypernet.py `pack_pieces`), the hypernetwork and the full step again, side by side.
Also prints the vocabulary's piece counts (the hypernetwork's work) and how many of its rows the
batch's tokens use. FLOP estimates per part come from the family accounting.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def _time(fn, args, repeat):
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def main(argv):
  opts = cli.parse_opts(argv, {'preset': 'smollm2', 'repeat': 3, 'batch_size': 0,
                               'seq_len': 0, 'packed_slots': 2.5}, __doc__)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from models import hypernet
  from train import config_lib, families
  cfg, _ = config_lib.load(f'configs/zett.py:{opts["preset"]}')
  cfg.unlock()
  if opts['batch_size']:
    cfg.train.batch_size = opts['batch_size']
  if opts['seq_len']:
    cfg.data.seq_len = opts['seq_len']
  fam = families.get(cfg)
  it = fam.train_iterator(0, 1)
  it.set_state({**it.get_state(), 'zett_step': cfg.zett.warmup_steps})
  batch = {k: jnp.asarray(v) for k, v in next(it).items()
           if not k.startswith('packed_')}  # the padded layout; the packed one is built below
  it.close()
  model = fam.build_model(nnx.Rngs(0))
  nnx.update(model.lm, nnx.state(fam.base.model))
  graphdef, params, rest = nnx.split(model, fam.trainable(), ...)

  def loss_of(p, b):
    return hypernet.zett_loss(nnx.merge(graphdef, p, rest), b, cfg.zett.aux_weight)[0]

  full = jax.jit(jax.value_and_grad(loss_of))
  pieces = batch['vocab_pieces']
  cot = jax.random.normal(jax.random.key(0), (pieces.shape[0], fam.base_in.shape[1]))

  def hyper_of(p, pieces, cot):
    e_in, _ = nnx.merge(graphdef, p, rest).hypernet(pieces)
    return jnp.sum(e_in * cot)

  hyper = jax.jit(jax.value_and_grad(hyper_of))
  lm_graph, lm_state = nnx.split(model.lm)
  table = jnp.asarray(fam.base_in[np.maximum(np.asarray(batch['vocab_shared']), 0)])

  def lm_of(e, lm_state, batch):
    lm = nnx.merge(lm_graph, lm_state)
    x = jnp.take(e, batch['inputs'], axis=0)
    h, _ = lm.transformer(x, batch['positions'], batch['segment_ids'])
    logits = jnp.einsum('btd,vd->btv', h, e, preferred_element_type=jnp.float32)
    nll = (jax.nn.logsumexp(logits, -1)
           - jnp.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0])
    return jnp.sum(nll * batch['weights'])

  lm_fn = jax.jit(jax.value_and_grad(lm_of))
  r = opts['repeat']
  packed, cut = hypernet.pack_pieces(np.asarray(pieces), hypernet.packed_rows(
      pieces.shape[0], opts['packed_slots']))
  packed = {k: jnp.asarray(v) for k, v in packed.items()}
  batch_packed = {**batch, **{f'packed_{k}': v for k, v in packed.items()}}

  def hyper_packed_of(p, packed, cot):
    e_in, _ = nnx.merge(graphdef, p, rest).hypernet.packed(**packed)
    return jnp.sum(e_in * cot)

  hyper_packed = jax.jit(jax.value_and_grad(hyper_packed_of))
  t_full = _time(full, (params, batch), r)
  t_full_packed = _time(full, (params, batch_packed), r)
  t_hyper = _time(hyper, (params, pieces, cot), r)
  t_hyper_packed = _time(hyper_packed, (params, packed, cot), r)
  t_lm = _time(lm_fn, (table, lm_state, batch), r)
  p = np.asarray(pieces)
  n_pieces = (p >= 0).sum(1)
  used = np.unique(np.asarray(batch['targets'])[np.asarray(batch['weights']) > 0]).size
  h = cfg.hypernet
  hyper_flops = 6 * p.shape[0] * h.max_pieces * h.num_layers * (4 * h.d_model ** 2
                                                                + 2 * h.d_model * h.mlp_dim)
  tokens = int(np.asarray(batch['weights']).sum())
  lm_flops = 6 * tokens * (sum(x.size for x in jax.tree.leaves(nnx.state(model.lm, nnx.Param)))
                           - fam.base_in.size + p.shape[0] * fam.base_in.shape[1])
  print(f'backend {jax.default_backend()} | preset {opts["preset"]}: batch '
        f'{cfg.train.batch_size} x {cfg.data.seq_len} tokens ({tokens} scored), vocabulary '
        f'{p.shape[0]} (rows used by the batch: {used}), hypernetwork {h.num_layers} layers d '
        f'{h.d_model}, <= {h.max_pieces} pieces (mean {n_pieces.mean():.2f}; '
        f'1 piece: {(n_pieces == 1).mean():.0%})')
  print(f'full step (loss + grad): {t_full:.3f} s | hypernetwork fwd+bwd: {t_hyper:.3f} s '
        f'({t_hyper / t_full:.0%}) | LM fwd+bwd: {t_lm:.3f} s ({t_lm / t_full:.0%}) | median of '
        f'{r}')
  print(f'packed ({opts["packed_slots"]:g} slots per token: {packed["ids"].shape[0]} rows of '
        f'{packed["ids"].shape[1]}, {cut} pieces cut): full step {t_full_packed:.3f} s '
        f'({t_full / t_full_packed:.2f}x faster) | hypernetwork fwd+bwd {t_hyper_packed:.3f} s '
        f'({t_hyper / t_hyper_packed:.2f}x faster)')
  print(f'FLOP estimates (fwd+bwd): hypernetwork {hyper_flops / 1e9:.0f} GFLOP, LM '
        f'{lm_flops / 1e9:.0f} GFLOP')


if __name__ == '__main__':
  main(sys.argv[1:])
