"""Tests of data/: corpora and bad inputs, encoders, packing, train/eval iterators."""
import collections
import json
import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import ml_collections
import numpy as np
import pytest

from configs import base
from data import corpus
from data import encoders
from data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = hypothesis.settings(max_examples=40, deadline=None,
                           suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])


def data_cfg(data_dir, **kw) -> ml_collections.ConfigDict:
  c = base.get_config().data
  c.data_dir = str(data_dir)
  c.update(kw)
  return c


@pytest.fixture(scope='module')
def shared_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


class Docs(list):
  """A DocSource stand-in: a list of strings with a name."""
  name = 'docs'
  stats = {}


# --------------------------------------------------------------------------------------
# Corpora.


def test_embedded_corpus_splits(shared_dir):
  cfg = data_cfg(shared_dir)
  train, val = corpus.get_source(cfg, 'train'), corpus.get_source(cfg, 'validation')
  assert len(train) > 500 and 5 < len(val) < len(train) // 10
  names = lambda s: {s.record(i)['name'] for i in range(len(s))}
  assert not names(train) & names(val)
  assert all(isinstance(val[i], str) and val[i].strip() for i in range(len(val)))
  all_names = names(train) | names(val)
  assert any(n.startswith('topic/') for n in all_names)
  assert any(n.startswith('docstring/') for n in all_names)
  assert any(n.startswith('src/') for n in all_names)
  assert not any('/test/' in n or n.startswith(('src/test/', 'src/idlelib/')) for n in all_names)
  assert max(len(train[i]) for i in range(len(train))) <= cfg.max_doc_chars
  assert train.stats['documents_validation'] == len(val)
  # Same data through the generic registered-TFDS path; max_docs limits.
  by_name = corpus.get_source(data_cfg(shared_dir, source='tfds:python_docs', max_docs=7),
                              'validation')
  assert len(by_name) == 7 and [by_name[i] for i in range(7)] == [val[i] for i in range(7)]


def test_split_is_stable_hash():
  assert corpus.stable_bucket('module:json') == corpus.stable_bucket('module:json')
  out = subprocess.run([sys.executable, '-c', 'from data import corpus;'
                        'print(repr(corpus.stable_bucket("module:json")))'], cwd=ROOT,
                       capture_output=True, text=True, check=True,
                       env={**os.environ, 'PYTHONHASHSEED': '123'})
  assert float(out.stdout) == corpus.stable_bucket('module:json')


def _write(path, data):
  with open(path, 'wb') as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return str(path)


def test_local_txt_modes_and_jsonl(tmp_path):
  paras = [f'paragraph {i}\nsecond line of {i}' for i in range(60)]
  txt = _write(tmp_path / 'a.txt', '\n\n'.join(paras) + '\n')
  jsonl = _write(tmp_path / 'b.jsonl', ''.join(json.dumps({'body': f'record {i} é'}) + '\n'
                                                for i in range(50)))
  lines = [l for p in paras for l in p.split('\n')]
  for mode, expected, blank in [('paragraph', paras, 0), ('line', lines, len(paras) - 1)]:
    cfg = data_cfg(tmp_path / 'd', source=f'text:{txt}', txt_split=mode)
    tr, va = corpus.get_source(cfg, 'train'), corpus.get_source(cfg, 'validation')
    assert len(tr) >= 1 and len(va) >= 1
    assert sorted(list(tr) + list(va)) == sorted(expected)
    assert tr.stats['documents'] == len(expected)
    assert tr.stats.get('skipped_empty', 0) == blank  # in 'line' mode a blank line is empty
  cfg = data_cfg(tmp_path / 'd', source=f'text:{jsonl},{txt}', text_key='body', txt_split='file')
  docs = list(corpus.get_source(cfg, 'train')) + list(corpus.get_source(cfg, 'validation'))
  assert sorted(docs) == sorted([f'record {i} é' for i in range(50)] + [open(txt).read()])


