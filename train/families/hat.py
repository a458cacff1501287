"""HAT family (`family='hat'`): byte stream + word fields in, next-byte loss out
(models/hat.py; word splitting in data/words.py, the word fields in data/hat_data.py)."""
from __future__ import annotations

import numpy as np

from data import encoders, hat_data, pipeline, words
from models import hat, hat_view
from train import families


class HATFamily(families.Family):

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    if cfg.data.encoder != 'bytes':
      raise ValueError(f"family 'hat' reads bytes: data.encoder must be 'bytes', "
                       f'got {cfg.data.encoder!r}')
    self.splitter = words.get_splitter(cfg.data.splitter, cfg.data.max_word_bytes)
    d, m = cfg.data, cfg.model
    self.learned = hat.check_chunking(m) == 'learned'
    if self.learned:
      _check_learned_rows(cfg)
    self.boundary_id = None
    if m.pooling == 'boundary':  # word-boundary tokens in the stream (models/hat.py)
      self.encoder = hat_data.BoundaryByteEncoder(self.splitter, m.get('boundary_id', 259))
      self.boundary_id = self.encoder.boundary_id
    else:
      self.encoder = encoders.ByteEncoder()
    self.fields = hat_data.WordFields(self.splitter, d.max_words, d.max_word_bytes,
                                      self.boundary_id)
    self.eval_fields = hat_data.WordFields(self.splitter, d.max_words, d.max_word_bytes,
                                           self.boundary_id)
    # what generation and the byte-level view split words with, and the gather width
    self.words = (self.splitter if self.boundary_id is None else
                  hat_data.BoundaryWords(self.boundary_id, self.splitter.word_cap))
    self.word_len = self.fields.word_len
    if self.learned:  # the model cuts its own units: the rows go in as packed, no word fields
      self.fields = self.eval_fields = None

  def build_model(self, rngs):
    d = self.cfg.data
    return hat.HAT(self.cfg.model, self.encoder.vocab_size, self.dtype, rngs=rngs,
                   max_units=d.max_words, max_unit_bytes=d.max_word_bytes)

  def loss(self, model, batch, rng):
    return hat.hat_loss(model, batch, rng)

  def derived_metrics(self, sums: dict) -> dict:
    """Learned chunking: bytes_per_unit (the compression reached), chunk_loss, chunk_overflow
    (models/hat.chunk_metrics)."""
    return hat.chunk_metrics(sums) if self.learned else {}

  def headline_metrics(self) -> dict[str, str]:
    if not self.learned:
      return {}
    return {'bytes_per_unit': 'bytes/unit', 'chunk_loss': 'chunk loss',
            'chunk_overflow': 'overflow'}

  def train_iterator(self, process_index: int, process_count: int):
    it = pipeline.make_train_iterator(self.cfg, self.encoder, process_index, process_count,
                                      transform=self.fields)
    self._stats.update(it.source.stats or {})
    return it

  def eval_batches(self, process_index: int, process_count: int, max_batches: int = 0,
                   perturbation: str | None = None):
    return pipeline.make_eval_batches(self.cfg, self.encoder, process_index, process_count,
                                      max_batches, perturbation, transform=self.eval_fields)

  def sample(self, model, cfg_sample) -> list[str]:
    prompt = [self.encoder.bos_id] + list(self.encoder.encode(cfg_sample.prompt))
    out = hat.generate(model, prompt, self.words, cfg_sample.max_new_tokens,
                       cfg_sample.temperature, cfg_sample.top_p, cfg_sample.seed,
                       stop_id=self.encoder.eos_id, max_word_bytes=self.word_len)
    out = np.asarray(out)
    stop = np.flatnonzero(out == self.encoder.eos_id)
    return [cfg_sample.prompt + self.encoder.decode(out[:stop[0]] if stop.size else out)]

  def byte_view(self, model):
    """With boundary tokens: a view that sums over them (models/hat_view.HATBoundaryView)."""
    return hat_view.byte_view(model, self.splitter, self.cfg.data.max_word_bytes, self.name)

  def flops_per_token(self) -> float:
    d = self.cfg.data
    return hat.flops_per_byte(self.cfg.model, self.encoder.vocab_size, d.seq_len, d.max_words,
                              self.word_len)

  def data_stats(self) -> dict:
    out = super().data_stats()
    for name, f in (('train', self.fields), ('eval', self.eval_fields)):
      if f is None:  # learned chunking: bytes_per_unit is a training metric
        continue
      s = f.stats
      out[f'{name}_dropped_bytes'] = s['dropped_bytes']
      if s['target_bytes']:
        out[f'{name}_bytes_per_word'] = round(s['target_bytes'] / max(s['words'], 1), 3)
    return out

  def describe(self) -> str:
    d = self.cfg.data
    m = self.cfg.model
    variant = f'pooling {m.pooling}'
    if self.boundary_id is not None:
      variant += f' (boundary token {self.boundary_id})'
    if self.learned:
      variant += (f' | learned chunking (target {m.chunk_target} bytes/unit, '
                  f'{m.chunk_loss} loss x {m.chunk_loss_weight})')
    variant += f' | encoder {m.get("encoder_attention", "causal")}'
    return (f'HAT splitter {d.splitter} | {variant} | {d.seq_len} tokens, {d.max_words} words x '
            f'{self.word_len} tokens per row | data {d.source} | batch '
            f'{self.cfg.train.batch_size} | compute {np.dtype(self.dtype).name}')


def _check_learned_rows(cfg) -> None:
  """Learned chunking: a row of data.seq_len bytes at the target's bytes per unit must fit
  data.max_words units (bytes of further units read a stale context)."""
  d, m = cfg.data, cfg.model
  need = d.seq_len / m.chunk_target
  if d.max_words < need:
    raise ValueError(f'model.chunk_target={m.chunk_target}: a row of data.seq_len={d.seq_len} '
                     f'bytes holds about {need:.0f} units at that target, more than '
                     f'data.max_words={d.max_words} (raise data.max_words to at least '
                     f'{int(np.ceil(need))}, or the target)')


Family = HATFamily
