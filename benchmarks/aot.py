"""Ahead-of-time helpers shared by the compile-time, pod-lowering, efficiency and device-suite
benchmarks: the trainer's own jitted step, abstract (shape-only) batches for any family, and
presets whose tokenizer is replaced by its vocabulary size (shapes are all that matter there).
"""
from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class VocabOnlyEncoder:
  """Stands in for a trained subword tokenizer of `vocab_size` tokens when only shapes matter
  (lowering, compile time, step time on synthetic rows): no tokenizer training, no data."""

  def __init__(self, vocab_size: int):
    from data import encoders
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.true_vocab_size = int(vocab_size)
    self.vocab_size = encoders.padded(int(vocab_size))

  def encode(self, text):
    raise RuntimeError('VocabOnlyEncoder stands in for shapes only: a benchmark that encodes text '
                       'must build the real encoder (data.encoders.get_encoder)')


@contextlib.contextmanager
def vocab_only_encoders():
  """`data.encoder='bpe'` configs get a VocabOnlyEncoder of `data.vocab_size` inside."""
  from data import encoders
  real = encoders.get_encoder

  def get(cfg_data):
    if cfg_data.get('encoder', 'bytes') == 'bpe':
      return VocabOnlyEncoder(int(cfg_data.vocab_size))
    return real(cfg_data)

  with mock.patch.object(encoders, 'get_encoder', get):
    yield


def load_config(spec: str, overrides: dict | None = None):
  from train import config_lib
  cfg, _ = config_lib.load(spec)
  config_lib.override(cfg, {k: str(v) for k, v in (overrides or {}).items()})
  return cfg


def make_setup(cfg):
  """`trainer.Setup(cfg)` (the state, shardings and step the trainer uses), with subword
  tokenizers replaced by their vocabulary size."""
  from train import trainer
  with vocab_only_encoders():
    return trainer.Setup(cfg)


def jitted_train_step(setup):
  """The `jax.jit` object inside `setup.make_train_step()` (called as step(state, batch,
  frozen)), for `.lower(...)`: the trainer's own step, not a copy of it."""
  import jax
  made = []
  real = jax.jit

  def spy(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  with mock.patch.object(jax, 'jit', spy):
    setup.make_train_step()
  if len(made) != 1:
    raise RuntimeError(f'expected make_train_step to build one jitted step, saw {len(made)}')
  return made[0]


def host_batch(setup, rows: int = 1) -> dict:
  """A host-local numpy batch of `rows` full rows for setup's family: the LM fields of
  `lm_throughput.synthetic_batch` (random tokens; real byte ids for byte models), plus the
  family's own fields (HAT's word layout) computed by the family's batch transform."""
  import numpy as np
  from benchmarks.lm_throughput import synthetic_batch
  fam, cfg = setup.family, setup.cfg
  v = fam.encoder.vocab_size
  real = getattr(fam.encoder, 'true_vocab_size', v)
  batch = synthetic_batch(rows, cfg.data.seq_len, real)
  fields = getattr(fam, 'fields', None)
  if fields is not None:
    batch = fields(batch)
  return {k: np.asarray(x) for k, x in batch.items()}


def abstract_batch(setup, batch_size: int | None = None) -> dict:
  """ShapeDtypeStructs of a global batch (sharded over the batch axes like the trainer's)."""
  import jax
  from train import partitioning
  b = batch_size or setup.cfg.train.batch_size
  one = host_batch(setup, 1)
  return {k: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype,
                                  sharding=partitioning.batch_sharding(setup.mesh, x.ndim))
          for k, x in one.items()}


def lower_train_step(setup, batch_size: int | None = None, platforms=None):
  """(lowered or exported, seconds): the trainer's step lowered with abstract state and batch;
  with `platforms` (e.g. ['tpu']) through `jax.export` for those platforms."""
  import time
  import jax
  step = jitted_train_step(setup)
  args = (setup.abstract_state(), abstract_batch(setup, batch_size), setup.frozen)
  t0 = time.perf_counter()
  if platforms:
    out = jax.export.export(step, platforms=platforms)(*args)
  else:
    out = step.lower(*args)
  return out, time.perf_counter() - t0
