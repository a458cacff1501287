"""--mode=transfer: a pretrained LM with a new tokenizer, by embedding initialization.

  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2_bpe8k \
      --mode=transfer --config.target_tokenizer=bpe:8192     # or PATH/tokenizer.json

For each method in `transfer.methods` the base model is written with the new tokenizer's
embedding matrix as an HF-format directory `WORKDIR/<method>/` (config.json,
model.safetensors, tokenizer.json: a checkpoint that `--mode=eval` / `--mode=sample` with
`--config.model.source=WORKDIR/<method>` use like any other, and that transformers loads), and
evaluated on the validation text beside the base model: `WORKDIR/transfer.json` and
`transfer.md` (bits per byte, tokens per byte, how each row was initialized).

Methods (the baselines of the tokenizer-transfer literature):
  lexical  a target token whose string is in the base vocabulary copies its embedding; the
           others get the mean base embedding.
  fvt      Fast Vocabulary Transfer: shared tokens are copied; any other token is split by the
           base tokenizer's BPE into base pieces, and gets their mean embedding.
  focus    FOCUS (Dobler & de Melo 2023): shared tokens are copied; any other token is a sparse,
           similarity-weighted combination of the shared tokens' base embeddings, with weights
           sparsemax(cosine) between small static embeddings of the target tokens, trained on
           the target text tokenized by the target tokenizer (`static_embeddings`: PPMI of
           window co-occurrences + truncated SVD, standing in for the paper's fastText). Tokens
           absent from that text have no static vector and get FVT (counted).
  omp      Orthogonal Matching Pursuit (Goddard & Fernandes 2025, mergekit's tokensurgeon):
           shared tokens are copied; any other token's auxiliary vector is approximated by
           `transfer.omp_k` shared tokens' auxiliary vectors, chosen greedily by scikit-learn's
           OMP (`omp_coefficients`), and the same coefficients combine those shared tokens'
           base embeddings. The auxiliary space is FOCUS's static embeddings, or with
           `transfer.omp_donor` the input embeddings of a donor model whose vocabulary is the
           target's (matched by token string). Tokens without an auxiliary vector get FVT.
  hypernet the embeddings the trained ZeTT hypernetwork (`transfer.hypernet_workdir`, a
           configs/zett.py run on the same base model) predicts for every non-special token.
Special tokens of the target keep the embedding of the base special with the same string, else
of the base's document separator. Untied models get the same treatment for the output matrix.
Both tokenizers must be byte-level BPE (token strings in the GPT-2 byte alphabet), so strings
compare directly and every target token splits into base pieces.

With `--config.dynamic` (train/dynamic.py) each transferred model is also evaluated under
dynamic tokenization on top of its new tokenizer (the new tokens' embeddings from the base
model's hypernetwork, `transfer.hypernet_workdir`, which shares the body, else FVT): its table is
`WORKDIR/<method>/dynamic.md`, and its bits per byte / tokens per byte join the transfer row.

Encoders (BERT / MiniLM, `run_encoder`): lexical, FVT, OMP and hypernet on WordPiece
vocabularies (pieces by greedy WordPiece, `models.hypernet.wordpiece_split`; hypernet: a
configs/zett.py:minilm run), scored by sentence-embedding cosines. A hypernetwork of the other
kind (encoder for a decoder, or the reverse) is refused by `runs.load_predictor` before it is read.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings

import numpy as np

from data import sentences, target_tokenizers
from models import hypernet, pretrained
from train import dynamic, runs, storage, trainer
from train.evals import report
from train.families.pretrained import load_source
from train.metrics import log0

METHODS = ('lexical', 'fvt', 'focus', 'omp', 'hypernet')
AUX_METHODS = ('focus', 'omp')  # the methods that read an auxiliary target-side space


def transfer_matrix(base_E: np.ndarray, base_tok, target_tok, method: str,
                    doc_token_id: int, predicted: np.ndarray | None = None,
                    static: np.ndarray | None = None, omp_k: int = 0,
                    omp: dict | None = None) -> tuple[np.ndarray, dict]:
  """[V_target, D] embeddings for `target_tok` from the base matrix (or, for 'hypernet', the
  `predicted` rows; for 'focus' and 'omp', `static` [V_target, K] target-side auxiliary
  embeddings, zero rows for tokens without one; for 'omp', `omp_k` anchors per token, or the
  `omp` weights `omp_weights` already solved); and the counts of rows per initialization."""
  if (method in AUX_METHODS) != (static is not None):
    raise ValueError('the focus and omp methods (and only they) need static target embeddings')
  if method not in METHODS:
    raise ValueError(f'unknown transfer method {method!r}: expected one of {METHODS}')
  if (method == 'hypernet') != (predicted is not None):
    raise ValueError('the hypernet method (and only it) needs predicted embeddings')
  for name, tok in (('base', base_tok), ('target', target_tok)):
    if not target_tokenizers.is_byte_level(tok):
      raise ValueError(f'the {name} tokenizer is not byte-level BPE: transfer needs token '
                       f'strings in the byte alphabet')
  base_vocab = base_tok.get_vocab(with_added_tokens=True)
  target_vocab = target_tok.get_vocab(with_added_tokens=True)
  if not target_vocab:
    raise ValueError('the target tokenizer is empty')
  specials = {t.content for t in target_tok.get_added_tokens_decoder().values() if t.special}
  n = max(target_vocab.values()) + 1
  mean = base_E.mean(0)
  out = np.tile(mean, (n, 1)).astype(np.float32)
  counts = {'special': 0, 'shared': 0, 'pieces': 0, 'mean': 0}
  if predicted is not None:
    counts = {'special': 0, 'predicted': 0}
  aux_rows = {}
  if method == 'focus':
    aux_rows = _focus_rows(base_E, base_vocab, target_vocab, specials, static)
  elif method == 'omp':
    if omp is None:
      omp = omp_weights(base_vocab, target_vocab, specials, static, omp_k)
    aux_rows = {i: w @ base_E[ids] for i, (ids, w) in omp.items()}
  if method in AUX_METHODS:
    counts[method] = 0
  for s, i in target_vocab.items():
    if s in specials:
      out[i] = base_E[base_vocab.get(s, doc_token_id)]
      counts['special'] += 1
    elif predicted is not None:
      out[i] = predicted[i]
      counts['predicted'] += 1
    elif s in base_vocab:
      out[i] = base_E[base_vocab[s]]
      counts['shared'] += 1
    elif i in aux_rows:
      out[i] = aux_rows[i]
      counts[method] += 1
    elif method in ('fvt', *AUX_METHODS):
      pieces = [t.id for t in base_tok.model.tokenize(s)]
      if pieces:
        out[i] = base_E[pieces].mean(0)
        counts['pieces'] += 1
      else:
        counts['mean'] += 1
    else:
      counts['mean'] += 1
  if predicted is None and counts['shared'] == 0 and counts['pieces'] == 0:
    raise ValueError('the target tokenizer shares no token with the base vocabulary and none '
                     'could be split into base pieces: nothing to transfer')
  return out, counts


def sparsemax(z_NxK: np.ndarray) -> np.ndarray:
  """Sparsemax (Martins & Astudillo 2016) of each row: the Euclidean projection onto the
  simplex; rows sum to 1 and most entries are exactly 0."""
  z = np.sort(z_NxK, axis=-1)[:, ::-1]
  k = np.arange(1, z.shape[1] + 1)
  cums = np.cumsum(z, axis=-1)
  support = 1 + k * z > cums
  k_z = support.sum(-1, keepdims=True)
  tau = (np.take_along_axis(cums, k_z - 1, axis=-1) - 1) / k_z
  return np.maximum(z_NxK - tau, 0.0)


def _focus_rows(base_E, base_vocab, target_vocab, specials, static) -> dict[int, np.ndarray]:
  """FOCUS rows of the target tokens that the base lacks and that have a static vector."""
  shared = [(i, base_vocab[s]) for s, i in target_vocab.items()
            if s not in specials and s in base_vocab]
  new = [i for s, i in target_vocab.items() if s not in specials and s not in base_vocab]
  norm = np.linalg.norm(static, axis=-1)
  shared = [(i, j) for i, j in shared if norm[i] > 0]
  new = [i for i in new if norm[i] > 0]
  if not shared or not new:
    return {}
  unit = static / np.maximum(norm, 1e-12)[:, None]
  anchors = unit[[i for i, _ in shared]]
  base_rows = base_E[[j for _, j in shared]]
  out = {}
  for a in range(0, len(new), 1024):
    ids = new[a:a + 1024]
    w = sparsemax(unit[ids] @ anchors.T)
    for i, row in zip(ids, w @ base_rows):
      out[i] = row
  return out


def omp_coefficients(anchors_NxA: np.ndarray, targets_MxA: np.ndarray,
                      k: int) -> np.ndarray:
  """[M, N] coefficients: each target written as a combination of at most `k` anchors by
  Orthogonal Matching Pursuit (scikit-learn's `orthogonal_mp`). Atoms are selected on unit
  anchors (the largest |cosine| with the residual, as OMP assumes normalized atoms), and the
  coefficients returned apply to the anchors as given: target ~= coefficients @ anchors. A target
  that is exactly an anchor (or a combination of fewer than k) stops early with that exact fit.

  scikit-learn solves one target at a time in either form; its Gram form (`orthogonal_mp_gram`)
  copies the [N, N] Gram matrix per target, its Cholesky form the [A, N] dictionary, the smaller
  copy for N in the thousands and A in the hundreds, so that form is used (`precompute=False`;
  benchmarks/omp_solve.py times both)."""
  from sklearn.linear_model import orthogonal_mp  # pylint: disable=import-outside-toplevel
  n = anchors_NxA.shape[0]
  norms = np.linalg.norm(anchors_NxA.astype(np.float64), axis=-1)
  if not n or (norms == 0).any():
    raise ValueError('OMP: every anchor needs a nonzero auxiliary vector')
  if not 1 <= k <= n:
    raise ValueError(f'OMP: k={k} anchors per token, of {n}: expected 1 <= k <= {n}')
  dictionary = np.asfortranarray((anchors_NxA / norms[:, None]).T, np.float64)
  out = np.zeros((targets_MxA.shape[0], n), np.float64)
  with warnings.catch_warnings():  # "stopped early" is the exact fit, not a failure
    warnings.simplefilter('ignore', RuntimeWarning)
    for a in range(0, targets_MxA.shape[0], 512):
      y = np.asarray(targets_MxA[a:a + 512], np.float64).T
      coef = orthogonal_mp(dictionary, y, n_nonzero_coefs=k, precompute=False)
      out[a:a + 512] = coef.reshape(n, -1).T
  return out / norms[None, :]


def check_omp_k(k) -> int:
  """`transfer.omp_k` as an int of at least 1, else a ValueError (exit 1, like the other bad
  transfer inputs)."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f'transfer.omp_k={k!r}: OMP needs a whole number of at least 1 anchor '
                     'per token')
  return int(k)


