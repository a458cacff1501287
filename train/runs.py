"""A finished run as an input to another: `load_run(workdir)` is the one way to read a run's
saved config and restore its parameters (a lexinvariant model's standard-LM baseline, an LCM's
sentence decoder, a sentence autoencoder's encoder, a ZeTT hypernetwork for transfer)."""
from __future__ import annotations

import dataclasses
from typing import Any

from train import config_lib, storage, trainer


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
