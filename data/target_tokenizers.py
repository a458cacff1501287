"""Target tokenizers for tokenizer transfer (`--mode=transfer`, the ZeTT family's evaluation):
built from a spec string, or read from a user's tokenizer.json after checking it.

  'bpe:N'        byte-level BPE of N tokens trained on the train split (cached like `data.encoder
                 = 'bpe'`)
  'unigram:N'    a byte-level UnigramLM trained on the train split's documents whose name matches
                 `text_filter` (e.g. the embedded corpus's English prose)
  'wordpiece:N'  (encoders only) a BERT-style uncased WordPiece trained on those documents
  PATH           a tokenizer.json, refused by name when its vocabulary is malformed
"""
from __future__ import annotations

import collections
import json
import os
import re

from data import corpus, encoders


def is_byte_level(tok) -> bool:
  return 'ByteLevel' in json.dumps(json.loads(tok.to_str()).get('decoder'))


def _parse(spec: str, kinds: tuple[str, ...]) -> tuple[str, int] | None:
  """('bpe', 8192) for 'bpe:8192' (kind in `kinds`), None for a path; ValueError otherwise."""
  kind, sep, n = spec.partition(':')
  if not sep or kind not in ('bpe', 'unigram', 'wordpiece'):
    return None
  try:
    size = int(n)
  except ValueError as e:
    raise ValueError(f'target_tokenizer={spec!r}: expected {kind}:VOCAB_SIZE') from e
  if kind not in kinds:
    raise ValueError(f'target_tokenizer={spec!r}: {kind}:N targets are for encoder models '
                     '(model.source=minilm)' if kind == 'wordpiece' else
                     f'encoder transfer needs --config.target_tokenizer=wordpiece:N or a '
                     f'tokenizer.json path (got {spec!r}: {kind}:N targets are for decoders)')
  return kind, size


def build(spec: str, cfg_data, text_filter: str = ''):
  """(tokenizers.Tokenizer, description) of a decoder target: 'bpe:N', 'unigram:N' (trained on
  the documents matching `text_filter`) or a tokenizer.json path."""
  spec = str(spec).strip()
  if not spec:
    raise ValueError('--mode=transfer needs --config.target_tokenizer=PATH/tokenizer.json, '
                     'bpe:VOCAB_SIZE or unigram:VOCAB_SIZE')
  parsed = _parse(spec, ('bpe', 'unigram'))
  if parsed is None:
    check_file(spec)
    return encoders.BPEEncoder.load(spec).tokenizer, spec
  kind, n = parsed
  source = corpus.get_source(cfg_data, cfg_data.train_split)
  name_filter = str(text_filter or '') if kind == 'unigram' else ''
  enc = encoders.train_bpe(source, n, corpus.default_data_dir(cfg_data.get('data_dir', '')),
                           cfg_data.train_split, int(cfg_data.get('max_docs', 0)), kind,
                           name_filter)
  where = f' documents matching {name_filter!r}' if name_filter else ''
  return enc.tokenizer, f'{kind}{n} trained on {source.name}{where}'


def build_encoder_target(spec: str, cfg_data, text_filter: str = ''):
  """(tokenizers.Tokenizer, description) of an encoder (WordPiece) target: 'wordpiece:N' trained
  on the train split's documents matching `text_filter`, or a WordPiece tokenizer.json."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  spec = str(spec).strip()
  parsed = _parse(spec, ('wordpiece',)) if spec else None
  if parsed is not None:
    target = train_wordpiece(texts(cfg_data, cfg_data.train_split, text_filter), parsed[1])
    name = f'wordpiece{parsed[1]} trained on the train split ({text_filter or "all"})'
  elif spec and os.path.isfile(spec):
    check_file(spec)
    target, name = Tokenizer.from_file(spec), spec
  else:
    raise ValueError(f'encoder transfer needs --config.target_tokenizer=wordpiece:N or a '
                     f'tokenizer.json path (got {spec!r})')
  if json.loads(target.to_str())['model']['type'] != 'WordPiece':
    raise ValueError(f'target tokenizer {name}: encoder transfer needs a WordPiece tokenizer')
  return target, name


def texts(cfg_data, split: str, text_filter: str = ''):
  """The texts of `split`'s documents whose name matches the regex `text_filter` ('' = all)."""
  source = corpus.get_source(cfg_data, split)
  pattern = re.compile(text_filter) if text_filter else None
  for i in range(len(source)):
    if pattern is None or pattern.search(str(source.record(i).get('name', ''))):
      yield source[i]


def check_file(path: str) -> None:
  """Refuses a target tokenizer.json whose vocabulary has an empty token, a token string listed
  twice, or two tokens with one id (the tokenizers library would silently keep one of them)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'target tokenizer not found: {path}')
  dup_keys = []

  def pairs(items):
    seen = {}
    for k, v in items:
      if k in seen:
        dup_keys.append(k)
      seen[k] = v
    return seen

  try:
    with open(path, encoding='utf-8') as f:
      spec = json.load(f, object_pairs_hook=pairs)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable tokenizer.json ({e})') from e
  vocab = (spec.get('model') or {}).get('vocab')
  if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
    model = [(v[0], i) for i, v in enumerate(vocab)]
  elif isinstance(vocab, dict):
    model = list(vocab.items())
  else:
    raise ValueError(f'{path}: no model vocabulary')
  added = [(t['content'], t['id']) for t in spec.get('added_tokens') or []]
  # an added token that is also the model's token of the same id (the special tokens of every
  # trained BPE, WordPiece or Unigram tokenizer) is one token, listed in both places by design
  mirrored = set(added) & set(model)
  strings = [s for s, _ in model] + [s for s, _ in added]
  ids = [i for _, i in model] + [i for _, i in added]
  problems = []
  if not strings:
    problems.append('the vocabulary is empty')
  if '' in strings:
    problems.append('it has an empty token')
  counts = collections.Counter(s for s, _ in model)
  counts.update(s for s, i in added if (s, i) not in mirrored)
  counts.update(s for s, i in set(added) & mirrored if added.count((s, i)) > 1)
  repeated = sorted({s for s, n in counts.items() if n > 1} | set(dup_keys))
  if repeated:
    problems.append(f'token strings listed twice: {repeated[:5]}')
  by_id = {}
  for s, i in zip(strings, ids):
    by_id.setdefault(i, set()).add(s)
  shared = {i: sorted(v) for i, v in by_id.items() if len(v) > 1}
  if shared:
    problems.append(f'ids shared by several tokens: {dict(list(shared.items())[:3])}')
  if problems:
    raise ValueError(f'target tokenizer {path}: ' + '; '.join(problems))


def train_wordpiece(texts, vocab_size: int):
  """A BERT-style uncased WordPiece tokenizer ([CLS] text [SEP]) trained on `texts`."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel,g-multiple-import
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(texts, trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False))
  cls, sep = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
  return tok
