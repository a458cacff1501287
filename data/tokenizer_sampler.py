"""Tokenizers sampled on the fly for hypernetwork training (zero-shot tokenizer transfer).

`sample_unigram(texts, ...)` builds a byte-level UnigramLM tokenizer from the substring counts
of `texts` (a recent batch):
  1. the texts are pre-tokenized as the base byte-level BPE does it (GPT-2 regex + byte
     alphabet), and distinct pre-tokens are counted;
  2. every substring of 2 .. `max_piece_chars` characters of a pre-token gets the count of
     the pre-tokens it occurs in (times their count);
  3. log-normal noise: score = log(count) + noise_std * N(0, 1) per substring, so each sample
     is a different, plausible vocabulary;
  4. the `vocab_size - 256 - len(specials)` best-scoring substrings form the vocabulary, with
     unigram log-probabilities from their noisy counts; all 256 byte symbols are always in it
     (so every text tokenizes, nothing is unknown), and `specials` come first.
The result is an HF `tokenizers.Tokenizer` (Unigram model, ByteLevel pre-tokenizer and decoder)
whose token strings are in the same byte alphabet as the base BPE, so the hypernetwork can split
each of them into base pieces (`models.hypernet.piece_ids`).

`sample_wordpiece(texts, ...)` is the same idea for BERT-style encoders: an uncased WordPiece
(BertNormalizer, BertPreTokenizer, [CLS] .. [SEP]) whose vocabulary is [PAD] [UNK] [CLS] [SEP]
[MASK] (ids 0-4), every character seen (word-initial and '##' continuation forms), and the
best substrings of 2 .. `max_piece_chars` characters by noisy score log(count) + log(length) +
noise_std * N(0, 1), word-initial prefixes as themselves and inner substrings as '##' pieces.
Its ids are assigned in a fixed order, so the same draw gives the same tokenizer in any process
(the tokenizers library's WordPiece trainer breaks count ties differently run to run).

`benchmarks/tokenizer_sampler.py` measures sampling and tokenization time per batch.
"""
from __future__ import annotations

import collections

import numpy as np

_PRE = None


def _pre_tokenizer():
  global _PRE
  if _PRE is None:
    from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
    _PRE = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  return _PRE


def byte_alphabet() -> list[str]:
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
  return sorted(pre_tokenizers.ByteLevel.alphabet())


def substring_counts(texts, max_piece_chars: int = 16) -> tuple[collections.Counter,
                                                                  collections.Counter]:
  """(counts of substrings of 2..max_piece_chars characters, counts of single symbols), over
  the byte-level pre-tokens of `texts`."""
  if max_piece_chars < 2:
    raise ValueError(f'max_piece_chars={max_piece_chars}: must be at least 2')
  pre = _pre_tokenizer()
  words = collections.Counter()
  for t in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(t))
  subs, chars = collections.Counter(), collections.Counter()
  for w, c in words.items():
    n = len(w)
    for i in range(n):
      chars[w[i]] += c
      for j in range(i + 2, min(n, i + max_piece_chars) + 1):
        subs[w[i:j]] += c
  return subs, chars


def sample_unigram(texts, vocab_size: int, rng: np.random.Generator, noise_std: float = 1.0,
                   max_piece_chars: int = 16, specials: tuple[str, ...] = ()):
  """A byte-level UnigramLM tokenizer of exactly `vocab_size` tokens (fewer only when the texts
  have fewer distinct substrings), sampled from the substring counts of `texts`."""
  from tokenizers import Tokenizer, decoders, models  # pylint: disable=import-outside-toplevel
  alphabet = byte_alphabet()
  room = vocab_size - len(alphabet) - len(specials)
  if room < 0:
    raise ValueError(f'vocab_size={vocab_size} leaves no room for the 256 byte symbols and '
                     f'{len(specials)} special tokens')
  subs, chars = substring_counts(texts, max_piece_chars)
  cands = [s for s in subs if s not in specials]
  counts = np.fromiter((subs[s] for s in cands), np.float64, len(cands))
  score = np.log(counts) + noise_std * rng.standard_normal(len(cands))
  if len(cands) > room:
    keep = np.argpartition(-score, room - 1)[:room] if room else np.zeros(0, np.int64)
  else:
    keep = np.arange(len(cands))
  keep = keep[np.argsort(-score[keep], kind='stable')]
  byte_score = np.log(np.fromiter((chars.get(a, 0) + 1.0 for a in alphabet), np.float64, 256))
  log_z = np.logaddexp.reduce(np.concatenate([score[keep], byte_score]))
  vocab = [(s, 0.0) for s in specials]
  vocab += [(a, float(b - log_z)) for a, b in zip(alphabet, byte_score)]
  vocab += [(cands[i], float(score[i] - log_z)) for i in keep]
  tok = Tokenizer(models.Unigram(vocab, unk_id=None, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer()
  tok.decoder = decoders.ByteLevel()
  if specials:
    tok.add_special_tokens(list(specials))
  return tok


BERT_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def sample_wordpiece(texts, vocab_size: int, rng: np.random.Generator, noise_std: float = 1.0,
                     max_piece_chars: int = 16):
  """An uncased BERT-style WordPiece tokenizer of at most `vocab_size` tokens sampled from the
  substring counts of `texts` (see the module doc)."""
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      Tokenizer, decoders, models, normalizers, pre_tokenizers, processors)
  norm = normalizers.BertNormalizer(lowercase=True)
  pre = pre_tokenizers.BertPreTokenizer()
  words = collections.Counter()
  for t in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
  chars, subs = collections.Counter(), collections.Counter()
  for w, c in words.items():
    for i, ch in enumerate(w):
      chars[ch if i == 0 else '##' + ch] += c
      for j in range(i + 2, min(len(w), i + max_piece_chars) + 1):
        subs[w[i:j] if i == 0 else '##' + w[i:j]] += c
  room = vocab_size - len(BERT_SPECIALS)
  alphabet = sorted(sorted(chars, key=lambda k: (-chars[k], k))[:max(room, 0)])
  room -= len(alphabet)
  picked = []
  cands = sorted(subs)
  if room > 0 and cands:
    counts = np.array([subs[k] for k in cands], np.float64)
    lengths = np.array([len(k) - 2 * k.startswith('##') for k in cands], np.float64)
    score = np.log(counts) + np.log(lengths) + noise_std * rng.standard_normal(len(cands))
    picked = [cands[i] for i in np.argsort(-score, kind='stable')[:room]]
  vocab = {k: i for i, k in enumerate(list(BERT_SPECIALS) + alphabet + picked)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.add_special_tokens(list(BERT_SPECIALS))
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])])
  return tok
