"""The 1b presets' train step on a TPU pod, checked from this CPU host: sharding, lowering,
kernels, collectives and per-device memory.

  python benchmarks/pod_lowering.py [--configs=configs/subword_lm.py:1b,configs/hat.py:1b]
      [--data=64] [--fsdp=4] [--batch_size=0] [--compile=true] [--check=true]
      [--cpu_attention=blocked] [--compile_configs=SPEC,...]

The job it checks by default is the one the README launches: `configs/hat.py:1b` on a
v5litepod-256 slice with `--config.mesh.fsdp=4` (mesh data 64 x fsdp 4, the preset's own global
batch: `--batch_size=0`), and the subword 1b preset on the same slice and mesh. Each job first
passes the preflight (train/preflight.py) for the v5litepod slice of data x fsdp chips.

Runs with `data x fsdp` fake CPU devices (`--xla_force_host_platform_device_count`, set here
before JAX starts). For each config, with the TPU settings (mesh data x fsdp, bf16 compute,
`model.attention_impl=splash`; 'auto' resolves by the backend this process runs on, CPU):
  1. `trainer.Setup(cfg)`: the parameter and optimizer-state shardings the trainer uses; every
     leaf's PartitionSpec must be what `train/partitioning.py`'s rules give for its logical
     axes, and its per-device bytes its total / (product of the mesh axes it is split over);
  2. the trainer's jitted step exported for TPU (`jax.export`, platforms=['tpu']): the module
     must hold the splash kernel (`tpu_custom_call`) inside a shard_map over the batch axes;
  3. (--compile; only for --compile_configs when given) the same step compiled for this CPU on
     the same mesh, with a CPU attention kernel (--cpu_attention; 'blocked': its score tiles
     are an upper bound of splash's O(T) buffers; 'xla' compiles faster but holds T x T scores):
     XLA's SPMD partitioner inserts the collectives (parameter all-gathers over fsdp, gradient
     reduce-scatters / all-reduces), counted in the compiled HLO, and its memory analysis gives
     one device's arguments, outputs and temporaries (activations, gradients, gathered
     weights).
Prints a table of per-device bytes against a v5e chip (16 GiB HBM) and an H100 (80 GiB).
--check=true exits non-zero when an assertion fails (tests/test_pod_lowering.py runs it).
"""
from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # pylint: disable=wrong-import-position


def parse(argv):
  opts = {'configs': 'configs/subword_lm.py:1b,configs/hat.py:1b', 'data': 64, 'fsdp': 4,
          'batch_size': 0, 'compile': True, 'check': True, 'cpu_attention': 'blocked',
          'compile_configs': ''}
  opts = cli.parse_opts(argv, opts, __doc__)
  return opts


GIB = 2 ** 30
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


def tree_bytes(abstract, shardings):
  """(total bytes, per-device bytes) of a tree of abstract arrays with NamedShardings."""
  import jax
  import numpy as np
  total = per_dev = 0
  for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    n = int(np.prod(x.shape)) * x.dtype.itemsize
    total += n
    per_dev += int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
  return total, per_dev


