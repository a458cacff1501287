"""A new user's mistakes, each ending in one message or a marked table rather than a traceback,
a silent success or a half-written workdir: the kernel-held workdir lock, an empty --workdir,
files that are not config files, None on a typed key, a sampling prompt that is not UTF-8,
Ctrl-C during an evaluation, unfinished and repeated runs in a report or an ensemble, failed
sweep points, a workdir that is not the sweep's, a flop budget under one step, a failed export,
a run failing before its first step, an unknown TFDS name, a comma in a data path.

One sweep of two points (one trains 2 tiny steps, one fails on its data) is run once in-process;
the launch.py subprocesses are only those that need a fresh process."""
import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import pytest

from conftest import ROOT, launch_cmd, subprocess_env
from data import corpus
from train import config_lib, cross_family, families, storage, sweep, trainer

SMALL = {'data.max_docs': 400, 'train.batch_size': 8, 'data.seq_len': 64,
         'train.eval_batches': 2, 'sample.max_new_tokens': 8, 'train.log_every': 10,
         'ckpt.async_save': False, 'train.steps': 2, 'eval.robustness': ''}


def _cfg(spec='configs/byte_lm.py:tiny', **over):
  cfg, _ = config_lib.load(spec)
  config_lib.override(cfg, {**SMALL, **over})
  return cfg


@pytest.fixture(scope='module')
def swept(data_dir, tmp_path_factory):
  """A sweep through `--mode=sweep`'s Mode in-process: point 'ok' trains, point 'broken'
  fails on a missing data file. -> (sweep workdir, exit status, stdout)."""
  del data_dir
  from train.modes import sweep as sweep_mode  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('mistakes')
  wd = str(root / 'sweep')
  points = [{'name': 'ok'}, {'name': 'broken', 'data.source': f'text:{root}/missing.txt'}]
  module = types.SimpleNamespace(get_sweep=lambda cfg: points)
  args = argparse.Namespace(sweep_jobs='', config='configs/byte_lm.py:tiny', workdir=wd)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = sweep_mode.Mode().run(args, _cfg(), module, {})
  return wd, code, out.getvalue()


# -- 6: the workdir lock -------------------------------------------------------------------------
def test_deleting_the_lock_file_lets_no_second_trainer_in(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  os.makedirs(wd)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
       'from train import storage; storage.WorkdirLock(sys.argv[2]).acquire(); '
       'print("locked", flush=True); time.sleep(600)', ROOT, wd],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    os.remove(os.path.join(wd, storage.WorkdirLock.NAME))  # the file, not the kernel's lock
    with pytest.raises(storage.WorkdirError,
                       match=rf'already being trained by pid {holder.pid} on .*was deleted'):
      trainer.train(_cfg(), wd)
    assert not os.path.exists(os.path.join(wd, 'config.json'))
  finally:
    holder.kill()
    holder.wait()
  lock = storage.WorkdirLock(wd)  # a killed holder leaves nothing stuck
  lock.acquire()
  lock.release()


