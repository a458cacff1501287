"""Sentence decoder: a sentence embedding back to its UTF-8 bytes; optionally with its own byte
encoder (a sentence autoencoder whose embeddings can replace the frozen MiniLM space).

The embedding is normalized with the sentence space's robust statistics, projected to
`prefix_len` vectors and prepended to the bytes, and a causal byte transformer (the shared
stack) reads [prefix, bos, b_1 .. b_n] and predicts [b_1 .. b_n, eos] (tied byte embeddings).
Training adds Gaussian noise to the normalized embedding, its standard deviation drawn per
sentence from U(0, embed_noise), so the decoder also reads the imperfect vectors an LCM
predicts. With `autoencoder=True` a causal byte transformer encodes the same bytes, mean-pools
them and L2-normalizes a projection to `embed_dim`: the embedding the decoder reads (and that
data/sentences.py caches as the `autoencoder:WORKDIR` sentence space).

`Decoder` wraps a trained model for use: batched greedy decoding of embeddings to text and,
for an autoencoder, embedding of texts.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import encoders, pipeline, sentences
from models import layers
from models.layers import Dense, Embed
from models.transformer import Transformer

Array = jax.Array
# byte-encoder ids (data/encoders.py owns them)
PAD, BOS, EOS, OFFSET = encoders.PAD_ID, encoders.BOS_ID, encoders.EOS_ID, encoders.BYTE_OFFSET
TRUE_VOCAB, VOCAB = encoders.BYTE_IDS, encoders.BYTE_VOCAB_SIZE


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.d_model = 128
  c.num_layers = 4
  c.num_heads = 4
  c.head_dim = 32
  c.mlp_dim = 384
  c.prefix_len = 4
  c.embed_noise = 0.5        # max std of the noise on normalized embeddings in training
  c.autoencoder = False
  c.embed_dim = 384          # autoencoder only: its sentence embedding width
  c.encoder_layers = 2       # autoencoder only
  c.remat = 'none'
  c.scan_layers = False      # lax.scan over the stacked layers
  layers.attention_config_keys(c)  # attention_impl: 'auto' | xla | blocked | cudnn | splash
  return c


class SentenceDecoder(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, emb_dim: int, vocab_size: int, center, scale,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    d = c.d_model
    self.prefix_len, self.d_model, self.emb_dim, self.dtype = c.prefix_len, d, emb_dim, dtype
    self.center = nnx.Param(jnp.asarray(center, jnp.float32).reshape(emb_dim))
    self.scale = nnx.Param(jnp.asarray(scale, jnp.float32).reshape(emb_dim))
    self.prefix = Dense(emb_dim, c.prefix_len * d, use_bias=True, dtype=dtype, rngs=rngs)
    self.embed = Embed(vocab_size, d, dtype=dtype, rngs=rngs)
    attn = dict(attention_impl=layers.AttentionConfig.from_model_config(c),
                scan_layers=c.get('scan_layers', False))
    self.body = Transformer(c.num_layers, d, c.num_heads, c.num_heads, c.head_dim, c.mlp_dim,
                            dtype=dtype, remat=c.remat, **attn, rngs=rngs)
    if c.autoencoder:
      self.enc_embed = Embed(vocab_size, d, dtype=dtype, rngs=rngs)
      self.encoder = Transformer(c.encoder_layers, d, c.num_heads, c.num_heads, c.head_dim,
                                 c.mlp_dim, dtype=dtype, remat=c.remat, **attn, rngs=rngs)
      self.enc_out = Dense(d, emb_dim, use_bias=True, dtype=dtype, rngs=rngs)
    else:
      self.enc_embed = self.encoder = self.enc_out = None

  def encode(self, bytes_BxL: Array, mask_BxL: Array) -> Array:
    """Autoencoder embedding [B, E]: mean of the byte states, projected, L2-normalized."""
    if self.encoder is None:
      raise ValueError('this decoder was trained without its own encoder (model.autoencoder)')
    pos = jnp.broadcast_to(jnp.arange(bytes_BxL.shape[1]), bytes_BxL.shape)
    h, _ = self.encoder(self.enc_embed(bytes_BxL), pos, mask_BxL.astype(jnp.int32))
    m = mask_BxL.astype(jnp.float32)[..., None]
    pooled = (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    e = self.enc_out(pooled, out_dtype=jnp.float32)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def logits(self, emb_BxE: Array, tokens_BxL: Array, noise_B: Array | None = None,
             key: Array | None = None) -> Array:
    """fp32 logits [B, L, V] for the byte after each of `tokens` ([bos, b_1, ...])."""
    center, scale = (jax.lax.stop_gradient(p[...]) for p in (self.center, self.scale))
    x = (emb_BxE.astype(jnp.float32) - center) / scale
    if noise_B is not None:
      x = x + noise_B[:, None] * jax.random.normal(key, x.shape)
    b, l = tokens_BxL.shape
    p = self.prefix_len
    prefix = self.prefix(x).reshape(b, p, self.d_model).astype(self.dtype)
    seq = jnp.concatenate([prefix, self.embed(tokens_BxL)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(p + l), (b, p + l))
    h, _ = self.body(seq, pos)
    return self.embed.attend(h[:, p:])


def loss(model: SentenceDecoder, batch: dict, rng: Array, cfg_model) -> tuple[Array, dict]:
  """Byte cross-entropy of the sentences given their (noised) embeddings; bits per byte."""
  k_sigma, k_noise = jax.random.split(rng)
  w = batch['weights']
  if model.encoder is not None:
    emb = model.encode(batch['targets'] * (batch['targets'] != EOS), batch['byte_mask'])
  else:
    emb = batch['emb']
  sigma = jax.random.uniform(k_sigma, (w.shape[0],), maxval=cfg_model.embed_noise)
  logits = model.logits(emb, batch['inputs'], sigma, k_noise)
  logp = jax.nn.log_softmax(logits[..., :TRUE_VOCAB], axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
  total = jnp.sum(nll * w)
  n = jnp.sum(w)
  return total / jnp.maximum(n, 1.0), {
      'nll_sum': total, 'n_tokens': n,
      'n_bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32)}


def greedy_decode(model: SentenceDecoder, emb_NxE: Array, max_len: int) -> Array:
  """Greedy bytes [N, max_len] (ids; EOS marks the end) from embeddings, one jitted loop that
  re-reads the whole prefix each step (sentences are short)."""
  n = emb_NxE.shape[0]
  buf = jnp.zeros((n, max_len + 1), jnp.int32).at[:, 0].set(BOS)

  def step(i, buf):
    logits = model.logits(emb_NxE, buf[:, :-1])
    li = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)[:, :TRUE_VOCAB]
    li = li.at[:, :EOS].set(-jnp.inf)  # never pad or bos
    nxt = jnp.argmax(li, axis=-1).astype(jnp.int32)
    return buf.at[:, i + 1].set(nxt)

  buf = jax.lax.fori_loop(0, max_len, step, buf)
  return buf[:, 1:]


def bytes_to_text(ids) -> str:
  out = bytearray()
  for t in ids:
    t = int(t)
    if t == EOS:
      break
    if OFFSET <= t < TRUE_VOCAB:
      out.append(t - OFFSET)
  return out.decode('utf-8', errors='replace')


def flops_per_byte(c, seq_len: int) -> float:
  d, hk = c.d_model, c.num_heads * c.head_dim
  per_layer = 4 * d * hk + 3 * d * c.mlp_dim
  n = c.num_layers * per_layer + (c.encoder_layers * per_layer if c.autoencoder else 0)
  return 6.0 * n + 6.0 * (c.num_layers + (c.encoder_layers if c.autoencoder else 0)) * seq_len * hk


class Decoder:
  """A sentence decoder's jitted greedy decoding (and, for an autoencoder, its encoder), in
  fixed batches of `batch` rows. For an autoencoder it also has the sentence-encoder interface
  of data/sentences.py (`dim`, `__call__(texts)`; the caller sets `spec` and `identity`)."""

  def __init__(self, model: SentenceDecoder, max_bytes: int, batch: int = 64):
    self.batch = batch
    self.max_bytes = int(max_bytes)
    graphdef, state = nnx.split(model)
    self.dim = int(model.emb_dim)
    self.autoencoder = model.encoder is not None

    @jax.jit
    def decode(state, emb):
      return greedy_decode(nnx.merge(graphdef, state), emb, self.max_bytes)

    @jax.jit
    def embed(state, ids, mask):
      return nnx.merge(graphdef, state).encode(ids, mask)

    self._decode = lambda emb: decode(state, emb)
    self._embed = lambda ids, mask: embed(state, ids, mask)

  def decode(self, emb: np.ndarray) -> list[str]:
    """Greedy text of each embedding [N, D]; like the sentence space, without control
    characters or runs of whitespace."""
    emb = np.asarray(emb, np.float32)
    if not len(emb):
      return []
    ids = pipeline.map_in_batches(self._decode, emb, self.batch)
    return [' '.join(sentences.clean_text(bytes_to_text(r))[0].split()) for r in ids]

  @property
  def max_len(self) -> int:
    return -(-self.max_bytes // 32) * 32

  def tokenize(self, texts) -> list[np.ndarray]:
    return [np.frombuffer(t.encode('utf-8'), np.uint8)[:self.max_bytes].astype(np.int32)
            + OFFSET for t in texts]

  def __call__(self, texts) -> np.ndarray:
    """The autoencoder's embeddings [N, D] of `texts`."""
    if not self.autoencoder:
      raise ValueError('this sentence decoder has no encoder (model.autoencoder=False)')
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    ids = np.zeros((len(texts), self.max_len), np.int32)
    mask = np.zeros_like(ids)
    for i, x in enumerate(self.tokenize(texts)):
      ids[i, :len(x)], mask[i, :len(x)] = x, 1
    visible_one = (np.arange(self.max_len) == 0).astype(np.int32)  # padding rows
    return pipeline.map_in_batches(lambda b: self._embed(*b), (ids, mask), self.batch,
                                   fill=(0, visible_one))
