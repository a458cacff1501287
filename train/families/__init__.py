"""The one contract between a model family and the trainer: the `Family` base class.

A family is one module of this package, found by its name: `config.family = 'hat'` imports
`train/families/hat.py` and instantiates its `Family` class (a subclass of the base below;
modules starting with `_` are helpers, not families). Nothing is registered by hand. The
trainer knows nothing about bytes, words, hypernetworks or sentences: it calls the hooks below
and nothing else (no attribute probing).

Required hooks (abstract): `build_model`, `loss`, `train_iterator`, `eval_batches`,
`flops_per_token`. Optional hooks have a documented default that suits a family training
every parameter of a freshly initialized model. See docs/adding_a_family.md. Code outside the
families reads only the hooks, `name`, `cfg`, `dtype` and the `encoder` attribute (a family's
other attributes are its own: only its own tests and benchmarks look at them) and assigns
nothing: a benchmark's synthetic-data stand-in is a subclass that overrides a hook (e.g.
`make_encoder`, `train_documents`).

Layering: this package's `__init__` (the contract) sits beside the trainer; the family
modules sit above it and may import `train.trainer`, `train.runs` and `train.evals`, never
`train.sweep`, `train.evaluator` or `train.transfer` (tests/test_layering.py).
"""
from __future__ import annotations

import abc
import hashlib
import importlib
import os
import pkgutil
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from train import storage


class BatchIterator(Protocol):
  """What `Family.train_iterator` returns: an endless iterator of host-local numpy batches
  whose position can be checkpointed (every host's state is saved with the train state)."""

  def __iter__(self) -> Iterator[dict]: ...

  def __next__(self) -> dict: ...

  def get_state(self) -> dict:
    """The position after the last batch returned (small and JSON-able)."""

  def set_state(self, state: dict) -> None:
    """Continue so that the next batch is the one that followed `state`; a ValueError if
    `state` belongs to other data."""

  def close(self) -> None:
    """Stops any prefetch thread."""


ARTIFACTS = 'artifacts'  # WORKDIR/artifacts/: files a run needs to be evaluated later