def omp_weights(base_vocab: dict, target_vocab: dict, specials: set, aux: np.ndarray,
                k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """OMP weights of the target tokens the base lacks and that have an auxiliary vector:
  {target id: (base ids of its anchors, their coefficients)}. Anchors are the shared tokens
  (same string in both vocabularies, not special) with an auxiliary vector."""
  check_omp_k(k)
  shared = {i: base_vocab[s] for s, i in target_vocab.items()
            if s not in specials and s in base_vocab}
  if k > len(shared):
    raise ValueError(
        f'transfer.omp_k={k} is larger than the shared vocabulary: the base and target '
        f'tokenizers share {len(shared)} (non-special) tokens, the anchors OMP chooses from')
  norm = np.linalg.norm(aux, axis=-1)
  anchors = [(i, j) for i, j in shared.items() if norm[i] > 0]
  new = [i for s, i in target_vocab.items()
         if s not in specials and s not in base_vocab and norm[i] > 0]
  if not new:
    return {}
  if k > len(anchors):
    raise ValueError(
        f'transfer.omp_k={k} is larger than the {len(anchors)} shared tokens that have an '
        f'auxiliary vector (of {len(shared)} shared), the anchors OMP chooses from')
  coef = omp_coefficients(aux[[i for i, _ in anchors]], aux[new], k)
  base_ids = np.asarray([j for _, j in anchors])
  out = {}
  for i, c in zip(new, coef):
    nz = np.flatnonzero(c)
    out[i] = (base_ids[nz], c[nz])
  return out


def donor_embeddings(source: str, target_tok) -> np.ndarray:
  """OMP's auxiliary space from a donor model (`transfer.omp_donor`, any model.source) whose
  vocabulary is the target's: float32 [V_target, D_donor], each target token the donor's input
  embedding of the same string, zero rows for tokens the donor lacks."""
  donor = load_source(source)
  e = np.asarray(donor.model.words.embedding[...] if donor.meta.get('kind') == 'encoder'
                 else donor.model.embed.embedding[...], np.float32)
  donor_vocab = donor.tokenizer.get_vocab(with_added_tokens=True)
  target_vocab = target_tok.get_vocab(with_added_tokens=True)
  out = np.zeros((max(target_vocab.values()) + 1, e.shape[1]), np.float32)
  hit = 0
  for s, i in target_vocab.items():
    if s in donor_vocab and donor_vocab[s] < len(e):
      out[i] = e[donor_vocab[s]]
      hit += 1
  if not hit:
    raise ValueError(f'transfer.omp_donor={source!r}: its vocabulary has none of the target '
                     'tokenizer\'s tokens: a donor must have the target tokenizer')
  log0(f'[transfer] OMP auxiliary space: donor {source} ({e.shape[1]} dimensions), '
       f'{hit} of {len(target_vocab)} target tokens found')
  return out


def static_embeddings(target_tok, texts, dim: int = 100, window: int = 5,
                      max_chars: int = 2_000_000) -> np.ndarray:
  """float32 [V_target, dim] static token embeddings trained on `texts` tokenized by
  `target_tok`: positive PMI of co-occurrences within `window` tokens (1/distance weighted),
  reduced by truncated SVD (U * sqrt(S)). Tokens that never occur get zero rows."""
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  import scipy.sparse.linalg  # pylint: disable=import-outside-toplevel
  v = max(target_tok.get_vocab(with_added_tokens=True).values()) + 1
  chunks, used = [], 0
  for t in texts:
    chunks.append(t[:max_chars - used])
    used += len(chunks[-1])
    if used >= max_chars:
      break
  rows, cols, vals = [], [], []
  for e in target_tok.encode_batch(chunks, add_special_tokens=False):
    ids = np.asarray(e.ids, np.int64)
    for d in range(1, window + 1):
      if len(ids) > d:
        rows += [ids[:-d], ids[d:]]
        cols += [ids[d:], ids[:-d]]
        vals += [np.full(2 * (len(ids) - d), 1.0 / d)]
  if not rows:
    raise ValueError('FOCUS: the target text is empty: no static embeddings to train')
  m = scipy.sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                      np.concatenate(cols))),
                              shape=(v, v)).tocsr()
  m.sum_duplicates()
  total = m.sum()
  row = np.asarray(m.sum(1)).ravel()
  col = np.asarray(m.sum(0)).ravel() ** 0.75  # context distribution smoothing
  col = col / col.sum() * total
  m = m.tocoo()
  pmi = np.log(m.data * total / (row[m.row] * col[m.col]))
  keep = pmi > 0
  ppmi = scipy.sparse.csr_matrix((pmi[keep], (m.row[keep], m.col[keep])), shape=(v, v))
  k = min(dim, v - 2)
  u, sv, _ = scipy.sparse.linalg.svds(ppmi, k=k, random_state=0)
  out = (u * np.sqrt(sv)).astype(np.float32)
  out[row == 0] = 0.0
  return out


