"""Hierarchical autoregressive transformer (HAT): bytes -> words -> bytes.

  byte encoder   causal sliding-window transformer over the byte stream          [B, T, De]
                 (`encoder_attention='word'`: bidirectional inside each word, see below)
  word pooling   'query': a learned query per word attends to that word's bytes,
                 gathered into a small [B, W, Lw, De] block (no dense [W, T] mask);
                 'last': the encoder state of the word's last byte (with a causal
                 encoder that position has seen the whole word);
                 'boundary': real word-boundary tokens in the stream (below)       [B, W, D]
  backbone       the shared transformer over word positions (RoPE on word index) [B, W, D]
  byte decoder   causal sliding-window transformer over the encoder states; every
                 byte of word j reads the backbone output of word j-1 (a learned
                 first-word vector for the first word of each document) through a
                 one-key cross-attention, i.e. o(v(c)) added per layer           [B, T, De]
  byte head      256 bytes + specials (the ByteEncoder vocabulary)

Causality: byte t of word j predicts byte t+1 from bytes <= t and words < j, so the prediction
of a word's first byte (made at the previous word's last byte) is the end-of-word decision.
Static shapes: T bytes and W words per row; no Python loop over words in the step.

Word-boundary tokens (`pooling='boundary'`; Thawani et al. 2023, "Learn Your Tokens"). The
stream holds a real token `model.boundary_id` before every word (data/hat_data.
BoundaryByteEncoder: `[B] d e f [B] ' ' f o o`), their prefix-CLS design: the word vector is the
encoder state at a boundary token, and predicting the boundary is the explicit end-of-word
decision (its loss counts; it stands for no byte, so bits per byte stay per text byte and
include what the boundaries cost). Which boundary: with the intra-word encoder the one that
opens the word, which reads the word in both directions (the paper's CLS); with the causal
encoder a prefix token has seen only earlier words, so the word is read at the boundary that
closes it (the next word's prefix, position last + 1), the only boundary token that has read
it. Either way word j's vector exists once its last byte is followed by a boundary, and is
read only by bytes of words > j.

Intra-word bidirectional encoder (`encoder_attention='word'`; Sun et al., ACL 2023, "From
Characters to Words"): encoder self-attention is bidirectional and restricted to the word
(the segment ids of its attention are word ids), never across words. A byte's encoder state
then depends on the *later* bytes of its word, so the byte decoder must not read encoder
states of the word it predicts: in this mode the decoder's input is the byte embedding
(the shared `embed` table) instead of the encoder state, and the decoder's own causal
self-attention is its only view of the current word's earlier bytes. Encoder states enter the
decoder only through the pooled vectors of *completed* words (backbone output of word j-1
for the bytes of word j), which depend on words < j alone. So byte t of word j still sees only
bytes <= t and words < j (tests/test_hat.py, causality across the word hierarchy). In cached
generation a word is encoded as one block when it is complete.

Learned chunking (`chunking='learned'`; Hwang, Wang, Gu 2025, "H-Net"): the units are cut by
the model instead of a splitter. A routing module on the causal encoder's states gives byte t
the boundary probability p_t = (1 - cos(q(h_t), k(h_{t-1}))) / 2 (1 at a document's first
byte); byte t starts a unit where p_t >= 1/2. The units of a row are gathered into W static
slots (`max_units`; bytes of further units join the last slot's unit) and pooled like words;
byte t of unit j reads the backbone output of unit j - 1, whose end was decided at unit j's
first byte, so nothing later than byte t reaches it. Gradients pass the hard boundaries as in
H-Net: a straight-through confidence (p_t at a boundary, 1 - p_t elsewhere; exactly 1 in the
forward pass) scales what each byte reads of its context, and the backbone outputs are
smoothed over units, o~_j = P_j o_j + (1 - P_j) o~_{j-1}. A compression loss holds the mean
bytes per unit at `chunk_target` (`chunk_loss`: H-Net's ratio loss, or FLEXITOKENS' bound).
Generation and the byte view decide each boundary from the same router as the byte arrives.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from flax import nnx

from data import encoders, hat_data, words
from models import layers, token_lm
from models.layers import Dense, Embed, _normal
from models.transformer import Transformer

Array = jax.Array
# ByteEncoder ids (data/encoders.py owns them). The vocabulary is padded past these for the
# head's shape; generation never emits the padding ids (they are not bytes).
BYTE_OFFSET = encoders.BYTE_OFFSET
NUM_IDS = encoders.BYTE_IDS


def default_model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # backbone (word level)
  c.d_model = 128
  c.num_layers = 2
  c.num_heads = 4
  c.num_kv_heads = 4
  c.head_dim = 32
  c.mlp_dim = 384
  # byte encoder / decoder (byte level, shared width)
  c.byte_d_model = 64
  c.byte_heads = 4
  c.byte_mlp_dim = 192
  c.enc_layers = 1
  c.dec_layers = 1
  c.byte_window = 64       # sliding window of the byte encoder and decoder
  c.pooling = 'query'      # 'query' | 'last' | 'boundary' (word-boundary tokens in the stream)
  c.boundary_id = 259      # the boundary token's id (pooling='boundary'): a free id of the byte
                           # vocabulary, [259, 384); 0-2 are pad/bos/eos, 3-258 the bytes
  c.encoder_attention = 'causal'  # 'causal' (sliding window over the stream) | 'word'
                                  # (bidirectional within each word, never across words)
  c.chunking = 'splitter'  # 'splitter': the units are data.splitter's words | 'learned': a
                           # routing module on the byte encoder's states cuts them (H-Net; the
                           # module doc, "Learned chunking")
  c.chunk_target = 6.0     # learned: the target mean bytes per unit (> 1)
  c.chunk_loss = 'ratio'   # learned: 'ratio' (H-Net's ratio loss, toward the target) |
                           # 'bounded' (FLEXITOKENS: a hinge, only on units shorter than it)
  c.chunk_loss_weight = 1.0  # learned: the compression loss's weight beside the byte NLL
                            # (H-Net's 0.03 lets the units swing between one per byte and one
                            # per row in the tiny preset's short runs; docs/hat.md)
  c.rope_base = 10_000.0
  c.remat = 'none'
  c.scan_layers = False    # lax.scan over each stack's layers (compile time flat in depth)
  layers.attention_config_keys(c)  # attention_impl: 'auto' | xla | blocked | cudnn | splash
  c.init_std = 0.02
  return c


POOLINGS = ('query', 'last', 'boundary')
ENCODER_ATTENTION = ('causal', 'word')
CHUNKINGS = ('splitter', 'learned')
CHUNK_LOSSES = ('ratio', 'bounded')


def check_chunking(m: ml_collections.ConfigDict) -> str:
  """`model.chunking`, checked with the keys it reads (a ValueError naming the key): with
  'learned', a compression target > 1 byte per unit, a known loss, and a HAT whose units the
  router may cut (no boundary tokens, which come from a splitter; the causal encoder, since
  the intra-word encoder needs the units before it runs)."""
  chunking = m.get('chunking', 'splitter')
  if chunking not in CHUNKINGS:
    raise ValueError(f'model.chunking={chunking!r}: expected one of {CHUNKINGS}')
  if chunking == 'splitter':
    return chunking
  target = m.get('chunk_target', 6.0)
  if (not isinstance(target, (int, float)) or isinstance(target, bool)
      or not np.isfinite(target) or target <= 1):
    raise ValueError(f'model.chunk_target={target!r}: the compression target is the mean bytes '
                     'per unit and must be a finite number > 1 (1 would make every byte a unit; '
                     "H-Net's ratio loss divides by target - 1)")
  loss = m.get('chunk_loss', 'ratio')
  if loss not in CHUNK_LOSSES:
    raise ValueError(f'model.chunk_loss={loss!r}: expected one of {CHUNK_LOSSES} (ratio: '
                     "H-Net's, toward the target; bounded: FLEXITOKENS', a hinge)")
  weight = m.get('chunk_loss_weight', 1.0)
  if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
    raise ValueError(f'model.chunk_loss_weight={weight!r}: must be finite and >= 0')
  if m.pooling == 'boundary':
    raise ValueError("model.chunking='learned' with model.pooling='boundary': boundary tokens "
                     "mark a splitter's words in the stream; learned units need pooling "
                     "'query' or 'last'")
  if m.get('encoder_attention', 'causal') != 'causal':
    raise ValueError("model.chunking='learned' needs model.encoder_attention='causal': the "
                     'router reads the causal encoder, and the intra-word encoder needs the '
                     'units before it runs')
  return chunking


class HAT(nnx.Module):

  def __init__(self, m: ml_collections.ConfigDict, vocab_size: int, dtype: Any = jnp.float32,
               *, rngs: nnx.Rngs, max_units: int | None = None, max_unit_bytes: int = 16):
    """`max_units`, `max_unit_bytes` (learned chunking only): the units per row of a training
    batch (data.max_words; None: one per byte) and the bytes a 'query' pooling reads of each
    (the last ones; data.max_word_bytes)."""
    self.learned = check_chunking(m) == 'learned'
    if self.learned:
      self.max_units, self.max_unit_bytes = max_units, max_unit_bytes
      self.chunk_target = float(m.get('chunk_target', 6.0))
      self.chunk_loss = m.get('chunk_loss', 'ratio')
      self.chunk_loss_weight = float(m.get('chunk_loss_weight', 1.0))
    if m.pooling not in POOLINGS:
      raise ValueError(f'model.pooling={m.pooling!r}: expected one of {POOLINGS}')
    attention = m.get('encoder_attention', 'causal')
    if attention not in ENCODER_ATTENTION:
      raise ValueError(f'model.encoder_attention={attention!r}: expected one of '
                       f'{ENCODER_ATTENTION}')
    self.word_encoder = attention == 'word'
    self.boundary_id = (hat_data.check_boundary_id(m.get('boundary_id', 259), vocab_size)
                        if m.pooling == 'boundary' else None)
    de, d = m.byte_d_model, m.d_model
    if de % m.byte_heads:
      raise ValueError(f'model.byte_d_model={de} is not divisible by model.byte_heads')
    kb = de // m.byte_heads
    impl = layers.AttentionConfig.from_model_config(m)
    self.dtype, self.pooling, self.vocab_size = dtype, m.pooling, vocab_size
    common = dict(rope_base=m.rope_base, dtype=dtype, remat=m.remat, attention_impl=impl,
                  init_std=m.init_std, scan_layers=m.get('scan_layers', False), rngs=rngs)
    self.embed = Embed(vocab_size, de, dtype=dtype, init_std=m.init_std, rngs=rngs)
    self.encoder = Transformer(m.enc_layers, de, m.byte_heads, m.byte_heads, kb, m.byte_mlp_dim,
                               window=m.byte_window, causal=not self.word_encoder, **common)
    if m.pooling == 'query':
      self.pool_heads, self.pool_head_dim = m.byte_heads, kb
      self.pool_query = nnx.Param(_normal(rngs, (m.byte_heads, kb), m.init_std),
                                  out_sharding=('heads', 'head_dim'))
      self.pool_k = Dense(de, de, axes=('embed', 'heads'), dtype=dtype, init_std=m.init_std,
                          rngs=rngs)
      self.pool_v = Dense(de, de, axes=('embed', 'heads'), dtype=dtype, init_std=m.init_std,
                          rngs=rngs)
    self.pool_out = Dense(de, d, axes=('heads', 'embed'), dtype=dtype, init_std=m.init_std,
                          rngs=rngs)
    self.backbone = Transformer(m.num_layers, d, m.num_heads, m.num_kv_heads, m.head_dim,
                                m.mlp_dim, window=0, norm_eps=m.get('norm_eps', 1e-6), **common)
    self.first_word = nnx.Param(_normal(rngs, (d,), m.init_std), out_sharding=('embed',))
    self.decoder = Transformer(m.dec_layers, de, m.byte_heads, m.byte_heads, kb,
                               m.byte_mlp_dim, window=m.byte_window, context_dim=d, **common)
    self.head = Dense(de, vocab_size, axes=('embed', 'vocab'), dtype=dtype,
                      init_std=m.init_std, rngs=rngs)
    if self.learned:  # H-Net's routing module: q, k projections, initialized to the identity
      self.router_q = Dense(de, de, axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
      self.router_k = Dense(de, de, axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
      self.router_q.kernel[...] = jnp.eye(de, dtype=jnp.float32)
      self.router_k.kernel[...] = jnp.eye(de, dtype=jnp.float32)

  # -- pieces (also used one step at a time by cached generation) -------------------------------
  def encode(self, tokens_BxT, positions_BxT, segment_ids_BxT=None, cache=None, cache_index=None):
    """The causal encoder over the stream (`encoder_attention='causal'`)."""
    return self.encoder(self.embed(tokens_BxT), positions_BxT, segment_ids_BxT, cache,
                        cache_index)

  def encode_words(self, tokens_BxT, positions_BxT, word_ids_BxT) -> Array:
    """The intra-word encoder (`encoder_attention='word'`): bidirectional attention among the
    bytes that share a word id (>= 0; -1 bytes attend only among themselves and are never
    read). Whole words or blocks of them: it has no cache."""
    word_key_BxT = jnp.where(word_ids_BxT >= 0, word_ids_BxT + 1, 0)
    return self.encoder(self.embed(tokens_BxT), positions_BxT, word_key_BxT)[0]

  def pool_finished(self, h_1xSxD, ids_1xS, gather_1xWxL) -> Array:
    """Word vectors [1, W, D] of finished words during generation: from the causal encoder's
    states `h` (written as the bytes arrived), or, with the intra-word encoder, by encoding
    each word's ids (`ids`, gathered) as one block now that the word is complete."""
    if not self.word_encoder:
      return self.pool(h_1xSxD, gather_1xWxL)
    _, w, l = gather_1xWxL.shape
    valid_WxL = gather_1xWxL[0] >= 0
    ids_WxL = jnp.where(valid_WxL, jnp.take(ids_1xS[0], jnp.maximum(gather_1xWxL[0], 0)), 0)
    h_WxLxD = self.encode_words(ids_WxL, jnp.maximum(gather_1xWxL[0], 0),
                                jnp.where(valid_WxL, 0, -1))
    slots = jnp.where(valid_WxL, jnp.arange(l, dtype=jnp.int32), -1)
    return jax.vmap(lambda h, g: self.pool(h[None], g[None, None])[0, 0])(h_WxLxD, slots)[None]

  def allowed_ids(self, ids_S, t, cur_start, cap: int) -> Array:
    """bool [V]: the ids generation may emit at position t (the current word started at
    `cur_start`): the bytes and specials, and with boundary tokens the boundary, except bytes
    that would make the word longer than `cap` bytes (the boundary must come first, as the
    splitter's cap puts it in the training data)."""
    v = jnp.arange(self.vocab_size)
    ok_V = v < NUM_IDS
    if self.boundary_id is None:
      return ok_V
    ok_V |= v == self.boundary_id
    first = ids_S[cur_start]
    n_bytes = t - cur_start - (first == self.boundary_id).astype(jnp.int32)
    need_V = jnp.asarray(np.concatenate([np.zeros(BYTE_OFFSET, np.int32), words._NEED.astype(  # pylint: disable=protected-access
        np.int32), np.zeros(self.vocab_size - NUM_IDS, np.int32)]))
    full_V = (need_V > 0) & (n_bytes + need_V > cap) & (first >= BYTE_OFFSET)
    return ok_V & ~full_V

  def decoder_input(self, tokens_BxT, h_BxTxD) -> Array:
    """What the byte decoder reads per byte: the causal encoder's states, or with the intra-word
    encoder the byte embeddings (it must not read states that saw later bytes of the word)."""
    return self.embed(tokens_BxT) if self.word_encoder else h_BxTxD

  def pool(self, h_BxTxD: Array, gather_BxWxL: Array, project_first: bool | None = None
           ) -> Array:
    """Word vectors [B, W, D] from the encoder states of each word's bytes (-1 = no byte).

    Keys and values are linear in the byte states, so they are projected where that is
    cheaper: over the T bytes of the row, then gathered (training: W * Lw gathered slots are
    several times T), or over the gathered slots (generation: one word's Lw bytes of a long
    row). Both orders give the same numbers; `project_first` forces one (None: by shape)."""
    valid_BxWxL = gather_BxWxL >= 0
    idx_BxWxL = jnp.maximum(gather_BxWxL, 0)
    b, w, l = idx_BxWxL.shape
    if self.pooling in ('last', 'boundary'):
      last_BxW = jnp.maximum(valid_BxWxL.sum(-1) - 1, 0)
      pos_BxW = jnp.take_along_axis(idx_BxWxL, last_BxW[..., None], axis=-1)[..., 0]
      if self.pooling == 'boundary':  # see the module doc: opening or closing boundary token
        pos_BxW = (idx_BxWxL[..., 0] if self.word_encoder
                   else jnp.minimum(pos_BxW + 1, h_BxTxD.shape[1] - 1))
      x_BxWxD = jnp.take_along_axis(h_BxTxD, pos_BxW[..., None], axis=1)
      return self.pool_out(x_BxWxD)
    h, k = self.pool_heads, self.pool_head_dim
    gather = lambda x_BxTxF: jnp.take_along_axis(
        x_BxTxF, idx_BxWxL.reshape(b, w * l)[..., None], axis=1).reshape(b, w, l, h, k)
    if project_first is None:
      project_first = w * l >= h_BxTxD.shape[1]
    if project_first:              # project the row, gather the projections
      k_BxWxLxHxK, v_BxWxLxHxK = gather(self.pool_k(h_BxTxD)), gather(self.pool_v(h_BxTxD))
    else:                          # gather the bytes, project the gathered slots
      x_BxWLxD = jnp.take_along_axis(h_BxTxD, idx_BxWxL.reshape(b, w * l)[..., None], axis=1)
      k_BxWxLxHxK = self.pool_k(x_BxWLxD).reshape(b, w, l, h, k)
      v_BxWxLxHxK = self.pool_v(x_BxWLxD).reshape(b, w, l, h, k)
    q_HxK = self.pool_query[...].astype(self.dtype)
    s_BxWxHxL = jnp.einsum('hk,bwlhk->bwhl', q_HxK, k_BxWxLxHxK,
                           preferred_element_type=jnp.float32) * k ** -0.5
    s_BxWxHxL = jnp.where(valid_BxWxL[:, :, None, :], s_BxWxHxL, -1e30)
    p_BxWxHxL = jax.nn.softmax(s_BxWxHxL, axis=-1).astype(self.dtype)
    o_BxWxHxK = jnp.einsum('bwhl,bwlhk->bwhk', p_BxWxHxL, v_BxWxLxHxK)
    return self.pool_out(o_BxWxHxK.reshape(b, w, h * k))

  def previous_word_context(self, out_BxWxD: Array, word_segment_ids_BxW: Array) -> Array:
    """c[j] = backbone output of word j-1 of the same document, else the first-word vector."""
    first_D = self.first_word[...].astype(out_BxWxD.dtype)
    prev_BxWxD = jnp.concatenate(
        [jnp.broadcast_to(first_D, out_BxWxD[:, :1].shape), out_BxWxD[:, :-1]], axis=1)
    same_BxW = jnp.concatenate(
        [jnp.zeros_like(word_segment_ids_BxW[:, :1], bool),
         word_segment_ids_BxW[:, 1:] == word_segment_ids_BxW[:, :-1]], axis=1)
    return jnp.where(same_BxW[..., None], prev_BxWxD, first_D)

  def decode(self, h_BxTxD, positions_BxT, segment_ids_BxT, context_BxWxD, word_ids_BxT,
             cache=None, cache_index=None, scale_BxT=None):
    """`scale_BxT`: a factor on what each byte reads of its context (learned chunking's
    straight-through confidence, 1 in the forward pass)."""
    context = ((context_BxWxD, word_ids_BxT) if scale_BxT is None
               else (context_BxWxD, word_ids_BxT, scale_BxT))
    y_BxTxD, cache = self.decoder(h_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_index,
                                  context=context)
    return self.head(y_BxTxD, out_dtype=jnp.float32), cache

  # -- learned chunking (H-Net) ----------------------------------------------------------------
  def route(self, h_BxTxD: Array, h_prev_BxTxD: Array, start_BxT: Array) -> Array:
    """fp32 boundary probabilities [B, T]: p_t = (1 - cos(q(h_t), k(h_{t-1}))) / 2 from the
    encoder states of byte t and the byte before it (`h_prev`); 1 where `start` (a document's
    first byte, always a boundary)."""
    q_BxTxD = self.router_q(h_BxTxD, out_dtype=jnp.float32)
    k_BxTxD = self.router_k(h_prev_BxTxD, out_dtype=jnp.float32)
    cos_BxT = jnp.sum(q_BxTxD * k_BxTxD, -1) * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(q_BxTxD ** 2, -1) * jnp.sum(k_BxTxD ** 2, -1), 1e-12))
    return jnp.where(start_BxT, 1.0, jnp.clip((1.0 - cos_BxT) / 2, 0.0, 1.0))

  def boundaries(self, h_BxTxD: Array, segment_ids_BxT: Array) -> tuple[Array, Array]:
    """(p [B, T] fp32, b [B, T] bool): the router over a row; b_t = p_t >= 1/2, byte t starts
    a unit. Depends on bytes <= t only (the encoder is causal)."""
    seg = segment_ids_BxT
    start_BxT = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    h_prev_BxTxD = jnp.concatenate([jnp.zeros_like(h_BxTxD[:, :1]), h_BxTxD[:, :-1]], 1)
    p_BxT = self.route(h_BxTxD, h_prev_BxTxD, start_BxT)
    return p_BxT, p_BxT >= 0.5

  def unit_layout(self, b_BxT: Array, segment_ids_BxT: Array, w: int, lw: int) -> dict:
    """Static-shape units of a row from its boundaries: at most `w` per row (the bytes of
    further units join unit w - 1, so they still read the context of a finished unit); each
    unit is pooled from its last `lw` bytes at most. Returns unit_ids [B, T] (the unit of each
    byte), gather [B, W, Lw] (-1: none; valid slots first), start [B, W] (T: no unit),
    segment_ids and positions [B, W] (0: no unit; positions inside the document), overflow
    [B, T] (bytes of units past w)."""
    bsz, t = b_BxT.shape
    raw_BxT = jnp.cumsum(b_BxT.astype(jnp.int32), axis=1) - 1
    t_T = jnp.arange(t, dtype=jnp.int32)
    rows = jnp.arange(bsz)[:, None]
    start_BxW = jnp.full((bsz, w), t, jnp.int32).at[
        rows, jnp.where(b_BxT, raw_BxT, w)].min(jnp.broadcast_to(t_T, (bsz, t)), mode='drop')
    end_BxW = jnp.concatenate([start_BxW[:, 1:], jnp.full((bsz, 1), t, jnp.int32)], 1)
    valid_BxW = start_BxW < t
    first_BxW = jnp.maximum(start_BxW, end_BxW - lw)
    pos_BxWxL = first_BxW[..., None] + jnp.arange(lw, dtype=jnp.int32)
    gather_BxWxL = jnp.where((pos_BxWxL < end_BxW[..., None]) & valid_BxW[..., None], pos_BxWxL,
                            -1)
    useg_BxW = jnp.where(valid_BxW, jnp.take_along_axis(
        segment_ids_BxT, jnp.minimum(start_BxW, t - 1), axis=1), 0)
    j_W = jnp.arange(w, dtype=jnp.int32)
    new_doc_BxW = jnp.concatenate([jnp.ones((bsz, 1), bool),
                                   useg_BxW[:, 1:] != useg_BxW[:, :-1]], 1)
    upos_BxW = j_W - jax.lax.cummax(jnp.where(new_doc_BxW, j_W, 0), axis=1)
    return {'unit_ids': jnp.minimum(raw_BxT, w - 1), 'gather': gather_BxWxL, 'start': start_BxW,
            'segment_ids': useg_BxW, 'positions': upos_BxW, 'overflow': raw_BxT >= w}

  @staticmethod
  def smooth(out_BxWxD: Array, p_BxW: Array) -> Array:
    """H-Net's smoothing over units: o~_j = P_j o_j + (1 - P_j) o~_{j-1}, P_j the boundary
    probability at unit j's first byte (1 at a document's first unit, which resets it). A
    unit cut with little confidence leans on the one before; gradients reach P."""
    a_BxWx1 = (1.0 - p_BxW)[..., None].astype(out_BxWxD.dtype)
    b_BxWxD = p_BxW[..., None].astype(out_BxWxD.dtype) * out_BxWxD

    def combine(x, y):
      return x[0] * y[0], y[0] * x[1] + y[1]

    return jax.lax.associative_scan(combine, (a_BxWx1, b_BxWxD), axis=1)[1]

  @staticmethod
  def confidence_scale(p_BxT: Array, b_BxT: Array) -> Array:
    """H-Net's straight-through confidence: c_t = p_t at a boundary, 1 - p_t elsewhere; the
    factor is exactly 1 in the forward pass and has the gradient of c_t."""
    c_BxT = jnp.where(b_BxT, p_BxT, 1.0 - p_BxT)
    return 1.0 + (c_BxT - jax.lax.stop_gradient(c_BxT))

  def chunked(self, batch: dict[str, Array], max_units: int | None = None) -> dict:
    """The learned-chunking forward: {'logits' [B, T, V] fp32, 'p' [B, T], 'b' [B, T],
    'overflow' [B, T]}. Units per row: `max_units`, else the model's, else one per byte.

    Byte t of unit j reads the (smoothed) backbone output of unit j - 1, the latest unit that
    ended before it: unit j - 1 is pooled from its bytes, and its end is decided at byte t's
    unit's first byte s_j <= t from bytes <= s_j. So logits at t depend on bytes <= t only."""
    seg = batch['segment_ids']
    h_BxTxD, _ = self.encode(batch['inputs'], batch['positions'], seg)
    p_BxT, b_BxT = self.boundaries(h_BxTxD, seg)
    w = max_units or self.max_units or seg.shape[1]
    lay = self.unit_layout(b_BxT, seg, w, self.max_unit_bytes)
    w_BxWxD = self.pool(h_BxTxD, lay['gather'])
    out_BxWxD, _ = self.backbone(w_BxWxD, lay['positions'], lay['segment_ids'])
    p_BxW = jnp.where(lay['segment_ids'] > 0, jnp.take_along_axis(
        p_BxT, jnp.minimum(lay['start'], seg.shape[1] - 1), axis=1), 1.0)
    c_BxWxD = self.previous_word_context(self.smooth(out_BxWxD, p_BxW), lay['segment_ids'])
    # bytes of units past the row's last slot read that slot's context, or, from another
    # document than that slot's, the first-unit vector (one more slot)
    c_BxWxD = jnp.concatenate([c_BxWxD, jnp.broadcast_to(
        self.first_word[...].astype(c_BxWxD.dtype), c_BxWxD[:, :1].shape)], 1)
    unit_BxT = lay['unit_ids']
    other_doc_BxT = seg != jnp.take_along_axis(lay['segment_ids'], unit_BxT, axis=1)
    unit_BxT = jnp.where(lay['overflow'] & other_doc_BxT, w, unit_BxT)
    logits, _ = self.decode(h_BxTxD, batch['positions'], seg, c_BxWxD, unit_BxT,
                            scale_BxT=self.confidence_scale(p_BxT, b_BxT))
    return {'logits': logits, 'p': p_BxT, 'b': b_BxT, 'overflow': lay['overflow']}

  def __call__(self, batch: dict[str, Array]) -> Array:
    """fp32 next-byte logits [B, T, V] for a packed HAT batch (see data/hat_data.py; with
    learned chunking only inputs, positions and segment ids are read)."""
    if self.learned:
      return self.chunked(batch)['logits']
    if self.word_encoder:
      h_BxTxD = self.encode_words(batch['inputs'], batch['positions'], batch['word_ids'])
    else:
      h_BxTxD, _ = self.encode(batch['inputs'], batch['positions'], batch['segment_ids'])
    w_BxWxD = self.pool(h_BxTxD, batch['word_gather'])
    out_BxWxD, _ = self.backbone(w_BxWxD, batch['word_positions'], batch['word_segment_ids'])
    c_BxWxD = self.previous_word_context(out_BxWxD, batch['word_segment_ids'])
    logits, _ = self.decode(self.decoder_input(batch['inputs'], h_BxTxD), batch['positions'],
                            batch['segment_ids'], c_BxWxD, batch['word_ids'])
    return logits