def test_validation_fraction_and_minimum_size_of_a_text_source(tmp_path):
  paras = [f'paragraph {i}: ' + 'words of text ' * (1 + i % 7) for i in range(200)]
  txt = _write(tmp_path / 'a.txt', '\n\n'.join(paras) + '\n')
  size = lambda src: sum(len(t.encode()) for t in src)
  got = {}
  for frac, min_bytes in ((0.02, 0), (0.25, 0), (0.02, 3000)):
    cfg = data_cfg(tmp_path / 'd', source=f'text:{txt}', val_fraction=frac,
                   val_min_bytes=min_bytes)
    tr, va = corpus.get_source(cfg, 'train'), corpus.get_source(cfg, 'validation')
    assert sorted(list(tr) + list(va)) == sorted(paras)
    assert va.stats['documents_validation'] == len(va) and va.stats['bytes_validation'] == size(va)
    got[frac, min_bytes] = set(va)
  small, large, sized = got[0.02, 0], got[0.25, 0], got[0.02, 3000]
  assert 20 < len(large) < 80 and len(small) < 15 and small < large  # the same hash order
  assert size(sized) >= 3000 and small < sized  # the 2 %, then the next documents by hash
  assert size(sized) - max(len(t.encode()) for t in sized) < 3000  # no more than needed
  for key, bad, match in (('val_fraction', 0.0, 'data.val_fraction=0.0: must be between 0 and 1'),
                          ('val_fraction', 1.5, 'data.val_fraction=1.5'),
                          ('val_min_bytes', -1, 'data.val_min_bytes=-1: must be >= 0')):
    with pytest.raises(ValueError, match=match):
      corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{txt}', **{key: bad}), 'train')


def test_a_prepared_data_dir_is_read_as_a_mount_and_a_bucket_url_is_refused(tmp_path):
  """A dataset prepared once in a folder (a gcsfuse mount of a bucket stands for it) is read
  by another host from that path without writing anything there; a bucket URL as data_dir is
  refused with the way to mount it (it would otherwise become a local folder named 'gs:')."""
  import shutil  # pylint: disable=import-outside-toplevel
  txt = _write(tmp_path / 'a.txt', '\n\n'.join(f'paragraph {i} of text' for i in range(30)))
  prepared = tmp_path / 'prep'
  cfg = data_cfg(prepared, source=f'text:{txt}')
  want = list(corpus.get_source(cfg, 'train'))
  mount = tmp_path / 'mnt' / 'bucket' / 'tfds'
  shutil.copytree(prepared, mount, ignore=shutil.ignore_patterns('.locks'))
  before = sorted(str(p.relative_to(mount)) + str(p.stat().st_mtime_ns) for p in mount.rglob('*'))
  assert list(corpus.get_source(data_cfg(mount, source=f'text:{txt}'), 'train')) == want
  after = sorted(str(p.relative_to(mount)) + str(p.stat().st_mtime_ns) for p in mount.rglob('*'))
  assert before == after  # nothing written, not even a lock
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    with pytest.raises(ValueError, match=r'data.data_dir=gs://my-bucket/tfds: TFDS datasets are '
                       r'read from a local path.*gcsfuse --implicit-dirs my-bucket /mnt/my-bucket'):
      corpus.get_source(data_cfg('gs://my-bucket/tfds', source=f'text:{txt}'), 'train')
  finally:
    os.chdir(cwd)
  assert not (tmp_path / 'gs:').exists()


def test_changed_file_reprepares(tmp_path):
  path = _write(tmp_path / 'a.txt', 'one\ntwo\nthree\n')
  cfg = data_cfg(tmp_path / 'd', source=f'text:{path}', txt_split='line')
  first = corpus.get_source(cfg, 'train')
  _write(path, 'one\ntwo\nthree\nfour\nfive\n')
  second = corpus.get_source(cfg, 'train')
  assert first.name != second.name
  assert second.stats['documents'] == 5


