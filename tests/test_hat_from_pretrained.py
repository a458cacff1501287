"""A HAT built on a pretrained LM (configs/hat.py:from_smollm2 on a tiny HF-format Llama written
here): the preset builds with the pretrained stack as backbone, stage 1 leaves every backbone
parameter bitwise unchanged, a resume across the stage switch is exact, the byte-level view
sums to 1, and bad inputs (a model that is not Llama-family: an encoder, an HF directory or a
GGUF file of another architecture; a width that does not fit the projections; a resume on
another pretrained model) end in one message.

One 6-step run is trained in-process and resumed once; one launch.py subprocess; the device
suite's item at these shapes (--dry)."""
import json
import os
import shutil

import gguf
import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import device_suite
from conftest import run_launch
from models import hat_pretrained, pretrained, transformer
from train import config_lib, families, optim, trainer

WIDTH = 32
OVERRIDES = {
    **device_suite.HAT_PRETRAINED_DRY, 'train.eval_every': 0, 'train.eval_batches': 1,
    'train.log_every': 1, 'ckpt.every': 2, 'ckpt.keep': 10, 'ckpt.async_save': False,
    'sample.max_new_tokens': 0, 'eval.robustness': ''}


def _write_lm(directory: str, seed: int) -> str:
  return device_suite._tiny_llama(directory, seed, WIDTH)  # pylint: disable=protected-access


def _cfg(lm: str, **over):
  cfg, _ = config_lib.load('configs/hat.py:from_smollm2')
  config_lib.override(cfg, {**OVERRIDES, 'pretrained.path': lm, **over})
  return cfg


def _curve(wd):
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """The tiny pretrained model, and a 6-step run on it (stage 1: steps 1-3) with a checkpoint
  every 2 steps."""
  del data_dir
  root = tmp_path_factory.mktemp('hat_pretrained')
  lm = _write_lm(str(root / 'lm'), 0)
  wd = str(root / 'run')
  summary = trainer.train(_cfg(lm), wd)
  return {'root': root, 'lm': lm, 'wd': wd, 'summary': summary}


def test_preset_builds_with_the_pretrained_stack(run):
  cfg = _cfg(run['lm'])
  setup = trainer.Setup(cfg)
  m, p = setup.cfg.model, pretrained.load(run['lm'])
  assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (2, 4, 2, 8, 64)
  assert (m.rope_base, m.norm_eps) == (5e4, 1e-5)  # read from the file into the config
  assert setup.cfg.pretrained.sha256 == hat_pretrained.content_hash(run['lm'])
  params = setup.init_state()['params']
  want = transformer.convert_layer_layout(  # the preset scans the layers
      nnx.to_pure_dict(nnx.state(p.model.transformer, nnx.Param)), scanned=True)
  assert jax.tree.structure(params['backbone']) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(_bits(params['backbone']), _bits(want)))
  assert setup.frozen['aux_table'].shape == (257, WIDTH)  # the auxiliary loss's targets
  # the recorded pretrained model: path and content hash, in the run's artifacts and config
  rec = json.load(open(os.path.join(run['wd'], 'artifacts', 'pretrained.json')))
  assert rec['sha256'] == setup.cfg.pretrained.sha256 and rec['path'] == p.meta['source']
  saved = json.load(open(os.path.join(run['wd'], 'run.json')))['config']
  assert saved['pretrained']['sha256'] == rec['sha256']
  assert saved['optim']['stages']['freeze_steps'] == 3
  # the stage factor: 0 in stage 1, then lr_ratio (ramped over warmup_steps)
  s = setup.cfg.optim.stages
  assert [float(optim.stage_factor(s, i)) for i in (0, 2, 3, 4)] == pytest.approx(
      [0, 0, s.lr_ratio, s.lr_ratio])


