"""The tokenizer-transfer hypernetwork (models/hypernet.py) on a tiny byte-level base."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data import encoders
from models import hypernet


@pytest.fixture(scope='module')
def base():
  tok = encoders._train_tokenizer(['the tokenizer transfer hypernetwork ' * 40,
                                   'predicts embeddings for new tokens ' * 40], 320)
  v = tok.get_vocab_size()
  rng = np.random.default_rng(0)
  return tok, rng.normal(0.3, 2.0, (v, 16)).astype(np.float32), rng.normal(
      size=(v, 16)).astype(np.float32)


# the forward passes jitted: one compilation each instead of one per operation (eager)
forward = nnx.jit(lambda net, pieces: net(pieces))
forward_packed = nnx.jit(lambda net, arrays: net.packed(**arrays))


def small_cfg():
  c = hypernet.default_config()
  c.d_model, c.num_layers, c.num_heads, c.mlp_dim, c.max_pieces = 32, 2, 4, 64, 7
  return c


def test_pieces_shapes_padding_and_rescaling(base):
  tok, e_in, e_out = base
  strings = ['Ġtokenizer', 'Ġhypernetwork', 'xyz', 'Ġthe']
  pieces = hypernet.piece_ids(tok, strings, 7)
  assert pieces.shape == (4, 7) and (pieces[:, 0] >= 0).all()
  for s, row in zip(strings, pieces):
    assert [t.id for t in tok.model.tokenize(s)][:7] == row[row >= 0].tolist()
  net = hypernet.HyperNet(small_cfg(), e_in, e_out, rngs=nnx.Rngs(0))
  a_in, a_out = forward(net, jnp.asarray(pieces))
  assert a_in.shape == a_out.shape == (4, 16)
  # padding beyond a token's pieces and the other rows of the batch do not matter
  b_in, _ = forward(net, jnp.asarray(pieces[1:2, :5]))
  np.testing.assert_allclose(b_in[0], a_in[1], atol=1e-5)
  # the outputs are rescaled to the base statistics: zero heads give the base mean exactly
  net.head_in.kernel[...] = jnp.zeros_like(net.head_in.kernel[...])
  net.head_in.bias[...] = jnp.zeros_like(net.head_in.bias[...])
  z_in, _ = forward(net, jnp.asarray(pieces))
  np.testing.assert_allclose(z_in, np.broadcast_to(e_in.mean(0), (4, 16)), rtol=1e-5)
  tied = hypernet.HyperNet(small_cfg(), e_in, rngs=nnx.Rngs(0))
  assert forward(tied, jnp.asarray(pieces))[1] is None
  # specials keep their base rows
  out = hypernet.assemble(np.asarray(a_in), {0: e_in[0]})
  np.testing.assert_array_equal(out[0], e_in[0])
  np.testing.assert_array_equal(out[1:], np.asarray(a_in)[1:])


def test_identity_warmup_learns(base):
  tok, e_in, e_out = base
  vocab = tok.get_vocab()
  strings = sorted(vocab, key=vocab.get)
  pieces = jnp.asarray(hypernet.piece_ids(tok, strings, 7))
  ids = np.asarray([vocab[s] for s in strings])
  t_in, t_out = jnp.asarray(e_in[ids]), jnp.asarray(e_out[ids])
  net = hypernet.HyperNet(small_cfg(), e_in, e_out, rngs=nnx.Rngs(1))
  opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(net, opt):
    loss, grads = nnx.value_and_grad(hypernet.warmup_loss)(net, pieces, t_in, t_out)
    opt.update(net, grads)
    return loss

  frozen = np.asarray(net.base[...])
  first = float(step(net, opt))
  for _ in range(150):
    last = float(step(net, opt))
  assert last < 0.25 * first, (first, last)
  np.testing.assert_array_equal(np.asarray(net.base[...]), frozen)  # the base stays frozen


def test_fvt_anchor_starts_at_fvt(base):
  """anchor='fvt': zero-initialized heads, so an untrained hypernetwork predicts exactly the mean
  of each token's base pieces (FVT), a token without pieces the base mean."""
  tok, e_in, e_out = base
  cfg = small_cfg()
  cfg.anchor = 'fvt'
  strings = ['Ġtokenizer', 'Ġhypernetwork', 'xyz', '']
  pieces = hypernet.piece_ids(tok, strings, 7)
  net = hypernet.HyperNet(cfg, e_in, e_out, rngs=nnx.Rngs(0))
  a_in, a_out = forward(net, jnp.asarray(pieces))
  for i in range(3):
    p = pieces[i][pieces[i] >= 0]
    np.testing.assert_allclose(a_in[i], e_in[p].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a_out[i], e_out[p].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_in[3], e_in.mean(0), rtol=1e-5, atol=1e-6)


def test_packed_pieces_equal_the_padded_layout():
  """The packed layout (no work on padding) gives the padded layout's embeddings; pieces that do
  not fit are cut from the longest tokens and counted."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import hypernet  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  v, p, vb, d = 37, 7, 50, 12
  n = rng.integers(0, p + 1, v)
  n[:3] = (0, 7, 1)
  pieces = np.full((v, p), -1, np.int32)
  for i, k in enumerate(n):
    pieces[i, :k] = rng.integers(0, vb, k)
  base = rng.normal(size=(vb, d)).astype(np.float32)
  for anchor in ('fvt', 'mean'):
    c = ml_collections.ConfigDict({'d_model': 16, 'num_layers': 2, 'num_heads': 2, 'mlp_dim': 32,
                                   'max_pieces': p, 'anchor': anchor})
    net = hypernet.HyperNet(c, base, base * 0.5, rngs=nnx.Rngs(1))
    for head in (net.head_in, net.head_out):  # non-zero heads: the transformer path counts
      head.kernel[...] = jnp.asarray(rng.normal(size=head.kernel.shape) * 0.1, jnp.float32)
    want_in, want_out = forward(net, jnp.asarray(pieces))
    packed, cut = hypernet.pack_pieces(pieces, hypernet.packed_rows(v, 5.0))
    assert cut == 0 and packed['ids'].size < pieces.size * 5.0 / p + 8
    got_in, got_out = forward_packed(net, {k: jnp.asarray(a) for k, a in packed.items()})
    np.testing.assert_allclose(got_in, want_in, atol=2e-5)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5)
  real = int(np.maximum(n, 1).sum())
  tight, cut = hypernet.pack_pieces(pieces, real // hypernet.PACK_ROW)
  assert cut >= real - (real // hypernet.PACK_ROW) * hypernet.PACK_ROW
  assert tight['count'][1] < 7 and tight['count'][2] == 1  # the longest token lost pieces
  assert (np.bincount(tight['tok'][tight['tok'] >= 0], minlength=v) >= 1).all()  # all placed
  with pytest.raises(ValueError, match='do not fit'):
    hypernet.pack_pieces(pieces, 2)
