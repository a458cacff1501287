"""ZeTT family: trains the embedding hypernetwork of a frozen pretrained LM on tokenizers sampled
on the fly (models/hypernet.py, data/tokenizer_sampler.py, configs/zett.py).

Each step:
  * the text: packed byte rows of the training split (`data.pipeline`, so shuffling, host
    sharding and exact resume are the usual ones), each row's document pieces decoded;
  * the tokenizer: a byte-level UnigramLM sampled from the substring counts of that text plus
    `zett.sampler_docs` training documents drawn for this step, with log-normal noise
    (`zett.noise_std`), `zett.vocab_size` tokens, all 256 byte symbols forced in; the base's
    document separator is its one special token and keeps the base embedding;
  * the batch: each piece tokenized by it as [separator] + tokens, cut to `data.seq_len` tokens
    (cut tokens are counted, and their bytes are not scored); the vocabulary as base pieces for
    the hypernetwork, and which tokens the base vocabulary shares (auxiliary MSE);
  * the first `zett.warmup_steps` steps instead train the identity warm-up on
    `zett.warmup_tokens` random base tokens.
Sampling runs on a prefetch thread; randomness comes from (seed, step), so a resumed run
samples the same tokenizers. Evaluation uses one fixed tokenizer: `target_tokenizer` if set,
else one sampled from the validation text with the run's seed.

An encoder base (a BERT sentence encoder) is the family `zett_encoder`
(train/families/zett_encoder.py); both share train/families/_zett_base.py.
"""
from __future__ import annotations

import numpy as np

from data import corpus, encoders, pipeline, target_tokenizers, tokenizer_sampler
from models import hypernet, token_lm
from train.families import _zett_base