def compression_loss(p_BxT: Array, b_BxT: Array, mask_BxT: Array, target: float,
                     kind: str = 'ratio') -> Array:
  """The compression loss of learned chunking over the real positions (`mask`), target N
  bytes per unit (`target`), `kind`:
  'ratio' (H-Net): N/(N-1) ((N-1) F G + (1-F)(1-G)), F the fraction of hard boundaries and G
  the mean probability (F is constant to the gradient; the minimum, 1, is at F = G = 1/N);
  'bounded' (FLEXITOKENS): a hinge on each row's mean probability above 1/N, in units of 1/N
  (zero when units are at least N bytes long on average: a bound, not a fixed rate)."""
  n = float(target)
  m_BxT = mask_BxT.astype(jnp.float32)
  if kind == 'ratio':
    count = jnp.maximum(m_BxT.sum(), 1.0)
    f = jnp.sum(b_BxT * m_BxT) / count
    g = jnp.sum(p_BxT * m_BxT) / count
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))
  count_B = m_BxT.sum(1)
  rate_B = jnp.sum(p_BxT * m_BxT, 1) / jnp.maximum(count_B, 1.0)
  excess_B = jax.nn.relu(rate_B - 1.0 / n) * n
  return jnp.sum(excess_B * (count_B > 0)) / jnp.maximum(jnp.sum(count_B > 0), 1)


