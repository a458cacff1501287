"""Time OMP transplantation's solve for one vocabulary: scikit-learn's two forms side by side.

  python benchmarks/omp_solve.py --workdir=runs/omp_bpe:8192 --target=bpe:8192 \
      [--preset=smollm2] [--k=8] [--gram_tokens=50]

Reads the target tokenizer a `--mode=transfer` run of configs/pretrained.py:PRESET with
`--config.target_tokenizer=TARGET` wrote (WORKDIR/omp/tokenizer.json), builds the auxiliary space
as that transfer does (`transfer.auxiliary_space`, the default config otherwise), then times the whole vocabulary's solve in the form the transfer
uses (`orthogonal_mp`, Cholesky, precompute=False: one [A, N] dictionary copy per token), and
scikit-learn's Gram form (`orthogonal_mp_gram`, one [N, N] Gram copy per token) on the first
`--gram_tokens` new tokens, extrapolated to the vocabulary; checks both give the same
coefficients there. Then a held-out check of the auxiliary space: `--heldout` shared tokens are
taken out of the anchors and rebuilt from the others, by OMP (k = 1, 2, 4, 8) and by FOCUS's
sparsemax weights; printed: the mean cosine of each rebuilt base embedding to the token's true
one, and the mean norm ratio (and the cosine of the base mean embedding, for scale).
"""
from __future__ import annotations

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  opts = {'workdir': '', 'target': '', 'preset': 'smollm2', 'k': 8, 'gram_tokens': 50,
          'heldout': 200}
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{__doc__}')
    opts[k] = type(opts[k])(v)
  import numpy as np
  from sklearn.linear_model import orthogonal_mp_gram
  from tokenizers import Tokenizer
  from train import config_lib, transfer
  from train.families import pretrained
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg, _ = config_lib.load(f'{root}/configs/pretrained.py:{opts["preset"]}')
  cfg.unlock()
  config_lib.override(cfg, {'target_tokenizer': opts['target']})
  target = Tokenizer.from_file(os.path.join(opts['workdir'], 'omp', 'tokenizer.json'))
  base = pretrained.load_source(cfg.model.source)
  t0 = time.perf_counter()
  aux = transfer.auxiliary_space(cfg, target, ['omp'], encoder=base.meta.get('kind') == 'encoder')
  aux_s = time.perf_counter() - t0
  transfer.solve_omp(aux, base.tokenizer, target, opts['k'])
  n_new = len(aux['omp'])
  # the Gram form on the first new tokens, against the same anchors
  base_vocab = base.tokenizer.get_vocab(with_added_tokens=True)
  specials = {t.content for t in target.get_added_tokens_decoder().values() if t.special}
  space = aux['omp_aux']
  norm = np.linalg.norm(space, axis=-1)
  vocab = target.get_vocab(with_added_tokens=True)
  anchors = [i for s, i in vocab.items() if s not in specials and s in base_vocab and norm[i] > 0]
  new = sorted(aux['omp'])[:opts['gram_tokens']]
  unit = (space[anchors] / norm[anchors][:, None]).astype(np.float64)
  t0 = time.perf_counter()
  gram = unit @ unit.T
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    coef = orthogonal_mp_gram(gram, unit @ space[new].T.astype(np.float64),
                              n_nonzero_coefs=opts['k']).reshape(len(anchors), -1)
  gram_s = time.perf_counter() - t0
  chol = transfer.omp_coefficients(space[anchors], space[new], opts['k']) * norm[anchors]
  diff = float(np.abs(chol - coef.T).max())
  print(f'{n_new} new tokens, {len(anchors)} anchors, {space.shape[1]} dimensions, k={opts["k"]}')
  print(f'auxiliary space: {aux_s:.1f} s')
  print(f'Cholesky form (the transfer\'s): {aux["omp_s"]:.1f} s for the vocabulary '
        f'({1000 * aux["omp_s"] / max(n_new, 1):.1f} ms a token)')
  print(f'Gram form: {gram_s:.1f} s for {len(new)} tokens ({1000 * gram_s / len(new):.1f} ms a '
        f'token, {gram_s / len(new) * n_new:.0f} s for the vocabulary); max |coefficient '
        f'difference| {diff:.1e}')
  # held out: shared tokens rebuilt from the other shared tokens
  e = np.asarray(base.model.words.embedding[...] if base.meta.get('kind') == 'encoder'
                 else base.model.embed.embedding[...], np.float64)
  pairs = [(i, base_vocab[s]) for s, i in vocab.items()
           if s not in specials and s in base_vocab and norm[i] > 0]
  pick = set(np.random.default_rng(0).choice(len(pairs), opts['heldout'], replace=False).tolist())
  held = [p for n, p in enumerate(pairs) if n in pick]
  keep = [p for n, p in enumerate(pairs) if n not in pick]
  atoms, rows = space[[i for i, _ in keep]], e[[j for _, j in keep]]
  want = e[[j for _, j in held]]

  def report(name, got):
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    ratio = np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f'held out ({len(held)} shared tokens): {name}: cosine {cos.mean():.3f}, norm ratio '
          f'{ratio.mean():.2f}')

  report('base mean embedding', np.tile(e.mean(0), (len(held), 1)))
  for k in (1, 2, 4, 8):
    report(f'OMP k={k}', transfer.omp_coefficients(atoms, space[[i for i, _ in held]], k) @ rows)
  unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
  y = space[[i for i, _ in held]]
  report('FOCUS (sparsemax)',
         transfer.sparsemax(y / np.linalg.norm(y, axis=1, keepdims=True) @ unit.T) @ rows)


if __name__ == '__main__':
  main(sys.argv[1:])
