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

Encoders (`zett.kind='encoder'`, configs/zett.py:minilm; `EncoderZettFamily`, chosen by
`ZettFamily.__new__`, same trainer, same prefetching iterator): the text units are sentences of
the train split's `transfer.text_filter` documents (data/sentences.split_document, at most
`zett.max_text_bytes` bytes), `train.batch_size` per step from a permutation per epoch seeded
by (seed, epoch), so the iterator's state is its step. The step's tokenizer is an uncased
BERT-style WordPiece sampled from the substring counts of the step's sentences plus
`zett.sampler_docs` training documents drawn for this step, with log-normal noise
(data/tokenizer_sampler.sample_wordpiece; [PAD] [UNK] [CLS] [SEP] [MASK] keep the base rows),
at most `zett.vocab_size` tokens (the vocabulary arrays are padded to it: one compilation).
New tokens are split into base pieces by `models.hypernet.wordpiece_split`. The loss is
self-supervised (models/hypernet.zett_encoder_loss): the frozen encoder's sentence embedding
under the sampled tokenizer with predicted embeddings vs under its own tokenizer, each row
`data.seq_len` tokens ([CLS] .. [SEP], cut beyond, counted). Evaluation: mean cosine
(`cosine_mean`, and loss = 1 - it) on the validation sentences under the fixed tokenizer
(`target_tokenizer`, e.g. wordpiece:8192, else a WordPiece sampled from the validation text).
There is no identity warm-up (`zett.warmup_steps` must be 0: the FVT anchor starts there).
"""
from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from data import corpus, encoders, pipeline, sentences, target_tokenizers, tokenizer_sampler
from models import hypernet, token_lm
from train import families
from train.families import pretrained


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
    slots = float(self.fam.cfg.hypernet.get('packed_slots', 0.0))
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
      extra = [fam.train_source[int(i)][:z.sampler_doc_chars] for i in
               rng.choice(len(fam.train_source), min(z.sampler_docs, len(fam.train_source)),
                          replace=False)]
      tok = tokenizer_sampler.sample_unigram(texts + extra, z.vocab_size, rng, z.noise_std,
                                             z.max_piece_chars, (fam.sep_string,))
    out.update(self.vocab_arrays(tok))
    out.update(self.tokenized(tok, texts, b))
    return out


class ZettIterator:
  """Checkpointable iterator of ZeTT batches with its own prefetch thread: its state is the
  byte iterator's state plus the step count (which fixes the warm-up and the sampler's
  randomness)."""

  def __init__(self, inner: pipeline.TrainIterator, batcher: _Batcher, prefetch: int = 2):
    self.inner, self.batcher, self.prefetch = inner, batcher, prefetch
    self.step = 0
    self._state = {**inner.get_state(), 'zett_step': 0}
    self._thread = None
    self._start()

  def _start(self):
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=max(self.prefetch, 1))
    inner, batcher, stop, q, step0 = self.inner, self.batcher, self._stop, self._queue, self.step

    def run():
      step = step0
      try:
        while not stop.is_set():
          bb = next(inner)
          item = ('ok', batcher(bb, step), {**inner.get_state(), 'zett_step': step + 1})
          step += 1
          pipeline.put_unless_stopped(q, item, stop)
      except BaseException as e:  # pylint: disable=broad-except
        pipeline.put_unless_stopped(q, ('error', e, None), stop)

    self._thread = threading.Thread(target=run, name='ZettIterator', daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    kind, batch, state = self._queue.get()
    if kind == 'error':
      raise batch
    self._state = state
    return batch

  def get_state(self):
    return dict(self._state)

  def set_state(self, state):
    self.close()
    self.step = int(state.get('zett_step', 0))
    self.inner.set_state({k: v for k, v in state.items() if k != 'zett_step'})
    self._state = dict(state)
    self._start()

  def close(self):
    if self._thread is not None:
      pipeline.stop_thread(self._thread, self._stop, self._queue)
      self._thread = None
    self.inner.close()

  @property
  def source(self):
    return self.inner.source


def _kind(cfg) -> str:
  kind = str(cfg.zett.get('kind', 'decoder'))
  if kind not in ('decoder', 'encoder'):
    raise ValueError(f"zett.kind={kind!r}: expected 'decoder' or 'encoder'")
  return kind


def _load_base(cfg, kind: str):
  """The frozen base of `model.source`, refused when it is not of the run's `zett.kind`."""
  base = pretrained.load_source(cfg.model.source)
  got = 'encoder' if base.meta.get('kind') == 'encoder' else 'decoder'
  if got != kind:
    preset = 'configs/zett.py:minilm' if got == 'encoder' else 'configs/zett.py:smollm2'
    art = {'encoder': 'an encoder', 'decoder': 'a decoder'}
    raise ValueError(f'model.source={cfg.model.source!r} is {art[got]} model, but '
                     f'zett.kind={kind!r} trains {art[kind]} hypernetwork: use {preset}')
  return base


