"""Runs in the reference environment (.venv-ref: CPython 3.11, torch CPU, transformers, lm-eval):
  python lm_eval_hf.py MODEL_DIR INCLUDE_PATH TASKS LIMIT OUT.json
evaluates an HF-format model directory with lm-eval's own `hf` backend (float32, CPU) on the
comma-separated TASKS (task YAMLs in INCLUDE_PATH; run it with that folder as the current
directory, where their data files are; lm-eval's own registry is not indexed) for the first
LIMIT items of each, and saves lm-eval's results plus every request:
{task: [[args..., log-likelihood], ...]}."""
import json
import os
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402


def main(model_dir, include_path, tasks, limit, out_path):
  torch.manual_seed(0)
  torch.set_num_threads(min(4, os.cpu_count() or 1))
  res = lm_eval.simple_evaluate(
      model='hf', model_args={'pretrained': model_dir, 'dtype': 'float32', 'device': 'cpu'},
      tasks=tasks.split(','), task_manager=TaskManager(include_path=include_path, include_defaults=False),
      limit=int(limit), batch_size=8, log_samples=True, bootstrap_iters=0, random_seed=0,
      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
  requests = {}
  for task, samples in res['samples'].items():
    rows = []
    for s in samples:
      for args, resp in zip(s['arguments'], s['resps']):
        r = resp[0]
        ll = r[0] if isinstance(r, (list, tuple)) else r
        rows.append([*[a for a in args if isinstance(a, str)], float(ll)])
    requests[task] = rows
  with open(out_path, 'w') as f:
    json.dump({'results': res['results'], 'requests': requests}, f, default=str)


if __name__ == '__main__':
  main(*sys.argv[1:6])
