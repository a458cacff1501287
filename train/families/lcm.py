"""LCM family (`family='lcm'`): Base-LCM (MSE) and Two-Tower diffusion LCM (models/lcm.py) in a
cached sentence space (`data.sentence_encoder`, see train/families/sentence_decoder.py).

`--mode=eval` predicts every next sentence of the validation split with the true context and
reports, in the raw embedding space, l2 to the true next embedding, contrastive accuracy
(share of other documents' targets farther from the prediction than the true one) and the
paraphrase ratio, and with a decoder (`lcm.decoder_workdir`) the round-trip l2 (decode,
re-encode, distance to the true next embedding) and the decoder's own round trip on the true
embeddings (exact match, BLEU); a copy-the-previous-sentence baseline beside them
(train/evals/lcm.py). `--mode=sample` continues `sample.prompt` sentence by sentence.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from data import pipeline, sentences
from models import lcm
from train import families
from train.evals import lcm as lcm_evals
from train.families import sentence_decoder as sd
from train.metrics import log0


class LCMFamily(families.Family):

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.spec = cfg.data.sentence_encoder
    self.space = self.train_space()
    self.center, self.scale = sd.normalizer(self.space)
    self._index = None
    self._eval = None

  @property
  def index(self) -> sentences.SentenceIndex:
    """The training space as documents of sentence ids (data.pipeline's source and encoder)."""
    if self._index is None:
      self._index = sentences.SentenceIndex(self.space)
    return self._index

  def train_space(self):
    """The training split's sentence space (built and embedded on first use)."""
    return sd.load_space(self.cfg.data, self.cfg.data.train_split, self.spec)
    self.index = sentences.SentenceIndex(self.space)
    self._eval = None

  def build_model(self, rngs):
    return lcm.LCM(self.cfg.model, self.space.dim, self.center, self.scale, self.dtype,
                   rngs=rngs)

  def loss(self, model, batch, rng):
    return lcm.loss(model, batch, rng, self.cfg.model)

  def train_iterator(self, process_index, process_count):
    c = self.cfg
    return pipeline.TrainIterator(
        self.index, self.index, c.data.seq_len, pipeline.local_batch_size(c, process_count),
        seed=c.seed, process_index=process_index, process_count=process_count,
        shuffle=c.data.shuffle, prefetch=c.data.prefetch,
        transform=sentences.EmbeddingFields(self.space))

  def eval_space(self):
    if self._eval is None:
      space = sd.load_space(self.cfg.data, self.cfg.data.eval_split, self.spec)
      self._eval = (space, sentences.SentenceIndex(space))
    return self._eval

  def eval_batches(self, process_index, process_count, max_batches=0, perturbation=None):
    if perturbation:
      raise ValueError('the LCM has no perturbation evaluations (set eval.robustness to "")')
    space, index = self.eval_space()
    batches = pipeline.eval_batches(index, index, self.cfg.data.seq_len,
                                    pipeline.local_batch_size(self.cfg, process_count),
                                    process_index, process_count, max_batches)
    fields = sentences.EmbeddingFields(space)
    return [fields(b) for b in batches]

  def flops_per_token(self):
    return lcm.flops_per_sentence(self.cfg.model, self.space.dim, self.cfg.data.seq_len)

  def data_stats(self):
    return {f'train_{k}': v for k, v in sentences.describe(self.space).items()}

  def describe(self):
    m = self.cfg.model
    kind = ('Base-LCM (MSE)' if m.variant == 'base' else
            f'Two-Tower diffusion LCM ({m.denoiser_layers}-layer denoiser, {m.schedule} '
            f'schedule, {m.timesteps} steps)')
    return (f'{kind} | {self.spec} sentence space ({self.space.dim}-d, '
            f'{self.space.num_docs} train documents, '
            f'{self.space.num_sentences - sentences.NUM_SPECIAL} sentences) | '
            f'{self.cfg.data.seq_len} sentences per row | batch {self.cfg.train.batch_size}')

  # -- prediction ---------------------------------------------------------------------------
  def _predict_fn(self, graphdef, temperature: float = 0.0):
    c = self.cfg

    @jax.jit
    def fn(params, batch, key):
      return lcm.predict(nnx.merge(graphdef, params), batch, key, c.model, c.lcm, temperature)
    return fn

  def eval_suite(self, setup, params, workdir, step):
    c = self.cfg
    space, _ = self.eval_space()
    fn = self._predict_fn(setup.graphdef)
    keep = {'pred': [], 'target': [], 'prev': [], 'doc': [], 'tid': [], 'ctx': []}
    # every process predicts the whole split on its own devices (the metrics need all rows)
    params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
    for i, b in enumerate(self.eval_batches(0, 1, c.train.eval_batches)):
      pred = np.asarray(fn(params, b, jax.random.key(c.seed + i)))
      for r in range(len(b['inputs'])):
        for j in np.flatnonzero((b['weights'][r] > 0) & (b['inputs'][r] != sentences.BOS_ID)):
          seg = b['segment_ids'][r]
          ctx = [k for k in range(j + 1)
                 if seg[k] == seg[j] and b['inputs'][r, k] >= sentences.NUM_SPECIAL]
          keep['pred'].append(pred[r, j])
          keep['target'].append(b['target_emb'][r, j])
          keep['prev'].append(b['input_emb'][r, j])
          keep['ctx'].append(b['input_emb'][r, ctx])
          keep['tid'].append(int(b['targets'][r, j]))
          keep['doc'].append(int(np.searchsorted(space.docs, b['inputs'][r, j], 'right')))
    if not keep['pred']:
      raise ValueError('the validation split has no sentence with a preceding sentence')
    pred, target, prev = (np.stack(keep[k]) for k in ('pred', 'target', 'prev'))
    dec = self._decoder()
    res, row = lcm_evals.lcm_report(
        pred, target, prev, np.asarray(keep['doc']), keep['ctx'],
        name='Base-LCM' if c.model.variant == 'base' else 'Two-Tower', step=step,
        workdir=workdir, decoder=dec, encode=sd.sentence_encoder(self.spec),
        refs=space.texts(keep['tid'][:c.eval.max_sentences]) if dec else None,
        max_sentences=c.eval.max_sentences)
    return {'lcm': res, 'row': row}

  def _decoder(self):
    """The sentence decoder of `lcm.decoder_workdir` (None if unset), checked against this
    LCM's sentence space."""
    workdir = self.cfg.lcm.decoder_workdir
    if not workdir:
      return None
    dec = sd.load_decoder(workdir)
    sd.check_decoder(dec, self.spec, f'lcm.decoder_workdir={workdir!r}')
    return dec

  # -- generation ---------------------------------------------------------------------------
  def check_sample(self, cfg_sample) -> None:
    sd.prompt_sentences(self.cfg, cfg_sample)

  @classmethod
  def check_sample_config(cls, cfg) -> None:
    sd.prompt_sentences(cfg, cfg.sample)  # before the sentence space is embedded

  def sample(self, model, cfg_sample) -> list[str]:
    """Continues `sample.prompt` sentence by sentence (see `generate`)."""
    graphdef, params = nnx.split(model)
    text, _ = self.generate(graphdef, params, cfg_sample)
    return [text]

  def generate(self, graphdef, params, cfg_sample):
    """(text, info): predicted embeddings are fed back as the next inputs; generation stops
    when a prediction's cosine to the end-of-text embedding reaches lcm.eot_threshold, to the
    previous sentence lcm.repeat_threshold, or after lcm.max_sentences. Each prediction is
    decoded by lcm.decoder_workdir's decoder, or, without one, shown as the nearest training
    sentence (marked as retrieved)."""
    c = self.cfg
    sents = sd.prompt_sentences(c, cfg_sample)
    dec = self._decoder()
    embs = list(sd.sentence_encoder(self.spec)(sents))
    eot = np.asarray(self.space.embeddings[sentences.EOT_ID], np.float32)
    s = c.data.seq_len
    fn = self._predict_fn(graphdef, temperature=cfg_sample.temperature)
    preds, reason = [], f'{c.lcm.max_sentences} sentences'
    for i in range(c.lcm.max_sentences):
      ctx = embs[-(s - 1):]
      n = len(ctx) + 1
      batch = {'inputs': np.zeros((1, s), np.int32), 'positions': np.zeros((1, s), np.int32),
               'segment_ids': np.zeros((1, s), np.int32),
               'input_emb': np.zeros((1, s, self.space.dim), np.float32)}
      batch['inputs'][0, :n] = [sentences.BOS_ID] + [sentences.NUM_SPECIAL] * len(ctx)
      batch['positions'][0, :n] = np.arange(n)
      batch['segment_ids'][0, :n] = 1
      batch['input_emb'][0, 1:n] = np.stack(ctx)
      key = jax.random.fold_in(jax.random.key(cfg_sample.seed), i)
      p = np.asarray(fn(params, batch, key))[0, n - 1]
      if lcm_evals.cosine(p, eot) >= c.lcm.eot_threshold:
        reason = 'end of text'
        break
      if lcm_evals.cosine(p, embs[-1]) >= c.lcm.repeat_threshold:
        reason = 'repetition'
        break
      preds.append(p)
      embs.append(p)
    if not preds:
      out = []
    elif dec is not None:
      out = dec.decode(np.stack(preds))
    else:
      out = [f'[retrieved] {t}' for t in self.nearest(np.stack(preds))]
    text = ' '.join(sents + out)
    log0(f'generated {len(preds)} sentences (stopped: {reason})')
    return text, {'sentences': len(preds), 'stop': reason}

  def nearest(self, emb: np.ndarray) -> list[str]:
    """The training sentences closest (cosine) to each embedding."""
    table = self.space.embeddings
    best = np.full(len(emb), -np.inf)
    arg = np.zeros(len(emb), np.int64)
    q = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    for s in range(sentences.NUM_SPECIAL, table.shape[0], 65536):
      t = np.asarray(table[s:s + 65536], np.float32)
      sim = q @ (t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)).T
      j = sim.argmax(1)
      better = sim[np.arange(len(q)), j] > best
      best = np.where(better, sim[np.arange(len(q)), j], best)
      arg = np.where(better, j + s, arg)
    return self.space.texts(arg)


Family = LCMFamily
