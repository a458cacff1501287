"""What eval and sample share for `config.dynamic` (dynamic tokenization, train/dynamic.py):
it runs on a pretrained language model only."""
from __future__ import annotations

FAMILIES = ('pretrained',)


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

