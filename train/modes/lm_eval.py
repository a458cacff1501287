"""Standard benchmarks with lm-evaluation-harness on a finished run (train/evals/lm_eval.py).

The tasks, few-shot count, limit, batch size and scoring are `config.lm_eval`; the model is the
run in --workdir at its latest checkpoint (or --step), or `lm_eval.model` (another run's
workdir, `pretrained:smollm2`, `pretrained:PATH`). Writes WORKDIR/lm_eval/step_N.json (lm-eval's
results, the config, package versions and seed) and step_N.md (the table).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from train import modes
from train.modes import _flags


@dataclasses.dataclass
class Loaded:
  family: Any
  model: Any
  step: int
  identity: str
  window: int     # the token window (the run's data.seq_len)
  mesh: Any


def load(cfg, workdir: str, step: int | None) -> Loaded:
  """What `--mode=lm_eval` evaluates: the one place it reads a run (see the module doc)."""
  # pylint: disable=import-outside-toplevel
  from train import config_lib, cross_family, launching, runs, storage, trainer
  spec = str(cfg.lm_eval.model or '')
  src = cross_family._pretrained_source(spec) if spec else None  # pylint: disable=protected-access
  if src is not None:
    pcfg, _ = config_lib.load(storage.join(launching.REPO, 'configs', 'pretrained.py'))
    config_lib.override(pcfg, {'model.source': src})
    setup = trainer.Setup(pcfg)
    model = setup.model(setup.family.initial_params())
    return Loaded(setup.family, model, 0, f'pretrained:{src}', int(pcfg.data.seq_len),
                  setup.mesh)
  where = spec or workdir
  if spec or storage.exists(storage.join(workdir, 'config.json')):
    run = runs.load_run(where, step=step, what='lm_eval.model' if spec else '')
    return Loaded(run.family, run.model(), run.step, run.identity, int(run.cfg.data.seq_len),
                  run.setup.mesh)
  setup, state, s = trainer.restore(cfg, workdir, step)  # e.g. a pretrained config's own weights
  return Loaded(setup.family, setup.model(state['params']), s,
                f'{storage.canonical(workdir)}@{s}', int(cfg.data.seq_len), setup.mesh)


class Mode(modes.Mode):

  reads_run = True  # a run in --workdir is scored on its recorded config

  def add_flags(self, flags) -> None:
    _flags.step(flags)

  def run(self, args, cfg, module, overrides) -> int:
    # pylint: disable=import-outside-toplevel
    import importlib

    import jax

    from train import families, storage
    from train.evals import lm_eval as le
    from train.metrics import log0
    lm_cfg = cfg.lm_eval
    le.check_config(lm_cfg)
    spec = str(lm_cfg.model or '')
    if spec and not spec.startswith('pretrained:') and not storage.isdir(spec):
      raise FileNotFoundError(f'lm_eval.model: no run directory {spec}')
    tm = le.task_manager(lm_cfg)
    specs, tasks = le.load_tasks(lm_cfg, tm)
    if not spec:  # what the family can do, before anything is restored
      if str(cfg.family) in families.names():
        cls = importlib.import_module(f'train.families.{cfg.family}').Family
        le.check_family(cls, tasks, f'the run in {args.workdir} (family {cfg.family!r})')
      if not storage.exists(args.workdir):
        raise FileNotFoundError(f'--mode=lm_eval: no run directory {args.workdir} (train it '
                                'first, or name a model: --config.lm_eval.model=RUN_WORKDIR or '
                                'pretrained:smollm2)')
    got = load(cfg, args.workdir, args.step)
    from train import cross_family  # pylint: disable=import-outside-toplevel
    run_dir = (spec if spec and not spec.startswith('pretrained:') else
               args.workdir if storage.exists(storage.join(args.workdir, 'config.json')) else '')
    status = cross_family.unfinished(run_dir) if run_dir else ''
    if status:  # scored all the same, and the result says so
      log0(f'WARNING --mode=lm_eval: {run_dir} is {status}: the scores are of step {got.step}')
    le.check_family(got.family, tasks, f'{got.identity} (family {got.family.name!r})')
    lm = le.make_lm(got.family, got.model, lm_cfg, window=got.window, mesh=got.mesh)
    log0(f'[lm_eval] {got.identity}: {", ".join(tasks)}; {lm.describe}')
    res = le.evaluate(lm, lm_cfg, specs, tm)
    if jax.process_index() == 0:
      md = le.write(res, lm_cfg, storage.join(args.workdir, 'lm_eval'), got.step,
                    {'model': got.identity, 'family': got.family.name,
                     'status': status or 'finished'})
      log0(md.rstrip('\n'))
    return 0
