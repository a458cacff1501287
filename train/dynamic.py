"""Dynamic tokenization at inference (`--mode=eval` / `--mode=sample` with `--config.dynamic`).

  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2_dyn --mode=eval \
      --config.dynamic=compression:0.1,0.2 --config.dynamic_embeddings=hypernet,fvt \
      --config.transfer.hypernet_workdir=runs/zett_smollm2

`dynamic_mode` says where the merges come from (data/dynamic_bpe.py):
  causal  (the default) per row, LZW-style: a table grows from the tokens already scored, and a
          new token is used only where every merge it needs was learnt from text strictly before
          it; the output vocabulary at each position is the base plus the entries known there.
          A predictive model, so its bits per byte are an honest code length. `merges:N` caps
          the entries per row; `dynamic_min_count` is how often a pair must have been seen.
  batch   per evaluation batch, frequent adjacent token pairs are merged BPE-style into new
          tokens (a merge budget `merges:N` or a target `compression:F`), chosen from the very
          batch that is then scored: the merge list carries information about the scored text
          that nobody pays for, so these bits per byte are not a predictive model's (the table
          says so; `bpb_charged` adds the bits to transmit the merge list).
Merges stay inside pretokens or words (`dynamic_boundary`). The new tokens' embeddings come from
  hypernet  the trained ZeTT hypernetwork (`transfer.hypernet_workdir`, a configs/zett.py run on
            this base model), predicted from the new token's string;
  fvt       the mean of the base embeddings of the tokens it merges.
A new token whose string the base vocabulary already has takes that row. Embeddings are cached
across batches by the token's bytes (hits counted). The model runs on the merged rows with the
input table extended by the batch's new tokens, and its next-token distribution is over the base
vocabulary plus the batch's new tokens (input and output rows alike; tied models share them), so
bits per byte stay exact: the merged rows' targets spell every scored byte once
(`dynamic_bpe.check_bytes`, checked on every batch) and their log-probabilities are summed over
the same bytes as the plain evaluation, which is the first row of the table (merges: 0).

Writes `WORKDIR/dynamic.md` / `dynamic.json`: per setting and embedding method where the merges
came from, the merges made per row (causal) or batch, tokens per byte, the token reduction, bits
per byte and its change.

`--mode=sample`: causal merges grow the table along the prompt and then the generated text, and
generation runs with a KV cache (new rows embedded as their entries are learnt); batch-level
merges merge the prompt once and rerun the padded sequence per token (uncached).
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import dynamic_bpe, encoders, target_tokenizers
from train import config_lib, runs, storage, trainer
from train.evals import report
from train.metrics import log0

METHODS = ('hypernet', 'fvt')


def methods_of(cfg, quiet: bool = False) -> list[str]:
  """The embedding methods to run; 'hypernet' without `transfer.hypernet_workdir` falls back to
  fvt, and says so."""
  got = [m.strip() for m in str(cfg.dynamic_embeddings).split(',')
         if m.strip()]
  for m in got:
    if m not in METHODS:
      raise ValueError(f'dynamic_embeddings={cfg.dynamic_embeddings!r}: {m!r} is not one of '
                       f'{METHODS}')
  if not got:
    raise ValueError('dynamic_embeddings is empty: give hypernet and/or fvt')
  if 'hypernet' in got and not cfg.transfer.hypernet_workdir:
    if not quiet:
      log0('WARNING dynamic tokenization: no hypernetwork (transfer.hypernet_workdir is empty); '
           'the new tokens get FVT embeddings (the mean of the merged tokens\' embeddings)')
    got = ['fvt' if m == 'hypernet' else m for m in got]
  return list(dict.fromkeys(got))


def mode_of(cfg) -> str:
  return str(cfg.get('dynamic_mode', 'causal'))


def min_count_of(cfg) -> int:
  got = cfg.get('dynamic_min_count', 1)
  if isinstance(got, bool) or not isinstance(got, int) or got < 1:
    raise ValueError(f'dynamic_min_count={got!r}: expected an integer >= 1 (how often a pair '
                     'must have been seen in the scored prefix before it becomes a token; 1: '
                     'LZW)')
  return int(got)


def check_config(cfg) -> list[tuple[str, float]]:
  """Validates the dynamic keys before anything loads; returns the parsed settings. (The family,
  pretrained only, is checked by the eval and sample modes' dispatcher: train/modes/.)"""
  specs = dynamic_bpe.parse_spec(cfg.dynamic)
  dynamic_bpe.check_mode(mode_of(cfg), specs)
  min_count_of(cfg)
  if str(cfg.dynamic_boundary) not in dynamic_bpe.BOUNDARIES:
    raise ValueError(f'dynamic_boundary={cfg.dynamic_boundary!r}: expected one of '
                     f'{dynamic_bpe.BOUNDARIES}')
  methods_of(cfg, quiet=True)
  return specs


def _nll_fn(graphdef, dtype):
  """jitted (state, new_in [M, D], new_out [M, D], n_new, batch) -> (nll_sum, n_tokens,
  n_bytes) of the LM with its tables extended by `n_new` valid new rows (the rest masked)."""

  @jax.jit
  def fn(state, new_in, new_out, n_new, batch):
    lm = nnx.merge(graphdef, state)
    base_in = lm.embed.embedding[...]
    base_out = base_in if lm.tie_embeddings else lm.readout.kernel[...].T
    v = base_in.shape[0]
    e_in = jnp.concatenate([base_in, new_in.astype(base_in.dtype)])
    e_out = jnp.concatenate([base_out, new_out.astype(base_out.dtype)])
    x = jnp.take(e_in, batch['inputs'], axis=0).astype(dtype)
    h, _ = lm.transformer(x, batch['positions'], batch['segment_ids'])
    logits = jnp.einsum('btd,vd->btv', h, e_out.astype(dtype),
                        preferred_element_type=jnp.float32)
    cols = jnp.arange(e_out.shape[0])
    logits = jnp.where(cols < v + n_new, logits, -jnp.inf)
    nll = (jax.nn.logsumexp(logits, axis=-1)
           - jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0])
    w = batch['weights']
    return (jnp.sum(nll * w), jnp.sum(w),
            jnp.sum(batch['target_bytes']).astype(jnp.float32))

  return fn


