"""Where the test suite's CPU goes: every XLA compilation (program, seconds, test) and the CPU
of every Python process the tests start, from one pytest run with a recording hook.

  python benchmarks/suite_profile.py [--out=DIR] [--cache=DIR] [--structure=false] [--top=25]
      [-- PYTEST ARGS]
  python benchmarks/suite_profile.py --report=DIR/records.jsonl [--top=25]

Runs `pytest -q -n 2 --dist loadgroup tests` (the README's test command without ruff; other
pytest arguments after `--`) with
- an empty compilation cache (a new directory in --out), or --cache=DIR for a warm run;
- a `sitecustomize.py` written to --out and put first on PYTHONPATH, so that every Python
  process of the run imports it: pytest and its workers, tests/launch_server.py and the
  launch.py runs it forks, the scripts tests start (the reference venv's processes do not
  import it: that venv has its own site). It records to --out/records.jsonl each XLA
  compilation (program name, cache key, seconds; with --structure a hash of the program with
  its constants blanked, which costs printing every program), each persistent-cache hit, and
  each process's CPU (user + system) when it exits, with the test that was running
  ($PYTEST_CURRENT_TEST).

Then prints the run's wall time and CPU (all processes waited for), the CPU by kind of process,
the compile seconds by program name and by program size, hits against compilations, the tests
that cost most, and with --structure the seconds spent on programs that differ from an earlier
one only in constants. The hook wraps two private functions of jax._src.compiler
(`_cache_read`, `_compile_and_write_cache`, jax 0.11); where they are missing it says so and
records process CPU only. docs/testing.md has a run's figures.
"""
from __future__ import annotations

import collections
import json
import os
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli  # pylint: disable=wrong-import-position

LOG_ENV = 'NOTOKLM_SUITE_PROFILE_LOG'
STRUCTURE_ENV = 'NOTOKLM_SUITE_PROFILE_STRUCTURE'

# imported by every Python process of the run (site imports `sitecustomize` from sys.path)
HOOK = r'''
import json as _json, os as _os, resource as _resource, sys as _sys, time as _time

_LOG = _os.environ.get(%(log_env)r)


def _write(rec):
  rec.update(pid=_os.getpid(), t=_time.time(), test=_os.environ.get('PYTEST_CURRENT_TEST', ''),
             argv=' '.join(_sys.argv)[:1500])
  try:  # a test that limits file sizes (RLIMIT_FSIZE) must not fail because of this hook
    with open(_LOG, 'a') as f:
      f.write(_json.dumps(rec) + '\n')
  except Exception:  # pylint: disable=broad-except
    pass


def _cpu():
  r = _resource.getrusage(_resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


if _LOG:
  import atexit as _atexit
  _exit = _os._exit

  def _os_exit(code):  # xdist workers and forked children may leave through os._exit
    _write({'ev': 'exit', 'cpu': _cpu()})
    _exit(code)

  _os._exit = _os_exit
  _atexit.register(lambda: _write({'ev': 'exit', 'cpu': _cpu()}))
  _structure = _os.environ.get(%(structure_env)r) == '1'

  def _patch(_c):
    try:
      _read, _compile = _c._cache_read, _c._compile_and_write_cache
    except AttributeError as e:
      _write({'ev': 'no_hook', 'why': repr(e)})
      return

    def _cache_read(module_name, cache_key, *a, **k):
      out = _read(module_name, cache_key, *a, **k)
      if out[0] is not None:
        _write({'ev': 'hit', 'mod': module_name, 'key': cache_key[-16:]})
      return out

    def _compile_and_write_cache(backend, computation, devices, options, callbacks,
                                 module_name, cache_key):
      t0 = _time.perf_counter()
      out = _compile(backend, computation, devices, options, callbacks, module_name, cache_key)
      rec = {'ev': 'compile', 'mod': module_name, 'key': cache_key[-16:],
             's': _time.perf_counter() - t0}
      if _structure:
        import hashlib, re
        text = computation.operation.get_asm(enable_debug_info=False)
        rec['shape'] = hashlib.sha1(
            re.sub(r'dense<[^>]*>', 'dense<C>', text).encode()).hexdigest()[:16]
      _write(rec)
      return out

    _c._cache_read = _cache_read
    _c._compile_and_write_cache = _compile_and_write_cache

  # patch jax._src.compiler when (and only if) the process imports it: importing jax here
  # would add its import time to every process, jax-free ones included
  import importlib.abc as _abc, importlib.machinery as _mach

  class _Finder(_abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
      if name != 'jax._src.compiler':
        return None
      spec = _mach.PathFinder.find_spec(name, path)
      if spec is None or spec.loader is None:
        return spec
      run = spec.loader.exec_module

      def exec_module(module):
        run(module)
        _patch(module)

      spec.loader.exec_module = exec_module
      return spec

  _sys.meta_path.insert(0, _Finder())
'''


