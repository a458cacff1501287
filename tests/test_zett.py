"""Tokenizer sampling and hypernetwork training / transfer (configs/zett.py) on a tiny base LM."""
import copy
import json
import os
import re

import chex
import numpy as np
import pytest
from flax import nnx

from data import encoders, target_tokenizers, tokenizer_sampler
from models import hypernet, pretrained, token_lm
from train import config_lib

TEXTS = ['The hypernetwork predicts embeddings for tokens of any new tokenizer. ' * 3,
         'def transfer(model, tokenizer):\n    return model.with_vocab(tokenizer)\n' * 3,
         'Sampled vocabularies change every step; all bytes are always kept.']


def test_sampled_unigram_tokenizers():
  rng = np.random.default_rng(0)
  tok = tokenizer_sampler.sample_unigram(TEXTS, 400, rng, specials=('<eos>',))
  vocab = tok.get_vocab(with_added_tokens=True)
  assert len(vocab) == 400 and vocab['<eos>'] == 0
  assert set(tokenizer_sampler.byte_alphabet()) <= set(vocab)  # every byte symbol is in
  for text in TEXTS + ['ünïcödé ✓ and bytes never seen \x07']:
    assert tok.decode(tok.encode(text).ids) == text
  assert len(tok.encode(TEXTS[0]).ids) < len(TEXTS[0].encode()) / 2  # multi-byte tokens
  # the same draw gives the same tokenizer; another draw (log-normal noise) a different one
  same = tokenizer_sampler.sample_unigram(TEXTS, 400, np.random.default_rng(0),
                                          specials=('<eos>',))
  assert same.get_vocab(with_added_tokens=True) == vocab
  other = tokenizer_sampler.sample_unigram(TEXTS, 400, np.random.default_rng(1),
                                           specials=('<eos>',))
  assert other.get_vocab(with_added_tokens=True) != vocab
  with pytest.raises(ValueError, match='no room for the 256 byte symbols'):
    tokenizer_sampler.sample_unigram(TEXTS, 200, rng)


DOCS = [f'Document {i}: the tokenizer transfer hypernetwork reads pieces of token {i}. '
        f'Then the base model scores text {i * 7}.' for i in range(24)]


def tiny_base(root, corpus=DOCS):
  """A tiny Llama-architecture base in HF format (root/base) with a byte-level BPE trained on
  DOCS, and `corpus` as a jsonl file: (root, base, config overrides that train on it)."""
  corpus_path = root / 'docs.jsonl'
  corpus_path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in corpus))
  tok = encoders._train_tokenizer(DOCS, 420)  # pylint: disable=protected-access
  cfg = token_lm.default_model_config()
  cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 32, 2, 2, 1, 16
  cfg.mlp_dim, cfg.tie_embeddings = 64, True
  model = token_lm.TokenLM(cfg, tok.get_vocab_size(), rngs=nnx.Rngs(0))
  base = str(root / 'base')
  pretrained.save_hf(model, cfg, tok, base, bos_id=1, eos_id=2)
  overrides = {'model.source': base, 'data.source': f'text:{corpus_path}',
               'data.seq_len': 32, 'train.batch_size': 2, 'train.eval_batches': 1}
  return root, base, overrides


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, data_dir):
  """A tiny Llama-architecture base in HF format with a byte-level BPE, and a jsonl corpus."""
  del data_dir
  return tiny_base(tmp_path_factory.mktemp('zett'))


def _zett_cfg(overrides, **more):
  cfg, _ = config_lib.load('configs/zett.py:smollm2')
  cfg.unlock()
  config_lib.override(cfg, {**overrides, 'hypernet.d_model': 32, 'hypernet.num_layers': 1,
                            'hypernet.num_heads': 2, 'hypernet.mlp_dim': 64,
                            'zett.vocab_size': 300, 'zett.warmup_steps': 2,
                            'zett.warmup_tokens': 64, 'zett.sampler_docs': 2,
                            'train.steps': 5, 'ckpt.every': 5, 'train.log_every': 1,
                            'data.prefetch': 1, **more})
  return cfg


