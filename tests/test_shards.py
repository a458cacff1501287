"""`data.source='shards:...'` (data/shards.py): parquet / jsonl.gz shards from local globs and from
the Cloud Storage emulator, each process reading its own share, exact resume, validation apart
from training, bad input, and a launch.py run that trains, is killed and resumes."""
import gzip
import json
import os
import signal

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_launch, start_launch
from data import corpus, encoders, pipeline, shards
from train import record

N_DOCS = 480


def _docs():
  rng = np.random.default_rng(0)
  words = 'the of and byte token shard bucket parquet stream host epoch row'.split()
  return [f'doc {i}: ' + ' '.join(rng.choice(words, size=3 + i % 23)) for i in range(N_DOCS)]


def write_corpus(d, docs=None, parquet_files=3, row_group=20):
  """`parquet_files` parquet shards (row groups of `row_group` rows, an extra column) and one
  jsonl.gz shard of the last quarter of the documents."""
  docs = docs or _docs()
  os.makedirs(d, exist_ok=True)
  n_pq = len(docs) * 3 // 4
  per = -(-n_pq // parquet_files)
  for k in range(parquet_files):
    part = docs[k * per:min((k + 1) * per, n_pq)]
    pq.write_table(pa.table({'text': part, 'id': list(range(len(part)))}),
                   os.path.join(d, f'part-{k:03d}.parquet'), row_group_size=row_group)
  with gzip.open(os.path.join(d, 'part-999.jsonl.gz'), 'wt') as f:
    for t in docs[n_pq:]:
      f.write(json.dumps({'text': t, 'meta': 1}) + '\n')
  return docs


def cfg_data(source, **kw):
  return ml_collections.ConfigDict({
      'source': source, 'data_dir': '', 'train_split': 'train', 'eval_split': 'validation',
      'text_key': 'text', 'txt_split': 'paragraph', 'max_doc_chars': 100_000, 'max_docs': 0,
      'doc_filter': '', 'char_map': '', 'eval_source': '', 'shuffle_buffer': 16,
      'bpe_sample_bytes': 0, 'encoder': 'bytes', **kw})


ENC = encoders.ByteEncoder()


def epoch_docs(src, pi, pc, seed=0, epoch=0):
  """The documents process `pi` of `pc` reads in `epoch` (stepping its stream)."""
  st = src.train_stream(lambda t: pipeline.tokenize_documents(ENC, t), seed, pi, pc, True,
                        {'epoch': epoch, 'unit': 0, 'segment': 0, 'item': 0, 'index': 0,
                         'offset': 0})
  out = []
  while st.epoch == epoch:
    tok = st.tokens()  # (loads the next chunk, which may start the next epoch)
    if st.epoch != epoch:
      break
    out.append(ENC.decode(tok[1:-1]))
    st.consume(len(tok) - 1)
  return out


def train_iter(data, pi=0, pc=2, state=None, prefetch=2, seed=0):
  src = corpus.get_source(data, 'train')
  return pipeline.TrainIterator(src, ENC, 48, 3, seed=seed, process_index=pi, process_count=pc,
                                prefetch=prefetch, state=state)


def batches_equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('shards') / 'corpus')
  return d, write_corpus(d)


