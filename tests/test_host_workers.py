"""`data.workers`: a host's training batches built by worker processes (data/host_workers.py).

Host-side only: no model step, no jit. Each WorkerIterator start spawns its processes (about a
second each on a busy 2-core machine), so the tests start as few as they can. A worker that
unpickles `Explodes` imports this module: it imports nothing heavy (JAX) at its top.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from configs import base
from data import encoders, host_workers, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def text_cfg(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('workers')
  path = tmp / 'corpus.txt'
  path.write_text('\n\n'.join(f'document {i}: ' + ' '.join(['word'] * (i % 23)) + ' end.'
                              for i in range(120)))
  cfg = base.get_config()
  cfg.data.data_dir = str(tmp / 'tfds')
  cfg.data.source = f'text:{path}'
  cfg.data.seq_len = 32
  cfg.data.prefetch = 1
  cfg.train.batch_size = 8
  return cfg


def _with(cfg, **data):
  cfg = cfg.copy_and_resolve_references()
  cfg.data.update(data)
  return cfg


def _virtual_hosts(cfg, enc, p, hosts, workers, n, counts=None):
  """n batches of host p of `hosts` with `workers`, built as the rows of workers * hosts
  single-process iterators (the layout data.workers promises); `counts`: a dict that gets the
  sum of their sources' counts."""
  cfg0 = _with(cfg, workers=0, prefetch=0)  # (counts of what the batches read, no more)
  its = [pipeline.make_train_iterator(cfg0, enc, p * workers + w, hosts * workers)
         for w in range(workers)]
  try:
    return [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
            for bs in ([next(it) for it in its] for _ in range(n))]
  finally:
    for it in its:
      it.close()
      for k, v in dict(getattr(it.source, 'stats', None) or {}).items():
        if counts is not None and k.startswith('skipped'):
          counts[k] = counts.get(k, 0) + v


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _gone(pids, timeout=10.0):
  """Whether every process in `pids` has exited (and been reaped or orphan-reaped)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    alive = []
    for pid in pids:
      try:
        os.kill(pid, 0)
        with open(f'/proc/{pid}/stat') as f:  # a zombie awaiting its reaper counts as gone
          if f.read().split(')')[-1].split()[0] != 'Z':
            alive.append(pid)
      except (ProcessLookupError, FileNotFoundError):
        pass
    if not alive:
      return True
    time.sleep(0.1)
  return False


def test_workers_are_virtual_hosts_and_resume_exactly(text_cfg):
  """Host 1 of 2 with 2 workers = rows of virtual hosts 2 and 3 of 4, concatenated; a state
  taken mid-run resumes on the exact next batch; and the state names the worker count."""
  enc = encoders.get_encoder(text_cfg.data)
  want = _virtual_hosts(text_cfg, enc, 1, 2, 2, 5)
  cfg = _with(text_cfg, workers=2)
  with pipeline.make_train_iterator(cfg, enc, 1, 2) as it:
    assert isinstance(it, host_workers.WorkerIterator)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    pids = [p.pid for p in it._procs]  # pylint: disable=protected-access
  assert _gone(pids)  # closed: its workers exited
  for g, w in zip(got, want):
    _same(g, w)
  assert state['workers'] == 2 and state['process_index'] == 1 and state['process_count'] == 2
  assert [s['process_index'] for s in state['worker_states']] == [2, 3]
  assert state['worker_common']['process_count'] == 4  # shared entries stored once
  with pipeline.make_train_iterator(cfg, enc, 1, 2, state=state) as again:
    for w in want[3:]:
      _same(next(again), w)


def test_a_changed_worker_count_is_refused_by_name(text_cfg):
  from train import config_lib  # pylint: disable=import-outside-toplevel
  enc = encoders.get_encoder(text_cfg.data)
  cfg2 = _with(text_cfg, workers=2)
  state2 = {'workers': 2, 'process_index': 0, 'process_count': 1,
            'worker_states': [None, None]}
  with pytest.raises(ValueError, match=r'data\.workers=2.*data\.workers=0'):
    pipeline.make_train_iterator(_with(text_cfg, workers=0), enc, 0, 1, state=state2)
  with pytest.raises(ValueError, match=r'data\.workers=2.*data\.workers=4'):
    pipeline.make_train_iterator(_with(text_cfg, workers=4), enc, 0, 1, state=state2)
  with pipeline.make_train_iterator(_with(text_cfg, workers=0), enc, 0, 1) as plain:
    state0 = plain.get_state()
  with pytest.raises(ValueError, match=r'data\.workers=0.*data\.workers=2'):
    pipeline.make_train_iterator(cfg2, enc, 0, 1, state=state0)
  with pytest.raises(ValueError, match=r'data\.workers=3.*divide'):  # 8 rows / 3 workers
    pipeline.make_train_iterator(_with(text_cfg, workers=3), enc, 0, 1)
  bad = _with(text_cfg)
  bad.data.workers = -1
  with pytest.raises(config_lib.ConfigError, match='data.workers'):
    config_lib.validate(bad)


class Explodes:
  """A picklable batch transform that fails on its third call (in each worker: worker 0's
  error is the one met first)."""

  def __init__(self):
    self.calls = 0

  def __call__(self, batch):
    self.calls += 1
    if self.calls == 3:
      raise ValueError('bad document in this shard')
    return batch


def test_a_failing_worker_ends_the_iterator_with_its_error(text_cfg):
  enc = encoders.get_encoder(text_cfg.data)
  it = pipeline.make_train_iterator(_with(text_cfg, workers=2), enc, 0, 1, transform=Explodes())
  next(it)
  pids = [p.pid for p in it._procs]  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='bad document in this shard') as e:
    for _ in range(3):
      next(it)
  assert 'in data worker 0 of 2 (data.workers)' in ''.join(e.value.__notes__)
  assert not it._procs and _gone(pids)  # pylint: disable=protected-access
  it.close()  # closing again is harmless


def test_no_worker_outlives_its_trainer(text_cfg, tmp_path):
  """The trainer's process killed with -9: its workers notice and exit by themselves; a
  trainer that exits without closing its iterator stops its workers at exit."""
  script = tmp_path / 'host.py'
  script.write_text(textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {ROOT!r})
      from configs import base
      from data import encoders, pipeline
      if __name__ == '__main__':
        cfg = base.get_config()
        cfg.data.data_dir, cfg.data.source = {text_cfg.data.data_dir!r}, {text_cfg.data.source!r}
        cfg.data.seq_len, cfg.train.batch_size, cfg.data.workers = 32, 8, 2
        it = pipeline.make_train_iterator(cfg, encoders.get_encoder(cfg.data), 0, 1)
        next(it)
        print('PIDS', *[p.pid for p in it._procs], flush=True)
        if sys.argv[1] == 'wait':
          time.sleep(600)
  """))
  for how in ('wait', 'exit'):
    proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE,
                            text=True)
    try:
      line = ''
      while not line.startswith('PIDS'):  # (the corpus may be prepared first, said on stdout)
        line = proc.stdout.readline()
        assert line, 'the host process ended early'
      pids = [int(x) for x in line.split()[1:]]
      if how == 'exit':
        assert proc.wait(timeout=60) == 0
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    assert len(pids) == 2 and _gone(pids), how