def test_zett_trains_only_the_hypernetwork_and_resumes(tiny):
  from train import trainer  # pylint: disable=import-outside-toplevel
  root, _, overrides = tiny
  cfg = _zett_cfg(overrides)
  wd = str(root / 'zett')
  summary = trainer.train(cfg, wd)
  assert summary['step'] == 5 and np.isfinite(summary['train']['loss'])
  assert np.isfinite(summary['eval']['bpb']) and summary['eval']['n_bytes'] > 0
  setup, state, _ = trainer.restore(cfg, wd)
  assert set(state['params']) == {'hypernet'}  # the base LM is frozen state, not trained
  assert 'base' not in state['params']['hypernet']  # nor the hypernetwork's base table
  fam = setup.family
  # an untouched base: the frozen weights are the file's
  base = pretrained.load(overrides['model.source'])
  np.testing.assert_array_equal(np.asarray(setup.frozen['lm']['embed']['embedding']),
                                np.asarray(base.model.embed.embedding[...]))
  # the iterator resumes on the exact next batch (sampled tokenizer included)
  it = fam.train_iterator(0, 1)
  for _ in range(3):  # past the warm-up: batches carry a sampled vocabulary
    next(it)
  st = it.get_state()
  want = [next(it) for _ in range(2)]
  it.close()
  again = fam.train_iterator(0, 1)
  again.set_state(st)
  for w in want:
    chex.assert_trees_all_equal(w, next(again))
  again.close()
  assert want[0]['phase'][0] == 0 and (want[0]['vocab_pieces'][:, 0] >= 0).sum() > 250
  # the zett presets pack the vocabulary's pieces (no work on padding; test_hypernet checks the
  # packed math equals the padded one): every token of the sampled vocabulary has its slots
  assert want[0]['packed_ids'].shape == (hypernet.packed_rows(300, 2.5), hypernet.PACK_ROW)
  assert set(np.unique(want[0]['packed_tok'])) - {-1} == set(range(300))
  assert (want[0]['packed_count'] == (want[0]['vocab_pieces'] >= 0).sum(1)).all()  # none cut
  # target bytes are the UTF-8 bytes of the scored tokens
  sep = int(np.flatnonzero(want[0]['vocab_keep'])[0])
  assert want[0]['vocab_shared'][sep] == fam.sep_id


def test_transfer_with_the_hypernetwork(tiny, data_dir, tmp_path):
  """--mode=transfer with methods lexical, fvt, hypernet; the hypernetwork (FVT-anchored, barely
  trained) lands near FVT; the transferred model restores as a model source."""
  from train import runs, transfer, trainer  # pylint: disable=import-outside-toplevel
  root, base, overrides = tiny
  zwd = str(root / 'zett')
  if not os.path.exists(os.path.join(zwd, 'config.json')):
    trainer.train(_zett_cfg(overrides), zwd)
  cfg, _ = config_lib.load('configs/pretrained.py:smollm2')
  cfg.unlock()
  config_lib.override(cfg, {**overrides, 'target_tokenizer': 'unigram:300',
                            'transfer.text_filter': '',
                            'transfer.methods': 'lexical,fvt,focus,hypernet',
                            'transfer.hypernet_workdir': zwd})
  out = transfer.run(cfg, str(tmp_path / 'tr'))
  rows = {r['model']: r for r in out['rows']}
  assert set(rows) == {'base', 'lexical', 'fvt', 'focus', 'hypernet'}
  # FOCUS: a new token seen in the target text is a sparse combination of shared tokens (see
  # test_sparsemax_and_focus_rows), an unseen one gets FVT: every new token is one of the two
  assert rows['focus']['shared'] == rows['fvt']['shared']
  assert rows['focus']['focus'] + rows['focus']['pieces'] == rows['fvt']['pieces']
  assert np.isfinite(rows['focus']['bpb'])
  assert rows['hypernet']['predicted'] > 250 and rows['hypernet']['vocab'] == rows['fvt']['vocab']
  assert abs(rows['hypernet']['bpb'] - rows['fvt']['bpb']) < 0.5 * rows['fvt']['bpb']
  tok = pretrained.load(str(tmp_path / 'tr' / 'hypernet')).tokenizer
  assert json.loads(tok.to_str())['model']['type'] == 'Unigram'
  # bad hypernetwork sources are named
  other = str(tmp_path / 'other')
  config_lib.save(cfg, other)  # a pretrained-family run
  with pytest.raises(ValueError, match='not a zett'):
    runs.load_predictor(other, base)
  with pytest.raises(ValueError, match='was trained for model.source'):
    runs.load_predictor(zwd, 'smollm2')
  cfg.transfer.hypernet_workdir = ''
  with pytest.raises(ValueError, match='set transfer.hypernet_workdir'):
    transfer.run(cfg, str(tmp_path / 'tr2'))
  del data_dir