class Family(abc.ABC):
  """Base class of every family. `__init__(cfg, workdir)` gets the resolved, locked config and
  the run's workdir (None outside a run); a subclass calls `super().__init__(cfg, workdir)`
  first, then builds what its hooks need (encoder, data source, pretrained weights), reading
  what the run recorded (`recorded`) before deriving anything from data. Errors in the user's
  config or data are `ValueError`s naming the key or the input."""

  encoder = None
  """The text encoder (data/encoders.py: `vocab_size`, `encode` / `decode`, the special ids,
  and for BPE its `tokenizer`) whose token ids the model reads, set in `__init__` by a family
  with one fixed vocabulary (lm, lexinv, pretrained, hat); None for the others. Read by what
  works on those tokens: dynamic tokenization, a lexinvariant run's baseline check, the
  benchmarks' vocabulary sizes."""

  host_workers = False
  """Whether `train_iterator` honours `data.workers` (its batches from
  `pipeline.make_train_iterator`: lm, lexinv, pretrained, hat). A family that builds its
  batches its own way refuses `data.workers` > 0 by name rather than ignore it."""

  def __init__(self, cfg, workdir: str | None = None):
    workers = int(cfg.data.workers)
    if workers and not self.host_workers:
      raise ValueError(f'data.workers={workers}: the {cfg.family} family builds its training '
                       'batches its own way, without data workers; leave data.workers=0')
    self.cfg = cfg
    self.workdir = workdir
    self.dtype = compute_dtype(cfg)
    self._stats: dict[str, Any] = {}
    self._sources: list = []  # data sources whose counts grow while they are read
    self._manifest = _read_manifest(workdir)

  @property
  def name(self) -> str:
    """The family's name: its module's name (`config.family`)."""
    return type(self).__module__.rsplit('.', 1)[-1]

  # -- required ------------------------------------------------------------------------------
  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The model, built from the config. It must hold only `nnx.Param` state (so it splits
    into a graph and a pure parameter dict), annotated with logical axis names for sharding.
    Called under `nnx.eval_shape` and `jax.jit`: no host side effects."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(scalar loss to minimize, metrics): a pure function of a batch of global arrays. The
    metrics are scalar SUMS, additive over micro-batches and hosts; the keys `nll_sum`,
    `n_tokens` and `n_bytes` give the reported loss and bits per UTF-8 byte."""

  @abc.abstractmethod
  def train_iterator(self, process_index: int, process_count: int) -> BatchIterator:
    """This host's endless, checkpointable training batches (see `BatchIterator`), each
    `train.batch_size // process_count` rows."""

  @abc.abstractmethod
  def eval_batches(self, process_index: int, process_count: int, max_batches: int = 0,
                   perturbation: str | None = None) -> list[dict]:
    """This host's validation batches: `max_batches` global batches (0: the whole split), the
    same number on every host. `perturbation` (a kind from data/perturb.py, for the robustness
    suite): the text perturbed before encoding; a family without text raises ValueError."""

  @abc.abstractmethod
  def flops_per_token(self) -> float:
    """Training FLOPs (forward + backward) per position of a row, padding included: the
    trainer's MFU and `train.flops_budget` accounting multiply it by batch x seq_len."""

  # -- optional, with defaults -----------------------------------------------------------------
  def derived_metrics(self, sums: dict) -> dict:
    """Metrics computed from the summed metrics of `loss` (over micro-batches, hosts and eval
    batches, as floats), beside the trainer's own loss and bits per byte from `nll_sum`,
    `n_tokens` and `n_bytes` (train/metrics.derived): e.g. a mean over texts. A family without
    `nll_sum` gives its reported `'loss'` here. Keys the sums or the trainer already have are
    not replaced. Default: none."""
    del sums
    return {}

  def headline_metrics(self) -> dict[str, str]:
    """{key of `derived_metrics`: label}: beside loss and bits per byte, written with every
    train step's scalars (TensorBoard `train/<key>`, metrics.jsonl) and shown, by label, on the
    evaluation log lines. Default: none."""
    return {}

  def trainable(self):
    """The nnx filter of the trained state (default: every `nnx.Param`). Anything else the
    model holds is frozen: it comes from `frozen_params()`, is an argument of the jitted steps
    (never a baked-in constant) and is not checkpointed."""
    return nnx.Param

  def initial_params(self) -> dict | None:
    """The trained state's initial values as a pure dict (e.g. pretrained weights read from a
    file), or None (default) for `build_model`'s random initialization under jit."""
    return None

  def frozen_params(self) -> dict | None:
    """The frozen state (see `trainable`) as a pure dict; needed only when the model holds
    state outside `trainable()`. Default: None (nothing is frozen)."""
    return None

  def has_own_weights(self) -> bool:
    """True when `initial_params()` are meaningful weights (a pretrained model), so
    `--mode=eval` / `sample` on a workdir without checkpoints use them. Default: False."""
    return False

  def sample(self, model: nnx.Module, cfg_sample) -> list[str]:
    """Text from `model` for `config.sample` (prompt, temperature, top_p, max_new_tokens,
    seed): shown at the end of training and by `--mode=sample`. Default: no samples."""
    del model, cfg_sample
    return []

  def check_sample(self, cfg_sample) -> None:
    """Raises ValueError if `sample(...)` would fail on this `config.sample` (an empty prompt
    where the family needs one): checked before training starts, so a run never fails
    after its last step. Default: no check."""
    del cfg_sample

  @classmethod
  def check_sample_config(cls, cfg) -> None:
    """What `check_sample` checks that the config alone decides, before the family is built
    (building may take long: an LCM embeds its training sentences first); the trainer and
    `--mode=sample` call it first. Default: no check."""
    del cfg

  def eval_suite(self, setup, params, workdir: str, step: int) -> dict:
    """The family's own evaluations (the `family_suite` evaluator of `config.evals`: by default
    in `--mode=eval`, and in the training loop / `--mode=evaluator` when its `every` says so;
    probes, generation metrics, plots into `workdir`), merged into `eval_step{N}.json`; an optional `'row'` dict of headline
    metrics goes into sweep summaries. `setup` is the trainer's `Setup` (mesh, model(params)).
    Default: none."""
    del setup, params, workdir, step
    return {}

  def byte_view(self, model: nnx.Module):
    """The model as a `models.byte_level.ByteLM`: exact next-byte probabilities (256 bytes and
    end of text), byte-level scoring and sampling, whatever its own units (bytes, BPE tokens,
    words). Default: a ValueError (a family without text, e.g. sentence embeddings)."""
    del model
    raise ValueError(f'family {self.name!r} has no byte-level view (it does not model text '
                     'bytes)')

  def token_embedder(self, model: nnx.Module):
    """For a model that predicts embeddings of arbitrary token strings (a ZeTT hypernetwork
    over its base model's pieces): `strings -> (input [N, D], output [N, D] or None)` as numpy,
    with an attribute `max_pieces`; tokenizer transfer and dynamic tokenization take it through
    `transfer.hypernet_workdir` (train/runs.load_predictor). Default: None (no such model)."""
    del model
    return None

  def export_hf(self, model: nnx.Module, out_dir: str) -> None:
    """Writes `model` as an HF-format directory (`--mode=export`). Default: not supported."""
    del model
    raise ValueError(f'--mode=export: family {self.name!r} has no HF-format export (it exists '
                     f'for token LMs with a tokenizers-based encoder); not written: {out_dir}')

  def artifacts(self) -> dict[str, bytes]:
    """Files derived from data that evaluating this run later needs (a trained tokenizer, a
    sampled evaluation tokenizer), by file name: written into `WORKDIR/artifacts/` when
    training starts, pinned by SHA-256 in its manifest.json, and read back with `recorded`
    by eval, sample and resume, so they never silently come from data that has changed since.
    (State that lives in the parameters, like a vocabulary mask or a normalizer, is already
    in the checkpoint.) Default: none."""
    return {}

  def recorded(self, name: str) -> bytes | None:
    """The run's recorded artifact `name`: None outside a run or for a run that recorded no
    artifacts yet; a ValueError when the run's manifest lists it but the file is missing or
    differs from its recorded hash."""
    if self._manifest is None:
      return None
    entry = self._manifest['files'].get(name)
    if entry is None:
      raise ValueError(f'{self.workdir}: the run recorded no artifact {name!r} (its '
                       f'{ARTIFACTS}/manifest.json lists {sorted(self._manifest["files"])}); '
                       'was it trained with another data.encoder?')
    p = storage.join(self.workdir, ARTIFACTS, name)
    if not storage.exists(p):
      raise ValueError(f'{p} is missing: the run needs it to be evaluated or resumed (its '
                       'manifest records it); restore the file or retrain')
    data = storage.read_bytes(p)
    if hashlib.sha256(data).hexdigest() != entry['sha256']:
      raise ValueError(f'{p} differs from what the run recorded (sha256 '
                       f'{entry["sha256"][:12]}...): it was changed after training; restore '
                       'the original or retrain')
    return data

  def describe(self) -> str:
    """One line for the run log. Default: the family's name."""
    return self.name

  def data_stats(self) -> dict:
    """Counted data skips / cuts and other data facts for the run log and train_summary.json
    (keys with 'skipped', 'cut' or 'without' are printed at the start of a run). The counts of
    a streamed source (`shards:`) are read now, so the summary has those of the whole run (this
    process's share)."""
    out = dict(self._stats)
    for source in self._sources:
      out.update(dict(getattr(source, 'stats', None) or {}))
    return out

  def track_source(self, source) -> None:
    """Reports `source.stats` in `data_stats` (read at each call, not copied now)."""
    self._sources.append(source)

  def data_reads(self) -> dict[str, dict[str, dict[str, int]]]:
    """{source name: {url: {'opens', 'bytes'}}}: the objects this process has read from its
    streamed training sources (`shards:`) so far; empty for prepared sources."""
    return {s.name: s.fetched() for s in self._sources if callable(getattr(s, 'fetched', None))}


