"""End to end through launch.py: train -> checkpoint -> eval/sample, exact resume after
kill -9 and SIGTERM, 8 host devices vs 1, two jax.distributed processes, sweeps."""
import json
import os
import signal
import socket
import time

import pytest

from conftest import run_launch, start_launch

CONFIG = '--config=configs/byte_lm.py:tiny'
# sample.max_new_tokens=0: no end-of-run sample (nothing is generated or compiled for it); the
# runs that check sampling ask for tokens with SAMPLE after SMALL (the last flag wins)
SMALL = ['--config.data.max_docs=400', '--config.train.batch_size=8', '--config.data.seq_len=64',
         '--config.train.eval_batches=4', '--config.sample.max_new_tokens=0',
         '--config.train.log_every=10']
SAMPLE = ['--config.sample.max_new_tokens=16']
# one run for the interrupt-and-resume tests here and in test_faults.py, test_ops.py and
# test_pod.py: they share its compiled programs and its uninterrupted reference (reference_run)
RESUME = [CONFIG, '--config.train.steps=60', '--config.ckpt.every=5', *SMALL]


def curve(workdir, key='loss'):
  """step -> metric; a resumed run's record for a step replaces the killed run's."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      out[r['step']] = r[key]
  return out


def last_eval_bpb(workdir):
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    return json.load(f)['eval']['bpb']


def test_train_eval_sample(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--config.train.steps=20',
                 '--config.ckpt.every=5', *SMALL, *SAMPLE)
  assert 'bits per byte' in p.stdout and 'sample 0' in p.stdout, p.stdout
  assert os.path.exists(os.path.join(wd, 'config.json'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(wd, 'tb')))
  losses = curve(wd)
  assert sorted(losses) == list(range(1, 21))
  assert losses[20] < losses[1]
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit())
  assert steps[-1] == 20 and len(steps) <= 3  # ckpt.keep=3 of the 4 saved
  # eval restores the last checkpoint and reproduces the bpb training reported
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=eval', '--config.train.steps=20',
                 *SMALL, *SAMPLE)
  ev = json.load(open(os.path.join(wd, 'eval_step20.json')))
  assert ev['bpb'] == pytest.approx(last_eval_bpb(wd), abs=1e-6)
  assert f'{ev["bpb"]:.4f}' in p.stdout
  # ... also onto 8 devices
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=eval', '--step=10',
             '--config.train.steps=20', *SMALL, *SAMPLE, devices=8)
  ev10 = json.load(open(os.path.join(wd, 'eval_step10.json')))
  assert ev10['step'] == 10 and ev10['bpb'] > ev['bpb'] - 0.5
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sample', '--config.train.steps=20',
                 '--config.sample.prompt=import ', *SMALL, *SAMPLE)
  assert 'import ' in p.stdout and '--- sample 0' in p.stdout


def _wait_for_step(wd, step, proc, timeout=300):
  path = os.path.join(wd, 'metrics.jsonl')
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f'run ended before step {step}: {proc.stdout.read()[-2000:]}')
    if os.path.exists(path):
      with open(path) as f:
        lines = f.read().splitlines()
      if lines and json.loads(lines[-1])['step'] >= step:
        return
    time.sleep(0.02)
  raise AssertionError(f'no step {step} within {timeout}s')


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGINT])
def test_resume_is_exact(data_dir, reference_run, tmp_path, sig):
  """kill -9, or Ctrl-C (SIGINT: checkpoint and exit 130, like SIGTERM's 143, which
  tests/test_faults.py covers for the other families), then resume: the loss curve equals an
  uninterrupted run's bitwise, and the logs hold every step once."""
  args = RESUME
  ref = reference_run(*args)
  wd = str(tmp_path / 'killed')
  proc = start_launch(data_dir, *args, f'--workdir={wd}')
  _wait_for_step(wd, 23, proc)
  proc.send_signal(sig)
  out = proc.communicate(timeout=120)[0]
  if sig == signal.SIGINT:
    assert proc.returncode == 130 and 'stopped by SIGINT' in out, out[-2000:]
    assert 'Traceback' not in out, out[-2000:]
  else:
    assert proc.returncode == -signal.SIGKILL
  stopped_at = max(curve(wd))
  assert stopped_at < 60, 'the run finished before it was interrupted'
  p = run_launch(data_dir, *args, f'--workdir={wd}')
  assert 'resumed from step' in p.stdout
  a, b = curve(ref), curve(wd)
  assert sorted(a) == sorted(b) == list(range(1, 61))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:5]
  assert last_eval_bpb(ref) == last_eval_bpb(wd)
  with open(os.path.join(wd, 'metrics.jsonl')) as f:  # the killed run's extra steps were dropped
    assert len(f.read().splitlines()) == 60