def hat_loss(model: HAT, batch: dict[str, Array], rng: Array | None = None):
  """(mean NLL over real targets, sums {'nll_sum', 'n_tokens', 'n_bytes'}); with learned
  chunking the loss adds the weighted compression loss and the sums the chunk_* counts of
  `chunk_metrics`."""
  del rng
  extra = {}
  if model.learned:
    out = model.chunked(batch)
    logits_BxTxV = out['logits']
    mask_BxT = batch['segment_ids'] > 0
    chunk = compression_loss(out['p'], out['b'], mask_BxT, model.chunk_target,
                             model.chunk_loss)
    aux = model.chunk_loss_weight * chunk
    m_BxT = mask_BxT.astype(jnp.float32)
    extra = {'chunk_units': jnp.sum(out['b'] * m_BxT), 'chunk_positions': jnp.sum(m_BxT),
             'chunk_overflow_sum': jnp.sum(out['overflow'] * m_BxT),
             'chunk_loss_sum': chunk, 'chunk_batches': jnp.float32(1.0)}
  else:
    logits_BxTxV = model(batch)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  tgt_BxT = jnp.take_along_axis(logits_BxTxV, batch['targets'][..., None], axis=-1)[..., 0]
  w_BxT = batch['weights'].astype(jnp.float32)
  nll_sum = jnp.sum((lse_BxT - tgt_BxT) * w_BxT)
  n = jnp.sum(w_BxT)
  loss = nll_sum / jnp.maximum(n, 1.0)
  if model.learned:
    loss = loss + aux
  return loss, {
      'nll_sum': nll_sum, 'n_tokens': n,
      'n_bytes': jnp.sum(batch['target_bytes'].astype(jnp.float32)), **extra}