class _Batcher:
  """Byte rows -> a ZeTT batch for one step (runs on the prefetch thread)."""

  def __init__(self, fam, seq_len: int):
    self.fam, self.seq_len = fam, seq_len
    self.stats = {'tokens_cut': 0, 'tokens': 0}

  def texts(self, byte_batch) -> list[str]:
    out = []
    enc = self.fam.bytes
    for r in range(byte_batch['targets'].shape[0]):
      seg = byte_batch['segment_ids'][r]
      for s in np.unique(seg[seg > 0]):
        ids = byte_batch['targets'][r][(seg == s) & (byte_batch['weights'][r] > 0)]
        out.append(enc.decode(ids))
    return out

  def vocab_arrays(self, tok) -> dict:
    fam = self.fam
    vocab = tok.get_vocab(with_added_tokens=True)
    v = max(fam.cfg.zett.vocab_size, max(vocab.values()) + 1)
    strings = [''] * v
    for s, i in vocab.items():
      strings[i] = s
    pieces = hypernet.piece_ids(fam.base.tokenizer, strings, fam.cfg.hypernet.max_pieces)
    base_vocab = fam.base_vocab
    shared = np.array([base_vocab.get(s, -1) for s in strings], np.int32)
    keep = np.zeros(v, np.int32)
    sep = tok.token_to_id(fam.sep_string)
    if sep is not None:
      keep[sep], shared[sep] = 1, fam.sep_id
    return {'vocab_pieces': pieces, 'vocab_shared': shared, 'vocab_keep': keep,
            **self.packed(pieces)}

  def packed(self, pieces) -> dict:
    """With `hypernet.packed_slots` > 0: the vocabulary's pieces packed (models/hypernet.py
    `pack_pieces`; pieces cut to fit are counted in `packed_pieces_cut`)."""
    slots = float(self.fam.cfg.hypernet.packed_slots)
    if slots <= 0:
      return {}
    packed, cut = hypernet.pack_pieces(pieces, hypernet.packed_rows(len(pieces), slots))
    self.stats['packed_pieces_cut'] = self.stats.get('packed_pieces_cut', 0) + cut
    return {f'packed_{k}': v for k, v in packed.items()}

  def tokenized(self, tok, texts, batch: int) -> dict:
    t = self.seq_len
    sep = tok.token_to_id(self.fam.sep_string) if texts else 0
    out = {k: np.zeros((batch, t), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                       'positions', 'target_bytes')}
    out['weights'] = np.zeros((batch, t), np.float32)
    encs = tok.encode_batch(texts) if texts else []
    r, col, seg = 0, 0, 0
    for text, e in zip(texts, encs):
      ids = [sep] + list(e.ids)
      nbytes = [0] + [len(text[a:b].encode('utf-8')) for a, b in e.offsets]
      n = len(ids) - 1
      self.stats['tokens'] += n
      if col + 1 >= t:
        r, col, seg = r + 1, 0, 0
      if r >= batch:
        self.stats['tokens_cut'] += n
        continue
      take = min(n, t - col)
      self.stats['tokens_cut'] += n - take
      seg += 1
      sl = slice(col, col + take)
      out['inputs'][r, sl] = ids[:take]
      out['targets'][r, sl] = ids[1:take + 1]
      out['segment_ids'][r, sl] = seg
      out['positions'][r, sl] = np.arange(take)
      out['weights'][r, sl] = 1.0
      out['target_bytes'][r, sl] = nbytes[1:take + 1]
      col += take
    return out

  def __call__(self, byte_batch, step: int, tok=None) -> dict:
    fam, z = self.fam, self.fam.cfg.zett
    b = byte_batch['targets'].shape[0]
    rng = np.random.default_rng([fam.cfg.seed, 7, step])
    warm = step < z.warmup_steps
    p = fam.cfg.hypernet.max_pieces
    out = {'phase': np.full((b,), 1.0 if warm else 0.0, np.float32)}
    ids = rng.choice(fam.regular_ids, z.warmup_tokens, replace=False)
    out['warm_ids'] = ids.astype(np.int32)
    out['warm_pieces'] = fam.base_pieces[ids]
    if warm:  # the LM part is not run: empty arrays of the right shapes
      v = z.vocab_size
      out.update({'vocab_pieces': np.full((v, p), -1, np.int32),
                  'vocab_shared': np.full((v,), -1, np.int32),
                  'vocab_keep': np.zeros((v,), np.int32)})
      out.update(self.packed(out['vocab_pieces']))
      out.update(self.tokenized(None, [], b))
      return out
    texts = self.texts(byte_batch)
    if tok is None:
      docs = fam.train_documents()
      extra = [docs[int(i)][:z.sampler_doc_chars] for i in
               rng.choice(len(docs), min(z.sampler_docs, len(docs)), replace=False)]
      tok = tokenizer_sampler.sample_unigram(texts + extra, z.vocab_size, rng, z.noise_std,
                                             z.max_piece_chars, (fam.sep_string,))
    out.update(self.vocab_arrays(tok))
    out.update(self.tokenized(tok, texts, b))
    return out


