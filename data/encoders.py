"""Encoders: text <-> int32 ids, plus the UTF-8 byte count of every id.

Every encoder has `vocab_size` (padded up to a multiple of 128 for the model),
`true_vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text) -> int32[N]` (no specials),
`decode(ids) -> str` (specials and padding ids skipped; invalid UTF-8 replaced) and
`token_bytes: int32[vocab_size]`, the number of UTF-8 bytes each id stands for (0 for
specials and padding ids), so `token_bytes[targets].sum()` is the exact byte count behind a
loss and bits per UTF-8 byte need no decoding.

* `ByteEncoder`: pad=0, bos=1, eos=2, byte b -> b + 3 (259 ids, vocab 384).
* `BPEEncoder`: HF `tokenizers` byte-level BPE. `train_bpe` trains one on a `DocSource`
  (specials <pad>=0, <bos>=1, <eos>=2) and caches its `tokenizer.json` in the data dir under a
  hash of (source name, split, max_docs, vocab_size); `BPEEncoder.load(path)` reads any
  `tokenizer.json` and uses its own pad/bos/eos when it has them (else appends them). Special
  token strings that occur in the text are encoded as text, never as specials.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os

import numpy as np

from data import corpus

PAD_MULTIPLE = 128
# The byte encoder's ids (their one home): pad 0, bos 1, eos 2, byte b -> b + BYTE_OFFSET.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_IDS = 256 + BYTE_OFFSET          # ids that mean something (specials + bytes)
# Deterministic cap on the text BPE training reads (the first documents of the split).
BPE_TRAIN_MAX_CHARS = 64_000_000

_PAD_NAMES = ('<pad>', '[PAD]', '<|pad|>', '<|padding|>')
_BOS_NAMES = ('<bos>', '<s>', '<|begin_of_text|>', '<|startoftext|>', '[CLS]', '<|im_start|>')
_EOS_NAMES = ('<eos>', '</s>', '<|end_of_text|>', '<|endoftext|>', '[SEP]', '<|im_end|>')


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


BYTE_VOCAB_SIZE = padded(BYTE_IDS)    # the models' byte vocabulary (384)


class Encoder(abc.ABC):
  """Shared interface; subclasses set the ids and `token_bytes`."""
  name: str
  true_vocab_size: int
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  token_bytes: np.ndarray

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`, no specials added."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`, specials skipped."""

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def __repr__(self):
    return (f'{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, '
            f'true_vocab_size={self.true_vocab_size})')


class ByteEncoder(Encoder):
  """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2."""
  OFFSET = BYTE_OFFSET

  def __init__(self):
    self.name = 'bytes'
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    self.true_vocab_size = BYTE_IDS
    self.vocab_size = BYTE_VOCAB_SIZE
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    self.token_bytes[self.OFFSET:self.true_vocab_size] = 1

  def encode(self, text: str) -> np.ndarray:
    b = np.frombuffer(text.encode('utf-8'), np.uint8)
    return b.astype(np.int32) + self.OFFSET

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= self.OFFSET) & (ids < self.true_vocab_size)]
    return (ids - self.OFFSET).astype(np.uint8).tobytes().decode('utf-8', errors='replace')


def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's bytes_to_unicode, inverted: alphabet character -> byte (the symbols byte-level BPE
  vocabularies spell bytes with)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


class BPEEncoder(Encoder):
  """A HF `tokenizers.Tokenizer`; byte-level ones get exact `token_bytes`."""

  def __init__(self, tokenizer, name: str, specials: dict[str, int] | None = None,
               vocab_size: int | None = None):
    """`specials` ({'pad', 'bos', 'eos'} -> id) fixes the special ids (e.g. a pretrained model's
    document separator) instead of looking them up by name and adding missing ones;
    `vocab_size` fixes the model's vocabulary size (a pretrained embedding) instead of padding."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.tokenizer = tok = tokenizer
    self.name = name
    ids = dict(specials or {})
    for kind, names in (('pad', _PAD_NAMES), ('bos', _BOS_NAMES), ('eos', _EOS_NAMES)):
      if kind in ids:
        continue
      found = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
      if found:
        ids[kind] = found[0]
      else:
        tok.add_special_tokens([tokenizers.AddedToken(f'<{kind}>', special=True)])
        ids[kind] = tok.token_to_id(f'<{kind}>')
    self.pad_id, self.bos_id, self.eos_id = ids['pad'], ids['bos'], ids['eos']
    tok.encode_special_tokens = True  # '<eos>' inside a document is text, not a special
    self.true_vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and vocab_size < self.true_vocab_size:
      raise ValueError(f'{name}: the tokenizer has {self.true_vocab_size} tokens, more than the '
                       f'model vocabulary of {vocab_size}')
    self.vocab_size = padded(self.true_vocab_size) if vocab_size is None else int(vocab_size)
    self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    self._special.update((self.pad_id, self.bos_id, self.eos_id))
    self.token_bytes = self._count_token_bytes()

  def _count_token_bytes(self) -> np.ndarray:
    alphabet = byte_level_alphabet()
    byte_level = 'ByteLevel' in json.dumps(json.loads(self.tokenizer.to_str()).get('decoder'))
    added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.true_vocab_size):
      if i in self._special:
        continue
      piece = self.tokenizer.id_to_token(i)
      if piece is None:
        continue
      if i in added:  # added tokens are stored as plain text, not in the byte alphabet
        out[i] = len(added[i].encode('utf-8'))
      elif byte_level and all(c in alphabet for c in piece):
        out[i] = len(piece)
      else:  # best effort for other tokenizers: the bytes of the decoded piece
        out[i] = len(self.tokenizer.decode([i], skip_special_tokens=True).encode('utf-8'))
    return out

  @classmethod
  def load(cls, path: str, name: str | None = None) -> BPEEncoder:
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer file not found: {path}')
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises plain Exception)
      raise ValueError(f'{path} is not a readable tokenizer.json: {e}') from e
    enc = cls(tok, name or f'tokenizer:{path}')
    n_real = enc.true_vocab_size - len(enc._special)  # pylint: disable=protected-access
    probe = 'Hello, world! 123'
    if n_real <= 0 or not len(enc.encode(probe)):
      raise ValueError(f'{path}: the tokenizer has {n_real} tokens besides its specials and encodes '
                       f'{probe!r} to {enc.encode(probe).tolist()}: nothing to train or evaluate on')
    return enc

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Like `encode` for each text, on the tokenizer's Rust thread pool."""
    return [np.asarray(e.ids, np.int32)
            for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)
           if 0 <= i < self.true_vocab_size and int(i) not in self._special]
    return self.tokenizer.decode(ids, skip_special_tokens=True)


