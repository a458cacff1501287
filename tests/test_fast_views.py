"""The one-forward `distributions` of the HAT byte views (models/hat_view.py): for learned
chunking and for entropy patches (boundaries decided by the time their byte arrives) it equals
the byte-by-byte one (`ByteLM.distributions`, the base class's loop over `advance`), with the
same units; texts past `max_forward` step byte by byte.

The tiny models and the patcher are those of tests/test_learned_chunking.py and
tests/test_entropy_patches.py (their builders and fixture, imported)."""
import numpy as np
import pytest
from flax import nnx

from models import hat, hat_view
from models.byte_level.interface import ByteLM
from test_entropy_patches import source, splitters  # noqa: F401  (source: the patcher fixture)
from test_learned_chunking import ENC, LW, tiny_cfg

ATOL = 1e-4  # log-probabilities (float32 logits of the same model, two computation orders)
TEXTS = [
    b'def f(x): return x + 1  # and some more text',
    'naïve café, 東京 señor — ok'.encode(),               # two- and three-byte characters
    b'x = [i * i for i in range(10)]  # squares, sixty-three bytes!!!',  # 63 bytes: 64 ids, full
]


@pytest.fixture(scope='module')
def learned_view():
  model = hat.HAT(tiny_cfg(), ENC.vocab_size, rngs=nnx.Rngs(0), max_unit_bytes=LW)
  return hat_view.byte_view(model, None, LW)


@pytest.fixture(scope='module')
def entropy_view(source):  # noqa: F811  pylint: disable=redefined-outer-name
  model = hat.HAT(tiny_cfg(chunking='splitter'), ENC.vocab_size, rngs=nnx.Rngs(3))
  return hat_view.byte_view(model, splitters(source)[0], LW)


def _stepped(view, text):
  """(distributions, word starts) byte by byte: the base class's loop, the last state's starts."""
  st = view.start(b'')
  for b in text:
    st = view.advance(st, b)
  return ByteLM.distributions(view, text), list(st.word_starts)


def _check(view, text):
  assert view._one_pass([1] + [b + 3 for b in text]) is not None  # pylint: disable=protected-access
  fast, starts = view.distributions_and_starts(text)
  slow, slow_starts = _stepped(view, text)
  assert fast.shape == slow.shape == (len(text) + 1, 257) and fast.dtype == np.float32
  np.testing.assert_allclose(fast, slow, atol=ATOL, rtol=0)
  assert starts == slow_starts
  return starts


def test_sizes():
  assert len(TEXTS[2]) + 1 == hat_view.FORWARD_MIN  # bos + text fill the smallest bucket exactly
  assert any(b >= 0xE0 for b in TEXTS[1])


@pytest.mark.parametrize('i', range(len(TEXTS)))
def test_learned_forward_equals_stepping(learned_view, i):  # pylint: disable=redefined-outer-name
  starts = _check(learned_view, TEXTS[i])
  assert 2 < len(starts) < len(TEXTS[i])  # the router cut units inside the text


@pytest.mark.parametrize('i', range(len(TEXTS)))
def test_entropy_forward_equals_stepping(entropy_view, i):  # pylint: disable=redefined-outer-name
  starts = _check(entropy_view, TEXTS[i])
  assert 2 < len(starts) < len(TEXTS[i])


def test_long_texts_step_byte_by_byte(learned_view, entropy_view):  # pylint: disable=redefined-outer-name
  """Past `max_forward` ids the view steps (the same numbers: the base class's loop)."""
  text = TEXTS[0][:20]
  for view in (learned_view, entropy_view):
    view.max_forward = len(text)  # bos + text is one more
    try:
      assert view._one_pass([1] + [b + 3 for b in text]) is None  # pylint: disable=protected-access
      d, starts = view.distributions_and_starts(text)
      slow, slow_starts = _stepped(view, text)
      np.testing.assert_array_equal(d, slow)
      assert starts == slow_starts
    finally:
      view.max_forward = 4096
