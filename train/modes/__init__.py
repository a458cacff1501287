"""The second plug-in axis: what `launch.py --mode=NAME` does, one module per mode.

A mode is one module of this package, found by its name: `--mode=eval` imports
`train/modes/eval.py` and instantiates its `Mode` class (a subclass of the base below; modules
starting with `_` are helpers, not modes). Nothing is registered by hand: `--mode`'s choices
and the modes listed by `--help` are this package's modules, and adding a mode is adding a
module (no existing file changes). `launch.py` is the general flags, this dispatcher and the
handling of a user's mistakes; everything a mode does is in its module.

What a mode declares (class attributes, read by the dispatcher):
  `families`  the families (`config.family`) it runs on; None (default): any. The dispatcher
              refuses any other family before anything loads, with one message naming the
              mode, the family and the accepted ones (a ValueError: exit status 1).
  `devices`   whether it runs on this process's accelerators (default True): the dispatcher
              then enables the compilation cache and starts jax.distributed from the
              environment or --coordinator/--num_processes/--process_id first. A mode that
              only writes files or reads finished runs' records says False.
  `reads_run` whether it reads the run in --workdir (eval, sample, evaluator, export; default
              False): the dispatcher then gives it the run's recorded config (config.json)
              with the command line's overrides on top, an override of the model's shape
              refused (train/record.py `later_config`; `record_wait(args)`: seconds to wait
              for the record of a run that is starting).

Hooks (all but `run` optional):
  `add_flags(flags)`         its own command-line flags (`flags.add_argument`, as argparse's),
                             shown in `--help` under the mode's name. Every mode's flags are
                             parsed whatever the mode; a flag that several modes read (--step
                             for eval, sample and export; --nodes for the job modes) is declared
                             by each alike (`_flags.py`, `_jobs.py`) and defined once.
  `accepts(cfg)`             the accepted families for this config (default: `families`); e.g.
                             eval accepts any family but only `pretrained` when config.dynamic
                             is set.
  `refusal(cfg)`             a sentence added to the dispatcher's refusal (default: none).
  `needs_devices(args)`      default: `devices` (a sweep written out as jobs needs none).
  `run(args, cfg, module, overrides) -> int`  the entry point, given the parsed flags, the
                             loaded, overridden and validated config, the config file's module
                             (for e.g. its `get_sweep`) and the `--config.KEY=VALUE` overrides;
                             returns the process's exit status. Errors in the user's input are
                             ValueErrors (or the other exceptions launch.py reports in one
                             line); a bad config value is a `config_lib.ConfigError` (status 2).

Parsing the flags imports every mode module: a mode imports the modules that do its work
inside `run` (the trainer, the data), not at the top of its file.

Layering: this package sits above the rest of train/ (it may import any of it); nothing in
train/ outside it imports it, and of train/ launch.py imports only this dispatcher and the
foundations it needs to load a config and name a user's mistake (tests/test_layering.py).
"""
from __future__ import annotations

import abc
import argparse
import importlib
import pkgutil
import sys

DEFAULT = 'train'  # the mode of a launch.py command without --mode


class Mode(abc.ABC):
  """Base class of every mode (see the module docstring for the contract)."""

  families: tuple[str, ...] | None = None
  devices: bool = True
  reads_run: bool = False

  @property
  def name(self) -> str:
    """The mode's name: its module's name (`--mode=NAME`)."""
    return type(self).__module__.rsplit('.', 1)[-1]

  @property
  def summary(self) -> str:
    """One line for `--help`: the first line of the mode module's docstring."""
    doc = sys.modules[type(self).__module__].__doc__ or ''
    return doc.strip().split('\n', 1)[0]

  def add_flags(self, flags: Flags) -> None:
    """Adds the mode's own flags with `flags.add_argument(...)`. Default: none."""
    del flags

  def accepts(self, cfg) -> tuple[str, ...] | None:
    """The families this mode runs on for `cfg` (None: any). Default: `families`."""
    del cfg
    return self.families

  def refusal(self, cfg) -> str:
    """Why the family of `cfg` is refused, beyond the accepted names. Default: ''."""
    del cfg
    return ''

  def record_wait(self, args: argparse.Namespace) -> float:
    """Seconds a `reads_run` mode waits for the run's record to appear. Default: 0."""
    del args
    return 0.0

  def needs_devices(self, args: argparse.Namespace) -> bool:
    """Whether this run uses the accelerators (and jax.distributed). Default: `devices`."""
    del args
    return self.devices

  @abc.abstractmethod
  def run(self, args: argparse.Namespace, cfg, module, overrides: dict) -> int:
    """Does the mode's work; returns the exit status."""


