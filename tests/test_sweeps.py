"""Command-line sweeps (--sweep, --seeds, --file_sweep, recorded in sweep.json), the summary
across seeds (mean +- std, a winner only beyond the spread), and the learning-rate schedules
(cosine, warmup-stable-decay) with what extending a run does to them."""
import copy
import json
import os

import pytest

from conftest import run_launch
from test_train import CONFIG, SMALL
from train import config_lib, optim, sweep

SPEC = CONFIG.split('=', 1)[1]


def _cfg(**over):
  cfg, _ = config_lib.load(SPEC)
  config_lib.override(cfg, over)
  return cfg


# -- parsing ------------------------------------------------------------------------------------
def test_sweep_spec_is_parsed_to_each_keys_type():
  axes = sweep.parse_spec(_cfg(), 'optim.lr=1e-3,3e-3,1e-2  model.num_layers=2,4')
  assert axes == {'optim.lr': [1e-3, 3e-3, 1e-2], 'model.num_layers': [2, 4]}
  assert all(isinstance(v, int) for v in axes['model.num_layers'])
  pts = sweep.points(None, axes)
  assert len(pts) == 6 and pts[0] == {'optim.lr': 1e-3, 'model.num_layers': 2}
  # the config file's points times the command line's, and a seed axis
  pts = sweep.points([{'optim.lr': 1e-3}, {'name': 'x', 'optim.lr': 3e-3}],
                     {'model.num_layers': [2, 4]}, seeds=2)
  assert len(pts) == 8 and pts[-1]['name'] == 'x,model.num_layers=4,seed=1'
  assert len({sweep.run_name(p) for p in pts}) == 8


@pytest.mark.parametrize('spec,match', [
    ('optim.lrr=1,2', "optim.lrr.*did you mean 'optim.lr'"),
    ('optim.lr=abc', "optim.lr='abc'.*expected float"),
    ('optim.lr=', 'optim.lr.*an empty value'),
    ('model.num_layers=2,,4', 'model.num_layers.*an empty value'),
    ('model.num_layers=0', 'model.num_layers.*>= 1'),
    ('optim.lr', "'optim.lr' is not KEY=V1,V2"),
    ('optim.lr=1 optim.lr=2', 'optim.lr is given twice'),
])
def test_bad_sweep_values_are_refused_by_name(spec, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    sweep.parse_spec(_cfg(), spec)


def test_a_key_swept_twice_is_refused():
  with pytest.raises(config_lib.ConfigError, match='optim.lr is swept by the config file'):
    sweep.points([{'optim.lr': 1e-3}], {'optim.lr': [1e-2]})
  with pytest.raises(config_lib.ConfigError, match='--seeds=2 and --sweep with seed'):
    sweep.points(None, {'seed': [0, 1]}, seeds=2)


def test_sweep_jobs_print_one_command_per_point_and_record_the_spec(tmp_path, capsys):
  import launch  # pylint: disable=import-outside-toplevel
  wd = str(tmp_path / 'sw')
  args = [CONFIG, f'--workdir={wd}', '--mode=sweep', '--sweep_jobs=print',
          "--sweep=model.num_layers=1,2", '--seeds=2']
  assert launch.main(args) == 0
  cmds = [l for l in capsys.readouterr().out.splitlines() if l and not l.startswith('#')]
  assert len(cmds) == 2 * 2 * 2, cmds  # the file's 2 learning rates x 2 depths x 2 seeds
  assert all(c.split(' && ')[1].count('--config.seed=') == 1 for c in cmds)
  assert '--config.model.num_layers=2' in cmds[-1] and '--config.seed=1' in cmds[-1]
  rec = json.load(open(os.path.join(wd, 'sweep.json')))
  assert rec['sweep'] == 'model.num_layers=1,2' and rec['seeds'] == 2
  # --file_sweep=off: only the command line's keys; another spec in the same workdir is refused
  assert launch.main(args + ['--file_sweep=off']) == 2
  assert 'holds a sweep recorded as' in capsys.readouterr().err
  assert launch.main([args[0], f'--workdir={wd}2', *args[2:], '--file_sweep=off']) == 0
  assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith('cd ')]) == 4
  # sweep_summary reads the recorded spec: no --sweep again (nothing ran yet: it says which)
  with pytest.raises(FileNotFoundError, match=r'none of the 8 points.*model.num_layers=1'):
    launch.main([CONFIG, f'--workdir={wd}', '--mode=sweep_summary', '--debug'])
  # a bad value is refused naming the key, before anything is written
  assert launch.main([CONFIG, f'--workdir={tmp_path}/bad', '--mode=sweep', '--sweep_jobs=print',
                      '--sweep=optim.b1=2']) == 2
  assert 'optim.b1' in capsys.readouterr().err and not os.path.exists(tmp_path / 'bad')


