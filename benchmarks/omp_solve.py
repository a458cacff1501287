"""Time OMP transplantation's solve: scikit-learn's two forms side by side; and how well the
auxiliary space rebuilds held-out shared tokens.

  python benchmarks/omp_solve.py --workdir=runs/omp_bpe:8192 --target=bpe:8192 \
      [--preset=smollm2] [--k=8] [--tokens=200] [--heldout=200]

Reads the target tokenizer a `--mode=transfer` run of configs/pretrained.py:PRESET with
`--config.target_tokenizer=TARGET` wrote (WORKDIR/omp/tokenizer.json) and builds the auxiliary
space as that transfer does (`transfer.auxiliary_space`, the default config otherwise). Times the
first `--tokens` new tokens' solve in the form the transfer uses (`orthogonal_mp`, Cholesky,
precompute=False: one [A, N] dictionary copy per token) and in scikit-learn's Gram form
(`orthogonal_mp_gram`, one [N, N] Gram copy per token), each extrapolated to all new tokens, and
checks both give the same coefficients. Then `--heldout` shared tokens are taken out of the
anchors and rebuilt from the others, by OMP (k = 1, 2, 4, 8) and by FOCUS's sparsemax weights:
the mean cosine of each rebuilt base embedding to the token's true one and the mean norm ratio
(and the base mean embedding's cosine, for scale).
"""
from __future__ import annotations

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  opts = {'workdir': '', 'target': '', 'preset': 'smollm2', 'k': 8, 'tokens': 200,
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
  base_vocab = base.tokenizer.get_vocab(with_added_tokens=True)
  specials = {t.content for t in target.get_added_tokens_decoder().values() if t.special}
  space = aux['omp_aux']
  norm = np.linalg.norm(space, axis=-1)
  vocab = target.get_vocab(with_added_tokens=True)
  anchors = [i for s, i in vocab.items() if s not in specials and s in base_vocab and norm[i] > 0]
  all_new = [i for s, i in vocab.items() if s not in specials and s not in base_vocab and norm[i] > 0]
  new = all_new[:opts['tokens']] if opts['tokens'] else all_new
  t0 = time.perf_counter()
  chol = transfer.omp_coefficients(space[anchors], space[new], opts['k']) * norm[anchors]
  chol_s = time.perf_counter() - t0
  unit = (space[anchors] / norm[anchors][:, None]).astype(np.float64)
  t0 = time.perf_counter()
  gram = unit @ unit.T
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    coef = orthogonal_mp_gram(gram, unit @ space[new].T.astype(np.float64),
                              n_nonzero_coefs=opts['k']).reshape(len(anchors), -1)
  gram_s = time.perf_counter() - t0
  diff = float(np.abs(chol - coef.T).max())
  print(f'{len(all_new)} new tokens with an auxiliary vector, {len(anchors)} anchors, '
        f'{space.shape[1]} dimensions, k={opts["k"]}; auxiliary space built in {aux_s:.1f} s')
  for name, sec in (('Cholesky form (the transfer\'s)', chol_s), ('Gram form', gram_s)):
    print(f'{name}: {sec:.1f} s for {len(new)} tokens ({1000 * sec / len(new):.1f} ms a token, '
          f'{sec / len(new) * len(all_new):.0f} s for all new tokens)')
  print(f'max |coefficient difference| between the two forms: {diff:.1e}')
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