class ZettFamily(families.Family):

  def __new__(cls, cfg, workdir=None):
    del workdir
    if cls is ZettFamily and _kind(cfg) == 'encoder':
      cls = EncoderZettFamily
    return super().__new__(cls)

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    if jax.process_count() > 1:
      raise ValueError('zett training samples one tokenizer per step from host-local text: '
                       'run it as one process (any number of local devices)')
    self.base = _load_base(cfg, _kind(cfg))
    self.lm_cfg = self.base.cfg_model
    self.base_vocab = self.base.tokenizer.get_vocab(with_added_tokens=True)
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
    slots = float(cfg.hypernet.get('packed_slots', 0.0))
    if slots and not 1.0 <= slots <= hypernet.PACK_ROW:
      raise ValueError(f'hypernet.packed_slots={slots}: expected 0 (padded) or a number of '
                       f'slots per token in [1, {hypernet.PACK_ROW}]')
    if cfg.zett.warmup_tokens > len(self.regular_ids):
      raise ValueError(f'zett.warmup_tokens={cfg.zett.warmup_tokens} exceeds the '
                       f'{len(self.regular_ids)} regular base tokens')
    self.base_in = e
    self.base_out = (None if self.lm_cfg.tie_embeddings else
                     np.asarray(self.base.model.readout.kernel[...]).T)
    self.train_source = None
    self._eager = None
    self._eval_tok = None
    self._batcher = None

  def trainable(self):
    return nnx.All(nnx.Param, nnx.PathContains('hypernet'))

  def build_model(self, rngs):
    return hypernet.ZettModel(self.cfg.hypernet, self.lm_cfg, self.vocab, self.base_in,
                              self.base_out, self.dtype, rngs=rngs)

  def _eager_model(self):
    if self._eager is None:
      m = self.build_model(nnx.Rngs(self.cfg.seed))
      nnx.update(m.lm, nnx.state(self.base.model))
      self._eager = m
    return self._eager

  def initial_params(self):
    return nnx.to_pure_dict(nnx.state(self._eager_model(), self.trainable()))

  def frozen_params(self):
    return nnx.to_pure_dict(nnx.state(self._eager_model(), nnx.Not(self.trainable())))

  def loss(self, model, batch, rng):
    del rng
    return hypernet.zett_loss(model, batch, self.cfg.zett.aux_weight)

  def _byte_cfg(self):
    c = self.cfg.copy_and_resolve_references()
    c.data.seq_len = self.cfg.data.seq_len * self.cfg.zett.bytes_per_token
    return c

  def train_iterator(self, process_index, process_count):
    self.train_source = corpus.get_source(self.cfg.data, self.cfg.data.train_split)
    inner = pipeline.make_train_iterator(self._byte_cfg(), self.bytes, process_index,
                                         process_count)
    self._batcher = _Batcher(self, self.cfg.data.seq_len)
    return ZettIterator(inner, self._batcher, self.cfg.data.prefetch)

  def eval_tokenizer(self):
    """The fixed evaluation tokenizer: the run's recorded one, else `_new_eval_tokenizer()`
    (see the module doc)."""
    if self._eval_tok is None:
      recorded = self.recorded('eval_tokenizer.json')
      self._eval_tok = (tokenizers.Tokenizer.from_str(recorded.decode()) if recorded is not None
                        else self._new_eval_tokenizer())
    return self._eval_tok

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

  def artifacts(self) -> dict[str, bytes]:
    return {'eval_tokenizer.json': self.eval_tokenizer().to_str().encode()}

  def sample(self, model, cfg_sample):
    """A look at the predictions: the nearest base tokens (cosine) of a few eval tokens that the
    base vocabulary does not have."""
    b = _Batcher(self, 8).vocab_arrays(self.eval_tokenizer())
    new = np.flatnonzero((b['vocab_shared'] < 0) & (b['vocab_pieces'][:, 1] >= 0))[:6]
    e_in, _ = model.embeddings(jnp.asarray(b['vocab_pieces'][new]),
                               jnp.asarray(b['vocab_shared'][new]),
                               jnp.asarray(b['vocab_keep'][new]))
    e = np.asarray(e_in)
    base = self.base_in / np.linalg.norm(self.base_in, axis=-1, keepdims=True)
    sim = (e / np.linalg.norm(e, axis=-1, keepdims=True)) @ base.T
    tok = self.eval_tokenizer()
    parts = [f'{tok.id_to_token(int(i))!r} -> {self.base.tokenizer.id_to_token(int(j))!r}'
             for i, j in zip(new, sim.argmax(-1))]
    return ['nearest base token of predicted embeddings: ' + ', '.join(parts)]

  def flops_per_token(self):
    lm = token_lm.flops_per_token(self.lm_cfg, self.cfg.zett.vocab_size, self.cfg.data.seq_len)
    h = self.cfg.hypernet
    per_vocab_row = 6 * h.max_pieces * h.num_layers * (4 * h.d_model ** 2
                                                       + 2 * h.d_model * h.mlp_dim)
    rows = self.cfg.train.batch_size * self.cfg.data.seq_len
    return lm + per_vocab_row * self.cfg.zett.vocab_size / rows

  def data_stats(self):
    out = super().data_stats()
    if self._batcher is not None:
      out['train_tokens_cut'] = self._batcher.stats['tokens_cut']
      out['train_tokens'] = self._batcher.stats['tokens']
      if 'packed_pieces_cut' in self._batcher.stats:
        out['train_packed_pieces_cut'] = self._batcher.stats['packed_pieces_cut']
    return out

  def describe(self):
    z, h = self.cfg.zett, self.cfg.hypernet
    return (f'ZeTT hypernetwork ({h.num_layers} layers, d {h.d_model}, <= {h.max_pieces} '
            f'pieces) on frozen {self.base.meta["source"]} | sampled UnigramLM vocabularies of '
            f'{z.vocab_size} (noise {z.noise_std}) | warm-up {z.warmup_steps} steps | '
            f'{self.cfg.data.seq_len} tokens x batch {self.cfg.train.batch_size}')