def parse(argv):
  pytest_args = []
  if '--' in argv:
    i = argv.index('--')
    argv, pytest_args = argv[:i], argv[i + 1:]
  opts = {'out': '', 'cache': '', 'structure': False, 'top': 25, 'report': ''}
  return cli.parse_opts(argv, opts, __doc__), pytest_args


def hooked_env(out: str, records: str, structure: bool, base: dict | None = None) -> dict:
  """Writes the hook to `out`/sitecustomize.py; returns `base` (default os.environ) with `out`
  first on PYTHONPATH, so that processes started with it record to `records`."""
  with open(os.path.join(out, 'sitecustomize.py'), 'w') as f:
    f.write(HOOK % {'log_env': LOG_ENV, 'structure_env': STRUCTURE_ENV})
  env = dict(os.environ if base is None else base)
  env['PYTHONPATH'] = os.pathsep.join([out] + [p for p in [env.get('PYTHONPATH')] if p])
  env[LOG_ENV] = records
  env[STRUCTURE_ENV] = '1' if structure else '0'
  return env


def run(out: str, cache: str, structure: bool, pytest_args: list[str]) -> dict:
  """Runs pytest with the hook; returns {'wall_s', 'cpu_s', 'returncode', 'records'}."""
  out, cache = os.path.abspath(out), cache and os.path.abspath(cache)  # pytest runs in ROOT
  os.makedirs(out, exist_ok=True)
  records = os.path.join(out, 'records.jsonl')
  if os.path.exists(records):
    raise SystemExit(f'--out={out}: holds records.jsonl of an earlier run; name a new directory')
  env = hooked_env(out, records, structure)
  env['NOTOKLM_COMPILE_CACHE'] = cache or os.path.join(out, 'compile_cache')
  cmd = [sys.executable, '-m', 'pytest', *(pytest_args or ['-q', '-n', '2', '--dist',
                                                           'loadgroup', 'tests'])]
  print(f'$ NOTOKLM_COMPILE_CACHE={env["NOTOKLM_COMPILE_CACHE"]} {" ".join(cmd)}', flush=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  p = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {'wall_s': time.time() - t0, 'cpu_s': cpu, 'returncode': p.returncode,
          'records': records}


def load(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise SystemExit(f'--report={path}: no such file (a records.jsonl of an earlier run)')
  out = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a process killed mid-write: its last line is cut
        print(f'{path}:{i}: skipped a cut line', file=sys.stderr)
  return out


def kind(rec: dict) -> str:
  """The kind of process a record comes from, by its argv (and for `python -c`, whether a test
  was running: pytest's xdist workers are `-c` processes that exit between tests)."""
  first = rec['argv'].split(' ', 1)[0]
  if 'launch.py' in first:
    return 'launch.py runs'
  if 'pytest' in first:
    return 'pytest (the main process, child pytest runs)'
  if first in ('-c', ''):
    return 'python -c started by tests' if rec.get('test') else 'pytest workers (in-process tests)'
  return re.sub(r'^.*?/(?=(tests|benchmarks|\.venv[^/]*)/)', '', first)


def test_of(rec: dict) -> str:
  return re.sub(r' \((setup|call|teardown)\)$', '', rec.get('test', '')) or '(no test)'


def report(recs: list[dict], top: int = 25) -> list[str]:
  """The report's lines (see the module doc)."""
  lines = []
  if any(r['ev'] == 'no_hook' for r in recs):
    why = next(r['why'] for r in recs if r['ev'] == 'no_hook')
    lines.append(f'no compile records: the hook found no jax._src.compiler functions ({why})')
  last = {}  # one exit record per process (the last: atexit after an earlier os._exit wrapper)
  for r in recs:
    if r['ev'] == 'exit':
      last[r['pid']] = r
  exits = list(last.values())
  compiles = [r for r in recs if r['ev'] == 'compile']
  hits = [r for r in recs if r['ev'] == 'hit']
  by_kind = collections.defaultdict(lambda: [0, 0.0, 0.0])
  compile_by_pid = collections.Counter()
  for r in compiles:
    compile_by_pid[r['pid']] += r['s']
  for r in exits:
    k = by_kind[kind(r)]
    k[0] += 1
    k[1] += r['cpu']
    k[2] += compile_by_pid[r['pid']]
  lines.append('')
  lines.append('| processes | count | CPU s | of it compiling s |')
  lines.append('|---|--:|--:|--:|')
  for name, (n, cpu, comp) in sorted(by_kind.items(), key=lambda x: -x[1][1]):
    lines.append(f'| {name} | {n} | {cpu:.0f} | {comp:.0f} |')
  lines.append(f'| all that recorded an exit | {len(exits)} | '
               f'{sum(r["cpu"] for r in exits):.0f} | {sum(compile_by_pid[r["pid"]] for r in exits):.0f} |')
  lines.append('(a process ended by a signal records nothing: killed runs, the launch servers)')
  total = sum(r['s'] for r in compiles)
  lines.append('')
  lines.append(f'{len(compiles)} compilations, {total:.0f} s; {len(hits)} persistent-cache hits; '
               f'{len({r["key"] for r in compiles})} distinct cache keys compiled')
  lines.append('')
  lines.append('| program | compilations | s |')
  lines.append('|---|--:|--:|')
  by_mod = collections.defaultdict(lambda: [0, 0.0])
  for r in compiles:
    by_mod[r['mod']][0] += 1
    by_mod[r['mod']][1] += r['s']
  for name, (n, s) in sorted(by_mod.items(), key=lambda x: -x[1][1])[:top]:
    lines.append(f'| {name} | {n} | {s:.1f} |')
  lines.append('')
  lines.append('| one compilation takes | compilations | s |')
  lines.append('|---|--:|--:|')
  bounds = (0.05, 0.2, 0.5, 1, 2, 4, 8, float('inf'))
  sizes = collections.defaultdict(lambda: [0, 0.0])
  for r in compiles:
    b = next(b for b in bounds if r['s'] < b)
    sizes[b][0] += 1
    sizes[b][1] += r['s']
  lo = 0
  for b in bounds:
    if b in sizes:
      lines.append(f'| {lo}-{b} s | {sizes[b][0]} | {sizes[b][1]:.1f} |')
    lo = b
  # a test's cost: the CPU of the processes it started (those that exited; a process killed by
  # SIGKILL records nothing) + what the pytest process running it compiled (a worker, or pytest
  # itself without xdist)
  worker = {r['pid'] for r in exits if kind(r).startswith('pytest')}
  cost = collections.defaultdict(lambda: [0.0, 0, 0.0])
  for r in exits:
    if r['pid'] not in worker and test_of(r) != '(no test)':
      cost[test_of(r)][0] += r['cpu']
      cost[test_of(r)][1] += 1
  for r in compiles:
    if r['pid'] in worker:
      cost[test_of(r)][2] += r['s']
  lines.append('')
  lines.append('| test | CPU of the processes it started s (count) | compiling in pytest s |')
  lines.append('|---|--:|--:|')
  for name, (cpu, n, comp) in sorted(cost.items(), key=lambda x: -(x[1][0] + x[1][2]))[:top]:
    lines.append(f'| {name} | {cpu:.1f} ({n}) | {comp:.1f} |')
  shaped = [r for r in compiles if 'shape' in r]
  if shaped:
    seen, same = set(), 0.0
    for r in shaped:
      if r['shape'] in seen:
        same += r['s']
      seen.add(r['shape'])
    lines.append('')
    lines.append(f'programs equal to an earlier one but for constants: {same:.1f} s of '
                 f'{sum(r["s"] for r in shaped):.1f} s compiling')
  return lines


def main(argv):
  opts, pytest_args = parse(argv)
  if opts['report']:
    print('\n'.join(report(load(opts['report']), opts['top'])))
    return 0
  out = opts['out'] or os.path.join(ROOT, 'runs', f'suite_profile_{time.strftime("%Y%m%d_%H%M%S")}')
  res = run(out, opts['cache'], opts['structure'], pytest_args)
  print(f'\npytest exit {res["returncode"]}: {res["wall_s"]:.0f} s wall, {res["cpu_s"]:.0f} s of '
        f'CPU (user + system, every process waited for); records in {res["records"]}')
  print('\n'.join(report(load(res['records']), opts['top'])))
  return res['returncode']


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