def transferred_model(base: pretrained.Pretrained, target_tok, method: str, predictor=None,
                      static: np.ndarray | None = None, omp: dict | None = None):
  """(TokenLM with the target vocabulary, counts). `predictor(token strings) -> (input [N, D],
  output [N, D] or None)` is the hypernetwork, for method 'hypernet'; `static` the target
  tokens' auxiliary embeddings, for methods 'focus' and 'omp'; `omp` the OMP weights
  (`omp_weights`, solved once for the input and output matrices), for method 'omp'."""
  cfg = base.cfg_model
  static = static if method in AUX_METHODS else None
  tensors = pretrained._collect(base.model, cfg)  # pylint: disable=protected-access
  pred_in = pred_out = None
  if method == 'hypernet':
    if predictor is None:
      raise ValueError('transfer method hypernet needs transfer.hypernet_workdir (a trained '
                       'configs/zett.py run)')
    vocab = target_tok.get_vocab(with_added_tokens=True)
    strings = [''] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
      strings[i] = s
    pred_in, pred_out = predictor(strings)
  if method == 'omp' and omp is None:
    raise ValueError('transfer method omp needs its weights (omp_weights)')
  omp = omp if method == 'omp' else None
  e, counts = transfer_matrix(tensors['model.embed_tokens.weight'], base.tokenizer, target_tok,
                              method, base.meta['doc_token_id'], pred_in, static, omp=omp)
  tensors['model.embed_tokens.weight'] = e
  if not cfg.tie_embeddings:
    tensors['lm_head.weight'], _ = transfer_matrix(
        tensors['lm_head.weight'], base.tokenizer, target_tok, method, base.meta['doc_token_id'],
        pred_out if pred_out is not None else pred_in, static, omp=omp)
  model = pretrained._build(cfg, e.shape[0], tensors, 'transfer')  # pylint: disable=protected-access
  return model, counts