def test_stage1_freezes_the_backbone_bitwise_and_resume_is_exact(run):
  cfg, wd = _cfg(run['lm']), run['wd']
  want = transformer.convert_layer_layout(nnx.to_pure_dict(nnx.state(
      pretrained.load(run['lm']).model.transformer, nnx.Param)), scanned=True)
  _, s2, _ = trainer.restore(cfg, wd, step=2)   # stage 1
  _, s4, _ = trainer.restore(cfg, wd, step=4)   # stage 2 began at step 3
  assert all(np.array_equal(a, b) for a, b in zip(_bits(s2['params']['backbone']), _bits(want)))
  assert not all(np.array_equal(a, b) for a, b in zip(_bits(s4['params']['backbone']),
                                                       _bits(want)))
  assert not np.array_equal(np.asarray(s2['params']['pool_out']['kernel']),
                            np.asarray(s4['params']['pool_out']['kernel']))
  # "killed" after the checkpoint of step 2 (stage 1), resumed across the stage switch
  killed = str(run['root'] / 'killed')
  shutil.copytree(wd, killed)
  for step in os.listdir(os.path.join(killed, 'checkpoints')):
    if step.isdigit() and int(step) > 2:
      shutil.rmtree(os.path.join(killed, 'checkpoints', step))
  trainer.train(cfg, killed)
  a, b = _curve(wd), _curve(killed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
  _, end_a, _ = trainer.restore(cfg, wd)
  _, end_b, _ = trainer.restore(cfg, killed)
  assert all(np.array_equal(x, y) for x, y in zip(_bits(end_a['params']), _bits(end_b['params'])))


def test_byte_view_sums_to_one(run):
  setup, state, _ = trainer.restore(_cfg(run['lm']), run['wd'])
  view = setup.family.byte_view(setup.model(state['params']))
  st = view.start(b'def f(x):\n    return')
  for byte in b' x + 1':
    lp = np.asarray(view.next_byte_logprobs(st), np.float64)
    assert abs(np.exp(lp).sum() - 1) < 1e-4
    st = view.advance(st, byte)


def test_bad_inputs(run, data_dir):
  # not a Llama-family LM: a sentence encoder; an HF directory of another architecture
  with pytest.raises(ValueError, match='pretrained.path=minilm: a BertEncoder sentence encoder'):
    families.get(_cfg('minilm'))
  other = str(run['root'] / 'gpt2')
  shutil.copytree(run['lm'], other)
  hf = json.load(open(os.path.join(other, 'config.json')))
  json.dump({**hf, 'model_type': 'gpt2'}, open(os.path.join(other, 'config.json'), 'w'))
  with pytest.raises(ValueError, match='pretrained.path=.*gpt2: not a Llama-family LM'):
    families.get(_cfg(other))
  # a GGUF file of another architecture
  gguf_path = str(run['root'] / 'gpt2.gguf')
  writer = gguf.GGUFWriter(gguf_path, 'gpt2')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"gpt2.gguf: not a Llama-family LM .*architecture 'gpt2'"):
    families.get(_cfg(gguf_path))
  # a backbone width that does not fit the projections
  with pytest.raises(ValueError, match='model.d_model=48: the projections .* is 32 wide'):
    families.get(_cfg(run['lm'], **{'model.d_model': 48}))
  # resuming on another pretrained model (same shape, other weights): one message, exit 1
  lm2 = _write_lm(str(run['root'] / 'lm2'), 1)
  p = run_launch(data_dir, '--config=configs/hat.py:from_smollm2', f'--workdir={run["wd"]}',
                 *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
                 f'--config.pretrained.path={lm2}', '--config.train.steps=8', check=False)
  assert p.returncode == 1, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and 'a different pretrained model' in p.stderr
  assert p.stderr.count('error:') == 1, p.stderr[-2000:]


def test_device_suite_item_dry(data_dir, tmp_path):
  """benchmarks/device_suite.py's hat_pretrained item at the tests' shapes (--dry)."""
  del data_dir
  suite = device_suite.Suite(device_suite.parse(['--dry', f'--out={tmp_path}']))
  out, md = device_suite.item_hat_pretrained(suite)
  assert [out['stages'][s]['steps'] for s in ('stage1', 'stage2')] == [3, 3]
  assert list(out['bpb']) == ['step0', 'after_stage1', 'after_stage2']
  assert all(np.isfinite(v) and v > 0 for v in out['bpb'].values())
  assert out['convert_s'] > 0 and all(r['bytes_per_s'] > 0 for r in out['stages'].values())
  assert '| stage | steps | step s | bytes/s | MFU |' in md