@pytest.mark.parametrize('files,pc', [(3, 2), (1, 4)])
def test_processes_read_disjoint_shares_that_cover_the_corpus(tmp_path, files, pc):
  d = str(tmp_path / 'c')
  docs = write_corpus(d, parquet_files=files)
  if files < pc:  # fewer files than processes: parquet row groups are the units
    os.remove(os.path.join(d, 'part-999.jsonl.gz'))
    docs = docs[:len(docs) * 3 // 4]
  data = cfg_data(f'shards:{d}/*')
  val = set(corpus.get_source(data, 'validation'))
  train = set(docs) - val
  assert val and len(val) < 0.1 * len(docs)
  for epoch in (0, 1):
    shares = []
    for pi in range(pc):
      src = corpus.get_source(data, 'train')
      got = epoch_docs(src, pi, pc, epoch=epoch)
      assert len(got) == len(set(got))
      shares.append(set(got))
      # only its own files were fetched
      units = src.train_stream(lambda t: t, 0, pi, pc, True, {
          'epoch': epoch, 'unit': 0, 'segment': 0, 'item': 0, 'index': 0, 'offset': 0}
                               ).host_units()
      mine = {src.shards[u[0]].url for u in units}
      assert set(src.fetched()) <= mine
    assert set().union(*shares) == train
    assert sum(len(s) for s in shares) == len(train)
  e0 = epoch_docs(corpus.get_source(data, 'train'), 0, pc, epoch=0)
  e1 = epoch_docs(corpus.get_source(data, 'train'), 0, pc, epoch=1)
  assert e0 != e1  # a fresh order per epoch


@pytest.mark.parametrize('prefetch', [0, 2])
def test_state_round_trip_continues_on_the_exact_next_batch(local, prefetch):
  d, _ = local
  data = cfg_data(f'shards:{d}/*.parquet,{d}/*.jsonl.gz')
  it = train_iter(data, prefetch=prefetch)
  states = []
  ref = []
  for _ in range(160):  # past chunk, unit and epoch boundaries (~240 docs per process)
    ref.append(next(it))
    states.append(it.get_state())
  it.close()
  assert states[-1]['epoch'] >= 1
  for k in (0, 9, 33, 130):
    it2 = train_iter(data, prefetch=prefetch, state=json.loads(json.dumps(states[k])))
    got = [next(it2) for _ in range(12)]
    it2.close()
    assert batches_equal(got, ref[k + 1:k + 13]), k
  # the state names its data: another layout or buffer is refused
  with pytest.raises(ValueError, match='does not match'):
    train_iter(data, pc=4, state=states[5])
  with pytest.raises(ValueError, match='does not match'):
    train_iter(cfg_data(data.source, shuffle_buffer=8), state=states[5])


def test_validation_is_never_in_the_training_stream(local, tmp_path):
  d, docs = local
  data = cfg_data(f'shards:{d}/*')
  val = list(corpus.get_source(data, 'validation'))
  train = list(corpus.get_source(data, 'train'))
  assert set(val).isdisjoint(train) and set(val) | set(train) == set(docs)
  assert val == [t for t in docs if corpus.stable_bucket(t) < shards.HELD_OUT_FRACTION] or \
      set(val) == {t for t in docs if corpus.stable_bucket(t) < shards.HELD_OUT_FRACTION}
  # its own pattern: every training document is read, validation from the other files
  e = str(tmp_path / 'eval')
  write_corpus(e, [f'held out {i}' for i in range(40)], parquet_files=1)
  data = cfg_data(f'shards:{d}/*', eval_source=f'{e}/*.parquet')
  assert set(corpus.get_source(data, 'train')) == set(docs)
  ev = list(corpus.get_source(data, 'validation'))
  assert ev == [f'held out {i}' for i in range(30)]
  b = pipeline.make_eval_batches(ml_collections.ConfigDict({
      'data': {**data.to_dict(), 'seq_len': 32}, 'train': {'batch_size': 2, 'eval_batches': 0},
      'eval': {}}), ENC, 0, 1)
  assert sum(int(x['weights'].sum()) for x in b) == sum(len(t.encode()) + 1 for t in ev)


def test_bpe_trains_on_a_bounded_seeded_sample(local, tmp_path):
  d, _ = local
  src = corpus.get_source(cfg_data(f'shards:{d}/*'), 'train')
  a = list(src.bpe_sample(3000, seed=0))
  assert a == list(src.bpe_sample(3000, seed=0)) and a != list(src.bpe_sample(3000, seed=1))
  assert sum(len(t.encode()) for t in a) <= 3000
  enc = encoders.train_bpe(src, 300, str(tmp_path), 'train', sample_bytes=5000)
  assert enc.vocab_size >= 300 and enc.decode(enc.encode('doc 3: the byte')) == 'doc 3: the byte'


def test_bad_input(tmp_path, monkeypatch):
  d = str(tmp_path / 'c')
  write_corpus(d)
  with pytest.raises(ValueError, match='matches no file'):
    corpus.get_source(cfg_data(f'shards:{d}/*.nothing'), 'train')
  # parquet without the text column: one message naming the file and its columns
  b = str(tmp_path / 'nocol')
  os.makedirs(b)
  pq.write_table(pa.table({'body': ['x', 'y']}), f'{b}/a.parquet')
  with pytest.raises(ValueError, match=r"a.parquet has no column 'text'.*\['body'\]"):
    list(corpus.get_source(cfg_data(f'shards:{b}/*'), 'train'))
  # mixed schemas: a shard whose text column is not a string column
  pq.write_table(pa.table({'text': [1, 2]}), f'{d}/part-500.parquet')
  with pytest.raises(ValueError, match='not a string column'):
    list(corpus.get_source(cfg_data(f'shards:{d}/*'), 'train'))
  os.remove(f'{d}/part-500.parquet')
  # corrupt / truncated shards and an empty one: counted skips with a warning, the rest is read
  full = set(corpus.get_source(cfg_data(f'shards:{d}/*'), 'train'))
  raw = open(f'{d}/part-001.parquet', 'rb').read()
  open(f'{d}/part-001.parquet', 'wb').write(raw[:len(raw) // 2])
  gz = open(f'{d}/part-999.jsonl.gz', 'rb').read()
  open(f'{d}/part-999.jsonl.gz', 'wb').write(gz[:len(gz) // 2])
  pq.write_table(pa.table({'text': pa.array([], pa.string())}), f'{d}/part-777.parquet')
  src = corpus.get_source(cfg_data(f'shards:{d}/*'), 'train')
  got = list(src)
  assert src.stats['skipped_corrupt_shards'] == 2 and src.stats['shards_without_documents'] >= 1
  assert got and set(got) < full
  # the training stream skips them too, and goes on
  it = train_iter(cfg_data(f'shards:{d}/*'), pc=1)
  while it.get_state()['epoch'] == 0:
    next(it)
  it.close()
  assert it.source.stats['skipped_corrupt_shards'] >= 1
  # ... and the family's data stats (the run log and train_summary.json) count the stream's
  # skips as they happen, not as they were when the iterator was made
  from train import config_lib, families  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
  config_lib.override(cfg, {'data.source': f'shards:{d}/*', 'train.batch_size': '3',
                            'data.seq_len': '48', 'data.prefetch': '0'})
  fam = families.get(cfg)
  it = fam.train_iterator(0, 1)
  assert 'skipped_corrupt_shards' not in fam.data_stats()
  while it.get_state()['epoch'] == 0:
    next(it)
  it.close()
  assert fam.data_stats()['skipped_corrupt_shards'] >= 1
  assert fam.data_stats()['shards_without_documents'] >= 1
  # fewer units than processes
  with pytest.raises(ValueError, match='for 8 processes'):
    train_iter(cfg_data(f'shards:{d}/part-999.jsonl.gz'), pc=8)
  # .zst without zstandard
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec('zstandard') is None:
    open(f'{d}/x.jsonl.zst', 'wb').write(b'')
    with pytest.raises(ValueError, match='zstandard package is not installed'):
      corpus.get_source(cfg_data(f'shards:{d}/*.zst'), 'train')
  # missing credentials: one message naming the bucket and how to authenticate
  class Denied(Exception):
    code = 401

  class NoAuthFS:
    protocol = ('gs', 'gcs')

    def glob(self, path, detail=False):
      raise Denied('Anonymous caller does not have storage.objects.list access')

  monkeypatch.setattr(shards, '_filesystem', lambda url: (NoAuthFS(), url[5:]))
  with pytest.raises(ValueError, match=r'gs://private-bucket .*no credentials.*gcloud auth '
                     r'application-default login'):
    corpus.get_source(cfg_data('shards:gs://private-bucket/corpus/*.parquet'), 'train')


def test_bucket_shards_match_local_and_each_process_fetches_only_its_own(gcs, local):
  import fsspec  # pylint: disable=import-outside-toplevel
  d, _ = local
  fs = fsspec.filesystem('gs')
  for f in sorted(os.listdir(d)):
    fs.put(os.path.join(d, f), f'test-bucket/corpus/{f}')
  bucket = cfg_data(f'shards:{gcs}/corpus/*.parquet,{gcs}/corpus/*.jsonl.gz')
  here = cfg_data(f'shards:{d}/*.parquet,{d}/*.jsonl.gz')
  assert corpus.get_source(bucket, 'train').fingerprint()['files'] == 4
  fetched = []
  for pi in range(2):
    a, b = train_iter(bucket, pi=pi, prefetch=0), train_iter(here, pi=pi)  # (no read-ahead)
    ga = [next(a) for _ in range(30)]
    state = a.get_state()
    while a.get_state()['epoch'] == 0:  # the whole of its share
      got = {u: dict(v) for u, v in a.source.fetched().items()}  # (before the next epoch)
      ga.append(next(a))
    gb = [next(b) for _ in ga]
    a.close()
    b.close()
    assert batches_equal(ga, gb)  # a bucket glob reads as the local glob
    units = a.source.train_stream(lambda t: t, 0, pi, 2, True, None).host_units()
    mine = {a.source.shards[u[0]].url for u in units}
    assert set(got) == mine and all(v['bytes'] > 0 for v in got.values()), (got, mine)
    fetched.append(set(got))
    c = train_iter(bucket, pi=pi, state=state)  # resumes on the bucket's exact next batch
    assert batches_equal([next(c) for _ in range(3)], ga[30:33])
    c.close()
  assert fetched[0].isdisjoint(fetched[1])
  assert len(fetched[0] | fetched[1]) == 4


SHARD_ARGS = ['--config=configs/byte_lm.py:tiny', '--config.train.batch_size=4',
              '--config.data.seq_len=64', '--config.train.eval_batches=2',
              '--config.sample.max_new_tokens=0', '--config.train.log_every=5',  # no sample
              '--config.data.shuffle_buffer=32', '--config.train.steps=60',
              '--config.ckpt.every=10']


def test_launch_trains_on_parquet_shards_is_killed_resumes_and_evaluates(data_dir, tmp_path):
  from test_train import _wait_for_step, curve, last_eval_bpb  # pylint: disable=import-outside-toplevel
  d = str(tmp_path / 'corpus')
  write_corpus(d, parquet_files=4)
  os.remove(os.path.join(d, 'part-999.jsonl.gz'))
  args = [*SHARD_ARGS, f'--config.data.source=shards:{d}']
  ref = str(tmp_path / 'ref')
  p = run_launch(data_dir, *args, f'--workdir={ref}')
  assert 'bits per byte' in p.stdout
  wd = str(tmp_path / 'killed')
  proc = start_launch(data_dir, *args, f'--workdir={wd}')
  _wait_for_step(wd, 25, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert max(curve(wd)) < 60
  p = run_launch(data_dir, *args, f'--workdir={wd}')
  assert 'resumed from step' in p.stdout
  a, b = curve(ref), curve(wd)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:5]
  assert last_eval_bpb(ref) == last_eval_bpb(wd)
  # what the process read, per launch: the killed launch recorded nothing, the resumed one its
  # steps; with one process, every file is its share (60 steps read only part of the corpus)
  (row,), (resumed,) = record.reads(ref)[0], record.reads(wd)[0]
  assert (row['from_step'], row['to_step'], resumed['to_step']) == (0, 60, 60)
  assert 0 < resumed['from_step'] < 60 and f'resumed from step {resumed["from_step"]}' in p.stdout
  (objects,) = row['sources'].values()
  assert objects and set(objects) <= {os.path.join(d, f) for f in os.listdir(d)}
  assert all(v['opens'] >= 1 and v['bytes'] > 0 for v in objects.values())
  run_launch(data_dir, *args, f'--workdir={wd}', '--mode=eval')
  ev = json.load(open(os.path.join(wd, 'eval_step60.json')))
  assert ev['bpb'] == pytest.approx(last_eval_bpb(wd), abs=1e-6)
