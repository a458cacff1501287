"""Dynamic tokenization at inference (`--mode=eval` / `--mode=sample` with `--config.dynamic`).

  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2_dyn --mode=eval \
      --config.dynamic=compression:0.1,0.2 --config.dynamic_embeddings=hypernet,fvt \
      --config.transfer.hypernet_workdir=runs/zett_smollm2

Per evaluation batch, frequent adjacent token pairs are merged BPE-style into new tokens
(data/dynamic_bpe.py: a merge budget `merges:N` or a target `compression:F`, merges inside
pretokens or words, `dynamic_boundary`). The new tokens' embeddings come from
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

Writes `WORKDIR/dynamic.md` / `dynamic.json`: per setting and embedding method the merges made
per batch, tokens per byte, the token reduction, bits per byte and its change.
"""
from __future__ import annotations

import math

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


def check_config(cfg) -> list[tuple[str, float]]:
  """Validates the dynamic keys before anything loads; returns the parsed settings. (The family,
  pretrained only, is checked by the eval and sample modes' dispatcher: train/modes/.)"""
  specs = dynamic_bpe.parse_spec(cfg.dynamic)
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
  rows = [{'setting': 'none (plain eval)', 'embeddings': '-', 'merges_per_batch': 0.0,
           'tokens_per_byte': plain['n_tokens'] / n_bytes, 'token_reduction': 0.0,
           'bpb': plain['bpb'], 'bpb_change': 0.0}]
  embedders = {m: Embedder(m, base_in, base_out, base_vocab, dyn.base_bytes, predictor)
               for m in methods}
  for kind, value in specs:
    merged = [dyn.merge(b, kind, value) for b in batches]
    for b, m in zip(batches, merged):
      dynamic_bpe.check_bytes(b, m, dyn.base_bytes, dyn.vocab)
    made = [m.merges for m in merged]
    short = sum(m.exhausted for m in merged)
    setting = f'{kind}:{value:g}'
    if short:
      log0(f'WARNING dynamic={setting}: in {short} of {len(merged)} batches no pair was left to '
           f'merge before the {"budget" if kind == "merges" else "target"} was reached (merges '
           f'made per batch: {min(made)}-{max(made)}); those batches are evaluated as merged')
    pad = _bucket(max(made))
    before = sum(m.tokens_before for m in merged)
    after = sum(m.tokens_after for m in merged)
    for method in methods:
      tot = score(fn, lm_state, merged, embedders[method], pad)
      if abs(tot[2] - n_bytes) > 0.5:
        raise AssertionError(f'dynamic {setting}: {tot[2]} bytes scored, the plain eval '
                             f'{n_bytes}')
      bpb = tot[0] / tot[2] / math.log(2)
      rows.append({'setting': setting, 'embeddings': method,
                   'merges_per_batch': float(np.mean(made)),
                   'tokens_per_byte': float(tot[1] / tot[2]),
                   'token_reduction': float(1 - after / before),
                   'bpb': float(bpb), 'bpb_change': float(bpb / plain['bpb'] - 1),
                   'batches_out_of_pairs': int(short)})
      log0(f'[dynamic] {setting} {method}: {np.mean(made):.1f} merges per batch, tokens '
           f'-{100 * (1 - after / before):.1f} %, bits per byte {bpb:.4f} '
           f'({100 * (bpb / plain["bpb"] - 1):+.2f} %)')
  cache = {m: dict(e.stats) for m, e in embedders.items()}
  log0(f'[dynamic] new-token embeddings (per method): {cache}')
  table = report.write_rows(rows, workdir, 'dynamic', formats=('md', 'json'),
                            fmt=report.fmt_fixed)
  log0(table.rstrip('\n'))
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'dynamic_meta.json'),
                       {'step': s, 'boundary': str(cfg.dynamic_boundary),
                        'max_parts': max_parts, 'cache': cache, 'n_bytes': n_bytes,
                        'eval_batches': len(batches)})
  return {'rows': rows, 'cache': cache}


def sample(cfg, workdir: str, step: int | None = None) -> list[str]:
  """`--mode=sample` with `dynamic`: the prompt is tokenized by the model, merged by the first
  setting of `dynamic` (the prompt is the batch), the new tokens embedded by the first of
  `dynamic_embeddings`; generation then draws from the base vocabulary plus the prompt's new
  tokens (a generated new token is written out as the bytes it spells). Uncached: each new
  token runs the model over the padded sequence (one compilation)."""
  from models import token_lm  # pylint: disable=import-outside-toplevel
  kind, value = check_config(cfg)[0]
  method = methods_of(cfg)[0]
  if not str(cfg.sample.prompt):
    raise ValueError('sample.prompt is empty: dynamic tokenization merges the prompt\'s tokens')
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
  for _ in range(n_new_max):
    logits = next_logits(lm_state, jnp.asarray(e_in), jnp.asarray(e_out), jnp.asarray(seq),
                         jnp.int32(n))
    rng, sub = jax.random.split(rng)
    tok = int(token_lm.sample_logits(logits[None], jnp.float32(cfg.sample.temperature),
                                     jnp.float32(cfg.sample.top_p), sub)[0])
    if tok == enc.eos_id:
      break
    seq[n] = tok
    n += 1
  spelled = [b''.join(dyn.base_bytes[x] for x in p) for p in merged.parts]
  gen = seq[len(prompt):n]
  text = b''.join(dyn.base_bytes[t] if t < v else spelled[t - v] for t in gen)
  used = int((gen >= v).sum())
  out = cfg.sample.prompt + text.decode('utf-8', errors='replace')
  log0(f'[dynamic] prompt: {len(ids) - 1} tokens -> {len(prompt) - 1} after {merged.merges} '
       f'merges ({method} embeddings); generated {len(gen)} tokens, {used} of them new tokens')
  log0(f'--- dynamic sample (step {s}, {kind}:{value:g}, temperature '
       f'{cfg.sample.temperature})\n{out}')
  return [out]
