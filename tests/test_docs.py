"""The documentation's commands stay runnable: every `launch.py` command in README.md and
docs/*.md is parsed, never run.

A command is a logical line of a fenced code block (lines joined at a trailing `\\`) in which a
Python interpreter (`python`, `python3`, `.venv/bin/python`) runs `launch.py`. For each one:

- `--config=FILE[:PRESET]` names a config file and a preset its `get_config` accepts
  (`config_lib.load`);
- every `--config.a.b=value` names a key of that config and its value parses to the key's type
  (`config_lib.override`), and the result passes `config_lib.validate`;
- `--mode=` is a known mode (the `train.modes` plug-ins when that package exists, else
  `launch.MODES`);
- every other flag is accepted by launch.py's argparse (`launch.parse`).

Shell variables: `NAME=value` assignments (also inside `case` branches) and `for NAME in ...`
loops of the same code block are substituted, one command per value (a `$D` set in three
`case` branches gives three commands). What is still unresolved after that (`$HOME`, a
variable of another block) or a placeholder (`<commit>`) is skipped and counted: in a
`--config.a.b=...` value only the value's type check is skipped (the key is still checked), a
`--workdir` value is never checked, any other token holding one is left out of the command.
An elided `...` token is left out too (the flags around it are still checked; a missing
`--config` / `--workdir` is then filled with a dummy), and the brackets of an optional
`[--flag]` are dropped (the flag is checked as if given). Scripts run as
`python benchmarks/NAME.py` must exist.

Nothing here builds a model or compiles: the whole file runs in seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = ('python', 'python3')
_VAR = re.compile(r'\$(\w+)|\$\{(\w+)\}')
_ASSIGN = re.compile(r'^([A-Za-z_]\w*)=(.*)$', re.S)
_KEYWORDS = ('do', 'then', 'else', 'elif', 'done', 'fi', 'esac', '{', '}')


def doc_files() -> list[str]:
  """README.md and every docs/*.md, relative to the repository root."""
  docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
  return ['README.md'] + docs


def known_modes() -> tuple[str, ...]:
  """The modes launch.py dispatches to: the `train.modes` plug-in modules when that package
  exists (its `names()` if it has one, else its non-underscore modules), else `launch.MODES`."""
  try:
    from train import modes  # pylint: disable=import-outside-toplevel
  except ImportError:
    modes = None
  if modes is not None:
    names = getattr(modes, 'names', None)
    if callable(names):
      return tuple(names())
    import pkgutil  # pylint: disable=import-outside-toplevel
    found = tuple(m.name for m in pkgutil.iter_modules(modes.__path__)
                  if not m.name.startswith('_'))
    if found:
      return found
  import launch  # pylint: disable=import-outside-toplevel
  return tuple(launch.MODES)


# -- extraction ---------------------------------------------------------------------------------
def code_blocks(text: str):
  """Yields (first line number, [lines]) of each fenced code block."""
  lines = text.split('\n')
  i = 0
  while i < len(lines):
    if lines[i].lstrip().startswith('```'):
      start, body = i + 2, []
      i += 1
      while i < len(lines) and not lines[i].lstrip().startswith('```'):
        body.append(lines[i])
        i += 1
      yield start, body
    i += 1


def logical_lines(start: int, body: list[str]):
  """Yields (line number, text) with `\\`-continued lines joined."""
  buf, first = [], None
  for n, line in enumerate(body, start):
    if first is None:
      first = n
    if line.rstrip().endswith('\\'):
      buf.append(line.rstrip()[:-1])
      continue
    buf.append(line)
    yield first, ' '.join(buf)
    buf, first = [], None
  if buf:
    yield first, ' '.join(buf)


def statements(text: str) -> list[list[str]]:
  """Shell words of one logical line, split into statements at ; && || | ( ) and without
  comments or leading keywords (`do`, `then`, ...). Quotes are removed."""
  lex = shlex.shlex(text, posix=True, punctuation_chars=';&|()')
  lex.whitespace_split = True
  lex.commenters = '#'
  try:
    words = list(lex)
  except ValueError:  # an unbalanced quote: not a shell line
    return []
  out, cur = [], []
  for w in words:
    if w and set(w) <= set(';&|()'):
      out.append(cur)
      cur = []
    else:
      cur.append(w)
  out.append(cur)
  cleaned = []
  for s in out:
    while s and s[0] in _KEYWORDS:
      s = s[1:]
    if s:
      cleaned.append(s)
  return cleaned


@dataclasses.dataclass
class Command:
  file: str
  line: int
  args: list[str]           # launch.py's arguments, variables substituted
  skipped: list[str]        # what was left unchecked, and why
  where: str = ''           # the substituted values, for the message

  def at(self) -> str:
    return f'{self.file}:{self.line}' + (f' ({self.where})' if self.where else '')


def _substitute(words: list[str], env: dict[str, list[str]], depth: int = 0):
  """Yields (words, {var: value}) for every combination of the values of the variables the
  words use (one value per variable and command); a bare `$NAME` word is split into words, as
  the shell does."""
  name = next((m.group(1) or m.group(2) for w in words for m in _VAR.finditer(w)
               if (m.group(1) or m.group(2)) in env), None)
  if name is None or depth > 8:
    yield words, {}
    return
  ref = re.compile(r'\$' + name + r'\b|\$\{' + name + r'\}')
  for value in env[name]:
    new = []
    for w in words:
      if ref.fullmatch(w):
        new += shlex.split(value)
      else:
        new.append(ref.sub(lambda _, v=value: v, w))
    for out, used in _substitute(new, env, depth + 1):
      yield out, {name: value, **used}


def _unresolved(word: str) -> bool:
  return bool(_VAR.search(word)) or bool(re.search(r'<[^<>]*>', word))


def commands_in(text: str, file: str) -> tuple[list[Command], list[str]]:
  """The launch.py commands of one Markdown text, and the benchmark scripts it runs."""
  cmds, scripts = [], []
  for start, body in code_blocks(text):
    env: dict[str, list[str]] = {}
    found = []
    for n, line in logical_lines(start, body):
      for st in statements(line):
        if st[0] == 'for' and len(st) >= 3 and st[2] == 'in':
          env.setdefault(st[1], []).extend(st[3:])
          continue
        m = _ASSIGN.match(st[0])
        if m and len(st) == 1:
          env.setdefault(m.group(1), []).append(m.group(2))
          continue
        for i in range(len(st) - 1):
          if os.path.basename(st[i]) in PYTHONS:
            if st[i + 1].endswith('launch.py'):
              found.append((n, st[i + 2:]))
            elif st[i + 1].startswith('benchmarks/'):
              scripts.append((n, st[i + 1]))
            break
    for n, words in found:
      for args, used in _substitute(words, env):
        kept, skipped = [], []
        for w in args:
          if w == '...':
            skipped.append('an elided "..."')
            continue
          w = w[1:] if w.startswith('[') else w
          w = w[:-1] if w.endswith(']') else w
          if not _unresolved(w):
            kept.append(w)
          elif w.startswith('--workdir'):
            kept.append(w)
          elif w.startswith('--config.') and '=' in w and not _unresolved(w.split('=', 1)[0]):
            kept.append(w)
            skipped.append(f'the value of {w.split("=", 1)[0]}')
          else:
            skipped.append(f'the word {w!r}')
        where = ', '.join(f'{k}={v}' for k, v in used.items() if len(env[k]) > 1)
        cmds.append(Command(file, n, kept, skipped, where))
  return cmds, [(file, n, s) for n, s in scripts]


def all_commands():
  cmds, scripts = [], []
  for f in doc_files():
    with open(os.path.join(ROOT, f), encoding='utf-8') as fh:
      c, s = commands_in(fh.read(), f)
    cmds += c
    scripts += s
  return cmds, scripts


# -- checks -------------------------------------------------------------------------------------
def check(cmd: Command, modes: tuple[str, ...]) -> list[str]:
  """The problems of one command, each naming its file, line and the bad key or flag."""
  import launch  # pylint: disable=import-outside-toplevel
  from train import config_lib  # pylint: disable=import-outside-toplevel
  errors = []
  try:
    overrides, rest = config_lib.parse_argv_overrides(cmd.args)
  except config_lib.ConfigError as e:
    return [f'{cmd.at()}: {e}']
  values = dict(a.split('=', 1) for a in rest if a.startswith('--') and '=' in a)
  spec = values.get('--config')
  if spec is not None:
    try:
      cfg, _ = config_lib.load(os.path.join(ROOT, spec) if not os.path.isabs(spec) else spec)
    except config_lib.ConfigError as e:
      errors.append(f'{cmd.at()}: --config={spec}: {e}')
    else:
      unchecked = {s[len('the value of '):] for s in cmd.skipped if s.startswith('the value of ')}
      for key, raw in overrides.items():
        try:
          if f'--config.{key}' in unchecked:
            if key not in config_lib.flat_keys(cfg):
              config_lib.override(cfg, {key: ''})  # raises, naming the closest keys
          else:
            config_lib.override(cfg, {key: raw})
        except config_lib.ConfigError as e:
          errors.append(f'{cmd.at()}: --config.{key} ({spec}): {e}')
      if not errors:
        try:
          config_lib.validate(cfg)
        except config_lib.ConfigError as e:
          errors.append(f'{cmd.at()}: {spec} with its overrides: {e}')
  mode = values.get('--mode', 'train')
  if mode not in modes:
    errors.append(f'{cmd.at()}: --mode={mode} is not a mode (modes: {", ".join(modes)})')
  argv = list(cmd.args)
  for flag, dummy in (('--config', 'configs/byte_lm.py:tiny'), ('--workdir', 'runs/x')):
    if not any(a == flag or a.startswith(flag + '=') for a in rest):
      argv.append(f'{flag}={dummy}')
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      launch.parse(argv)
  except SystemExit:
    msg = err.getvalue().strip().splitlines()
    errors.append(f'{cmd.at()}: launch.py rejects its flags: {msg[-1] if msg else "?"}')
  except config_lib.ConfigError as e:
    errors.append(f'{cmd.at()}: {e}')
  return errors


def test_every_documented_command_parses():
  cmds, _ = all_commands()
  modes = known_modes()
  errors = [e for c in cmds for e in check(c, modes)]
  skipped = sum(len(c.skipped) for c in cmds)
  print(f'{len(cmds)} launch.py commands checked in {len(doc_files())} files; '
        f'{skipped} unresolved parts left unchecked')
  assert not errors, f'{len(errors)} documented command(s) would fail:\n' + '\n'.join(errors)


def test_commands_are_found_everywhere():
  """The extraction finds the commands: the README's first command, and at least one in every
  family's page, so a change in Markdown style cannot silently make the check above vacuous."""
  cmds, _ = all_commands()
  by_file = {}
  for c in cmds:
    by_file.setdefault(c.file, []).append(c)
  readme = [c.args for c in by_file.get('README.md', [])]
  assert ['--config=configs/byte_lm.py:tiny', '--workdir=runs/byte_tiny'] in readme
  assert len(cmds) >= 40, len(cmds)
  for page in ('hat', 'lexinvariant', 'lcm'):
    assert by_file.get(f'docs/{page}.md'), f'no launch.py command found in docs/{page}.md'
  skipped = sum(len(c.skipped) for c in cmds)
  assert skipped <= len(cmds), f'{skipped} parts skipped in {len(cmds)} commands: too many'


def test_benchmark_scripts_exist():
  _, scripts = all_commands()
  missing = [f'{f}:{n}: {s} does not exist' for f, n, s in scripts
             if not os.path.isfile(os.path.join(ROOT, s))]
  assert scripts and not missing, '\n'.join(missing)


def test_the_checker_catches_a_stale_command():
  """A bad key, a bad value, a bad preset, a bad mode and an unknown flag are each reported with
  the file, the line and the culprit; variables and loops are substituted."""
  doc = '\n'.join([
      'text',
      '```bash',
      'X=--config.optim.lr=1e-3',
      'for k in train.steps=5 optim.lrr=2; do',
      '  .venv/bin/python launch.py --config=configs/byte_lm.py:tiny --workdir=runs/$k \\',
      '      --config.$k $X   # a comment',
      'done',
      'python launch.py --config=configs/byte_lm.py:huge --workdir=w',
      'python launch.py --config=configs/hat.py:tiny --workdir=w --config.train.steps=many',
      'python launch.py --config=configs/hat.py:tiny --workdir=w --mode=evaluate',
      'python launch.py --config=configs/hat.py:tiny --workdir=w --nodez=2 --config.seed=$S',
      'python launch.py ... --mode=launch --submit [--max_restarts=20]',
      '```',
  ])
  cmds, _ = commands_in(doc, 'x.md')
  assert [c.line for c in cmds] == [5, 5, 8, 9, 10, 11, 12]
  assert cmds[0].args[-2:] == ['--config.train.steps=5', '--config.optim.lr=1e-3']
  assert cmds[5].skipped == ['the value of --config.seed']
  assert cmds[6].skipped == ['an elided "..."'] and cmds[6].args == [
      '--mode=launch', '--submit', '--max_restarts=20']
  modes = known_modes()
  errors = [check(c, modes) for c in cmds]
  assert errors[0] == [] and errors[6] == []
  assert "x.md:5 (k=optim.lrr=2): --config.optim.lrr" in errors[1][0]
  assert "did you mean 'optim.lr'" in errors[1][0]
  assert errors[2][0].startswith('x.md:8: --config=configs/byte_lm.py:huge') and \
      "unknown preset 'huge'" in errors[2][0]
  assert errors[3][0].startswith('x.md:9: --config.train.steps') and 'expected int' in errors[3][0]
  assert errors[4][0].startswith('x.md:10: --mode=evaluate is not a mode')
  assert errors[5][0].startswith('x.md:11: launch.py rejects its flags') and '--nodez' in \
      errors[5][0]


_PATH = re.compile(r'`((?:data|models|train|configs|benchmarks|tests)/[\w/.]*)')


def test_named_files_and_names_exist():
  """Every repository path the docs name in backticks exists (`models/hat.py`, `tests/`), and a
  name given as `models/hat.generate` is defined in that module: a moved or renamed module
  shows up here, naming the page and line."""
  bad = []
  for f in doc_files():
    with open(os.path.join(ROOT, f), encoding='utf-8') as fh:
      lines = fh.read().split('\n')
    for n, line in enumerate(lines, 1):
      for ref in _PATH.findall(line):
        ref = ref.rstrip('.')
        path = os.path.join(ROOT, ref)
        if os.path.exists(path):
          continue
        mod, _, name = ref.rpartition('.')
        src = os.path.join(ROOT, mod + '.py')
        if not (name and os.path.isfile(src)):
          bad.append(f'{f}:{n}: {ref} does not exist')
          continue
        with open(src, encoding='utf-8') as fh:
          text = fh.read()
        if not re.search(rf'^(?:def|class) {name}\b|^{name}\s*=', text, re.M):
          bad.append(f'{f}:{n}: {ref}: {mod}.py defines no {name}')
  assert not bad, '\n'.join(bad)


# -- navigation ---------------------------------------------------------------------------------
def _links(path: str) -> list[str]:
  with open(os.path.join(ROOT, path), encoding='utf-8') as fh:
    text = fh.read()
  return re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)


@pytest.mark.parametrize('path', doc_files())
def test_relative_links_resolve(path):
  base = os.path.dirname(os.path.join(ROOT, path))
  bad = [t for t in _links(path) if '://' not in t and not t.startswith('mailto:')
         and not os.path.exists(os.path.normpath(os.path.join(base, t)))]
  assert not bad, f'{path}: links to missing files: {bad}'


def test_readme_is_short_and_links_every_page():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as fh:
    text = fh.read()
  assert len(text.split('\n')) <= 400, 'README.md is over 400 lines: move detail into docs/'
  assert re.search(r'^## Contents', text, re.M), 'README.md has no table of contents'
  pages = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
  linked_readme = {os.path.basename(t) for t in _links('README.md') if t.startswith('docs/')}
  linked_index = {os.path.basename(t) for t in _links('docs/README.md')}
  assert not set(pages) - linked_readme - {'README.md'}, 'README.md does not link ' + str(
      sorted(set(pages) - linked_readme - {'README.md'}))
  assert not set(pages) - linked_index - {'README.md'}, 'docs/README.md does not link ' + str(
      sorted(set(pages) - linked_index - {'README.md'}))


def test_ci_runs_the_readmes_test_command():
  """CI (.ci/run) calls the README's command 2 verbatim: a change to one is a change to both."""
  ci = [ln for ln in open(os.path.join(ROOT, '.ci', 'run')).read().splitlines()
        if ln.startswith('bash setup.sh')]
  assert len(ci) == 1, ci
  assert ci[0] in open(os.path.join(ROOT, 'README.md')).read().splitlines(), (
      f'.ci/run runs {ci[0]!r}, which is not a line of README.md (command 2)')
