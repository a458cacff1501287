"""A finished run as an input to another: `load_run(workdir)` is the one way to read a run's
saved config and restore its parameters (a lexinvariant model's standard-LM baseline, an LCM's
sentence decoder, a sentence autoencoder's encoder, a ZeTT hypernetwork for transfer and
dynamic tokenization: `load_predictor`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from train import config_lib, storage, trainer
from train.metrics import log0


@dataclasses.dataclass
class Run:
  workdir: str
  cfg: Any            # the run's config (config.json over its config file's current defaults)
  setup: trainer.Setup
  state: dict         # the restored train state ('params', 'opt_state', 'step', ...)
  step: int

  @property
  def family(self):
    return self.setup.family

  @property
  def params(self):
    return self.state['params']

  def model(self):
    """The restored model (frozen state merged in)."""
    return self.setup.model(self.params)

  @property
  def identity(self) -> str:
    """'<absolute workdir>@<step>': names exactly which weights were read."""
    return f'{storage.canonical(self.workdir)}@{self.step}'


def load_run(workdir: str, step: int | None = None, family: str | tuple[str, ...] = (),
             what: str = '') -> Run:
  """The run in `workdir`, restored at its latest (or `step`) checkpoint onto this process's
  devices. `family`: the family name(s) the caller accepts, else a ValueError naming `what`
  (the config key that pointed here) and the run's actual family."""
  if not storage.isdir(workdir):
    raise FileNotFoundError(f'{what or "run"}: no run directory {workdir}')
  cfg = config_lib.load_saved(workdir)
  wanted = (family,) if isinstance(family, str) else tuple(family)
  if wanted and cfg.family not in wanted:
    raise ValueError(f'{what + ": " if what else ""}{workdir} is a {cfg.family!r} run, not '
                     + ' or '.join(f'{"an" if w[0] in "aeiou" else "a"} {w} run' for w in wanted))
  setup, state, s = trainer.restore(cfg, workdir, step)
  return Run(workdir, cfg, setup, state, s)


def load_predictor(workdir: str, source: str, kind: str = 'decoder',
                   step: int | None = None):
  """`strings -> (input [N, D], output [N, D] or None)` with `.max_pieces`: the token embedder
  (`Family.token_embedder`) of the latest (or `step`'s: `transfer.hypernet_step`) checkpoint of
  a ZeTT run (configs/zett.py) on the base model `source`. `kind`: 'decoder' (family zett,
  byte-level BPE pieces) or 'encoder' (family zett_encoder, WordPiece pieces); a run of the
  other kind is refused before it is restored."""
  family_of = {'decoder': 'zett', 'encoder': 'zett_encoder'}
  saved = config_lib.load_saved(workdir) if storage.isdir(workdir) else None
  if saved is not None and saved.family in family_of.values():
    got = {f: k for k, f in family_of.items()}[saved.family]
    if got != kind:
      art = {'encoder': 'an encoder', 'decoder': 'a decoder'}
      raise ValueError(f'transfer.hypernet_workdir={workdir} holds {art[got]} hypernetwork '
                       f'(family {saved.family!r}, model.source={saved.model.source!r}), which '
                       f'cannot embed tokens for {art[kind]} model (model.source={source!r})')
  run = load_run(workdir, step=step or None, family=family_of[kind],
                 what='transfer.hypernet_workdir')
  if run.cfg.model.source != source:
    raise ValueError(f'the hypernetwork in {workdir} was trained for model.source='
                     f'{run.cfg.model.source!r}, not {source!r}')
  predictor = run.family.token_embedder(run.model())
  if predictor is None:
    raise ValueError(f'transfer.hypernet_workdir={workdir}: family {run.family.name!r} predicts '
                     'no token embeddings')
  log0(f'[transfer] hypernetwork from {workdir} (step {run.step})')
  return predictor
