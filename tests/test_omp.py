"""OMP tokenizer transplantation (`transfer.method=omp`, train/transfer.py): the solver's exact
cases, the decoder transfer through launch.py on a tiny base, the MiniLM encoder, bad k."""
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import run_launch
from data import target_tokenizers
from models import pretrained, transformer
from test_zett import tiny_base
from train import config_lib, families, transfer


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, data_dir):
  """A tiny Llama-architecture base in HF format with a byte-level BPE, and a jsonl corpus (the
  shapes of tests/test_zett.py's, so the compilations are shared). The corpus is other text than
  the base tokenizer's, so a tokenizer trained on it has new tokens."""
  del data_dir
  corpus = [f'Sentence {i}: orthogonal matching pursuit writes every new token from shared '
            f'anchors of the tokenizer {i}. Transplanted vocabularies keep the model {i * 3}.'
            for i in range(24)]
  return tiny_base(tmp_path_factory.mktemp('omp'), corpus)


def test_omp_reproduces_shared_tokens_and_k1_is_the_nearest_anchor():
  rng = np.random.default_rng(0)
  aux = rng.normal(size=(40, 16)).astype(np.float32)
  aux[5] *= 7.0  # anchors of any length
  base_e = rng.normal(size=(40, 24)).astype(np.float32)
  # a new token that is itself a shared token: OMP writes it as that token alone, so the same
  # coefficients give its base embedding back exactly
  w = transfer.omp_coefficients(aux, aux, 4)
  np.testing.assert_allclose(w, np.eye(40), atol=1e-12)
  np.testing.assert_allclose(w @ base_e, base_e, rtol=1e-6, atol=1e-6)
  # k=1: the anchor OMP selects first (largest |cosine|, its criterion on unit atoms), scaled by
  # the least-squares coefficient <y, a> / |a|^2, i.e. the nearest anchor's base row
  new = rng.normal(size=(6, 16)).astype(np.float32)
  w1 = transfer.omp_coefficients(aux, new, 1)
  unit = aux / np.linalg.norm(aux, axis=1, keepdims=True)
  nearest = np.abs(new @ unit.T).argmax(1)
  for t, j in enumerate(nearest):
    assert np.flatnonzero(w1[t]).tolist() == [j]
    coef = float(new[t] @ aux[j]) / float(aux[j] @ aux[j])
    np.testing.assert_allclose(w1[t] @ base_e, coef * base_e[j], rtol=1e-5, atol=1e-6)
  # k anchors at most, and more anchors fit the auxiliary vector better
  w8 = transfer.omp_coefficients(aux, new, 8)
  assert ((w8 != 0).sum(1) <= 8).all()
  err = [np.linalg.norm(new - w_ @ aux, axis=1).mean() for w_ in (w1, w8)]
  assert err[1] < err[0]


def test_omp_weights_and_bad_k():
  """Vocabulary level: shared tokens are the anchors; bad k named in one message."""
  base_vocab = {'a': 0, 'b': 1, 'c': 2, 'q': 3}
  target_vocab = {'<s>': 0, 'a': 1, 'b': 2, 'c': 3, 'ab': 4, 'zz': 5}
  aux = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0.5], [0, 0]], np.float32)
  w = transfer.omp_weights(base_vocab, target_vocab, {'<s>'}, aux, 2)
  assert set(w) == {4}  # 'zz' has no auxiliary vector (FVT fallback), '<s>' is special
  ids, coef = w[4]
  np.testing.assert_allclose(coef @ aux[[{0: 1, 1: 2, 2: 3}[j] for j in ids]], aux[4], atol=1e-6)
  for k in (0, -3):
    with pytest.raises(ValueError, match=f'transfer.omp_k={k}: OMP needs'):
      transfer.omp_weights(base_vocab, target_vocab, {'<s>'}, aux, k)
  with pytest.raises(ValueError,
                     match=r'transfer.omp_k=4 is larger than the shared vocabulary: .* share 3'):
    transfer.omp_weights(base_vocab, target_vocab, {'<s>'}, aux, 4)