def check_param_shardings(setup) -> dict:
  """Every parameter's sharding is the rules' spec for its logical axes, and each leaf's
  per-device bytes are its bytes / the product of the mesh axes it is split over. Returns
  counts (leaves, sharded leaves, bytes)."""
  import jax
  import numpy as np
  from flax import nnx
  from train import partitioning
  mesh = setup.mesh
  abstract = nnx.eval_shape(lambda: setup.family.build_model(nnx.Rngs(0)))
  params = nnx.state(abstract, setup.trainable)
  names = nnx.to_pure_dict(jax.tree.map(
      lambda v: v.get_metadata().get('out_sharding'), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))
  shapes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_value().shape, params,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))
  flat_names = jax.tree_util.tree_flatten_with_path(
      names, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
  flat_shapes = dict(jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
  flat_sh = dict(jax.tree_util.tree_flatten_with_path(setup.param_sh)[0])
  out = {'leaves': 0, 'sharded_leaves': 0, 'bytes': 0, 'sharded_bytes': 0}
  for path, logical in flat_names:
    shape = flat_shapes[path]
    want = partitioning.logical_to_spec(logical, shape, mesh)
    got = flat_sh[path].spec
    key = jax.tree_util.keystr(path)
    assert tuple(got) == tuple(want), f'{key}: sharded {got}, the rules say {want}'
    split = int(np.prod([mesh.shape[a] for a in want if a is not None]))
    total = int(np.prod(shape)) * 4
    dev = int(np.prod(flat_sh[path].shard_shape(shape))) * 4
    assert dev * split == total, f'{key}: {dev} bytes per device, expected {total} / {split}'
    out['leaves'] += 1
    out['bytes'] += total
    if split > 1:
      out['sharded_leaves'] += 1
      out['sharded_bytes'] += total
  return out


def tpu_export(setup, batch_size: int):
  """(module text, seconds, kernel counts) of the trainer's step exported for TPU."""
  from benchmarks import aot
  exported, secs = aot.lower_train_step(setup, batch_size, platforms=['tpu'])
  text = exported.mlir_module()
  counts = {'tpu_custom_call': text.count('tpu_custom_call'),
            'shard_map': len(re.findall(r'sdy\.manual_computation|SPMDFullToShardShape', text)),
            'devices': exported.nr_devices}
  return text, secs, counts


def cpu_compile(setup, batch_size: int):
  """(memory analysis, collective counts, seconds) of the step compiled for this CPU mesh."""
  from benchmarks import aot
  lowered, _ = aot.lower_train_step(setup, batch_size)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  secs = time.perf_counter() - t0
  hlo = compiled.as_text()
  counts = {c: len(re.findall(rf'= [^=]*\b{c}(?:-start)?\(', hlo)) for c in COLLECTIVES}
  return compiled.memory_analysis(), counts, secs


def run(spec: str, opts: dict) -> dict:
  from benchmarks import aot
  from train import preflight
  base = {'mesh.data': opts['data'], 'mesh.fsdp': opts['fsdp'], 'train.compute_dtype': 'bfloat16'}
  if opts['batch_size']:  # 0: the preset's own global batch (the job the README launches)
    base['train.batch_size'] = opts['batch_size']
  cfg = aot.load_config(spec, {**base, 'model.attention_impl': 'splash'})
  # the job must pass the preflight of the slice it stands for (a PreflightError says why not)
  preflight.plan(cfg, preflight.tpu_target(f'v5litepod-{opts["data"] * opts["fsdp"]}'))
  batch_size = int(cfg.train.batch_size)
  t0 = time.perf_counter()
  setup = aot.make_setup(cfg)
  row = {'config': spec, 'params_B': setup.n_params / 1e9, 'setup_s': time.perf_counter() - t0}
  row.update(check_param_shardings(setup))
  state = setup.abstract_state()
  p_total, p_dev = tree_bytes(state['params'], setup.state_sh['params'])
  o_total, o_dev = tree_bytes(state['opt_state'], setup.state_sh['opt_state'])
  row.update(param_total=p_total, param_dev=p_dev, opt_total=o_total, opt_dev=o_dev)
  fsdp = opts['fsdp']
  assert abs(p_dev - p_total / fsdp) / p_total < 0.01, (
      f'parameters per device {p_dev} vs total / fsdp {p_total / fsdp}')
  _, row['export_s'], kernels = tpu_export(setup, batch_size)
  row.update(kernels)
  assert kernels['tpu_custom_call'] > 0, 'no splash kernel (tpu_custom_call) in the TPU module'
  assert kernels['shard_map'] > 0, 'the splash kernel is not inside a shard_map'
  assert kernels['devices'] == opts['data'] * fsdp
  if opts['compile'] and (not opts['compile_configs'] or spec in opts['compile_configs']):
    cfg = aot.load_config(spec, {**base, 'model.attention_impl': opts['cpu_attention']})
    mem, collectives, row['compile_s'] = cpu_compile(aot.make_setup(cfg), batch_size)
    row.update(collectives)
    row['temp_dev'] = mem.temp_size_in_bytes
    row['arg_dev'] = mem.argument_size_in_bytes
    row['out_dev'] = mem.output_size_in_bytes
    row['alias_dev'] = mem.alias_size_in_bytes
    assert collectives['all-gather'] > 0, 'no parameter all-gather over fsdp'
    assert collectives['reduce-scatter'] + collectives['all-reduce'] > 0, 'no gradient reduction'
  return row


def main(argv):
  opts = parse(argv)
  n = opts['data'] * opts['fsdp']
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  if jax.device_count() != n:
    raise SystemExit(f'{jax.device_count()} devices, expected data x fsdp = {n} (start a fresh '
                     'process: the device count is fixed when JAX starts)')
  print(f'{n} CPU devices as a v5litepod-{n} slice: mesh data {opts["data"]} x fsdp '
        f'{opts["fsdp"]}, global batch {opts["batch_size"] or "of each preset"}, bf16 compute, '
        'splash attention', flush=True)
  from train import preflight
  rows, failed = [], []
  for spec in opts['configs'].split(','):
    try:
      rows.append(run(spec, opts))
    except (AssertionError, preflight.PreflightError) as e:
      failed.append(f'{spec}: {e}')
      print(f'FAILED {spec}: {e}', flush=True)
      continue
    r = rows[-1]
    print(f"{spec}: {r['params_B']:.2f}B parameters, {r['sharded_leaves']}/{r['leaves']} leaves "
          f"sharded over fsdp ({r['sharded_bytes'] / r['bytes']:.1%} of the bytes) as the rules "
          f"say | TPU export {r['export_s']:.1f}s: {r['tpu_custom_call']} tpu_custom_call, "
          f"{r['shard_map']} shard_map" + (
              f" | CPU compile {r['compile_s']:.0f}s: " + ', '.join(
                  f'{r[c]} {c}' for c in COLLECTIVES if r[c]) if 'compile_s' in r else ''),
          flush=True)
  if rows:
    print('\nPer device (GiB):')
    print('| config | params | optimizer (Adam mu, nu) | CPU compile: arguments | '
          'temporaries (activations, grads, gathered weights) | total | v5e 16 GiB | '
          'H100 80 GiB |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
      if 'temp_dev' in r:
        total = r['arg_dev'] + r['out_dev'] - r['alias_dev'] + r['temp_dev']
        cells = [r['arg_dev'] / GIB, r['temp_dev'] / GIB, total / GIB]
      else:
        total = r['param_dev'] + r['opt_dev']
        cells = [float('nan')] * 2 + [total / GIB]
      fits = lambda cap: 'fits' if total <= cap * GIB else 'no'
      print(f"| {r['config']} | {r['param_dev'] / GIB:.2f} | {r['opt_dev'] / GIB:.2f} | "
            + ' | '.join(f'{c:.2f}' for c in cells) + f' | {fits(16)} | {fits(80)} |')
  if failed and opts['check']:
    raise SystemExit('\n'.join(failed))


if __name__ == '__main__':
  main(sys.argv[1:])
