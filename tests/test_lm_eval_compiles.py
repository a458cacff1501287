"""How many XLA programs the lm-eval adapter (train/evals/lm_eval.py) builds for one task: the
goal is at most 4 distinct compilations per task, token-level and byte-level alike (the
requests are padded to a few shapes). Counted with `lm_eval.Compiles` (jax's backend-compile
event) on tiny untrained models (a BPE LM scored token-level and through its exact byte view, a
byte LM) over the local multiple-choice task; benchmarks/lm_eval_bench.py counts them for
SmolLM2 (docs/evaluation.md)."""
import collections

import pytest
from flax import nnx

from test_cross_family import TEXT, TINY, _cfg, text_source
from test_lm_eval import INC
from train import trainer
from train.evals import lm_eval as le

# a shape no other test file builds, so that this file's programs are its own to count
OWN = {'model.mlp_dim': 48}
LIMIT = 10  # notoklm_mc items: 40 requests of 4 choices


@pytest.fixture(scope='module')
def models(data_dir, tmp_path_factory):
  d = tmp_path_factory.mktemp('lmeval_compiles')
  source = text_source(d)
  out = {}
  for name, spec, extra in (('bpe', 'configs/subword_lm.py:tiny', {'data.vocab_size': 300}),
                            ('bytes', 'configs/byte_lm.py:tiny', {})):
    cfg = _cfg(spec, TINY, OWN, extra, {'data.source': source})
    setup = trainer.Setup(cfg)
    out[name] = (cfg, setup, setup.family.build_model(nnx.Rngs(0)))
  return out


@pytest.mark.parametrize('name,scoring,forwards', [
    ('bpe', 'tokens', ('jit(_score_rows)',)),
    ('bpe', 'bytes', ('jit(_forward)', 'jit(_forward_tree)')),
    ('bytes', 'bytes', ('jit(_forward)',)),
])
def test_one_task_compiles_at_most_four_programs(models, name, scoring, forwards):
  cfg, setup, model = models[name]
  c = cfg.lm_eval.copy_and_resolve_references()
  c.scoring, c.tasks, c.include_path, c.limit, c.bootstrap_iters = (
      scoring, 'notoklm_mc', INC, float(LIMIT), 0)
  lm = le.make_lm(setup.family, model, c, window=int(cfg.data.seq_len), mesh=setup.mesh)
  specs, _ = le.load_tasks(c)
  with le.Compiles() as first:
    res = le.evaluate(lm, c, specs)
  assert res['notoklm']['requests'] == 4 * LIMIT
  assert res['notoklm']['scoring'].startswith('token' if scoring == 'tokens' else 'byte')
  counts = collections.Counter(first.names)
  assert 1 <= len(first.model) <= 4, counts
  assert set(first.model) <= set(forwards), counts
  assert len(first.names) <= 8, counts  # the forwards and a few small eager programs
  with le.Compiles() as again:  # the same task again: nothing new to build
    le.evaluate(lm, c, specs)
  assert again.model == [], collections.Counter(again.names)
  if scoring == 'tokens':
    assert len(res['notoklm']['compiled_shapes']) == len(first.model)


def test_exact_bpe_forwards_padded_to_the_largest_score_as_one_pair(models):
  """The exact BPE view pads every forward of a call of several to max_tokens and to the rows
  of its first, so a call's forwards share one shape (a tree over max_tokens nodes would get a
  shape of its own; here every tree fits), and each pair scores as it does alone; so it does
  where the pairs are taken 3 at a time (the rows of each are short of a forward and wait for
  the next's). The packed rows' sizes depend on the tokenizer, which its trainer may break
  ties of differently from run to run: the forwards are counted, not assumed."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  _, setup, model = models['bpe']
  view = setup.family.byte_view(model)
  view.max_tokens = 128
  words = TEXT.split()
  pairs = [(' '.join(words[:i]).encode(), (' ' + ' '.join(words[i:i + 1 + i % 3])).encode())
           for i in range(1, 40)]
  shapes = []
  tree = view.fn.tree
  view.fn.tree = lambda cache, pre, own, ids, pos: (shapes.append(ids.shape),
                                                    tree(cache, pre, own, ids, pos))[1]
  with le.Compiles() as c:
    got = view.loglikelihoods(pairs)
  trees = [n for n in c.model if n == 'jit(_forward_tree)']
  assert len(shapes) >= 2 and len(set(shapes)) == 1 and len(trees) <= 1, (
      shapes, collections.Counter(c.names))
  shapes.clear()
  with le.Compiles() as c:  # 3 pairs at a time: rows short of a forward go with the next's
    chunked = view.loglikelihoods(pairs, chunk=3)
  assert c.model == [] and set(shapes) == {shapes[0]}, (shapes, collections.Counter(c.names))
  one = [view.loglikelihoods([p])[0] for p in pairs]
  for x in (got, chunked):
    np.testing.assert_allclose([g[0] for g in x], [o[0] for o in one], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in x] == [o[1] for o in one]
