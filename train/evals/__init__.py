"""Evaluations, in one package: the evaluators listed in `config.evals` (one module per type:
validation.py, robustness.py, next_word.py, family_suite.py), the lexinvariant probes
(lexinv.py), the LCM and sentence-decoder metrics (lcm.py) and the table / PNG writers
(report.py). Families call the helpers from their `eval_suite` hook; these modules get what
they score (a trainer `Setup`, parameters, loaded runs) as arguments and import no family,
trainer or run loader (tests/test_layering.py).

Evaluators. `config.evals` is a ConfigDict of name -> {'type', 'every', options...}. The type is
a module of this package with an `Evaluator` class (a subclass of the base below): type
'robustness' is train/evals/robustness.py; nothing is registered by hand, so adding an
evaluator is one module. `every` says when it runs:

  * every > 0: in the training loop every `every` steps and at the last step;
  * every = -1: every `train.eval_every` steps and at the last step (eval_every 0: at the last
    step only; the validation default);
  * every = 0: not in the training loop.

`--mode=eval` runs every listed evaluator on one checkpoint (`eval_step{N}.json`);
`--mode=evaluator` runs those that run in the training loop (every != 0) on each new
checkpoint. The same objects run in all three, and their scalars (`scalars`) go to the same
keys: `eval/<metric>` for a flat evaluator (validation: `eval/bpb`, as always), else
`eval/<name>/<metric>` in TensorBoard, and `<metric>` / `<name>/<metric>` in the JSONL records
(eval_metrics.jsonl in the loop, evaluator.jsonl for the evaluator job).
"""
from __future__ import annotations

import abc
import importlib
import numbers
import pkgutil

import numpy as np

from train import config_lib

# what runs without a `config.evals` section (a config saved before evaluators were listed,
# read without its config file): today's behaviour, as configs/base.py declares it
DEFAULTS = {
    'validation': {'type': 'validation', 'every': -1},
    'robustness': {'type': 'robustness', 'every': 0},
    'next_word': {'type': 'next_word', 'every': 0},
    'family_suite': {'type': 'family_suite', 'every': 0},
}


class Evaluator(abc.ABC):
  """Base class of every evaluator type: one instance per `config.evals` entry, built once per
  process (by the trainer's `Setup`) and kept, so it may hold state across calls (batches, a
  compiled step, a loaded task).

  Subclasses override `run`, and may set:
    * `families`: the families (`config.family` names) it applies to; None (default): every
      family. A config listing it for another family is refused when the run starts.
    * `flat`: True merges its results into the top level of the evaluation record (validation,
      the family suite: keys as they always were); False (default) nests them under the
      entry's name.
    * `order`: evaluators of one step run by (order, name); lower first. Validation is 0.
  Its options: the entry's keys besides `type` and `every` (`self.options`), and the config.
  """

  families: tuple[str, ...] | None = None
  flat = False
  order = 10

  def __init__(self, name: str, cfg, options: dict):
    self.name = name
    self.kind = options.get('type', '')
    self.cfg = cfg
    self.every = int(options.get('every', 0))
    self.options = {k: v for k, v in options.items() if k not in ('type', 'every')}

  def prepare(self, setup) -> str:
    """Called once before the first `run` of a process (the training run starts, `--mode=eval`,
    the evaluator job), so errors in what it needs show then; returns a note for the run log
    ('' for none). Default: nothing."""
    del setup
    return ''

  @abc.abstractmethod
  def run(self, setup, params, workdir: str, step: int, earlier: dict) -> dict | None:
    """Evaluates `params` (the trained state, sharded as the trainer's `Setup` says) at
    `step`: a dict of results (scalars, nested dicts of scalars; other values go into
    `eval_step{N}.json` only) and any files written into `workdir` (named with the step).
    `earlier`: the results of the evaluators that ran before it for this step (e.g. the
    validation figures to compare with). None: nothing to report (skipped)."""


def lookup(kind: str) -> type[Evaluator]:
  """The `Evaluator` class of the evaluator type `kind` (a module of this package)."""
  name = f'{__name__}.{kind}'
  try:
    module = importlib.import_module(name) if kind and kind.isidentifier() else None
  except ModuleNotFoundError as e:
    if e.name != name:
      raise
    module = None
  cls = getattr(module, 'Evaluator', None)
  if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
    raise config_lib.ConfigError(f'unknown evaluator type {kind!r}; types: {", ".join(types())} '
                                 '(modules of train/evals/ with an Evaluator class)')
  return cls


