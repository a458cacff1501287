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
     base embeddings' statistics: e = head(h) * std_base + mean_base (`anchor='mean'`), or,
     with `anchor='fvt'`, e = head(h) * std_base + the mean of the pieces' base embeddings
     (zero-initialized heads: an untrained hypernetwork is exactly FVT, training corrects it).
Special tokens keep the embeddings they have in the base model (`assemble`).

Training (`ZettModel`, `zett_loss`; driven by train/families/zett.py): for each step a tokenizer
is sampled (data/tokenizer_sampler.py), the batch text is tokenized with it, the hypernetwork
predicts the embeddings of its whole vocabulary, and the frozen base LM runs on those
embeddings (input and readout): the loss is its next-token cross-entropy plus `aux_weight` times
the MSE between predicted and original embeddings of the tokens the sampled vocabulary shares
with the base. During the first `warmup_steps` steps the loss is the identity warm-up instead
(`warmup_loss`: base tokens, given as their own pieces, should map to their own embeddings).

Encoders (BERT / MiniLM, WordPiece; `ZettEncoderModel`, `zett_encoder_loss`): a new token's
pieces are its greedy base WordPiece split (`wordpiece_split`: a '##' continuation is split
into continuation pieces, a word-initial token starts with a word-initial piece), the
hypernetwork is tied (input embeddings only), and the loss needs no labels: the frozen
encoder's sentence embedding (mean pooling, L2 norm) of each text under the sampled tokenizer,
with predicted input embeddings, should match its embedding under the original tokenizer:
mean(1 - cosine) + aux_weight * MSE on the shared tokens, as for decoders.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models import bert, token_lm
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
  c.packed_slots = 0.0  # >0: the vocabulary's pieces packed into rows of PACK_ROW slots, this
                        # many slots per token (`pack_pieces`): no work on padding; 0: one
                        # row of max_pieces slots per token
  c.anchor = 'mean'    # 'mean': heads predict (e - base mean) / base std; 'fvt': heads predict a
                       # correction (in base-std units) to the mean of the piece embeddings,
                       # zero-initialized, so an untrained hypernetwork equals FVT
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


def wordpiece_split(s: str, vocab: dict, prefix: str = '##') -> list[int]:
  """Base WordPiece ids of the token string `s` (a '##' continuation keeps that role):
  greedy longest match, as WordPiece tokenizes a word; [] if some part has no piece."""
  cont = s.startswith(prefix) and len(s) > len(prefix)
  body, first, out = (s[len(prefix):] if cont else s), not cont, []
  while body:
    for j in range(len(body), 0, -1):
      cand = body[:j] if first else prefix + body[:j]
      if cand in vocab:
        out.append(vocab[cand])
        body, first = body[j:], False
        break
    else:
      return []
  return out


def wordpiece_piece_ids(base_vocab: dict, token_strings: list[str], max_pieces: int,
                        pad_id: int = -1) -> np.ndarray:
  """int32 [N, max_pieces]: `piece_ids` for WordPiece encoders (`wordpiece_split` into the
  base vocabulary `base_vocab`, string -> id); a string without a split is a row of
  `pad_id`."""
  out = np.full((len(token_strings), max_pieces), pad_id, np.int32)
  for i, s in enumerate(token_strings):
    ids = wordpiece_split(s, base_vocab)[:max_pieces] if s else []
    out[i, :len(ids)] = ids
  return out


PACK_ROW = 8  # slots per packed row (>= max_pieces)


def packed_rows(vocab: int, slots_per_token: float) -> int:
  """Rows of the packed layout for a vocabulary of `vocab` tokens (a static shape)."""
  return int(np.ceil(vocab * float(slots_per_token) / PACK_ROW))


