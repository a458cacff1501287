"""Sentence space: documents as sequences of sentences, their embeddings cached once.

Splitting (`split_document`): non-text characters (C0/C1 controls, U+FFFD left by undecodable
bytes, lone surrogates) become spaces and are counted; paragraphs (blank lines) are split into
sentences after `.`, `!` or `?` (closing quotes/brackets included) when the next character
starts a sentence (upper case, digit, quote, bracket, backtick); whitespace inside a sentence
is collapsed. A sentence longer than `max_bytes` UTF-8 bytes is re-split at its best boundary:
the last `; `, `: `, `, ` or ` ` (in that order of preference) in its second half-window, else
at the last character boundary (counted as `sentences_resplit`). Empty documents are skipped
and counted; a one-sentence document is kept (it yields one target: the end-of-text sentence).

Cache (`build_cache` / `SentenceSpace`): for one split and one sentence encoder, the documents
become sentence ids, and every sentence is embedded once:
  DIR/sentences.array_record   record i = UTF-8 text of sentence id i (random access)
  DIR/embeddings.npy           float32 [N, D], row i = embedding of sentence id i (memory-mapped)
  DIR/docs.npy                 int64 [n_docs + 1]: document d = ids docs[d] .. docs[d+1]-1
  DIR/meta.json                encoder, dimension, counts; written last (marks completion)
Ids 0, 1, 2 are special: padding (zero vector), beginning of document (zero vector; the models
replace it by their own start vector) and end of text (the embedding of `eot_text`, as the
reference appends "End of text." to every document). DIR sits in the data dir under a hash
of (source, split, filter, caps, encoder), so the same request reads the same cache.

`SentenceIndex` makes the cache look like a document source + encoder for `data.pipeline`, so
LCM batches are packed, sharded, shuffled and resumed exactly like token batches: the "tokens"
are sentence ids, `token_bytes` their UTF-8 lengths (so a run reports sentences and bytes).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import threading
import unicodedata
from typing import Any

import numpy as np

from data import corpus, encoders

PAD_ID, BOS_ID, EOT_ID = 0, 1, 2
BYTE_OFFSET = encoders.BYTE_OFFSET  # decoder rows hold byte-encoder ids
NUM_SPECIAL = 3
EOT_TEXT = 'End of text.'

_NON_TEXT = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff]')
_PARAGRAPH = re.compile(r'\n\s*\n')
_SENT_END = re.compile(r'[.!?]["\')\]]*\s+(?=[A-Z0-9"\'(\[`*])')
_BOUNDARIES = ('; ', ': ', ', ', ' ')


def clean_text(text: str) -> tuple[str, int]:
  """(text with non-text characters replaced by spaces, how many were replaced)."""
  cleaned, n = _NON_TEXT.subn(' ', text)
  return unicodedata.normalize('NFC', cleaned), n


def _utf8_prefix(b: bytes, n: int) -> int:
  """Largest cut <= n that does not split a UTF-8 character of `b`."""
  n = min(n, len(b))
  while 0 < n < len(b) and (b[n] & 0xC0) == 0x80:
    n -= 1
  return n


def cap_sentence(sentence: str, max_bytes: int) -> list[str]:
  """`sentence` as pieces of at most `max_bytes` UTF-8 bytes, cut at the best boundary."""
  if max_bytes < 8:
    raise ValueError(f'max_bytes={max_bytes}: a sentence cap below 8 bytes is not useful')
  out = []
  b = sentence.encode('utf-8')
  while len(b) > max_bytes:
    window = b[:max_bytes + 1]  # a boundary space right after the cap still counts
    cut = 0
    for sep in _BOUNDARIES:
      pos = window.rfind(sep.encode(), max_bytes // 2)
      if pos >= 0 and pos + len(sep.rstrip()) <= max_bytes:
        cut = pos + len(sep.rstrip())
        break
    if cut == 0:
      cut = _utf8_prefix(b, max_bytes)
    piece = b[:cut].decode('utf-8').strip()
    if piece:
      out.append(piece)
    b = b[cut:].lstrip()
  rest = b.decode('utf-8').strip()
  if rest:
    out.append(rest)
  return out


def split_document(text: str, max_bytes: int,
                   stats: collections.Counter | None = None) -> list[str]:
  """The sentences of one document (see the module doc), each at most `max_bytes` bytes."""
  stats = stats if stats is not None else collections.Counter()
  text, removed = clean_text(text)
  stats['chars_non_text'] += removed
  out = []
  for para in _PARAGRAPH.split(text):
    para = ' '.join(para.split())
    if not para:
      continue
    start = 0
    pieces = []
    for m in _SENT_END.finditer(para):
      pieces.append(para[start:m.end()].strip())
      start = m.end()
    pieces.append(para[start:].strip())
    for s in pieces:
      if not s:
        continue
      capped = cap_sentence(s, max_bytes)
      if len(capped) > 1:
        stats['sentences_resplit'] += 1
      out.extend(capped)
  if not out:
    stats['docs_empty'] += 1
  elif len(out) == 1:
    stats['docs_one_sentence'] += 1
  return out


# -- sentence encoders: the interface the cache needs ----------------------------------------
class TextsOnly:
  """The sentence "encoder" of a texts-only space (`spec='none'`): a sentence autoencoder makes
  its own embeddings, so the cache keeps texts and documents with zero-width embeddings.

  Any sentence encoder passed to `load_space` has this interface: `spec` (str), `identity` (a
  string that changes when the encoder's weights do: it keys the cache), `dim` (int) and
  `__call__(texts) -> float32 [N, dim]`. The real ones (MiniLM / HF BERT, a trained sentence
  autoencoder) live above this layer (models/pretrained.py SentenceEncoder,
  train/families/sentence_decoder.py)."""
  spec = identity = 'none'
  dim = 0

  def __call__(self, texts) -> np.ndarray:
    return np.zeros((len(list(texts)), 0), np.float32)


# -- the cache ------------------------------------------------------------------------------
def cache_dir(cfg_data, split: str, encoder_identity: str) -> str:
  key = json.dumps({'source': cfg_data.source, 'split': split,
                    'max_docs': int(cfg_data.max_docs), 'doc_filter': cfg_data.doc_filter,
                    'max_doc_chars': int(cfg_data.max_doc_chars),
                    'max_sentence_bytes': int(cfg_data.max_sentence_bytes),
                    'holdout': float(cfg_data.get('holdout_docs', 0.0)),
                    'encoder': encoder_identity, 'eot': EOT_TEXT, 'version': 1},
                   sort_keys=True)
  h = hashlib.sha1(key.encode()).hexdigest()[:16]
  return os.path.join(corpus.default_data_dir(cfg_data.get('data_dir', '')), 'notoklm_sentences',
                      f'{split}-{h}')


def build_cache(cfg_data, split: str, encoder, directory: str,
                log=print) -> None:
  """Splits and embeds the documents of `split` into `directory` (see the module doc)."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  pattern = re.compile(cfg_data.doc_filter) if cfg_data.doc_filter else None
  holdout = float(cfg_data.get('holdout_docs', 0.0))
  stats = collections.Counter()
  texts: list[str] = []
  offsets = [0]
  special = ['', '', EOT_TEXT]
  # (source, which documents): with data.holdout_docs > 0 a fixed share of the training split's
  # documents (by a hash of their name) moves from the training to the evaluation space.
  plan = [(corpus.get_source(cfg_data, split),
           'not_held' if holdout > 0 and split == cfg_data.train_split else 'all')]
  if holdout > 0 and split == cfg_data.eval_split:
    plan.append((corpus.get_source(cfg_data, cfg_data.train_split), 'held'))
  for source, which in plan:
    for i in range(len(source)):
      rec = source.record(i)
      name = str(rec.get('name', f'{source.name}#{i}'))
      if pattern is not None:
        if 'name' not in rec:
          raise ValueError(f'data.doc_filter={cfg_data.doc_filter!r} needs documents with a '
                           f"'name' field; {source.name} has fields {sorted(rec)}")
        if not pattern.search(name):
          stats['docs_filtered_out'] += 1
          continue
      held = which != 'all' and corpus.stable_bucket('holdout:' + name) < holdout
      if (which == 'held') != held:
        continue
      stats['docs_held_out' if held else 'docs'] += 1
      sents = split_document(source[i], int(cfg_data.max_sentence_bytes), stats)
      if not sents:
        continue
      texts.extend(sents)
      offsets.append(len(texts))
  source = plan[0][0]
  if len(offsets) == 1:
    raise ValueError(f'{source.name} split {split!r}: no document with text left '
                     f'(data.doc_filter={cfg_data.doc_filter!r}; counts {dict(stats)})')
  tmp = directory + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  all_texts = special + texts
  log(f'sentence cache: embedding {len(texts)} sentences of {len(offsets) - 1} documents '
      f'({source.name} {split}) with {encoder.spec} into {directory}')
  emb = np.lib.format.open_memmap(os.path.join(tmp, 'embeddings.npy'), 'w+', np.float32,
                                  (len(all_texts), encoder.dim))
  emb[:NUM_SPECIAL] = 0
  emb[EOT_ID] = encoder([EOT_TEXT])[0]
  chunk = 4096
  for s in range(0, len(texts), chunk):
    emb[NUM_SPECIAL + s:NUM_SPECIAL + s + chunk] = encoder(texts[s:s + chunk])
  emb.flush()
  del emb
  writer = arm.ArrayRecordWriter(os.path.join(tmp, 'sentences.array_record'), 'group_size:1')
  for t in all_texts:
    writer.write(t.encode('utf-8'))
  writer.close()
  np.save(os.path.join(tmp, 'docs.npy'), np.asarray(offsets, np.int64) + NUM_SPECIAL)
  meta = {'encoder': encoder.spec, 'encoder_identity': encoder.identity, 'dim': encoder.dim,
          'source': source.name, 'split': split, 'documents': len(offsets) - 1,
          'sentences': len(texts), 'eot_text': EOT_TEXT,
          'max_sentence_bytes': int(cfg_data.max_sentence_bytes), 'stats': dict(stats)}
  with open(os.path.join(tmp, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)


class SentenceSpace:
  """One split's cached sentences: texts, embeddings [N, D] (memory-mapped), documents."""

  def __init__(self, directory: str):
    from array_record.python import array_record_data_source as ards  # pylint: disable=import-outside-toplevel
    meta_path = os.path.join(directory, 'meta.json')
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f'no sentence cache in {directory} (meta.json missing)')
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.directory = directory
    self.embeddings = np.load(os.path.join(directory, 'embeddings.npy'), mmap_mode='r')
    self.docs = np.load(os.path.join(directory, 'docs.npy'))
    self._texts = ards.ArrayRecordDataSource([os.path.join(directory, 'sentences.array_record')])
    self._lock = threading.Lock()
    self.dim = int(self.meta['dim'])
    self.num_sentences = int(self.embeddings.shape[0])
    lengths = np.zeros(self.num_sentences, np.int32)
    self.byte_lengths = lengths  # filled lazily by `token_bytes`
    self._lengths_done = False

  @property
  def num_docs(self) -> int:
    return len(self.docs) - 1

  def doc_ids(self, d: int) -> np.ndarray:
    return np.arange(self.docs[d], self.docs[d + 1], dtype=np.int32)

  def texts(self, ids) -> list[str]:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    with self._lock:
      recs = self._texts.__getitems__(ids) if ids else []
    return [r.decode('utf-8') for r in recs]

  def token_bytes(self) -> np.ndarray:
    if not self._lengths_done:
      step = 65536
      for s in range(NUM_SPECIAL, self.num_sentences, step):
        ids = range(s, min(s + step, self.num_sentences))
        self.byte_lengths[s:s + len(ids)] = [len(t.encode('utf-8')) for t in self.texts(ids)]
      self._lengths_done = True
    return self.byte_lengths


def load_space(cfg_data, split: str, encoder, log=print) -> SentenceSpace:
  """The cached sentence space of `split` for `encoder` (see `TextsOnly` for the interface),
  built on first use (file-locked, so concurrent processes build it once)."""
  directory = cache_dir(cfg_data, split, encoder.identity)
  if not os.path.exists(os.path.join(directory, 'meta.json')):
    with corpus.file_lock(directory + '.lock'):
      if not os.path.exists(os.path.join(directory, 'meta.json')):
        build_cache(cfg_data, split, encoder, directory, log)
  return SentenceSpace(directory)


# -- the pipeline's view: documents of sentence ids ---------------------------------------------
class SentenceIndex:
  """A `data.pipeline` source *and* encoder over a SentenceSpace: document d's "text" is its
  index and its "tokens" are its sentence ids; bos/eos are the start and end-of-text ids."""

  def __init__(self, space: SentenceSpace, max_docs: int = 0):
    self.space = space
    self.name = f'sentences:{os.path.basename(space.directory)}'
    n = space.num_docs
    self._len = min(n, max_docs) if max_docs > 0 else n
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOT_ID
    self.vocab_size = self.true_vocab_size = space.num_sentences
    self.token_bytes = space.token_bytes()
    self.stats = dict(space.meta.get('stats', {}))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, d: int) -> int:
    if not 0 <= d < self._len:
      raise IndexError(f'document {d} out of range ({self._len} documents)')
    return int(d)

  def encode(self, d: int) -> np.ndarray:
    return self.space.doc_ids(int(d))

  def encode_batch(self, docs) -> list[np.ndarray]:
    return [self.encode(d) for d in docs]


