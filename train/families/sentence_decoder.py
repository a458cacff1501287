"""Sentence decoder family (`family='sentence_decoder'`): embedding -> text for a sentence
space, or (`model.autoencoder=True`) a sentence autoencoder whose byte encoder defines a space
of its own (models/sentence_decoder.py).

This module also owns the sentence spaces the sentence families read (data/sentences.py
caches them): `sentence_encoder(spec)` resolves `data.sentence_encoder` ('minilm', 'hf:DIR',
'autoencoder:WORKDIR' -- a trained autoencoder run -- or 'none' for texts only) and
`load_space` builds or reads the cache. The robust normalizer is fitted on the training split's
embeddings when the model is first built and then lives in the parameters, so a restored run
uses the statistics it trained with.

`--mode=eval` decodes the validation sentences' true embeddings (exact match, BLEU, round-trip
l2: train/evals/lcm.py); `--mode=sample` sends the prompt's sentences through the space and
back.
"""
from __future__ import annotations

import functools

import numpy as np

from data import encoders, pipeline, sentences
from models import pretrained, sentence_decoder
from train import families, runs, storage
from train.evals import lcm as lcm_evals


class _AutoencoderEncoder:
  """A trained sentence autoencoder's encoder as a sentence encoder (`autoencoder:WORKDIR`)."""

  def __init__(self, spec: str, dec: sentence_decoder.Decoder):
    self.spec, self.dim, self._dec = spec, dec.dim, dec
    self.identity = f'{spec}:{dec.identity}'

  def __call__(self, texts) -> np.ndarray:
    return self._dec(texts)


@functools.lru_cache(maxsize=8)
def sentence_encoder(spec: str):
  """The process-wide sentence encoder for `data.sentence_encoder` (loaded and compiled once);
  it has the interface data/sentences.py documents (`spec`, `identity`, `dim`, `__call__`)."""
  if spec == 'none':
    return sentences.TextsOnly()
  if spec == 'minilm' or spec.startswith('hf:'):
    return pretrained.SentenceEncoder(spec)
  if spec.startswith('autoencoder:'):
    return _AutoencoderEncoder(spec, load_decoder(spec[len('autoencoder:'):], autoencoder=True))
  raise ValueError(f"unknown sentence encoder {spec!r}: expected 'minilm', 'hf:DIR', "
                   "'autoencoder:WORKDIR' or 'none'")


def load_space(cfg_data, split: str, spec: str) -> sentences.SentenceSpace:
  """The cached sentence space of `split` for the encoder `spec` (built on first use)."""
  return sentences.load_space(cfg_data, split, sentence_encoder(spec))


def normalizer(space: sentences.SentenceSpace) -> tuple[np.ndarray, np.ndarray]:
  """(center, scale) of the robust normalizer fitted on a space's sentence embeddings."""
  if space.dim == 0:
    raise ValueError(f'the sentence space {space.directory} has no embeddings')
  return sentences.fit_robust_normalizer(space.embeddings[sentences.NUM_SPECIAL:])


def load_decoder(workdir: str, autoencoder: bool = False) -> sentence_decoder.Decoder:
  """The latest checkpoint of a sentence-decoder run, ready to decode (and, for an
  autoencoder, to encode; `autoencoder=True` refuses a plain decoder). Loaded once per
  process."""
  dec = _load_decoder(storage.canonical(workdir))
  if autoencoder and not dec.autoencoder:
    raise ValueError(f'{workdir} is a sentence decoder for {dec.spec!r} embeddings, not an '
                     'autoencoder (model.autoencoder=True)')
  return dec


@functools.lru_cache(maxsize=4)
def _load_decoder(workdir: str) -> sentence_decoder.Decoder:
  run = runs.load_run(workdir, family='sentence_decoder')
  dec = sentence_decoder.Decoder(run.model(), run.cfg.data.max_sentence_bytes)
  dec.identity = run.identity
  dec.spec = 'none' if run.cfg.model.autoencoder else run.cfg.data.sentence_encoder
  return dec