def auxiliary_space(cfg, target, methods, encoder: bool = False) -> dict:
  """What the focus and omp methods among `methods` read: {'static': FOCUS's static embeddings
  of the target tokens (trained on the target text), 'omp_aux': OMP's space (those, or the
  donor's embeddings with transfer.omp_donor), 'aux_s': seconds spent building them};
  `solve_omp` adds OMP's weights. A bad transfer.omp_k fails here, before any evaluation."""
  out = {}
  if 'omp' in methods:
    check_omp_k(cfg.transfer.omp_k)
  t0 = time.perf_counter()
  if 'focus' in methods or ('omp' in methods and not cfg.transfer.omp_donor):
    spec = str(cfg.target_tokenizer)
    name_filter = (str(cfg.transfer.text_filter or '')
                   if encoder or spec.startswith('unigram:') else '')
    out['static'] = static_embeddings(
        target, target_tokenizers.texts(cfg.data, cfg.data.train_split, name_filter),
        max_chars=int(cfg.transfer.focus_max_chars))
    log0(f'[transfer] FOCUS static embeddings: {out["static"].shape[1]} dimensions, '
         f'{int((np.abs(out["static"]).sum(1) > 0).sum())} of {out["static"].shape[0]} target '
         'tokens seen')
  if 'omp' in methods:
    out['omp_aux'] = (donor_embeddings(cfg.transfer.omp_donor, target)
                      if cfg.transfer.omp_donor else out['static'])
  out['aux_s'] = time.perf_counter() - t0
  return out


