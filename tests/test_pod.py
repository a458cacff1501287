"""Pod-ready runs: bucket workdirs end to end on a local Cloud Storage emulator (two
jax.distributed processes train on parquet / jsonl.gz shards in the bucket into a gs:// workdir,
each reading only its own shards, are killed, resume bitwise, a third process evaluates; a sweep
on bucket data into a bucket; the lock object), the TPU launcher against a
stub `gcloud` (code shipped, set up and started on all workers, preemption restarts), the local
restart loop, and bad workdir URLs."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import psutil
import pytest

import launch
from conftest import ROOT, launch_cmd, run_launch, start_launch, subprocess_env
from test_shards import cfg_data, write_corpus
from test_train import CONFIG, RESUME, SMALL, _free_port
from data import corpus
from train import launching, record, storage


def _curve(wd):
  out = {}
  for line in storage.read_text(storage.join(wd, 'metrics.jsonl')).splitlines():
    r = json.loads(line)
    out[r['step']] = r['loss']
  return out


@pytest.fixture(scope='module')
def bucket_corpus(gcs, tmp_path_factory):
  """The parquet + jsonl.gz shards of test_shards in gs://test-bucket/corpus/, and the
  launch.py flags that train on them (no local data: `max_docs` of SMALL does not apply)."""
  import fsspec  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp('corpus'))
  write_corpus(d, parquet_files=4)
  fs = fsspec.filesystem('gs')
  for f in sorted(os.listdir(d)):
    fs.put(os.path.join(d, f), f'test-bucket/corpus/{f}')
  source = f'shards:{gcs}/corpus/*.parquet,{gcs}/corpus/*.jsonl.gz'
  return source, [a for a in SMALL if 'max_docs' not in a] + [f'--config.data.source={source}']


def test_storage_and_the_lock_object_on_a_bucket(gcs, monkeypatch):
  wd = f'{gcs}/store'
  assert storage.canonical(wd) == wd and storage.check_workdir(wd) == wd
  storage.write_json(f'{wd}/a/x.json', {'k': 1})
  assert storage.read_json(f'{wd}/a/x.json') == {'k': 1} and storage.listdir(wd) == ['a']
  log = storage.JsonlLog(f'{wd}/m.jsonl')
  for s in range(1, 5):
    log.append({'step': s})
  log.close()
  assert len(storage.JsonlLog(f'{wd}/m.jsonl', keep_steps=2)._lines) == 2  # pylint: disable=protected-access
  assert len(storage.read_text(f'{wd}/m.jsonl').splitlines()) == 2  # the resumed run's view
  # one training per bucket workdir: a held lease is refused by name; an expired one (its
  # holder died without releasing) is taken over, and the old holder learns it lost it
  monkeypatch.setenv(storage.LEASE_ENV, '2')
  a = storage.WorkdirLock(wd)
  a.acquire()
  with pytest.raises(storage.WorkdirError, match=r'already being trained by pid \d+.*lease ends'):
    storage.WorkdirLock(wd).acquire()
  a._gcs._stop.set()  # pylint: disable=protected-access  # the holder "dies": no renewals
  a._gcs._thread.join()  # pylint: disable=protected-access
  time.sleep(2.5)
  b = storage.WorkdirLock(wd)
  b.acquire()
  assert not a._gcs.renew()  # pylint: disable=protected-access  # its generation is gone
  with pytest.raises(storage.WorkdirError, match='lost its lock'):
    a.check()  # the trainer stops before its next checkpoint
  b.release()
  c = storage.WorkdirLock(wd)
  c.acquire()  # released: free again
  c.release()


@pytest.mark.parametrize('url,words', [
    ('gs://no-such-bucket/run', "the bucket 'no-such-bucket' does not exist"),
    ('hdfs://cluster/run', "unsupported URL scheme 'hdfs'")])
def test_bad_workdir_urls_fail_before_training(gcs, data_dir, url, words):
  p = run_launch(data_dir, CONFIG, f'--workdir={url}', '--config.train.steps=2', *SMALL,
                 check=False)
  assert p.returncode == 1 and words in p.stderr and url in p.stderr, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and '[lm]' not in p.stdout  # before the model is built


@pytest.mark.parametrize('url,words', [
    ('gs:/bucket/run', 'a slash missing; write gs://BUCKET/PATH'),
    ('gs://', "'' is not a bucket name"),
    ('gs://My_Bucket!/run', "'My_Bucket!' is not a bucket name"),
    ('runs/gs:/x', 'a folder name ending in ":"')])
def test_malformed_workdirs_are_named(url, words):
  with pytest.raises(storage.WorkdirError, match=re.escape(words)):
    storage.canonical(url)


def test_missing_credentials_are_named(monkeypatch):
  from google.auth import exceptions as gauth  # pylint: disable=import-outside-toplevel

  class NoCredentials:
    def exists(self, path):
      raise gauth.DefaultCredentialsError('Your default credentials were not found')

  monkeypatch.setattr(storage, '_fs', lambda p: (NoCredentials(), p.split('://', 1)[1]))
  with pytest.raises(storage.WorkdirError, match=r'gs://lab/run: cannot reach the bucket '
                                                 r"'lab'.*Credentials: gcloud auth"):
    storage.check_workdir('gs://lab/run')


def test_two_processes_on_bucket_shards_resume_bitwise_and_a_third_evaluates(
    gcs, bucket_corpus, data_dir, monkeypatch, tmp_path):
  """The pod path on a bucket: 2 jax.distributed processes train on parquet / jsonl.gz shards in
  the bucket, each fetching only its own shards (counted per process), checkpoint into one gs://
  workdir, are killed -9, resume (curve bitwise equal to an uninterrupted 2-process run; the
  restart waits out the killed run's lock lease), and a third process follows the bucket as the
  evaluator."""
  monkeypatch.setenv(storage.LEASE_ENV, '4')
  source, data_flags = bucket_corpus
  common = [CONFIG, '--config.train.steps=16', '--config.ckpt.every=4', '--config.ckpt.keep=10',
            *data_flags, '--num_processes=2']

  logs = iter(range(100))

  def pair(wd, port):
    # output to files: a pipe nobody reads while waiting on the other process could fill up
    # and stall that process inside a collective
    procs = []
    for i in range(2):
      log = tmp_path / f'{next(logs)}.log'
      procs.append((start_launch(data_dir, *common, f'--workdir={wd}',
                                 f'--coordinator=localhost:{port}', f'--process_id={i}',
                                 devices=2, output=log), log))
    return procs

  def wait(procs):
    outs = []
    for p, log in procs:
      p.wait(timeout=600)
      outs.append(log.read_text())
      assert p.returncode == 0, outs[-1][-3000:]
    return outs

  ref = f'{gcs}/ref'
  wait(pair(ref, _free_port()))
  wd = f'{gcs}/run'
  procs = pair(wd, _free_port())
  t0 = time.time()
  while time.time() - t0 < 300:
    steps = [int(s) for s in storage.listdir(f'{wd}/checkpoints') if s.isdigit()]
    if steps and max(steps) >= 8:
      break
    assert all(p.poll() is None for p, _ in procs), [p.poll() for p, _ in procs]
    time.sleep(0.2)
  for p, _ in procs:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
  assert not storage.exists(f'{wd}/train_summary.json'), 'finished before it was killed'
  # a lease renewed within its last 30 % is a live holder's and refused at once (by design);
  # after 2 s of the 4 s lease the killed run's has missed a renewal, and the restart waits it out
  time.sleep(2)
  outs = wait(pair(wd, _free_port()))
  assert 'resumed from step' in outs[0], outs[0][-3000:]
  a, b = _curve(ref), _curve(wd)
  assert sorted(a) == sorted(b) == list(range(1, 17))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:4]
  # each process fetched objects of its own share only (data_reads/process_<i>.jsonl)
  seed = storage.read_json(f'{ref}/config.json')['seed']
  src = corpus.get_source(cfg_data(source), 'train')
  resumed = int(re.search(r'resumed from step (\d+)', outs[0]).group(1))
  for run, start in ((ref, 0), (wd, resumed)):
    reads = record.reads(run)
    assert sorted(reads) == [0, 1], reads
    got = []
    for pi in (0, 1):
      row, = [r for r in reads[pi] if r['from_step'] == start]
      assert row['to_step'] == 16 and row['process_count'] == 2, row
      (name, objects), = row['sources'].items()
      assert name.endswith('/train') and objects and all(v['bytes'] > 0 for v in objects.values())
      units = src.train_stream(lambda t: t, seed, pi, 2, True, None).host_units()
      assert set(objects) <= {src.shards[u[0]].url for u in units}, (pi, objects)
      got.append(set(objects))
    assert got[0].isdisjoint(got[1]), got
  # the evaluator on a third machine: reads the bucket, evaluates every checkpoint once
  p = run_launch(data_dir, *common[:-1], f'--workdir={wd}', '--mode=evaluator',
                 '--poll_seconds=0.2', '--max_idle_seconds=120', devices=1)
  evaluated = [json.loads(l) for l in storage.read_text(f'{wd}/evaluator.jsonl').splitlines()]
  summary = storage.read_json(f'{wd}/train_summary.json')
  assert evaluated[-1]['step'] == 16 and 'evaluator] done' in p.stdout
  assert evaluated[-1]['bpb'] == pytest.approx(summary['eval']['bpb'], abs=1e-6)
  assert any(n.startswith('events.out.tfevents') for n in storage.listdir(f'{wd}/tb'))
  assert storage.read_json(f'{wd}/config.json')['family'] == 'lm'


def test_sweep_on_bucket_data_into_a_bucket(gcs, bucket_corpus, data_dir):
  source, data_flags = bucket_corpus
  wd = f'{gcs}/sweep'
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sweep', '--config.train.steps=20',
             '--config.ckpt.every=100', '--config.eval.robustness=', *data_flags)
  md = storage.read_text(f'{wd}/summary.md')
  assert md.count('| done |') == 2, md
  assert storage.exists(f'{wd}/curves_bpb.png') and storage.exists(f'{wd}/bpb_vs_flops.png')
  for point in storage.listdir(wd):  # every point trained on the bucket's shards
    if storage.exists(f'{wd}/{point}/config.json'):
      assert storage.read_json(f'{wd}/{point}/config.json')['data']['source'] == source
      assert record.reads(f'{wd}/{point}')[0][0]['sources'], point
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sweep_summary',
                 '--config.train.steps=20', *data_flags)
  assert '2 of 2 points done' in p.stdout


STUB = r'''#!{python}
"""A stand-in for gcloud: records its arguments; 'queued-resources describe' says the slice
is missing, then ACTIVE; the first start on the workers 'is preempted' (exit 1), the second
finishes the run (writes train_summary.json into the bucket workdir)."""
import json, os, sys
state_path = os.environ['STUB_STATE']
state = json.load(open(state_path)) if os.path.exists(state_path) else {{}}
args = sys.argv[1:]
with open(os.environ['STUB_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\n')
def save():
  json.dump(state, open(state_path, 'w'))
if args[:3] == ['compute', 'tpus', 'queued-resources'] and args[3] == 'describe':
  state['describe'] = state.get('describe', 0) + 1
  save()
  if state['describe'] == 1:
    sys.exit(1)
  print('ACTIVE')
  sys.exit(0)
if args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and any('launch.py' in a for a in args):
  state['start'] = state.get('start', 0) + 1
  save()
  if state['start'] == 1:
    sys.exit(1)  # the slice was preempted under the run
  import gcsfs
  wd = os.environ['STUB_WORKDIR'].split('://', 1)[1]
  gcsfs.GCSFileSystem().pipe_file(wd + '/train_summary.json', json.dumps({{'step': 5}}).encode())
sys.exit(0)
'''


def test_tpu_launch_ships_sets_up_starts_and_restarts(gcs, tmp_path, monkeypatch, capsys):
  """--launcher=tpu --spot --submit with a stub gcloud on PATH: the exact commit is archived and
  copied to all workers, each worker is set up and started with the bucket workdir passed
  through untouched; a preempted attempt (the slice lost, the start failed) is retried until
  the run's train_summary.json says it finished."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(STUB.format(python=sys.executable))
  os.chmod(bin_dir / 'gcloud', 0o755)
  wd = f'{gcs}/pod-run'
  calls = tmp_path / 'calls.jsonl'
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('STUB_LOG', str(calls))
  monkeypatch.setenv('STUB_STATE', str(tmp_path / 'state.json'))
  monkeypatch.setenv('STUB_WORKDIR', wd)
  monkeypatch.chdir(tmp_path)
  config = f'--config={ROOT}/configs/byte_lm.py:tiny'  # run from elsewhere (cwd = tmp_path)
  argv = [config, f'--workdir={wd}', '--mode=launch', '--launcher=tpu', '--tpu=pod-v5e-256',
          '--zone=us-west4-a', '--project=lab', '--spot', '--accelerator_type=v5litepod-16',
          '--runtime_version=v2-alpha-tpuv5-lite', '--config.train.steps=5', '--allow_dirty',
          '--restart_backoff=0', '--max_restarts=3']
  assert launch.main([*argv, '--dry']) == 0
  dry = capsys.readouterr().out
  assert dry.count('gcloud compute tpus tpu-vm') == 3 and not calls.exists()  # printed, not run
  assert 'gcloud compute tpus queued-resources create pod-v5e-256' in dry and '--spot' in dry
  assert launch.main([*argv, '--submit', '--poll_seconds=0']) == 0
  rec = [json.loads(l) for l in calls.read_text().splitlines()]
  kinds = [('qr-' + a[3]) if a[2] == 'queued-resources' else a[3] for a in rec]
  assert kinds == ['qr-describe', 'qr-create', 'qr-describe', 'scp', 'ssh', 'ssh',
                   'qr-describe', 'scp', 'ssh', 'ssh'], kinds
  create = rec[1]
  assert '--spot' in create and '--accelerator-type=v5litepod-16' in create
  scp, setup, start = rec[3], rec[4], rec[5]
  assert '--worker=all' in scp and scp[5] == 'pod-v5e-256:~/' and '--project=lab' in scp
  archive = scp[4]
  with tarfile.open(archive) as t:
    names = t.getnames()
  assert 'launch.py' in names and 'requirements.txt' in names and 'train/trainer.py' in names
  commit = os.path.basename(archive)[len('notoklm-'):-len('.tar.gz')]
  setup_cmd = [a for a in setup if a.startswith('--command=')][0]
  assert '--worker=all' in setup and f'~/notoklm-{commit}' in setup_cmd
  assert 'jax[tpu]==' in setup_cmd and 'requirements.txt' in setup_cmd
  start_cmd = [a for a in start if a.startswith('--command=')][0]
  assert '--worker=all' in start and f'--workdir={wd}' in start_cmd  # untouched gs:// URL
  assert ' launch.py --config=configs/byte_lm.py:tiny ' in start_cmd  # the workers' own copy
  assert 'NOTOKLM_DISTRIBUTED=1' in start_cmd and 'logs/$(hostname).log' in start_cmd
  assert launching.run_finished(wd, 5)
  # tpu.sh: the same three steps, one attempt, valid bash
  script = os.path.join(launching.launch_dir(wd), 'tpu.sh')
  subprocess.run(['bash', '-n', script], check=True)


def test_local_restart_loop_resumes_after_kill(data_dir, reference_run, tmp_path):
  """--launcher=local --submit re-runs the command until the run has finished: the training
  process killed -9 under it is restarted, resumes, and the curve equals an uninterrupted run's."""
  args = RESUME  # 60 steps, a checkpoint every 5
  ref = reference_run(*args)
  wd = str(tmp_path / 'run')
  wrapper = subprocess.Popen(
      launch_cmd(*args, f'--workdir={wd}', '--mode=launch', '--launcher=local', '--submit',
                 '--restart_backoff=0', '--max_restarts=2'),
      cwd=ROOT, env=subprocess_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  t0 = time.time()
  killed = False
  while not killed and time.time() - t0 < 300:
    path = os.path.join(wd, 'metrics.jsonl')
    if os.path.exists(path) and len(open(path).read().splitlines()) >= 12:
      for child in psutil.Process(wrapper.pid).children():
        child.send_signal(signal.SIGKILL)
        killed = True
    assert wrapper.poll() is None, wrapper.stdout.read()[-3000:]
    time.sleep(0.05)
  out = wrapper.communicate(timeout=600)[0]
  assert killed and wrapper.returncode == 0, out[-3000:]
  assert 'restarting' in out and 'resumed from step' in out, out[-3000:]
  a, b = _curve(ref), _curve(wd)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  assert all(a[s] == b[s] for s in a)
  assert np.isfinite(json.load(open(os.path.join(wd, 'train_summary.json')))['eval']['bpb'])


def test_restart_loop_stops_on_a_user_error(data_dir, tmp_path):
  """A run that fails on the user's input (here a data file that does not exist) is not
  restarted forever: 3 attempts in a row without a new checkpoint end the loop, which exits 1
  with the run's message above its own."""
  p = subprocess.run(
      launch_cmd(CONFIG, f'--workdir={tmp_path / "run"}', '--mode=launch', '--launcher=local',
                 '--submit', '--restart_backoff=0', '--max_restarts=5',
                 f'--config.data.source=text:{tmp_path / "missing.txt"}'),
      cwd=ROOT, env=subprocess_env(data_dir), capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
  assert p.stderr.count('missing.txt\' (') == 3, p.stderr[-2000:]
  assert '3 attempts in a row ended (1) without a new checkpoint' in p.stderr, p.stderr[-2000:]
  assert p.stderr.count('Traceback') == 0 and p.stdout.count('restarting in') == 2