def _tables(lm, new_in, new_out):
  """(base input [V, D], base output [V, D], new input, new output) in the input tables' dtype."""
  base_in = lm.embed.embedding[...]
  base_out = base_in if lm.tie_embeddings else lm.readout.kernel[...].T
  return base_in, base_out, new_in.astype(base_in.dtype), new_out.astype(base_out.dtype)


def _embed_rows(base_in, new_in_BxMxD, ids_BxT):
  """Input vectors [B, T, D] of ids from the base table or each row's own new rows."""
  v = base_in.shape[0]
  x_base = jnp.take(base_in, jnp.minimum(ids_BxT, v - 1), axis=0)
  x_new = jax.vmap(lambda t, i: jnp.take(t, i, axis=0))(
      new_in_BxMxD, jnp.clip(ids_BxT - v, 0, new_in_BxMxD.shape[1] - 1))
  return jnp.where((ids_BxT < v)[..., None], x_base, x_new)


def _causal_logits(h_BxTxD, base_out, new_out_BxMxD, known_BxT, dtype):
  """fp32 logits [B, T, V + M] over the base vocabulary and each row's new tokens, a new token
  k allowed at (b, t) only if k < known[b, t] (learnt before that position)."""
  lb = jnp.einsum('btd,vd->btv', h_BxTxD, base_out.astype(dtype),
                  preferred_element_type=jnp.float32)
  ln = jnp.einsum('btd,bmd->btm', h_BxTxD, new_out_BxMxD.astype(dtype),
                  preferred_element_type=jnp.float32)
  m = new_out_BxMxD.shape[1]
  ln = jnp.where(jnp.arange(m) < known_BxT[..., None], ln, -jnp.inf)
  return jnp.concatenate([lb, ln], axis=-1)