def pack_pieces(pieces_VxP: np.ndarray, rows: int) -> tuple[dict[str, np.ndarray], int]:
  """The pieces of a vocabulary packed into `rows` rows of PACK_ROW slots, each token's pieces
  contiguous in one row (first-fit decreasing), so the hypernetwork computes on pieces, not on
  padding (a sampled vocabulary averages ~2 pieces of at most 7). A token without pieces takes
  one slot (base row 0, as in the padded layout). If the pieces do not fit, the longest tokens
  lose their last pieces first (returned: the number of pieces cut).

  Returns int32 arrays: 'ids' [R, S] base piece ids (-1 free), 'tok' [R, S] the token of each
  slot (-1 free), 'pos' [R, S] the piece's position in its token, 'first' [V] the flat slot
  (r * S + c) of each token's first piece, 'count' [V] its pieces."""
  v, p = pieces_VxP.shape
  if p > PACK_ROW:
    raise ValueError(f'hypernet.max_pieces={p} exceeds the packed row of {PACK_ROW} slots')
  n = np.maximum((pieces_VxP >= 0).sum(1), 1)
  real = (pieces_VxP >= 0).sum(1)
  cap = rows * PACK_ROW
  cut = 0
  if n.sum() > cap:  # water-filling: cap every token at m pieces, the smallest m that fits
    if v > cap:
      raise ValueError(f'{v} tokens do not fit {rows} packed rows of {PACK_ROW} slots: raise '
                       'hypernet.packed_slots')
    m = max(m for m in range(1, p + 1) if np.minimum(n, m).sum() <= cap)
    new = np.minimum(n, m)
    cut, n = int((n - new).sum()), new
  ids = np.full((rows, PACK_ROW), -1, np.int32)
  tok = np.full((rows, PACK_ROW), -1, np.int32)
  pos = np.zeros((rows, PACK_ROW), np.int32)
  first = np.zeros(v, np.int32)
  free = [[] for _ in range(PACK_ROW + 1)]  # rows by free slots (a stack each)
  used = np.zeros(rows, np.int64)
  opened = 0
  for t in np.argsort(-n, kind='stable'):
    size = int(n[t])
    r = None
    for c in range(size, PACK_ROW + 1):  # best fit among opened rows
      if free[c]:
        r = free[c].pop()
        break
    if r is None:
      if opened < rows:
        r, opened = opened, opened + 1
      else:  # fragmentation: the token takes the largest gap left, cut to it
        c = max(c for c in range(PACK_ROW + 1) if free[c])
        r = free[c].pop()
        cut += size - c
        size = c
    col = int(used[r])
    ids[r, col:col + size] = pieces_VxP[t, :size] if real[t] else -1
    tok[r, col:col + size] = t
    pos[r, col:col + size] = np.arange(size)
    first[t] = r * PACK_ROW + col
    n[t] = size
    used[r] += size
    if used[r] < PACK_ROW:
      free[PACK_ROW - used[r]].append(r)
  count = np.where(real > 0, np.minimum(real, n), 0).astype(np.int32)
  return {'ids': ids, 'tok': tok, 'pos': pos, 'first': first, 'count': count}, cut


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
    if c.anchor not in ('mean', 'fvt'):
      raise ValueError(f"hypernet.anchor={c.anchor!r}: expected 'mean' or 'fvt'")
    self.anchor = c.anchor
    head_std = 0.0 if c.anchor == 'fvt' else None
    self.head_in = Dense(c.d_model, d, use_bias=True, dtype=dtype, init_std=head_std, rngs=rngs)
    self.head_out = None if self.tied else Dense(c.d_model, d, use_bias=True, dtype=dtype,
                                                 init_std=head_std, rngs=rngs)
    self.dim = d
    self.max_pieces = c.max_pieces

  def packed(self, ids: Array, tok: Array, pos: Array, first: Array, count: Array
             ) -> tuple[Array, Array | None]:
    """The same embeddings as `__call__`, from the packed layout of `pack_pieces`: attention
    stays inside each token's slots, the summary is its first slot, the FVT anchor the mean of
    its pieces. Arrays as `pack_pieces` names them: ids/tok/pos [R, S], first/count [V]."""
    ids_RxS, tok_RxS, pos_RxS, first_V, count_V = ids, tok, pos, first, count
    r, s = ids_RxS.shape
    v = first_V.shape[0]
    x = jnp.take(self.base[...], jnp.maximum(ids_RxS, 0), axis=0)
    h = self.proj(x) + self.positions(pos_RxS)
    same = (tok_RxS[:, :, None] == tok_RxS[:, None, :]) | jnp.eye(s, dtype=bool)[None]
    for layer in self.layers:
      h = layer(h, same)
    summary = h.reshape(r * s, -1)[first_V]
    if self.anchor == 'fvt':
      real = (ids_RxS >= 0).reshape(-1)
      seg = jnp.where(real, tok_RxS.reshape(-1), v)  # free slots and empty tokens: dropped
      sums = jax.ops.segment_sum(x.reshape(r * s, -1), seg, num_segments=v + 1)[:v]
      fvt = sums / jnp.maximum(count_V, 1)[:, None].astype(jnp.float32)
      none = (count_V == 0)[:, None]
      anchor_in = jnp.where(none, self.mean_in[...], fvt[:, :self.dim])
      anchor_out = None if self.tied else jnp.where(none, self.mean_out[...], fvt[:, self.dim:])
    else:
      anchor_in = self.mean_in[...]
      anchor_out = None if self.tied else self.mean_out[...]
    return self._heads(summary, anchor_in, anchor_out)

  def _heads(self, first, anchor_in, anchor_out):
    e_in = self.head_in(first, out_dtype=jnp.float32) * self.std_in[...] + anchor_in
    if self.tied:
      return e_in, None
    e_out = self.head_out(first, out_dtype=jnp.float32) * self.std_out[...] + anchor_out
    return e_in, e_out

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
    if self.anchor == 'fvt':  # the mean of the pieces' base rows (the base mean if none)
      m = mask_NxP[..., None].astype(jnp.float32)
      fvt = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
      none = ~mask_NxP.any(1, keepdims=True)
      anchor_in = jnp.where(none, self.mean_in[...], fvt[:, :self.dim])
      anchor_out = None if self.tied else jnp.where(none, self.mean_out[...], fvt[:, self.dim:])
    else:
      anchor_in = self.mean_in[...]
      anchor_out = None if self.tied else self.mean_out[...]
    return self._heads(first, anchor_in, anchor_out)


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


