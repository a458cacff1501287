"""Run logging: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL log of every
step, and a console progress line with rates and ETA. Only process 0 writes."""
from __future__ import annotations

import datetime
import math
import time

import jax

from train import storage

LN2 = math.log(2.0)


def log0(*args) -> None:
  """The one rank-0 logger: prints (flushed) on process 0 only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def derived(sums: dict, extra=None) -> dict:
  """Metric sums from a family's loss -> per-token loss (`nll_sum / n_tokens`) and bits per UTF-8
  byte (`nll_sum / n_bytes / ln 2`), plus what `extra(sums)` (the family's `derived_metrics`)
  adds: keys already there (the sums, the loss and bpb computed here) are kept."""
  out = {k: float(v) for k, v in sums.items()}
  n_tok = out.get('n_tokens', 0.0)
  if 'nll_sum' in out and n_tok > 0:
    out['loss'] = out['nll_sum'] / n_tok
  if 'nll_sum' in out and out.get('n_bytes', 0.0) > 0:
    out['bpb'] = out['nll_sum'] / out['n_bytes'] / LN2
  if extra is not None:
    for k, v in extra(dict(out)).items():
      out.setdefault(k, float(v))
  return out


class Writer:
  """Scalars to TensorBoard (`WORKDIR/tb`) and JSONL files (one record per line, `step` first),
  in a local workdir or a bucket (train/storage.py; TensorBoard event files in a bucket are
  uploaded whole at every flush).

  `resume_step` (the trainer's: the step a run starts or resumes from): records of later steps,
  left by a run that was killed after its last checkpoint, are dropped from the JSONL files and
  purged from TensorBoard, so a resumed run's logs hold every step once."""

  JSONL = ('metrics.jsonl', 'eval_metrics.jsonl')

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.resume_step = resume_step
    self._tb = None
    self._jsonl: dict[str, storage.JsonlLog] = {}
    if self.enabled:
      storage.makedirs(workdir)
      if resume_step is not None:
        for name in self.JSONL:
          self._log(name)

  def _log(self, name: str) -> storage.JsonlLog:
    if name not in self._jsonl:
      self._jsonl[name] = storage.JsonlLog(storage.join(self.workdir, name),
                                           keep_steps=self.resume_step)
    return self._jsonl[name]

  def _tb_writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      _register_bucket_event_writer()
      purge = None if self.resume_step is None else self.resume_step + 1
      self._tb = SummaryWriter(storage.join(self.workdir, 'tb'), flush_secs=10,
                               purge_step=purge)
    return self._tb

  def scalars(self, step: int, values: dict, prefix: str = 'train', jsonl: str | None = None):
    if not self.enabled:
      return
    tb = self._tb_writer()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        tb.add_scalar(f'{prefix}/{k}', v, step)
    if jsonl:
      self._log(jsonl).append({'step': step, **values})

  def text(self, step: int, tag: str, text: str):
    if self.enabled:
      self._tb_writer().add_text(tag, text, step)

  def flush(self):
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
    for f in self._jsonl.values():
      f.flush()

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()
    for f in self._jsonl.values():
      f.close()
    self._jsonl = {}


class _BucketEventFile:
  """tensorboardX record writer for a bucket URL: the event file is kept in memory and the
  object uploaded whole at every flush (objects cannot be appended to)."""

  def __init__(self, path: str):
    self.path, self._buf, self._dirty = path, bytearray(), False

  def write(self, data: bytes):
    self._buf += data
    self._dirty = True

  def flush(self):
    if self._dirty:
      storage.write_bytes(self.path, bytes(self._buf))
      self._dirty = False

  def close(self):
    self.flush()


class _BucketEventFiles:
  def open(self, path):
    return _BucketEventFile(path)

  def directory_check(self, path):
    del path  # bucket prefixes need no creation


def _register_bucket_event_writer():
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory('gs', _BucketEventFiles())


class Progress:
  """Steps/s, tokens/s, bytes/s and ETA over the last logging window."""

  def __init__(self, start_step: int, total_steps: int, flops_per_token: float = 0.0):
    self.total = total_steps
    self.flops_per_token = flops_per_token
    self._t, self._step, self._tok, self._bytes = time.perf_counter(), start_step, 0.0, 0.0

  def add(self, tokens: float, nbytes: float):
    self._tok += tokens
    self._bytes += nbytes

  def rates(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    r = {'steps_per_s': (step - self._step) / dt, 'tokens_per_s': self._tok / dt,
         'bytes_per_s': self._bytes / dt}
    if self.flops_per_token:
      r['tflops_per_s'] = r['tokens_per_s'] * self.flops_per_token / 1e12
    self._t, self._step, self._tok, self._bytes = now, step, 0.0, 0.0
    return r

  def line(self, step: int, m: dict, r: dict) -> str:
    eta = (self.total - step) / r['steps_per_s'] if r['steps_per_s'] > 0 else 0
    parts = [f'step {step}/{self.total}']
    for k, fmt in (('loss', '.4f'), ('bpb', '.4f'), ('grad_norm', '.3f'), ('lr', '.2e')):
      if k in m:
        parts.append(f'{k} {m[k]:{fmt}}')
    parts += [f"{r['steps_per_s']:.2f} steps/s", f"{_si(r['tokens_per_s'])} tok/s"]
    if r['bytes_per_s'] > 0:  # families without byte counts (sentence embeddings) omit it
      parts.append(f"{_si(r['bytes_per_s'])} B/s")
    if 'tflops_per_s' in r:
      parts.append(f"{r['tflops_per_s']:.3g} TFLOP/s")
    parts.append(f'eta {datetime.timedelta(seconds=int(eta))}')
    return ' | '.join(parts)


def _si(x: float) -> str:
  for unit, div in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if x >= div:
      return f'{x / div:.1f}{unit}'
  return f'{x:.0f}'