def test_hat_word_fields_run_in_the_workers(text_cfg):
  """The HAT family with data.workers=2: the same fields and rows as the virtual hosts, and
  the word counts of the workers reach the family's data stats."""
  from benchmarks import aot  # pylint: disable=import-outside-toplevel
  from train import families  # pylint: disable=import-outside-toplevel
  over = {'data.source': text_cfg.data.source, 'data.data_dir': text_cfg.data.data_dir,
          'data.seq_len': 64, 'train.batch_size': 4, 'data.prefetch': 0}
  fam0 = families.get(aot.load_config('configs/hat.py:tiny', over))
  fam = families.get(aot.load_config('configs/hat.py:tiny', {**over, 'data.workers': 2}))
  it0 = [fam0.train_iterator(w, 2) for w in range(2)]
  want = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
          for bs in ([next(i) for i in it0] for _ in range(2))]
  for i in it0:
    i.close()
  with fam.train_iterator(0, 1) as it:
    assert isinstance(it, host_workers.WorkerIterator)
    got = [next(it) for _ in range(2)]
  assert 'word_gather' in got[0] and 'word_ids' in got[0]
  for g, w in zip(got, want):
    _same(g, w)
  assert fam.fields.stats == fam0.fields.stats and fam.fields.stats['words'] > 0
  assert fam.data_stats()['train_bytes_per_word'] == fam0.data_stats()['train_bytes_per_word']


def test_streamed_shards_through_workers(text_cfg, tmp_path):
  """A `shards:` corpus (data/shards.py): the same virtual-host layout, and the stream's counts
  (a skipped record per file, counted when a file is done) read in the workers reach this
  process's source stats."""
  import gzip  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  for f in range(2):
    with gzip.open(tmp_path / f'part{f}.jsonl.gz', 'wt') as fh:
      for i in range(12):
        fh.write(json.dumps({'text': f'shard {f} doc {i} ' + 'x ' * (i % 7)}
                            if i != 3 else {'text': 5}) + '\n')
  cfg = _with(text_cfg, source=f'shards:{tmp_path}/*.jsonl.gz', shuffle_buffer=8)
  enc = encoders.get_encoder(cfg.data)
  counts = {}
  want = _virtual_hosts(cfg, enc, 0, 1, 2, 4, counts)  # 4 x 4 rows x 32 tokens: files read whole
  with pipeline.make_train_iterator(_with(cfg, workers=2), enc, 0, 1) as it:
    got = [next(it) for _ in range(4)]
    stats = dict(it.source.stats)
  for g, w in zip(got, want):
    _same(g, w)
  assert counts['skipped_not_string'] >= 2 and stats['shard_files'] == 2
  assert {k: v for k, v in stats.items() if k.startswith('skipped')} == counts


@pytest.mark.parametrize('spec', ['configs/lcm.py:tiny', 'configs/sentence_decoder.py:tiny'])
def test_a_family_without_workers_refuses_them_by_name(spec):
  """A family whose batches do not come from pipeline.make_train_iterator refuses
  data.workers > 0 before building anything, rather than ignore it."""
  from benchmarks import aot  # pylint: disable=import-outside-toplevel
  from train import families  # pylint: disable=import-outside-toplevel
  cfg = aot.load_config(spec, {'data.workers': 2})
  with pytest.raises(ValueError, match=r'data.workers=2: the \w+ family builds its training '
                                       r'batches its own way.*leave data.workers=0'):
    families.get(cfg)
