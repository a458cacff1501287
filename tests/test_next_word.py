"""Next-word accuracy (train/evals/next_word.py): the word definition, the greedy-match rule on
teacher-forced distributions, and a byte-level view that knows the text (accuracy 1) or stops
a word late (0)."""
import numpy as np

from models import byte_level as bl
from train.evals import next_word


class _Oracle(bl.ByteLM):
  """Puts all mass on the true next byte of `text` (and on end after it), except that after
  the prefixes in `wrong` it predicts the given byte instead."""

  def __init__(self, text: bytes, wrong: dict[bytes, int] | None = None):
    self.text, self.wrong = text, wrong or {}

  def start(self, prompt=b''):
    return bytes(prompt)

  def advance(self, state, byte):
    return state + bytes([byte])

  def next_byte_logprobs(self, state):
    lp = np.full(257, -np.inf, np.float32)
    n = len(state)
    nxt = self.text[n] if n < len(self.text) else bl.END
    lp[self.wrong.get(state, nxt)] = 0.0
    return lp


def test_words_scored_and_greedy_rule():
  text = b'The bank  banker\tx.\n(y)'
  spans = next_word.scored_words(text, complete=False)
  assert [text[a:b] for a, b in spans] == [b'bank', b'banker', b'x.']  # not 'The', not '(y)'
  assert [text[a:b] for a, b in next_word.scored_words(text, complete=True)][-1] == b'(y)'
  # greedy decoding of the whole text is right everywhere: every word is a hit
  hits, right = next_word.greedy_hits(_Oracle(text).distributions(text), text, spans)
  assert hits.all() and right.tolist() == [4, 6, 2]
  # 'bank' continued as 'banke...' (no boundary after it) and 'banker' cut to 'banke' + ' '
  wrong = {b'The bank': ord('e'), b'The bank  banke': ord(' ')}
  hits, right = next_word.greedy_hits(_Oracle(text, wrong).distributions(text), text, spans)
  assert hits.tolist() == [False, False, True] and right.tolist() == [4, 5, 2]
  # any whitespace or the end is a boundary; a word's first byte wrong is a miss
  res = next_word.score_view(_Oracle(text, {b'The bank  banker\t': ord('z')}),
                             [(text, True), (b'one', True)])
  assert res['n_words'] == 4 and res['accuracy'] == 0.75 and res['n_texts'] == 2


def test_utf8_prefix_never_cuts_a_character():
  data = 'ab\u00e9\u20ac'.encode()  # a b é(2) €(3)
  assert [next_word.utf8_prefix(data, n) for n in range(8)] == [
      b'', b'a', b'ab', b'ab', data[:4], data[:4], data[:4], data]


def test_compare_sweep_summary_has_next_word_accuracy(tmp_path, monkeypatch):
  """Every model of the compare sweep is evaluated with next-word accuracy (after training:
  robustness on, eval.next_word on, the same windows for all), and the sweep's summary table
  has its column (here gathered from finished runs' files, no training)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from train import config_lib, sweep  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg, module = config_lib.load('configs/compare.py:tiny')
  points = module.get_sweep(cfg)
  for p in points:
    sub = sweep._point_config(cfg, p, {})  # pylint: disable=protected-access
    assert sweep._evaluates(sub) and sub.eval.next_word  # pylint: disable=protected-access
    assert sub.eval.next_word_texts == 256
  for i, p in enumerate(points):
    wd = tmp_path / sweep.run_name(p)
    wd.mkdir()
    (wd / 'train_summary.json').write_text(json.dumps({'step': 10, 'flops_per_step': 1.0}))
    (wd / 'eval_step10.json').write_text(json.dumps(
        {'step': 10, 'bpb': 3.0, 'next_word': {'accuracy': 0.1 * i}}))
  rows = sweep.gather(cfg, points, str(tmp_path))
  assert [r['next_word_acc'] for r in rows] == [0.0, 0.1, 0.2]
  assert 'next_word_acc' in (tmp_path / 'summary.md').read_text().splitlines()[0]
