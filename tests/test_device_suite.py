"""benchmarks/device_suite.py end to end: the command line in a subprocess, --dry (tiny shapes
on this CPU) on a subset of the items (the whole dry suite takes about 2 minutes on 2 cores:
run `python benchmarks/device_suite.py --dry` before a device session), then the JSON and
Markdown reports: every item present, the selected ones with their figures, the others marked
as not run. Alone: `pytest -m device_suite tests`."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import device_suite
from conftest import ROOT

# the kernels (layer library), the trainer's step through benchmarks/aot.py (MFU), HAT's and the
# byte LM's cached generation (benchmarks/hat_throughput.py), a benchmark family substituted
# into trainer.Setup (benchmarks/lexinv_throughput.py)
SELECTED = ('attention', 'lm_mfu', 'hat_generation', 'lexinv')


@pytest.mark.device_suite
def test_device_suite_dry_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS='--xla_backend_optimization_level=0')  # compile time dominates here
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'device_suite.py'),
                      '--dry', f'--only={",".join(SELECTED)}', f'--out={tmp_path}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  report = json.load(open(os.path.join(tmp_path, 'device_suite.json')))
  assert report['dry'] and report['backend'] == 'cpu' and report['devices'] >= 1
  assert report['peak_flops'] > 0 and report['peak_source'] == 'measured fp32 matmul'
  items = report['items']
  assert list(items) == list(device_suite.ITEMS)
  failed = {k: v.get('error') for k, v in items.items() if k in SELECTED and 'result' not in v}
  assert not failed, failed
  assert all('skipped' in v for k, v in items.items() if k not in SELECTED)

  att = items['attention']['result']
  assert att['auto'] in ('xla', 'blocked') and att['dtype'] == 'float32'
  assert {r['impl'] for r in att['rows']} == {'xla', 'blocked'}
  assert all(r['ms'] > 0 for r in att['rows'])
  assert att['checks'] and all(c['max_abs_diff_vs_xla'] < 1e-4 for c in att['checks'])
  lm = items['lm_mfu']['result']['small']
  assert lm['preset'] == 'tiny' and lm['step_s'] > 0 and lm['tokens_per_s'] > 0
  assert 0 < lm['mfu'] < 1 and lm['params_M'] > 0
  gen = items['hat_generation']['result']
  assert gen['hat']['bytes'] == 48 and gen['hat']['words'] > 0
  assert gen['hat']['bytes_per_s'] > 0 and gen['byte_lm']['bytes_per_s'] > 0 and gen['ratio'] > 0
  lx = items['lexinv']['result']
  assert set(lx['rows']) == {'standard', 'lexinvariant'} and lx['ratio'] > 0
  assert all(r['step_ms'] > 0 for r in lx['rows'].values())

  md = open(os.path.join(tmp_path, 'device_suite.md')).read()
  assert md.startswith('# Device suite') and 'DRY RUN' in md
  for item in device_suite.ITEMS:
    assert f'## {item}' in md
  assert '| case | impl | ms (fwd + bwd) | temp MB |' in md
  assert '| preset | params (M) | batch x seq | step s | tokens/s | TFLOP/s | MFU |' in md
  assert 'HAT / byte LM generation bytes/s' in md
  assert 'lexinvariant / standard step time' in md
  assert md.count('not run (not in --only)') == len(device_suite.ITEMS) - len(SELECTED)