def test_bad_inputs_are_skipped_and_counted(tmp_path):
  txt = _write(tmp_path / 'bad.txt', b''.join([
      b'good line one\n', b'bad \xff\xfe utf8\n', b'nul \x00 here\n', b'   \n', b'\n',
      b'good line two\n', b'\xc3\x28 also bad\n', b'good line three\n']))
  cfg = data_cfg(tmp_path / 'd', source=f'text:{txt}', txt_split='line')
  tr, va = corpus.get_source(cfg, 'train'), corpus.get_source(cfg, 'validation')
  assert sorted(list(tr) + list(va)) == ['good line one', 'good line three', 'good line two']
  assert tr.stats['skipped_invalid_utf8'] == 2 and tr.stats['skipped_nul'] == 1
  assert tr.stats['skipped_empty'] == 2
  # Stats are persisted beside the prepared data and reloaded from the cache.
  assert corpus.get_source(cfg, 'train').stats == tr.stats

  lines = [{'text': 'fine one'}, 'not json {', {'other': 'x'}, {'text': 5}, [1, 2],
           {'text': '   '}, {'text': 'nul \x00'}, {'text': 'fine two'}]
  body = '\n'.join(json.dumps(l) if not isinstance(l, str) else l for l in lines) + '\n'
  jsonl = _write(tmp_path / 'bad.jsonl', body.encode() + b'{"text": "\xff"}\n')
  s = corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{jsonl}'), 'train')
  assert s.stats['documents'] == 2
  assert s.stats['skipped_bad_json'] == 2 and s.stats['skipped_missing_field'] == 1
  assert s.stats['skipped_not_string'] == 1 and s.stats['skipped_empty'] == 1
  assert s.stats['skipped_nul'] == 1 and s.stats['skipped_invalid_utf8'] == 1


def test_missing_and_empty_files_raise(tmp_path):
  missing = str(tmp_path / 'nope.txt')
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{missing}'), 'train')
  empty = _write(tmp_path / 'empty.txt', '')
  blank = _write(tmp_path / 'blank.jsonl', '\n  \n{"text": " "}\n')
  for src in [empty, f'{empty},{blank}']:
    with pytest.raises(ValueError, match='no usable documents.*empty.txt'):
      corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{src}'), 'train')
  one = _write(tmp_path / 'one.txt', 'a single document')
  with pytest.raises(ValueError, match='one.txt'):
    corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{one}'), 'train')
  # A file without documents next to good ones is only counted.
  good = _write(tmp_path / 'good.txt', 'x\n\ny\n\nz\n')
  s = corpus.get_source(data_cfg(tmp_path / 'd', source=f'text:{good},{empty}'), 'train')
  assert s.stats['files_without_documents'] == 1


def test_huge_line_is_cut(tmp_path):
  line = ('0123456789' * 1_000_000)
  path = _write(tmp_path / 'big.txt', line + '\n\nshort doc\n')
  cfg = data_cfg(tmp_path / 'd', source=f'text:{path}', txt_split='line',
                 max_doc_chars=1_000_000)
  docs = list(corpus.get_source(cfg, 'train')) + list(corpus.get_source(cfg, 'validation'))
  pieces = [d for d in docs if d != 'short doc']
  assert len(pieces) == 10 and all(len(p) == 1_000_000 for p in pieces)
  s = corpus.get_source(cfg, 'train')
  assert s.stats['docs_cut'] == 1 and s.stats['pieces_from_cuts'] == 9


