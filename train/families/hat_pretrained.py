"""HAT on a pretrained LM (`family='hat_pretrained'`, configs/hat.py:from_smollm2): a HAT
(train/families/hat.py: same data, trainer, checkpoints, generation and byte-level view) whose
backbone is the transformer stack of a Llama-family model (`pretrained.path`: 'smollm2', a
.gguf file or an HF directory, e.g. one written by --mode=transfer; models/hat_pretrained.py).

Staged training (`optim.stages`, train/optim.py): stage 1 (`freeze_steps`) trains the byte
encoder, decoder and projections with the backbone frozen bitwise, optionally with the
auxiliary loss toward the pretrained input embeddings (`pretrained.aux_weight`; in stage 2
`pretrained.aux_weight_stage2`); stage 2 trains everything, the backbone at `lr_ratio` times
the rate. The run records the pretrained model: `pretrained.sha256` in its config and
`artifacts/pretrained.json` (path and content hash); a resume or evaluation with a model of
other content is refused."""
from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from models import hat_pretrained, pretrained
from train import metrics
from train.families import hat as hat_family
from train.families import pretrained as pretrained_family

RECORD = 'pretrained.json'


_HASHES: dict[tuple, str] = {}


def _hash(path: str) -> str:
  """The content hash of a model file or directory, once per process and version."""
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
           else [path])
  key = (path, *((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files))
  if key not in _HASHES:
    _HASHES[key] = hat_pretrained.content_hash(path)
  return _HASHES[key]


class HATPretrainedFamily(hat_family.HATFamily):

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    p = cfg.pretrained
    where = f'pretrained.path={p.path}'
    try:
      self.loaded = pretrained_family.load_source(p.path)
    except pretrained.ModelFileError as e:
      raise ValueError(f'{where}: not a Llama-family LM this codebase reads ({e})') from None
    except FileNotFoundError as e:
      raise ValueError(f'{where}: {e}') from None
    meta = self.loaded.meta
    if meta.get('kind') == 'encoder' or not hasattr(self.loaded.model, 'transformer'):
      raise ValueError(f'{where}: a {type(self.loaded.model).__name__} sentence encoder, not a '
                       'Llama-family LM: a HAT backbone is a causal decoder stack (a GGUF '
                       'file with architecture llama, or an HF directory with model_type llama)')
    self.source = meta['source']
    digest = _hash(self.source)
    recorded = self.recorded(RECORD)
    if recorded is not None:
      rec = json.loads(recorded)
      if rec['sha256'] != digest:
        raise ValueError(
            f'{where}: this run was converted from {rec["path"]} (sha256 {rec["sha256"][:16]}...'
            f'), but {self.source} has sha256 {digest[:16]}...: a different pretrained model. '
            'Resume with the model the run recorded, or start a new run in another --workdir')
    if p.sha256 and p.sha256 != digest:
      raise ValueError(f'{where}: its content (sha256 {digest[:16]}...) is not the pretrained '
                       f'model the config records (pretrained.sha256={p.sha256[:16]}...)')
    p.sha256 = digest
    hat_pretrained.fill_backbone_config(cfg.model, self.loaded.cfg_model, self.source)
    stages = cfg.optim.get('stages')
    self.freeze_steps = int(stages.freeze_steps) if stages is not None and stages.part else 0
    self.aux = float(p.aux_weight) > 0 or float(p.aux_weight_stage2) > 0

  def _aux_vocab(self) -> int:
    return int(self.loaded.model.embed.embedding.shape[0]) if self.aux else 0

  def build_model(self, rngs):
    return hat_pretrained.PretrainedHAT(self.cfg.model, self.encoder.vocab_size, self.dtype,
                                        aux_vocab=self._aux_vocab(), rngs=rngs)

  def initial_params(self):
    """A freshly initialized HAT (seed `config.seed`) with the pretrained stack as backbone;
    None (the trainer's random initialization) with `pretrained.load_weights=False`: the same
    architecture from scratch, the baseline of the conversion."""
    if not self.cfg.pretrained.load_weights:
      return None
    model = self.build_model(nnx.Rngs(self.cfg.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    backbone = hat_pretrained.backbone_params(self.loaded.model,
                                              self.cfg.model.get('scan_layers', False))
    return hat_pretrained.with_backbone(params, backbone, self.source)

  def has_own_weights(self) -> bool:
    """--mode=eval on a workdir without checkpoints scores the converted model at step 0 (new
    byte encoder / decoder, pretrained backbone)."""
    return bool(self.cfg.pretrained.load_weights)

  def frozen_params(self):
    if not self.aux:
      return None
    return {'aux_table': np.asarray(self.loaded.model.embed.embedding[...], np.float32)}

  def loss(self, model, batch, rng):
    return hat_pretrained.loss(model, batch, rng)

  def train_iterator(self, process_index: int, process_count: int):
    it = super().train_iterator(process_index, process_count)
    if not self.aux:
      return it
    tokens = hat_pretrained.WordTokens(self.loaded.tokenizer, self.loaded.meta['doc_token_id'])
    return _AuxIterator(it, tokens, float(self.cfg.pretrained.aux_weight),
                        float(self.cfg.pretrained.aux_weight_stage2), self.freeze_steps)

  def derived_metrics(self, sums: dict) -> dict:
    if sums.get('aux_norm', 0.0) > 0:
      return {'aux_rel': sums['aux_err'] / sums['aux_norm']}
    return {}

  def headline_metrics(self) -> dict[str, str]:
    return {'aux_rel': 'aux'} if self.aux else {}

  def artifacts(self) -> dict[str, bytes]:
    p = self.cfg.pretrained
    return {RECORD: json.dumps({'path': self.source, 'source': p.path, 'sha256': p.sha256,
                                'format': self.loaded.meta.get('format'),
                                'name': self.loaded.meta.get('name', '')}, indent=1).encode()}

  def describe(self) -> str:
    m, s = self.cfg.model, self.cfg.optim.get('stages')
    staged = (f'stage 1: {s.part} frozen for {s.freeze_steps} steps, then lr x {s.lr_ratio}'
              if s is not None and s.part else 'no stages')
    aux = (f'aux {self.cfg.pretrained.aux_weight}/{self.cfg.pretrained.aux_weight_stage2}'
           if self.aux else 'no aux')
    return (f'backbone {self.source} (sha256 {self.cfg.pretrained.sha256[:12]}, '
            f'{m.num_layers} layers, d {m.d_model}, {m.num_heads}/{m.num_kv_heads} heads) | '
            f'{staged} | {aux} | ' + super().describe())


class _AuxIterator:
  """The HAT batches with the auxiliary loss's fields: the word tokens and an `aux_weight`
  column (`w1` for the first `freeze_steps` batches, stage 1, then `w2`; the tokens are not
  computed at weight 0). It counts the batches it returned (one per step) in its state, so a
  resumed run switches at the same step."""

  def __init__(self, inner, tokens, w1: float, w2: float, freeze_steps: int):
    self.inner, self.tokens, self.w1, self.w2 = inner, tokens, w1, w2
    self.freeze_steps, self.n = freeze_steps, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = next(self.inner)
    if self.n == self.freeze_steps and self.freeze_steps:
      metrics.log0(f'stage 2 from step {self.n}: every parameter trains')
    w = self.w1 if self.n < self.freeze_steps else self.w2
    self.n += 1
    rows, t = b['inputs'].shape
    if w > 0:
      ids, which = self.tokens(b['inputs'], b['word_gather'])
    else:
      ids = which = np.full((rows, t), -1, np.int32)
    return {**b, 'word_token_ids': ids, 'word_token_word': which,
            'aux_weight': np.full((rows,), w, np.float32)}

  def get_state(self) -> dict:
    return {'inner': self.inner.get_state(), 'batches': self.n}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or 'inner' not in state or 'batches' not in state:
      raise ValueError('the checkpointed data position is not one of a HAT run with the '
                       'auxiliary word-embedding loss (pretrained.aux_weight)')
    self.inner.set_state(state['inner'])
    self.n = int(state['batches'])

  def close(self) -> None:
    self.inner.close()


Family = HATPretrainedFamily
