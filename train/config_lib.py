"""Config files, presets and command-line overrides.

`--config=configs/x.py:preset` imports the file and calls `get_config(preset)`;
`--config.a.b=value` overrides a leaf, parsed to the leaf's existing type. The config is
locked, so an unknown key fails at once and the error names the closest valid keys.
"""
from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
from typing import Any, Iterable

import ml_collections

from train import storage


class ConfigError(ValueError):
  """A config file, preset or override that cannot be applied."""


def import_config_module(path: str):
  """The config file `path` imported as a module. A file that is not Python (a Markdown file,
  a JSON file), or Python that fails to import, is a ConfigError naming it."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path!r}')
  name = 'notoklm_config_' + os.path.splitext(os.path.basename(path))[0]
  # a loader for any file name: spec_from_file_location finds none for a name not ending .py
  loader = importlib.machinery.SourceFileLoader(name, path)
  spec = importlib.util.spec_from_file_location(name, path, loader=loader)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'--config={path}: not a config file (a Python file defining '
                      f'get_config(preset), e.g. configs/byte_lm.py:tiny); line {e.lineno}: '
                      f'{e.msg}') from None
  except Exception as e:  # pylint: disable=broad-except  # the user's file failed to import
    raise ConfigError(f'--config={path}: importing the config file failed: '
                      f'{type(e).__name__}: {e}') from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'{path!r} defines no get_config(preset)')
  return module


def _takes_preset(fn) -> bool:
  """Whether `get_config` accepts one positional argument (the preset)."""
  try:
    inspect.signature(fn).bind('preset')
  except TypeError:
    return False
  except ValueError:  # no signature (a builtin): let the call decide
    return True
  return True


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
  if not _takes_preset(module.get_config):
    raise ConfigError(f'--config={spec}: its get_config() takes no preset, so it is not a '
                      'config to launch (a launchable config file defines get_config(preset), '
                      'e.g. configs/byte_lm.py:tiny; configs/base.py is what they build on)')
  cfg = module.get_config(preset)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'--config={spec}: get_config({preset!r}) returned '
                      f'{type(cfg).__name__}, not an ml_collections.ConfigDict')
  cfg.config_file = path  # provenance, kept in the saved config
  cfg.preset = preset
  cfg.lock()
  return cfg, module


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# key -> (check, what the key must be). Keys a config does not have are skipped. Families and
# models check their own combinations (e.g. HAT's byte width vs heads) when they are built.
RANGES = {
    'seed': (lambda v: isinstance(v, int), 'an integer'),
    'data.seq_len': (lambda v: v >= 1, '>= 1'),
    'data.max_docs': (lambda v: v >= 0, '>= 0 (0: every document)'),
    'data.max_doc_chars': (lambda v: v >= 1, '>= 1'),
    'data.prefetch': (lambda v: v >= 0, '>= 0'),
    'data.workers': (lambda v: v >= 0, '>= 0 (0: batches built in the trainer process)'),
    'data.max_words': (lambda v: v >= 1, '>= 1'),
    'data.max_word_bytes': (lambda v: v >= 1, '>= 1'),
    'data.max_sentence_bytes': (lambda v: v >= 8, '>= 8'),
    'data.holdout_docs': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'eval.next_word_bytes': (lambda v: v >= 1, '>= 1'),
    'eval.next_word_texts': (lambda v: v >= 0, '>= 0 (0: every window of the validation text)'),
    'train.batch_size': (lambda v: v >= 1, '>= 1'),
    'train.grad_accum': (lambda v: v >= 1, '>= 1'),
    'train.steps': (lambda v: v >= 1, '>= 1'),
    'train.flops_budget': (lambda v: _num(v) and v >= 0, 'finite and >= 0 (0: use train.steps)'),
    'train.log_every': (lambda v: v >= 1, '>= 1'),
    'train.eval_every': (lambda v: v >= 0, '>= 0 (0: only at the end)'),
    'train.eval_count': (lambda v: v >= 0, '>= 0'),
    'train.eval_batches': (lambda v: v >= 0, '>= 0 (0: the whole split)'),
    'train.nan_policy': (lambda v: v in ('stop', 'skip'), "'stop' or 'skip'"),
    'train.compute_dtype': (lambda v: v in ('auto', 'float32', 'bfloat16'),
                            "'auto', 'float32' or 'bfloat16'"),
    'optim.lr': (lambda v: _num(v) and v >= 0, 'finite and >= 0'),
    'optim.warmup_steps': (lambda v: v >= 0, '>= 0'),
    'optim.min_lr_ratio': (lambda v: _num(v) and 0 <= v <= 1, 'in [0, 1]'),
    'optim.schedule': (lambda v: v in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
    'optim.decay_frac': (lambda v: _num(v) and 0 < v <= 1, 'in (0, 1]'),
    'optim.b1': (lambda v: _num(v) and 0 <= v < 1, 'in [0, 1)'),
    'optim.b2': (lambda v: _num(v) and 0 <= v < 1, 'in [0, 1)'),
    'optim.eps': (lambda v: _num(v) and v > 0, 'finite and > 0'),
    'optim.weight_decay': (lambda v: _num(v) and v >= 0, 'finite and >= 0'),
    'optim.clip_norm': (lambda v: _num(v) and v > 0, 'finite and > 0'),
    'eval.noise_frac': (lambda v: _num(v) and 0 <= v <= 1, 'in [0, 1]'),
    'mesh.data': (lambda v: v == -1 or v >= 1, '-1 (every device not in fsdp) or >= 1'),
    'mesh.fsdp': (lambda v: v >= 1, '>= 1'),
    'ckpt.every': (lambda v: v >= 1, '>= 1 (steps between checkpoints)'),
    'ckpt.keep': (lambda v: v >= 1, '>= 1 (at least the newest checkpoint is kept)'),
    'sample.max_new_tokens': (lambda v: v >= 0, '>= 0'),
    'sample.temperature': (lambda v: _num(v) and v >= 0, 'finite and >= 0 (0: greedy)'),
    'sample.top_p': (lambda v: _num(v) and 0 < v <= 1, 'in (0, 1]'),
    'model.d_model': (lambda v: v >= 1, '>= 1'),
    'model.num_layers': (lambda v: v >= 1, '>= 1'),
    'model.num_heads': (lambda v: v >= 1, '>= 1'),
    'model.num_kv_heads': (lambda v: v >= 1, '>= 1'),
    'model.head_dim': (lambda v: v >= 2 and v % 2 == 0, 'even and >= 2 (RoPE rotates pairs)'),
    'model.mlp_dim': (lambda v: v >= 1, '>= 1'),
    'model.window': (lambda v: v >= 0, '>= 0 (0: full causal attention)'),
    'model.ce_chunk': (lambda v: v >= -1, '>= -1'),
    'model.byte_d_model': (lambda v: v >= 1, '>= 1'),
    'model.byte_heads': (lambda v: v >= 1, '>= 1'),
    'model.byte_window': (lambda v: v >= 0, '>= 0'),
    'model.enc_layers': (lambda v: v >= 1, '>= 1'),
    'model.dec_layers': (lambda v: v >= 1, '>= 1'),
}


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value is out of range (see RANGES), or a
  pair of keys that do not fit together."""
  values = dict(_flat_items(cfg))
  for key, (ok, want) in RANGES.items():
    if key not in values or values[key] is None:
      continue
    v = values[key]
    try:
      good = bool(ok(v))
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f'{key}={v!r}: must be {want}')
  pairs = []
  if values.get('train.batch_size', 1) % values.get('train.grad_accum', 1):
    pairs.append(f'train.batch_size={values["train.batch_size"]} is not divisible by '
                 f'train.grad_accum={values["train.grad_accum"]}')
  if 'model.num_heads' in values and values['model.num_heads'] % values.get('model.num_kv_heads',
                                                                             1):
    pairs.append(f'model.num_heads={values["model.num_heads"]} is not a multiple of '
                 f'model.num_kv_heads={values["model.num_kv_heads"]} (grouped-query attention)')
  if ('model.byte_d_model' in values
      and values['model.byte_d_model'] % values.get('model.byte_heads', 1)):
    pairs.append(f'model.byte_d_model={values["model.byte_d_model"]} is not divisible by '
                 f'model.byte_heads={values["model.byte_heads"]}')
  if values.get('data.encoder') == 'bpe' and values.get('data.vocab_size', 0) <= 259:
    pairs.append(f'data.encoder=bpe needs data.vocab_size > 259 (256 bytes + 3 specials), got '
                 f'{values.get("data.vocab_size")}')
  if pairs:
    raise ConfigError(pairs[0])


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
  if value is None and current is not None and isinstance(raw, str):
    raise ConfigError(f'--config.{key}={raw!r}: expected {type(current).__name__}, not None '
                      f'(the default is {current!r})')
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
  """Writes `workdir/config.json` atomically (a local path or a bucket URL)."""
  path = storage.join(workdir, 'config.json')
  storage.write_text(path, to_json(cfg))
  return path


