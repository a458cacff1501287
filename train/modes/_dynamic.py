"""What eval and sample share for `config.dynamic` (dynamic tokenization, train/dynamic.py):
it runs on a pretrained language model only."""
from __future__ import annotations

FAMILIES = ('pretrained',)
MODES = ('eval', 'sample', 'transfer')  # the modes that read config.dynamic


def on(cfg) -> bool:
  """Whether `cfg` asks for dynamic tokenization."""
  return bool(cfg.get('dynamic', ''))


def accepts(cfg) -> tuple[str, ...] | None:
  return FAMILIES if on(cfg) else None


def refusal(cfg) -> str:
  return (f'dynamic tokenization (config.dynamic={cfg.dynamic!r}) runs on a pretrained language '
          'model (configs/pretrained.py, any model.source)'
          + ('; a zett run is given to it as --config.transfer.hypernet_workdir'
             if cfg.get('family', '') == 'zett' else ''))



def check_mode(mode: str, cfg) -> None:
  """A ValueError when `cfg` asks for dynamic tokenization in a mode that does not read it
  (training, for one, would silently tokenize as usual), or with settings that are wrong."""
  if on(cfg) and mode not in MODES:
    raise ValueError(f'config.dynamic={cfg.dynamic!r} is read by '
                     f'{", ".join("--mode=" + m for m in MODES)} only (dynamic tokenization of '
                     f'a pretrained LM, train/dynamic.py); --mode={mode} would ignore it: drop '
                     'the override')
  if on(cfg):  # its keys (dynamic, dynamic_mode, ...) before anything loads
    from train import dynamic  # pylint: disable=import-outside-toplevel
    dynamic.check_config(cfg)