# -- encoders ------------------------------------------------------------------------------------
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
                                  fam.train_docs)
    out = self.vocab_arrays(tok)
    pad = tok.token_to_id('[PAD]') or 0
    out['inputs'], out['mask'] = self.rows(tok, texts, batch, pad, count=True)
    out['orig_ids'], out['orig_mask'] = self.rows(fam.base.tokenizer, texts, batch,
                                                  int(fam.base.meta['pad_id']), count=False)
    out['row_weight'] = (np.arange(batch) < len(texts)).astype(np.float32)
    out['text_bytes'] = np.array([len(x.encode()) for x in texts] + [0] * (batch - len(texts)),
                                 np.int32)
    return out


class EncoderZettFamily(ZettFamily):
  """ZeTT for a frozen BERT sentence encoder (see the module doc)."""

  def __init__(self, cfg, workdir=None):  # pylint: disable=super-init-not-called
    families.Family.__init__(self, cfg, workdir)  # the decoder's set-up does not apply
    if jax.process_count() > 1:
      raise ValueError('zett training samples one tokenizer per step from host-local text: '
                       'run it as one process (any number of local devices)')
    self.base = _load_base(cfg, 'encoder')
    if cfg.zett.warmup_steps:
      raise ValueError(f'zett.warmup_steps={cfg.zett.warmup_steps}: the encoder hypernetwork '
                       'has no identity warm-up (set 0; anchor fvt starts from FVT)')
    if float(cfg.hypernet.get('packed_slots', 0.0)):
      raise ValueError(f'hypernet.packed_slots={cfg.hypernet.packed_slots}: packed pieces are '
                       'implemented for decoder hypernetworks only (set 0 for zett.kind=encoder)')
    self.lm_cfg = self.base.cfg_model
    self.base_vocab = self.base.tokenizer.get_vocab(with_added_tokens=True)
    self.base_in = np.asarray(self.base.model.words.embedding[...])
    self.vocab = self.base_in.shape[0]
    self.train_docs = None
    self._eager = None
    self._eval_tok = None
    self._batcher = None

  def build_model(self, rngs):
    return hypernet.ZettEncoderModel(self.cfg.hypernet, self.lm_cfg, self.base_in, self.dtype,
                                     rngs=rngs)

  def _eager_model(self):
    if self._eager is None:
      m = self.build_model(nnx.Rngs(self.cfg.seed))
      nnx.update(m.encoder, nnx.state(self.base.model))
      self._eager = m
    return self._eager

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

  def train_iterator(self, process_index, process_count):
    del process_index, process_count  # one process (checked in __init__)
    self.train_docs = self._docs(self.cfg.data.train_split)
    texts = self._sentences(self.train_docs)
    self._batcher = _EncoderBatcher(self, self.cfg.data.seq_len)
    stream = _SentenceStream(texts, self.cfg.train.batch_size, self.cfg.seed)
    return ZettIterator(stream, self._batcher, self.cfg.data.prefetch)

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

  def sample(self, model, cfg_sample):
    """The nearest base tokens (cosine) of the predictions for a few new eval tokens."""
    tok = self.eval_tokenizer()
    b = _EncoderBatcher(self, 8).vocab_arrays(tok)
    new = np.flatnonzero((b['vocab_shared'] < 0) & (b['vocab_pieces'][:, 1] >= 0))[:6]
    e = np.asarray(model.embeddings(jnp.asarray(b['vocab_pieces'][new]),
                                    jnp.asarray(b['vocab_shared'][new]),
                                    jnp.asarray(b['vocab_keep'][new])))
    base = self.base_in / np.linalg.norm(self.base_in, axis=-1, keepdims=True)
    sim = (e / np.linalg.norm(e, axis=-1, keepdims=True)) @ base.T
    parts = [f'{tok.id_to_token(int(i))!r} -> {self.base.tokenizer.id_to_token(int(j))!r}'
             for i, j in zip(new, sim.argmax(-1))]
    return ['nearest base token of predicted embeddings: ' + ', '.join(parts)]

  def flops_per_token(self):
    m, h = self.lm_cfg, self.cfg.hypernet
    per_token = m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.mlp_dim)
    # forward + backward under the sampled tokenizer, one forward under the original one
    enc = 8 * per_token
    per_vocab_row = 6 * h.max_pieces * h.num_layers * (4 * h.d_model ** 2
                                                       + 2 * h.d_model * h.mlp_dim)
    rows = self.cfg.train.batch_size * self.cfg.data.seq_len
    return enc + per_vocab_row * self.cfg.zett.vocab_size / rows

  def describe(self):
    z, h = self.cfg.zett, self.cfg.hypernet
    return (f'ZeTT encoder hypernetwork ({h.num_layers} layers, d {h.d_model}, <= '
            f'{h.max_pieces} pieces) on frozen {self.base.meta["source"]} | sampled WordPiece '
            f'vocabularies of <= {z.vocab_size} (noise {z.noise_std}) | sentence-embedding '
            f'cosine loss | {self.cfg.data.seq_len} tokens x batch {self.cfg.train.batch_size}')


Family = ZettFamily
