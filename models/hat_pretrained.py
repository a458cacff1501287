"""A HAT built on a pretrained Llama-family LM (byte encoder and decoder around its stack).

  bytes -> byte encoder (new) -> pooled word vectors -> `pool_out` (new: byte width -> the
  pretrained width) -> backbone = the pretrained transformer stack (its layers, norms, width,
  heads, RoPE base, norm epsilon; copied from the file) -> byte decoder (new; its one-key
  cross-attention projects each previous-word backbone output down to the byte width) -> bytes

The model is `models/hat.HAT` (same forward, generation, byte-level view); only its backbone
parameters come from the pretrained LM, whose tokenizer, input embeddings and LM head are
dropped. `fill_backbone_config` writes the file's architecture into `model.*` (recorded in the
run's config) after checking that `model.d_model`, the width the projections are built for,
is the pretrained width.

Auxiliary loss (optional, `pretrained.aux_weight`): each pooled word vector (after `pool_out`,
what the backbone reads) is pulled toward the mean of the pretrained input embeddings of that
word's subword tokens (the word's bytes tokenized alone by the pretrained tokenizer), so the
frozen backbone sees inputs like the ones it was trained on from the first steps. The
embedding table rides along as frozen state (`PretrainedTable`, not trained, not
checkpointed). The loss term is the relative squared error sum ||w - e||^2 / sum ||e||^2 over
the batch's words. The tokens come as two host-made fields (`WordTokens`): `word_token_ids`
[B, T] (the tokens of each row's words in order, -1 padded: a row has at most as many tokens
as bytes) and `word_token_word` [B, T] (the word each token belongs to), so the per-word mean
is a segment sum over T, never a [B, W, K, D] block.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import encoders
from models import hat, transformer

Array = jax.Array

# the backbone's architecture keys, read from the pretrained file into model.* (the width,
# `d_model`, is checked instead: the projections are built for it)
BACKBONE_KEYS = ('num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim', 'rope_base',
                 'norm_eps')


class PretrainedTable(nnx.Variable):
  """Frozen pretrained input embeddings [V, D] (the auxiliary loss's targets)."""


class PretrainedHAT(hat.HAT):
  """A HAT whose backbone is sized like a pretrained LM's stack; with `aux_vocab > 0` it also
  holds that LM's input embedding table, frozen, for the auxiliary loss."""

  def __init__(self, m: ml_collections.ConfigDict, vocab_size: int, dtype: Any = jnp.float32,
               *, aux_vocab: int = 0, rngs: nnx.Rngs):
    super().__init__(m, vocab_size, dtype, rngs=rngs)
    self.aux_table = (PretrainedTable(jnp.zeros((aux_vocab, m.d_model), jnp.float32),
                                      out_sharding=('vocab', 'embed')) if aux_vocab else None)


def fill_backbone_config(m: ml_collections.ConfigDict, p_cfg: ml_collections.ConfigDict,
                         what: str) -> None:
  """Writes the pretrained stack's architecture into the HAT model config `m`; a ValueError
  when `m.d_model` (the width of the pooled-word and context projections) differs from the
  pretrained width. `what` names the model in the message."""
  if int(m.d_model) != int(p_cfg.d_model):
    raise ValueError(
        f'model.d_model={m.d_model}: the projections between the pooled word vectors and the '
        f'backbone are built for this width, but the pretrained backbone ({what}) is '
        f'{p_cfg.d_model} wide; set --config.model.d_model={p_cfg.d_model}')
  for k in BACKBONE_KEYS:
    m[k] = type(m[k])(p_cfg[k]) if k in m else p_cfg[k]


def backbone_params(p_model, scan_layers: bool = False) -> dict:
  """The pretrained `TokenLM`'s transformer stack as the pure parameter dict of a HAT backbone
  (the same `Transformer` module: layers and final norm), in the HAT's layer layout."""
  tree = nnx.to_pure_dict(nnx.state(p_model.transformer, nnx.Param))
  return transformer.convert_layer_layout(tree, scanned=True) if scan_layers else tree


def with_backbone(params: dict, backbone: dict, what: str) -> dict:
  """`params` (a HAT's pure parameter dict) with `params['backbone']` replaced by `backbone`,
  which must have the same structure and shapes."""
  new_leaves = jax.tree_util.tree_flatten_with_path(backbone)[0]
  old_leaves = jax.tree_util.tree_flatten_with_path(params['backbone'])[0]
  new = {jax.tree_util.keystr(p): np.shape(x) for p, x in new_leaves}
  old = {jax.tree_util.keystr(p): np.shape(x) for p, x in old_leaves}
  if new != old:
    diff = sorted(set(new.items()) ^ set(old.items()))[:4]
    raise ValueError(f'{what}: its transformer stack does not fit the HAT backbone '
                     f'(first differences: {diff})')
  # host copies: the trainer donates its state, and the pretrained model's own arrays (cached
  # by the family loader) must outlive the run
  return {**params, 'backbone': jax.tree.map(lambda x: np.array(x, np.float32), backbone)}


def content_hash(path: str) -> str:
  """SHA-256 of a model file, or of an HF directory's files (names and contents, sorted)."""
  h = hashlib.sha256()
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
           else [path])
  for f in files:
    if not os.path.isfile(f):
      continue
    if os.path.isdir(path):
      h.update(os.path.basename(f).encode() + b'\0')
    with open(f, 'rb') as fh:
      for chunk in iter(lambda: fh.read(1 << 22), b''):
        h.update(chunk)
  return h.hexdigest()


