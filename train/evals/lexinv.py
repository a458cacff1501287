"""The lexinvariant LM's evaluations (`--mode=eval` of family 'lexinv', train/families/lexinv.py),
for the lexinvariant model and, given a trained standard LM of the same size on the same data
(`lexinv.baseline_workdir`), for both. Files written into the workdir:

  lexinv_eval_step{N}.json / .md     every figure below
  lexinv_ppl_by_position_step{N}.png perplexity vs context position for both, and their ratio

Evaluations:
  * loss by context position (position inside the document) on validation text, in
    log-spaced bins; ratio = ppl_lexinv / ppl_standard per bin.
  * substitution cipher: the validation text under one random permutation of the lexical ids
    (the byte/subword ids, or those seen in training under `lexinv.vocab='train'`; specials
    fixed); loss of both models on plain and ciphered text. The lexinvariant
    model's difference is reported with its standard error over batches (its E is resampled).
  * deciphering probe: every row ciphered with its own random permutation; a linear softmax
    probe on the final hidden state at each position is trained (on `probe_rows` rows) to give
    the plaintext id of the current input token, and tested on held-out rows: token accuracy
    (all / first 32 positions / second half of the row), the majority-class baseline, and the
    recovered cipher mapping (per row and cipher symbol, the probe's majority vote) accuracy.
  * LookUp and Permutation (`data/synthetic.py`): greedy answer accuracy for both models.
  * Repeat: loss and greedy accuracy on each copy of a thrice-repeated random string (does the
    model copy from its context: an induction head).
  * attention by head: mass on the current and the two previous tokens and the entropy, per
    layer and head (which heads work by position).
"""
from __future__ import annotations

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data import pipeline, synthetic
from models import token_lm
from train import partitioning, storage
from train.evals import report
from train.metrics import log0

BINS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


# -- uniform per-model functions ---------------------------------------------------------------
class _Scorer:
  """nll / logits / hidden states of one model (lexinvariant or standard) as jitted functions
  of (params, batch, rng); logits are over the original token ids."""

  def __init__(self, name, setup, params):
    self.name, self.setup, self.params = name, setup, params
    lex = setup.cfg.family == 'lexinv'

    def run(params, batch, rng):
      model = setup.model(params)
      if lex:
        draw = model.draw(rng, batch['inputs'].shape[0])
        h, _ = model.hidden(batch['inputs'], draw, batch['positions'], batch['segment_ids'])
        return model, h, draw
      h, _ = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'])
      return model, h, None

    def nll(params, batch, rng):
      model, h, draw = run(params, batch, rng)
      if lex:
        return model.token_nll(h, batch['targets'], draw)
      return token_lm.token_nll(model, h, batch['targets'])

    def logits(params, batch, rng):
      model, h, draw = run(params, batch, rng)
      return model.token_logits(h, draw) if lex else model.logits(h)

    def pred(params, batch, rng):
      return jnp.argmax(logits(params, batch, rng), axis=-1)

    self._nll, self._pred = jax.jit(nll), jax.jit(pred)
    self._hidden = jax.jit(lambda p, b, r: run(p, b, r)[1].astype(jnp.float32))

  def _batch(self, b):
    keys = ('inputs', 'targets', 'segment_ids', 'positions', 'weights', 'target_bytes')
    return partitioning.global_batch({k: b[k] for k in keys}, self.setup.mesh)

  def nll(self, b, rng):
    return np.asarray(jax.device_get(self._nll(self.params, self._batch(b), rng)))

  def pred(self, b, rng):
    return np.asarray(jax.device_get(self._pred(self.params, self._batch(b), rng)))

  def hidden(self, b, rng):
    return np.asarray(jax.device_get(self._hidden(self.params, self._batch(b), rng)))