class ZettFamily(_zett_base.ZettBase):
  """ZeTT for a frozen decoder LM (see the module doc)."""

  KIND = 'decoder'
  BASE_ATTR = 'lm'

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.sep_id = int(self.base.meta['doc_token_id'])
    self.sep_string = self.base.tokenizer.id_to_token(self.sep_id)
    self.bytes = encoders.ByteEncoder()
    special = {t.content for t in self.base.tokenizer.get_added_tokens_decoder().values()}
    e = np.asarray(self.base.model.embed.embedding[...])
    self.vocab = e.shape[0]
    strings = [self.base.tokenizer.id_to_token(i) or '' for i in range(self.vocab)]
    self.base_pieces = hypernet.piece_ids(self.base.tokenizer, strings, cfg.hypernet.max_pieces)
    self.regular_ids = np.array([i for i, s in enumerate(strings) if s and s not in special],
                                np.int64)
    slots = float(cfg.hypernet.packed_slots)
    if slots and not 1.0 <= slots <= hypernet.PACK_ROW:
      raise ValueError(f'hypernet.packed_slots={slots}: expected 0 (padded) or a number of '
                       f'slots per token in [1, {hypernet.PACK_ROW}]')
    if cfg.zett.warmup_tokens > len(self.regular_ids):
      raise ValueError(f'zett.warmup_tokens={cfg.zett.warmup_tokens} exceeds the '
                       f'{len(self.regular_ids)} regular base tokens')
    self.base_in = e
    self.base_out = (None if self.lm_cfg.tie_embeddings else
                     np.asarray(self.base.model.readout.kernel[...]).T)
    self._train_source = None

  def build_model(self, rngs):
    return hypernet.ZettModel(self.cfg.hypernet, self.lm_cfg, self.vocab, self.base_in,
                              self.base_out, self.dtype, rngs=rngs)

  def loss(self, model, batch, rng):
    del rng
    return hypernet.zett_loss(model, batch, self.cfg.zett.aux_weight)

  def _byte_cfg(self):
    c = self.cfg.copy_and_resolve_references()
    c.data.seq_len = self.cfg.data.seq_len * self.cfg.zett.bytes_per_token
    return c

  def train_documents(self):
    """The training split's documents, from which each step draws `zett.sampler_docs` extra
    documents for the sampler's substring counts (read once; a subclass may substitute
    others)."""
    if self._train_source is None:
      self._train_source = corpus.get_source(self.cfg.data, self.cfg.data.train_split)
    return self._train_source

  def train_iterator(self, process_index, process_count):
    self.train_documents()
    inner = pipeline.make_train_iterator(self._byte_cfg(), self.bytes, process_index,
                                         process_count)
    self._batcher = _Batcher(self, self.cfg.data.seq_len)
    return _zett_base.ZettIterator(inner, self._batcher, self.cfg.data.prefetch)

  def _batcher_for(self, seq_len):
    return _Batcher(self, seq_len)

  def _piece_ids(self, strings, max_pieces):
    return hypernet.piece_ids(self.base.tokenizer, strings, max_pieces)

  def _input_embeddings(self, model, pieces, shared, keep):
    return model.embeddings(pieces, shared, keep)[0]

  def _new_eval_tokenizer(self):
    """`target_tokenizer` if set, else a UnigramLM sampled from the validation text."""
    if self.cfg.target_tokenizer:
      return target_tokenizers.build(self.cfg.target_tokenizer, self.cfg.data,
                                     self.cfg.transfer.text_filter)[0]
    src = corpus.get_source(self.cfg.data, self.cfg.data.eval_split)
    z = self.cfg.zett
    return tokenizer_sampler.sample_unigram(
        [src[i] for i in range(len(src))], z.vocab_size,
        np.random.default_rng([self.cfg.seed, 11]), z.noise_std, z.max_piece_chars,
        (self.sep_string,))

  def eval_batches(self, process_index, process_count, max_batches=0, perturbation=None):
    if perturbation:
      raise ValueError('zett has no perturbation evaluations (set eval.robustness to "")')
    batcher = _Batcher(self, self.cfg.data.seq_len)
    tok = self.eval_tokenizer()
    out = []
    for b in pipeline.make_eval_batches(self._byte_cfg(), self.bytes, process_index,
                                        process_count, max_batches):
      out.append(batcher(b, step=self.cfg.zett.warmup_steps, tok=tok))
    self._stats['eval_tokens_cut'] = batcher.stats['tokens_cut']
    return out

  def flops_per_token(self):
    lm = token_lm.flops_per_token(self.lm_cfg, self.cfg.zett.vocab_size, self.cfg.data.seq_len)
    return lm + self._hypernet_flops_per_token()

  def data_stats(self):
    out = super().data_stats()
    if self._batcher is not None and 'packed_pieces_cut' in self._batcher.stats:
      out['train_packed_pieces_cut'] = self._batcher.stats['packed_pieces_cut']
    return out

  def describe(self):
    z, h = self.cfg.zett, self.cfg.hypernet
    return (f'ZeTT hypernetwork ({h.num_layers} layers, d {h.d_model}, <= {h.max_pieces} '
            f'pieces) on frozen {self.base.meta["source"]} | sampled UnigramLM vocabularies of '
            f'{z.vocab_size} (noise {z.noise_std}) | warm-up {z.warmup_steps} steps | '
            f'{self.cfg.data.seq_len} tokens x batch {self.cfg.train.batch_size}')


Family = ZettFamily