def test_8_devices_match_1_device(data_dir, tmp_path):
  args = [CONFIG, '--config.train.steps=20', '--config.ckpt.every=100', *SMALL,
          '--config.train.batch_size=16', '--config.train.grad_accum=2']
  one, eight = str(tmp_path / 'one'), str(tmp_path / 'eight')
  run_launch(data_dir, *args, f'--workdir={one}')
  run_launch(data_dir, *args, f'--workdir={eight}', '--config.mesh.fsdp=2', devices=8)
  a, b = curve(one), curve(eight)
  assert abs(a[20] - b[20]) < 1e-4, (a[20], b[20])
  assert abs(last_eval_bpb(one) - last_eval_bpb(eight)) < 1e-4
  # the checkpoint written on 8 devices (fsdp-sharded) restores for eval on 1
  run_launch(data_dir, *args, f'--workdir={eight}', '--mode=eval')
  ev = json.load(open(os.path.join(eight, 'eval_step20.json')))
  assert abs(ev['bpb'] - last_eval_bpb(eight)) < 1e-5


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(data_dir, tmp_path):
  wd = str(tmp_path / 'dist')
  port = _free_port()
  args = [CONFIG, f'--workdir={wd}', '--config.train.steps=16', '--config.ckpt.every=8', *SMALL,
          f'--coordinator=localhost:{port}', '--num_processes=2']  # the shapes of test_pod.py's
  procs = [start_launch(data_dir, *args, f'--process_id={i}', devices=2) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert 'devices 4' in outs[0] and '2 process(es)' in outs[0]
  assert 'bits per byte' in outs[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit())
  assert steps == [8, 16]
  # the 2-process checkpoint restores for eval in a single process
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=eval', '--config.train.steps=16', *SMALL)
  assert json.load(open(os.path.join(wd, 'eval_step16.json')))['step'] == 16


def test_sweep_writes_summary(data_dir, tmp_path):
  wd = str(tmp_path / 'sweep')
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sweep', '--config.train.steps=20',
             '--config.ckpt.every=100', *SMALL)
  for f in ('summary.csv', 'summary.md', 'curves_bpb.png'):
    assert os.path.getsize(os.path.join(wd, f)) > 0
  md = open(os.path.join(wd, 'summary.md')).read()
  assert 'optim.lr=0.001' in md and 'optim.lr=0.003' in md and 'val_bpb' in md
  assert md.count('| done |') == 2, md


def test_bad_config_and_data_fail_clearly(data_dir, tmp_path):
  p = run_launch(data_dir, CONFIG, f'--workdir={tmp_path}', '--config.optim.lrr=1', check=False)
  assert p.returncode == 2 and "did you mean 'optim.lr'" in p.stderr
  missing = str(tmp_path / 'nope.txt')
  p = run_launch(data_dir, CONFIG, f'--workdir={tmp_path}', f'--config.data.source=text:{missing}',
                 check=False)
  assert p.returncode != 0 and missing in p.stderr


def test_bad_text_lines_are_counted_in_run_log(data_dir, tmp_path):
  good = '\n\n'.join(f'paragraph {i}: ' + 'some plain words here. ' * 20 for i in range(40))
  path = tmp_path / 'mixed.txt'
  path.write_bytes(good.encode() + b'\n\nbad \xff\xfe utf8 line\n\nnul \x00 byte line\n\n'
                   + b'x' * 300_000 + b'\n')
  p = run_launch(data_dir, CONFIG, f'--workdir={tmp_path / "run"}', f'--config.data.source=text:{path}',
                 '--config.train.steps=2', '--config.data.max_doc_chars=100000', *SMALL)
  assert 'skipped_invalid_utf8=1' in p.stdout and 'skipped_nul=1' in p.stdout, p.stdout
  assert 'docs_cut=1' in p.stdout
  summary = json.load(open(tmp_path / 'run' / 'train_summary.json'))
  assert summary['data']['skipped_invalid_utf8'] == 1 and summary['data']['skipped_nul'] == 1


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'step':
      out[f'{prefix}{k}'] = v
  return out


def test_evaluators_in_the_loop_match_eval_and_evaluator(data_dir, tmp_path):
  """Evaluators listed with every=N run in the training loop at those steps (and at the last),
  and write the keys and values that --mode=eval and --mode=evaluator write for that step."""
  wd = str(tmp_path / 'run')
  args = [CONFIG, f'--workdir={wd}', '--config.train.steps=20', '--config.ckpt.every=10', *SMALL,
          '--config.evals.robustness.every=10', '--config.eval.robustness=caps',
          '--config.evals.next_word.every=20', '--config.eval.next_word_texts=4']
  run_launch(data_dir, *args)
  loop = {}
  with open(os.path.join(wd, 'eval_metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      loop[r.pop('step')] = r
  assert sorted(loop) == [10, 20]
  assert set(loop[10]) == {'robustness/caps/bpb', 'robustness/caps/loss', 'robustness/caps/n_bytes'}
  assert {'bpb', 'loss', 'robustness/caps/bpb', 'next_word/accuracy'} <= set(loop[20])
  assert os.path.exists(os.path.join(wd, 'robustness_step10.md'))
  summary = json.load(open(os.path.join(wd, 'train_summary.json')))
  assert summary['eval']['robustness']['caps']['bpb'] == loop[20]['robustness/caps/bpb']

  def same(a, b):  # next-word timing aside, the same keys and values
    a, b = ({k: v for k, v in x.items() if k != 'next_word/seconds'} for x in (a, b))
    assert set(a) == set(b)
    for k in a:
      assert a[k] == pytest.approx(b[k], abs=1e-6), k

  for s in (10, 20):
    run_launch(data_dir, *args, '--mode=eval', f'--step={s}')
    ev = _flat(json.load(open(os.path.join(wd, f'eval_step{s}.json'))))
    same(loop[s], {k: v for k, v in ev.items() if k in loop[s]})
    assert 'next_word/accuracy' in ev and 'bpb' in ev  # --mode=eval runs every evaluator
  p = run_launch(data_dir, *args, '--mode=evaluator', '--poll_seconds=0.2',
                 '--max_idle_seconds=120')
  record = {}
  with open(os.path.join(wd, 'evaluator.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      record[r.pop('step')] = r
  assert sorted(record) == [10, 20], p.stdout[-2000:]
  same(loop[20], record[20])  # the evaluator job runs what the loop runs (every != 0)
  same({k: v for k, v in record[10].items() if k.startswith('robustness/')}, loop[10])