def _causal_nll_fn(graphdef, dtype):
  """jitted (state, new_in [B, M, D], new_out [B, M, D], known [B, T], batch) -> (nll_sum,
  n_tokens, n_bytes): one forward over rows that each carry their own new tokens, the output
  vocabulary at each position the base plus the row's entries known there."""

  @jax.jit
  def fn(state, new_in, new_out, known, batch):
    lm = nnx.merge(graphdef, state)
    base_in, base_out, new_in, new_out = _tables(lm, new_in, new_out)
    x = _embed_rows(base_in, new_in, batch['inputs']).astype(dtype)
    h, _ = lm.transformer(x, batch['positions'], batch['segment_ids'])
    v = base_out.shape[0]

    def row_nll(args):  # one row at a time: [T, V] logits, not [B, T, V]
      h_t, new_t, known_t, y_t = args
      lb = jnp.einsum('td,vd->tv', h_t, base_out.astype(dtype),
                      preferred_element_type=jnp.float32)
      ln = jnp.einsum('td,md->tm', h_t, new_t.astype(dtype), preferred_element_type=jnp.float32)
      ln = jnp.where(jnp.arange(ln.shape[-1]) < known_t[:, None], ln, -jnp.inf)
      lse = jnp.logaddexp(jax.nn.logsumexp(lb, axis=-1), jax.nn.logsumexp(ln, axis=-1))
      yb = jnp.take_along_axis(lb, jnp.minimum(y_t, v - 1)[:, None], axis=-1)[:, 0]
      yn = jnp.take_along_axis(ln, jnp.clip(y_t - v, 0, ln.shape[-1] - 1)[:, None],
                               axis=-1)[:, 0]
      return lse - jnp.where(y_t < v, yb, yn)

    nll = jax.lax.map(row_nll, (h, new_out, known, batch['targets']))
    w = batch['weights']
    return (jnp.sum(nll * w), jnp.sum(w),
            jnp.sum(batch['target_bytes']).astype(jnp.float32))

  return fn


