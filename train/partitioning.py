"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names in their metadata (`nnx.Param(..., out_sharding=('embed',
'mlp'))`); `RULES` maps them to mesh axes. The mesh is ('data', 'fsdp'): batches are split over
both, parameters and optimizer state over 'fsdp' along their 'embed' dimension (FSDP/ZeRO-3).
One code path from a single CPU to a pod.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
RULES = {
    'embed': 'fsdp',
    'vocab': None, 'mlp': None, 'heads': None, 'kv_heads': None, 'head_dim': None,
    'norm': None, 'layers': None,
}


def mesh_shape(cfg_mesh, n: int) -> tuple[int, int]:
  """(data, fsdp) of the mesh `make_mesh` builds on `n` devices (`mesh.data=-1`: every device
  not used by fsdp); a ValueError when they do not multiply to `n`. The preflight
  (train/preflight.py) asks it for a slice that is not this machine."""
  fsdp = cfg_mesh.fsdp
  data = cfg_mesh.data if cfg_mesh.data > 0 else n // max(fsdp, 1)
  if data * fsdp != n:
    raise ValueError(f'mesh data={cfg_mesh.data} x fsdp={fsdp} does not match the {n} devices '
                     f'available (set --config.mesh.data / --config.mesh.fsdp)')
  return data, fsdp


def make_mesh(cfg_mesh) -> jax.sharding.Mesh:
  data, fsdp = mesh_shape(cfg_mesh, jax.device_count())
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'), axis_types=(auto, auto))


def logical_to_spec(names, shape, mesh) -> P:
  """Maps logical names to a PartitionSpec; a dimension that the mesh axis does not divide stays
  replicated rather than failing, so odd vocabularies or heads still run."""
  if names is None:
    return P()
  axes, used = [], set()
  for name, dim in zip(names, shape):
    axis = RULES.get(name) if name is not None else None
    if axis is not None and (axis in used or dim % mesh.shape[axis]):
      axis = None
    if axis is not None:
      used.add(axis)
    axes.append(axis)
  return P(*axes)


def param_shardings(abstract_state, mesh):
  """nnx.State of abstract Params -> pure dict of NamedShardings."""
  from flax import nnx

  def one(v):
    names = v.get_metadata().get('out_sharding') if isinstance(v, nnx.Variable) else None
    shape = v.get_value().shape if isinstance(v, nnx.Variable) else v.shape
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))

  pure = nnx.to_pure_dict(jax.tree.map(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  return pure


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local.items()}