def solve_omp(aux: dict, base_tok, target, k: int) -> None:
  """OMP's weights for `target` into `aux` ('omp', timed in 'omp_s', scikit-learn's import
  excluded)."""
  import sklearn.linear_model  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  t0 = time.perf_counter()
  specials = {t.content for t in target.get_added_tokens_decoder().values() if t.special}
  aux['omp'] = omp_weights(base_tok.get_vocab(with_added_tokens=True),
                           target.get_vocab(with_added_tokens=True), specials, aux['omp_aux'],
                           int(k))
  aux['omp_s'] = time.perf_counter() - t0
  log0(f'[transfer] OMP (k={k}): {len(aux["omp"])} new tokens solved in {aux["omp_s"]:.1f} s')


def _timing(method: str, aux: dict, seconds: float) -> dict:
  """The row's time columns: building its matrices; for focus / omp also the auxiliary space
  (shared by both) and, for omp, the solve (part of `init_s`)."""
  out = {'init_s': round(seconds, 2)}
  if method in AUX_METHODS:
    out['aux_s'] = round(aux['aux_s'], 2)
  if method == 'omp':
    out['omp_s'] = round(aux['omp_s'], 2)
  return out


def run(cfg, workdir: str) -> dict:
  """--mode=transfer on a pretrained model config (the mode accepts no other family)."""
  base = load_source(cfg.model.source)
  if base.meta.get('kind') == 'encoder':
    return run_encoder(cfg, workdir, base)
  target, target_name = target_tokenizers.build(cfg.target_tokenizer, cfg.data,
                                                cfg.transfer.text_filter)
  workdir = storage.check_workdir(workdir)
  methods = [m.strip() for m in str(cfg.transfer.methods).split(',') if m.strip()]
  for method in methods:
    if method not in METHODS:
      raise ValueError(f'transfer.methods={cfg.transfer.methods!r}: unknown method {method!r}; '
                       f'expected some of {METHODS}')
  predictor = None
  if 'hypernet' in methods:  # checked before the base model's evaluation
    if not cfg.transfer.hypernet_workdir:
      raise ValueError('transfer.methods includes hypernet: set transfer.hypernet_workdir to a '
                       'trained configs/zett.py run')
    predictor = runs.load_predictor(cfg.transfer.hypernet_workdir, cfg.model.source,
                                step=int(cfg.transfer.hypernet_step))
  dyn_predictor = predictor
  if cfg.dynamic:  # dynamic tokenization on top of each transferred model
    dynamic.check_config(cfg)
    if dyn_predictor is None and cfg.transfer.hypernet_workdir:
      dyn_predictor = runs.load_predictor(cfg.transfer.hypernet_workdir, cfg.model.source,
                                          step=int(cfg.transfer.hypernet_step))
  aux = auxiliary_space(cfg, target, methods)
  if 'omp' in methods:
    solve_omp(aux, base.tokenizer, target, cfg.transfer.omp_k)
  rows = []
  if cfg.transfer.base_eval:
    base_ev = trainer.evaluate(copy.deepcopy(cfg), os.path.join(workdir, 'base'))
    rows.append({'model': 'base', 'tokenizer': base.meta['source'],
                 'vocab': int(base.model.embed.embedding.shape[0]), **_scores(base_ev)})
  for method in methods:
    t0 = time.perf_counter()
    model, counts = transferred_model(base, target, method, predictor,
                                      aux.get('omp_aux' if method == 'omp' else 'static'),
                                      aux.get('omp'))
    if method == 'omp':
      model_s = time.perf_counter() - t0 + aux['omp_s']
    else:
      model_s = time.perf_counter() - t0
    meta = target.get_vocab(with_added_tokens=True)
    doc = next((meta[t] for t in ('<|endoftext|>', '<eos>', '</s>') if t in meta), -1)
    with storage.local_dir(storage.join(workdir, method)) as out_dir:  # a bucket: staged
      pretrained.save_hf(model, base.cfg_model, target, out_dir, eos_id=doc)
      sub = copy.deepcopy(cfg)
      sub.model.source = out_dir
      ev = trainer.evaluate(sub, out_dir)
      dyn = {}
      if cfg.dynamic:
        for r in dynamic.run(sub, out_dir, predictor=dyn_predictor, plain=ev)['rows'][1:]:
          dyn['dynamic merges chosen from'] = r['merges_from']
          dyn[f'dynamic {r["setting"]} {r["embeddings"]}: bpb / tokens per byte'] = (
              f'{r["bpb"]:.4f} / {r["tokens_per_byte"]:.4f}')
    rows.append({'model': method, 'tokenizer': target_name,
                 'vocab': int(model.embed.embedding.shape[0]), **counts,
                 **_timing(method, aux, model_s), **_scores(ev), **dyn})
    log0(f'[transfer] {method}: {counts} -> bits per byte {ev.get("bpb", float("nan")):.4f}')
  return _write_rows(rows, workdir)


