"""ZeTT encoder family (`family='zett_encoder'`, configs/zett.py:minilm): trains the embedding
hypernetwork of a frozen BERT sentence encoder on WordPiece tokenizers sampled on the fly (the
decoder LM family is train/families/zett.py; the two share train/families/_zett_base.py: the
frozen base, the prefetching iterator, the recorded evaluation tokenizer).

The text units are sentences of the train split's `transfer.text_filter` documents
(data/sentences.split_document, at most `zett.max_text_bytes` bytes), `train.batch_size` per
step from a permutation per epoch seeded by (seed, epoch), so the iterator's state is its step.
The step's tokenizer is an uncased BERT-style WordPiece sampled from the substring counts of the
step's sentences plus `zett.sampler_docs` training documents drawn for this step, with
log-normal noise (data/tokenizer_sampler.sample_wordpiece; [PAD] [UNK] [CLS] [SEP] [MASK] keep the
base rows), at most `zett.vocab_size` tokens (the vocabulary arrays are padded to it: one
compilation). New tokens are split into base pieces by `models.hypernet.wordpiece_split`. The
loss is self-supervised (models/hypernet.zett_encoder_loss): the frozen encoder's sentence
embedding under the sampled tokenizer with predicted embeddings vs under its own tokenizer, each
row `data.seq_len` tokens ([CLS] .. [SEP], cut beyond, counted). Evaluation: mean cosine
(`cosine_mean`, and loss = 1 - it) on the validation sentences under the fixed tokenizer
(`target_tokenizer`, e.g. wordpiece:8192, else a WordPiece sampled from the validation text).
There is no identity warm-up (`zett.warmup_steps` must be 0: the FVT anchor starts there).
"""
from __future__ import annotations

import numpy as np

from data import sentences, target_tokenizers, tokenizer_sampler
from models import hypernet
from train.families import _zett_base


class _SentenceStream:
  """`batch` training sentences per step: epoch e reads a permutation seeded by (seed, e), so
  step k's sentences are a function of k and the state is the step (exact resume)."""

  def __init__(self, texts: list[str], batch: int, seed: int):
    self.texts, self.batch, self.seed = texts, batch, seed
    self.step = 0
    self._perm = (-1, None)

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, 5, epoch]).permutation(
          len(self.texts)))
    return self._perm[1]

  def __next__(self) -> list[str]:
    out = []
    for k in range(self.step * self.batch, (self.step + 1) * self.batch):
      epoch, i = divmod(k, len(self.texts))
      out.append(self.texts[self._order(epoch)[i]])
    self.step += 1
    return out

  def get_state(self):
    return {'text_step': self.step}

  def set_state(self, state):
    self.step = int(state['text_step'])

  def close(self):
    pass

  source = None