@pytest.mark.parametrize('mode', ['paragraph', 'line', 'file'])
def test_streaming_parts_equal_whole_documents(tmp_path, monkeypatch, mode):
  """Lines read in 7-byte pieces (multi-byte characters never split) and documents passed on in
  parts give exactly the pieces of cutting each whole document; bad lines are still dropped."""
  text = ('één lange regel met ü, 中文 und 👍 ' * 5 + '\n' + 'second line\n\n\n' +
          'x' * 23 + '\nshort\n\n' + '  \n\n' + 'tail 👍👍👍 é' * 4)
  path = tmp_path / 'doc.txt'
  path.write_bytes(text.encode() + b'\nbad \xff line\nnul \x00 line\n')
  pieces = [(raw, ends) for raw, ends in corpus._read_pieces(str(path), 7)]
  assert b''.join(r for r, _ in pieces) == path.read_bytes()
  assert all(len(r) <= 10 for r, _ in pieces)
  assert all(r.decode('utf-8', 'strict') for r, _ in pieces if b'\xff' not in r)

  def docs(piece_bytes):
    monkeypatch.setattr(corpus, '_PIECE_BYTES', piece_bytes)
    stats = collections.Counter()
    cfg = corpus.local_text_config([str(path)], mode, 'text', 11)
    return [d[3] for d in corpus._local_documents(cfg, stats)], stats

  streamed, s1 = docs(7)
  whole, s2 = docs(1 << 20)
  assert whole == streamed and len(whole) > 6
  assert all(len(p) <= 11 for p in whole)
  assert s1['docs_cut'] == s2['docs_cut'] > 0 and s2['skipped_nul'] == 1
  assert s1['skipped_invalid_utf8'] == s2['skipped_invalid_utf8'] == 1


def test_bad_tokenizer_files_are_named(tmp_path):
  from tokenizers import Tokenizer, models
  empty = tmp_path / 'empty.json'
  empty.write_text('')
  garbage = tmp_path / 'garbage.json'
  garbage.write_text('{"version": "1.0", "model": ')
  no_tokens = tmp_path / 'no_tokens.json'
  no_tokens.write_text(Tokenizer(models.BPE()).to_str())
  for path in (empty, garbage):
    with pytest.raises(ValueError, match=f'{path}.*not a readable tokenizer'):
      encoders.BPEEncoder.load(str(path))
  with pytest.raises(ValueError, match=f'{no_tokens}: the tokenizer has 0 tokens'):
    encoders.BPEEncoder.load(str(no_tokens))
  with pytest.raises(FileNotFoundError, match='nope.json'):
    encoders.BPEEncoder.load(str(tmp_path / 'nope.json'))


def test_preparation_spills_to_disk_without_tensorflow(tmp_path, monkeypatch):
  """Past the writer's memory budget TFDS spills examples to bucket files (through a local
  gfile when TensorFlow is absent): same documents as an all-in-memory preparation."""
  path = _write(tmp_path / 'many.txt', '\n\n'.join(f'document {i} ' + 'word ' * (i % 40)
                                                    for i in range(300)))
  cfg = data_cfg(tmp_path / 'mem', source=f'text:{path}')
  in_memory = sorted(list(corpus.get_source(cfg, 'train')) +
                     list(corpus.get_source(cfg, 'validation')))
  monkeypatch.setattr(corpus, '_SHUFFLE_MEM_BYTES', 2000)
  opened = []
  monkeypatch.setattr(corpus._LocalGfile.io.gfile, 'GFile',
                      staticmethod(lambda p, mode='r': opened.append(p) or open(p, mode)))
  cfg = data_cfg(tmp_path / 'spill', source=f'text:{path}')
  spilled = sorted(list(corpus.get_source(cfg, 'train')) +
                   list(corpus.get_source(cfg, 'validation')))
  assert spilled == in_memory and len(spilled) == 300
  assert len(opened) > 10  # bucket files were written and read back


def test_concurrent_prepare(tmp_path):
  path = _write(tmp_path / 'a.txt', '\n\n'.join(f'doc {i}' for i in range(100)))
  code = ('import sys; from data import corpus; from configs import base; c = base.get_config()'
          f'.data; c.data_dir = {str(tmp_path / "d")!r}; c.source = "text:{path}";'
          'print(len(corpus.get_source(c, "train")))')
  procs = [subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=60) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  assert outs[0][0].split()[-1] == outs[1][0].split()[-1]
  assert 90 < int(outs[0][0].split()[-1]) < 100
  assert sum('(once; later runs reuse it)' in o[0] for o in outs) == 1  # prepared once


