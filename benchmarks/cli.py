"""Command-line options of the benchmark scripts: `--key=value` over a dict of defaults."""
from __future__ import annotations


def parse_opts(argv, defaults: dict, doc: str = '') -> dict:
  """`defaults` updated from `--key=value` arguments, each value converted to its default's
  type (a bool takes true/false/1/0/yes/no). An unknown key or a value of the wrong type ends
  the script with a message naming the argument (and the script's doc)."""
  opts = dict(defaults)
  for a in argv:
    k, _, v = a.lstrip('-').partition('=')
    if k not in opts:
      raise SystemExit(f'unknown argument {a!r}\n{doc}')
    kind = type(opts[k])
    if kind is bool:
      if v.lower() not in ('1', '0', 'true', 'false', 'yes', 'no'):
        raise SystemExit(f'{a!r}: expected true or false')
      opts[k] = v.lower() in ('1', 'true', 'yes')
      continue
    try:
      opts[k] = kind(v)
    except ValueError:
      raise SystemExit(f'{a!r}: expected {kind.__name__}') from None
  return opts