def _read_manifest(workdir) -> dict | None:
  if not workdir:
    return None
  p = storage.join(workdir, ARTIFACTS, 'manifest.json')
  if not storage.exists(p):
    return None
  return storage.read_json(p)


def write_artifacts(family: Family, workdir: str) -> list[str]:
  """Records `family.artifacts()` in `workdir/artifacts/` with a manifest of their SHA-256
  (process 0); returns the file names. Nothing is written when there is nothing to record."""
  files = family.artifacts()
  if not files or jax.process_index() != 0:
    return sorted(files)
  d = storage.join(workdir, ARTIFACTS)
  manifest = {'family': family.name, 'files': {}}
  for name, data in files.items():
    storage.write_bytes(storage.join(d, name), data)
    manifest['files'][name] = {'sha256': hashlib.sha256(data).hexdigest(), 'bytes': len(data)}
  storage.write_json(storage.join(d, 'manifest.json'), manifest)  # last: marks the set whole
  family._manifest = manifest  # pylint: disable=protected-access
  return sorted(files)


def names() -> list[str]:
  """Every family name (the modules of this package)."""
  here = os.path.dirname(__file__)
  return sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith('_'))


def get(cfg, workdir: str | None = None) -> Family:
  """The family `cfg.family`, constructed from `cfg` for the run in `workdir` (None: no run)."""
  return family_class(cfg)(cfg, workdir)


def family_class(cfg) -> type[Family]:
  """The class of the family `cfg.family` (not constructed)."""
  name = str(cfg.family)
  known = names()
  if name not in known:
    raise ValueError(f'unknown family {name!r} (config.family); known: {known}')
  module = importlib.import_module(f'{__name__}.{name}')
  cls = getattr(module, 'Family', None)
  if not (isinstance(cls, type) and issubclass(cls, Family)):
    raise TypeError(f'{module.__name__} must define a `Family` subclass of '
                    f'train.families.Family')
  return cls


def compute_dtype(cfg):
  """`train.compute_dtype`: bf16 on GPU/TPU and fp32 on CPU for 'auto'."""
  name = cfg.train.compute_dtype
  if name == 'auto':
    return jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f'train.compute_dtype={name!r}: expected auto, float32 or bfloat16')
  return jnp.dtype(name)