def test_sparsemax_and_focus_rows():
  from train import transfer  # pylint: disable=import-outside-toplevel
  z = np.array([[0.9, 0.85, 0.1, -0.3], [0.2, 0.2, 0.2, 0.2], [3.0, 0.0, 0.0, 0.0]])
  p = transfer.sparsemax(z)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(p[0], [0.525, 0.475, 0, 0], atol=1e-6)  # sparse
  np.testing.assert_allclose(p[1], 0.25, atol=1e-6)
  np.testing.assert_allclose(p[2], [1, 0, 0, 0])
  # a new token whose static vector points at one shared token takes (mostly) its embedding
  base_e = np.eye(3, dtype=np.float32)
  static = np.array([[1, 0], [0, 1], [0.99, 0.01], [0, 0]], np.float32)
  rows = transfer._focus_rows(  # pylint: disable=protected-access
      base_e, {'a': 0, 'b': 1}, {'a': 0, 'b': 1, 'ab': 2, 'zz': 3}, set(), static)
  assert set(rows) == {2}  # 'zz' has no static vector (FVT fallback)
  assert rows[2][0] > 0.5 and abs(rows[2].sum() - 1) < 1e-5


def test_wordpiece_split():
  from models import hypernet  # pylint: disable=import-outside-toplevel
  vocab = {'token': 0, '##izer': 1, '##s': 2, 'to': 3, '##ken': 4, '##i': 5, '##zer': 6}
  assert hypernet.wordpiece_split('tokenizers', vocab) == [0, 1, 2]
  assert hypernet.wordpiece_split('##kens', vocab) == [4, 2]  # a continuation stays one
  assert hypernet.wordpiece_split('tokenq', vocab) == []  # 'q' has no piece


def test_encoder_transfer_reports_cosines(tiny, tmp_path):
  """MiniLM moved to a WordPiece trained on the corpus: both baselines written as HF BERT
  directories that load and embed; FVT keeps the sentence embeddings closer than lexical."""
  from train import transfer  # pylint: disable=import-outside-toplevel
  _, _, overrides = tiny
  cfg, _ = config_lib.load('configs/pretrained.py:minilm')
  cfg.unlock()
  config_lib.override(cfg, {'data.source': overrides['data.source'], 'transfer.text_filter': '',
                            'target_tokenizer': 'wordpiece:300'})
  rows = {r['model']: r for r in transfer.run(cfg, str(tmp_path / 'enc'))['rows']}
  assert set(rows) == {'base', 'lexical', 'fvt'}
  assert rows['fvt']['pieces'] > 0 and rows['fvt']['vocab'] <= 300
  assert 0 < rows['lexical']['cosine_mean'] < rows['fvt']['cosine_mean'] <= 1.0
  back = pretrained.load(str(tmp_path / 'enc' / 'fvt'))
  assert back.meta['kind'] == 'encoder' and back.tokenizer.get_vocab_size() == rows['fvt']['vocab']
  cfg.target_tokenizer = 'bpe:300'
  with pytest.raises(ValueError, match='wordpiece:N or a tokenizer.json'):
    transfer.run(cfg, str(tmp_path / 'enc2'))