def chunk_metrics(sums: dict) -> dict:
  """Learned chunking's metrics from `hat_loss`'s sums: bytes_per_unit (the compression
  reached: real positions per unit, bos and eos included), chunk_loss (the compression loss,
  mean over batches) and chunk_overflow (the fraction of positions in units past the row's
  max_units, which read a stale context)."""
  out = {}
  if sums.get('chunk_units'):
    out['bytes_per_unit'] = sums['chunk_positions'] / sums['chunk_units']
  if sums.get('chunk_batches'):
    out['chunk_loss'] = sums['chunk_loss_sum'] / sums['chunk_batches']
  if sums.get('chunk_positions'):
    out['chunk_overflow'] = sums['chunk_overflow_sum'] / sums['chunk_positions']
  return out


def flops_per_byte(m: ml_collections.ConfigDict, vocab_size: int, seq_len: int,
                   max_words: int, max_word_bytes: int) -> float:
  """Training FLOPs per byte position (forward + backward, MaxText convention), from the
  static shapes: every row spends compute on T byte positions and W word positions.

    byte stacks (encoder + decoder, L_b = enc_layers + dec_layers, width De, MLP Fb):
      6 * L_b * (4*De^2 + 3*De*Fb) + 12 * L_b * De * S(window)  + 6 * De * V   (byte head)
    pooling per byte ('query'): 6 * 2*De^2 * min(1, W*Lw/T) (keys and values, projected over
      the row's T bytes or over the W*Lw gathered slots, whichever is fewer; see `HAT.pool`);
      per word: 6 * De*D (pool_out)
    backbone per word: 6 * L * (D*H*K + 2*D*G*K + H*K*D + 3*D*F) + 12 * L * H*K * W/2
    decoder cross-attention per word (projected at the word level): 6 * L_dec * (D*De + De*De)
  and the word terms are scaled by W/T word positions per byte position.
  S(w) is the mean number of keys a query sees: T/2 causal, w*(1 - w/2T) for a window w < T;
  the intra-word encoder (`encoder_attention='word'`) sees at most the Lw bytes of its word.
  With `pooling='boundary'` the T positions include the boundary tokens and Lw = the word cap
  + 1 (`max_word_bytes` here is the gather width). Learned chunking adds the router's two
  projections per byte, 6 * 2*De^2 (W, Lw: the unit slots and the bytes pooled per unit).
  """
  de, fb, d = m.byte_d_model, m.byte_mlp_dim, m.d_model
  t, w = seq_len, max_words

  def s_eff(window, length):
    return length / 2 if (window <= 0 or window >= length) else window * (1 - window / (2 * length))

  lb = m.enc_layers + m.dec_layers
  s_enc = (max_word_bytes if m.get('encoder_attention', 'causal') == 'word'
           else s_eff(m.byte_window, t))
  byte = 6 * lb * (4 * de * de + 3 * de * fb) + 12 * m.enc_layers * de * s_enc
  byte += 12 * m.dec_layers * de * s_eff(m.byte_window, t)
  byte += 6 * de * vocab_size
  if m.pooling == 'query':
    byte += 6 * 2 * de * de * min(1.0, w * max_word_bytes / t)
  if m.get('chunking', 'splitter') == 'learned':  # the router's q and k projections
    byte += 6 * 2 * de * de
  hk, gk = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  word = 6 * m.num_layers * (d * hk + 2 * d * gk + hk * d + 3 * d * m.mlp_dim)
  word += 12 * m.num_layers * hk * s_eff(0, w)
  word += 6 * de * d + 6 * m.dec_layers * (d * de + de * de)
  return float(byte + word * w / t)