class _EncoderBatcher:
  """Sentences -> an encoder ZeTT batch for one step (runs on the prefetch thread)."""

  def __init__(self, fam, seq_len: int):
    self.fam, self.seq_len = fam, seq_len
    self.stats = {'tokens_cut': 0, 'tokens': 0}

  def sample_tokenizer(self, texts: list[str], rng: np.random.Generator, docs: list[str]):
    """A WordPiece sampled from `texts` + `zett.sampler_docs` of `docs` drawn with `rng`."""
    z = self.fam.cfg.zett
    pick = rng.choice(len(docs), min(z.sampler_docs, len(docs)), replace=False) if docs else []
    extra = [docs[int(i)][:z.sampler_doc_chars] for i in pick]
    return tokenizer_sampler.sample_wordpiece(list(texts) + extra, z.vocab_size, rng,
                                              z.noise_std, z.max_piece_chars)

  def vocab_arrays(self, tok) -> dict:
    fam = self.fam
    vocab = tok.get_vocab(with_added_tokens=True)
    v = max(fam.cfg.zett.vocab_size, max(vocab.values()) + 1)  # a larger eval target: its size
    strings = [''] * v
    for s, i in vocab.items():
      strings[i] = s
    pieces = hypernet.wordpiece_piece_ids(fam.base_vocab, strings, fam.cfg.hypernet.max_pieces)
    shared = np.array([fam.base_vocab.get(s, -1) if s else -1 for s in strings], np.int32)
    keep = np.zeros(v, np.int32)
    unk = fam.base_vocab.get('[UNK]', 0)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for s in specials | set(tokenizer_sampler.BERT_SPECIALS):
      i = vocab.get(s)
      if i is not None:
        keep[i], shared[i] = 1, fam.base_vocab.get(s, unk)
    return {'vocab_pieces': pieces, 'vocab_shared': shared, 'vocab_keep': keep}

  def rows(self, tok, texts: list[str], batch: int, pad_id: int, count: bool) -> tuple:
    """(ids, mask) int32 [batch, seq_len] of `texts` encoded by `tok` ([CLS] .. [SEP]); tokens
    past seq_len are cut (counted when `count`); rows past the texts show one pad token."""
    t = self.seq_len
    ids = np.full((batch, t), pad_id, np.int32)
    mask = np.zeros((batch, t), np.int32)
    mask[len(texts):, 0] = 1  # padding rows (weight 0): one visible token, no empty softmax
    for r, e in enumerate(tok.encode_batch(texts) if texts else []):
      x = e.ids[:t]
      ids[r, :len(x)], mask[r, :len(x)] = x, 1
      if count:
        self.stats['tokens'] += len(e.ids)
        self.stats['tokens_cut'] += len(e.ids) - len(x)
    return ids, mask

  def __call__(self, texts: list[str], step: int, tok=None, batch: int | None = None) -> dict:
    fam = self.fam
    batch = batch or len(texts)
    if tok is None:
      tok = self.sample_tokenizer(texts, np.random.default_rng([fam.cfg.seed, 7, step]),
                                  fam.train_documents())
    out = self.vocab_arrays(tok)
    pad = tok.token_to_id('[PAD]') or 0
    out['inputs'], out['mask'] = self.rows(tok, texts, batch, pad, count=True)
    out['orig_ids'], out['orig_mask'] = self.rows(fam.base.tokenizer, texts, batch,
                                                  int(fam.base.meta['pad_id']), count=False)
    out['row_weight'] = (np.arange(batch) < len(texts)).astype(np.float32)
    out['text_bytes'] = np.array([len(x.encode()) for x in texts] + [0] * (batch - len(texts)),
                                 np.int32)
    return out


