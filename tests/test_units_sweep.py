"""The units comparison (configs/units.py, benchmarks/units.py --sweep) and text without spaces
(data.char_map 'FROM='): configs and helpers only, nothing trains or compiles."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

from data import corpus
from train import config_lib, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('preset', ['tiny', 'small'])
def test_every_point_builds_at_one_budget(monkeypatch, preset):
  monkeypatch.chdir(REPO)
  cfg, module = config_lib.load(f'configs/units.py:{preset}')
  points = module.get_sweep(cfg)
  names = [sweep.run_name(p) for p in points]
  assert len(set(names)) == len(names) and names[0] == 'patcher'
  point_config = sweep._point_config  # pylint: disable=protected-access
  subs = {n: point_config(cfg, p, {}) for n, p in zip(names, points)}
  matched = {n: s for n, s in subs.items() if n != 'patcher'}
  assert {s.train.flops_budget for s in matched.values()} == {cfg.train.flops_budget}
  assert subs['patcher'].train.flops_budget == 0 and subs['patcher'].family == 'lm'
  assert subs['hat_entropy'].data.patcher == 'sweep:patcher'
  assert [subs[f'hat_learned{t:g}'].model.chunk_target for t in module.TARGETS] == [4.0, 8.0]
  assert {subs['byte_lm'].data.encoder, subs['subword_lm'].data.encoder} == {'bytes', 'bpe'}
  assert subs['hat_learned4_nospaces'].data.char_map == ' ='
  assert all(s.eval.robustness == 'caps,replace' for s in matched.values())
  # a budget given on the command line reaches every matched point, the baselines included
  over = {'train.flops_budget': 5e11}
  cfg2, _ = config_lib.load(f'configs/units.py:{preset}')
  config_lib.override(cfg2, over)
  for p in module.get_sweep(cfg2):
    if p['name'] != 'patcher':
      assert point_config(cfg2, p, over).train.flops_budget == 5e11


def test_char_map_removes_characters():
  table = corpus.parse_char_map(' =')
  assert 'a b  c\n'.translate(table) == 'abc\n'
  assert 'x,y z'.translate(corpus.parse_char_map(', =')) == 'xyz'  # ',' and ' ' removed
  assert corpus.parse_char_map('ab=cd') == {ord('a'): ord('c'), ord('b'): ord('d')}
  assert corpus.parse_char_map('a==') == {ord('a'): ord('=')}   # the mapping form wins
  for bad in ('=', 'ab=c', 'aa='):
    with pytest.raises(ValueError, match='data.char_map'):
      corpus.parse_char_map(bad)


def test_units_of_a_run_on_a_piece():
  from benchmarks import units  # pylint: disable=import-outside-toplevel
  units_of, stats = units._units, units._stats  # pylint: disable=protected-access
  piece = b'abcdefg'
  # a HAT's word starts over [bos] + bytes (bos at 0; learned units need not start at byte 1)
  hat_state = types.SimpleNamespace(word_starts=[0, 3, 5])
  np.testing.assert_array_equal(units_of(None, hat_state, piece), [2, 2, 3])
  hat_state = types.SimpleNamespace(word_starts=[0, 1, 4])
  np.testing.assert_array_equal(units_of(None, hat_state, piece), [3, 4])
  byte_lm = types.SimpleNamespace(family=types.SimpleNamespace(encoder=object()))
  np.testing.assert_array_equal(units_of(byte_lm, object(), piece), [1] * 7)
  s = stats(np.array([1, 2, 3, 14]), capped=True)
  assert s['mean'] == 5 and s['max'] == 14 and s['at_cap'] == 0.25
