"""benchmarks/suite_profile.py: its hook records a real process's compilation, cache hit and
CPU, and its report reads them; bad arguments end in one message."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import suite_profile
from conftest import ROOT

PROGRAM = """
import jax, jax.numpy as jnp
jax.config.update('jax_compilation_cache_dir', {cache!r})
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
f = lambda x: jnp.sin(x) * 3.0
jax.jit(f)(1.0).block_until_ready()
jax.clear_caches()  # the same program again: read from the persistent cache
jax.jit(f)(1.0).block_until_ready()
"""


def test_hook_records_a_process_and_the_report_reads_it(tmp_path):
  log = tmp_path / 'records.jsonl'
  env = suite_profile.hooked_env(str(tmp_path), str(log), structure=True, base=dict(
      os.environ, PYTHONPATH='', JAX_PLATFORMS='cpu',
      PYTEST_CURRENT_TEST='tests/test_x.py::test_y (call)'))
  p = subprocess.run([sys.executable, '-c', PROGRAM.format(cache=str(tmp_path / 'cache'))],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  recs = suite_profile.load(str(log))
  compiles = [r for r in recs if r['ev'] == 'compile']
  assert len(compiles) == 1 and compiles[0]['s'] > 0 and len(compiles[0]['shape']) == 16
  hits = [r for r in recs if r['ev'] == 'hit']
  assert [h['key'] for h in hits] == [compiles[0]['key']]
  (ex,) = [r for r in recs if r['ev'] == 'exit']
  assert ex['cpu'] > 0 and ex['test'] == 'tests/test_x.py::test_y (call)'
  # a line cut by a killed process is skipped, not fatal
  with open(log, 'a') as f:
    f.write('{"ev": "comp')
  lines = suite_profile.report(suite_profile.load(str(log)))
  text = '\n'.join(lines)
  assert '1 compilations' in text and '1 persistent-cache hits' in text
  assert f'| {compiles[0]["mod"]} | 1 |' in text
  assert '| python -c started by tests | 1 |' in text  # argv '-c' while a test ran
  kinds = {suite_profile.kind({'argv': a, 'test': t}) for a, t in [
      ('/r/launch.py --config=x --workdir=/tmp/pytest-of-u/p', 'tests/t.py::a (call)'),
      ('-c', ''), ('/v/lib/pytest/__main__.py -q tests', ''),
      ('/r/benchmarks/device_suite.py --out=/tmp/pytest-of-u/x', 'tests/t.py::b (call)')]}
  assert kinds == {'launch.py runs', 'pytest workers (in-process tests)',
                   'pytest (the main process, child pytest runs)', 'benchmarks/device_suite.py'}
  assert 'programs equal to an earlier one but for constants: 0.0 s' in text


def test_a_process_without_jax_imports_no_jax(tmp_path):
  """The hook patches jax only when a process imports it (no import cost elsewhere)."""
  log = tmp_path / 'records.jsonl'
  env = suite_profile.hooked_env(str(tmp_path), str(log), structure=False,
                                 base=dict(os.environ, PYTHONPATH=''))
  p = subprocess.run([sys.executable, '-c', 'import sys; print("jax" in sys.modules)'],
                     env=env, capture_output=True, text=True, timeout=60)
  assert p.stdout.strip() == 'False', p.stderr
  assert [json.loads(line)['ev'] for line in log.read_text().splitlines()] == ['exit']


def test_bad_arguments(tmp_path):
  with pytest.raises(SystemExit, match='no such file'):
    suite_profile.main([f'--report={tmp_path / "missing.jsonl"}'])
  with pytest.raises(SystemExit, match="unknown argument '--colour=red'"):
    suite_profile.main(['--colour=red'])
  (tmp_path / 'records.jsonl').write_text('')
  with pytest.raises(SystemExit, match='holds records.jsonl of an earlier run'):
    suite_profile.run(str(tmp_path), '', False, ['--version'])