class SentenceDecoderFamily(families.Family):

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.autoencoder = bool(cfg.model.autoencoder)
    self.spec = 'none' if self.autoencoder else cfg.data.sentence_encoder
    self.space = load_space(cfg.data, cfg.data.train_split, self.spec)
    if self.autoencoder:
      self.emb_dim = int(cfg.model.embed_dim)
      self.center = np.zeros(self.emb_dim, np.float32)
      self.scale = np.full(self.emb_dim, self.emb_dim ** -0.5, np.float32)  # unit vectors
    else:
      self.emb_dim = self.space.dim
      self.center, self.scale = normalizer(self.space)
    if cfg.data.seq_len != cfg.data.max_sentence_bytes + 1:
      raise ValueError(f'data.seq_len ({cfg.data.seq_len}) must be data.max_sentence_bytes + 1 '
                       f'({cfg.data.max_sentence_bytes + 1}) for the sentence decoder')

  def build_model(self, rngs):
    return sentence_decoder.SentenceDecoder(self.cfg.model, self.emb_dim,
                                            encoders.BYTE_VOCAB_SIZE, self.center, self.scale,
                                            self.dtype, rngs=rngs)

  def loss(self, model, batch, rng):
    return sentence_decoder.loss(model, batch, rng, self.cfg.model)

  def train_iterator(self, process_index, process_count):
    return sentences.SentenceRows(self.space, self.cfg.data.max_sentence_bytes,
                                  pipeline.local_batch_size(self.cfg, process_count),
                                  seed=self.cfg.seed, process_index=process_index,
                                  process_count=process_count, shuffle=self.cfg.data.shuffle)

  def eval_space(self):
    return load_space(self.cfg.data, self.cfg.data.eval_split, self.spec)

  def eval_batches(self, process_index, process_count, max_batches=0, perturbation=None):
    if perturbation:
      raise ValueError('the sentence decoder has no perturbation evaluations '
                       '(set eval.robustness to "")')
    space = self.eval_space()
    local = pipeline.local_batch_size(self.cfg, process_count)
    ids = np.concatenate([[sentences.EOT_ID],
                          np.arange(sentences.NUM_SPECIAL, space.num_sentences)])
    glob = local * process_count
    n = -(-len(ids) // glob)
    if max_batches:
      n = min(n, max_batches)
    out = []
    for g in range(n):
      rows = ids[g * glob:(g + 1) * glob][process_index * local:(process_index + 1) * local]
      out.append(sentences.rows_for(space, rows, self.cfg.data.max_sentence_bytes, local))
    return out

  def check_sample(self, cfg_sample) -> None:
    prompt_sentences(self.cfg, cfg_sample)

  @classmethod
  def check_sample_config(cls, cfg) -> None:
    prompt_sentences(cfg, cfg.sample)  # before the sentence space is embedded

  def sample(self, model, cfg_sample):
    """The prompt's sentences through the sentence space and back (a round trip)."""
    sents = prompt_sentences(self.cfg, cfg_sample)
    dec = sentence_decoder.Decoder(model, self.cfg.data.max_sentence_bytes)
    emb = dec(sents) if self.autoencoder else sentence_encoder(self.spec)(sents)
    return [' '.join(dec.decode(emb))]

  def flops_per_token(self):
    return sentence_decoder.flops_per_byte(self.cfg.model, self.cfg.data.seq_len)

  def data_stats(self):
    return {f'train_{k}': v for k, v in sentences.describe(self.space).items()}

  def describe(self):
    m = self.cfg.model
    kind = (f'autoencoder ({m.encoder_layers}-layer byte encoder, {m.embed_dim}-d)'
            if self.autoencoder else f'{self.spec} embeddings ({self.emb_dim}-d)')
    return (f'sentence decoder from {kind} | '
            f'{self.space.num_sentences - sentences.NUM_SPECIAL} train sentences | '
            f'<= {self.cfg.data.max_sentence_bytes} bytes | batch {self.cfg.train.batch_size}')

  def eval_suite(self, setup, params, workdir, step):
    """Round trip on the validation sentences: decode the true embeddings, compare."""
    space = self.eval_space()
    ids = np.arange(sentences.NUM_SPECIAL, space.num_sentences)[:self.cfg.eval.max_sentences]
    dec = sentence_decoder.Decoder(setup.model(params), self.cfg.data.max_sentence_bytes)
    refs = space.texts(ids)
    if self.autoencoder:
      out = lcm_evals.round_trip(dec, dec(refs), refs)
    else:
      out = lcm_evals.round_trip(dec, np.asarray(space.embeddings[ids], np.float32), refs,
                                 encode=sentence_encoder(self.spec))
    return {'round_trip': out, 'row': out}


Family = SentenceDecoderFamily


def prompt_sentences(cfg, cfg_sample) -> list[str]:
  """The sentences of `sample.prompt` (ValueError if it has none)."""
  sents = sentences.split_document(cfg_sample.prompt, cfg.data.max_sentence_bytes)
  if not sents:
    raise ValueError(f'sample.prompt {cfg_sample.prompt!r} has no sentence')
  return sents


def check_decoder(dec: sentence_decoder.Decoder, spec: str, key: str) -> None:
  """Refuses a decoder (from the config key `key`) trained for another space than `spec`."""
  if spec.startswith('autoencoder:'):
    same = dec.autoencoder and dec.identity.startswith(
        storage.canonical(spec[len('autoencoder:'):]) + '@')
  else:
    same = dec.spec == spec
  if not same:
    raise ValueError(f'{key} decodes {dec.spec!r} embeddings, but this LCM predicts {spec!r} '
                     'embeddings')