class ZettModel(nnx.Module):
  """The hypernetwork (trained) beside the base LM (frozen: the family's `trainable` filter
  selects only `hypernet` parameters, and the trainer passes the LM's weights in as frozen
  state)."""

  def __init__(self, c_hyper, c_lm, vocab_size: int, base_in_VxD: np.ndarray,
               base_out_VxD: np.ndarray | None, dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    self.hypernet = HyperNet(c_hyper, base_in_VxD, base_out_VxD, dtype, rngs=rngs)
    self.lm = token_lm.TokenLM(c_lm, vocab_size, dtype, rngs=rngs)
    self.dtype = dtype

  def embeddings(self, pieces_VxP: Array, shared_V: Array, keep_V: Array,
                 packed: dict | None = None):
    """(input [V, D], output [V, D]) for a vocabulary: predicted, except rows with `keep`
    (special tokens), which take the base row `shared`. `packed`: the vocabulary's pieces in
    the layout of `pack_pieces` (then `pieces_VxP` is not read)."""
    e_in, e_out = (self.hypernet.packed(**packed) if packed is not None
                   else self.hypernet(pieces_VxP))
    base_in = self.lm.embed.embedding[...]
    keep = (keep_V > 0)[:, None]
    e_in = jnp.where(keep, base_in[jnp.maximum(shared_V, 0)], e_in)
    if e_out is None:
      return e_in, e_in
    base_out = self.lm.readout.kernel[...].T
    return e_in, jnp.where(keep, base_out[jnp.maximum(shared_V, 0)], e_out)


PACKED_KEYS = ('ids', 'tok', 'pos', 'first', 'count')


def packed_of(batch: dict) -> dict | None:
  """The packed vocabulary arrays of a batch ('packed_ids', ...), or None (padded layout)."""
  if 'packed_ids' not in batch:
    return None
  return {k: batch[f'packed_{k}'] for k in PACKED_KEYS}


def zett_loss(model: ZettModel, batch: dict, aux_weight: float) -> tuple[Array, dict]:
  """Warm-up rows (`phase` 1): the identity loss on `warm_pieces` / `warm_ids`. Otherwise the
  base LM's cross-entropy on text tokenized by the sampled tokenizer, with the predicted
  embeddings, + aux_weight * MSE on the shared tokens. Sums: nll_sum, n_tokens, n_bytes (so the
  trainer reports bits per byte under the sampled tokenizers), aux_mse, warm_mse."""
  lm = model.lm
  zero = jnp.zeros((), jnp.float32)

  def warm():
    base_in = lm.embed.embedding[...]
    target_out = None if lm.tie_embeddings else lm.readout.kernel[...].T[batch['warm_ids']]
    mse = warmup_loss(model.hypernet, batch['warm_pieces'], base_in[batch['warm_ids']],
                      target_out)
    return mse, {'nll_sum': zero, 'n_tokens': zero, 'n_bytes': zero, 'aux_mse': zero,
                 'warm_mse': mse}

  def transfer():
    e_in, e_out = model.embeddings(batch['vocab_pieces'], batch['vocab_shared'],
                                   batch['vocab_keep'], packed_of(batch))
    x = jnp.take(e_in, batch['inputs'], axis=0).astype(model.dtype)
    h, _ = lm.transformer(x, batch['positions'], batch['segment_ids'])
    logits = jnp.einsum('btd,vd->btv', h, e_out.astype(model.dtype),
                        preferred_element_type=jnp.float32)
    nll = (jax.nn.logsumexp(logits, axis=-1)
           - jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0])
    w = batch['weights']
    n = jnp.sum(w)
    nll_sum = jnp.sum(nll * w)
    shared = (batch['vocab_shared'] >= 0) & (batch['vocab_keep'] == 0)
    base_in = lm.embed.embedding[...][jnp.maximum(batch['vocab_shared'], 0)]
    err = jnp.mean(jnp.square(e_in - base_in), axis=-1)
    if not lm.tie_embeddings:
      base_out = lm.readout.kernel[...].T[jnp.maximum(batch['vocab_shared'], 0)]
      err = 0.5 * (err + jnp.mean(jnp.square(e_out - base_out), axis=-1))
    aux = jnp.sum(err * shared) / jnp.maximum(jnp.sum(shared), 1)
    loss = nll_sum / jnp.maximum(n, 1.0) + aux_weight * aux
    return loss, {'nll_sum': nll_sum, 'n_tokens': n,
                  'n_bytes': jnp.sum(batch['target_bytes']).astype(jnp.float32),
                  'aux_mse': aux, 'warm_mse': zero}

  return jax.lax.cond(batch['phase'][0] > 0, warm, transfer)