class EncoderZettFamily(_zett_base.ZettBase):
  """ZeTT for a frozen BERT sentence encoder (see the module doc)."""

  KIND = 'encoder'
  BASE_ATTR = 'encoder'

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    if cfg.zett.warmup_steps:
      raise ValueError(f'zett.warmup_steps={cfg.zett.warmup_steps}: the encoder hypernetwork '
                       'has no identity warm-up (set 0; anchor fvt starts from FVT)')
    if float(cfg.hypernet.packed_slots):
      raise ValueError(f'hypernet.packed_slots={cfg.hypernet.packed_slots}: packed pieces are '
                       'implemented for decoder hypernetworks only (set 0 for family '
                       'zett_encoder)')
    self.base_in = np.asarray(self.base.model.words.embedding[...])
    self.vocab = self.base_in.shape[0]
    self._train_docs = None

  def build_model(self, rngs):
    return hypernet.ZettEncoderModel(self.cfg.hypernet, self.lm_cfg, self.base_in, self.dtype,
                                     rngs=rngs)

  def loss(self, model, batch, rng):
    del rng
    return hypernet.zett_encoder_loss(model, batch, self.cfg.zett.aux_weight)

  def _docs(self, split: str) -> list[str]:
    docs = list(target_tokenizers.texts(self.cfg.data, split, self.cfg.transfer.text_filter))
    if not docs:
      raise ValueError(f'no {split} documents of data.source={self.cfg.data.source!r} match '
                       f'transfer.text_filter={self.cfg.transfer.text_filter!r}')
    return docs

  def _sentences(self, docs: list[str]) -> list[str]:
    return [s for d in docs for s in sentences.split_document(d, self.cfg.zett.max_text_bytes)]

  def train_documents(self) -> list[str]:
    """The training split's `transfer.text_filter` documents: split into the training
    sentences, and each step draws `zett.sampler_docs` of them for the sampler's substring
    counts (read once; a subclass may substitute others)."""
    if self._train_docs is None:
      self._train_docs = self._docs(self.cfg.data.train_split)
    return self._train_docs

  def train_iterator(self, process_index, process_count):
    del process_index, process_count  # one process (checked in __init__)
    texts = self._sentences(self.train_documents())
    self._batcher = _EncoderBatcher(self, self.cfg.data.seq_len)
    stream = _SentenceStream(texts, self.cfg.train.batch_size, self.cfg.seed)
    return _zett_base.ZettIterator(stream, self._batcher, self.cfg.data.prefetch)

  def _batcher_for(self, seq_len):
    return _EncoderBatcher(self, seq_len)

  def _piece_ids(self, strings, max_pieces):
    return hypernet.wordpiece_piece_ids(self.base_vocab, strings, max_pieces)

  def _input_embeddings(self, model, pieces, shared, keep):
    return model.embeddings(pieces, shared, keep)

  def derived_metrics(self, sums):
    """The mean cosine over real sentences (`cosine_mean`) and the loss, 1 - it."""
    if sums.get('n_texts', 0.0) <= 0:
      return {}
    mean = sums['cosine_sum'] / sums['n_texts']
    return {'cosine_mean': mean, 'loss': 1.0 - mean}

  def headline_metrics(self):
    return {'cosine_mean': 'mean cosine'}

  def _new_eval_tokenizer(self):
    """`target_tokenizer` (a WordPiece) if set, else a WordPiece sampled from the validation
    documents."""
    if self.cfg.target_tokenizer:
      return target_tokenizers.build_encoder_target(self.cfg.target_tokenizer, self.cfg.data,
                                                    self.cfg.transfer.text_filter)[0]
    return _EncoderBatcher(self, 8).sample_tokenizer(
        self._docs(self.cfg.data.eval_split), np.random.default_rng([self.cfg.seed, 11]), [])

  def eval_batches(self, process_index, process_count, max_batches=0, perturbation=None):
    del process_index, process_count
    if perturbation:
      raise ValueError('zett has no perturbation evaluations (set eval.robustness to "")')
    texts = self._sentences(self._docs(self.cfg.data.eval_split))
    b = self.cfg.train.batch_size
    if max_batches:
      texts = texts[:max_batches * b]
    batcher = _EncoderBatcher(self, self.cfg.data.seq_len)
    tok = self.eval_tokenizer()
    out = [batcher(texts[i:i + b], 0, tok=tok, batch=b) for i in range(0, len(texts), b)]
    self._stats['eval_tokens_cut'] = batcher.stats['tokens_cut']
    return out

  def flops_per_token(self):
    m = self.lm_cfg
    per_token = m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.mlp_dim)
    # forward + backward under the sampled tokenizer, one forward under the original one
    return 8 * per_token + self._hypernet_flops_per_token()

  def describe(self):
    z, h = self.cfg.zett, self.cfg.hypernet
    return (f'ZeTT encoder hypernetwork ({h.num_layers} layers, d {h.d_model}, <= '
            f'{h.max_pieces} pieces) on frozen {self.base.meta["source"]} | sampled WordPiece '
            f'vocabularies of <= {z.vocab_size} (noise {z.noise_std}) | sentence-embedding '
            f'cosine loss | {self.cfg.data.seq_len} tokens x batch {self.cfg.train.batch_size}')


Family = EncoderZettFamily