# -- 7, 8: one message, not a traceback ----------------------------------------------------------
def test_an_empty_workdir_is_refused(data_dir, tmp_path):
  """Run from an empty directory: before the fix the run's files would land there."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  for workdir in ('', '   '):
    p = subprocess.run(launch_cmd(f'--config={ROOT}/configs/byte_lm.py:tiny',
                                  f'--workdir={workdir}', '--config.train.steps=1',
                                  *[f'--config.{k}={v}' for k, v in SMALL.items()
                                    if k != 'train.steps']),
                       cwd=cwd, env=subprocess_env(data_dir), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and 'is empty: name the run' in p.stderr, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
  assert not os.listdir(cwd)


def test_a_markdown_file_is_not_a_config_file(tmp_path):
  md = tmp_path / 'notes.md'
  md.write_text('# Notes\n\nTrained *two* runs.\n')
  with pytest.raises(config_lib.ConfigError, match='notes.md: not a config file'):
    config_lib.load(str(md))


def test_a_config_file_without_presets_is_named():
  with pytest.raises(config_lib.ConfigError, match=r'get_config\(\) takes no preset'):
    config_lib.load('configs/base.py')


def test_none_on_a_typed_key_is_refused():
  for key, want in (('train.steps', 'int'), ('optim.lr', 'float'),
                    ('sample.temperature', 'float')):
    cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
    with pytest.raises(config_lib.ConfigError, match=rf'{key}=.None.: expected {want}, not None'):
      config_lib.override(cfg, {key: 'None'})


def test_a_prompt_that_is_not_utf8_is_named_before_restoring(tmp_path):
  cfg = _cfg('configs/subword_lm.py:tiny', **{'data.vocab_size': 300,
                                              'sample.prompt': 'caf\udcc3'})  # $'caf\xc3'
  with pytest.raises(ValueError, match=r"b'caf\\xc3': byte 3 \(0xc3\) is not valid UTF-8"):
    trainer.sample(cfg, str(tmp_path / 'not_even_a_run'))


def test_the_lcm_prompt_is_checked_before_embedding(data_dir, tmp_path, monkeypatch):
  from train.families import lcm  # pylint: disable=import-outside-toplevel

  def no_embedding(self):
    raise AssertionError('the sentence space was embedded before the prompt was checked')

  monkeypatch.setattr(lcm.LCMFamily, 'train_space', no_embedding)
  cfg, _ = config_lib.load('configs/lcm.py:tiny')
  config_lib.override(cfg, {'sample.prompt': '   '})
  with pytest.raises(ValueError, match='has no sentence'):
    trainer.train(cfg, str(tmp_path / 'lcm'))
  with pytest.raises(ValueError, match='has no sentence'):
    trainer.sample(cfg, str(tmp_path / 'lcm'))
  assert not os.path.exists(tmp_path / 'lcm')


def test_ctrl_c_during_eval_says_nothing_was_written(swept, monkeypatch, capsys):
  import launch  # pylint: disable=import-outside-toplevel
  wd = os.path.join(swept[0], 'ok')

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(trainer, 'run_evaluators', interrupted)
  try:
    code = launch.main(['--config=configs/byte_lm.py:tiny', f'--workdir={wd}', '--mode=eval',
                        *[f'--config.{k}={v}' for k, v in SMALL.items()]])
  except KeyboardInterrupt:  # not handled: it would end the test session
    pytest.fail('Ctrl-C during --mode=eval escaped launch.main as a traceback')
  err = capsys.readouterr().err
  assert code == 130 and 'interrupted (SIGINT)' in err and 'nothing was written' in err, err
  assert 'eval_step2.json' in err and not os.path.exists(os.path.join(wd, 'eval_step2.json'))


def test_report_keeps_an_lcm_runs_recorded_columns(tmp_path):
  """What an LCM run records (n_tokens, no n_bytes: it models no bytes) makes a row."""
  wd = tmp_path / 'lcm'
  wd.mkdir()
  (wd / 'config.json').write_text(json.dumps(
      {'family': 'lcm', 'train': {'batch_size': 4, 'steps': 3}, 'data': {'seq_len': 8}}))
  (wd / 'train_summary.json').write_text(json.dumps(
      {'step': 3, 'params': 1000, 'eval': {'loss': 0.5, 'n_tokens': 24.0}}))
  rec = cross_family._recorded(str(wd))  # pylint: disable=protected-access
  assert rec['steps'] == 3 and rec['tokens_seen'] == 96 and 'bytes_seen' not in rec


# -- 9: silent or misleading ---------------------------------------------------------------------
def test_a_failed_sweep_point_exits_nonzero(swept):
  wd, code, out = swept
  assert code == 1 and out.strip().splitlines()[-1].startswith(
      '1 of 2 sweep points failed: broken'), out


def test_failed_and_unfinished_runs_are_marked_in_the_report(swept, data_dir, caplog):
  wd = swept[0]
  cfg, _ = config_lib.load('configs/cross_family.py')
  # an unfinished copy of the finished point
  shutil.copytree(os.path.join(wd, 'ok'), os.path.join(wd, 'partial'))
  os.remove(os.path.join(wd, 'partial', 'train_summary.json'))
  config_lib.override(cfg, {'report.runs': wd, 'report.byte_eval': False,
                            'report.gen_bytes': 2})
  with caplog.at_level(logging.WARNING):
    rows = {r['run']: r for r in cross_family.report(cfg, os.path.join(wd, '..', 'report'))}
  assert rows['ok']['status'] == 'finished' and rows['ok']['steps'] == 2
  assert rows['broken']['status'].startswith('failed: FileNotFoundError'), rows['broken']
  assert rows['partial']['status'].startswith('unfinished (latest checkpoint: step 2 of 2; no '
                                              'train_summary.json')
  assert 'sweep point broken has no run' in caplog.text
  md = open(os.path.join(wd, '..', 'report', 'report.md')).read()
  assert 'broken' in md and 'unfinished' in md
  assert cross_family.unfinished(os.path.join(wd, 'partial')).startswith('unfinished')
  assert cross_family.unfinished(os.path.join(wd, 'ok')) == ''


def test_the_same_run_twice_is_no_ensemble(swept):
  wd = swept[0]
  cfg, _ = config_lib.load('configs/cross_family.py')
  ok = os.path.join(wd, 'ok')
  config_lib.override(cfg, {'ensemble.members': f'{ok},{ok}/'})
  with pytest.raises(ValueError, match='names .*ok twice'):
    cross_family.ensemble(cfg, os.path.join(wd, '..', 'ens'))


def test_sweep_summary_refuses_a_workdir_that_is_not_the_sweep(swept, tmp_path):
  cfg, module = config_lib.load('configs/byte_lm.py:tiny')
  points = module.get_sweep(cfg)
  run = os.path.join(swept[0], 'ok')
  with pytest.raises(FileNotFoundError, match='is a run .* not a sweep'):
    sweep.gather(cfg, points, run)
  empty = tmp_path / 'elsewhere'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='holds none of the 2 points of this sweep'):
    sweep.gather(cfg, points, str(empty))
  assert not os.listdir(empty) and not os.path.exists(os.path.join(run, 'summary.md'))


def test_an_invalid_sweep_point_is_named(tmp_path):
  cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
  bad = [{'optim.lr': 1e-3}, {'name': 'too_few', 'train.steps': -1}]
  with pytest.raises(config_lib.ConfigError, match='sweep point too_few: train.steps=-1'):
    sweep.run(cfg, bad, str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never')


def test_a_flop_budget_under_one_step_warns(data_dir, tmp_path, caplog):
  cfg = _cfg()
  per_step = trainer.resolve_steps(cfg, families.get(cfg))[1]
  config_lib.override(cfg, {'train.flops_budget': per_step / 10})
  with caplog.at_level(logging.WARNING):
    assert trainer.train(cfg, str(tmp_path / 'run'))['step'] == 1
  assert f'train.flops_budget={per_step / 10:.3g} is less than the FLOPs of one step' in caplog.text


def test_a_run_failing_before_its_first_step_leaves_nothing(data_dir, tmp_path, monkeypatch):
  # a run failing before its first step, in a workdir it created: nothing left
  wd = str(tmp_path / 'new_run')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    trainer.train(_cfg(**{'data.source': f'text:{tmp_path}/missing.txt'}), wd)
  assert not os.path.exists(wd)
  # ... but a workdir that existed is left as it was
  os.makedirs(wd)
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    trainer.train(_cfg(**{'data.source': f'text:{tmp_path}/missing.txt'}), wd)
  assert os.path.isdir(wd)
  # a run that stopped after some steps, before its first checkpoint, keeps its record
  import fault_injection  # pylint: disable=import-outside-toplevel
  for k, v in fault_injection.environment('3').items():
    monkeypatch.setenv(k, v)
  stopped = str(tmp_path / 'stopped')
  with pytest.raises(FloatingPointError, match='step 3'):
    trainer.train(_cfg(**{'train.steps': 6, 'ckpt.every': 100}), stopped)
  assert os.path.getsize(os.path.join(stopped, 'metrics.jsonl'))


def test_a_failed_export_leaves_no_directory(swept):
  run = os.path.join(swept[0], 'ok')
  with pytest.raises(ValueError, match='--mode=export needs a token LM'):
    trainer.export_hf(_cfg(), run)
  assert not os.path.exists(os.path.join(run, 'export'))


def test_an_unknown_tfds_name_names_the_closest(data_dir, tmp_path):
  cfg = _cfg(**{'data.source': 'tfds:lm1bb', 'data.data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(ValueError, match=r"no TFDS dataset 'lm1bb'; did you mean 'lm1b'\?") as e:
    corpus.get_source(cfg.data, 'train')
  assert len(str(e.value)) < 300  # not the whole catalogue


def test_a_comma_in_a_data_path_is_explained(data_dir, tmp_path):
  (tmp_path / 'a,b.txt').write_text('one\n\ntwo\n\nthree\n')
  cfg = _cfg(**{'data.source': f'text:{tmp_path}/a,b.txt'})
  with pytest.raises(FileNotFoundError, match='splits on commas, so it named 2 files'):
    corpus.get_source(cfg.data, 'train')


def test_an_unfinished_ensemble_member_is_named(swept, tmp_path, monkeypatch, caplog):
  ok = os.path.join(swept[0], 'ok')
  partial = str(tmp_path / 'partial')
  shutil.copytree(ok, partial)
  os.remove(os.path.join(partial, 'train_summary.json'))

  def stop(cfg):
    raise RuntimeError('stopped before scoring')

  monkeypatch.setattr(cross_family, '_texts', stop)  # the warning comes before any scoring
  cfg, _ = config_lib.load('configs/cross_family.py')
  config_lib.override(cfg, {'ensemble.members': f'{ok},{partial}'})
  with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match='before scoring'):
    cross_family.ensemble(cfg, str(tmp_path / 'ens'))
  assert f'{partial} is unfinished (latest checkpoint: step 2 of 2' in caplog.text
  assert ok not in caplog.text.replace(partial, '')


def test_dynamic_tokenization_outside_its_modes_is_refused(tmp_path):
  """config.dynamic in a mode that does not read it (training a pretrained LM: a run tokenized
  as usual, exit 0) is refused by the dispatcher, before the mode runs."""
  from train import modes  # pylint: disable=import-outside-toplevel
  from train.modes import _dynamic  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/pretrained.py:smollm2')
  config_lib.override(cfg, {'dynamic': 'merges:8'})
  wd = tmp_path / 'dyn'
  for mode in ('train', 'lm_eval', 'export'):
    with pytest.raises(ValueError, match=f"config.dynamic='merges:8' is read by --mode=eval, "
                                         f".*--mode={mode} would ignore it"):
      modes.run(argparse.Namespace(mode=mode, workdir=str(wd)), cfg, None, {})
  assert not wd.exists()
  for mode in _dynamic.MODES:
    _dynamic.check_mode(mode, cfg)


def test_submit_without_its_tool_says_so(tmp_path, monkeypatch, capsys):
  """--submit where sbatch / gcloud is not installed: what is missing and where the job is,
  not 'No such file or directory: sbatch'."""
  from train import launching  # pylint: disable=import-outside-toplevel
  from train.modes import _jobs  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('PATH', str(tmp_path))  # neither sbatch nor gcloud
  out = tmp_path / 'launch'
  with pytest.raises(FileNotFoundError, match='--submit runs sbatch, which is not on PATH here'
                                              ".*submit it with sbatch .*train.sbatch"):
    _jobs.write_script(argparse.Namespace(submit=True), str(out), 'train.sbatch', '#!/bin/bash\n')
  assert (out / 'train.sbatch').exists()
  with pytest.raises(FileNotFoundError, match='--submit runs gcloud, which is not on PATH'):
    launching._run(['gcloud', 'compute', 'tpus', 'list'])  # pylint: disable=protected-access


def test_an_unreachable_bucket_is_named_by_later_modes(monkeypatch):
  """--mode=eval (any mode reading a run), report.runs and ensemble.members on a bucket that
  cannot be reached: the key, the URL and the credentials, not the transport's bare error."""
  from train import record  # pylint: disable=import-outside-toplevel

  class Offline:
    def exists(self, path):
      raise OSError('Cannot connect to host storage.googleapis.com:443')

  monkeypatch.setattr(storage, '_fs', lambda p: (Offline(), p.split('://', 1)[1]))
  cfg, _ = config_lib.load('configs/cross_family.py')
  with pytest.raises(storage.WorkdirError, match=r"workdir gs://lab/run: cannot reach the "
                                                 r"bucket 'lab'.*Credentials: gcloud auth"):
    record.later_config('gs://lab/run', cfg, {}, 'eval')
  config_lib.override(cfg, {'report.runs': 'gs://lab/run', 'report.byte_eval': False,
                            'ensemble.members': 'gs://lab/a,gs://lab/b'})
  with pytest.raises(storage.WorkdirError, match=r"report.runs: gs://lab/run: cannot reach"):
    cross_family.report(cfg, '/nonexistent/never/created')
  with pytest.raises(storage.WorkdirError, match=r"ensemble.members: gs://lab/a: cannot reach"):
    cross_family.ensemble(cfg, '/nonexistent/never/created')