# -- generation --------------------------------------------------------------------------------
class _Steps:
  """Jitted single-step pieces of a HAT for cached generation (compiled once per model)."""

  def __init__(self, model: HAT, max_len: int, max_word_bytes: int):
    graphdef, state = nnx.split(model)
    self.state = state
    self.max_len, self.lw = max_len, max_word_bytes

    @jax.jit
    def enc_step(state, x_1x1, t, cache):
      m = nnx.merge(graphdef, state)
      pos = jnp.full((1, 1), t, jnp.int32)
      h, cache = m.encode(x_1x1, pos, jnp.ones((1, 1), jnp.int32), cache, t)
      return h, cache

    @jax.jit
    def word_step(state, h_all_1xSxD, ids_1xS, gather_1x1xL, j, cache):
      m = nnx.merge(graphdef, state)
      w_1x1xD = m.pool_finished(h_all_1xSxD, ids_1xS, gather_1x1xL)
      pos = jnp.full((1, 1), j, jnp.int32)
      out, cache = m.backbone(w_1x1xD, pos, jnp.ones((1, 1), jnp.int32), cache, j)
      return out, cache

    @jax.jit
    def dec_step(state, h_1x1xD, x_1x1, t, ctx_1x1xD, cache):
      m = nnx.merge(graphdef, state)
      pos = jnp.full((1, 1), t, jnp.int32)
      logits, cache = m.decode(m.decoder_input(x_1x1, h_1x1xD), pos, jnp.ones((1, 1), jnp.int32),
                               ctx_1x1xD, jnp.zeros((1, 1), jnp.int32), cache, t)
      return logits[0, 0], cache

    self.enc_step, self.word_step, self.dec_step = enc_step, word_step, dec_step
    self.first_word = model.first_word[...].astype(model.dtype).reshape(1, 1, -1)
    self.enc_cache = None if model.word_encoder else model.encoder.init_cache(1, max_len)
    self.bb_cache = model.backbone.init_cache(1, max_len)
    self.dec_cache = model.decoder.init_cache(1, max_len)


@jax.jit
def _pick(logits_V: Array, temperature, top_p, key, allowed_V=None) -> Array:
  """One id from a byte head's logits (the padding ids past NUM_IDS never drawn; `allowed_V`:
  the ids that may be drawn)."""
  ok_V = jnp.arange(logits_V.shape[0]) < NUM_IDS if allowed_V is None else allowed_V
  logits_V = jnp.where(ok_V, logits_V, -jnp.inf)
  return token_lm.sample_logits(logits_V[None], temperature, top_p, key)[0]


def generate(model: HAT, prompt_ids: list[int], splitter: words.Splitter, max_new: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_id: int | None = None, max_word_bytes: int = 16,
             forced: list[int] = ()) -> list[int]:
  """Word-by-word generation with three KV caches (encoder, backbone, decoder).

  `prompt_ids`: ByteEncoder ids starting with bos (specials are words of their own);
  `splitter`: the model's word splitter (its cap <= `max_word_bytes`, the pooling width). Each
  new byte goes through the encoder (cache); when the splitter says a new word began, the
  finished word is pooled and the backbone advances one step, and the decoder (re-)reads the new
  word's bytes with the new context: a word start can be decided up to 2 bytes late (a
  multi-byte whitespace character), and those decoder cache entries are overwritten. For
  splitters with a device rule (whitespace, spacebyte, fixed:N) the whole loop -- sampling
  included -- is one jitted `lax.while_loop` (the prompt prefilled in three batched calls);
  `unicode` runs the same steps driven from the host; entropy patches (`words.EntropySplitter`)
  step their patcher, a byte LM with its own KV cache, beside the HAT in the same loop. Equals uncached greedy decoding byte for
  byte (tests/test_hat.py). Returns the new ids, up to and including `stop_id`. `forced`: ids
  emitted first, through the loop (teacher forcing; device path only), then sampling goes on.
  """
  if model.learned:  # the router cuts the units: no splitter
    return _generate_learned(model, prompt_ids, max_new, temperature, top_p, seed, stop_id,
                             forced)
  if (model.boundary_id is not None) != isinstance(splitter, hat_data.BoundaryWords):
    raise ValueError('a HAT with word-boundary tokens generates with hat_data.BoundaryWords '
                     '(and without them with a text splitter)')
  if not 0 < splitter.word_cap <= max_word_bytes:
    raise ValueError(f'{splitter!r}: generation needs a word cap in [1, max_word_bytes='
                     f'{max_word_bytes}] (every word must fit the pooling width)')
  if max_new <= 0:
    return []
  if len(forced) > max_new:
    raise ValueError(f'{len(forced)} forced ids exceed max_new={max_new}')
  if not splitter.device_split:
    if len(forced):
      raise ValueError(f'forced ids need a splitter with a device rule, not {splitter!r}')
    split_ids = functools.partial(host_word_starts, splitter, max_word_bytes)
    return _generate_host(model, prompt_ids, split_ids, max_new, temperature, top_p, seed,
                          stop_id, max_word_bytes)
  prompt = np.asarray(prompt_ids, np.int32)
  p, size = len(prompt), len(prompt) + max_new
  starts = host_word_starts(splitter, max_word_bytes, prompt)
  starts_W = np.zeros(size + 1, np.int32)
  starts_W[:len(starts)] = starts
  forced_N = np.full(max_new, -1, np.int32)
  forced_N[:len(forced)] = forced
  graphdef, state = nnx.split(model)
  out, n = _generate_device(
      graphdef, state, jnp.asarray(prompt[None]), jnp.asarray(forced_N), jnp.asarray(starts_W),
      jnp.asarray(words.word_ids(starts, p)[None], jnp.int32), jnp.int32(len(starts)),
      jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p),
      jnp.int32(-1 if stop_id is None else stop_id), splitter.device_args(), splitter=splitter,
      lw=max_word_bytes, max_new=max_new)
  return np.asarray(out)[:int(n)].tolist()


