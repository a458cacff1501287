"""Robustness perturbations: seeded, whitespace-preserving, the requested noise level."""
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data import perturb

TEXT = ' '.join(['abcdefghij'] * 400)


@pytest.mark.parametrize('kind', ['permute', 'delete', 'replace'])
def test_noise_fraction_and_whitespace(kind):
  out = perturb.perturb(TEXT, kind, 0.1, np.random.default_rng(0))
  words_in, words_out = TEXT.split(' '), out.split(' ')
  assert len(words_in) == len(words_out)  # whitespace untouched, words stay words
  if kind == 'delete':
    frac = 1 - sum(map(len, words_out)) / sum(map(len, words_in))
  elif kind == 'permute':
    assert all(sorted(a) == sorted(b) for a, b in zip(words_in, words_out))
    frac = np.mean([sum(x != y for x, y in zip(a, b)) / len(a)
                    for a, b in zip(words_in, words_out)])
  else:
    frac = np.mean([sum(x != y for x, y in zip(a, b)) / len(a)
                    for a, b in zip(words_in, words_out)])
  assert 0.07 < frac < 0.13, frac


def test_caps_and_seeding():
  src = ['Hello world', 'another doc here']
  a = perturb.PerturbedSource(src_with_name(src), 'replace', 0.5, seed=1)
  b = perturb.PerturbedSource(src_with_name(src), 'replace', 0.5, seed=1)
  c = perturb.PerturbedSource(src_with_name(src), 'replace', 0.5, seed=2)
  assert [a[i] for i in range(2)] == [b[i] for i in range(2)] != [c[i] for i in range(2)]
  assert perturb.PerturbedSource(src_with_name(src), 'caps')[0] == 'HELLO WORLD'
  with pytest.raises(ValueError, match='unknown perturbation'):
    perturb.PerturbedSource(src_with_name(src), 'shout')


class src_with_name(list):
  name = 'mem'


@settings(max_examples=200, derandomize=True, database=None)
@given(st.text(), st.sampled_from(['permute', 'delete', 'replace']))
def test_any_text_keeps_whitespace_layout(text, kind):
  out = perturb.perturb(text, kind, 0.1, np.random.default_rng(0))
  assert re.findall(r'\s+', out) == re.findall(r'\s+', text) or kind == 'delete'