# -- the auxiliary loss ------------------------------------------------------------------------
def pooled_words(model: hat.HAT, batch: dict[str, Array]) -> Array:
  """The word vectors [B, W, D] the backbone reads (as `HAT.__call__` computes them; under jit
  the shared encoder work is computed once)."""
  if model.word_encoder:
    h_BxTxD = model.encode_words(batch['inputs'], batch['positions'], batch['word_ids'])
  else:
    h_BxTxD, _ = model.encode(batch['inputs'], batch['positions'], batch['segment_ids'])
  return model.pool(h_BxTxD, batch['word_gather'])


def aux_terms(model: PretrainedHAT, batch: dict[str, Array]) -> tuple[Array, Array]:
  """(sum over words of ||w - e||^2, sum of ||e||^2): w the pooled vector, e the mean of the
  pretrained input embeddings of the word's tokens (words without tokens are left out)."""
  w_BxWxD = pooled_words(model, batch).astype(jnp.float32)
  ids_BxT, word_BxT = batch['word_token_ids'], batch['word_token_word']
  n_words = w_BxWxD.shape[1]
  real_BxT = (ids_BxT >= 0) & (word_BxT >= 0) & (word_BxT < n_words)
  e_BxTxD = jnp.take(model.aux_table[...], jnp.maximum(ids_BxT, 0), axis=0)
  e_BxTxD = jnp.where(real_BxT[..., None], e_BxTxD, 0.0)
  seg_BxT = jnp.where(real_BxT, word_BxT, n_words)  # a spare segment for padding

  def per_row(e_TxD, seg_T, real_T):
    s = jax.ops.segment_sum(e_TxD, seg_T, num_segments=n_words + 1)[:n_words]
    c = jax.ops.segment_sum(real_T.astype(jnp.float32), seg_T, num_segments=n_words + 1)
    return s, c[:n_words]

  sum_BxWxD, count_BxW = jax.vmap(per_row)(e_BxTxD, seg_BxT, real_BxT)
  has_BxW = count_BxW > 0
  target_BxWxD = sum_BxWxD / jnp.maximum(count_BxW, 1.0)[..., None]
  err = jnp.sum(jnp.sum(jnp.square(w_BxWxD - target_BxWxD), -1) * has_BxW)
  norm = jnp.sum(jnp.sum(jnp.square(target_BxWxD), -1) * has_BxW)
  return err, norm


def loss(model: PretrainedHAT, batch: dict[str, Array], rng: Array | None = None):
  """HAT's next-byte loss, plus `aux_weight` (a [B] column, the same in every row) times the
  auxiliary relative error when the batch has the word-token fields; the metric sums gain
  `aux_err` / `aux_norm`."""
  nll, sums = hat.hat_loss(model, batch, rng)
  if 'word_token_ids' not in batch or model.aux_table is None:
    return nll, sums
  err, norm = aux_terms(model, batch)
  weight = jnp.max(batch['aux_weight']).astype(jnp.float32)
  total = nll + weight * err / jnp.maximum(norm, 1e-12)
  return total, dict(sums, aux_err=err, aux_norm=norm)


class WordTokens:
  """Host side of the auxiliary loss: the pretrained tokenizer's tokens of every word of a
  HAT batch, as the fields `word_token_ids` / `word_token_word` [B, T] (see the module doc).

  A word is its bytes (ByteEncoder ids; other ids, e.g. boundary tokens, are skipped) decoded
  as UTF-8 and tokenized alone; a word holding only specials (bos / eos) is the pretrained
  model's document separator `doc_id`. Tokenizations are cached by the word's bytes."""

  def __init__(self, tokenizer, doc_id: int, cache_size: int = 1 << 18):
    self.tokenizer, self.doc_id, self.cache_size = tokenizer, int(doc_id), cache_size
    self._cache: dict[bytes, list[int]] = {}

  def _tokens(self, words: list[bytes]) -> list[list[int]]:
    todo = sorted({w for w in words if w and w not in self._cache})
    if todo:
      if len(self._cache) + len(todo) > self.cache_size:
        self._cache.clear()
      enc = self.tokenizer.encode_batch([w.decode('utf-8', 'replace') for w in todo],
                                        add_special_tokens=False)
      for w, e in zip(todo, enc):
        self._cache[w] = list(e.ids)
    return [self._cache[w] if w else [self.doc_id] for w in words]

  def __call__(self, inputs_BxT: np.ndarray, gather_BxWxL: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    b, t = inputs_BxT.shape
    ids = np.full((b, t), -1, np.int32)
    which = np.full((b, t), -1, np.int32)
    for r in range(b):
      words = np.flatnonzero(gather_BxWxL[r, :, 0] >= 0)
      keys = []
      for w in words:
        g = gather_BxWxL[r, w]
        x = inputs_BxT[r, g[g >= 0]]
        x = x[(x >= encoders.BYTE_OFFSET) & (x < encoders.BYTE_IDS)] - encoders.BYTE_OFFSET
        keys.append(x.astype(np.uint8).tobytes())
      n = 0
      for w, toks in zip(words, self._tokens(keys)):
        k = min(len(toks), t - n)
        ids[r, n:n + k] = toks[:k]
        which[r, n:n + k] = w
        n += k
    return ids, which
