"""The workdir is the run (train/record.py): later modes start from the run's recorded config,
a resume is checked against it, and nothing rewrites what a finished run recorded. Tiny runs of
the byte LM, in-process where the launch path is not the point."""
import json
import os

import pytest

import launch
from conftest import run_launch
from test_reliability import SMALL, _cfg
from train import checkpoint as ckpt_lib
from train import config_lib, trainer

SPEC = '--config=configs/byte_lm.py:tiny'


def _docs(tmp_path, n=40):
  text = tmp_path / 'docs.txt'
  text.write_text('\n\n'.join(f'document {i}: ' + 'words and more words. ' * 30
                              for i in range(n)))
  return text


def _history(wd, notes=False):
  """config_history.jsonl: one row per changed key of a resume (train/record.py); `notes`:
  also the learning-rate schedule notes a resume adds (key `optim.schedule@step`)."""
  path = os.path.join(wd, 'config_history.jsonl')
  rows = [json.loads(l) for l in _read(path).splitlines()] if os.path.exists(path) else []
  return [r for r in rows if notes or not r['key'].endswith('@step')]


def _seconds_at(wd, step):
  """train_time.jsonl: the accumulated training seconds at each checkpoint."""
  rows = [json.loads(l) for l in _read(os.path.join(wd, 'train_time.jsonl')).splitlines()]
  return [r['train_seconds'] for r in rows if r['step'] == step][-1]


def _read(path):
  with open(path) as f:
    return f.read()


def test_eval_scores_the_runs_own_data_and_says_which(data_dir, tmp_path, capsys):
  """Defect: `--mode=eval` without the training's `data.source` override scored python_docs,
  and eval_step{N}.json did not say which data it scored."""
  text = _docs(tmp_path)
  wd = str(tmp_path / 'run')
  trainer.train(_cfg(**{'data.source': f'text:{text}', 'train.steps': 2, 'data.max_docs': 0}),
                wd)
  summary = json.loads(_read(os.path.join(wd, 'train_summary.json')))
  # the preset alone on the command line: the run's recorded config is what is evaluated
  assert launch.main([SPEC, f'--workdir={wd}', '--mode=eval']) == 0
  ev = json.loads(_read(os.path.join(wd, 'eval_step2.json')))
  assert ev['record']['data']['source'] == f'text:{text}' and ev['record']['own_data']
  assert ev['record']['eval_batches'] == 2 and ev['record']['overrides'] == {}
  assert ev['bpb'] == pytest.approx(summary['eval']['bpb'], abs=1e-6)
  # another data source: allowed, recorded, and written beside the run's own evaluation
  assert launch.main([SPEC, f'--workdir={wd}', '--mode=eval',
                      '--config.data.source=python_docs', '--config.data.max_docs=400']) == 0
  assert json.loads(_read(os.path.join(wd, 'eval_step2.json'))) == ev
  other = [f for f in os.listdir(wd) if f.startswith('eval_step2.') and f != 'eval_step2.json']
  assert len(other) == 1, other
  rec = json.loads(_read(os.path.join(wd, other[0])))['record']
  assert rec['data']['source'] == 'python_docs' and not rec['own_data']
  assert rec['overrides'] == {'data.source': 'python_docs', 'data.max_docs': 400}
  # a model shape cannot apply to a finished run: refused, naming the key
  capsys.readouterr()
  assert launch.main([SPEC, f'--workdir={wd}', '--mode=eval', '--config.model.d_model=64']) == 2
  err = capsys.readouterr().err
  assert '--config.model.d_model=64' in err and 'was trained with model.d_model=' in err, err


def test_a_finished_run_keeps_its_record(data_dir, tmp_path):
  """Defect: re-running a finished run reset train_seconds and appended a second eval row; a
  smaller re-run replaced the run's results and config; a resume counted only its own time."""
  wd = str(tmp_path / 'run')
  trainer.train(_cfg(**{'train.steps': 2, 'ckpt.every': 1}), wd)
  files = ('train_summary.json', 'eval_metrics.jsonl', 'config.json', 'metrics.jsonl')
  before = {f: _read(os.path.join(wd, f)) for f in files}
  for over in ({'train.steps': 2, 'ckpt.every': 1}, {'train.steps': 1, 'train.eval_batches': 1}):
    out = trainer.train(_cfg(**over), wd)
    assert {f: _read(os.path.join(wd, f)) for f in files} == before
    assert out['nothing_to_do'] and out['step'] == 2
  assert not _history(wd)
  first = json.loads(before['train_summary.json'])['train_seconds']
  at_2 = _seconds_at(wd, 2)
  assert 0 < at_2 <= first
  trainer.train(_cfg(**{'train.steps': 3, 'ckpt.every': 1}), wd)  # extended: accumulates
  summary = json.loads(_read(os.path.join(wd, 'train_summary.json')))
  assert summary['step'] == 3 and summary['train_seconds'] > at_2
  assert _history(wd) == [{'step': 2, 'key': 'train.steps', 'old': 2, 'new': 3,
                                 'explicit': False}]
  # the cosine decay re-stretched over 3 steps: the learning rate at step 2 changes, noted
  note = [r for r in _history(wd, notes=True) if r['key'] == 'optim.schedule@step']
  assert len(note) == 1 and note[0]['step'] == 2 and note[0]['new'] > note[0]['old']