def test_bad_target_tokenizer_files(tmp_path):
  """Empty tokens, a token listed twice, two tokens on one id: each refused by name."""
  tok = encoders._train_tokenizer(TEXTS, 300)  # pylint: disable=protected-access
  good = tmp_path / 'good.json'
  tok.save(str(good))
  target_tokenizers.check_file(str(good))
  text = good.read_text()
  spec = json.loads(text)
  vocab = spec['model']['vocab']
  a, b = sorted(vocab, key=vocab.get)[10:12]
  cases = {
      'empty': ('{"": 9999, ' + json.dumps(vocab)[1:], 'an empty token'),
      'twice': (json.dumps(vocab)[:-1] + f', {json.dumps(a)}: 9999}}', 'listed twice'),
      'one_id': (json.dumps({**vocab, b: vocab[a]}), 'ids shared by several tokens'),
  }
  for name, (vocab_text, message) in cases.items():
    bad = tmp_path / f'{name}.json'
    whole = json.dumps({**spec, 'model': {**spec['model'], 'vocab': '@@'}})
    bad.write_text(whole.replace('"@@"', vocab_text))
    with pytest.raises(ValueError, match=message):
      target_tokenizers.check_file(str(bad))
  with pytest.raises(FileNotFoundError, match='nope.json'):
    target_tokenizers.check_file(str(tmp_path / 'nope.json'))


