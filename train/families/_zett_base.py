"""What the two ZeTT families share (a helper module, not a family): the frozen base, the
checkpointable prefetching iterator, the fixed evaluation tokenizer recorded with the run, the
trained/frozen split and the hypernetwork as a token embedder for tokenizer transfer.

The families: `zett` (train/families/zett.py, a decoder LM base: sampled UnigramLM
vocabularies, next-token loss) and `zett_encoder` (train/families/zett_encoder.py, a BERT
sentence encoder base: sampled WordPiece vocabularies, sentence-embedding cosine loss).
"""
from __future__ import annotations

import abc
import queue
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from data import pipeline
from train import families
from train.families import pretrained

# the preset that trains a hypernetwork for each kind of base model
PRESET_OF_KIND = {'decoder': 'configs/zett.py:smollm2', 'encoder': 'configs/zett.py:minilm'}
_ARTICLE = {'encoder': 'an encoder', 'decoder': 'a decoder'}


class ZettIterator:
  """Checkpointable iterator of ZeTT batches with its own prefetch thread: its state is the
  byte iterator's state plus the step count (which fixes the warm-up and the sampler's
  randomness)."""

  def __init__(self, inner: pipeline.TrainIterator, batcher: Callable[[dict, int], dict], prefetch: int = 2):
    self.inner, self.batcher, self.prefetch = inner, batcher, prefetch
    self.step = 0
    self._state = {**inner.get_state(), 'zett_step': 0}
    self._thread = None
    self._start()

  def _start(self):
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=max(self.prefetch, 1))
    inner, batcher, stop, q, step0 = self.inner, self.batcher, self._stop, self._queue, self.step

    def run():
      step = step0
      try:
        while not stop.is_set():
          bb = next(inner)
          item = ('ok', batcher(bb, step), {**inner.get_state(), 'zett_step': step + 1})
          step += 1
          pipeline.put_unless_stopped(q, item, stop)
      except BaseException as e:  # pylint: disable=broad-except
        pipeline.put_unless_stopped(q, ('error', e, None), stop)

    self._thread = threading.Thread(target=run, name='ZettIterator', daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    kind, batch, state = self._queue.get()
    if kind == 'error':
      raise batch
    self._state = state
    return batch

  def get_state(self):
    return dict(self._state)

  def set_state(self, state):
    self.close()
    self.step = int(state.get('zett_step', 0))
    self.inner.set_state({k: v for k, v in state.items() if k != 'zett_step'})
    self._state = dict(state)
    self._start()

  def close(self):
    if self._thread is not None:
      pipeline.stop_thread(self._thread, self._stop, self._queue)
      self._thread = None
    self.inner.close()

  @property
  def source(self):
    return self.inner.source


def base_kind(base) -> str:
  """'encoder' (a BERT sentence encoder) or 'decoder' (a language model): the kind of a loaded
  `models.pretrained.Pretrained`."""
  return 'encoder' if base.meta.get('kind') == 'encoder' else 'decoder'


class ZettBase(families.Family):
  """A hypernetwork (trained) beside a frozen pretrained `model.source` of kind `KIND`. A
  subclass sets `KIND`, builds its model (`build_model`, holding the frozen base under
  `BASE_ATTR`), and provides `_batcher_for(seq_len)` (whose `vocab_arrays(tokenizer)` gives the
  hypernetwork's inputs), `_piece_ids(strings, max_pieces)`, `_input_embeddings` and
  `_new_eval_tokenizer()`."""

  KIND = ''       # 'decoder' | 'encoder'
  BASE_ATTR = ''  # the attribute of the model that holds the frozen base

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    if jax.process_count() > 1:
      raise ValueError('zett training samples one tokenizer per step from host-local text: '
                       'run it as one process (any number of local devices)')
    self.base = self._load_base()
    self.lm_cfg = self.base.cfg_model
    self.base_vocab = self.base.tokenizer.get_vocab(with_added_tokens=True)
    self._eager = None
    self._eval_tok = None
    self._batcher = None

  def _load_base(self):
    """The frozen base of `model.source`, refused when it is not of this family's kind."""
    base = pretrained.load_source(self.cfg.model.source)
    got = base_kind(base)
    if got != self.KIND:
      raise ValueError(f'model.source={self.cfg.model.source!r} is {_ARTICLE[got]} model, but '
                       f'family {self.name!r} trains {_ARTICLE[self.KIND]} hypernetwork: use '
                       f'{PRESET_OF_KIND[got]}')
    return base

  def trainable(self):
    return nnx.All(nnx.Param, nnx.PathContains('hypernet'))

  def _eager_model(self):
    if self._eager is None:
      m = self.build_model(nnx.Rngs(self.cfg.seed))
      nnx.update(getattr(m, self.BASE_ATTR), nnx.state(self.base.model))
      self._eager = m
    return self._eager

  def initial_params(self):
    return nnx.to_pure_dict(nnx.state(self._eager_model(), self.trainable()))

  def frozen_params(self):
    return nnx.to_pure_dict(nnx.state(self._eager_model(), nnx.Not(self.trainable())))

  def eval_tokenizer(self):
    """The fixed evaluation tokenizer: the run's recorded one, else `_new_eval_tokenizer()`
    (see the family's module doc)."""
    if self._eval_tok is None:
      recorded = self.recorded('eval_tokenizer.json')
      self._eval_tok = (tokenizers.Tokenizer.from_str(recorded.decode()) if recorded is not None
                        else self._new_eval_tokenizer())
    return self._eval_tok

  @abc.abstractmethod
  def _new_eval_tokenizer(self):
    """The evaluation tokenizer sampled for this kind (recorded as an artifact)."""

  @abc.abstractmethod
  def _batcher_for(self, seq_len: int):
    """This kind's batcher of training rows of `seq_len`."""

  @abc.abstractmethod
  def _piece_ids(self, strings: list[str], max_pieces: int) -> np.ndarray:
    """`strings` split into base-vocabulary pieces ([N, max_pieces], padded) by this kind's rule."""

  @abc.abstractmethod
  def _input_embeddings(self, model, pieces, shared, keep):
    """The hypernetwork's input embeddings for `pieces` (this kind's base embeddings)."""

  def artifacts(self) -> dict[str, bytes]:
    return {'eval_tokenizer.json': self.eval_tokenizer().to_str().encode()}

  def token_embedder(self, model):
    """The hypernetwork over this family's base pieces, jitted, in chunks of 4096 tokens."""
    predict = jax.jit(lambda pieces: model.hypernet(jnp.asarray(pieces)))
    p = int(self.cfg.hypernet.max_pieces)

    def embed(strings):
      return pipeline.map_in_batches(predict, self._piece_ids(strings, p), 4096, fill=-1)

    embed.max_pieces = p
    return embed

  def sample(self, model, cfg_sample):
    """A look at the predictions: the nearest base tokens (cosine) of a few eval tokens that the
    base vocabulary does not have."""
    del cfg_sample
    tok = self.eval_tokenizer()
    b = self._batcher_for(8).vocab_arrays(tok)
    new = np.flatnonzero((b['vocab_shared'] < 0) & (b['vocab_pieces'][:, 1] >= 0))[:6]
    e = np.asarray(self._input_embeddings(model, jnp.asarray(b['vocab_pieces'][new]),
                                          jnp.asarray(b['vocab_shared'][new]),
                                          jnp.asarray(b['vocab_keep'][new])))
    base = self.base_in / np.linalg.norm(self.base_in, axis=-1, keepdims=True)
    sim = (e / np.linalg.norm(e, axis=-1, keepdims=True)) @ base.T
    parts = [f'{tok.id_to_token(int(i))!r} -> {self.base.tokenizer.id_to_token(int(j))!r}'
             for i, j in zip(new, sim.argmax(-1))]
    return ['nearest base token of predicted embeddings: ' + ', '.join(parts)]

  def _hypernet_flops_per_token(self) -> float:
    """The hypernetwork's training FLOPs for one step's vocabulary, per position of a row."""
    h = self.cfg.hypernet
    per_vocab_row = 6 * h.max_pieces * h.num_layers * (4 * h.d_model ** 2
                                                       + 2 * h.d_model * h.mlp_dim)
    rows = self.cfg.train.batch_size * self.cfg.data.seq_len
    return per_vocab_row * self.cfg.zett.vocab_size / rows

  def data_stats(self):
    out = super().data_stats()
    if self._batcher is not None:
      out['train_tokens_cut'] = self._batcher.stats['tokens_cut']
      out['train_tokens'] = self._batcher.stats['tokens']
    return out