def from_json(path: str) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(json.loads(storage.read_text(path)))
  cfg.lock()
  return cfg


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`, laid over the current defaults of its
  config file and preset: a run saved before a key was added still restores (saved values
  win; saved keys that no longer exist are dropped; a missing key in LEGACY_DEFAULTS takes the
  value such runs were built with)."""
  path = storage.join(workdir, 'config.json')
  if not storage.exists(path):
    raise FileNotFoundError(f'no config.json in {workdir}')
  saved = from_json(path)
  saved = _upgrade_saved(saved)
  try:
    cfg, _ = load(f"{saved.get('config_file', '')}:{saved.get('preset', '')}")
  except (ConfigError, OSError):
    return saved
  known = set(flat_keys(cfg))
  saved_items = dict(_flat_items(saved))
  override(cfg, {k: v for k, v in saved_items.items() if k in known})
  override(cfg, {k: v for k, v in LEGACY_DEFAULTS.items() if k in known and k not in saved_items})
  return cfg


# Keys added after runs were saved whose current preset default would build a different model
# than those runs had: a saved config without the key gets this value (the runs' behaviour).
LEGACY_DEFAULTS = {
    'model.scan_layers': False,   # runs before layer scan have per-layer (unrolled) parameters
}


def _upgrade_saved(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved config in today's layout where the layout changed: a ZeTT run of an encoder base
  saved as family 'zett' with `zett.kind='encoder'` is a 'zett_encoder' run (the two kinds
  became two families)."""
  if saved.get('family') == 'zett' and saved.get('zett', {}).get('kind') == 'encoder':
    with saved.unlocked():
      saved.family = 'zett_encoder'
  return saved


def _flat_items(cfg, prefix: str = ''):
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_items(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v