def _write_rows(rows: list[dict], workdir: str) -> dict:
  table = report.write_rows(rows, workdir, 'transfer', formats=('md', 'json'),
                            fmt=report.fmt_fixed)
  log0(table.rstrip('\n'))
  return {'rows': rows}


def _scores(ev: dict) -> dict:
  return {'bpb': ev.get('bpb'), 'tokens_per_byte': (ev.get('n_tokens', 0) / ev['n_bytes'])
          if ev.get('n_bytes') else None}


# -- encoders (BERT / MiniLM, WordPiece) ---------------------------------------------------------
def encoder_matrix(base_E: np.ndarray, base_tok, target_tok, method: str,
                   predicted: np.ndarray | None = None,
                   omp: dict | None = None) -> tuple[np.ndarray, dict]:
  """[V_target, D] input embeddings of a WordPiece encoder for `target_tok`: specials take the
  base special of the same string ([UNK] otherwise); with method 'hypernet' every other row is
  the `predicted` one; else shared strings are copied, and the rest get the mean of their base
  WordPiece pieces (fvt; omp for the tokens its weights `omp` (`omp_weights`) do not cover) or
  the mean embedding (lexical); with method 'omp' the tokens `omp` covers combine their anchors'
  base rows."""
  if method not in METHODS:
    raise ValueError(f'encoder transfer methods are {METHODS}, not {method!r}')
  if (method == 'hypernet') != (predicted is not None):
    raise ValueError('the hypernet method (and only it) needs predicted embeddings')
  if (method == 'omp') != (omp is not None):
    raise ValueError('the omp method (and only it) needs OMP weights')
  base_vocab = base_tok.get_vocab(with_added_tokens=True)
  target_vocab = target_tok.get_vocab(with_added_tokens=True)
  if not target_vocab:
    raise ValueError('the target tokenizer is empty')
  specials = {t.content for t in target_tok.get_added_tokens_decoder().values() if t.special}
  unk = base_vocab.get('[UNK]', 0)
  out = np.tile(base_E.mean(0), (max(target_vocab.values()) + 1, 1)).astype(np.float32)
  counts = ({'special': 0, 'predicted': 0} if predicted is not None else
            {'special': 0, 'shared': 0, **({'omp': 0} if omp is not None else {}),
             'pieces': 0, 'mean': 0})
  for s, i in target_vocab.items():
    if s in specials:
      out[i], kind = base_E[base_vocab.get(s, unk)], 'special'
    elif predicted is not None:
      out[i], kind = predicted[i], 'predicted'
    elif s in base_vocab:
      out[i], kind = base_E[base_vocab[s]], 'shared'
    elif omp is not None and i in omp:
      out[i], kind = omp[i][1] @ base_E[omp[i][0]], 'omp'
    elif method in ('fvt', 'omp') and (pieces := hypernet.wordpiece_split(s, base_vocab)):
      out[i], kind = base_E[pieces].mean(0), 'pieces'
    else:
      kind = 'mean'
    counts[kind] += 1
  return out, counts