def types() -> list[str]:
  """The evaluator types there are."""
  out = []
  for m in pkgutil.iter_modules(__path__):
    if not m.name.startswith('_'):
      cls = getattr(importlib.import_module(f'{__name__}.{m.name}'), 'Evaluator', None)
      if isinstance(cls, type) and issubclass(cls, Evaluator):
        out.append(m.name)
  return sorted(out)


def _entries(cfg) -> dict:
  section = cfg.get('evals') if hasattr(cfg, 'get') else None
  if section is None:
    return {k: dict(v) for k, v in DEFAULTS.items()}
  return {name: (e.to_dict() if hasattr(e, 'to_dict') else e) for name, e in section.items()}


class Evaluators:
  """The evaluators `config.evals` lists, for one family: built (and checked) once, run by the
  training loop, `--mode=eval` and `--mode=evaluator`."""

  def __init__(self, cfg, family_name: str):
    built = []
    for name, entry in _entries(cfg).items():
      where = f'evals.{name}'
      if not isinstance(entry, dict) or not isinstance(entry.get('type'), str):
        raise config_lib.ConfigError(f'{where}: expected {{"type": ..., "every": ...}}, got '
                                     f'{entry!r}')
      try:
        cls = lookup(entry['type'])
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f'{where}: {e}') from None
      every = entry.get('every', 0)
      if not isinstance(every, int) or isinstance(every, bool) or every < -1:
        raise config_lib.ConfigError(f'{where}.every={every!r}: must be an integer >= -1 (>0: '
                                     'every N steps in the training loop; -1: every '
                                     'train.eval_every steps; 0: only --mode=eval)')
      if cls.families is not None and family_name not in cls.families:
        raise config_lib.ConfigError(
            f'{where}: evaluator type {entry["type"]!r} does not apply to family '
            f'{family_name!r} (it applies to {", ".join(cls.families)}); remove the entry')
      built.append(cls(name, cfg, entry))
    self.all = sorted(built, key=lambda e: (e.order, e.name))
    self._prepared = set()

  def __iter__(self):
    return iter(self.all)

  def in_loop(self) -> list[Evaluator]:
    """Those that run during training (every != 0): also what `--mode=evaluator` runs."""
    return [e for e in self.all if e.every != 0]

  def due(self, step: int, eval_every: int, last: bool = False) -> list[Evaluator]:
    """Those the training loop runs at `step` (`last`: the final step)."""
    out = []
    for e in self.in_loop():
      every = eval_every if e.every == -1 else e.every
      if last or (every > 0 and step % every == 0):
        out.append(e)
    return out

  def prepare(self, setup, which: list[Evaluator] | None = None) -> list[str]:
    """Prepares `which` (default all) once each; -> their notes for the run log."""
    notes = []
    for e in self.all if which is None else which:
      if id(e) not in self._prepared:
        note = e.prepare(setup)
        self._prepared.add(id(e))
        if note:
          notes.append(note)
    return notes

  def run(self, which: list[Evaluator], setup, params, workdir: str, step: int) -> dict:
    """Runs `which` at `step`: their results, flat ones at the top level, the others under
    their names."""
    self.prepare(setup, which)
    out: dict = {}
    for e in sorted(which, key=lambda e: (e.order, e.name)):
      r = e.run(setup, params, workdir, step, out)
      if r is None:
        continue
      if e.flat:
        out.update(r)
      else:
        out[e.name] = r
    return out


def ran(which: list[Evaluator], kind: str) -> bool:
  """Whether an evaluator of type `kind` is among `which`."""
  return any(e.kind == kind for e in which)


def scalars(results: dict, prefix: str = '') -> dict:
  """The numbers in `results` as one flat dict, nested keys joined by '/' (e.g.
  'robustness/caps/bpb'): what goes to TensorBoard and the JSONL records. 'step' is left out."""
  out = {}
  for k, v in results.items():
    key = f'{prefix}{k}'
    if key == 'step':
      continue
    if isinstance(v, dict):
      out.update(scalars(v, key + '/'))
    elif isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
      out[key] = v if isinstance(v, (int, float)) else float(v)
  return out
