"""One byte-level interface for every text model: next-byte distributions, scoring, sampling,
cross-tokenizer ensembles.

  view = family.byte_view(model)               # ByteLM: each family builds its own view
  st = view.start(b'def fibonac')              # state after the prompt (KV caches inside)
  lp = view.next_byte_logprobs(st)             # float32 [257]: log p(byte | prompt), [256] = end
  st = view.advance(st, ord('c'))              # one byte more; caches reused, nothing recomputed
  view.score(text)                             # float64 [len + 1]: log p of every byte, then end
  sample(view, b'def fibonac', 32)             # greedy / temperature sampling, byte by byte
  sample_compare(view, b'def fibonac', 32)     # + plain token-level and token healing (BPE)
  Mixture(a, b, 0.7), ProductOfExperts(a, b)   # ensembles of any two views; fit_mixture_weight
  mix_logprobs, product_logprobs               # any number of members, from their log-probs;
  fit_mixture_weights, fit_product_alphas      # weights / exponents fitted on held-out bytes

The package, one module each (every name below is importable from `models.byte_level`):
  interface.py    `ByteLM` (the abstract base every view implements), `bits_per_byte`,
                  `sample`, `sample_compare`, `pick`; shared helpers (padded sizes).
  token_views.py  `TokenFn` (a token LM as the views call it: a jitted cached forward),
                  `ByteTokenLM` (a byte-native token LM: its softmax over the byte ids and eos),
                  `token_generate` (token-level decoding on the same forward).
  exact_bpe.py    `ExactBPE` (a BPE token LM: the exact byte-level marginal of its canonical
                  process; the module doc gives the definition and the cost), `heal_split`.
  ensembles.py    `Mixture`, `ProductOfExperts` and the N-member ensemble math.

The package knows no model class. The views of the families' models are built by the families
(`Family.byte_view` in train/families/*.py) and live next to their models where they are more
than a `TokenFn`: a token LM over bytes or BPE is `ByteTokenLM` / `ExactBPE` of `TokenFn(model)`;
a lexinvariant LM the same of `TokenFn(model, draw)` (one random embedding drawn per view and
kept for every text it scores); HAT `models.hat_view` (byte-level already, with its three KV
caches); a pretrained file `models.pretrained.byte_view`.
"""
from __future__ import annotations

from models.byte_level.ensembles import (Mixture, ProductOfExperts, fit_mixture_weight,
                                         fit_mixture_weights, fit_product_alphas, mix_logprobs,
                                         product_logprobs)
from models.byte_level.exact_bpe import ExactBPE, heal_split
from models.byte_level.interface import (BYTE_OFFSET, END, NUM_OUTCOMES, ByteLM, bits_per_byte,
                                         pick, sample, sample_compare)
from models.byte_level.token_views import ByteTokenLM, TokenFn, token_generate

__all__ = [
    'BYTE_OFFSET', 'END', 'NUM_OUTCOMES', 'ByteLM', 'ByteTokenLM', 'ExactBPE', 'Mixture',
    'ProductOfExperts', 'TokenFn', 'bits_per_byte', 'fit_mixture_weight', 'fit_mixture_weights',
    'fit_product_alphas', 'heal_split', 'mix_logprobs', 'pick', 'product_logprobs', 'sample',
    'sample_compare', 'token_generate',
]
