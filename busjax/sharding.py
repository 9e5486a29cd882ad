"""Device mesh, the two shardings busjax uses, host batches -> global jax.Arrays, and the
persistent compilation cache every entry point turns on the same way.

Data parallelism only needs a 1-D ``("data",)`` mesh; a config may name more axes for later
model sharding. Axes are built with ``AxisType.Auto``: ``jax.make_mesh`` defaults to Explicit
axes, and an Explicit ``data`` axis makes ``softmax_cross_entropy_with_integer_labels``
gradients fail with a ShardingTypeError. Where a mesh context is needed use
``jax.set_mesh(mesh)`` (``with mesh:`` is deprecated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from busjax import host_memory
from busjax.models import layers

DATA_AXIS = "data"


def enable_compilation_cache(folder: str, max_bytes: int | None = None) -> None:
  """JAX's persistent compilation cache in `folder`, for every program: not only the step's but
  the eager ops' 5-100 ms ones, ~100 per launch (model initialisation, optimizer state, metrics),
  which were 2.4 s of a warm BUSI run (docs/performance.md). With `max_bytes`, the least recently
  used programs are deleted beyond that size (JAX's own eviction, under a file lock)."""
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else int(max_bytes))


def make_mesh(mesh_config: Mapping[str, int] | None = None) -> Mesh:
  """A mesh over all devices with Auto axis types.

  Args:
    mesh_config: ordered mapping axis name -> size (e.g. ``{"data": -1}`` or a ConfigDict);
      at most one size may be -1, meaning "all remaining devices". Default ``{"data": -1}``.

  Returns:
    A jax.sharding.Mesh whose axis sizes multiply to jax.device_count().
  """
  axes = dict(mesh_config) if mesh_config is not None else {DATA_AXIS: -1}
  if not axes:
    raise ValueError("mesh_config names no axes")
  names = tuple(axes)
  sizes = [int(v) for v in axes.values()]
  devices = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {axes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {axes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices % known:
      raise ValueError(f"mesh {axes}: {devices} devices not divisible by {known}")
    sizes[sizes.index(-1)] = devices // known
  if math.prod(sizes) != devices:
    raise ValueError(
      f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} "
      f"devices, have {devices}"
    )
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the "data" axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on every device of the mesh (parameters, optimizer state, rngs)."""
  return NamedSharding(mesh, PartitionSpec())


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over "data".

  Every process calls this with its own per-process batch (same shapes on all processes); the
  global batch dimension is per-process rows * process_count, in process order.

  Args:
    batch: name -> array with the per-process batch as leading dimension.
    mesh: the mesh (its "data" axis size must divide the global batch).

  Returns:
    name -> jax.Array of global shape, sharded with data_sharding(mesh). Where steps run inline
    (`host_memory.steps_run_inline`) the copies have finished: a program called with an input
    still being copied runs later, on one of XLA's threads, with its temporaries on fresh pages
    beside the block the inline steps keep (the supervised BUSI job: a second 192 MB block at
    one or two of its 37 steps; docs/performance.md, "A batch still being copied").
  """
  sharding = data_sharding(mesh)
  data_devices = mesh.shape[DATA_AXIS]
  process_count = jax.process_count()
  out = {}
  for name, local in batch.items():
    local = np.asarray(local)
    if local.ndim == 0:
      raise ValueError(f"batch[{name!r}] is a scalar; every entry needs a batch dimension")
    global_rows = local.shape[0] * process_count
    if global_rows % data_devices:
      raise ValueError(
        f"batch[{name!r}]: global batch {global_rows} is not divisible by the "
        f"{data_devices} devices on the '{DATA_AXIS}' axis"
      )
    global_shape = (global_rows, *local.shape[1:])
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  if host_memory.steps_run_inline():
    jax.block_until_ready(out)
  return out


def jit(fn=None, **kwargs):
  """`jax.jit` with busjax's XLA options (`layers.compiler_options`: on CPU, convolutions kept
  off YNNPACK); every busjax step, prediction and sampler is jitted through it. Also a bare
  decorator."""
  if fn is None:
    return lambda f: jit(f, **kwargs)
  return jax.jit(fn, compiler_options=layers.compiler_options(), **kwargs)


def replicate(tree, mesh: Mesh):
  """Puts every leaf of `tree` on every device of the mesh (parameters, optimiser state)."""
  return jax.device_put(tree, replicated(mesh))


def jit_train_step(step_fn, mesh: Mesh, state, *, constants=(), donate: bool = True):
  """The one place a step is jitted: `step_fn(state, batch, rng, *constants) -> (state, metrics)`.

  State and rng are replicated, every entry of the batch dict (any keys: one image, two
  modalities, masks) is split over the "data" axis along its first dimension, metrics come back
  replicated. The state is donated, so the caller must use the returned one.

  `constants` (arrays, e.g. a fold's class weights) are replicated arguments bound here: the
  returned function takes `(state, batch, rng)`. Passed as arguments rather than closed over, they
  stay out of the compiled program, so runs that differ only in them (the folds of a
  cross-validation) share one compilation through the persistent cache.
  """
  replicated_sharding = replicated(mesh)
  state_shardings = jax.tree.map(lambda _: replicated_sharding, state)
  constants = tuple(jax.device_put(np.asarray(c), replicated_sharding) for c in constants)
  jitted = jit(
    step_fn,
    in_shardings=(state_shardings, data_sharding(mesh), replicated_sharding)
    + (replicated_sharding,) * len(constants),
    out_shardings=(state_shardings, replicated_sharding),
    donate_argnums=0 if donate else (),
  )
  if not constants:
    return jitted

  def step(state, batch, rng):
    return jitted(state, batch, rng, *constants)

  step.lower = lambda state, batch, rng: _Bound(
    jitted.lower(state, batch, rng, *constants), constants
  )
  return step


class _Bound:
  """A jax stage (Lowered or Compiled) with the step's constants bound: compiled and called with
  `(state, batch, rng)` like the step itself; anything else (cost_analysis, as_text, ...) passes
  through."""

  def __init__(self, stage, constants):
    self._stage, self._constants = stage, constants

  def __call__(self, *args):
    return self._stage(*args, *self._constants)

  def compile(self, *args, **kwargs):
    return _Bound(self._stage.compile(*args, **kwargs), self._constants)

  def __getattr__(self, name):
    return getattr(self._stage, name)


def jit_predict(apply_fn, mesh: Mesh):
  """`apply_fn(variables, batch) -> probabilities`, jitted for evaluation.

  The result also carries the batch's ``index`` and ``valid`` rows, and all three come back
  replicated, so every process can read the whole global batch (evaluation is collective).
  """

  def predict(variables, batch):
    return apply_fn(variables, batch), batch["index"], batch["valid"]

  return jit(predict, out_shardings=replicated(mesh))