# --------------------------------------------------------------------------------------
# Encoders.


@FAST
@hypothesis.given(st.text())
def test_byte_encoder_round_trip(text):
  enc = encoders.ByteEncoder()
  ids = enc.encode(text)
  assert ids.dtype == np.int32 and enc.decode(ids) == text
  assert enc.token_bytes[ids].sum() == len(text.encode('utf-8'))
  assert enc.decode([enc.bos_id, *ids, enc.eos_id, enc.pad_id, 300]) == text


def test_byte_encoder_shape():
  enc = encoders.ByteEncoder()
  assert (enc.vocab_size, enc.true_vocab_size, enc.pad_id) == (384, 259, 0)
  assert enc.token_bytes.shape == (384,) and enc.token_bytes.sum() == 256
  assert enc.decode(enc.encode('é')[:1]) == '\ufffd'


@pytest.fixture(scope='module')
def bpe(shared_dir):
  cfg = data_cfg(shared_dir, encoder='bpe', vocab_size=600, max_docs=150)
  return encoders.get_encoder(cfg), cfg


def test_bpe_cache_and_reload(bpe, shared_dir):
  enc, cfg = bpe
  assert (enc.pad_id, enc.bos_id, enc.eos_id) == (0, 1, 2)
  assert enc.true_vocab_size == 600 and enc.vocab_size == 640
  assert enc.token_bytes.shape == (640,) and enc.token_bytes[:3].sum() == 0
  cached = encoders.get_encoder(cfg)
  path = os.path.join(str(shared_dir), 'notoklm_tokenizers', cached.name, 'tokenizer.json')
  loaded = encoders.get_encoder(data_cfg(shared_dir, encoder=f'tokenizer:{path}'))
  text = corpus.get_source(cfg, 'validation')[0]
  for other in (cached, loaded):
    assert np.array_equal(enc.encode(text), other.encode(text))
    assert np.array_equal(enc.token_bytes, other.token_bytes)
    assert (other.pad_id, other.bos_id, other.eos_id) == (0, 1, 2)
  ids = enc.encode(text)
  assert len(ids) < len(text.encode()) and enc.decode(ids) == text
  assert all(np.array_equal(a, enc.encode(t)) for a, t in zip(enc.encode_batch([text, 'é x']),
                                                             [text, 'é x']))


@FAST
@hypothesis.given(st.text())
def test_bpe_token_bytes(bpe, text):
  enc, _ = bpe
  ids = enc.encode(text + ' <eos><pad>')
  assert not set(ids.tolist()) & {enc.pad_id, enc.bos_id, enc.eos_id}
  assert enc.token_bytes[ids].sum() == len((text + ' <eos><pad>').encode('utf-8'))
  assert enc.decode(ids) == text + ' <eos><pad>'


