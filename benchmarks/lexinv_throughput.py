"""Training-step time of the lexinvariant LM vs the standard LM of the same size, side by side.

  python benchmarks/lexinv_throughput.py [--preset=150m_bpe32k] [--vocab=32768] [--steps=10]
      [--table=shared] [--config.model.num_layers=2 ...]

Both models go through the real trainer step (`train.trainer.Setup.make_train_step`: forward,
backward, AdamW, donated state) on the same synthetic full rows; the vocabulary is a stand-in
of `--vocab` ids (no tokenizer is trained: the step cost depends only on the sizes). The
lexinvariant step includes drawing G ([V, D] Gaussian) and B permutations of V every step.
Prints one row per model and the ratio lexinvariant / standard step time. Overrides apply to
both configs.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _VocabOnly:
  """Stands in for an encoder: the sizes are all a training step needs."""

  def __init__(self, vocab: int):
    self.vocab_size = self.true_vocab_size = vocab
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2


def _family(cfg, vocab: int):
  """The config's family (lm or lexinv) with the `_VocabOnly` stand-in encoder."""
  import numpy as np
  from train.families import lexinv, lm
  base = lexinv.LexinvariantFamily if cfg.family == 'lexinv' else lm.TokenLMFamily

  class Bench(base):
    def make_encoder(self):
      return _VocabOnly(vocab)

    def live_ids(self):  # vocab='train': the mask's cost, not its content
      return np.ones(vocab, bool)

  return Bench(cfg)


def bench(cfg, steps: int, warmup: int, vocab: int) -> dict:
  import jax
  from benchmarks import lm_throughput
  from train import partitioning, trainer
  setup = trainer.Setup(cfg, _family(cfg, vocab))
  b, t, v = cfg.train.batch_size, cfg.data.seq_len, setup.family.encoder.vocab_size
  batch = partitioning.global_batch(lm_throughput.synthetic_batch(b, t, v), setup.mesh)
  compile_s, dt, m = lm_throughput.time_steps(setup, batch, steps, warmup)
  return {'params_M': setup.n_params / 1e6, 'compile_s': compile_s, 'step_ms': dt * 1e3,
          'tokens_per_s': b * t / dt, 'loss': float(jax.device_get(m['loss_mean']))}


def main(argv):
  opts = {'preset': '150m_bpe32k', 'vocab': 32768, 'steps': 10, 'warmup': 2, 'table': 'shared'}
  from benchmarks import lm_throughput
  opts, overrides = lm_throughput.parse_opts(argv, opts, __doc__)
  import jax
  from train import config_lib
  print(f'backend {jax.default_backend()} | devices {jax.device_count()} '
        f'({jax.devices()[0].device_kind}) | vocab {opts["vocab"]}', flush=True)
  rows = {}
  for name, preset in (('standard', opts['preset'] + '_lm'), ('lexinvariant', opts['preset'])):
    cfg, _ = config_lib.load(f'configs/lexinvariant.py:{preset}')
    ov = dict(overrides)
    if name == 'lexinvariant':
      ov['lexinv.table'] = opts['table']
    config_lib.override(cfg, ov)
    rows[name] = bench(cfg, opts['steps'], opts['warmup'], opts['vocab'])
    c = cfg
    print(f'{name}: {rows[name]} | batch {c.train.batch_size} x seq {c.data.seq_len} | '
          f'd {c.model.d_model} x {c.model.num_layers} layers | ce_chunk {c.model.ce_chunk}',
          flush=True)
  cols = ['params_M', 'compile_s', 'step_ms', 'tokens_per_s', 'loss']
  print('| model | ' + ' | '.join(cols) + ' |')
  print('|---' * (len(cols) + 1) + '|')
  for name, r in rows.items():
    print(f'| {name} | ' + ' | '.join(f'{r[c]:.4g}' for c in cols) + ' |')
  ratio = rows['lexinvariant']['step_ms'] / rows['standard']['step_ms']
  print(f'step-time ratio lexinvariant / standard: {ratio:.3f} (target <= 1.25)', flush=True)
  return ratio


if __name__ == '__main__':
  main(sys.argv[1:])