def save_encoder(base_dir: str, embeddings: np.ndarray, tokenizer, out_dir: str) -> None:
  """The HF BERT directory `base_dir` with a new tokenizer and word-embedding matrix."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  shutil.rmtree(out_dir, ignore_errors=True)
  shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns('model.safetensors',
                                                                   'tokenizer.json', 'vocab.txt',
                                                                   '.git*', '*.md'))
  tensors = load_file(os.path.join(base_dir, 'model.safetensors'))
  key = next(k for k in tensors if k.endswith('embeddings.word_embeddings.weight'))
  tensors[key] = np.ascontiguousarray(embeddings, np.float32)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'))
  tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  with open(os.path.join(out_dir, 'config.json')) as f:
    hf = json.load(f)
  hf['vocab_size'] = int(embeddings.shape[0])
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)


def run_encoder(cfg, workdir: str, base) -> dict:
  """Encoder transfer: the base BERT with a new WordPiece tokenizer (`wordpiece:N` trained on
  the train split's `transfer.text_filter` documents, or a tokenizer.json), per method written
  as an HF directory; scored by the cosine between each held-out sentence's embedding with the
  original tokenizer and with the transferred one (validation sentences of the same documents).
  Method hypernet: the rows `transfer.hypernet_workdir` (a configs/zett.py:minilm run) predicts
  for every non-special target token; omp: OMP in FOCUS's static space of the target text (the
  `transfer.text_filter` training documents) or a donor's (`transfer.omp_donor`)."""
  target, target_name = target_tokenizers.build_encoder_target(
      cfg.target_tokenizer, cfg.data, cfg.transfer.text_filter)
  methods = [m.strip() for m in str(cfg.transfer.methods).split(',') if m.strip()]
  for method in methods:
    if method not in METHODS or method == 'focus':
      raise ValueError(f'transfer.methods={cfg.transfer.methods!r}: {method!r} is no encoder '
                       "transfer method; expected some of ('lexical', 'fvt', 'omp', 'hypernet')")
  aux = {}
  if 'omp' in methods:
    aux = auxiliary_space(cfg, target, methods, encoder=True)
    solve_omp(aux, base.tokenizer, target, cfg.transfer.omp_k)
  predicted = None
  if 'hypernet' in methods:
    if not cfg.transfer.hypernet_workdir:
      raise ValueError('transfer.methods includes hypernet: set transfer.hypernet_workdir to a '
                       'trained configs/zett.py:minilm run')
    predictor = runs.load_predictor(cfg.transfer.hypernet_workdir, cfg.model.source, 'encoder',
                                step=int(cfg.transfer.hypernet_step))
    vocab = target.get_vocab(with_added_tokens=True)
    strings = [''] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
      strings[i] = s
    predicted = np.asarray(predictor(strings)[0], np.float32)
  sents = []
  for text in target_tokenizers.texts(cfg.data, cfg.data.eval_split, cfg.transfer.text_filter):
    sents.extend(sentences.split_document(text, 512))
  sents = sents[:cfg.transfer.eval_sentences]
  if not sents:
    raise ValueError('no held-out sentences to compare (data.eval_split, transfer.text_filter)')
  base_dir = base.meta['source']
  ref = pretrained.SentenceEncoder(f'hf:{base_dir}')(sents)
  base_len = np.mean([len(e.ids) for e in base.tokenizer.encode_batch(sents)])
  rows = [{'model': 'base', 'tokenizer': base_dir, 'vocab': base.tokenizer.get_vocab_size(),
           'cosine_mean': 1.0, 'cosine_min': 1.0, 'tokens_per_sentence': float(base_len)}]
  workdir = storage.check_workdir(workdir)
  e = np.asarray(base.model.words.embedding[...])
  for method in methods:
    t0 = time.perf_counter()
    mat, counts = encoder_matrix(e, base.tokenizer, target, method,
                                 predicted if method == 'hypernet' else None,
                                 aux['omp'] if method == 'omp' else None)
    model_s = time.perf_counter() - t0 + (aux['omp_s'] if method == 'omp' else 0.0)
    with storage.local_dir(storage.join(workdir, method)) as out_dir:  # a bucket: staged
      save_encoder(base_dir, mat, target, out_dir)
      got = pretrained.SentenceEncoder(f'hf:{out_dir}')(sents)
      moved = pretrained.load(out_dir).tokenizer
    cos = (ref * got).sum(-1)  # both L2-normalized
    rows.append({'model': method, 'tokenizer': target_name, 'vocab': int(mat.shape[0]),
                 **counts, **_timing(method, aux, model_s), 'cosine_mean': float(cos.mean()), 'cosine_min': float(cos.min()),
                 'tokens_per_sentence': float(np.mean([len(x.ids) for x in
                                                       moved.encode_batch(sents)]))})
    log0(f'[transfer] {method}: {counts} -> mean cosine {cos.mean():.4f} over {len(sents)} '
         'held-out sentences')
  return _write_rows(rows, workdir)
