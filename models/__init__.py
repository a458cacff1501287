"""Models: one layer library, one transformer stack, and thin family modules on them.

Every parameter is an fp32 `nnx.Param` carrying logical axis names in its `out_sharding`
metadata ('vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'norm'); the trainer maps
them to mesh axes. Eager sharding is switched off so modules can be built without a mesh.
"""
from flax import nnx

nnx.use_eager_sharding(False)