def test_loaded_tokenizer_gets_specials(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-multiple-import
  tok = Tokenizer(models.WordLevel({'a': 0, 'b': 1, '[UNK]': 2}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  enc = encoders.get_encoder(data_cfg(tmp_path, encoder=f'tokenizer:{path}'))
  assert (enc.pad_id, enc.bos_id, enc.eos_id) == (3, 4, 5)
  assert enc.vocab_size == 128 and enc.token_bytes[:6].tolist() == [1, 1, 5, 0, 0, 0]
  with pytest.raises(FileNotFoundError):
    encoders.get_encoder(data_cfg(tmp_path, encoder=f'tokenizer:{tmp_path}/none.json'))


# --------------------------------------------------------------------------------------
# Packing.


def _check_packed(docs, b):
  """Every target of every document appears once, in order; segments/positions/weights."""
  T = b['inputs'].shape[1]
  got = []
  for r in range(b['inputs'].shape[0]):
    seg = b['segment_ids'][r]
    real = seg > 0
    assert np.array_equal(b['weights'][r] > 0, real)
    n = real.sum()
    assert real[:n].all() and not real[n:].any()  # padding only at the end
    assert (b['inputs'][r][~real] == 0).all() and (b['target_bytes'][r][~real] == 0).all()
    for s in np.unique(seg[real]):
      idx = np.nonzero(seg == s)[0]
      assert np.array_equal(b['positions'][r][idx], np.arange(len(idx)))
      inp, tgt = b['inputs'][r][idx], b['targets'][r][idx]
      assert np.array_equal(inp[1:], tgt[:-1])  # inputs/targets agree inside a segment
      got.append((inp, tgt))
    assert T >= n
  want_t = np.concatenate([d[1:] for d in docs]) if docs else np.zeros(0)
  want_i = np.concatenate([d[:-1] for d in docs]) if docs else np.zeros(0)
  got_i = np.concatenate([g[0] for g in got]) if got else np.zeros(0)
  got_t = np.concatenate([g[1] for g in got]) if got else np.zeros(0)
  assert np.array_equal(got_t, want_t) and np.array_equal(got_i, want_i)


@FAST
@hypothesis.given(st.lists(st.text(max_size=40), max_size=12), st.integers(1, 33))
def test_packing_invariants(texts, seq_len):
  enc = encoders.ByteEncoder()
  docs = [pipeline.document_tokens(enc, t) for t in texts]
  b = pipeline.pack(docs, seq_len)
  _check_packed(docs, b)
  # Rows are full except the last one (greedy).
  if len(b['inputs']):
    assert (b['segment_ids'][:-1] > 0).all()


# --------------------------------------------------------------------------------------
# Iterators.


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return Docs(f'doc {i} ' + 'x' * int(rng.integers(0, 40)) for i in range(n))


def test_train_iterator_resume_with_prefetch():
  docs, enc = _docs(23), encoders.ByteEncoder()
  kw = dict(seq_len=16, local_batch=3, seed=7, prefetch=2)
  with pipeline.TrainIterator(docs, enc, **kw) as it:
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(30)]  # several epochs
  assert state['epoch'] == 0 and state['cursor'] > 0
  with pipeline.TrainIterator(docs, enc, state=state, **kw) as resumed:
    again = [next(resumed) for _ in range(30)]
  for a, b in zip(rest, again):
    for k in pipeline.KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  with pipeline.TrainIterator(docs, enc, **{**kw, 'prefetch': 0}) as sync:
    for a in first + rest:
      b = next(sync)
      assert all(np.array_equal(a[k], b[k]) for k in pipeline.KEYS)
  assert first[0]['weights'].all() and first[0]['inputs'].dtype == np.int32
  np.testing.assert_array_equal(first[0]['target_bytes'], np.ones((3, 16)) * (
      first[0]['targets'] > 2))
  with pytest.raises(ValueError, match='process_count'):
    pipeline.TrainIterator(docs, enc, state={**state, 'process_count': 2}, **kw)


def test_two_host_sharding():
  docs = Docs(f'd{i:03d}' for i in range(40))  # 6 tokens with bos/eos: 5 pairs, 2 per row
  enc = encoders.ByteEncoder()
  epochs = []
  for host in range(2):
    with pipeline.TrainIterator(docs, enc, seq_len=10, local_batch=2, seed=3,
                                process_index=host, process_count=2) as it:
      rows = np.concatenate([next(it)['inputs'] for _ in range(20)])  # two epochs of 10 rows
    assert (rows[:, [0, 5]] == enc.bos_id).all()
    epochs.append([[enc.decode(r[s:s + 4]) for r in rows[e * 10:(e + 1) * 10] for s in (1, 6)]
                   for e in range(2)])
  for e in range(2):
    a, b = set(epochs[0][e]), set(epochs[1][e])
    assert len(a) == len(b) == 20 and not a & b and a | b == set(docs)
  assert epochs[0][0] != epochs[0][1]  # a new permutation each epoch


def test_prefetch_errors_reach_the_consumer():

  class Broken(Docs):

    def __getitem__(self, i):
      if i == 3:
        raise RuntimeError('broken document')
      return super().__getitem__(i)

  it = pipeline.TrainIterator(Broken(_docs(6)), encoders.ByteEncoder(), seq_len=64,
                              local_batch=4, shuffle=False, prefetch=2)
  with pytest.raises(RuntimeError, match='broken document'):
    for _ in range(10):
      next(it)
  it.close()


@pytest.mark.parametrize('hosts,local_batch,max_batches', [(1, 4, 0), (2, 2, 0), (3, 1, 0),
                                                           (2, 2, 2)])
def test_eval_batches(hosts, local_batch, max_batches):
  docs, enc = _docs(17, seed=1), encoders.ByteEncoder()
  per_host = [list(pipeline.eval_batches(docs, enc, 12, local_batch, p, hosts, max_batches))
              for p in range(hosts)]
  assert len({len(b) for b in per_host}) == 1  # every host the same number of batches
  if max_batches:
    assert len(per_host[0]) == max_batches
    return
  # Global batches (hosts' rows in order) are the host-independent packing of the split.
  rows = {k: np.concatenate([np.concatenate([per_host[p][g][k] for p in range(hosts)])
                             for g in range(len(per_host[0]))]) for k in pipeline.KEYS}
  want = pipeline.pack([pipeline.document_tokens(enc, d) for d in docs], 12)
  n = len(want['inputs'])
  for k in pipeline.KEYS[:-1]:  # pack() leaves target_bytes at 0
    np.testing.assert_array_equal(rows[k][:n], want[k])
    assert not rows[k][n:].any()
  assert len(rows['inputs']) - n < hosts * local_batch
  assert int(rows['target_bytes'].sum()) == sum(len(d.encode()) for d in docs)


def test_make_iterators_from_config(tmp_path):
  path = _write(tmp_path / 'a.txt', '\n\n'.join(f'document number {i}' for i in range(80)))
  cfg = base.get_config()
  cfg.data = data_cfg(tmp_path / 'd', source=f'text:{path}', seq_len=32)
  cfg.train.batch_size = 4
  enc = encoders.get_encoder(cfg.data)
  with pipeline.make_train_iterator(cfg, enc, 1, 2) as it:
    b = next(it)
    assert b['inputs'].shape == (2, 32) and it.get_state()['process_index'] == 1
  ev = pipeline.make_eval_batches(cfg, enc, 0, 2)
  assert len(list(ev)) == len(list(ev)) >= 1  # re-iterable
  with pytest.raises(ValueError, match='divisible'):
    pipeline.make_train_iterator(cfg, enc, 0, 3)


def test_doc_filter_keeps_matching_names():
  class Fake:
    name = 'fake'
    stats = {}
    docs = [('src/a.py', 'x = 1'), ('topic/intro', 'Hello.'), ('src/b.py', 'y = 2')]

    def __len__(self):
      return len(self.docs)

    def record(self, i):
      return {'name': self.docs[i][0], 'text': self.docs[i][1]}

    def __getitem__(self, i):
      return self.docs[i][1]

  from data import corpus  # pylint: disable=import-outside-toplevel
  src = corpus.FilteredSource(Fake(), '^src/')
  assert len(src) == 2 and list(src) == ['x = 1', 'y = 2']
  assert src.record(1)['name'] == 'src/b.py' and src.stats['doc_filter_kept'] == 2
  with pytest.raises(ValueError, match='matches no document'):
    corpus.FilteredSource(Fake(), '^nothing')
  with pytest.raises(ValueError, match='not a regular expression'):
    corpus.FilteredSource(Fake(), '(')