def _cipher(vocab_size: int, alphabet: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random permutation of the `alphabet` ids (int32 [vocab_size]); every other id fixed."""
  sigma = np.arange(vocab_size, dtype=np.int32)
  sigma[alphabet] = rng.permutation(alphabet)
  return sigma


def cipher_alphabet(model, encoder) -> np.ndarray:
  """The ids a substitution cipher permutes: the lexinvariant model's lexical ids (all real ids,
  or the ids seen in training under `lexinv.vocab='train'`), never pad/bos/eos."""
  special = [encoder.pad_id, encoder.bos_id, encoder.eos_id]
  return np.setdiff1d(model.lexical_ids(), special).astype(np.int32)


def _apply_cipher(batch, sigma_rows):
  """sigma_rows: [V] (one cipher) or [B, V] (one per row)."""
  out = dict(batch)
  s = np.broadcast_to(sigma_rows, (batch['inputs'].shape[0], sigma_rows.shape[-1]))
  out['inputs'] = np.take_along_axis(s, batch['inputs'], axis=1)
  out['targets'] = np.take_along_axis(s, batch['targets'], axis=1)
  return out


def position_curve(scorers, batches, key, max_len):
  sums = {s.name: np.zeros(max_len) for s in scorers}
  count = np.zeros(max_len)
  for i, b in enumerate(batches):
    w = b['weights'] > 0
    pos = b['positions'][w]
    np.add.at(count, pos, 1)
    for s in scorers:
      np.add.at(sums[s.name], pos, s.nll(b, jax.random.fold_in(key, i))[w])
  rows = []
  for lo, hi in zip(BINS[:-1], BINS[1:]):
    if lo >= max_len:
      break
    n = count[lo:hi].sum()
    if n == 0:
      continue
    r = {'positions': f'{lo}-{min(hi, max_len) - 1}', 'lo': lo, 'n_tokens': int(n)}
    for s in scorers:
      r[f'loss_{s.name}'] = float(sums[s.name][lo:hi].sum() / n)
    if len(scorers) == 2:
      r['ppl_ratio'] = math.exp(r[f'loss_{scorers[0].name}'] - r[f'loss_{scorers[1].name}'])
    rows.append(r)
  per_pos = {s.name: (sums[s.name] / np.maximum(count, 1)).tolist() for s in scorers}
  return rows, per_pos, count


def cipher_eval(scorers, batches, key, sigma):
  out = {}
  for s in scorers:
    plain, ciph = [], []
    for i, b in enumerate(batches):
      w = b['weights']
      k = jax.random.fold_in(key, i)
      plain.append((s.nll(b, k) * w).sum() / w.sum())
      ciph.append((s.nll(_apply_cipher(b, sigma), jax.random.fold_in(key, 10_000 + i)) * w).sum()
                  / w.sum())
    diff = np.array(ciph) - np.array(plain)
    out[s.name] = {'loss_plain': float(np.mean(plain)), 'loss_cipher': float(np.mean(ciph)),
                   'diff': float(diff.mean()),
                   'diff_stderr': float(diff.std(ddof=1) / math.sqrt(len(diff)))
                   if len(diff) > 1 else float('nan')}
  return out


def _fit_linear(x, y, n_classes, steps, l2):
  """Multinomial logistic regression with an L2 penalty (Adam, full batch) on standardized x."""
  mu, sd = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mu) / sd)
  yj = jnp.asarray(y)
  w = {'w': jnp.zeros((x.shape[1], n_classes)), 'b': jnp.zeros((n_classes,))}
  tx = optax.adam(1e-2)
  opt = tx.init(w)

  def loss(w):
    logits = xs @ w['w'] + w['b']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yj).mean()
    return ce + l2 * jnp.sum(jnp.square(w['w']))

  @jax.jit
  def step(w, opt):
    g = jax.grad(loss)(w)
    u, opt = tx.update(g, opt, w)
    return optax.apply_updates(w, u), opt

  for _ in range(steps):
    w, opt = step(w, opt)
  return lambda z: np.asarray(jnp.argmax(jnp.asarray((z - mu) / sd) @ w['w'] + w['b'], -1))


def _fit_probe(x, y, groups, n_classes, steps):
  """The L2 strength is chosen on a held-out fifth of the training rows (`groups`: row ids),
  then the probe is refit on all training rows. Returns (predict, chosen l2)."""
  rows = np.unique(groups)
  held = np.isin(groups, rows[-max(len(rows) // 5, 1):])
  best = None
  for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
    acc = float(np.mean(_fit_linear(x[~held], y[~held], n_classes, steps, l2)(x[held])
                        == y[held]))
    if best is None or acc > best[0]:
      best = (acc, l2)
  return _fit_linear(x, y, n_classes, steps, best[1]), best[1]


def probe_eval(scorers, batches, key, encoder, alphabet, n_train_rows, steps, seed):
  """Train rows: the first n_train_rows non-empty rows; test rows: the rest."""
  rng = np.random.default_rng([seed, 7])
  rows = []  # (plain batch row dict, per-row cipher)
  for b in batches:
    for r in range(b['inputs'].shape[0]):
      if b['weights'][r].sum() > 0:
        rows.append({k: v[r:r + 1] for k, v in b.items()})
  n_test = max(len(rows) - n_train_rows, 1)
  rows = rows[:n_train_rows + n_test]
  sig = np.stack([_cipher(encoder.vocab_size, alphabet, rng) for _ in rows])
  bsz = batches[0]['inputs'].shape[0]
  special = np.array([encoder.pad_id, encoder.bos_id, encoder.eos_id])
  out = {}
  for s in scorers:
    feats, labels, pos, row_id, cipher_ids = [], [], [], [], []
    for start in range(0, len(rows), bsz):
      chunk = rows[start:start + bsz]
      b = pipeline.pad_rows({k: np.concatenate([c[k] for c in chunk]) for k in chunk[0]}, bsz)
      sg = pipeline.pad_rows(sig[start:start + len(chunk)], bsz, fill=sig[0])
      cb = _apply_cipher(b, sg)
      h = s.hidden(cb, jax.random.fold_in(key, start))
      for r in range(len(chunk)):
        m = (b['weights'][r] > 0) & ~np.isin(b['inputs'][r], special)
        feats.append(h[r][m])
        labels.append(b['inputs'][r][m])
        pos.append(b['positions'][r][m])
        row_id.append(np.full(m.sum(), start + r))
        cipher_ids.append(cb['inputs'][r][m])
    x, y = np.concatenate(feats), np.concatenate(labels)
    p, rid, cid = np.concatenate(pos), np.concatenate(row_id), np.concatenate(cipher_ids)
    tr, te = rid < n_train_rows, rid >= n_train_rows
    predict, l2 = _fit_probe(x[tr], y[tr], rid[tr], encoder.vocab_size, steps)
    yhat = predict(x[te])
    ok = yhat == y[te]
    late = p[te] >= (batches[0]['inputs'].shape[1] // 2)
    early = p[te] < 32
    majority = np.bincount(y[tr]).argmax()
    # the recovered mapping: per (row, cipher symbol) the probe's majority vote
    votes = {}
    for r_, c_, yh, yt in zip(rid[te], cid[te], yhat, y[te]):
      votes.setdefault((r_, c_), ([], yt))[0].append(yh)
    mapped = [np.bincount(v).argmax() == t for v, t in votes.values()]
    out[s.name] = {'token_accuracy': float(ok.mean()),
                   'accuracy_first32': float(ok[early].mean()) if early.any() else float('nan'),
                   'accuracy_second_half': float(ok[late].mean()) if late.any() else float('nan'),
                   'majority_baseline': float((y[te] == majority).mean()),
                   'mapping_accuracy': float(np.mean(mapped)),
                   'probe_l2': l2, 'n_train_tokens': int(tr.sum()),
                   'n_test_tokens': int(te.sum())}
  return out


def synthetic_eval(scorers, encoder, cfg, seq_len, key):
  c = cfg.lexinv
  tasks = {
      'lookup': synthetic.lookup_batch(encoder, c.synthetic_n, seq_len, c.eval_seed,
                                       c.lookup_keys, c.lookup_queries),
      'permutation': synthetic.permutation_batch(encoder, c.synthetic_n, seq_len, c.eval_seed,
                                                 c.perm_length, c.perm_demos)}
  bsz = cfg.train.batch_size
  out = {}
  for task, full in tasks.items():
    out[task] = {}
    for s in scorers:
      starts = itertools.count(0, bsz)  # the key of each chunk: its first row
      preds = pipeline.map_in_batches(
          lambda b, s=s, starts=starts: s.pred(b, jax.random.fold_in(key, next(starts))),
          full, bsz)
      out[task][s.name] = synthetic.score(preds, full)
  return out


def repeat_eval(scorers, encoder, cfg, seq_len, key):
  """Induction probe: loss and greedy accuracy on each copy of a repeated random string."""
  c = cfg.lexinv
  length = min(48, seq_len // 3)
  n = cfg.train.batch_size
  b = synthetic.repeat_batch(encoder, n, seq_len, c.eval_seed, length, 3)
  return {s.name: synthetic.by_copy(s.nll(b, key), s.pred(b, key), b) for s in scorers}


def extended_model(model, ids: np.ndarray):
  """`model` with the tokens `ids` (never seen in training) made usable as new symbols, as
  far as its kind allows: an interchangeable model adds them to its interchangeable set (shared
  part + fresh random parts); a lexinvariant model with a training-split vocabulary makes them
  lexical (a Gaussian row per sequence instead of the learned 'other' row); a lexinvariant
  model over every id, and a standard LM, stay as they are (the standard LM's rows for them
  were never trained on a target)."""
  from models import lexinvariant  # pylint: disable=import-outside-toplevel
  if isinstance(model, lexinvariant.InterchangeableLM):
    return model.extended(ids)
  if isinstance(model, lexinvariant.LexinvariantLM) and model.live is not None:
    new = nnx.clone(model)
    new.live[...] = new.live[...].at[np.asarray(ids)].set(1.0)
    return new
  return model


def unseen_eval(scorers, encoder, cfg, seq_len, key, alphabets: dict) -> dict:
  """The unseen-symbol evaluation (`lexinv.unseen`): LookUp and Repeat over the `seen` alphabet
  (symbols the training data has) and the `unseen` one (never in training; data.char_map maps
  them away), each model extended by `extended_model` with the unseen ids.
  -> {alphabet: {model: {'lookup': score, 'repeat': by_copy}}}"""
  c = cfg.lexinv
  out = {}
  for s in scorers:
    model = extended_model(s.setup.model(s.params), alphabets['unseen'][1])
    graphdef, state = nnx.split(model)
    lex = hasattr(model, 'draw')

    def logits(state, batch, rng, graphdef=graphdef, lex=lex):
      m = nnx.merge(graphdef, state)
      if lex:
        return m(batch['inputs'], m.draw(rng, batch['inputs'].shape[0]), batch['positions'],
                 batch['segment_ids'])[0]
      return m(batch['inputs'], batch['positions'], batch['segment_ids'])[0]

    pred_fn = jax.jit(lambda st, b, r: jnp.argmax(logits(st, b, r), -1))
    nll_fn = jax.jit(lambda st, b, r: -jnp.take_along_axis(
        jax.nn.log_softmax(logits(st, b, r)), b['targets'][..., None], -1)[..., 0])
    keys = ('inputs', 'targets', 'segment_ids', 'positions')
    for name, (chars, _) in alphabets.items():
      look = synthetic.lookup_batch(encoder, c.synthetic_n, seq_len, c.eval_seed,
                                    min(c.lookup_keys, len(chars)), c.lookup_queries, chars)
      starts = itertools.count(0, cfg.train.batch_size)
      preds = pipeline.map_in_batches(
          lambda b, starts=starts: np.asarray(pred_fn(
              state, {k: jnp.asarray(b[k]) for k in keys},
              jax.random.fold_in(key, next(starts)))), look, cfg.train.batch_size)
      rep = synthetic.repeat_batch(encoder, cfg.train.batch_size, seq_len, c.eval_seed,
                                   min(48, seq_len // 3), 3, chars)
      rb = {k: jnp.asarray(rep[k]) for k in keys}
      rk = jax.random.fold_in(key, 7)
      out.setdefault(name, {})[s.name] = {
          'alphabet': chars, 'lookup': synthetic.score(preds, look),
          'repeat': synthetic.by_copy(np.asarray(nll_fn(state, rb, rk)),
                                      np.asarray(pred_fn(state, rb, rk)), rep)}
  return out


def attention_profile(setup, params, batch, rng, rows: int = 4) -> list[list[dict]]:
  """Per layer and head, on the first `rows` rows of `batch` (positions >= 16): the mean
  attention on the current token (offset 0) and the two before it, and the entropy (nats) of
  the attention distribution; a diagnostic of which heads work by position. Works for the
  lexinvariant model and the standard LM (both embed, then run `transformer.layers`)."""
  model = setup.model(params)
  x = jnp.asarray(batch['inputs'][:rows])
  pos = jnp.asarray(batch['positions'][:rows])
  seg = jnp.asarray(batch['segment_ids'][:rows])
  if hasattr(model, 'draw'):
    h = model.embed_tokens(x, model.draw(rng, rows))
  else:
    h = model.embed(x)
  sel = (np.asarray(pos) >= 16) & (np.asarray(seg) > 0)
  out = []
  for layer in model.transformer.layers:
    p = np.asarray(layer.attn.weights(layer.attn_norm(h), pos, seg))
    heads = []
    for hd in range(p.shape[1]):
      ph = p[:, hd][sel]                                      # [n, T] rows of selected queries
      qi = np.nonzero(sel)[1]
      offs = [float(ph[np.arange(len(qi)), qi - o].mean()) for o in range(3)]
      ent = float(-(ph * np.log(np.where(ph > 0, ph, 1.0))).sum(-1).mean())
      heads.append({'offset0': offs[0], 'offset1': offs[1], 'offset2': offs[2],
                    'entropy': ent})
    out.append(heads)
    h = layer(h, pos, seg)[0]
  return out


def _markdown(res) -> str:
  names = res['models']
  lines = [f"# Lexinvariant evaluation, step {res['step']}", '']
  if res.get('baseline_workdir'):
    lines.append(f"standard LM: `{res['baseline_workdir']}` (step {res['baseline_step']})")
    lines.append('')
  lines += ['## Loss by context position', '',
            '| positions | tokens | ' + ' | '.join(f'loss {n}' for n in names)
            + (' | ppl ratio |' if len(names) == 2 else ' |'),
            '|---' * (2 + len(names) + (len(names) == 2)) + '|']
  for r in res['by_position']:
    cells = [r['positions'], str(r['n_tokens'])] + [f"{r[f'loss_{n}']:.3f}" for n in names]
    if len(names) == 2:
      cells.append(f"{r['ppl_ratio']:.2f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', '## Substitution cipher (one random permutation of the '
            f"{res.get('cipher_alphabet_size', '?')} lexical ids)", '',
            '| model | loss plain | loss ciphered | difference (± s.e.) |', '|---|---|---|---|']
  for n in names:
    c = res['cipher'][n]
    lines.append(f"| {n} | {c['loss_plain']:.3f} | {c['loss_cipher']:.3f} | "
                 f"{c['diff']:+.3f} ± {c['diff_stderr']:.3f} |")
  lines += ['', '## Deciphering probe (linear, on final hidden states; a fresh cipher per row)',
            '', '| model | token acc | first 32 | second half | majority baseline | mapping acc |',
            '|---|---|---|---|---|---|']
  for n in names:
    p = res['probe'][n]
    lines.append(f"| {n} | {p['token_accuracy']:.3f} | {p['accuracy_first32']:.3f} | "
                 f"{p['accuracy_second_half']:.3f} | {p['majority_baseline']:.3f} | "
                 f"{p['mapping_accuracy']:.3f} |")
  if 'repeat' in res:
    lines += ['', '## Repeat (induction probe: a random a-z string, three copies)', '',
              '| model | ' + ' | '.join(f'copy {r["copy"]} loss / acc' for r in
                                       res['repeat'][names[0]]) + ' |',
              '|---' * (1 + len(res['repeat'][names[0]])) + '|']
    for n in names:
      lines.append(f'| {n} | ' + ' | '.join(f"{r['loss']:.3f} / {r['accuracy']:.3f}"
                                            for r in res['repeat'][n]) + ' |')
  if 'attention' in res:
    lines += ['', '## Attention by head (validation rows, positions >= 16)', '',
              '| model | layer | head | on offset 0 / 1 / 2 | entropy (nats) |',
              '|---|---|---|---|---|']
    for n in names:
      for li, heads in enumerate(res['attention'][n]):
        for hi, a in enumerate(heads):
          lines.append(f"| {n} | {li} | {hi} | {a['offset0']:.2f} / {a['offset1']:.2f} / "
                       f"{a['offset2']:.2f} | {a['entropy']:.2f} |")
  if 'unseen' in res:
    lines += ['', '## Unseen symbols (never in training; the model extended with them)', '',
              '| alphabet | model | LookUp exact | LookUp token acc | Repeat copy 2 acc | '
              'Repeat copy 3 acc |', '|---|---|---|---|---|---|']
    for alpha, per in res['unseen'].items():
      for n in names:
        u = per[n]
        rep = {r['copy']: r for r in u['repeat']}
        lines.append(f"| {alpha} ({u['alphabet']}) | {n} | {u['lookup']['exact_accuracy']:.3f}"
                     f" | {u['lookup']['token_accuracy']:.3f} | {rep[2]['accuracy']:.3f} | "
                     f"{rep[3]['accuracy']:.3f} |")
  lines += ['', '## Synthetic in-context tasks (greedy answers)', '',
            '| task | model | token acc | exact acc | answers |', '|---|---|---|---|---|']
  for task, per in res['synthetic'].items():
    for n in names:
      s = per[n]
      lines.append(f"| {task} | {n} | {s['token_accuracy']:.3f} | {s['exact_accuracy']:.3f} | "
                   f"{s['n_answers']} |")
  return '\n'.join(lines) + '\n'


def run_suite(setup, params, encoder, workdir: str, step: int, baseline=None,
              alphabets: dict | None = None) -> dict:
  """Every evaluation above for the lexinvariant model (`setup`, `params`, its `encoder`) and,
  with `baseline` (a trained standard LM: `train.runs.Run`), for both; writes
  lexinv_eval_step{N}.json / .md and lexinv_ppl_by_position_step{N}.png into `workdir`."""
  cfg = setup.cfg
  c = cfg.lexinv
  scorers = [_Scorer('interchangeable' if c.get('embedding') == 'interchangeable' else 'lexinv',
                     setup, params)]
  res = {'step': step, 'baseline_workdir': c.baseline_workdir}
  if baseline is not None:
    scorers.append(_Scorer('standard', baseline.setup, baseline.params))
    res['baseline_step'] = baseline.step
  res['models'] = [s.name for s in scorers]
  key = jax.random.key(c.eval_seed)
  batches = setup.family.eval_batches(0, 1, c.eval_batches)
  seq_len = cfg.data.seq_len

  rows, per_pos, count = position_curve(scorers, batches, jax.random.fold_in(key, 1), seq_len)
  res['by_position'] = rows
  alphabet = cipher_alphabet(setup.model(params), encoder)
  res['cipher_alphabet_size'] = int(alphabet.size)
  res['cipher'] = cipher_eval(scorers, batches, jax.random.fold_in(key, 2),
                              _cipher(encoder.vocab_size, alphabet,
                                      np.random.default_rng([c.eval_seed, 3])))
  res['probe'] = probe_eval(scorers, batches, jax.random.fold_in(key, 3), encoder, alphabet,
                            c.probe_rows, c.probe_steps, c.eval_seed)
  res['synthetic'] = synthetic_eval(scorers, encoder, cfg, seq_len, jax.random.fold_in(key, 4))
  res['repeat'] = repeat_eval(scorers, encoder, cfg, seq_len, jax.random.fold_in(key, 5))
  if alphabets:
    res['unseen'] = unseen_eval(scorers, encoder, cfg, seq_len, jax.random.fold_in(key, 7),
                                alphabets)
  res['attention'] = {s.name: attention_profile(s.setup, s.params, batches[0],
                                                jax.random.fold_in(key, 6)) for s in scorers}
  base = os.path.join(workdir, f'lexinv_eval_step{step}')
  if jax.process_index() == 0:
    report.plot_ppl_by_position(base.replace('lexinv_eval', 'lexinv_ppl_by_position') + '.png',
                                per_pos, count, res['models'], f'validation, step {step}')
    storage.write_text(base + '.json', json.dumps(
        {**res, 'per_position_loss': per_pos, 'per_position_count': count.tolist()}, indent=1))
  md = _markdown(res)
  report.write_text(base + '.md', md)
  log0(md)
  return {'lexinv_suite': res}
