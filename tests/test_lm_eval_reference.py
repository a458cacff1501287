"""SmolLM2 through this project's lm-eval adapter (train/evals/lm_eval.py) against lm-eval's own
`hf` backend running transformers' SmolLM2 in the reference environment (.venv-ref), on the
local tasks of tests/data/lm_eval/. Its own file: a unit of the suite's schedule of its own."""
import glob
import json
import os
import subprocess

import numpy as np
import pytest

from train.evals import lm_eval as le

INC = os.path.join(os.path.dirname(__file__), 'data', 'lm_eval')

REF_PYTHON = os.environ.get('NOTOKLM_REF_PYTHON') or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.venv-ref', 'bin', 'python')
REF_LM_EVAL = glob.glob(os.path.join(os.path.dirname(os.path.dirname(REF_PYTHON)), 'lib',
                                     'python3*', 'site-packages', 'lm_eval', '__init__.py'))


@pytest.mark.xla_optimized  # running SmolLM2 outweighs compiling here
@pytest.mark.skipif(not REF_LM_EVAL, reason=f'no lm-eval in the reference environment of '
                    f'{REF_PYTHON} (bash setup.sh makes it where python3.11 and the torch 2.13.0 '
                    'CPU wheel exist)')
def test_agrees_with_lm_eval_hf_backend(tmp_path):
  """SmolLM2 through this adapter (token-level, lm-eval's HF conventions, no begin token as
  its `hf` backend) against lm-eval's own `hf` backend running transformers' SmolLM2 (the same
  dequantized weights, exported to an HF directory) in .venv-ref: the same acc / acc_norm on
  55 multiple-choice items, the same word / byte perplexity and bits per byte on the rolling
  task, and every request's log-likelihood within 1e-3."""
  from models import pretrained  # pylint: disable=import-outside-toplevel
  from train import config_lib  # pylint: disable=import-outside-toplevel
  from train.modes import lm_eval as mode  # pylint: disable=import-outside-toplevel
  tasks = 'notoklm_mc,notoklm_rolling'
  cfg, _ = config_lib.load('configs/pretrained.py')
  config_lib.override(cfg, {'lm_eval.model': 'pretrained:smollm2', 'lm_eval.tasks': tasks,
                            'lm_eval.include_path': INC, 'lm_eval.limit': 55.0,
                            'lm_eval.add_bos': False, 'lm_eval.max_length': 2048,
                            'lm_eval.bootstrap_iters': 0})
  got = mode.load(cfg, '', None)
  smol = got.family.loaded
  d = str(tmp_path / 'smollm2_hf')
  pretrained.save_hf(got.model, smol.cfg_model, smol.tokenizer, d, smol.meta['bos_id'],
                     smol.meta['eos_id'])
  lm = le.make_lm(got.family, got.model, cfg.lm_eval, window=got.window, mesh=got.mesh)
  # the hf backend's prefix token (an empty context, rolling windows) is the tokenizer's begin
  # token: the document separator, as this adapter's (its end token without add_bos)
  sep = smol.tokenizer.id_to_token(int(lm.prefix_token_id))
  with open(os.path.join(d, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': sep,
               'eos_token': sep, 'model_max_length': 2048}, f)
  out = str(tmp_path / 'ref.json')
  ref_proc = subprocess.Popen(  # the reference runs while this adapter scores
      [REF_PYTHON, os.path.join(os.path.dirname(__file__), 'reference', 'lm_eval_hf.py'), d, INC,
       tasks, '55', out], cwd=INC, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # every request's log-likelihood as lm-eval's evaluation asked for it (no second pass)
  seen = {}
  for name in ('loglikelihood', 'loglikelihood_rolling'):
    def record(requests, *a, _f=getattr(lm, name), _name=name, **k):
      got = _f(requests, *a, **k)
      seen.update({(_name, r.args): g for r, g in zip(requests, got)})
      return got
    setattr(lm, name, record)
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  tm = TaskManager(include_path=INC, include_defaults=False)  # the local tasks only: fast
  specs, _ = le.load_tasks(cfg.lm_eval, tm)
  res = le.evaluate(lm, cfg.lm_eval, specs, tm)
  try:
    _, err = ref_proc.communicate(timeout=1200)
  finally:
    ref_proc.kill()
  assert ref_proc.returncode == 0, err[-3000:]
  ref = json.load(open(out))
  assert lm.token_path and len(ref['requests']['notoklm_mc']) == 4 * 55
  for task, metrics in (('notoklm_mc', ('acc', 'acc_norm')),
                        ('notoklm_rolling', ('word_perplexity', 'byte_perplexity',
                                             'bits_per_byte'))):
    for m in metrics:
      assert res['results'][task][f'{m},none'] == pytest.approx(
          ref['results'][task][f'{m},none'], rel=1e-4), (task, m)
  mc = ref['requests']['notoklm_mc']
  ours = [seen[('loglikelihood', (c, k))] for c, k, _ in mc]
  np.testing.assert_allclose([o[0] for o in ours], [r[-1] for r in mc], atol=1e-3, rtol=0)
  roll = ref['requests']['notoklm_rolling']
  ours = [seen[('loglikelihood_rolling', (t,))] for t, _ in roll]
  np.testing.assert_allclose(ours, [r[-1] for r in roll], atol=1e-3, rtol=0)
