"""Helpers shared by the trainers: model dispatch, RNG reseeding, checkpoint-friendly state trees.

Train states are pytrees of `nnx.State`, optax states and arrays. Checkpoints store them as a flat
``{"params.conv.kernel.value": array}`` dict of plain arrays (typed PRNG keys as their raw data),
which every Orbax version saves without custom pytree support and which names the offending key
when a checkpoint does not match the model.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp


def model_module(name: str) -> ModuleType:
  """`busjax.models.<name>`, with a clear error for unknown names."""
  try:
    return importlib.import_module(f"busjax.models.{name}")
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith("busjax.models"):
      raise ValueError(f"config.model.name={name!r}: no module busjax/models/{name}.py") from e
    raise


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def reseed_rng_streams(tree, rng: jax.Array):
  """Replaces every typed PRNG key in `tree` by one derived from `rng` (and its position)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = []
  for i, leaf in enumerate(leaves):
    if _is_key(leaf):
      data = jax.random.key_data(jax.random.fold_in(rng, i))
      leaf = jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return ".".join(parts)


def flatten_state(tree) -> dict[str, Any]:
  """A flat name -> array dict of `tree` (PRNG keys as raw uint32 data)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[_path_name(path)] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
  return flat


def unflatten_state(template, flat: dict[str, Any]):
  """Inverse of `flatten_state`, shaped like `template`; names the first missing/mis-shaped key."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, ref in leaves_with_path:
    name = _path_name(path)
    if name not in flat:
      raise KeyError(f"checkpoint has no entry {name!r}")
    value = flat[name]
    if _is_key(ref):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
    elif tuple(value.shape) != tuple(ref.shape):
      raise ValueError(
        f"checkpoint entry {name!r} has shape {tuple(value.shape)}, "
        f"the model expects {tuple(ref.shape)}"
      )
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_flat_state(tree) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape/dtype/sharding of `flatten_state(tree)`, the restore target for Orbax."""
  return {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
    for k, v in flatten_state(tree).items()
  }


def all_finite(metrics: dict[str, Any]) -> bool:
  return all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.values())
