"""benchmarks/device_suite.py --dry: every accelerator item at tiny shapes on this CPU.
Alone: `pytest -m device_suite tests`."""
import json
import os

import pytest

from benchmarks import device_suite


@pytest.mark.device_suite
def test_device_suite_dry_run(data_dir, tmp_path):
  del data_dir  # the embedded corpus for the comparison item
  report = device_suite.main(['--dry', f'--out={tmp_path}'])
  failed = {k: v.get('error') for k, v in report['items'].items() if 'result' not in v}
  assert not failed, failed
  assert set(report['items']) == set(device_suite.ITEMS)
  saved = json.load(open(os.path.join(tmp_path, 'device_suite.json')))
  assert saved['dry'] and saved['items']['compare']['result']['hat']['bpb'] > 0
  md = open(os.path.join(tmp_path, 'device_suite.md')).read()
  for item in device_suite.ITEMS:
    assert f'## {item}' in md
