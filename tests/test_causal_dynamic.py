"""Causal dynamic tokenization (train/dynamic.py, data/dynamic_bpe.py `DynamicBPE.causal`): merges
learnt only from the scored prefix, a merge-free pass equal to the plain eval, every byte scored
once, KV-cached sampling equal to uncached, bad settings named. One tiny HF-format Llama
(module fixture) serves every model test."""
import argparse
import json

import hypothesis
import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from data import dynamic_bpe, encoders
from models import pretrained, token_lm
from train import config_lib

WORDS = ['the', 'cat', 'sat', 'on', 'mat', 'hat', 'def', 'f(x)', 'return', 'x', '+', '1', '.',
         '\n', 'ab', 'abab', 'tokens', 'merge']
DOCS = [f'Document {i}: the cat sat on the mat and the hat; def merge(tokens): return tokens '
        f'+ {i}. The causal table grows from the text already scored.' for i in range(16)]


@pytest.fixture(scope='module')
def tok():
  return encoders._train_tokenizer(DOCS, 300)  # pylint: disable=protected-access


def _rows(enc, dyn, texts, b=2, t=40):
  """`texts` packed into b rows of t tokens, as the packer does: a segment's first input is its
  document separator (bos), the targets the document's tokens."""
  batch = {k: np.zeros((b, t), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                   'positions', 'target_bytes')}
  batch['inputs'][:] = batch['targets'][:] = enc.pad_id
  batch['weights'] = np.zeros((b, t), np.float32)
  col, sid = [0] * b, [0] * b
  for j, text in enumerate(texts):
    r = j % b
    ids = [enc.bos_id] + [int(x) for x in enc.encode(text)]
    n = min(len(ids) - 1, t - col[r])
    if n <= 0:
      continue
    sid[r] += 1
    sl = slice(col[r], col[r] + n)
    batch['inputs'][r, sl], batch['targets'][r, sl] = ids[:n], ids[1:n + 1]
    batch['segment_ids'][r, sl], batch['positions'][r, sl] = sid[r], np.arange(n)
    batch['weights'][r, sl] = 1.0
    batch['target_bytes'][r, sl] = [len(dyn.base_bytes[x]) for x in ids[1:n + 1]]
    col[r] += n
  return batch


FAST = hypothesis.settings(max_examples=40, deadline=None,
                           suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])


@FAST
@hypothesis.given(texts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30)
                                 .map(' '.join), min_size=1, max_size=4),
                  budget=st.integers(0, 24), min_count=st.integers(1, 3),
                  boundary=st.sampled_from(dynamic_bpe.BOUNDARIES))
def test_causal_merges_never_use_a_pair_first_seen_at_or_after_the_scored_position(
    tok, texts, budget, min_count, boundary):
  enc = encoders.BPEEncoder(tok, 'tiny')
  dyn = dynamic_bpe.DynamicBPE(enc, 7, boundary)
  batch = _rows(enc, dyn, texts)
  got = dyn.causal(batch, budget, min_count)
  dynamic_bpe.check_bytes(batch, got, dyn.base_bytes, dyn.vocab)  # every byte once, in order
  v = dyn.vocab
  for r in range(batch['inputs'].shape[0]):
    parts = got.parts[r]
    assert len(parts) <= budget
    base = [int(x) for x in batch['targets'][r][batch['weights'][r] > 0]]  # the scored stream
    for p, tok_id in got.used_at[r]:
      k = tok_id - v
      # learnt from text strictly before p: the pair ended before the position it is used at,
      # and the whole token (so every merge it needs) already occurred in the scored prefix
      assert got.learnt_at[r][k] <= p
      seq = list(parts[k])
      assert base[p:p + len(seq)] == seq
      assert any(base[q:q + len(seq)] == seq for q in range(p - len(seq) + 1))
    # the vocabulary at each position is what a decoder rebuilds from the tokens before it
    w = got.batch['weights'][r] > 0
    seg = got.batch['segment_ids'][r]
    replay = dynamic_bpe.CausalTable(dyn, budget, min_count)
    for c in np.flatnonzero(w):
      if c == 0 or seg[c] != seg[c - 1]:
        replay.restart()
      y = int(got.batch['targets'][r, c])
      assert got.known[r, c] == len(replay.parts)
      assert y < v + got.known[r, c]  # a target never uses an entry learnt at or after it
      replay.step(replay.parts_of(y) if y < v else parts[y - v])
    assert replay.parts == parts
  if budget == 0:  # merge-free: the rows as they were
    for k, x in batch.items():
      np.testing.assert_array_equal(got.batch[k], x)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, data_dir, tok):
  """A tiny Llama in HF format with the byte-level BPE above, its config for the docs corpus as
  `text:` data (two eval batches of 2 x 64 tokens) and its restored pieces."""
  del data_dir
  from train import trainer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('causal')
  corpus_path = root / 'docs.jsonl'
  corpus_path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in DOCS))
  mcfg = token_lm.default_model_config()
  mcfg.d_model, mcfg.num_layers, mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim = 32, 2, 2, 1, 16
  mcfg.mlp_dim, mcfg.tie_embeddings = 64, True
  model = token_lm.TokenLM(mcfg, tok.get_vocab_size(), rngs=nnx.Rngs(0))
  base = str(root / 'base')
  pretrained.save_hf(model, mcfg, tok, base, bos_id=1, eos_id=2)
  cfg, _ = config_lib.load('configs/pretrained.py:smollm2')
  cfg.unlock()
  config_lib.override(cfg, {'model.source': base, 'data.source': f'text:{corpus_path}',
                            'data.seq_len': 64, 'train.batch_size': 2, 'train.eval_batches': 2,
                            'data.eval_split': 'train', 'dynamic': 'merges:64',
                            'dynamic_embeddings': 'fvt', 'dynamic_boundary': 'words'})
  wd = str(root / 'run')
  setup, state, _ = trainer.restore(cfg, wd)
  lm = setup.model(state['params'])
  batches = setup.family.eval_batches(0, 1, 2)
  plain = setup.evaluate(state['params'], batches)
  return cfg, wd, setup.family.encoder, lm, batches, plain


