"""HAT family (`family='hat'`): byte stream + word fields in, next-byte loss out
(models/hat.py; word splitting in data/words.py, the word fields in data/hat_data.py)."""
from __future__ import annotations

import json

import numpy as np

from data import encoders, hat_data, pipeline, words
from models import hat, hat_view, token_lm
from train import config_lib, families, runs, storage

PATCHER_FILE = 'patcher.json'  # the entropy patcher a run was trained with (an artifact)


class HATFamily(families.Family):
  host_workers = True  # data.workers: pipeline.make_train_iterator

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    if cfg.data.encoder != 'bytes':
      raise ValueError(f"family 'hat' reads bytes: data.encoder must be 'bytes', "
                       f'got {cfg.data.encoder!r}')
    d, m = cfg.data, cfg.model
    self.patcher_record, self.patcher_flops = None, 0.0
    self.learned = hat.check_chunking(m) == 'learned'
    if self.learned:
      _check_learned_rows(cfg)
      if str(d.splitter).strip() == 'entropy':
        raise ValueError("model.chunking='learned' with data.splitter='entropy': learned "
                         'chunking cuts its own units (the splitter is not read), so the '
                         "patcher would decide nothing; use one or the other")
    if str(d.splitter).strip() == 'entropy':
      self.splitter = self._entropy_splitter()
    else:
      self.splitter = words.get_splitter(cfg.data.splitter, cfg.data.max_word_bytes)
    self.boundary_id = None
    if m.pooling == 'boundary':  # word-boundary tokens in the stream (models/hat.py)
      self.encoder = hat_data.BoundaryByteEncoder(self.splitter, m.get('boundary_id', 259))
      self.boundary_id = self.encoder.boundary_id
    else:
      self.encoder = encoders.ByteEncoder()
    self.fields = hat_data.WordFields(self.splitter, d.max_words, d.max_word_bytes,
                                      self.boundary_id)
    self.eval_fields = hat_data.WordFields(self.splitter, d.max_words, d.max_word_bytes,
                                           self.boundary_id)
    # what generation and the byte-level view split words with, and the gather width
    self.words = (self.splitter if self.boundary_id is None else
                  hat_data.BoundaryWords(self.boundary_id, self.splitter.word_cap))
    self.word_len = self.fields.word_len
    if self.learned:  # the model cuts its own units: the rows go in as packed, no word fields
      self.fields = self.eval_fields = None

  # -- entropy patches (data.splitter='entropy') ---------------------------------------------------
  def _entropy_splitter(self) -> words.EntropySplitter:
    """The patcher (a finished byte-LM run) with its threshold: the run's recorded one (eval,
    sample, resume: the same weights, checked by fingerprint), else data.patch_threshold or one
    calibrated on the training split to data.patch_target_len."""
    from models import patcher  # pylint: disable=import-outside-toplevel
    d, m = self.cfg.data, self.cfg.model
    if m.pooling == 'boundary':
      raise ValueError("data.splitter='entropy' with model.pooling='boundary': boundary tokens "
                       'are placed by a text rule when a document is encoded and then generated '
                       'by the HAT itself, so the patcher would decide nothing at generation; '
                       "use model.pooling 'query' or 'last' with entropy patches")
    rule, target = str(d.get('patch_rule', 'global')), float(d.get('patch_target_len', 4.0))
    if rule not in words.PATCH_RULES:
      raise ValueError(f'data.patch_rule={rule!r}: expected one of {words.PATCH_RULES}')
    cap = int(d.max_word_bytes)
    if target and not 1.0 <= target <= cap:
      raise ValueError(f'data.patch_target_len={target:g}: no text reaches it (a unit holds '
                       f'at least 1 byte and at most data.max_word_bytes={cap}); pick a target '
                       f'in [1, {cap}], or 0 to use data.patch_threshold')
    if target < 0:
      raise ValueError(f'data.patch_target_len={target:g} must be >= 0')
    rec = None
    if self._manifest is not None and PATCHER_FILE in self._manifest['files']:
      rec = json.loads(self.recorded(PATCHER_FILE).decode())
    threshold = float(d.get('patch_threshold', 0.0))
    if not target and rec is None:  # a fixed threshold fails before any run is loaded
      words.check_patch_threshold(rule, threshold, encoders.ByteEncoder().vocab_size)
    workdir = str(d.get('patcher', '')).strip()
    if not workdir:
      raise ValueError("data.splitter='entropy' needs data.patcher: the workdir of a finished "
                       'byte-LM run (configs/byte_lm.py) whose next-byte entropies cut the units')
    if workdir.startswith('sweep:'):  # a point of the same sweep (trained before this one)
      if not self.workdir:
        raise ValueError(f'data.patcher={workdir!r} names a point of the sweep this run belongs '
                         "to; outside a sweep give the byte-LM run's workdir")
      workdir = storage.join(self.workdir.rstrip('/').rsplit('/', 1)[0],
                             workdir[len('sweep:'):])
    if not storage.isdir(workdir):
      raise FileNotFoundError(f'data.patcher: no run directory {workdir} (the patcher is a '
                              'finished byte-LM run: train one with configs/byte_lm.py)')
    saved = config_lib.load_saved(workdir)
    if saved.family != 'lm':
      raise ValueError(f'data.patcher={workdir} is a {saved.family!r} run, not a byte LM '
                       "(family 'lm', configs/byte_lm.py)")
    if saved.data.encoder != 'bytes':
      raise ValueError(f'data.patcher={workdir}: the patcher must be a byte LM over the HAT\'s '
                       f'ids (data.encoder bytes, vocabulary {self.encoder_vocab()}); this run '
                       f'reads another vocabulary (data.encoder={saved.data.encoder!r})')
    run = runs.load_run(workdir, step=rec['step'] if rec else None, family='lm',
                        what='data.patcher')
    enc = run.family.encoder
    if not isinstance(enc, encoders.ByteEncoder) or enc.vocab_size != self.encoder_vocab():
      raise ValueError(f'data.patcher={workdir}: the patcher must be a byte LM over the HAT\'s '
                       f'ids (vocabulary {self.encoder_vocab()}); this run has '
                       f'{type(enc).__name__} with vocabulary {enc.vocab_size}')
    # it reads at most the context it was trained on (data.seq_len ids back)
    context = int(run.cfg.data.seq_len)
    model, window = patcher.windowed(run.model(), run.cfg.model, context)
    source = patcher.LMEntropy(model, window=window, num_layers=int(run.cfg.model.num_layers))
    # its forward pass over every byte: a third of its training FLOPs per position
    self.patcher_flops = token_lm.flops_per_token(run.cfg.model, enc.vocab_size,
                                                  d.seq_len) / 3
    if rec is not None:
      if rec['fingerprint'] != source.fingerprint:
        raise ValueError(f'data.patcher={workdir} (step {run.step}) holds other weights than the '
                         f'patcher this run was trained with (fingerprint {rec["fingerprint"]}, '
                         f'now {source.fingerprint}; see {families.ARTIFACTS}/{PATCHER_FILE}): '
                         'restore that run or retrain')
      self.patcher_record = rec
      return words.EntropySplitter(source, rec['rule'], rec['threshold'], cap)
    splitter = words.EntropySplitter(source, rule, threshold if not target else 0.0, cap)
    reached = None
    if target:
      rows_i, rows_s = self._calibration_rows(d.get('patch_calib_rows', 256))
      threshold, reached = words.calibrate_threshold(splitter, rows_i, rows_s, target)
      splitter = words.EntropySplitter(source, rule, threshold, cap)
    self.patcher_record = {
        'workdir': run.identity.rsplit('@', 1)[0], 'step': run.step,
        'fingerprint': source.fingerprint, 'rule': rule, 'threshold': threshold,
        'target_len': target or None, 'calibrated_len': reached,
        'max_word_bytes': cap, 'patcher_config': json.loads(run.cfg.to_json_best_effort())}
    return splitter

  @staticmethod
  def encoder_vocab() -> int:
    return encoders.ByteEncoder().vocab_size

  def _calibration_rows(self, rows: int):
    """`rows` windows of `data.seq_len` bytes spread over the training split (the k-th from
    document k * n_docs // rows at a fixed pseudo-random offset), as packed rows that start
    mid-document do: the same on every host and every run. (The pipeline's first rows would
    come from one stretch of the corpus: its shuffle is local.)"""
    from data import corpus  # pylint: disable=import-outside-toplevel
    source = corpus.get_source(self.cfg.data, self.cfg.data.train_split)
    n, t, enc = len(source), int(self.cfg.data.seq_len), encoders.ByteEncoder()
    if not n:
      raise ValueError('data.patch_target_len: the training split holds no documents')
    rows = max(int(rows), 1)
    ids = np.zeros((rows, t), np.int32)
    seg = np.zeros((rows, t), np.int32)
    for k in range(rows):
      doc = np.concatenate([[enc.bos_id], enc.encode(source[k * n // rows]), [enc.eos_id]])
      start = (k * 2654435761) % max(len(doc) - t + 1, 1)
      piece = doc[start:start + t]
      ids[k, :len(piece)], seg[k, :len(piece)] = piece, 1
    return ids, seg

  def artifacts(self) -> dict[str, bytes]:
    if self.patcher_record is None:
      return {}
    return {PATCHER_FILE: json.dumps(self.patcher_record, indent=1, sort_keys=True).encode()}

  def build_model(self, rngs):
    d = self.cfg.data
    return hat.HAT(self.cfg.model, self.encoder.vocab_size, self.dtype, rngs=rngs,
                   max_units=d.max_words, max_unit_bytes=d.max_word_bytes)

  def loss(self, model, batch, rng):
    return hat.hat_loss(model, batch, rng)

  def derived_metrics(self, sums: dict) -> dict:
    """Learned chunking: bytes_per_unit (the compression reached), chunk_loss, chunk_overflow
    (models/hat.chunk_metrics)."""
    return hat.chunk_metrics(sums) if self.learned else {}

  def headline_metrics(self) -> dict[str, str]:
    if not self.learned:
      return {}
    return {'bytes_per_unit': 'bytes/unit', 'chunk_loss': 'chunk loss',
            'chunk_overflow': 'overflow'}

  def train_iterator(self, process_index: int, process_count: int):
    it = pipeline.make_train_iterator(self.cfg, self.encoder, process_index, process_count,
                                      transform=self.fields)
    self.track_source(it.source)
    return it

  def eval_batches(self, process_index: int, process_count: int, max_batches: int = 0,
                   perturbation: str | None = None):
    return pipeline.make_eval_batches(self.cfg, self.encoder, process_index, process_count,
                                      max_batches, perturbation, transform=self.eval_fields)

  def sample(self, model, cfg_sample) -> list[str]:
    prompt = [self.encoder.bos_id] + list(self.encoder.encode(cfg_sample.prompt))
    out = hat.generate(model, prompt, self.words, cfg_sample.max_new_tokens,
                       cfg_sample.temperature, cfg_sample.top_p, cfg_sample.seed,
                       stop_id=self.encoder.eos_id, max_word_bytes=self.word_len)
    out = np.asarray(out)
    stop = np.flatnonzero(out == self.encoder.eos_id)
    return [cfg_sample.prompt + self.encoder.decode(out[:stop[0]] if stop.size else out)]

  def byte_view(self, model):
    """With boundary tokens: a view that sums over them (models/hat_view.HATBoundaryView)."""
    return hat_view.byte_view(model, self.splitter, self.cfg.data.max_word_bytes, self.name)

  def flops_per_token(self) -> float:
    d = self.cfg.data
    return hat.flops_per_byte(self.cfg.model, self.encoder.vocab_size, d.seq_len, d.max_words,
                              self.word_len) + self.patcher_flops  # entropy patches: counted

  def data_stats(self) -> dict:
    out = super().data_stats()
    for name, f in (('train', self.fields), ('eval', self.eval_fields)):
      if f is None:  # learned chunking: bytes_per_unit is a training metric
        continue
      s = f.stats
      out[f'{name}_dropped_bytes'] = s['dropped_bytes']
      if s['target_bytes']:
        out[f'{name}_bytes_per_word'] = round(s['target_bytes'] / max(s['words'], 1), 3)
    return out

  def describe(self) -> str:
    d = self.cfg.data
    m = self.cfg.model
    variant = f'pooling {m.pooling}'
    if self.boundary_id is not None:
      variant += f' (boundary token {self.boundary_id})'
    if self.patcher_record is not None:
      r = self.patcher_record
      variant += (f' | patcher {r["workdir"]}@{r["step"]} {r["rule"]} threshold '
                  f'{r["threshold"]:.4f}')
      if r.get('calibrated_len'):
        variant += f' (mean unit {r["calibrated_len"]:.2f} bytes)'
    if self.learned:
      variant += (f' | learned chunking (target {m.chunk_target} bytes/unit, '
                  f'{m.chunk_loss} loss x {m.chunk_loss_weight})')
    variant += f' | encoder {m.get("encoder_attention", "causal")}'
    return (f'HAT splitter {d.splitter} | {variant} | {d.seq_len} tokens, {d.max_words} words x '
            f'{self.word_len} tokens per row | data {d.source} | batch '
            f'{self.cfg.train.batch_size} | compute {np.dtype(self.dtype).name}')


def _check_learned_rows(cfg) -> None:
  """Learned chunking: a row of data.seq_len bytes at the target's bytes per unit must fit
  data.max_words units (bytes of further units read a stale context)."""
  d, m = cfg.data, cfg.model
  need = d.seq_len / m.chunk_target
  if d.max_words < need:
    raise ValueError(f'model.chunk_target={m.chunk_target}: a row of data.seq_len={d.seq_len} '
                     f'bytes holds about {need:.0f} units at that target, more than '
                     f'data.max_words={d.max_words} (raise data.max_words to at least '
                     f'{int(np.ceil(need))}, or the target)')


Family = HATFamily
