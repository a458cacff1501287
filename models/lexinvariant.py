"""Lexinvariant LM (Huang et al. 2023): token embeddings are random per sequence, not learned.

Each sequence gets its own embedding matrix E with rows ~ N(0, I): the same row for every
occurrence of a token inside the sequence, independent rows across tokens and sequences. The
input embedding is `E[x] * scale + bias` (learned `scale`, `bias` [D]); the readout uses the
same raw E, `logits_v = readout_scale * h . E_v`, with one learned scalar `readout_scale`
(a temperature; E itself stays the paper's unscaled Gaussian). Scale: after the final RMSNorm
|h| ~ sqrt(D) and |E_v| ~ sqrt(D); at initialisation h is dominated by the current token's own
row, so h . E_x ~ D (the "repeat the current token" logit) while other logits are ~ sqrt(D).
`readout_scale` therefore starts at 1/D: the self logit starts near 1, the others near 0
(with 1/sqrt(D) the initial loss was ~2x log V).

How E is drawn without materialising a V x D matrix per sequence (`lexinv.table`):

* 'shared' (default, any vocabulary): one Gaussian G [V_real, D] per step, shared by the batch,
  and one uniformly random permutation pi_b of the vocabulary per sequence; E_b = G[pi_b].
  Within a sequence E_b has exactly the paper's distribution (a permutation of i.i.d. Gaussian
  rows is i.i.d. Gaussian). The loss only needs
      logsumexp_v(h . E_b,v) = logsumexp_v(h . G_v)      (invariant to the permutation)
      target logit  h . G[pi_b(y)]                       (a [B, T, D] gather)
  so the softmax costs exactly one ordinary readout against G (chunked along the sequence like
  `token_lm.token_nll`), and input embeddings are the gather G[pi_b(x)]. Memory: G (one V x D
  matrix per step, 64 MiB fp32 at 32k x 512) plus B permutations of V int32s; never B x V x D,
  never permuted logits. Trade-off: the rows of different sequences of one batch are the same
  vectors in a different order, so sequences are not independent *across* the batch (a
  sequence's E is independent of another's only up to that shared set of vectors); each
  sequence on its own is distributed exactly as in the paper, and G is fresh every step.
* 'independent': an independent Gaussian [V_real, D] per sequence, materialised as
  [B, V_real, D] (exact i.i.d. across the batch). Only for small vocabularies (bytes):
  refused above `MAX_INDEPENDENT_ELEMENTS` elements.
* 'permuted_learned': the paper's lexinvariance *regulariser*: the learned tied embedding table
  W applied to a randomly permuted vocabulary, W[pi_b] (use with p < 1).

Partial lexinvariance (`lexinv.p`): each sequence is lexinvariant with probability p; the
others use the learned tied table W with the identity (a standard LM row). p = 1 is the pure
lexinvariant model (no learned table is built), p = 0 is exactly `token_lm.TokenLM`.
With table 'shared'/'independent' and 0 < p < 1 both readouts are computed (2x readout cost).

Only the first `n_real` ids (the encoder's true vocabulary; ids past it are padding of the
matrix dimensions and never occur) get Gaussian rows and take part in the random softmax.

Fixed (non-lexical) rows. Two options replace some Gaussian rows by *learned* rows W_fix that
are the same in every sequence (input `W_fix[k] * scale + bias`, readout `readout_scale *
h . W_fix[k]`, like a Gaussian row):
* `lexinv.fixed_specials`: pad / bos / eos are markers, not symbols of the text (the cipher
  evaluations keep them fixed too). A learned bos gives attention a stable place to rest; a
  learned eos can be predicted from the context.
* `lexinv.vocab='train'`: the lexical vocabulary is the set of ids that occur in the training
  split with frequency >= `vocab_min_freq` (`live`, counted by the family and saved with the
  parameters). For bytes this is the paper's character vocabulary: 103 of the 259 byte ids on
  the embedded corpus at 1e-5. Every other real id maps to one learned 'other' row. Why: every
  Gaussian row in the softmax is a competitor whose logit is noise (h . E_v ~ N(0, |h|^2) for a
  token the context does not support) that the model cannot suppress, since it cannot tell
  which random row belongs to a token that never occurs; 156 such rows of never-seen bytes
  swamp the in-context evidence of a small model where the context is short (docs/lexinvariant.md: tiny
  byte model at 2000 steps, validation loss 3.685 -> 3.496 nats with both options). The output
  is still a distribution over *all* ids: each non-live id gets the 'other' logit, so the
  softmax normaliser counts that row n_other times (`+ log n_other`) and bits per byte stay
  exact.
Lexinvariance is then invariance to permutations of the lexical ids (the live, non-special ids).

Bias initialisation (`lexinv.embed_bias_init_std`, default 1). With a zero bias every input
vector is a random row: nothing in the input is the same across tokens, so queries and keys
carry no content-independent component for RoPE to turn into a position preference, and the
first layer's attention stays near uniform (the tiny byte preset at step 4000: entropy
4.0-4.1 nats in every layer-0 head, no previous-token heads). A bias drawn N(0, I) gives every
token a shared component of the same size as its random row from step 0; previous-token heads
then form in layer 0 and induction (copying from earlier in the sequence) follows.
`--mode=eval` reports both (the attention table and the Repeat probe); docs/lexinvariant.md has the
ablation.

Keys: `draw(rng, B)` folds the row index b (the global example index within the step's batch)
into `rng`; the trainer's rng is fold_in(key(seed), step) (and the micro-batch index under
gradient accumulation), so E depends only on (seed, step, example): runs reproduce and resume.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from models import token_lm
from models.layers import AttentionConfig, Cache, Embed
from models.transformer import Transformer

Array = jax.Array
TABLES = ('shared', 'independent', 'permuted_learned')
EMBEDDINGS = ('lexinvariant', 'interchangeable')
VOCABS = ('all', 'train')
MAX_INDEPENDENT_ELEMENTS = 1 << 26  # B * V * D for table='independent' (256 MiB fp32)

# Tags folded into the step key for each random quantity.
_MASK, _TABLE, _PERM = 11, 12, 13


def default_lexinv_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.p = 1.0                   # probability that a sequence is lexinvariant
  c.table = 'shared'          # 'shared' | 'independent' | 'permuted_learned'
  c.embed_scale_init = 1.0    # initial learned scale on the N(0, I) rows
  c.embed_bias_init_std = 1.0  # the learned bias starts as N(0, std^2 I) (0: zeros)
  c.fixed_specials = False    # pad/bos/eos get learned rows (shared by all sequences)
  c.vocab = 'all'             # 'all' real ids are lexical | 'train': only ids seen in training
  c.vocab_min_freq = 0.0      # 'train': ids with a lower training frequency are not lexical
  c.vocab_max_chars = 64_000_000  # 'train': characters of the training split counted
  # 'lexinvariant' (this module's model) | 'interchangeable' (InterchangeableLM below: learned
  # embeddings, except a dual one for the tokens of `interchangeable`)
  c.embedding = 'lexinvariant'
  c.interchangeable = ''      # characters (one token each) that are interchangeable, e.g. 'abcdefghijklmnop'
  c.d_random = 32             # width of the per-sequence random part of their embedding
  return c


class LexinvariantLM(nnx.Module):
  """Transformer LM whose token embeddings (input and readout) are drawn per sequence."""

  def __init__(self, cfg_model: ml_collections.ConfigDict, cfg_lexinv: ml_collections.ConfigDict,
               vocab_size: int, n_real: int | None = None, dtype: Any = jnp.float32, *,
               special_ids: tuple[int, ...] = (), live: np.ndarray | None = None,
               rngs: nnx.Rngs):
    """`special_ids`: the encoder's pad/bos/eos (used with `lexinv.fixed_specials`); `live`:
    bool [vocab_size], the ids seen in training (required with `lexinv.vocab='train'`; a
    checkpoint's saved copy replaces it on restore)."""
    self.vocab_size = int(vocab_size)
    self.n_real = int(vocab_size if n_real is None else n_real)
    if not 0 < self.n_real <= self.vocab_size:
      raise ValueError(f'n_real={self.n_real} not in (0, vocab_size={self.vocab_size}]')
    self.p = float(cfg_lexinv.p)
    if not 0.0 <= self.p <= 1.0:
      raise ValueError(f'lexinv.p={self.p} must lie in [0, 1]')
    self.table = str(cfg_lexinv.table)
    if self.table not in TABLES:
      raise ValueError(f'lexinv.table={self.table!r}; expected one of {TABLES}')
    vocab = str(cfg_lexinv.get('vocab', 'all'))
    if vocab not in VOCABS:
      raise ValueError(f'lexinv.vocab={vocab!r}; expected one of {VOCABS}')
    self.dtype = dtype
    self.ce_chunk = int(cfg_model.ce_chunk)
    d = int(cfg_model.d_model)
    self.d_model = d
    self.transformer = Transformer(
        cfg_model.num_layers, d, cfg_model.num_heads, cfg_model.num_kv_heads,
        cfg_model.head_dim, cfg_model.mlp_dim, rope_base=cfg_model.rope_base,
        window=cfg_model.window, dtype=dtype, remat=cfg_model.remat,
        attention_impl=AttentionConfig.from_model_config(cfg_model),
        init_std=cfg_model.init_std, scan_layers=cfg_model.get('scan_layers', False), rngs=rngs)
    self.embed_scale = nnx.Param(jnp.full((d,), float(cfg_lexinv.embed_scale_init), jnp.float32),
                                 out_sharding=('norm',))
    # Random, not zero: the module doc's "Bias initialisation".
    bias_std = float(cfg_lexinv.get('embed_bias_init_std', 1.0))
    self.embed_bias = nnx.Param(bias_std * jax.random.normal(rngs.params(), (d,), jnp.float32),
                                out_sharding=('norm',))
    self.readout_scale = nnx.Param(jnp.full((), 1.0 / d, jnp.float32), out_sharding=())
    self.uses_learned = self.p < 1.0 or self.table == 'permuted_learned'
    self.embed = (Embed(vocab_size, d, dtype=dtype, init_std=cfg_model.init_std, rngs=rngs)
                  if self.uses_learned else None)

    # Fixed rows (see the module doc): static index of each special id, then 'other'.
    specials = sorted({int(i) for i in special_ids}) if cfg_lexinv.get('fixed_specials') else []
    if any(not 0 <= i < self.n_real for i in specials):
      raise ValueError(f'special ids {specials} must lie in [0, n_real={self.n_real})')
    self.special_ids = tuple(specials)             # static; special id i has fixed row i
    self.n_specials = len(specials)
    live_V = None
    if vocab == 'train':
      if live is None:
        raise ValueError("lexinv.vocab='train' needs the ids seen in training (`live`)")
      live_V = np.asarray(live, bool).reshape(-1)
      if live_V.shape != (self.vocab_size,):
        raise ValueError(f'live has {live_V.shape[0]} entries, expected vocab_size='
                         f'{self.vocab_size}')
      lexical = live_V[:self.n_real].copy()
      lexical[list(specials)] = False
      if not lexical.any():
        raise ValueError('live marks no lexical id: the training data has no tokens?')
    # Data, not a trained weight: a Param only so that checkpoints carry it. Its gradient is
    # zero (stop_gradient) and 1-D params are outside the weight-decay mask, so it never moves.
    self.live = (nnx.Param(jnp.asarray(live_V, jnp.float32), out_sharding=(None,))
                 if live_V is not None else None)
    n_fixed = self.n_specials + (self.live is not None)
    self.fixed = (nnx.Param(jax.random.normal(rngs.params(), (n_fixed, d), jnp.float32),
                            out_sharding=(None, 'embed')) if n_fixed else None)

  @property
  def gaussian(self) -> bool:
    return self.table in ('shared', 'independent')

  # -- vocabulary classes ----------------------------------------------------------------------
  def _classes(self) -> tuple[Array, Array]:
    """(fixed_V int32 [V]: -1 for lexical ids, else the fixed row; logc_F [n_fixed]: the log
    number of ids that share each fixed row: 0 for specials, log n_other for 'other')."""
    fixed_V = np.full((self.vocab_size,), -1, np.int32)
    fixed_V[list(self.special_ids)] = np.arange(self.n_specials, dtype=np.int32)
    fixed_V = jnp.asarray(fixed_V)
    logc = jnp.zeros((self.n_specials,), jnp.float32)
    if self.live is not None:
      live = jax.lax.stop_gradient(self.live[...]) > 0.5
      real = jnp.arange(self.vocab_size) < self.n_real
      other = real & ~live & (fixed_V < 0)
      fixed_V = jnp.where(other, self.n_specials, fixed_V)
      n_other = jnp.sum(other).astype(jnp.float32)
      logc = jnp.concatenate([logc, jnp.log(n_other)[None]])  # -inf when every id is live
    return fixed_V, logc

  def _lexical_mask(self, draw, fixed_V: Array) -> Array | None:
    """[B, n_real] bool over the Gaussian rows: row n takes part in sequence b's softmax iff it
    is E_b of a lexical id (None: every row does)."""
    if self.fixed is None:
      return None
    lex_N = fixed_V[:self.n_real] < 0
    perm_BxN = draw['perm'][:, :self.n_real]
    b = perm_BxN.shape[0]
    return jnp.zeros((b, self.n_real), bool).at[jnp.arange(b)[:, None], perm_BxN].set(lex_N)

  # -- randomness ------------------------------------------------------------------------------
  def draw(self, rng: Array, batch: int) -> dict[str, Array]:
    """The random embedding state of a batch of `batch` rows; row b's quantities depend only on
    (rng, b). Returns {'mask': bool[B] (row is lexinvariant), 'perm': int32[B, V] (a
    permutation of the first n_real ids, identity on the rest and on non-lexinvariant rows),
    'gauss': [n_real, D] ('shared'), [B, n_real, D] ('independent') or absent}."""
    rows = jnp.arange(batch, dtype=jnp.uint32)
    row_key = lambda tag: jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(rng, tag), b))(
        rows)
    if self.p >= 1.0:
      mask = jnp.ones((batch,), bool)
    elif self.p <= 0.0:
      mask = jnp.zeros((batch,), bool)
    else:
      mask = jax.vmap(lambda k: jax.random.uniform(k) < self.p)(row_key(_MASK))
    ident = jnp.arange(self.vocab_size, dtype=jnp.int32)
    out = {'mask': mask}
    if self.table == 'independent':
      n = batch * self.n_real * self.d_model
      if n > MAX_INDEPENDENT_ELEMENTS:
        raise ValueError(f"lexinv.table='independent' would materialise {batch} x {self.n_real}"
                         f" x {self.d_model} = {n:,} elements; use table='shared'")
      out['gauss'] = jax.vmap(lambda k: jax.random.normal(k, (self.n_real, self.d_model)))(
          row_key(_TABLE))
      out['perm'] = jnp.broadcast_to(ident, (batch, self.vocab_size))
      return out
    if self.table == 'shared':
      out['gauss'] = jax.random.normal(jax.random.fold_in(rng, _TABLE),
                                       (self.n_real, self.d_model))
    perm_BxN = jax.vmap(lambda k: jax.random.permutation(k, self.n_real))(row_key(_PERM))
    perm_BxV = jnp.concatenate(
        [perm_BxN.astype(jnp.int32),
         jnp.broadcast_to(ident[self.n_real:], (batch, self.vocab_size - self.n_real))], axis=1)
    out['perm'] = jnp.where(mask[:, None], perm_BxV, ident[None])
    return out

  def fixed_draw(self, table_BxNxD: Array) -> dict[str, Array]:
    """A draw with explicit per-sequence Gaussian tables E_b (all rows lexinvariant): E_b[v] is
    token v's vector in sequence b. For tests and ciphers."""
    b = table_BxNxD.shape[0]
    return {'mask': jnp.ones((b,), bool),
            'perm': jnp.broadcast_to(jnp.arange(self.vocab_size, dtype=jnp.int32),
                                     (b, self.vocab_size)),
            'gauss': table_BxNxD}

  def repeat_draw(self, draw: dict[str, Array], batch: int) -> dict[str, Array]:
    """A one-row `draw` for `batch` rows that all use its embedding (the byte-level view keeps
    one draw for every text and row it scores): per-row arrays broadcast, a 'shared' table
    ([n_real, D], the same for every row) as it is."""
    return {k: (v if k == 'gauss' and v.ndim == 2 else
                jnp.broadcast_to(v, (batch,) + v.shape[1:])) for k, v in draw.items()}

  # -- embeddings ------------------------------------------------------------------------------
  def _rows(self, draw, ids_BxT: Array) -> Array:
    """Raw rows E_b[ids] (fp32 [B, T, D]): G[pi_b(ids)] for lexical ids, W_fix for fixed ones."""
    g = draw['gauss']
    pid_BxT = jnp.take_along_axis(draw['perm'], ids_BxT, axis=1)
    pid_BxT = jnp.minimum(pid_BxT, self.n_real - 1)  # ids >= n_real never occur; keep in range
    if g.ndim == 2:
      rows = jnp.take(g, pid_BxT, axis=0)
    else:
      rows = jnp.take_along_axis(g, pid_BxT[..., None], axis=1)
    if self.fixed is None:
      return rows
    k_BxT = self._classes()[0][ids_BxT]
    fixed = jnp.take(self.fixed[...], jnp.maximum(k_BxT, 0), axis=0)
    return jnp.where((k_BxT >= 0)[..., None], fixed, rows)

  def embed_tokens(self, ids_BxT: Array, draw: dict[str, Array]) -> Array:
    parts = []
    if self.gaussian and self.p > 0.0:
      e = self._rows(draw, ids_BxT)
      parts.append(e * self.embed_scale[...] + self.embed_bias[...])
    if self.uses_learned:
      pid_BxT = jnp.take_along_axis(draw['perm'], ids_BxT, axis=1)
      parts.append(jnp.take(self.embed.embedding[...], pid_BxT, axis=0))
    if len(parts) == 1:
      return parts[0].astype(self.dtype)
    return jnp.where(draw['mask'][:, None, None], parts[0], parts[1]).astype(self.dtype)

  def hidden(self, ids_BxT: Array, draw: dict[str, Array], positions_BxT: Array | None = None,
             segment_ids_BxT: Array | None = None, cache: list[Cache] | None = None,
             cache_index: Array | int | None = None) -> tuple[Array, list[Cache] | None]:
    if positions_BxT is None:
      start = 0 if cache_index is None else cache_index
      positions_BxT = jnp.broadcast_to(start + jnp.arange(ids_BxT.shape[1], dtype=jnp.int32),
                                       ids_BxT.shape)
    x_BxTxD = self.embed_tokens(ids_BxT, draw)
    return self.transformer(x_BxTxD, positions_BxT, segment_ids_BxT, cache, cache_index)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[Cache]:
    return self.transformer.init_cache(batch, max_len, dtype)

  # -- readout ---------------------------------------------------------------------------------
  def _gauss_scores(self, h_BxCxD: Array, draw) -> Array:
    """readout_scale * h . G_n for every Gaussian row n (fp32 [B, C, n_real]): the logits in the
    *permuted* order (column pi_b(v) is token v)."""
    g = draw['gauss'].astype(self.dtype)
    eq = 'bcd,nd->bcn' if g.ndim == 2 else 'bcd,bnd->bcn'
    s = jnp.einsum(eq, h_BxCxD.astype(self.dtype), g, preferred_element_type=jnp.float32)
    return s * self.readout_scale[...]

  def _fixed_scores(self, h_BxCxD: Array) -> Array:
    """readout_scale * h . W_fix[k] (fp32 [B, C, n_fixed])."""
    s = jnp.einsum('bcd,kd->bck', h_BxCxD.astype(self.dtype), self.fixed[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return s * self.readout_scale[...]

  def _gauss_lse(self, h_BxCxD: Array, draw, lex_BxN: Array | None, logc_F: Array) -> Array:
    """log of the softmax normaliser over all ids (fp32 [B, C])."""
    s = self._gauss_scores(h_BxCxD, draw)
    if lex_BxN is None:
      return jax.nn.logsumexp(s, axis=-1)
    s = jnp.where(lex_BxN[:, None], s, -jnp.inf)
    f = self._fixed_scores(h_BxCxD) + logc_F
    return jnp.logaddexp(jax.nn.logsumexp(s, axis=-1), jax.nn.logsumexp(f, axis=-1))

  def _learned_scores(self, h_BxCxD: Array) -> Array:
    return token_lm._readout(h_BxCxD, self.embed.embedding[...], True, self.dtype)

  def token_nll(self, h_BxTxD: Array, targets_BxT: Array, draw: dict[str, Array]) -> Array:
    """Per-token NLL [B, T] (fp32). Only the logsumexp needs all V rows; it is invariant to the
    row permutation, so it runs against the unpermuted table, chunked along the sequence
    (`ce_chunk`) like `token_lm.token_nll`. The target logit is a [B, T, D] gather."""
    nlls = []
    chunk = token_lm.resolve_ce_chunk(self.ce_chunk, h_BxTxD, self.vocab_size)
    if self.gaussian and self.p > 0.0:
      fixed_V, logc_F = self._classes() if self.fixed is not None else (None, None)
      lex_BxN = self._lexical_mask(draw, fixed_V) if self.fixed is not None else None
      lse = _chunked(lambda h: self._gauss_lse(h, draw, lex_BxN, logc_F), h_BxTxD, chunk)
      e_BxTxD = self._rows(draw, targets_BxT)
      tgt = jnp.einsum('btd,btd->bt', h_BxTxD.astype(jnp.float32), e_BxTxD.astype(jnp.float32))
      nlls.append(lse - tgt * self.readout_scale[...])
    if self.uses_learned:
      lse = _chunked(lambda h: jax.nn.logsumexp(self._learned_scores(h), axis=-1),
                     h_BxTxD, chunk)
      pid_BxT = jnp.take_along_axis(draw['perm'], targets_BxT, axis=1)
      w_BxTxD = jnp.take(self.embed.embedding[...], pid_BxT, axis=0)
      h = h_BxTxD.astype(self.dtype)
      tgt = jnp.einsum('btd,btd->bt', h, w_BxTxD.astype(self.dtype),
                       preferred_element_type=jnp.float32)
      nlls.append(lse - tgt)
    if len(nlls) == 1:
      return nlls[0]
    return jnp.where(draw['mask'][:, None], nlls[0], nlls[1])

  def token_logits(self, h_BxTxD: Array, draw: dict[str, Array]) -> Array:
    """fp32 logits [B, T, V] over the *original* token ids (for evaluation and sampling):
    logits[b, t, v] = score against E_b[v]; ids >= n_real get -inf in random rows (every id
    that shares the 'other' row gets its logit, so the softmax over V is the model's
    distribution). Forms [B, T, V] logits; use on evaluation-sized batches."""
    outs = []
    b, t = h_BxTxD.shape[:2]
    if self.gaussian and self.p > 0.0:
      s_BxTxN = self._gauss_scores(h_BxTxD, draw)
      pid_BxV = jnp.minimum(draw['perm'], self.n_real - 1)
      s_BxTxV = jnp.take_along_axis(s_BxTxN, jnp.broadcast_to(pid_BxV[:, None], (b, t,
                                                                                  self.vocab_size)),
                                    axis=2)
      if self.fixed is not None:
        fixed_V = self._classes()[0]
        f_BxTxV = jnp.take(self._fixed_scores(h_BxTxD), jnp.maximum(fixed_V, 0), axis=2)
        s_BxTxV = jnp.where(fixed_V >= 0, f_BxTxV, s_BxTxV)
      valid_V = jnp.arange(self.vocab_size) < self.n_real
      outs.append(jnp.where(valid_V, s_BxTxV, -jnp.inf))
    if self.uses_learned:
      s_BxTxV = self._learned_scores(h_BxTxD)
      outs.append(jnp.take_along_axis(
          s_BxTxV, jnp.broadcast_to(draw['perm'][:, None], (b, t, self.vocab_size)), axis=2))
    if len(outs) == 1:
      return outs[0]
    return jnp.where(draw['mask'][:, None, None], outs[0], outs[1])

  def lexical_ids(self) -> np.ndarray:
    """The ids a cipher may permute (host numpy): real ids with a Gaussian row in every
    sequence, i.e. not special under `fixed_specials` and live under `vocab='train'`."""
    fixed_V = np.asarray(jax.device_get(self._classes()[0]))
    return np.flatnonzero(fixed_V[:self.n_real] < 0).astype(np.int32)

  def __call__(self, ids_BxT: Array, draw: dict[str, Array], positions_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None, cache: list[Cache] | None = None,
               cache_index: Array | int | None = None) -> tuple[Array, list[Cache] | None]:
    h, cache = self.hidden(ids_BxT, draw, positions_BxT, segment_ids_BxT, cache, cache_index)
    return self.token_logits(h, draw), cache


def _chunked(fn, h_BxTxD: Array, chunk: int) -> Array:
  """fn: [B, C, D] -> [B, C], applied over sequence chunks of `chunk` (0: whole sequence) in a
  rematerialised scan so only one chunk's [B, C, V] scores are live."""
  b, t, d = h_BxTxD.shape
  if chunk <= 0 or chunk >= t:
    return fn(h_BxTxD)
  pad = (-t) % chunk
  n = (t + pad) // chunk
  h_NxBxCxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).transpose(
      1, 0, 2, 3)
  body = jax.checkpoint(fn)
  _, out_NxBxC = jax.lax.scan(lambda c, h: (c, body(h)), None, h_NxBxCxD)
  return out_NxBxC.transpose(1, 0, 2).reshape(b, n * chunk)[:, :t]


def lexinv_loss(model: LexinvariantLM, batch: dict[str, Array], rng: Array
                ) -> tuple[Array, dict[str, Array]]:
  """Next-token loss with a fresh per-sequence embedding drawn from `rng` (see `draw`).

  Same batch keys and metric sums as `token_lm.lm_loss`: nll_sum, n_tokens, n_bytes."""
  draw = model.draw(rng, batch['inputs'].shape[0])
  h_BxTxD, _ = model.hidden(batch['inputs'], draw, batch['positions'], batch['segment_ids'])
  nll_BxT = model.token_nll(h_BxTxD, batch['targets'], draw)
  weights_BxT = batch['weights'].astype(jnp.float32)
  nll_sum = jnp.sum(nll_BxT * weights_BxT)
  n_tokens = jnp.sum(weights_BxT)
  metrics = dict(nll_sum=nll_sum, n_tokens=n_tokens,
                 n_bytes=jnp.sum(batch['target_bytes']).astype(jnp.float32))
  return nll_sum / jnp.maximum(n_tokens, 1.0), metrics


def _bind(model: LexinvariantLM, rng: Array, batch: int):
  draw_rng, rng = jax.random.split(rng)
  draw = model.draw(draw_rng, batch)  # one E per sampled sequence, fixed for prompt + continuation
  return lambda ids, cache, index: model(ids, draw, cache=cache, cache_index=index), rng


def generate(model: LexinvariantLM, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng: Array | None = None, eos_id: int | None = None) -> Array:
  """Like `token_lm.generate`; each row's embedding E is drawn once from `rng` and kept for the
  prompt and every generated token (a lexinvariant model has no fixed token meaning, so the
  continuation can only follow patterns that the prompt establishes)."""
  return token_lm.generate(model, prompt_ids, max_new_tokens, temperature, top_p, rng, eos_id,
                           bind=_bind)


def flops_per_token(cfg_model, vocab_size: int, seq_len: int, two_readouts: bool = False
                    ) -> float:
  """As `token_lm.flops_per_token` (the Gaussian readout costs what a tied readout costs);
  partial lexinvariance with a Gaussian table computes a second readout."""
  f = token_lm.flops_per_token(cfg_model, vocab_size, seq_len)
  return f + (6 * cfg_model.d_model * vocab_size if two_readouts else 0.0)


# -- interchangeable token embeddings ------------------------------------------------------------
class InterchangeableLM(LexinvariantLM):
  """Interchangeable token embeddings (Isik et al., "Interchangeable Token Embeddings for
  Extendable Vocabulary and Alpha-Equivalence", ICML 2025; necrashter/interchangeable-token-
  embeddings): a standard LM except for a designated set I of interchangeable tokens (e.g. the
  letters a-p), whose embedding is *dual*:

      e(v) = [ n(W_v) ; 0 ]                          v not in I: a learned row, as in a standard LM
      e(v) = [ n(s)   ; n(r_b,v) ] / sqrt(2)         v in I: a shared learned part s (the same for
                                                     every token of I: "this is an interchangeable
                                                     token") and a random part r_b,v ~ N(0, I)
                                                     drawn per sequence b (which one it is)

  n() is L2 normalisation (the paper's 'l2' base / random-part / final normalisations: each
  part has norm 1, the concatenation norm sqrt(2), rescaled to 1). The base part has
  d - `lexinv.d_random` dimensions, the random part `lexinv.d_random`. The readout is tied to
  the same per-sequence rows: logit_v = readout_scale * h . e(v) (readout_scale a learned
  temperature, initialised 1/sqrt(d) so the unit-norm rows start with logits of order 1); the
  input is embed_scale * e(v) (a learned scalar, the paper's 'learnable' embedding scale).

  Within a sequence the tokens of I are told apart only by their random parts, so the model is
  invariant to permutations of I (tests/test_lexinvariant.py) and can only use them through
  the context (copy, look up); every other token keeps a learned meaning. Because nothing is
  learned per token of I, the set can grow after training: `extended(ids)` adds tokens never
  seen in training, which get the shared part and fresh random parts (the paper's extendable
  vocabulary; the unseen-symbol evaluation in train/evals/lexinv.py). The same parameters serve
  any set. The rows of W for tokens of I are never read.

  Compared with the lexinvariant model (every token random, one learned bias): the learned
  rows keep token meaning where it is useful, and s enters the readout, so "a token of I comes
  next" is a learned logit and "which one" a match against the context's random parts.
  `draw(rng, B)` gives {'rand': [B, K, d_random]} from (rng, row) like LexinvariantLM.draw;
  the interface (hidden, token_nll, token_logits, __call__, generation, byte-level views) is
  LexinvariantLM's.
  """

  def __init__(self, cfg_model: ml_collections.ConfigDict, cfg_lexinv: ml_collections.ConfigDict,
               vocab_size: int, n_real: int | None = None, dtype: Any = jnp.float32, *,
               interchangeable_ids=(), special_ids: tuple[int, ...] = (), rngs: nnx.Rngs):
    # pylint: disable=super-init-not-called  # its own parameters; LexinvariantLM's interface
    self.vocab_size = int(vocab_size)
    self.n_real = int(vocab_size if n_real is None else n_real)
    ids = np.unique(np.asarray(interchangeable_ids, np.int64).reshape(-1))
    if ids.size == 0:
      raise ValueError("lexinv.interchangeable is empty: lexinv.embedding='interchangeable' "
                       "needs at least one interchangeable token (e.g. 'abcdefghijklmnop')")
    if ids.min() < 0 or ids.max() >= self.n_real:
      raise ValueError(f'lexinv.interchangeable: token ids {ids.tolist()} must lie in '
                       f'[0, {self.n_real})')
    specials = {int(i) for i in special_ids}
    if specials & set(ids.tolist()):
      raise ValueError(f'lexinv.interchangeable: the special ids {sorted(specials)} (pad, bos, '
                       'eos) are markers and cannot be interchangeable')
    if set(range(self.n_real)) - specials <= set(ids.tolist()):
      raise ValueError(f'lexinv.interchangeable covers every token ({self.n_real - len(specials)}'
                       ' ids besides pad/bos/eos): nothing would keep a learned meaning; that is '
                       "the lexinvariant model (lexinv.embedding='lexinvariant')")
    d = int(cfg_model.d_model)
    dr = int(cfg_lexinv.get('d_random', 32))
    if not 0 < dr < d:
      raise ValueError(f'lexinv.d_random={dr} must lie in [1, model.d_model - 1 = {d - 1}]')
    self.dtype, self.d_model, self.d_random = dtype, d, dr
    self.ce_chunk = int(cfg_model.ce_chunk)
    self.p, self.table = 1.0, 'interchangeable'
    self.inter_ids = tuple(int(i) for i in ids)
    self.special_ids = tuple(sorted(specials))
    self.transformer = Transformer(
        cfg_model.num_layers, d, cfg_model.num_heads, cfg_model.num_kv_heads,
        cfg_model.head_dim, cfg_model.mlp_dim, rope_base=cfg_model.rope_base,
        window=cfg_model.window, dtype=dtype, remat=cfg_model.remat,
        attention_impl=cfg_model.attention_impl, init_std=cfg_model.init_std, rngs=rngs)
    self.embed = Embed(vocab_size, d - dr, dtype=dtype, init_std=cfg_model.init_std, rngs=rngs)
    self.shared = nnx.Param(jax.random.normal(rngs.params(), (d - dr,), jnp.float32),
                            out_sharding=(None,))
    self.embed_scale = nnx.Param(jnp.ones((), jnp.float32), out_sharding=())
    self.readout_scale = nnx.Param(jnp.full((), d ** -0.5, jnp.float32), out_sharding=())

  @property
  def gaussian(self) -> bool:
    return False

  def extended(self, extra_ids) -> 'InterchangeableLM':
    """The same model (shared parameters) with `extra_ids` added to the interchangeable set."""
    new = nnx.clone(self)
    new.inter_ids = tuple(sorted(set(self.inter_ids) | {int(i) for i in extra_ids}))
    if set(range(self.n_real)) - set(self.special_ids) <= set(new.inter_ids):
      raise ValueError('the extended interchangeable set covers every token')
    return new

  def _index(self) -> np.ndarray:
    """int32 [V]: position of each id in the interchangeable set, -1 for the others."""
    k = np.full((self.vocab_size,), -1, np.int32)
    k[list(self.inter_ids)] = np.arange(len(self.inter_ids), dtype=np.int32)
    return k

  def draw(self, rng: Array, batch: int) -> dict[str, Array]:
    rows = jnp.arange(batch, dtype=jnp.uint32)
    keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(rng, _TABLE), b))(rows)
    r = jax.vmap(lambda k: jax.random.normal(k, (len(self.inter_ids), self.d_random)))(keys)
    return {'rand': r}

  def fixed_draw(self, rand_BxKxR: Array) -> dict[str, Array]:
    """A draw with explicit random parts (row k of sequence b: token inter_ids[k])."""
    return {'rand': rand_BxKxR}

  def _parts(self, draw):
    """(n(W) [V, d-r], n(s) [d-r], n(r) [B, K, r]) in fp32."""
    n = lambda x: x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-12)
    return (n(self.embed.embedding[...]), n(self.shared[...]),
            n(draw['rand'].astype(jnp.float32)))

  def _rows(self, draw, ids_BxT: Array) -> Array:
    """e_b(ids) (fp32 [B, T, D])."""
    w, s, r = self._parts(draw)
    k_BxT = jnp.asarray(self._index())[ids_BxT]
    base = jnp.take(w, ids_BxT, axis=0)
    rnd = jnp.take_along_axis(r, jnp.maximum(k_BxT, 0)[..., None], axis=1)
    inter = (k_BxT >= 0)[..., None]
    base = jnp.where(inter, jnp.broadcast_to(s, base.shape) * 2 ** -0.5, base)
    rnd = jnp.where(inter, rnd * 2 ** -0.5, 0.0)
    return jnp.concatenate([base, rnd], axis=-1)

  def embed_tokens(self, ids_BxT: Array, draw: dict[str, Array]) -> Array:
    return (self._rows(draw, ids_BxT) * self.embed_scale[...]).astype(self.dtype)

  def token_logits(self, h_BxTxD: Array, draw: dict[str, Array]) -> Array:
    """fp32 logits [B, T, V]; ids >= n_real get -inf."""
    w, s, r = self._parts(draw)
    dt = self.dtype
    hb, hr = h_BxTxD[..., :self.d_model - self.d_random], h_BxTxD[..., self.d_model - self.d_random:]
    base = jnp.einsum('btd,vd->btv', hb.astype(dt), w.astype(dt),
                      preferred_element_type=jnp.float32)
    inter = (jnp.einsum('btd,d->bt', hb.astype(dt), s.astype(dt),
                        preferred_element_type=jnp.float32)[..., None]
             + jnp.einsum('btr,bkr->btk', hr.astype(dt), r.astype(dt),
                          preferred_element_type=jnp.float32)) * 2 ** -0.5
    k_V = jnp.asarray(self._index())
    inter_V = jnp.take(inter, jnp.maximum(k_V, 0), axis=2)
    logits = jnp.where(k_V >= 0, inter_V, base) * self.readout_scale[...]
    return jnp.where(jnp.arange(self.vocab_size) < self.n_real, logits, -jnp.inf)

  def token_nll(self, h_BxTxD: Array, targets_BxT: Array, draw: dict[str, Array]) -> Array:
    """Per-token NLL [B, T] (fp32), chunked along the sequence with `model.ce_chunk`."""
    t = h_BxTxD.shape[1]
    c = self.ce_chunk if 0 < self.ce_chunk < t else t
    pad = (-t) % c
    n = (t + pad) // c
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    b, d = h.shape[0], h.shape[2]

    def nll(h_BxCxD, y_BxC):
      logits = self.token_logits(h_BxCxD, draw)
      tgt = jnp.take_along_axis(logits, y_BxC[..., None], axis=-1)[..., 0]
      return jax.nn.logsumexp(logits, axis=-1) - tgt

    if n == 1:
      return nll(h, y)[:, :t]
    h_N = h.reshape(b, n, c, d).transpose(1, 0, 2, 3)
    y_N = y.reshape(b, n, c).transpose(1, 0, 2)
    _, out = jax.lax.scan(lambda carry, xs: (carry, jax.checkpoint(nll)(*xs)), None, (h_N, y_N))
    return out.transpose(1, 0, 2).reshape(b, n * c)[:, :t]

  def lexical_ids(self) -> np.ndarray:
    """The ids a cipher may permute: the interchangeable set."""
    return np.asarray(self.inter_ids, np.int32)
