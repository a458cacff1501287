"""Config files, presets and command-line overrides.

`--config=configs/x.py:preset` imports the file and calls `get_config(preset)`;
`--config.a.b=value` overrides a leaf, parsed to the leaf's existing type. The config is
locked, so an unknown key fails at once and the error names the closest valid keys.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config file, preset or override that cannot be applied."""


def import_config_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path!r}')
  name = 'notoklm_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path!r} defines no get_config(preset)')
  return module


def load(spec: str) -> tuple[ml_collections.ConfigDict, Any]:
  """`path.py[:preset]` -> (locked config, module)."""
  path, _, preset = spec.partition(':')
  module = import_config_module(path)
  presets = getattr(module, 'PRESETS', None)
  preset = preset or (presets[0] if presets else '')
  if presets is not None and preset not in presets:
    close = difflib.get_close_matches(preset, presets, n=3)
    raise ConfigError(f'unknown preset {preset!r} in {path!r}; presets: {list(presets)}'
                      + (f' (did you mean {close[0]!r}?)' if close else ''))
  cfg = module.get_config(preset)
  cfg.config_file = path  # provenance, kept in the saved config
  cfg.preset = preset
  cfg.lock()
  return cfg, module


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  out = []
  for k, v in cfg.items():
    key = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_keys(v, key + '.')
    else:
      out.append(key)
  return out


def _parse_value(key: str, raw: Any, current: Any) -> Any:
  """Parses `raw` (a string from the command line, or a Python value) to `current`'s type."""
  if not isinstance(raw, str):
    value = raw
  elif isinstance(current, str):
    return raw
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      if current is None:
        return raw
      raise ConfigError(f'--config.{key}={raw!r}: expected {type(current).__name__}, '
                        f'got a value that does not parse') from None
  if current is None or value is None:
    return value
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    raise ConfigError(f'--config.{key}={raw!r}: expected bool (True/False)')
  if isinstance(current, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f'--config.{key}={raw!r}: expected int, got {type(value).__name__}')
  if isinstance(current, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise ConfigError(f'--config.{key}={raw!r}: expected float, got {type(value).__name__}')
  if isinstance(current, (tuple, list)):
    if isinstance(value, (tuple, list)):
      return type(current)(value)
    raise ConfigError(f'--config.{key}={raw!r}: expected a {type(current).__name__}')
  if isinstance(current, str):
    if isinstance(value, str):
      return value
    raise ConfigError(f'--config.{key}={raw!r}: expected str, got {type(value).__name__}')
  return value


def override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any] | Iterable) -> None:
  """Applies {'a.b': value} overrides in place; unknown keys name the closest valid ones."""
  items = overrides.items() if isinstance(overrides, dict) else overrides
  valid = flat_keys(cfg)
  for key, raw in items:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      if not close:  # try the last component alone
        leaf = key.rsplit('.', 1)[-1]
        close = [k for k in valid if k.rsplit('.', 1)[-1] == leaf][:3]
      hint = f'; did you mean {", ".join(repr(c) for c in close)}?' if close else ''
      raise ConfigError(f'unknown config key {key!r}{hint}')
    *parents, leaf = key.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    value = _parse_value(key, raw, node[leaf])
    with node.unlocked():
      node[leaf] = value


def parse_argv_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
  """Splits `--config.a.b=v` / `--config.a.b v` out of argv; returns (overrides, rest)."""
  overrides, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' in body:
        key, value = body.split('=', 1)
      elif i + 1 < len(argv):
        key, value = body, argv[i + 1]
        i += 1
      else:
        raise ConfigError(f'{arg}: missing value')
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def save(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(to_json(cfg))
  os.replace(tmp, path)
  return path


def from_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.lock()
  return cfg


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`, laid over the current defaults of its
  config file and preset: a run saved before a key was added still restores (saved values
  win; saved keys that no longer exist are dropped)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no config.json in {workdir}')
  saved = from_json(path)
  try:
    cfg, _ = load(f"{saved.get('config_file', '')}:{saved.get('preset', '')}")
  except (ConfigError, OSError):
    return saved
  known = set(flat_keys(cfg))
  override(cfg, {k: v for k, v in _flat_items(saved) if k in known})
  return cfg


def _flat_items(cfg, prefix: str = ''):
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_items(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v