class Flags:
  """What `Mode.add_flags` gets: `add_argument` as argparse's, into the mode's own section of
  `--help` (created on its first flag). A flag already declared by another mode is defined
  once: the declarations must agree on everything but the help text."""

  def __init__(self, parser: argparse.ArgumentParser, mode: Mode, declared: dict):
    self._parser, self._mode, self._declared = parser, mode, declared
    self._group = None

  def add_argument(self, *names: str, **kwargs) -> None:
    same = {k: v for k, v in kwargs.items() if k != 'help'}
    if names[0] in self._declared:
      owners, was_names, was, action, text = self._declared[names[0]]
      if (was_names, was) != (names, same):
        raise TypeError(f'mode {self._mode.name!r} declares {names[0]} as {names} {same}, '
                        f'mode {owners[0]!r} as {was_names} {was}: two modes that share a '
                        'flag declare it alike')
      owners.append(self._mode.name)
      action.help = ' '.join(filter(None, [text, f'(also {", ".join(owners[1:])})']))
      return
    if self._group is None:
      self._group = self._parser.add_argument_group(f'--mode={self._mode.name}')
    action = self._group.add_argument(*names, **kwargs)
    self._declared[names[0]] = ([self._mode.name], names, same, action, kwargs.get('help'))


def names() -> list[str]:
  """Every mode name (the modules of this package, helpers `_*` excluded)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def get(name: str) -> Mode:
  """The mode `name`, instantiated."""
  known = names()
  if name not in known:
    raise ValueError(f'unknown mode {name!r} (--mode); known: {known}')
  module = importlib.import_module(f'{__name__}.{name}')
  cls = getattr(module, 'Mode', None)
  if not (isinstance(cls, type) and issubclass(cls, Mode)):
    raise TypeError(f'{module.__name__} must define a `Mode` subclass of train.modes.Mode')
  return cls()


def add_flags(parser: argparse.ArgumentParser) -> None:
  """`--mode` (its choices: `names()`) and every mode's own flags; a list of the modes with
  their summaries becomes the parser's epilog."""
  known = [get(n) for n in names()]
  parser.add_argument('--mode', default=DEFAULT, choices=[m.name for m in known],
                      help=f'what to do (default: {DEFAULT}); see the list below')
  declared: dict = {}
  for mode in known:
    mode.add_flags(Flags(parser, mode, declared))
  parser.set_defaults(_mode_flags={a.dest: (owners, names[0], a.default)
                                   for owners, names, _, a, _ in declared.values()})
  width = max(len(m.name) for m in known)
  lines = [f'  {m.name:<{width}}  {m.summary}' for m in known]
  parser.epilog = '\n'.join(filter(None, [parser.epilog, 'modes (train/modes/NAME.py):', *lines]))


def check_flags(args: argparse.Namespace) -> None:
  """A ConfigError when a mode's own flag is given to a mode that does not read it (e.g.
  `--submit` or `--sweep` with --mode=train), which would otherwise be silently ignored."""
  from train import config_lib  # pylint: disable=import-outside-toplevel
  for dest, (owners, flag, default) in getattr(args, '_mode_flags', {}).items():
    if args.mode not in owners and getattr(args, dest, default) != default:
      raise config_lib.ConfigError(
          f'{flag} is read by --mode={" / --mode=".join(owners)}, not by --mode={args.mode}: '
          'it would be ignored; drop it or pick the mode that reads it')


def check_family(mode: Mode, cfg) -> None:
  """A ValueError when `mode` does not run on `cfg.family`, naming the mode, the family and
  the accepted ones."""
  accepted = mode.accepts(cfg)
  family = str(cfg.get('family', ''))
  if accepted is None or family in accepted:
    return
  why = mode.refusal(cfg)
  raise ValueError(f'--mode={mode.name} accepts family {" or ".join(accepted)}, not family '
                   f'{family!r} (config.family)' + (f': {why}' if why else ''))


def signal_status(signal: str | None) -> int:
  """The exit status of a run that a signal stopped (None: finished): 143 SIGTERM, 130
  SIGINT, as a process killed by it."""
  return {None: 0, 'SIGTERM': 143, 'SIGINT': 130}.get(signal, 0)


def run(args: argparse.Namespace, cfg, module, overrides: dict) -> int:
  """The dispatcher: the mode `args.mode`, its family check, the devices if it needs them,
  then its `run`; returns the exit status."""
  mode = get(args.mode)
  if mode.reads_run:  # the run's recorded config, the command line's overrides on top
    from train import record  # pylint: disable=import-outside-toplevel
    cfg = record.later_config(args.workdir, cfg, overrides, mode.name, mode.record_wait(args))
  check_family(mode, cfg)
  from train.modes import _dynamic  # pylint: disable=import-outside-toplevel
  _dynamic.check_mode(mode.name, cfg)
  if mode.needs_devices(args):
    from train import launching  # pylint: disable=import-outside-toplevel
    launching.enable_compile_cache()
    how = launching.init_distributed(args.coordinator, args.num_processes, args.process_id)
    if how != 'single':
      import jax  # pylint: disable=import-outside-toplevel
      print(f'jax.distributed ({how}): process {jax.process_index()} of {jax.process_count()}',
            flush=True)
  return mode.run(args, cfg, module, overrides)
