"""Config files, presets and overrides: unknown keys name the closest valid key."""
import copy
import json

import pytest

from train import config_lib

BYTE = 'configs/byte_lm.py'


@pytest.fixture
def cfg(monkeypatch):
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  return config_lib.load(f'{BYTE}:tiny')[0]


def test_presets_load(monkeypatch):
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  for path in (BYTE, 'configs/subword_lm.py'):
    for preset in ('tiny', 'small', '350m', '1b'):
      c, module = config_lib.load(f'{path}:{preset}')
      assert c.family == 'lm' and c.preset == preset
      assert c.model.d_model % c.model.num_heads == 0
      assert c.model.num_heads % c.model.num_kv_heads == 0
      assert c.model.scan_layers == (preset in ('350m', '1b'))
      assert c.model.ce_chunk == -1   # auto: chunked only where the logits would not fit
      assert c.model.attention_impl == 'auto'
      assert module.get_sweep(c)
  assert config_lib.load(f'{BYTE}:1b')[0].model.num_kv_heads == 4   # GQA


def test_override_types(cfg):
  config_lib.override(cfg, {'optim.lr': '1e-4', 'train.steps': '7', 'model.tie_embeddings':
                            'False', 'data.source': 'text:/x.txt', 'train.batch_size': 8.0})
  assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.model.tie_embeddings is False
  assert cfg.data.source == 'text:/x.txt' and cfg.train.batch_size == 8
  assert isinstance(cfg.train.batch_size, int)


def test_unknown_key_names_closest(cfg):
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.lrr'.*'optim.lr'"):
    config_lib.override(cfg, {'optim.lrr': '1'})
  with pytest.raises(config_lib.ConfigError, match=r"'train.batch_size'"):
    config_lib.override(cfg, {'batch_size': '1'})


def test_wrong_type_is_clear(cfg):
  with pytest.raises(config_lib.ConfigError, match=r'train.steps.*expected int'):
    config_lib.override(cfg, {'train.steps': 'many'})
  with pytest.raises(config_lib.ConfigError, match=r'train.steps.*expected int'):
    config_lib.override(cfg, {'train.steps': '1.5'})
  with pytest.raises(config_lib.ConfigError, match=r'expected bool'):
    config_lib.override(cfg, {'model.tie_embeddings': '1'})


def test_unknown_preset_and_file(monkeypatch):
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  with pytest.raises(config_lib.ConfigError, match=r"unknown preset 'tinny'.*'tiny'"):
    config_lib.load(f'{BYTE}:tinny')
  with pytest.raises(config_lib.ConfigError, match='config file not found'):
    config_lib.load('configs/nope.py:tiny')


def test_argv_and_json_roundtrip(cfg, tmp_path):
  ov, rest = config_lib.parse_argv_overrides(
      ['--config.optim.lr=0.5', '--workdir=x', '--config.train.steps', '3'])
  assert ov == {'optim.lr': '0.5', 'train.steps': '3'} and rest == ['--workdir=x']
  config_lib.override(cfg, ov)
  path = config_lib.save(cfg, str(tmp_path))
  back = config_lib.from_json(path)
  assert back.optim.lr == 0.5 and back.train.steps == 3
  assert json.load(open(path))['model'] == copy.deepcopy(cfg.model).to_dict()


def test_sweep_grid_and_names():
  from train import sweep
  pts = sweep.grid(**{'optim.lr': [1e-3, 3e-3], 'model.num_layers': [2, 4]})
  assert len(pts) == 4 and {'optim.lr': 3e-3, 'model.num_layers': 4} in pts
  assert sweep.run_name({'optim.lr': 0.001, 'data.source': 'text:/a b'}) == \
      'optim.lr=0.001,data.source=text_/a_b'.replace('/', '_')


def test_hat_presets_build_abstractly(monkeypatch):
  """Every HAT preset's model builds (shapes only) and has the size its name says."""
  import jax
  from flax import nnx
  from models import hat
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  sizes = {}
  for preset in ('tiny', 'small', '1b'):
    c, module = config_lib.load(f'configs/hat.py:{preset}')
    assert module.get_sweep(c)
    m = nnx.eval_shape(lambda: hat.HAT(c.model, 384, rngs=nnx.Rngs(0)))
    sizes[preset] = sum(x.size for x in jax.tree.leaves(nnx.state(m)))
  assert sizes['tiny'] < 2e6 and 5e7 < sizes['small'] < 2e8 and 7e8 < sizes['1b'] < 1.5e9, sizes


def test_load_saved_survives_added_keys(cfg, tmp_path):
  """A run saved before a config key existed restores with that key's current default."""
  cfg.optim.lr = 0.123
  path = config_lib.save(cfg, str(tmp_path))
  saved = json.load(open(path))
  del saved['train']['flops_budget']
  saved['train']['removed_key'] = 1
  json.dump(saved, open(path, 'w'))
  back = config_lib.load_saved(str(tmp_path))
  assert back.optim.lr == 0.123 and back.train.flops_budget == 0.0
  assert 'removed_key' not in back.train