def test_dynamic_tokenization(tiny, tmp_path, capsys):
  """Batch-level merges (dynamic_mode=batch) with hypernetwork and FVT embeddings: a merge-free
  pass equals the plain eval, merged rows spell every scored byte once, bad settings are
  named."""
  from data import dynamic_bpe  # pylint: disable=import-outside-toplevel
  from train import dynamic, runs, trainer  # pylint: disable=import-outside-toplevel
  root, _, overrides = tiny
  zwd = str(root / 'zett')
  if not os.path.exists(os.path.join(zwd, 'config.json')):
    trainer.train(_zett_cfg(overrides), zwd)
  cfg, _ = config_lib.load('configs/pretrained.py:smollm2')
  cfg.unlock()
  config_lib.override(cfg, {**overrides, 'train.eval_batches': 2, 'dynamic': 'merges:2,1000',
                            'dynamic_boundary': 'words', 'transfer.hypernet_workdir': zwd,
                            'dynamic_mode': 'batch'})  # (causal: tests/test_causal_dynamic.py)
  out = dynamic.run(cfg, str(tmp_path / 'dyn'))
  rows = {(r['setting'], r['embeddings']): r for r in out['rows']}
  plain = rows[('none (plain eval)', '-')]
  for method in ('hypernet', 'fvt'):
    r = rows[('merges:2', method)]
    assert r['merges_per_batch'] == 2 and r['token_reduction'] > 0
    assert r['tokens_per_byte'] < plain['tokens_per_byte'] and np.isfinite(r['bpb'])
    # a budget larger than the text allows: merged until no pair is left, counted
    big = rows[('merges:1000', method)]
    # (how many pairs the validation text holds depends on which documents the split's hash
    # of their path puts there, i.e. on the test's tmp path: at least the smaller budget's)
    assert big['batches_out_of_pairs'] >= 1
    assert r['merges_per_batch'] <= big['merges_per_batch'] < 1000
    assert big['token_reduction'] >= r['token_reduction']  # equal when only 2 pairs exist
  assert 'no pair was left to merge' in capsys.readouterr().out
  assert out['cache']['fvt']['cache_hits'] > 0  # rows reused across batches and settings

  # merge-free through the dynamic path = the plain eval; merged rows keep every byte once
  setup, state, _ = trainer.restore(cfg, str(tmp_path / 'dyn'))
  model = setup.model(state['params'])
  batches = setup.family.eval_batches(0, 1, 2)
  dyn = dynamic_bpe.DynamicBPE(setup.family.encoder, 7, 'words')
  graphdef, lm_state = nnx.split(model)
  fn = dynamic._nll_fn(graphdef, model.dtype)  # pylint: disable=protected-access
  e = np.asarray(model.embed.embedding[...])
  emb = dynamic.Embedder('fvt', e, e, {}, dyn.base_bytes)
  zero = [dyn.merge(b, 'merges', 0) for b in batches]
  for b, z in zip(batches, zero):
    chex.assert_trees_all_equal(b, z.batch)
  tot = dynamic.score(fn, lm_state, zero, emb, 8)
  np.testing.assert_allclose(tot[0] / tot[2] / np.log(2), plain['bpb'], rtol=1e-5)
  merged = dyn.merge(batches[0], 'compression', 0.1)
  assert merged.tokens_after <= 0.9 * merged.tokens_before + 1 and merged.parts
  # the hypernetwork's rows are its own predictions (not FVT's), cached by string
  hyper = dynamic.Embedder('hypernet', e, e, {}, dyn.base_bytes,
                           runs.load_predictor(zwd, overrides['model.source']))
  h_in, _ = hyper.rows(merged.parts, 8)
  f_in, _ = emb.rows(merged.parts, 8)
  n = len(merged.parts)
  assert np.abs(h_in[:n] - f_in[:n]).max() > 0 and hyper.stats['cache_hits'] == 0
  hyper.rows(merged.parts, 8)
  assert hyper.stats['cache_hits'] == n
  dynamic_bpe.check_bytes(batches[0], merged, dyn.base_bytes, dyn.vocab)
  bad = dynamic_bpe.Merged({k: v.copy() for k, v in merged.batch.items()}, merged.parts,
                           merged.merges, 0, 0, False)
  col = int(np.flatnonzero(bad.batch['target_bytes'][0])[-1])
  bad.batch['weights'][0, col] = 0  # a dropped token: its bytes are no longer scored
  with pytest.raises(AssertionError, match='row 0'):
    dynamic_bpe.check_bytes(batches[0], bad, dyn.base_bytes, dyn.vocab)

  # bad input
  for spec, msg in (('merges:0', 'merges nothing'), ('compression:1.5', 'not a fraction'),
                    ('tokens:5', "expected 'merges:N"), ('merges:x', 'not a number')):
    with pytest.raises(ValueError, match=msg):
      dynamic_bpe.parse_spec(spec)
  cfg.transfer.hypernet_workdir = ''
  cfg.dynamic = 'merges:2'
  fallback = dynamic.run(cfg, str(tmp_path / 'dyn2'))
  assert 'no hypernetwork' in capsys.readouterr().out
  assert {r['embeddings'] for r in fallback['rows']} == {'-', 'fvt'}
  zcfg = _zett_cfg(overrides, dynamic='merges:2')
  from train import modes  # pylint: disable=import-outside-toplevel
  for mode in ('eval', 'sample'):  # a zett run is refused by the mode, with the way to use it
    with pytest.raises(ValueError, match=f'--mode={mode} accepts family pretrained, not family '
                                         "'zett'.*hypernet_workdir"):
      modes.check_family(modes.get(mode), zcfg)
  # --mode=transfer with dynamic: each transferred model also under dynamic tokenization, the
  # new tokens' rows from the base model's hypernetwork
  from train import transfer  # pylint: disable=import-outside-toplevel
  cfg.transfer.hypernet_workdir = zwd
  cfg.dynamic, cfg.dynamic_embeddings = 'merges:2', 'hypernet,fvt'
  config_lib.override(cfg, {'target_tokenizer': 'unigram:300', 'transfer.text_filter': '',
                            'transfer.methods': 'fvt', 'transfer.base_eval': False})
  tr = transfer.run(cfg, str(tmp_path / 'tr_dyn'))
  row, = tr['rows']
  assert row['model'] == 'fvt' and 'dynamic merges:2 hypernet: bpb / tokens per byte' in row
  assert (tmp_path / 'tr_dyn' / 'fvt' / 'dynamic.md').exists()
  moved = copy.deepcopy(cfg)  # the transferred copy as a model source: the base's hypernetwork
  moved.model.source = str(tmp_path / 'tr_dyn' / 'fvt')  # is refused with the way to use it
  with pytest.raises(ValueError, match='gets its hypernetwork through --mode=transfer'):
    dynamic.run(moved, str(tmp_path / 'dyn3'))
  # sampling: the prompt merged, generation may use its new tokens; text comes back whole
  cfg.transfer.hypernet_workdir = zwd
  cfg.dynamic, cfg.dynamic_embeddings = 'merges:3', 'hypernet'
  cfg.sample.prompt, cfg.sample.max_new_tokens = 'Document 5: the tokenizer transfer', 4
  text, = dynamic.sample(cfg, str(tmp_path / 'dyn'))
  assert text.startswith(cfg.sample.prompt)
  log = capsys.readouterr().out
  assert re.search(r'tokens -> \d+ after \d+ merges \(hypernet embeddings\)', log)
  cfg.sample.prompt = ''
  with pytest.raises(ValueError, match='prompt is empty'):
    dynamic.sample(cfg, str(tmp_path / 'dyn'))