def test_a_sweep_value_given_twice_is_refused():
  """'optim.lr=1e-3,0.001' trained one point and listed it twice in the summary."""
  for spec in ('optim.lr=1e-3,1e-3', 'optim.lr=1e-3,0.001,3e-3'):
    with pytest.raises(config_lib.ConfigError, match=r"--sweep: optim.lr='(1e-3|0.001)': the "
                                                     r"value 0.001 is given twice"):
      sweep.parse_spec(_cfg(), spec)
  assert sweep.parse_spec(_cfg(), 'optim.lr=1e-3,3e-3') == {'optim.lr': [1e-3, 3e-3]}


def test_a_report_ensemble_or_sweep_into_a_runs_workdir_is_refused(tmp_path):
  """--workdir naming a finished run for --mode=report / ensemble / sweep mixed the report's
  files (or the sweep's points) into that run's directory, exit 0."""
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{"family": "lm"}')
  for mode in ('report', 'ensemble', 'sweep'):
    with pytest.raises(storage.WorkdirError, match=f'--workdir={run} holds a training run '
                                                   rf'\(config.json\); --mode={mode} writes'):
      storage.check_not_a_run(str(run), mode)
  storage.check_not_a_run(str(tmp_path / 'report'), 'report')  # new or not a run: fine
  cfg, _ = config_lib.load('configs/cross_family.py')
  config_lib.override(cfg, {'report.runs': str(run), 'report.byte_eval': False})
  with pytest.raises(storage.WorkdirError, match='--mode=report writes its own files'):
    cross_family.report(cfg, str(run))
  assert sorted(os.listdir(run)) == ['config.json']