class EmbeddingFields:
  """Batch transform: gathers the embeddings of a packed batch's sentence ids.

  Adds `input_emb` / `target_emb` float32 [B, S, D]. Inputs at a document's start (bos) get
  zeros; the models substitute their start vector there."""

  def __init__(self, space: SentenceSpace):
    self.space = space

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    emb = self.space.embeddings
    def take(ids):
      flat = ids.reshape(-1)
      uniq, inv = np.unique(flat, return_inverse=True)
      return np.asarray(emb[uniq], np.float32)[inv].reshape(*ids.shape, -1)
    return {**batch, 'input_emb': take(batch['inputs']), 'target_emb': take(batch['targets'])}


class SentenceRows:
  """Checkpointable per-host iterator of single-sentence byte rows (the decoder's batches).

  Epoch e visits `default_rng([seed, e]).permutation` of the space's sentences (the
  end-of-text sentence included), host p taking positions i with i % P == p. Rows:
    inputs  int32 [B, L] = [bos, b_1 .. b_n, pad ...]   (ByteEncoder ids, L = max bytes + 1)
    targets int32 [B, L] = [b_1 .. b_n, eos, pad ...]
    weights float32, target_bytes int32 (1 per real byte), byte_mask int32 (targets that are
    bytes), emb float32 [B, D] (the cached embedding; [B, 0] for a texts-only space)."""

  def __init__(self, space: SentenceSpace, max_bytes: int, local_batch: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True,
               state: dict | None = None):
    self.space, self.max_bytes, self.local_batch = space, int(max_bytes), int(local_batch)
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.process_index, self.process_count = process_index, process_count
    self.pool = np.concatenate([[EOT_ID], np.arange(NUM_SPECIAL, space.num_sentences)])
    self._order_epoch, self._order = -1, None
    self.set_state(state or {'epoch': 0, 'cursor': 0})

  def _meta(self):
    return {'seed': self.seed, 'shuffle': self.shuffle, 'num_sentences': len(self.pool),
            'process_index': self.process_index, 'process_count': self.process_count}

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'cursor': self.cursor, **self._meta()}

  def set_state(self, state: dict) -> None:
    bad = {k: (state[k], v) for k, v in self._meta().items() if k in state and state[k] != v}
    if bad:
      raise ValueError(f'iterator state does not match this iterator (saved, now): {bad}')
    self.epoch, self.cursor = int(state['epoch']), int(state['cursor'])

  def _shard(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      n = len(self.pool)
      order = (np.random.default_rng([self.seed, self.epoch]).permutation(n)
               if self.shuffle else np.arange(n))
      self._order = self.pool[order][self.process_index::self.process_count]
      self._order_epoch = self.epoch
    return self._order

  def __iter__(self):
    return self

  def close(self) -> None:
    """Nothing to stop (no prefetch thread): the iterator protocol's close."""

  def __next__(self) -> dict[str, np.ndarray]:
    ids = []
    while len(ids) < self.local_batch:
      shard = self._shard()
      take = shard[self.cursor:self.cursor + self.local_batch - len(ids)]
      ids.extend(int(i) for i in take)
      self.cursor += len(take)
      if self.cursor >= len(shard):
        self.epoch, self.cursor = self.epoch + 1, 0
    return rows_for(self.space, ids, self.max_bytes)


def rows_for(space: SentenceSpace, ids, max_bytes: int, batch: int | None = None
             ) -> dict[str, np.ndarray]:
  """Decoder rows (see `SentenceRows`) for sentence `ids`, padded with empty rows to `batch`."""
  ids = [int(i) for i in ids]
  b, length = batch or len(ids), int(max_bytes) + 1
  out = {k: np.zeros((b, length), np.int32) for k in ('inputs', 'targets', 'target_bytes',
                                                      'byte_mask')}
  out['weights'] = np.zeros((b, length), np.float32)
  for r, text in enumerate(space.texts(ids)):
    raw = (np.frombuffer(text.encode('utf-8'), np.uint8)[:length - 1].astype(np.int32)
           + BYTE_OFFSET)
    n = len(raw)
    out['inputs'][r, 0] = encoders.BOS_ID
    out['inputs'][r, 1:n + 1] = raw
    out['targets'][r, :n] = raw
    out['targets'][r, n] = encoders.EOS_ID
    out['weights'][r, :n + 1] = 1.0
    out['target_bytes'][r, :n] = 1
    out['byte_mask'][r, :n] = 1
  emb = np.zeros((b, space.dim), np.float32)
  if ids and space.dim:
    emb[:len(ids)] = np.asarray(space.embeddings[np.asarray(ids)], np.float32)
  out['emb'] = emb
  out['sentence_ids'] = np.full((b,), -1, np.int32)
  out['sentence_ids'][:len(ids)] = ids
  return out


def fit_robust_normalizer(embeddings: np.ndarray, max_rows: int = 200_000,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(center, scale) per dimension: median and IQR / 1.349 (a Gaussian's standard deviation
  for Gaussian data), on at most `max_rows` rows; a zero scale becomes 1."""
  x = np.asarray(embeddings)
  if len(x) > max_rows:
    x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
  x = np.asarray(x, np.float64)
  center = np.median(x, axis=0)
  q25, q75 = np.percentile(x, [25, 75], axis=0)
  scale = (q75 - q25) / 1.3489795
  scale = np.where(scale > 0, scale, 1.0)
  return center.astype(np.float32), scale.astype(np.float32)


def describe(space: SentenceSpace) -> dict[str, Any]:
  return {'documents': space.num_docs, 'sentences': space.num_sentences - NUM_SPECIAL,
          **space.meta.get('stats', {})}