class ZettEncoderModel(nnx.Module):
  """The hypernetwork (trained, tied: input embeddings only) beside a frozen BERT encoder."""

  def __init__(self, c_hyper, c_bert, base_in_VxD: np.ndarray, dtype: Any = jnp.float32, *,
               rngs: nnx.Rngs):
    self.hypernet = HyperNet(c_hyper, base_in_VxD, None, dtype, rngs=rngs)
    self.encoder = bert.BertEncoder(c_bert, dtype, rngs=rngs)
    self.dtype = dtype

  def embeddings(self, pieces_VxP: Array, shared_V: Array, keep_V: Array) -> Array:
    """Input embeddings [V, D] of a vocabulary: predicted, except rows with `keep` (special
    tokens), which take the base row `shared`."""
    e_in, _ = self.hypernet(pieces_VxP)
    base = self.encoder.words.embedding[...]
    return jnp.where((keep_V > 0)[:, None], base[jnp.maximum(shared_V, 0)], e_in)


def zett_encoder_loss(model: ZettEncoderModel, batch: dict, aux_weight: float
                      ) -> tuple[Array, dict]:
  """mean over real rows of (1 - cosine) between the frozen encoder's sentence embedding of
  each text under the original tokenizer (`orig_ids`, `orig_mask`) and under the sampled one
  (`inputs`, `mask`, with the predicted `vocab_*` embeddings), + aux_weight * MSE to the base
  rows of the tokens the vocabularies share. Sums: cosine_sum, n_texts (real rows, `row_weight`),
  n_tokens (sampled-tokenizer tokens), n_bytes (UTF-8 bytes of the texts), aux_mse."""
  enc = model.encoder
  e_in = model.embeddings(batch['vocab_pieces'], batch['vocab_shared'], batch['vocab_keep'])
  x = jnp.take(e_in, batch['inputs'], axis=0).astype(model.dtype)
  got = bert.mean_pool(enc.encode(x, batch['mask']), batch['mask'])
  ref = jax.lax.stop_gradient(enc.sentence_embedding(batch['orig_ids'], batch['orig_mask']))
  cos = jnp.sum(got * ref, axis=-1)
  w = batch['row_weight']
  n = jnp.sum(w)
  shared = (batch['vocab_shared'] >= 0) & (batch['vocab_keep'] == 0)
  base = enc.words.embedding[...][jnp.maximum(batch['vocab_shared'], 0)]
  err = jnp.mean(jnp.square(e_in - base), axis=-1)
  aux = jnp.sum(err * shared) / jnp.maximum(jnp.sum(shared), 1)
  loss = jnp.sum((1.0 - cos) * w) / jnp.maximum(n, 1.0) + aux_weight * aux
  return loss, {'cosine_sum': jnp.sum(cos * w), 'n_texts': n,
                'n_tokens': jnp.sum(batch['mask'] * w[:, None]).astype(jnp.float32),
                'n_bytes': jnp.sum(batch['text_bytes'] * w).astype(jnp.float32),
                'aux_mse': aux}