class Embedder:
  """Rows for new tokens (by their base parts) with one method, cached by the token's bytes."""

  def __init__(self, method, base_in, base_out, base_vocab, base_bytes, predictor=None):
    self.method, self.base_in, self.base_out = method, base_in, base_out
    self.base_vocab, self.base_bytes, self.predictor = base_vocab, base_bytes, predictor
    self.cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    self.stats = {'new_tokens': 0, 'cache_hits': 0, 'in_base_vocab': 0}
    alphabet = encoders.byte_level_alphabet()
    self._char = {b: c for c, b in alphabet.items()}

  def string(self, spelled: bytes) -> str:
    return ''.join(self._char[b] for b in spelled)

  def rows(self, parts: list[tuple[int, ...]], pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    d = self.base_in.shape[1]
    e_in = np.zeros((pad_to, d), np.float32)
    e_out = np.zeros((pad_to, d), np.float32)
    todo = []
    for k, p in enumerate(parts):
      key = b''.join(self.base_bytes[x] for x in p)
      self.stats['new_tokens'] += 1
      if key in self.cache:
        self.stats['cache_hits'] += 1
        e_in[k], e_out[k] = self.cache[key]
        continue
      s = self.string(key)
      if s in self.base_vocab:
        i = self.base_vocab[s]
        self.stats['in_base_vocab'] += 1
        self.cache[key] = (self.base_in[i], self.base_out[i])
      elif self.method == 'fvt':
        self.cache[key] = (self.base_in[list(p)].mean(0), self.base_out[list(p)].mean(0))
      else:
        todo.append((k, key, s))
        continue
      e_in[k], e_out[k] = self.cache[key]
    if todo:
      pred_in, pred_out = self.predictor([s for _, _, s in todo])
      pred_out = pred_in if pred_out is None else pred_out
      for j, (k, key, _) in enumerate(todo):
        self.cache[key] = (np.asarray(pred_in[j]), np.asarray(pred_out[j]))
        e_in[k], e_out[k] = self.cache[key]
    return e_in, e_out


def score(fn, lm_state, merged: list[dynamic_bpe.Merged], emb: Embedder, pad: int
          ) -> np.ndarray:
  """[nll_sum (nats), scored tokens, scored bytes] of merged batches with `emb`'s new rows."""
  tot = np.zeros(3)
  for m in merged:
    e_in, e_out = emb.rows(m.parts, pad)
    got = fn(lm_state, jnp.asarray(e_in), jnp.asarray(e_out), jnp.int32(len(m.parts)),
             {k: jnp.asarray(v) for k, v in m.batch.items()})
    tot += np.array([float(x) for x in got])
  return tot


def row_tables(emb: Embedder, parts: list[list[tuple[int, ...]]], pad: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """Each row's new rows [B, pad, D] (input, output): one `emb.rows` call for the whole batch
  (one hypernetwork call for what the cache lacks)."""
  flat = [p for row in parts for p in row]
  e_in, e_out = emb.rows(flat, max(len(flat), 1))
  d = e_in.shape[1]
  t_in = np.zeros((len(parts), pad, d), np.float32)
  t_out = np.zeros((len(parts), pad, d), np.float32)
  k = 0
  for r, row in enumerate(parts):
    t_in[r, :len(row)], t_out[r, :len(row)] = e_in[k:k + len(row)], e_out[k:k + len(row)]
    k += len(row)
  return t_in, t_out


def score_causal(fn, lm_state, done: list[dynamic_bpe.Causal], emb: Embedder, pad: int
                 ) -> np.ndarray:
  """[nll_sum (nats), scored tokens, scored bytes] of causally merged batches."""
  tot = np.zeros(3)
  for c in done:
    t_in, t_out = row_tables(emb, c.parts, pad)
    got = fn(lm_state, jnp.asarray(t_in), jnp.asarray(t_out), jnp.asarray(c.known),
             {k: jnp.asarray(v) for k, v in c.batch.items()})
    tot += np.array([float(x) for x in got])
  return tot


def _bucket(n: int) -> int:
  return max(8, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def run(cfg, workdir: str, step: int | None = None, predictor=None, plain: dict | None = None
        ) -> dict:
  """The table for `cfg.dynamic` on the model of `workdir` / `model.source`. `predictor`: a
  hypernetwork already loaded (--mode=transfer passes the base model's for its transferred
  copies, which share its body); `plain`: the model's plain evaluation if already done."""
  specs = check_config(cfg)
  if jax.process_count() > 1:
    raise ValueError('dynamic tokenization merges per host batch: run it as one process')
  methods = methods_of(cfg)
  if 'hypernet' in methods and predictor is None:
    hw = cfg.transfer.hypernet_workdir
    saved = config_lib.load_saved(hw) if storage.isdir(hw) else None
    if saved is not None and saved.family == 'zett' and saved.model.source != cfg.model.source:
      raise ValueError(f'transfer.hypernet_workdir={hw} embeds tokens for model.source='
                       f'{saved.model.source!r}, not {cfg.model.source!r}. A tokenizer-'
                       'transferred copy of that model gets its hypernetwork through '
                       '--mode=transfer with --config.dynamic (the body is the base\'s); '
                       'without transfer.hypernet_workdir, dynamic tokenization uses FVT')
    predictor = runs.load_predictor(
        cfg.transfer.hypernet_workdir, cfg.model.source,
        step=int(cfg.transfer.hypernet_step))
  setup, state, s = trainer.restore(cfg, workdir, step)
  workdir = storage.check_workdir(workdir)
  fam = setup.family
  enc = fam.encoder
  if not (isinstance(enc, encoders.BPEEncoder)
          and target_tokenizers.is_byte_level(enc.tokenizer)):
    raise ValueError(f'dynamic tokenization merges byte-level BPE tokens; {enc.name} is not a '
                     'byte-level BPE tokenizer')
  batches = fam.eval_batches(jax.process_index(), jax.process_count(), cfg.train.eval_batches)
  if plain is None:
    plain = setup.evaluate(state['params'], batches)
  model = setup.model(state['params'])
  max_parts = 7
  if predictor is not None:
    max_parts = predictor.max_pieces
  dyn = dynamic_bpe.DynamicBPE(enc, max_parts, str(cfg.dynamic_boundary))
  graphdef, lm_state = nnx.split(model)
  fn = _nll_fn(graphdef, model.dtype)
  base_in = np.asarray(model.embed.embedding[...], np.float32)
  base_out = base_in if model.tie_embeddings else np.asarray(model.readout.kernel[...]).T
  base_vocab = enc.tokenizer.get_vocab(with_added_tokens=True)
  n_bytes = plain['n_bytes']
  mode = mode_of(cfg)
  causal = mode == 'causal'
  per = 'merges_per_row' if causal else 'merges_per_batch'
  rows = [{'setting': 'none (plain eval)', 'merges_from': '-', 'embeddings': '-', per: 0.0,
           'tokens_per_byte': plain['n_tokens'] / n_bytes, 'token_reduction': 0.0,
           'bpb': plain['bpb'], 'bpb_change': 0.0}]
  if not causal:
    rows[0].update(bpb_charged=plain['bpb'], bpb_charged_change=0.0)
  embedders = {m: Embedder(m, base_in, base_out, base_vocab, dyn.base_bytes, predictor)
               for m in methods}
  cfn = _causal_nll_fn(graphdef, model.dtype) if causal else None
  min_count = min_count_of(cfg)
  for kind, value in specs:
    setting = f'{kind}:{value:g}'
    if causal:
      merged = [dyn.causal(b, int(value), min_count) for b in batches]
      made = [float(np.mean(m.merges)) for m in merged]
      short = 0
      pad = _bucket(max(max(m.merges) for m in merged))
    else:
      merged = [dyn.merge(b, kind, value) for b in batches]
      made = [m.merges for m in merged]
      short = sum(m.exhausted for m in merged)
      pad = _bucket(max(made))
    for b, m in zip(batches, merged):
      dynamic_bpe.check_bytes(b, m, dyn.base_bytes, dyn.vocab)
    if short:
      log0(f'WARNING dynamic={setting}: in {short} of {len(merged)} batches no pair was left to '
           f'merge before the {"budget" if kind == "merges" else "target"} was reached (merges '
           f'made per batch: {min(made)}-{max(made)}); those batches are evaluated as merged')
    before = sum(m.tokens_before for m in merged)
    after = sum(m.tokens_after for m in merged)
    for method in methods:
      if causal:
        tot = score_causal(cfn, lm_state, merged, embedders[method], pad)
      else:
        tot = score(fn, lm_state, merged, embedders[method], pad)
      if abs(tot[2] - n_bytes) > 0.5:
        raise AssertionError(f'dynamic {setting}: {tot[2]} bytes scored, the plain eval '
                             f'{n_bytes}')
      bpb = tot[0] / tot[2] / math.log(2)
      row = {'setting': setting,
             'merges_from': 'scored prefix (causal)' if causal else 'the scored batch',
             'embeddings': method, per: float(np.mean(made)),
             'tokens_per_byte': float(tot[1] / tot[2]),
             'token_reduction': float(1 - after / before),
             'bpb': float(bpb), 'bpb_change': float(bpb / plain['bpb'] - 1)}
      note = ''
      if not causal:
        # the merge list was chosen from the scored text: what transmitting it would cost
        charge = sum(dynamic_bpe.merge_list_bits(m.merges, dyn.vocab) for m in merged)
        charged = (tot[0] / math.log(2) + charge) / tot[2]
        row.update(bpb_charged=float(charged),
                   bpb_charged_change=float(charged / plain['bpb'] - 1),
                   batches_out_of_pairs=int(short))
        note = (f'; merges chosen from the scored batch, charged for the merge list '
                f'{charged:.4f}')
      rows.append(row)
      log0(f'[dynamic] {setting} {mode} {method}: {np.mean(made):.1f} merges per '
           f'{"row" if causal else "batch"}, tokens -{100 * (1 - after / before):.1f} %, bits '
           f'per byte {bpb:.4f} ({100 * (bpb / plain["bpb"] - 1):+.2f} %){note}')
  cache = {m: dict(e.stats) for m, e in embedders.items()}
  log0(f'[dynamic] new-token embeddings (per method): {cache}')
  table = report.write_rows(rows, workdir, 'dynamic', formats=('md', 'json'),
                            fmt=report.fmt_fixed)
  log0(table.rstrip('\n'))
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'dynamic_meta.json'),
                       {'step': s, 'mode': mode, 'boundary': str(cfg.dynamic_boundary),
                        'min_count': min_count,
                        'max_parts': max_parts, 'cache': cache, 'n_bytes': n_bytes,
                        'eval_batches': len(batches)})
  return {'rows': rows, 'cache': cache}


def generate_causal(model, dyn: dynamic_bpe.DynamicBPE, emb: Embedder, ids: list[int],
                    max_new_tokens: int, budget: int, min_count: int = 1,
                    temperature: float = 0.0, top_p: float = 1.0, rng=None,
                    eos_id: int | None = None, cached: bool = True) -> dict:
  """Generation under causal merges. `ids`: the base tokenization of the prompt, its first id
  the document start (an input only). The prompt is segmented by a `CausalTable` grown along
  it; then each step draws from the base vocabulary plus the entries learnt so far, and the
  drawn token grows the table like a scored one (its new entry embedded by `emb` at once).
  `cached`: prefill a KV cache with the prompt and decode one token per step; else rerun the
  padded sequence per step (the reference the cache is tested against). Returns the tokens
  (prompt after merging, generated; ids `vocab + k` for entry k), the table's parts, the
  generated bytes and the decode rate (tokens per second after the steps that compile: the
  first, and with the cache the first decode)."""
  from models import token_lm  # pylint: disable=import-outside-toplevel
  v = dyn.vocab
  table = dynamic_bpe.CausalTable(dyn, budget, min_count)
  base, i = ids[1:], 0
  prompt = [int(ids[0])]
  while i < len(base):
    cur = table.match(base, i)
    prompt.append(table.id_of(cur))
    table.step(cur)
    i += len(cur)
  total = len(prompt) + max_new_tokens
  pad = _bucket(total)  # any budget: the same shapes (and compilations) as without merges
  e_in, e_out = np.zeros((2, 1, pad, emb.base_in.shape[1]), np.float32)
  if table.parts:
    e_in[0, :len(table.parts)], e_out[0, :len(table.parts)] = emb.rows(table.parts,
                                                                        len(table.parts))
  graphdef, lm_state = nnx.split(model)
  dtype = model.dtype

  def logits_at(lm, h_1xD, new_out, known):
    _, base_out, _, new_out = _tables(lm, new_out, new_out)
    return _causal_logits(h_1xD[None, None], base_out, new_out, known.reshape(1, 1), dtype)[0, 0]

  @jax.jit
  def prefill(lm_state, new_in, new_out, known, tokens):
    lm = nnx.merge(graphdef, lm_state)
    base_in, _, new_in, _ = _tables(lm, new_in, new_out)
    cache = lm.init_cache(1, total)
    x = _embed_rows(base_in, new_in, tokens[None]).astype(dtype)
    h, cache = lm.transformer(x, jnp.arange(tokens.shape[0])[None], None, cache, 0)
    return logits_at(lm, h[0, -1], new_out, known), cache

  @jax.jit
  def decode(lm_state, new_in, new_out, known, tok, index, cache):
    lm = nnx.merge(graphdef, lm_state)
    base_in, _, new_in, _ = _tables(lm, new_in, new_out)
    x = _embed_rows(base_in, new_in, tok.reshape(1, 1)).astype(dtype)
    h, cache = lm.transformer(x, index.reshape(1, 1), None, cache, index)
    return logits_at(lm, h[0, 0], new_out, known), cache

  @jax.jit
  def uncached(lm_state, new_in, new_out, known, tokens, length):
    lm = nnx.merge(graphdef, lm_state)
    base_in, _, new_in, _ = _tables(lm, new_in, new_out)
    x = _embed_rows(base_in, new_in, tokens[None]).astype(dtype)
    h, _ = lm.transformer(x, jnp.arange(tokens.shape[0])[None], None)
    return logits_at(lm, jax.lax.dynamic_index_in_dim(h[0], length - 1, keepdims=False),
                     new_out, known)

  seq = np.full(total, dyn.encoder.pad_id, np.int32)
  seq[:len(prompt)] = prompt
  n = len(prompt)
  rng = jax.random.key(0) if rng is None else rng
  cache, start, warm = None, None, 1 if cached else 0  # steps that compile: untimed
  if emb.predictor is not None:
    emb.predictor(['warm'])  # its compilation for one string, before the timed steps
  for step in range(max_new_tokens):
    args = (lm_state, jnp.asarray(e_in), jnp.asarray(e_out), jnp.int32(len(table.parts)))
    if not cached:
      logits = uncached(*args, jnp.asarray(seq), jnp.int32(n))
    elif cache is None:
      logits, cache = prefill(*args, jnp.asarray(seq[:n]))
    else:
      logits, cache = decode(*args, jnp.int32(seq[n - 1]), jnp.int32(n - 1), cache)
    rng, sub = jax.random.split(rng)
    tok = int(token_lm.sample_logits(logits[None], jnp.float32(temperature),
                                     jnp.float32(top_p), sub)[0])
    if step == warm:
      start = time.perf_counter()
    if eos_id is not None and tok == eos_id:
      break
    seq[n] = tok
    n += 1
    new = table.step(table.parts_of(tok))
    if new is not None:
      k = new - v
      r_in, r_out = emb.rows([table.parts[k]], 1)
      e_in[0, k], e_out[0, k] = r_in[0], r_out[0]
  gen = [int(t) for t in seq[len(prompt):n]]
  elapsed = time.perf_counter() - start if start is not None else 0.0
  timed = len(gen) - warm - 1
  spelled = b''.join(b''.join(dyn.base_bytes[x] for x in table.parts_of(t)) for t in gen)
  return {'prompt': prompt, 'generated': gen, 'parts': list(table.parts), 'bytes': spelled,
          'tokens_per_s': timed / elapsed if timed > 0 and elapsed > 0 else 0.0}


def sample(cfg, workdir: str, step: int | None = None) -> list[str]:
  """`--mode=sample` with `dynamic`. Causal (`dynamic_mode=causal`): the table grows along the
  prompt and the generated text (`generate_causal`, KV-cached; `merges:N`, the first setting,
  caps its entries). Batch-level: the prompt is tokenized by the model, merged by the first
  setting of `dynamic` (the prompt is the batch), the new tokens embedded by the first of
  `dynamic_embeddings`; generation then draws from the base vocabulary plus the prompt's new
  tokens (a generated new token is written out as the bytes it spells). Uncached: each new
  token runs the model over the padded sequence (one compilation)."""
  kind, value = check_config(cfg)[0]
  if mode_of(cfg) == 'causal':
    return [sample_causal(cfg, workdir, step, int(value))['text']]
  return [sample_batch_level(cfg, workdir, step)['text']]


def _sampling_setup(cfg, workdir: str, step: int | None, why: str):
  """What both samplers start from: (method, hypernetwork predictor or None, encoder, model,
  DynamicBPE, restored step). An empty prompt is a ValueError saying `why` one is needed."""
  method = methods_of(cfg)[0]
  if not str(cfg.sample.prompt):
    raise ValueError(f'sample.prompt is empty: {why}')
  predictor = None
  if method == 'hypernet':
    predictor = runs.load_predictor(
        cfg.transfer.hypernet_workdir, cfg.model.source,
        step=int(cfg.transfer.hypernet_step))
  setup, state, s = trainer.restore(cfg, workdir, step)
  enc = setup.family.encoder
  model = setup.model(state['params'])
  dyn = dynamic_bpe.DynamicBPE(enc, predictor.max_pieces if predictor else 7,
                               str(cfg.dynamic_boundary))
  return method, predictor, enc, model, dyn, s


def sample_batch_level(cfg, workdir: str, step: int | None = None) -> dict:
  """Batch-level sampling (see `sample`): {'text', 'tokens_per_s'}."""
  from models import token_lm  # pylint: disable=import-outside-toplevel
  kind, value = check_config(cfg)[0]
  method, predictor, enc, model, dyn, s = _sampling_setup(
      cfg, workdir, step, 'dynamic tokenization merges the prompt\'s tokens')
  ids = [enc.bos_id] + [int(t) for t in enc.encode(cfg.sample.prompt)]
  n_new_max = int(cfg.sample.max_new_tokens)
  total = len(ids) + n_new_max
  row = {k: np.zeros((1, len(ids) - 1), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                           'positions', 'target_bytes')}
  row['weights'] = np.ones((1, len(ids) - 1), np.float32)
  row['inputs'][0], row['targets'][0] = ids[:-1], ids[1:]
  row['segment_ids'][0], row['positions'][0] = 1, np.arange(len(ids) - 1)
  merged = dyn.merge(row, kind, value)
  if merged.exhausted:
    log0(f'WARNING dynamic={kind}:{value:g}: the prompt allows only {merged.merges} merges')
  w = merged.batch['weights'][0] > 0
  prompt = [int(merged.batch['inputs'][0, 0])] + [int(t) for t in merged.batch['targets'][0][w]]
  base_in = np.asarray(model.embed.embedding[...], np.float32)
  base_out = base_in if model.tie_embeddings else np.asarray(model.readout.kernel[...]).T
  emb = Embedder(method, base_in, base_out, enc.tokenizer.get_vocab(with_added_tokens=True),
                 dyn.base_bytes, predictor)
  pad = _bucket(len(merged.parts))
  e_in, e_out = emb.rows(merged.parts, pad)
  graphdef, lm_state = nnx.split(model)
  v = dyn.vocab

  @jax.jit
  def next_logits(lm_state, e_in, e_out, tokens, length):
    lm = nnx.merge(graphdef, lm_state)
    bi = lm.embed.embedding[...]
    bo = bi if lm.tie_embeddings else lm.readout.kernel[...].T
    ti = jnp.concatenate([bi, e_in.astype(bi.dtype)])
    to = jnp.concatenate([bo, e_out.astype(bo.dtype)])
    x = jnp.take(ti, tokens, axis=0).astype(lm.dtype)[None]
    h, _ = lm.transformer(x, jnp.arange(tokens.shape[0])[None], None)
    last = jax.lax.dynamic_index_in_dim(h[0], length - 1, keepdims=False)
    logits = jnp.einsum('d,vd->v', last, to.astype(lm.dtype), preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(to.shape[0]) < v + len(merged.parts), logits, -jnp.inf)

  seq = np.full(total, enc.pad_id, np.int32)
  seq[:len(prompt)] = prompt
  n = len(prompt)
  rng = jax.random.key(cfg.sample.seed)
  start = None
  for i in range(n_new_max):
    logits = next_logits(lm_state, jnp.asarray(e_in), jnp.asarray(e_out), jnp.asarray(seq),
                         jnp.int32(n))
    rng, sub = jax.random.split(rng)
    tok = int(token_lm.sample_logits(logits[None], jnp.float32(cfg.sample.temperature),
                                     jnp.float32(cfg.sample.top_p), sub)[0])
    if i == 0:  # the step that compiles: untimed
      start = time.perf_counter()
    if tok == enc.eos_id:
      break
    seq[n] = tok
    n += 1
  spelled = [b''.join(dyn.base_bytes[x] for x in p) for p in merged.parts]
  gen = seq[len(prompt):n]
  text = b''.join(dyn.base_bytes[t] if t < v else spelled[t - v] for t in gen)
  used = int((gen >= v).sum())
  out = cfg.sample.prompt + text.decode('utf-8', errors='replace')
  rate = (len(gen) - 1) / (time.perf_counter() - start) if len(gen) > 1 else 0.0
  log0(f'[dynamic] prompt: {len(ids) - 1} tokens -> {len(prompt) - 1} after {merged.merges} '
       f'merges ({method} embeddings); generated {len(gen)} tokens, {used} of them new tokens, '
       f'{rate:.1f} tokens/s (uncached; after the step that compiles)')
  log0(f'--- dynamic sample (step {s}, {kind}:{value:g}, temperature '
       f'{cfg.sample.temperature})\n{out}')
  return {'text': out, 'tokens_per_s': rate}


def sample_causal(cfg, workdir: str, step: int | None, budget: int) -> dict:
  """Causal sampling (see `sample`): `generate_causal`'s dict plus 'text'."""
  method, predictor, enc, model, dyn, s = _sampling_setup(
      cfg, workdir, step, 'causal dynamic tokenization grows its table from the prompt and the '
      'generated text; give a prompt')
  base_in = np.asarray(model.embed.embedding[...], np.float32)
  base_out = base_in if model.tie_embeddings else np.asarray(model.readout.kernel[...]).T
  emb = Embedder(method, base_in, base_out, enc.tokenizer.get_vocab(with_added_tokens=True),
                 dyn.base_bytes, predictor)
  ids = [enc.bos_id] + [int(t) for t in enc.encode(cfg.sample.prompt)]
  got = generate_causal(model, dyn, emb, ids, int(cfg.sample.max_new_tokens), budget,
                        min_count_of(cfg), float(cfg.sample.temperature),
                        float(cfg.sample.top_p), jax.random.key(cfg.sample.seed), enc.eos_id)
  gen, v = got['generated'], dyn.vocab
  out = cfg.sample.prompt + got['bytes'].decode('utf-8', errors='replace')
  log0(f'[dynamic] causal: prompt {len(ids) - 1} tokens -> {len(got["prompt"]) - 1}; '
       f'generated {len(gen)} tokens, {sum(t >= v for t in gen)} of them new tokens, '
       f'{len(got["parts"])} entries learnt ({method} embeddings), '
       f'{got["tokens_per_s"]:.1f} tokens/s (KV cache; after the steps that compile)')
  log0(f'--- dynamic sample (step {s}, causal merges:{budget}, temperature '
       f'{cfg.sample.temperature})\n{out}')
  return {**got, 'text': out}