def incomplete_tail(ids) -> int:
  """Where a trailing incomplete UTF-8 character of ByteEncoder ids begins (its lead byte's
  index; len(ids) when the ids end on a character boundary, a special or an invalid byte)."""
  n = len(ids)
  for k in range(1, min(4, n) + 1):
    b = int(ids[n - k]) - BYTE_OFFSET
    if not 0 <= b < 256:
      return n
    if 0x80 <= b < 0xC0:  # a continuation byte: look further back for the lead byte
      continue
    return n - k if words._NEED_LIST[b] > k else n  # pylint: disable=protected-access
  return n


def host_word_starts(splitter: words.Splitter, max_word_bytes: int, ids) -> list[int]:
  """Word start offsets of one sequence of ByteEncoder ids (specials are words of their own);
  with `hat_data.BoundaryWords`, at the boundary tokens.

  A splitter that only the host can run (`device_split=False`: unicode, a per-character state
  machine) is causal on character boundaries only: split alone, the bytes of an unfinished
  character are invalid UTF-8, words of their own. So while the ids end inside a character,
  its bytes join the last word (or start one after a special) until it is complete, and byte
  by byte (generation, the byte-level view) the completed words never change. (The byte-
  pattern splitters decide byte by byte already, caps included, as on the device.)"""
  if isinstance(splitter, hat_data.BoundaryWords):
    return splitter.host_starts(ids)
  if not splitter.device_split:
    cut = incomplete_tail(ids)
    if cut < len(ids):
      starts = host_word_starts(splitter, max_word_bytes, ids[:cut]) if cut else []
      if not starts or int(ids[cut - 1]) < BYTE_OFFSET:
        starts.append(cut)
      return starts
  ids = np.asarray(ids, np.int32)
  layout = words.batch_words(ids, np.ones_like(ids), splitter, len(ids) or 1, max_word_bytes)
  return layout['word_start'][:int(layout['num_words'])].tolist()


@functools.partial(jax.jit, static_argnames=('graphdef', 'splitter', 'lw', 'max_new'))
def _generate_device(graphdef, state, prompt_1xP, forced_N, starts_W, word_ids_1xP, n_words, rng,
                     temperature, top_p, stop_id, split_args, *, splitter, lw, max_new):
  """The jitted generation loop of `generate` (one row). `starts_W`: the prompt's word starts,
  `n_words` of them (the last one is the current, unfinished word), zero padded. `split_args`:
  what the splitter's device rule reads (entropy patches: the patcher's weights; its KV cache
  rides in the loop's carry)."""
  model = nnx.merge(graphdef, state)
  p = prompt_1xP.shape[1]
  size = p + max_new
  ones = lambda n: jnp.ones((1, n), jnp.int32)
  at = lambda i: jnp.reshape(i, (1, 1)).astype(jnp.int32)
  slots_L = jnp.arange(lw, dtype=jnp.int32)

  def word_gather(a, b):  # [..., Lw] byte positions of the word [a, b), -1 padded
    return jnp.where(slots_L < (b - a)[..., None], a[..., None] + slots_L, -1)

  # prefill: encoder over the prompt, backbone over its complete words, decoder over its bytes
  word_enc = model.word_encoder
  enc_c = None if word_enc else model.encoder.init_cache(1, size)
  bb_c = model.backbone.init_cache(1, size)
  dec_c = model.decoder.init_cache(1, size)
  if word_enc:  # complete words only: the last word's states would change as it grows
    complete_ids = jnp.where(word_ids_1xP < n_words - 1, word_ids_1xP, -1)
    h_1xPxD = model.encode_words(prompt_1xP, jnp.arange(p)[None], complete_ids)
  else:
    h_1xPxD, enc_c = model.encode(prompt_1xP, jnp.arange(p)[None], ones(p), enc_c, 0)
  h_1xSxD = jnp.zeros((1, size, h_1xPxD.shape[-1]), h_1xPxD.dtype).at[:, :p].set(h_1xPxD)
  complete_P = jnp.arange(p) < n_words - 1  # slots past them hold garbage, overwritten later
  gather_1xPxL = jnp.where(complete_P[:, None], word_gather(starts_W[:p], starts_W[1:p + 1]),
                           -1)[None]
  out_1xPxD, bb_c = model.backbone(model.pool(h_1xSxD, gather_1xPxL), jnp.arange(p)[None],
                                   ones(p), bb_c, 0)
  first_D = model.first_word[...].astype(out_1xPxD.dtype)
  ctx_WxD = jnp.zeros((size + 1, first_D.shape[0]), out_1xPxD.dtype)
  ctx_WxD = ctx_WxD.at[0].set(first_D).at[1:p + 1].set(out_1xPxD[0])  # ctx[j]: out of word j-1
  logits_1xPxV, dec_c = model.decode(model.decoder_input(prompt_1xP, h_1xPxD),
                                     jnp.arange(p)[None], ones(p), ctx_WxD[None],
                                     word_ids_1xP, dec_c, 0)

  def cond(c):
    i, done = c[0], c[-1]
    return (i < max_new) & ~done

  def body(c):
    i, ids_S, h_1xSxD, ctx_WxD, starts_W, n, enc_c, bb_c, dec_c, split_c, logits_V, rng, out_N, \
        _ = c
    t = p + i
    rng, key = jax.random.split(rng)
    allowed_V = model.allowed_ids(ids_S, t, starts_W[n - 1], splitter.word_cap - 1)
    logits_V = jnp.where(allowed_V, logits_V, -jnp.inf)
    x = token_lm.sample_logits(logits_V[None], temperature, top_p, key)[0]
    x = jnp.where(forced_N[i] >= 0, forced_N[i], x)
    ids_S = ids_S.at[t].set(x)
    if not word_enc:
      h_1x1xD, enc_c = model.encode(at(x), at(t), ones(1), enc_c, t)
      h_1xSxD = jax.lax.dynamic_update_slice(h_1xSxD, h_1x1xD, (0, t, 0))
    s, split_c = splitter.device_step(split_args, split_c, ids_S, t, starts_W[n - 1],
                                      BYTE_OFFSET)

    def finish_word(args):  # the word [starts[n-1], s) is complete: one backbone step
      ctx_WxD, starts_W, n, bb_c = args
      gather_1x1xL = word_gather(starts_W[n - 1], s)[None, None]
      w_1x1xD = model.pool_finished(h_1xSxD, ids_S[None], gather_1x1xL)
      out_1x1xD, bb_c = model.backbone(w_1x1xD, at(n - 1), ones(1), bb_c, n - 1)
      return ctx_WxD.at[n].set(out_1x1xD[0, 0]), starts_W.at[n].set(s), n + 1, bb_c

    ctx_WxD, starts_W, n, bb_c = jax.lax.cond(s >= 0, finish_word, lambda a: a,
                                              (ctx_WxD, starts_W, n, bb_c))
    ctx_1x1xD = ctx_WxD[n - 1][None, None]

    def decode_at(q, c):  # bytes [rerun, t] all lie in the current word
      dec_c, _ = c
      h_q = model.decoder_input(jax.lax.dynamic_slice_in_dim(ids_S, q, 1)[None],
                                jax.lax.dynamic_slice_in_dim(h_1xSxD, q, 1, axis=1))
      logits_1x1xV, dec_c = model.decode(h_q, at(q), ones(1), ctx_1x1xD,
                                         jnp.zeros((1, 1), jnp.int32), dec_c, q)
      return dec_c, logits_1x1xV[0, 0]

    dec_c, logits_V = jax.lax.fori_loop(jnp.where(s >= 0, s, t), t + 1, decode_at,
                                        (dec_c, logits_V))
    return (i + 1, ids_S, h_1xSxD, ctx_WxD, starts_W, n, enc_c, bb_c, dec_c, split_c, logits_V,
            rng, out_N.at[i].set(x), x == stop_id)

  ids_S = jnp.zeros(size, jnp.int32).at[:p].set(prompt_1xP[0])
  split_c = splitter.device_init(split_args, prompt_1xP, size)
  carry = (jnp.int32(0), ids_S, h_1xSxD, ctx_WxD, starts_W, n_words, enc_c, bb_c, dec_c, split_c,
           logits_1xPxV[0, -1], rng, jnp.zeros(max_new, jnp.int32), jnp.bool_(False))
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[-2], carry[0]