def test_a_resume_with_changed_hyperparameters_is_refused(data_dir, tmp_path, capsys):
  """Defect: `--config.optim.lr=0.05` or `--config.train.batch_size=4` on a finished run
  continued training and overwrote config.json."""
  wd = str(tmp_path / 'run')
  args = [SPEC, f'--workdir={wd}', '--config.ckpt.every=1',
          *[f'--config.{k}={v}' for k, v in SMALL.items()]]
  trainer.train(_cfg(**{'train.steps': 2, 'ckpt.every': 1}), wd)
  config_json = _read(os.path.join(wd, 'config.json'))
  with pytest.raises(config_lib.ConfigError, match=r'optim\.lr \(0\.003 -> 0\.05\), '
                                                   r'train\.batch_size \(8 -> 4\)'):
    trainer.train(_cfg(**{'train.steps': 3, 'optim.lr': 0.05, 'train.batch_size': 4}), wd)
  capsys.readouterr()
  assert launch.main([*args, '--config.train.steps=3', '--config.optim.lr=0.05']) == 2
  assert '--allow_config_change=optim.lr' in capsys.readouterr().err
  assert _read(os.path.join(wd, 'config.json')) == config_json
  assert ckpt_lib.complete_steps(os.path.join(wd, 'checkpoints'))[-1] == 2
  # asked for explicitly: trained on, and the change is in the history with its step
  assert launch.main([*args, '--config.train.steps=3', '--config.optim.lr=0.05',
                      '--allow_config_change=optim.lr']) == 0
  assert _history(wd) == [
      {'step': 2, 'key': 'optim.lr', 'old': 0.003, 'new': 0.05, 'explicit': True},
      {'step': 2, 'key': 'train.steps', 'old': 2, 'new': 3, 'explicit': False}]
  assert json.loads(_read(os.path.join(wd, 'config.json')))['optim']['lr'] == 0.05
  assert json.loads(_read(os.path.join(wd, 'run.json')))['config']['optim']['lr'] == 0.003


def test_data_edited_in_place_is_refused_on_resume(data_dir, tmp_path):
  """Defect: a data file edited in place without changing its document count resumed
  silently (only the document count was checked)."""
  text = _docs(tmp_path)
  over = {'data.source': f'text:{text}', 'data.max_docs': 0, 'ckpt.every': 1}
  wd = str(tmp_path / 'run')
  trainer.train(_cfg(**over, **{'train.steps': 2}), wd)
  text.write_text(_read(text).replace('words', 'wordz'))  # same size, same documents
  with pytest.raises(ckpt_lib.CheckpointError, match=r'docs\.txt: content changed'):
    trainer.train(_cfg(**over, **{'train.steps': 3}), wd)
  assert ckpt_lib.complete_steps(os.path.join(wd, 'checkpoints'))[-1] == 2
  run = json.loads(_read(os.path.join(wd, 'run.json')))
  assert run['data']['files'][0]['path'] == str(text) and run['code']
  trainer.train(_cfg(**over, **{'train.steps': 3}), wd, allow_changes=['data.fingerprint'])
  assert [h['key'] for h in _history(wd)] == ['train.steps', 'data.fingerprint']


def test_the_evaluator_follows_the_runs_record(data_dir, tmp_path):
  """Defect: `--mode=evaluator --config=configs/byte_lm.py:tiny` on a finished 2-step run
  waited for the preset's train.steps; a mistyped workdir was created and waited on."""
  wd = str(tmp_path / 'run')
  trainer.train(_cfg(**{'train.steps': 2, 'ckpt.every': 1}), wd)
  p = run_launch(data_dir, SPEC, f'--workdir={wd}', '--mode=evaluator', '--poll_seconds=0.1',
                 '--max_idle_seconds=60', check=False)
  assert p.returncode == 0 and 'evaluator] done' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
  rows = [json.loads(l) for l in _read(os.path.join(wd, 'evaluator.jsonl')).splitlines()]
  assert [r['step'] for r in rows] == [1, 2]
  typo = tmp_path / 'typo'
  p = run_launch(data_dir, SPEC, f'--workdir={typo}', '--mode=evaluator',
                 '--max_idle_seconds=1', check=False)
  assert p.returncode == 1 and f'workdir {typo} does not exist' in p.stderr, p.stderr[-2000:]
  assert not os.path.exists(typo)