def test_load_saved_zett_encoder_run_from_before_the_family_split(monkeypatch, tmp_path):
  """A ZeTT run of an encoder base saved as family 'zett' with `zett.kind='encoder'` (before
  the two kinds became two families) loads as a 'zett_encoder' run; a decoder run stays 'zett'."""
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  for preset, kind, want in (('minilm', 'encoder', 'zett_encoder'),
                             ('smollm2', 'decoder', 'zett')):
    cfg = config_lib.load(f'configs/zett.py:{preset}')[0]
    assert cfg.family == want and 'kind' not in cfg.zett
    wd = str(tmp_path / preset)
    path = config_lib.save(cfg, wd)
    saved = json.load(open(path))
    saved['family'], saved['zett']['kind'] = 'zett', kind
    saved['zett']['vocab_size'] = 123
    json.dump(saved, open(path, 'w'))
    back = config_lib.load_saved(wd)
    assert back.family == want and back.zett.vocab_size == 123 and 'kind' not in back.zett


def test_load_saved_run_from_before_layer_scan(monkeypatch, tmp_path):
  """A 350m run saved before `model.scan_layers` and the attention keys existed restores with
  the layout its checkpoints have (unrolled, although the preset now scans) and 'auto'
  attention (its saved '' meant the same)."""
  monkeypatch.chdir(config_lib.os.path.dirname(config_lib.os.path.dirname(__file__)))
  cfg = config_lib.load(f'{BYTE}:350m')[0]
  assert cfg.model.scan_layers
  path = config_lib.save(cfg, str(tmp_path))
  saved = json.load(open(path))
  for k in ('scan_layers', 'attention_block_q', 'attention_block_kv', 'attention_window_block',
            'attention_max_segments'):
    del saved['model'][k]
  saved['model'].update(attention_impl='', ce_chunk=256)
  json.dump(saved, open(path, 'w'))
  back = config_lib.load_saved(str(tmp_path))
  assert back.model.scan_layers is False and back.model.ce_chunk == 256
  assert back.model.attention_block_q == 512
  from models import layers
  assert layers.AttentionConfig.from_model_config(back.model).impl == 'auto'


def test_evaluators_are_checked_by_name(cfg, monkeypatch):
  """config.evals: an unknown evaluator type, or one for a family it does not apply to, is one
  ConfigError naming the entry, when the evaluators are built (a run's start), not after."""
  import sys
  import types
  from train import evals
  built = evals.Evaluators(cfg, 'lm')
  assert [e.name for e in built] == ['validation', 'robustness', 'held_out', 'next_word',
                                     'family_suite']
  assert [e.name for e in built.due(7, 0)] == [] and [e.name for e in built.due(7, 0, True)] == [
      'validation']
  bad = copy.deepcopy(cfg)
  config_lib.override(bad, {'evals.next_word.type': 'next_wrd'})
  with pytest.raises(config_lib.ConfigError, match=r"evals.next_word: unknown evaluator type "
                     r"'next_wrd'; types: family_suite, held_out, lm_eval, next_word, robustness, "
                     r"validation"):
    evals.Evaluators(bad, 'lm')
  config_lib.override(bad, {'evals.next_word.type': 'report'})  # a helper module, no Evaluator
  with pytest.raises(config_lib.ConfigError, match="unknown evaluator type 'report'"):
    evals.Evaluators(bad, 'lm')
  bad = copy.deepcopy(cfg)
  config_lib.override(bad, {'evals.robustness.every': -2})
  with pytest.raises(config_lib.ConfigError, match=r'evals.robustness.every=-2'):
    evals.Evaluators(bad, 'lm')
  # a new evaluator is one module of train/evals/ (here put in place without a file)
  module = types.ModuleType('train.evals.only_hat')

  class OnlyHat(evals.Evaluator):
    families = ('hat',)

    def run(self, setup, params, workdir, step, earlier):
      return {'x': 1.0}
  module.Evaluator = OnlyHat
  monkeypatch.setitem(sys.modules, 'train.evals.only_hat', module)
  mine = copy.deepcopy(cfg)
  with mine.unlocked():
    mine.evals.mine = {'type': 'only_hat', 'every': 5}
  assert [e.name for e in evals.Evaluators(mine, 'hat').due(10, 0)] == ['mine']
  with pytest.raises(config_lib.ConfigError, match=r"evals.mine: evaluator type 'only_hat' does "
                     r"not apply to family 'lm' \(it applies to hat\)"):
    evals.Evaluators(mine, 'lm')
  assert evals.scalars({'step': 3, 'bpb': 1.5, 'mine': {'x': 1.0, 'name': 'a'},
                        'r': {'caps': {'bpb': 2.0}}}) == {'bpb': 1.5, 'mine/x': 1.0,
                                                          'r/caps/bpb': 2.0}
