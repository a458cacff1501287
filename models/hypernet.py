"""The zero-shot tokenizer transfer hypernetwork: embeddings for any new vocabulary of a
pretrained LM, predicted from how the base tokenizer spells each new token.

For each token of the new vocabulary:
  1. its string is split by the base tokenizer's BPE into at most `max_pieces` base pieces
     (`piece_ids`; a token with more pieces keeps the first `max_pieces`);
  2. the pieces are embedded with the frozen base embeddings -- input and output matrices
     concatenated for untied models -- and projected to the hypernetwork width;
  3. a small bidirectional transformer (`num_layers` BERT-style layers from models/bert.py)
     with learned piece positions reads them; the first position's output is the token's
     summary;
  4. heads give the input (and, untied, the output) embedding, rescaled per dimension to the
     base embeddings' statistics: e = head(h) * std_base + mean_base.
Special tokens keep the embeddings they have in the base model (`assemble`).

Training (tokenizers sampled on the fly, the frozen base LM's loss with the predicted
embeddings, an auxiliary MSE on shared tokens, an identity warm-up) is not built yet; the
warm-up objective, `warmup_loss`, is here and tested.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models.bert import BertLayer
from models.layers import Dense, Embed

Array = jax.Array


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.d_model = 256
  c.num_layers = 3
  c.num_heads = 4
  c.mlp_dim = 1024
  c.max_pieces = 7
  return c


def piece_ids(base_tokenizer, token_strings: list[str], max_pieces: int,
              pad_id: int = -1) -> np.ndarray:
  """int32 [N, max_pieces]: the base BPE pieces of each (byte-level) token string, `pad_id`
  after the last piece. A string the base cannot split (bytes outside its vocabulary) has no
  pieces: a row of `pad_id` (its embedding then comes from the bias alone; callers may prefer
  the base mean, see `assemble`)."""
  out = np.full((len(token_strings), max_pieces), pad_id, np.int32)
  for i, s in enumerate(token_strings):
    ids = [t.id for t in base_tokenizer.model.tokenize(s)][:max_pieces]
    out[i, :len(ids)] = ids
  return out


class HyperNet(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, base_in_VxD: np.ndarray,
               base_out_VxD: np.ndarray | None = None, dtype: Any = jnp.float32, *,
               rngs: nnx.Rngs):
    """`base_in_VxD` (and `base_out_VxD` for untied models): the frozen base embeddings."""
    d = base_in_VxD.shape[1]
    self.tied = base_out_VxD is None
    table = base_in_VxD if self.tied else np.concatenate([base_in_VxD, base_out_VxD], axis=1)
    # frozen: nnx.Variable (not Param), so optimizers over nnx.Param leave them alone
    self.base = nnx.Variable(jnp.asarray(table, jnp.float32))
    self.mean_in = nnx.Variable(jnp.asarray(base_in_VxD.mean(0), jnp.float32))
    self.std_in = nnx.Variable(jnp.asarray(base_in_VxD.std(0) + 1e-6, jnp.float32))
    if not self.tied:
      self.mean_out = nnx.Variable(jnp.asarray(base_out_VxD.mean(0), jnp.float32))
      self.std_out = nnx.Variable(jnp.asarray(base_out_VxD.std(0) + 1e-6, jnp.float32))
    self.proj = Dense(table.shape[1], c.d_model, use_bias=True, dtype=dtype, rngs=rngs)
    self.positions = Embed(c.max_pieces, c.d_model, dtype=dtype, rngs=rngs)
    layer_cfg = ml_collections.ConfigDict({'d_model': c.d_model, 'num_heads': c.num_heads,
                                           'mlp_dim': c.mlp_dim, 'norm_eps': 1e-6,
                                           'act': 'gelu'})
    self.layers = nnx.List([BertLayer(layer_cfg, dtype, rngs) for _ in range(c.num_layers)])
    self.head_in = Dense(c.d_model, d, use_bias=True, dtype=dtype, rngs=rngs)
    self.head_out = None if self.tied else Dense(c.d_model, d, use_bias=True, dtype=dtype,
                                                 rngs=rngs)
    self.max_pieces = c.max_pieces

  def __call__(self, pieces_NxP: Array) -> tuple[Array, Array | None]:
    """fp32 (input [N, D], output [N, D] or None when tied) embeddings for tokens given as base
    pieces (-1 padded)."""
    mask_NxP = pieces_NxP >= 0
    x = jnp.take(self.base[...], jnp.maximum(pieces_NxP, 0), axis=0)
    h = self.proj(x) + self.positions(jnp.arange(pieces_NxP.shape[1])[None])
    # a token without pieces still attends to its (empty) first slot rather than to nothing
    attend_NxP = mask_NxP.at[:, 0].set(True)
    for layer in self.layers:
      h = layer(h, attend_NxP)
    first = h[:, 0]
    e_in = self.head_in(first, out_dtype=jnp.float32) * self.std_in[...] + self.mean_in[...]
    if self.tied:
      return e_in, None
    e_out = self.head_out(first, out_dtype=jnp.float32) * self.std_out[...] + self.mean_out[...]
    return e_in, e_out


def assemble(predicted_VxD: np.ndarray, special_rows: dict[int, np.ndarray]) -> np.ndarray:
  """The new embedding matrix: predictions, with each special token's base embedding kept."""
  out = np.array(predicted_VxD, np.float32, copy=True)
  for i, row in special_rows.items():
    out[i] = row
  return out


def warmup_loss(net: HyperNet, pieces_NxP: Array, target_in_NxD: Array,
                target_out_NxD: Array | None = None) -> Array:
  """The identity warm-up: MSE between predicted and original embeddings of base tokens (each
  given by its own pieces), per dimension, averaged."""
  e_in, e_out = net(pieces_NxP)
  loss = jnp.mean(jnp.square(e_in - target_in_NxD))
  if e_out is not None and target_out_NxD is not None:
    loss = 0.5 * (loss + jnp.mean(jnp.square(e_out - target_out_NxD)))
  return loss
