"""Lexinvariant LM family (`family='lexinv'`, Huang et al. 2023): the model is
`models.lexinvariant.LexinvariantLM`; data, iterators and encoders are the token-LM family's.
`--mode=eval` runs the paper's evaluations (train/evals/lexinv.py) against a standard LM of the
same size on the same data (`lexinv.baseline_workdir`, a trained `lm`-family run)."""
from __future__ import annotations

import jax
import numpy as np

from data import corpus, pipeline
from models import byte_level, lexinvariant
from train import families, runs
from train.evals import lexinv as lexinv_evals
from train.families import lm


class LexinvariantFamily(lm.TokenLMFamily):

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.lexinv_cfg = cfg.lexinv
    self._live = None

  def live_ids(self) -> np.ndarray:
    """bool [vocab_size]: the ids whose frequency in the training split is at least
    `lexinv.vocab_min_freq` (`lexinv.vocab='train'`), counted once over at most
    `lexinv.vocab_max_chars` characters of it."""
    if self._live is None:
      source = corpus.get_source(self.cfg.data, self.cfg.data.train_split)
      counts = pipeline.token_counts(source, self.encoder,
                                     int(self.lexinv_cfg.vocab_max_chars))
      min_freq = float(self.lexinv_cfg.vocab_min_freq)
      self._live = (counts > 0) & (counts >= min_freq * counts.sum())
      self._stats['lexinv_live_ids'] = int(self._live[:self.encoder.true_vocab_size].sum())
    return self._live

  def token_ids_of(self, chars: str, key: str) -> np.ndarray:
    """The token ids of `chars` (config `key`), each character exactly one token."""
    out = []
    for ch in dict.fromkeys(str(chars)):
      ids = self.encoder.encode(ch)
      if len(ids) != 1:
        raise ValueError(f'{key}={chars!r}: the character {ch!r} is {len(ids)} tokens of the '
                         f'{self.encoder.name} encoder, not one')
      out.append(int(ids[0]))
    return np.asarray(out, np.int64)

  @property
  def interchangeable(self) -> bool:
    """`lexinv.embedding='interchangeable'`: models/lexinvariant.InterchangeableLM."""
    mode = self.lexinv_cfg.embedding
    if mode not in lexinvariant.EMBEDDINGS:
      raise ValueError(f'lexinv.embedding={mode!r}: expected one of {lexinvariant.EMBEDDINGS}')
    return mode == 'interchangeable'

  def build_model(self, rngs):
    enc = self.encoder
    if self.interchangeable:
      spec = self.lexinv_cfg.interchangeable
      specials = (enc.pad_id, enc.bos_id, enc.eos_id)
      if spec == 'all':  # every token of the text
        ids = np.setdiff1d(np.arange(enc.true_vocab_size), specials)
      else:
        ids = self.token_ids_of(spec, 'lexinv.interchangeable')
      return lexinvariant.InterchangeableLM(self.model_cfg, self.lexinv_cfg, enc.vocab_size,
                                            enc.true_vocab_size, self.dtype,
                                            interchangeable_ids=ids, special_ids=specials,
                                            rngs=rngs)
    live = self.live_ids() if self.lexinv_cfg.vocab == 'train' else None
    return lexinvariant.LexinvariantLM(self.model_cfg, self.lexinv_cfg, enc.vocab_size,
                                       enc.true_vocab_size, self.dtype,
                                       special_ids=(enc.pad_id, enc.bos_id, enc.eos_id),
                                       live=live, rngs=rngs)

  def loss(self, model, batch, rng):
    return lexinvariant.lexinv_loss(model, batch, rng)

  def sample(self, model, cfg_sample) -> list[str]:
    return lm.sample_text(lexinvariant.generate, model, self.encoder, cfg_sample)

  def flops_per_token(self) -> float:
    c = self.lexinv_cfg
    if self.interchangeable:
      return lexinvariant.flops_per_token(self.model_cfg, self.encoder.vocab_size,
                                          self.cfg.data.seq_len)
    two = c.table != 'permuted_learned' and 0.0 < c.p < 1.0
    return lexinvariant.flops_per_token(self.model_cfg, self.encoder.vocab_size,
                                        self.cfg.data.seq_len, two)

  def describe(self) -> str:
    c = self.lexinv_cfg
    if self.interchangeable:
      return (f'interchangeable token embeddings for {c.interchangeable!r} (random part '
              f'{c.d_random} of {self.model_cfg.d_model} dims) | ' + super(
                  LexinvariantFamily, self).describe())
    vocab = c.vocab
    if vocab == 'train':
      vocab += f' ({int(self.live_ids()[:self.encoder.true_vocab_size].sum())} of ' \
               f'{self.encoder.true_vocab_size} ids are live)'
    return (f'lexinvariant p={c.p} table={c.table} vocab={vocab} '
            f'fixed_specials={bool(c.fixed_specials)} | ' + super().describe())

  def byte_view(self, model):
    """One random embedding drawn from `lexinv.eval_seed`, kept for every text scored."""
    draw = model.draw(jax.random.key(self.lexinv_cfg.eval_seed), 1)
    return lm.token_byte_view(byte_level.TokenFn(model, draw), self.encoder, self.name)

  def export_hf(self, model, out_dir: str) -> None:
    families.Family.export_hf(self, model, out_dir)  # no HF architecture for it

  def eval_suite(self, setup, params, workdir: str, step: int) -> dict:
    baseline = None
    if self.lexinv_cfg.baseline_workdir:
      baseline = runs.load_run(self.lexinv_cfg.baseline_workdir, family='lm',
                               what='lexinv.baseline_workdir')
      b_enc = baseline.family.encoder
      if (b_enc.vocab_size != self.encoder.vocab_size
          or baseline.cfg.data.source != self.cfg.data.source):
        raise ValueError('the baseline must use the same data source and vocabulary '
                         f'({baseline.cfg.data.source}, {b_enc.vocab_size}) vs '
                         f'({self.cfg.data.source}, {self.encoder.vocab_size})')
    unseen = self.lexinv_cfg.unseen
    alphabets = None
    if unseen:
      seen = self.lexinv_cfg.seen or (
          self.lexinv_cfg.interchangeable if self.interchangeable else
          ''.join(ch for ch in 'abcdefghijklmnopqrstuvwxyz' if ch not in unseen))
      alphabets = {'seen': (seen, self.token_ids_of(seen, 'lexinv.seen')),
                   'unseen': (unseen, self.token_ids_of(unseen, 'lexinv.unseen'))}
    return lexinv_evals.run_suite(setup, params, self.encoder, workdir, step, baseline,
                                  alphabets)


Family = LexinvariantFamily