def _zett_minilm_cfg(overrides, **more):
  """configs/zett.py:minilm at tiny shapes on the tiny corpus (the real MiniLM, frozen)."""
  cfg, _ = config_lib.load('configs/zett.py:minilm')
  cfg.unlock()
  config_lib.override(cfg, {'data.source': overrides['data.source'], 'transfer.text_filter': '',
                            'data.seq_len': 32, 'train.batch_size': 2, 'train.eval_batches': 2,
                            'hypernet.d_model': 32, 'hypernet.num_layers': 1,
                            'hypernet.num_heads': 2, 'hypernet.mlp_dim': 64,
                            'zett.vocab_size': 300, 'zett.sampler_docs': 2,
                            'zett.sampler_doc_chars': 400, 'train.steps': 4, 'ckpt.every': 4,
                            'train.log_every': 1, 'data.prefetch': 1, **more})
  return cfg


def test_encoder_zett_trains_resumes_and_transfers(tiny, tmp_path):
  """configs/zett.py:minilm: sampled WordPiece vocabularies, the cosine loss, only the
  hypernetwork trained, exact resume of the sampled tokenizers; its transfer lands by FVT
  (FVT-anchored, barely trained) and above lexical."""
  from train import trainer, transfer  # pylint: disable=import-outside-toplevel
  _, _, overrides = tiny
  cfg = _zett_minilm_cfg(overrides)
  zwd = str(tmp_path / 'zett_minilm')
  summary = trainer.train(cfg, zwd)
  assert summary['step'] == 4 and np.isfinite(summary['train']['loss'])
  ev = summary['eval']
  assert ev['n_texts'] > 0 and 0.5 < ev['cosine_mean'] <= 1.0
  np.testing.assert_allclose(ev['loss'], 1.0 - ev['cosine_mean'])
  setup, state, _ = trainer.restore(cfg, zwd)
  assert set(state['params']) == {'hypernet'} and 'base' not in state['params']['hypernet']
  base = pretrained.load(pretrained.minilm_path())
  np.testing.assert_array_equal(np.asarray(setup.frozen['encoder']['words']['embedding']),
                                np.asarray(base.model.words.embedding[...]))
  fam = setup.family
  it = fam.train_iterator(0, 1)
  next(it)
  st = it.get_state()
  want = [next(it) for _ in range(2)]
  it.close()
  again = fam.train_iterator(0, 1)
  again.set_state(st)
  for w in want:
    chex.assert_trees_all_equal(w, next(again))
  again.close()
  b = want[0]
  assert b['vocab_pieces'].shape == (300, 7) and b['inputs'].shape == (2, 32)
  assert (b['vocab_pieces'][:, 0] >= 0).sum() > 50  # the sampled vocabulary as base pieces
  vocab = base.tokenizer.get_vocab()
  assert sorted(b['vocab_shared'][b['vocab_keep'] > 0]) == sorted(
      vocab[s] for s in ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'))
  assert not np.array_equal(want[0]['vocab_pieces'], want[1]['vocab_pieces'])  # per step

  tcfg, _ = config_lib.load('configs/pretrained.py:minilm')
  tcfg.unlock()
  config_lib.override(tcfg, {'data.source': overrides['data.source'],
                             'transfer.text_filter': '', 'target_tokenizer': 'wordpiece:300',
                             'transfer.methods': 'lexical,fvt,hypernet',
                             'transfer.hypernet_workdir': zwd})
  rows = {r['model']: r for r in transfer.run(tcfg, str(tmp_path / 'enc'))['rows']}
  assert set(rows) == {'base', 'lexical', 'fvt', 'hypernet'}
  h = rows['hypernet']
  assert h['predicted'] + h['special'] == h['vocab'] == rows['fvt']['vocab']
  assert abs(h['cosine_mean'] - rows['fvt']['cosine_mean']) < 0.05
  assert h['cosine_mean'] > rows['lexical']['cosine_mean']
  assert pretrained.load(str(tmp_path / 'enc' / 'hypernet')).meta['kind'] == 'encoder'


def test_encoder_decoder_hypernetwork_mismatches(tiny, tmp_path):
  """An encoder hypernetwork for a decoder transfer, a decoder one for the encoder transfer,
  and zett presets on the other kind of model: each refused by name."""
  from train import families, runs, trainer, transfer  # pylint: disable=import-outside-toplevel
  root, base, overrides = tiny
  dec = str(root / 'zett')
  if not os.path.exists(os.path.join(dec, 'config.json')):
    trainer.train(_zett_cfg(overrides), dec)
  enc_cfg = _zett_minilm_cfg(overrides)
  enc = str(tmp_path / 'enc_run')
  config_lib.save(enc_cfg, enc)  # its config is all the check reads
  with pytest.raises(ValueError, match='holds an encoder hypernetwork .* for a decoder model'):
    runs.load_predictor(enc, base)
  cfg, _ = config_lib.load('configs/pretrained.py:minilm')
  cfg.unlock()
  config_lib.override(cfg, {'data.source': overrides['data.source'], 'transfer.text_filter': '',
                            'target_tokenizer': 'wordpiece:300', 'transfer.methods': 'hypernet',
                            'transfer.hypernet_workdir': dec})
  with pytest.raises(ValueError, match='holds a decoder hypernetwork .* for an encoder model'):
    transfer.run(cfg, str(tmp_path / 'tr'))
  with pytest.raises(ValueError, match="is a decoder model, but family 'zett_encoder' trains an "
                                      'encoder hypernetwork'):
    families.get(_zett_minilm_cfg(overrides, **{'model.source': base}))
  with pytest.raises(ValueError, match='is an encoder model, .* use configs/zett.py:minilm'):
    families.get(_zett_cfg(overrides, **{'model.source': 'minilm'}))
  with pytest.raises(ValueError, match='no identity warm-up'):
    families.get(_zett_minilm_cfg(overrides, **{'zett.warmup_steps': 2}))