# -- seeds --------------------------------------------------------------------------------------
def _rows(vals):
  return [{'run': f'{lr},{s}', 'status': 'done', 'optim.lr': lr, 'seed': s, 'family': 'byte_lm',
           'val_bpb': v} for lr, vs in vals.items() for s, v in enumerate(vs)]


def test_seed_summary_mean_std_and_verdict():
  out = sweep.seed_summary(_rows({1e-3: [3.0, 3.2, 3.1], 3e-3: [2.0, 2.1, 2.2]}))
  a, b = out['rows']
  assert a['seeds'] == 3 and a['val_bpb mean'] == pytest.approx(3.1)
  assert a['val_bpb std'] == pytest.approx(0.1)  # the sample standard deviation
  assert a['val_bpb'] == '3.1000 +- 0.1000' and a['per seed'] == '0:3.0000 1:3.2000 2:3.1000'
  assert b['val_bpb mean'] == pytest.approx(2.1)
  assert out['verdict'].startswith('Winner beyond the spread: optim.lr=0.003')
  overlap = sweep.seed_summary(_rows({1e-3: [3.0, 2.0, 2.5], 3e-3: [2.0, 2.6, 2.2]}))
  assert overlap['verdict'].startswith('No winner') and 'optim.lr=0.001' in overlap['verdict']
  single = sweep.seed_summary(_rows({1e-3: [3.0], 3e-3: [2.0]}))
  assert 'single seed' in single['verdict'] and single['rows'][0]['val_bpb'].endswith('(one seed)')
  assert sweep.seed_summary([{'run': 'a', 'status': 'done', 'family': 'x', 'val_bpb': 1.0}]) is None


def test_plots_are_in_bits_per_byte_and_equal_flops_are_bars(tmp_path):
  """The sweep's plots from fake finished runs: curves against bytes seen and FLOPs, bars at
  equal FLOPs (one per point, its seeds together), the metric against each swept key."""
  from train.evals import report  # pylint: disable=import-outside-toplevel
  rows = []
  for lr, vals in {1e-3: [3.0, 3.2], 1e-2: [2.0, 2.1]}.items():
    for seed, v in enumerate(vals):
      name = f'optim.lr={lr},seed={seed}'
      d = tmp_path / name
      d.mkdir()
      (d / 'metrics.jsonl').write_text(''.join(json.dumps(
          {'step': s, 'loss': 9.0 / s, 'bpb': 8.0 / s, 'n_bytes': 100.0}) + '\n'
                                               for s in range(1, 21)))
      (d / 'eval_metrics.jsonl').write_text(''.join(json.dumps({'step': s, 'bpb': v + 2 / s})
                                                    + '\n' for s in (10, 20)))
      (d / 'train_summary.json').write_text(json.dumps({'flops_per_step': 1e9}))
      rows.append({'run': name, 'status': 'done', 'optim.lr': lr, 'seed': seed, 'family': 'lm',
                   'train_flops': 2e10 * (1 + 0.01 * seed), 'val_bpb': v})
  assert report._bytes_seen(str(tmp_path / rows[0]['run'] / 'metrics.jsonl'))[20] == 2000.0  # pylint: disable=protected-access
  assert report.equal_flops(rows) and not report.equal_flops(
      [{**rows[0], 'train_flops': 1e10}, rows[1]])
  sweep._write_all(rows, str(tmp_path))  # pylint: disable=protected-access
  for f in ('curves_bpb.png', 'bpb_vs_flops.png', 'val_bpb_vs_optim.lr.png', 'seeds_val_bpb.png'):
    assert (tmp_path / f).stat().st_size > 10_000, f
  assert not (tmp_path / 'val_bpb_vs_seed.png').exists()