def _generate_host(model: HAT, prompt_ids: list[int], split_ids, max_new: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   stop_id: int | None = None, max_word_bytes: int = 16) -> list[int]:
  """Host-driven form of `generate` for splitters that only decide on the host (`unicode`):
  one jitted call per byte and piece, the ids re-split in Python after every byte (by the
  splitter's causality only the last word can change; completed words are checked)."""
  ids = list(prompt_ids)
  max_len = len(ids) + max_new
  s = _Steps(model, max_len, max_word_bytes)
  key = jax.random.key(seed)
  h_all = jnp.zeros((1, max_len, model.encoder.final_norm.scale.shape[0]), model.dtype)
  contexts = [s.first_word]  # contexts[j]: what bytes of word j read (backbone out of word j-1)
  starts_done: list[int] = []  # word starts whose word was fed to the backbone (all but last)
  logits = None

  def run_decoder(t0: int):
    nonlocal logits
    starts = starts_done + [current_start()]
    for t in range(t0, len(ids)):
      j = int(np.searchsorted(starts, t, side='right') - 1)
      logits, s.dec_cache = s.dec_step(s.state, h_all[:, t:t + 1],
                                       jnp.full((1, 1), ids[t], jnp.int32), t, contexts[j],
                                       s.dec_cache)

  word_starts = [0]

  def current_start():
    return word_starts[-1]

  def advance(new_starts: list[int]) -> int | None:
    """Feeds completed words to the backbone; returns the earliest byte needing re-decoding."""
    nonlocal word_starts
    rerun = None
    while len(starts_done) < len(new_starts) - 1:
      j = len(starts_done)
      a, b = new_starts[j], new_starts[j + 1]
      if b - a > max_word_bytes:
        raise ValueError(f'a {b - a}-byte word exceeds max_word_bytes={max_word_bytes}')
      gather = np.full((1, 1, max_word_bytes), -1, np.int32)
      gather[0, 0, :b - a] = np.arange(a, b)
      ids_1xS = np.zeros((1, max_len), np.int32)
      ids_1xS[0, :len(ids)] = ids
      out, s.bb_cache = s.word_step(s.state, h_all, ids_1xS, gather, j, s.bb_cache)
      contexts.append(out)
      starts_done.append(a)
      rerun = b if rerun is None else min(rerun, b)
    word_starts = new_starts
    return rerun

  # prefill: encoder over the prompt, backbone over its complete words, decoder over all bytes
  for t, x in enumerate(ids):
    if model.word_encoder:
      break
    h, s.enc_cache = s.enc_step(s.state, jnp.full((1, 1), x, jnp.int32), t, s.enc_cache)
    h_all = h_all.at[:, t].set(h[:, 0])
  _check_prefix(word_starts, starts := list(split_ids(ids)))
  advance(starts)
  run_decoder(0)
  for _ in range(max_new):
    key, sub = jax.random.split(key)
    x = int(_pick(jnp.reshape(logits, (-1,)), jnp.float32(temperature), jnp.float32(top_p), sub))
    t = len(ids)
    ids.append(x)
    if not model.word_encoder:
      h, s.enc_cache = s.enc_step(s.state, jnp.full((1, 1), x, jnp.int32), t, s.enc_cache)
      h_all = h_all.at[:, t].set(h[:, 0])
    starts = list(split_ids(ids))
    _check_prefix(starts_done, starts)
    rerun = advance(starts)
    run_decoder(t if rerun is None else min(rerun, t))
    if stop_id is not None and x == stop_id:
      break
  return ids[len(prompt_ids):]


def _check_prefix(done: list[int], starts: list[int]):
  if starts[:len(done)] != done:
    raise RuntimeError(f'word splitter is not causal: completed word starts {done[-5:]} '
                       f'changed to {starts[:len(done)][-5:]}')


def generate_uncached(model: HAT, prompt_ids: list[int], splitter: words.Splitter, max_new: int,
                      max_word_bytes: int = 16) -> list[int]:
  """Greedy reference: a full forward over the whole sequence for every new byte (padded to
  one static shape, so it compiles once). With learned chunking the splitter is not read."""
  if model.learned:
    ids = list(prompt_ids)
    size = len(ids) + max_new
    fwd = nnx.jit(lambda m, b, t: m.chunked(b, max_units=size)['logits'][0, t])
    for _ in range(max_new):
      logits = jnp.where(jnp.arange(model.vocab_size) < NUM_IDS,
                         fwd(model, learned_row_batch(ids, size), len(ids) - 1), -jnp.inf)
      ids.append(int(jnp.argmax(logits)))
    return ids[len(prompt_ids):]
  split_ids = functools.partial(host_word_starts, splitter, max_word_bytes)
  ids = list(prompt_ids)
  size = len(ids) + max_new
  fwd = nnx.jit(lambda m, b, t: m(b)[0, t])
  for _ in range(max_new):
    starts = split_ids(ids)
    batch = single_row_batch(ids, starts, max_word_bytes, size)
    ids_S = np.zeros(size, np.int32)
    ids_S[:len(ids)] = ids
    ok = model.allowed_ids(jnp.asarray(ids_S), len(ids), starts[-1], splitter.word_cap - 1)
    logits = jnp.where(ok, fwd(model, batch, len(ids) - 1), -jnp.inf)
    ids.append(int(jnp.argmax(logits)))
  return ids[len(prompt_ids):]


def single_row_batch(ids: list[int], starts: list[int], max_word_bytes: int,
                     size: int | None = None) -> dict:
  """A one-row HAT batch (segment 1) for `ids` with the given word starts, padded to `size`
  bytes and words (padding: segment 0, no word)."""
  t, size = len(ids), size or len(ids)
  bounds = list(starts) + [t]
  gather = np.full((1, size, max_word_bytes), -1, np.int32)
  word_ids = np.full((1, size), -1, np.int32)
  for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    if j == len(starts) - 1:  # the current word may hold an unfinished character past the
      b = min(b, a + max_word_bytes)  # cap (host_word_starts); no position reads its vector
    gather[0, j, :b - a] = np.arange(a, b)
    word_ids[0, a:bounds[j + 1]] = j
  inputs = np.zeros((1, size), np.int32)
  inputs[0, :t] = ids
  seg = (np.arange(size) < t).astype(np.int32)[None]
  wseg = (np.arange(size) < len(starts)).astype(np.int32)[None]
  return {'inputs': inputs, 'positions': np.arange(size, dtype=np.int32)[None],
          'segment_ids': seg, 'word_gather': gather, 'word_ids': word_ids,
          'word_segment_ids': wseg, 'word_positions': np.arange(size, dtype=np.int32)[None]}