def test_transfer_command_writes_a_loadable_model(tiny, data_dir, tmp_path):
  """--mode=transfer with fvt and omp (FOCUS's static space) on the tiny base: an HF directory
  that loads; shared rows copied, new ones by OMP (unseen ones by FVT); the same run with OMP
  in a donor's space (the written model itself: it has the target tokenizer); bad k -> exit 1."""
  _, base, overrides = tiny
  wd = str(tmp_path / 'tr')
  args = ['--config=configs/pretrained.py:smollm2', '--mode=transfer',
          *[f'--config.{k}={v}' for k, v in overrides.items()],
          '--config.target_tokenizer=unigram:300', '--config.transfer.text_filter=',
          '--config.transfer.base_eval=False']
  p = run_launch(data_dir, *args, f'--workdir={wd}', '--config.transfer.methods=fvt,omp',
                 '--config.transfer.omp_k=4')
  assert '| omp |' in p.stdout and 'OMP (k=4)' in p.stdout
  rows = {r['model']: r for r in json.load(open(os.path.join(wd, 'transfer.json')))}
  omp, fvt = rows['omp'], rows['fvt']
  assert omp['shared'] == fvt['shared'] and omp['omp'] > 0
  assert omp['omp'] + omp['pieces'] + omp['mean'] == fvt['pieces'] + fvt['mean']
  assert omp['omp_s'] >= 0 and omp['init_s'] >= omp['omp_s'] and np.isfinite(omp['bpb'])
  moved = pretrained.load(os.path.join(wd, 'omp'))
  src = pretrained.load(base)
  e, e0 = np.asarray(moved.model.embed.embedding[...]), np.asarray(src.model.embed.embedding[...])
  vocab, base_vocab = moved.tokenizer.get_vocab(), src.tokenizer.get_vocab()
  shared = [s for s in vocab if s in base_vocab and not s.startswith('<')]
  np.testing.assert_array_equal(e[[vocab[s] for s in shared]], e0[[base_vocab[s] for s in shared]])
  assert e.shape[0] == omp['vocab'] and np.isfinite(e).all()
  # the UnigramLM tokenizer.json written is taken back as a target tokenizer (its special tokens
  # are both model pieces and added tokens of the same ids: one token each, not two)
  written = os.path.join(wd, 'omp', 'tokenizer.json')
  back, _ = target_tokenizers.build(written, None)
  assert back.get_vocab() == vocab
  _check_unigram_duplicates(written, tmp_path)
  _check_hat_on(os.path.join(wd, 'omp'), moved)

  # a donor with the target tokenizer: its embeddings are the auxiliary space
  cfg, _ = config_lib.load('configs/pretrained.py:smollm2')
  cfg.unlock()
  config_lib.override(cfg, {**overrides, 'target_tokenizer': 'unigram:300',
                            'transfer.text_filter': '', 'transfer.methods': 'omp',
                            'transfer.omp_k': 2, 'transfer.omp_donor': os.path.join(wd, 'omp')})
  aux = transfer.auxiliary_space(cfg, moved.tokenizer, ['omp'])
  assert 'static' not in aux
  np.testing.assert_array_equal(aux['omp_aux'], e)
  transfer.solve_omp(aux, src.tokenizer, moved.tokenizer, 2)
  assert len(aux['omp']) == fvt['pieces'] + fvt['mean']  # every new token has a donor vector
  assert all(len(ids) <= 2 for ids, _ in aux['omp'].values())
  # k larger than the shared vocabulary: refused before any evaluation
  cfg.transfer.omp_k = 10_000
  with pytest.raises(ValueError, match='omp_k=10000 is larger than the shared'):
    transfer.run(cfg, str(tmp_path / 'big_k'))
  # k <= 0 through launch.py: one message, exit 1
  p = run_launch(data_dir, *args, f'--workdir={tmp_path / "bad"}',
                 '--config.transfer.methods=omp', '--config.transfer.omp_k=0', check=False)
  assert p.returncode == 1, p.stderr[-2000:]
  assert 'transfer.omp_k=0: OMP needs a whole number of at least 1 anchor' in p.stderr
  assert 'Traceback' not in p.stderr


def _check_hat_on(directory, moved):
  """The HF directory --mode=transfer wrote is a pretrained model configs/hat.py:from_smollm2
  builds a HAT on: its stack as the backbone (architecture read from the file), its UnigramLM
  tokenizer giving the auxiliary loss's word tokens."""
  cfg, _ = config_lib.load('configs/hat.py:from_smollm2')
  config_lib.override(cfg, {'pretrained.path': directory, 'model.d_model': 32,
                            'train.batch_size': 2})
  family = families.get(cfg)
  m = cfg.model
  assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (2, 2, 1, 16, 64)
  want = transformer.convert_layer_layout(
      nnx.to_pure_dict(nnx.state(moved.model.transformer, nnx.Param)), scanned=True)
  got = family.initial_params()['backbone']
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  it = family.train_iterator(0, 1)
  ids = next(it)['word_token_ids']
  it.close()
  assert (ids >= 0).sum() > 0 and ids.max() < moved.tokenizer.get_vocab_size()


def _check_unigram_duplicates(path, tmp_path):
  """A Unigram piece listed twice, an added token on another id than its piece, an added token
  listed twice: each still refused."""
  spec = json.load(open(path))
  assert spec['model']['type'] == 'Unigram' and spec['added_tokens']
  pieces, added = spec['model']['vocab'], spec['added_tokens']
  special = added[0]['content']
  cases = {
      'piece_twice': ({**spec['model'], 'vocab': pieces + [pieces[5]]}, added, pieces[5][0]),
      'other_id': (spec['model'], [*added[1:], {**added[0], 'id': len(pieces) + 1}], special),
      'added_twice': (spec['model'], added + added[:1], special)}
  for name, (model, added_tokens, token) in cases.items():
    bad = tmp_path / f'{name}.json'
    bad.write_text(json.dumps({**spec, 'model': model, 'added_tokens': added_tokens}))
    with pytest.raises(ValueError, match='listed twice: .*' + re.escape(repr(token))):
      target_tokenizers.check_file(str(bad))


def test_encoder_omp(tiny, tmp_path):
  """MiniLM moved to a WordPiece trained on the corpus by OMP in the static space of that text:
  an HF BERT directory that loads and embeds; FOCUS is not an encoder method."""
  _, _, overrides = tiny
  cfg, _ = config_lib.load('configs/pretrained.py:minilm')
  cfg.unlock()
  config_lib.override(cfg, {'data.source': overrides['data.source'], 'transfer.text_filter': '',
                            'target_tokenizer': 'wordpiece:300', 'transfer.methods': 'omp',
                            'transfer.omp_k': 4})
  rows = {r['model']: r for r in transfer.run(cfg, str(tmp_path / 'enc'))['rows']}
  assert set(rows) == {'base', 'omp'}
  r = rows['omp']
  assert r['omp'] > 0 and r['shared'] > 0 and 0 < r['cosine_mean'] <= 1.0 and r['omp_s'] >= 0
  back = pretrained.load(str(tmp_path / 'enc' / 'omp'))
  assert back.meta['kind'] == 'encoder' and back.tokenizer.get_vocab_size() == r['vocab']
  cfg.transfer.methods = 'focus'
  with pytest.raises(ValueError, match="'focus' is no encoder transfer method"):
    transfer.run(cfg, str(tmp_path / 'enc2'))