def _fvt(dynamic, lm, dyn):
  e = np.asarray(lm.embed.embedding[...])
  return dynamic.Embedder('fvt', e, e, {}, dyn.base_bytes)


def test_causal_eval_is_plain_without_merges_and_scores_every_byte_once(tiny, tmp_path):
  from train import dynamic  # pylint: disable=import-outside-toplevel
  cfg, _, enc, lm, batches, plain = tiny
  dyn = dynamic_bpe.DynamicBPE(enc, 7, 'words')
  graphdef, lm_state = nnx.split(lm)
  fn = dynamic._causal_nll_fn(graphdef, lm.dtype)  # pylint: disable=protected-access
  emb = _fvt(dynamic, lm, dyn)
  zero = [dyn.causal(b, 0) for b in batches]
  tot = dynamic.score_causal(fn, lm_state, zero, emb, 8)
  np.testing.assert_allclose(tot[0] / tot[2] / np.log(2), plain['bpb'], rtol=1e-5)
  assert tot[1] == plain['n_tokens'] and tot[2] == plain['n_bytes']
  merged = [dyn.causal(b, 64) for b in batches]
  assert sum(m.tokens_after for m in merged) < sum(m.tokens_before for m in merged)
  pad = dynamic._bucket(max(max(m.merges) for m in merged))  # pylint: disable=protected-access
  tot = dynamic.score_causal(fn, lm_state, merged, emb, pad)
  assert tot[2] == plain['n_bytes'] and tot[1] < plain['n_tokens'] and np.isfinite(tot[0])
  # the whole run: its rows say where the merges came from; bytes are asserted there too
  out = dynamic.run(cfg, str(tmp_path / 'causal'))
  row = out['rows'][1]
  assert row['merges_from'] == 'scored prefix (causal)' and row['merges_per_row'] > 0
  assert row['token_reduction'] > 0 and np.isfinite(row['bpb'])
  meta = json.loads((tmp_path / 'causal' / 'dynamic_meta.json').read_text())
  assert meta['mode'] == 'causal' and meta['min_count'] == 1
  # batch-level rows are labelled as chosen from the scored batch and charged for their list
  cfg = cfg.copy_and_resolve_references()
  cfg.dynamic_mode, cfg.dynamic = 'batch', 'merges:4'
  row = dynamic.run(cfg, str(tmp_path / 'batch'), plain=plain)['rows'][1]
  assert row['merges_from'] == 'the scored batch'
  assert row['bpb_charged'] > row['bpb']
  bits = dynamic_bpe.merge_list_bits(4, dyn.vocab)
  np.testing.assert_allclose(bits, 2 * sum(np.log2(dyn.vocab + k) for k in range(4)))


def test_cached_causal_sampling_equals_uncached(tiny):
  from train import dynamic  # pylint: disable=import-outside-toplevel
  _, _, enc, lm, _, _ = tiny
  dyn = dynamic_bpe.DynamicBPE(enc, 7, 'words')
  prompt = 'the cat sat on the mat and the hat; the cat sat on the'
  ids = [enc.bos_id] + [int(t) for t in enc.encode(prompt)]
  got = {}
  for cached in (True, False):
    got[cached] = dynamic.generate_causal(lm, dyn, _fvt(dynamic, lm, dyn), ids, 24, budget=32,
                                          temperature=1.0, rng=jax.random.key(3),
                                          cached=cached)
  assert got[True]['generated'] == got[False]['generated']
  assert got[True]['parts'] == got[False]['parts'] and got[True]['bytes'] == got[False]['bytes']
  assert len(got[True]['prompt']) < len(ids)  # the prompt itself was merged causally
  learnt = len(dynamic_bpe.DynamicBPE.causal(dyn, _rows(enc, dyn, [prompt], 1, 64), 32).parts[0])
  assert len(got[True]['parts']) > learnt  # ... and the table grew along the generated text
  assert len(got[True]['generated']) == 24


def test_bad_dynamic_settings_are_named(tiny, tmp_path):
  from train import dynamic, modes  # pylint: disable=import-outside-toplevel
  cfg = tiny[0].copy_and_resolve_references()
  for over, msg in (({'dynamic_mode': 'lzw'}, "dynamic_mode='lzw': expected one of"),
                    ({'dynamic': 'compression:0.1'}, "with dynamic_mode='causal' give 'merges:N'"),
                    ({'dynamic_min_count': 0}, 'dynamic_min_count=0: expected an integer')):
    bad = cfg.copy_and_resolve_references()
    config_lib.override(bad, over)
    with pytest.raises(ValueError, match=msg):
      dynamic.check_config(bad)
  bad = cfg.copy_and_resolve_references()
  bad.dynamic_mode = 'lzw'
  wd = tmp_path / 'never'
  with pytest.raises(ValueError, match="dynamic_mode='lzw'"):  # refused before the mode runs
    modes.run(argparse.Namespace(mode='eval', workdir=str(wd), step=None), bad, None, {})
  assert not wd.exists()