def learned_row_batch(ids: list[int], size: int | None = None) -> dict:
  """A one-row batch (segment 1) of `ids` padded to `size`: all that a HAT with learned
  chunking reads."""
  t, size = len(ids), size or len(ids)
  inputs = np.zeros((1, size), np.int32)
  inputs[0, :t] = ids
  return {'inputs': inputs, 'positions': np.arange(size, dtype=np.int32)[None],
          'segment_ids': (np.arange(size) < t).astype(np.int32)[None]}


def _generate_learned(model: HAT, prompt_ids: list[int], max_new: int, temperature: float,
                      top_p: float, seed: int, stop_id: int | None, forced) -> list[int]:
  """`generate` for learned chunking: the router decides each byte's boundary as it arrives
  (from its encoder state and the previous byte's); at a boundary the finished unit (its last
  `model.max_unit_bytes` bytes, as in training) is pooled, the backbone advances one step and the smoothing carries
  on, and the byte is decoded with the new context. No byte is decoded twice: the decision
  that ends a unit is made at the next unit's first byte, before it is decoded."""
  if max_new <= 0:
    return []
  if len(forced) > max_new:
    raise ValueError(f'{len(forced)} forced ids exceed max_new={max_new}')
  prompt = np.asarray(prompt_ids, np.int32)
  if not len(prompt):
    raise ValueError('generation needs a prompt (at least bos)')
  forced_N = np.full(max_new, -1, np.int32)
  forced_N[:len(forced)] = forced
  graphdef, state = nnx.split(model)
  out, n = _generate_learned_device(
      graphdef, state, jnp.asarray(prompt[None]), jnp.asarray(forced_N), jax.random.key(seed),
      jnp.float32(temperature), jnp.float32(top_p), jnp.int32(-1 if stop_id is None else stop_id),
      lw=model.max_unit_bytes, max_new=max_new)
  return np.asarray(out)[:int(n)].tolist()


@functools.partial(jax.jit, static_argnames=('graphdef', 'lw', 'max_new'))
def _generate_learned_device(graphdef, state, prompt_1xP, forced_N, rng, temperature, top_p,
                             stop_id, *, lw, max_new):
  model = nnx.merge(graphdef, state)
  p = prompt_1xP.shape[1]
  size = p + max_new
  ones = lambda n: jnp.ones((1, n), jnp.int32)
  at = lambda i: jnp.reshape(i, (1, 1)).astype(jnp.int32)
  slots_L = jnp.arange(lw, dtype=jnp.int32)
  enc_c = model.encoder.init_cache(1, size)
  bb_c = model.backbone.init_cache(1, size)
  dec_c = model.decoder.init_cache(1, size)
  # prefill: the prompt's boundaries, its complete units through the backbone, its bytes
  h_1xPxD, enc_c = model.encode(prompt_1xP, jnp.arange(p)[None], ones(p), enc_c, 0)
  p_1xP, b_1xP = model.boundaries(h_1xPxD, ones(p))
  lay = model.unit_layout(b_1xP, ones(p), p, lw)
  n = jnp.sum(b_1xP, dtype=jnp.int32)     # units so far; the last one is unfinished
  complete_P = jnp.arange(p) < n - 1       # slots past them hold garbage, overwritten later
  gather_1xPxL = jnp.where(complete_P[None, :, None], lay['gather'], -1)
  out_1xPxD, bb_c = model.backbone(model.pool(h_1xPxD, gather_1xPxL), jnp.arange(p)[None],
                                   ones(p), bb_c, 0)
  pu_P = jnp.take(p_1xP[0], jnp.minimum(lay['start'][0], p - 1))  # P of each unit
  smooth_PxD = model.smooth(out_1xPxD, jnp.where(complete_P, pu_P, 1.0)[None])[0]
  first_D = model.first_word[...].astype(out_1xPxD.dtype)
  ctx_WxD = jnp.zeros((size + 1, first_D.shape[0]), out_1xPxD.dtype)
  ctx_WxD = ctx_WxD.at[0].set(first_D).at[1:p + 1].set(smooth_PxD)  # ctx[j]: o~ of unit j-1
  starts_W = jnp.full(size + 1, size, jnp.int32).at[:p].set(lay['start'][0])
  pu_W = jnp.ones(size + 1, jnp.float32).at[:p].set(pu_P)
  h_1xSxD = jnp.zeros((1, size, h_1xPxD.shape[-1]), h_1xPxD.dtype).at[:, :p].set(h_1xPxD)
  logits_1xPxV, dec_c = model.decode(h_1xPxD, jnp.arange(p)[None], ones(p), ctx_WxD[None],
                                     lay['unit_ids'], dec_c, 0)

  def cond(c):
    return (c[0] < max_new) & ~c[-1]

  def body(c):
    i, ids_S, h_1xSxD, ctx_WxD, starts_W, pu_W, n, enc_c, bb_c, dec_c, logits_V, rng, out_N, _ = c
    t = p + i
    rng, key = jax.random.split(rng)
    logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < NUM_IDS, logits_V, -jnp.inf)
    x = token_lm.sample_logits(logits_V[None], temperature, top_p, key)[0]
    x = jnp.where(forced_N[i] >= 0, forced_N[i], x)
    ids_S = ids_S.at[t].set(x)
    h_1x1xD, enc_c = model.encode(at(x), at(t), ones(1), enc_c, t)
    h_prev_1x1xD = jax.lax.dynamic_slice_in_dim(h_1xSxD, t - 1, 1, axis=1)
    h_1xSxD = jax.lax.dynamic_update_slice(h_1xSxD, h_1x1xD, (0, t, 0))
    p_t = model.route(h_1x1xD, h_prev_1x1xD, jnp.zeros((1, 1), bool))[0, 0]

    def finish_unit(args):  # the unit [starts[n-1], t) is complete: one backbone step
      ctx_WxD, starts_W, pu_W, n, bb_c = args
      a = starts_W[n - 1]
      first = jnp.maximum(a, t - lw)
      gather_1x1xL = jnp.where(first + slots_L < t, first + slots_L, -1)[None, None]
      out_1x1xD, bb_c = model.backbone(model.pool(h_1xSxD, gather_1x1xL), at(n - 1), ones(1),
                                       bb_c, n - 1)
      pu = pu_W[n - 1].astype(out_1x1xD.dtype)
      smooth_D = pu * out_1x1xD[0, 0] + (1 - pu) * ctx_WxD[n - 1]  # ctx[0] is never mixed in:
      return (ctx_WxD.at[n].set(smooth_D), starts_W.at[n].set(t),  # the first unit has P = 1
              pu_W.at[n].set(p_t), n + 1, bb_c)

    ctx_WxD, starts_W, pu_W, n, bb_c = jax.lax.cond(
        p_t >= 0.5, finish_unit, lambda a: a, (ctx_WxD, starts_W, pu_W, n, bb_c))
    logits_1x1xV, dec_c = model.decode(h_1x1xD, at(t), ones(1), ctx_WxD[n - 1][None, None],
                                       jnp.zeros((1, 1), jnp.int32), dec_c, t)
    return (i + 1, ids_S, h_1xSxD, ctx_WxD, starts_W, pu_W, n, enc_c, bb_c, dec_c,
            logits_1x1xV[0, 0], rng, out_N.at[i].set(x), x == stop_id)

  ids_S = jnp.zeros(size, jnp.int32).at[:p].set(prompt_1xP[0])
  carry = (jnp.int32(0), ids_S, h_1xSxD, ctx_WxD, starts_W, pu_W, n, enc_c, bb_c, dec_c,
           logits_1xPxV[0, -1], rng, jnp.zeros(max_new, jnp.int32), jnp.bool_(False))
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[-2], carry[0]