def _train_tokenizer(texts, vocab_size: int, kind: str = 'bpe'):
  """A byte-level tokenizer trained on `texts`: BPE, or UnigramLM (EM with pruning, every byte
  symbol kept); specials <pad>, <bos>, <eos>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  specials = ['<pad>', '<bos>', '<eos>']
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if kind == 'bpe':
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
  elif kind == 'unigram':
    tok = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=alphabet, show_progress=False,
                                      max_piece_length=16)
  else:
    raise ValueError(f"tokenizer kind {kind!r}: expected 'bpe' or 'unigram'")
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer)
  return tok


def _budgeted(source: corpus.DocSource, max_chars: int, name_filter: str = ''):
  import re  # pylint: disable=import-outside-toplevel
  pattern = re.compile(name_filter) if name_filter else None
  total = 0
  for i in range(len(source)):
    if pattern is not None and not pattern.search(str(source.record(i).get('name', ''))):
      continue
    text = source[i]
    if total + len(text) > max_chars and total > 0:
      return
    total += len(text)
    yield text


def train_bpe(source: corpus.DocSource, vocab_size: int, data_dir: str, split: str,
              max_docs: int = 0, kind: str = 'bpe', name_filter: str = '',
              sample_bytes: int = 0, seed: int = 0) -> BPEEncoder:
  """Trains (or loads the cached) byte-level BPE (or `kind='unigram'` UnigramLM) on `source`,
  optionally only on documents whose name matches the regex `name_filter`; safe across
  processes. A streamed source (data/shards.py) gives a seeded sample of `sample_bytes`
  UTF-8 bytes (default `BPE_TRAIN_MAX_CHARS`) instead."""
  streamed = getattr(source, 'streamed', False)
  sample_bytes = int(sample_bytes) or BPE_TRAIN_MAX_CHARS
  if vocab_size <= BYTE_IDS:
    raise ValueError(f'data.vocab_size must exceed {BYTE_IDS} for byte-level BPE, got '
                     f'{vocab_size}')
  key = json.dumps([source.name, split, int(max_docs), int(vocab_size), BPE_TRAIN_MAX_CHARS]
                   + ([kind, name_filter] if kind != 'bpe' or name_filter else [])
                   + ([sample_bytes, int(seed)] if streamed else []))
  digest = hashlib.sha1(key.encode()).hexdigest()[:16]
  out_dir = os.path.join(data_dir, 'notoklm_tokenizers', f'{kind}{vocab_size}-{digest}')
  path = os.path.join(out_dir, 'tokenizer.json')
  name = f'{kind}{vocab_size}-{digest}'
  if not os.path.exists(path):
    with corpus.file_lock(os.path.join(data_dir, '.locks', f'{name}.lock')):
      if not os.path.exists(path):
        texts = (source.bpe_sample(sample_bytes, seed) if streamed else
                 _budgeted(source, BPE_TRAIN_MAX_CHARS, name_filter))
        tok = _train_tokenizer(texts, vocab_size, kind)
        os.makedirs(out_dir, exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        tok.save(tmp)
        with open(os.path.join(out_dir, 'source.json'), 'w') as f:
          f.write(key)
        os.replace(tmp, path)
  return BPEEncoder.load(path, name=name)


def get_encoder(cfg_data) -> Encoder:
  """'bytes' | 'bpe' (trained on `data.train_split`, cached) | 'tokenizer:PATH'."""
  kind = cfg_data.get('encoder', 'bytes')
  if kind == 'bytes':
    return ByteEncoder()
  if kind == 'bpe':
    source = corpus.get_source(cfg_data, cfg_data.train_split)
    return train_bpe(source, int(cfg_data.vocab_size), corpus.default_data_dir(
        cfg_data.get('data_dir', '')), cfg_data.train_split, int(cfg_data.get('max_docs', 0)),
                     sample_bytes=int(cfg_data.get('bpe_sample_bytes', 0)))
  if kind.startswith('tokenizer:'):
    return BPEEncoder.load(kind[len('tokenizer:'):])
  raise ValueError(f"unknown data.encoder {kind!r}: expected 'bytes', 'bpe' or 'tokenizer:PATH'")
