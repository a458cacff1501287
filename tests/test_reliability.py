"""Reliability under real mistakes (in-process, tiny): a save that does not happen is an error,
a run records and re-reads its tokenizer, one training per workdir, range checks, nothing
written before a resume is known to fit, a failed extra keeps the run's record, non-finite
updates, TFDS catalog datasets offline, and what bad inputs tell the user."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from conftest import ROOT, run_launch
from data import corpus
from train import checkpoint as ckpt_lib
from train import config_lib, families, optim, storage, trainer

SMALL = {'data.max_docs': 400, 'train.batch_size': 8, 'data.seq_len': 64,
         'train.eval_batches': 2, 'sample.max_new_tokens': 8, 'train.log_every': 10,
         'ckpt.async_save': False}


def _cfg(spec='configs/byte_lm.py:tiny', **over):
  cfg, _ = config_lib.load(spec)
  config_lib.override(cfg, {**SMALL, **over})
  return cfg


@pytest.mark.parametrize('key,value', [
    ('data.seq_len', 0), ('train.batch_size', 0), ('train.steps', -5), ('ckpt.keep', 0),
    ('ckpt.every', 0), ('sample.max_new_tokens', -3), ('optim.lr', float('inf')),
    ('model.num_kv_heads', 3), ('train.grad_accum', 3), ('sample.top_p', 0.0),
    ('data.max_words', 0)])
def test_out_of_range_config_values_are_named(key, value):
  spec = 'configs/hat.py:tiny' if key == 'data.max_words' else 'configs/byte_lm.py:tiny'
  cfg, _ = config_lib.load(spec)
  config_lib.override(cfg, {key: value})
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    config_lib.validate(cfg)


def test_a_save_that_does_not_happen_is_an_error(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=2, async_save=False)
  state = {'w': np.ones(3, np.float32)}
  ck.save(5, state, {}, {})
  with pytest.raises(ckpt_lib.CheckpointError, match='step 5 was not written'):
    ck.save(5, state, {}, {})
  ck.close()
  with pytest.raises(ValueError, match='ckpt.keep=0'):
    ckpt_lib.Checkpointer(str(tmp_path / 'other'), keep=0)


def test_one_training_per_workdir_and_failed_extras_keep_the_record(data_dir, tmp_path,
                                                                     monkeypatch):
  wd = str(tmp_path / 'run')
  os.makedirs(wd)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); '
       'from train import storage; storage.WorkdirLock(sys.argv[2]).acquire(); '
       'print("locked", flush=True); time.sleep(600)', ROOT, wd],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  cfg = _cfg(**{'train.steps': 2})
  with pytest.raises(storage.WorkdirError, match=r'already being trained by pid \d+'):
    trainer.train(cfg, wd)
  assert not os.path.exists(os.path.join(wd, 'config.json'))  # the refused run wrote nothing
  holder.kill()  # a killed holder leaves no stale lock
  holder.wait()

  def broken_sample(self, model, cfg_sample):
    raise RuntimeError('sampler broke')

  monkeypatch.setattr(families.get(cfg).__class__, 'sample', broken_sample)
  summary = trainer.train(cfg, wd)
  assert summary['step'] == 2 and 'sampler broke' in summary['sample_error']
  on_disk = json.load(open(os.path.join(wd, 'train_summary.json')))
  assert on_disk['step'] == 2 and 'sampler broke' in on_disk['sample_error']


def test_a_bpe_run_records_its_tokenizer(data_dir, tmp_path):
  """Eval must use the tokenizer the run trained with, even after the data changed; a
  recorded file that was changed or removed is refused by name."""
  text = tmp_path / 'docs.txt'
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'theta', 'kappa']
  rng = np.random.default_rng(0)
  text.write_text('\n\n'.join(' '.join(rng.choice(words, 40)) for _ in range(60)))
  over = {'data.source': f'text:{text}', 'data.vocab_size': 300, 'train.steps': 2,
          'data.max_docs': 0}
  cfg = _cfg('configs/subword_lm.py:tiny', **over)
  wd = str(tmp_path / 'run')
  trainer.train(cfg, wd)
  recorded = open(os.path.join(wd, 'artifacts', 'tokenizer.json')).read()
  manifest = json.load(open(os.path.join(wd, 'artifacts', 'manifest.json')))
  assert set(manifest['files']) == {'tokenizer.json'}
  # other data now: a BPE trained on it would differ; the run keeps its own
  text.write_text('\n\n'.join(' '.join(rng.choice(['omega', 'sigma', 'lambda'], 40))
                              for _ in range(60)))
  cfg = _cfg('configs/subword_lm.py:tiny', **over)
  fresh = families.get(cfg)
  assert fresh.encoder.tokenizer.to_str() != recorded
  setup, _, _ = trainer.restore(cfg, wd)
  assert setup.family.encoder.tokenizer.to_str() == recorded
  assert np.isfinite(trainer.evaluate(cfg, wd)['bpb'])
  path = os.path.join(wd, 'artifacts', 'tokenizer.json')
  with open(path, 'a') as f:
    f.write(' ')
  with pytest.raises(ValueError, match='differs from what the run recorded'):
    trainer.restore(cfg, wd)
  os.remove(path)
  with pytest.raises(ValueError, match='tokenizer.json is missing'):
    trainer.restore(cfg, wd)


def test_a_nonfinite_update_is_never_applied(data_dir, monkeypatch):
  """Finite loss and gradients, but an update that overflows: skipped and counted."""
  make = optim.make_optimizer

  def overflowing(cfg_optim, total_steps):
    tx, schedule = make(cfg_optim, total_steps)
    return optax.chain(tx, optax.scale(np.float32(3e38)), optax.scale(np.float32(3e38))), schedule

  monkeypatch.setattr(optim, 'make_optimizer', overflowing)
  cfg = _cfg(**{'train.nan_policy': 'skip'})
  setup = trainer.Setup(cfg)
  state = setup.init_state()
  before = jax.device_get(state['params'])
  batch = next(iter(setup.family.eval_batches(0, 1, 1)))
  from train import partitioning  # pylint: disable=import-outside-toplevel
  state, m = setup.make_train_step()(state, partitioning.global_batch(batch, setup.mesh))
  m = jax.device_get(m)
  assert np.isfinite(m['loss_mean']) and np.isfinite(m['grad_norm'])
  assert not np.isfinite(m['update_norm']) and not m['finite']
  assert int(state['nonfinite']) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']), before)


def test_a_flop_budget_resolves_into_the_record_not_the_given_config(data_dir, tmp_path):
  """`train.flops_budget` / `train.eval_count` become `train.steps` / `train.eval_every` in
  `Setup.cfg` (a copy: the caller's config is unchanged); the run's config.json records them."""
  cfg = _cfg()
  per_step = trainer.resolve_steps(cfg, families.get(cfg))[1]
  config_lib.override(cfg, {'train.flops_budget': 2.5 * per_step, 'train.eval_count': 2})
  given = (cfg.train.steps, cfg.train.eval_every)
  wd = str(tmp_path / 'budget')
  assert trainer.train(cfg, wd)['step'] == 2
  assert (cfg.train.steps, cfg.train.eval_every) == given
  saved = json.load(open(os.path.join(wd, 'config.json')))['train']
  assert saved['steps'] == 2 and saved['eval_every'] == 1 and saved['flops_budget'] > 0
  assert config_lib.load_saved(wd).train.steps == 2


def test_catalog_datasets_offline_and_failed_preparations_leave_nothing(data_dir, tmp_path):
  cfg = _cfg(**{'data.source': 'tfds:lm1b', 'data.data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(ValueError, match='tfds:lm1b: the TFDS dataset is not prepared.*needs '
                                       'TensorFlow'):
    corpus.get_source(cfg.data, 'train')
  assert not os.path.exists(tmp_path / 'tfds' / 'lm1b')
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n\n \t\n')
  cfg = _cfg(**{'data.source': f'text:{empty}', 'data.data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(ValueError, match='empty.txt'):
    corpus.get_source(cfg.data, 'train')
  left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'tfds' / 'local_text')
          for f in fs]
  assert not left, left


def test_user_mistakes_end_in_one_message(data_dir, tmp_path):
  """Through launch.py: exit 1 (2 for a config value), `error: ...` naming the input, no
  traceback; --debug shows it."""
  short = ['--config=configs/byte_lm.py:tiny', '--config.train.steps=2',
           *[f'--config.{k}={v}' for k, v in SMALL.items()]]
  as_file = tmp_path / 'a_file'
  as_file.write_text('x')
  jsonl = tmp_path / 'nokey.jsonl'
  jsonl.write_text('{"body": "text"}\n{"body": "more"}\n')
  blank = tmp_path / 'blank.txt'
  blank.write_text('   \n\n')
  cases = [
      ([f'--workdir={as_file}'], 1, f'workdir {as_file} is a file'),
      ([f'--workdir={tmp_path / "w1"}', f'--config.data.source=text:{jsonl}'], 1, 'nokey.jsonl'),
      ([f'--workdir={tmp_path / "w2"}', f'--config.data.source=text:{blank}'], 1, 'blank.txt'),
      ([f'--workdir={tmp_path / "w3"}', '--config.ckpt.every=0'], 2, 'ckpt.every=0'),
      ([f'--workdir={tmp_path / "w4"}', '--config.model.num_kv_heads=3'], 2,
       'model.num_heads=4 is not a multiple of model.num_kv_heads=3'),
      ([f'--workdir={tmp_path / "nope"}', '--mode=sample'], 1, 'nope does not exist'),
      ([f'--workdir={tmp_path / "w5"}', f'--config.data.source=text:{tmp_path}'], 1,
       'is a directory: list its files'),
      ([f'--workdir={tmp_path / "w6"}', '--mode=launch', '--nodes=0'], 2, '--nodes=0: must be'),
      ([f'--workdir={tmp_path / "w7"}', '--config.evals.robustness.type=robustnes'], 2,
       "evals.robustness: unknown evaluator type 'robustnes'; types: "),
  ]
  for args, code, words in cases:
    p = run_launch(data_dir, *short, *args, check=False)
    assert p.returncode == code and words in p.stderr, (args, p.returncode, p.stderr[-1500:])
    assert 'Traceback' not in p.stderr, (args, p.stderr[-3000:])
  assert not os.path.exists(tmp_path / 'w7')  # refused before the workdir is touched
  p = run_launch(data_dir, *short, f'--workdir={as_file}', '--debug', check=False)
  assert p.returncode == 1 and 'Traceback' in p.stderr


def test_data_that_changed_before_a_resume_is_named(data_dir, tmp_path):
  text = tmp_path / 'docs.txt'
  text.write_text('\n\n'.join(f'document {i}: ' + 'words and more words. ' * 30
                              for i in range(40)))
  cfg = _cfg(**{'data.source': f'text:{text}', 'train.steps': 3, 'ckpt.every': 2,
                'data.max_docs': 0})
  wd = str(tmp_path / 'run')
  trainer.train(cfg, wd)
  time.sleep(0.01)
  # documents go to validation by a hash of their key (path:index, and the path varies with
  # pytest's temp dir): a single appended document hashed into validation on one clone, which
  # left the training split's num_docs as it was (the run's data fingerprint named the change
  # instead). With 4, the training split grows unless all 4 hash into validation.
  with open(text, 'a') as f:
    f.write(''.join(f'\n\nextra document {i} at the end of the file.' for i in range(4)))
  cfg = _cfg(**{'data.source': f'text:{text}', 'train.steps': 6, 'ckpt.every': 2,
                'data.max_docs': 0})
  with pytest.raises(ckpt_lib.CheckpointError, match='training data changed since this run was '
                                                     'checkpointed.*num_docs'):
    trainer.train(cfg, wd)


def test_a_crash_right_after_a_checkpoint_keeps_its_metrics_line(tmp_path, monkeypatch):
  """Step s's metrics line is written before checkpoint s counts as durable: a run that dies
  right after saving s (SIGKILL on a pod, here an exception) resumes at s + 1 with line s kept."""
  wd = str(tmp_path / 'run')
  cfg = _cfg(**{'train.steps': 6, 'ckpt.every': 4, 'train.eval_batches': 1,
                'eval.robustness': '', 'eval.next_word': False})
  from train import partitioning  # pylint: disable=import-outside-toplevel
  real = partitioning.global_batch
  calls = []

  def die_after_checkpoint_4(*args, **kwargs):  # the 5th batch: checkpoint 4 is saved
    calls.append(1)
    if len(calls) == 5:
      raise SystemExit('killed after checkpoint 4')
    return real(*args, **kwargs)

  monkeypatch.setattr(partitioning, 'global_batch', die_after_checkpoint_4)
  with pytest.raises(SystemExit):
    trainer.train(cfg, wd)
  monkeypatch.setattr(partitioning, 'global_batch', real)
  trainer.train(cfg, wd)
  steps = [json.loads(l)['step'] for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert steps == list(range(1, 7)), steps