def test_cli_sweep_with_seeds_end_to_end(data_dir, tmp_path):
  wd = str(tmp_path / 'sw')
  over = ['--config.train.steps=8', '--config.ckpt.every=100', '--config.eval.robustness=',
          '--config.eval.next_word=False', *SMALL]
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sweep', '--sweep=optim.lr=1e-3',
             '--seeds=2', '--file_sweep=off', *over)
  md = open(os.path.join(wd, 'summary.md')).read()
  assert 'optim.lr=0.001,seed=0' in md and 'optim.lr=0.001,seed=1' in md, md
  assert md.count('| done |') == 2 and '## Across seeds' in md and ' +- ' in md, md
  assert os.path.getsize(os.path.join(wd, 'seeds_val_bpb.png')) > 0
  assert '"n_bytes"' in open(os.path.join(wd, 'optim.lr=0.001,seed=0', 'metrics.jsonl')).read()
  assert 'val_bpb mean' in open(os.path.join(wd, 'summary_seeds.csv')).read()
  # gathered again from the runs, with the spec read from sweep.json
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--mode=sweep_summary', *over)
  assert '2 of 2 points done' in p.stdout and 'sweep.json' in p.stdout, p.stdout


# -- schedules ----------------------------------------------------------------------------------
def _optim(schedule, steps, **over):
  cfg = _cfg(**{'optim.schedule': schedule, 'train.steps': steps, 'optim.lr': 1e-3,
                'optim.warmup_steps': 10, 'optim.min_lr_ratio': 0.1, **over})
  return cfg


def test_wsd_schedule_shape():
  cfg = _optim('wsd', 100, **{'optim.decay_frac': 0.2})
  s = optim.make_schedule(cfg.optim, 100)
  lr = lambda i: float(s(i))
  assert lr(0) == 0 and lr(5) == pytest.approx(5e-4)  # warmup
  assert all(lr(i) == pytest.approx(1e-3) for i in (10, 40, 79, 80))  # stable
  assert lr(90) == pytest.approx(5.5e-4) and lr(100) == pytest.approx(1e-4)  # linear decay
  assert optim.wsd_decay_steps(cfg.optim, 100) == 20
  with pytest.raises(config_lib.ConfigError, match='optim.schedule'):
    config_lib.validate(_optim('linear', 100))
  with pytest.raises(config_lib.ConfigError, match='optim.decay_frac'):
    config_lib.validate(_optim('wsd', 100, **{'optim.decay_frac': 0.0}))
  # it trains: the schedule traces inside the optimizer's jitted update
  import jax
  import jax.numpy as jnp
  tx, _ = optim.make_optimizer(cfg.optim, 100)
  params = {'w': jnp.ones((2, 2))}
  upd, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert upd['w'].shape == (2, 2)


def test_extending_wsd_keeps_its_stable_phase_and_cosine_says_it_restretches():
  wsd, longer = _optim('wsd', 100), _optim('wsd', 200)
  a, b = optim.make_schedule(wsd.optim, 100), optim.make_schedule(longer.optim, 200)
  assert all(float(a(i)) == float(b(i)) for i in range(0, 80))  # the stable phase is kept
  note = optim.extension_note(wsd, longer, 50)
  assert note['old'] == note['new'] == 1e-3 and 'stable phase goes on' in note['note']
  decayed = optim.extension_note(wsd, longer, 100)  # a finished WSD run has decayed
  assert decayed['old'] == pytest.approx(1e-4) and decayed['new'] == pytest.approx(1e-3)
  cos = optim.extension_note(_optim('cosine', 300), _optim('cosine', 350), 300)
  assert 'cosine decay is re-stretched from 300 to 350' in cos['note']
  assert cos['new'] > cos['old'] and cos['key'] == 'optim.schedule@step'
  assert optim.extension_note(_optim('cosine', 300), copy.deepcopy(_optim('cosine', 300)),
                              100) is None


def test_extending_a_cosine_run_says_so_and_records_it(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  over = ['--config.ckpt.every=100', '--config.eval.robustness=', '--config.eval.next_word=False',
          *SMALL]
  run_launch(data_dir, CONFIG, f'--workdir={wd}', '--config.train.steps=4', *over)
  p = run_launch(data_dir, CONFIG, f'--workdir={wd}', '--config.train.steps=6', *over)
  assert 'resuming at step 4: the cosine decay is re-stretched from 4 to 6 steps' in p.stdout, \
      p.stdout
  with open(os.path.join(wd, 'config_history.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  note = [r for r in rows if r['key'] == 'optim.schedule@step']
  assert note and note[0]['step'] == 4 and note[0]['new'] > note[0]['old'], rows
  assert any(r['key'] == 'train.steps' and r['new'] == 6 for r in rows), rows
