"""Helpers shared by the trainers: model dispatch, RNG reseeding, checkpoint-friendly state trees.

Train states are pytrees of `nnx.State`, optax states and arrays. Checkpoints store them as a flat
``{"params.conv.kernel.value": array}`` dict of plain arrays (typed PRNG keys as their raw data),
which every Orbax version saves without custom pytree support and which names the offending key
when a checkpoint does not match the model.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from busjax import host_memory


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


def path_name(path) -> str:
  """A key path as a dotted name: ``params.head.fc.kernel.value``."""
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
    flat[path_name(path)] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
  return flat


def unflatten_state(template, flat: dict[str, Any]):
  """Inverse of `flatten_state`, shaped like `template`; names the first missing/mis-shaped key."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, ref in leaves_with_path:
    name = path_name(path)
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


def global_norm(tree) -> jax.Array:
  """The Euclidean norm of all leaves together, in float32 (`optax.tree.norm` of a float32
  tree, to rounding).

  Traced as three primitives per leaf (square, sum, add; and a conversion for a leaf not in
  float32). optax squares complex-aware, five jnp calls per leaf, and every jnp call inside a
  trace is a nested jit of its own (~30-80 us each): DenseNet121's step traced 20,000 of them,
  5,460 for its three norms (docs/performance.md, "Tracing").
  """
  total = np.float32(0.0)
  for x in jax.tree.leaves(tree):
    x = lax.convert_element_type(x, jnp.float32)
    total = lax.add(total, lax.reduce_sum(lax.mul(x, x), tuple(range(x.ndim))))
  return lax.sqrt(total)


def ema_update(ema, params, step: jax.Array, decay: float):
  """The averaged weights after a step: ``keep * ema + (1 - keep) * params`` with ``keep =
  min(decay, (1 + step) / (10 + step))``, a warm-up that keeps early averages from being
  dominated by the random initialisation. Three primitives per leaf (`global_norm` says why not
  jnp's operators)."""
  keep = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  take = 1.0 - keep

  def average(e, p):
    return lax.add(
      lax.mul(lax.convert_element_type(keep, e.dtype), e),
      lax.mul(lax.convert_element_type(take, p.dtype), p),
    )

  return jax.tree.map(average, ema, params)


def all_finite(metrics: dict[str, Any]) -> bool:
  return all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.values())


# ----------------------------------------------------------------------------------------------
# Restore or initialise, in the order every regime uses.
# ----------------------------------------------------------------------------------------------


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def _renamed(flat: dict[str, Any], mapping: dict[str, str]) -> dict[str, str]:
  """target flat name -> source flat name, for the names under `mapping`'s target prefixes."""
  out = {}
  for name in flat:
    for target, source in mapping.items():
      if name.startswith(target):
        out[name] = source + name[len(target) :]
        break
  return out


def restore_or_init(
  ckpt,
  config,
  state,
  *,
  data_iterator=None,
  init_from=("params.", "rest."),
  init_from_which: str = "best",
):
  """The state to start from; the first that applies: workdir -> resume -> init_from -> scratch.

  Args:
    ckpt: this run's `checkpointing.Checkpointer`.
    config: reads ``config.resume`` (another run's workdir: its whole latest state) and
      ``config.init_from`` (another run's best checkpoint: weights only).
    state: the freshly initialised state (a dict of named sub-trees: a classifier's
      ``params``/``rest``/``opt_state``, a GAN's generator and discriminators, ...).
    data_iterator: restored in place from this workdir's checkpoint.
    init_from: what ``config.init_from`` loads: flat-name prefixes (see `flatten_state`), or a
      mapping target prefix -> prefix in the other run's checkpoint (e.g. an SSL encoder
      ``{"params.backbone.": "params.encoder."}``). Everything else keeps its fresh value.
    init_from_which: which checkpoint of the ``init_from`` run: "best" (a classifier, by its
      selection metric) or "latest" (a run that ranks nothing, e.g. contrastive pretraining).

  Returns:
    (state, origin) with origin one of "workdir", "resume", "init_from", "scratch".
  """
  from busjax import checkpointing  # Lazy: keeps state_utils importable without Orbax set-up.

  abstract = abstract_flat_state(state)
  restored = ckpt.restore_latest(abstract, data_iterator=data_iterator)
  if restored is not None:
    step, flat = restored
    logging.info("Resuming from this workdir's checkpoint at step %d.", step)
    return unflatten_state(state, flat), "workdir"
  if config.get("resume"):
    flat = checkpointing.load_state(config.resume, abstract, which="latest")
    logging.info("Continuing run %s (config.resume).", config.resume)
    return unflatten_state(state, flat), "resume"
  if config.get("init_from"):
    mapping = init_from if isinstance(init_from, dict) else {p: p for p in init_from}
    names = _renamed(abstract, mapping)
    if not names:
      raise ValueError(f"init_from prefixes {sorted(mapping)} match nothing in the state")
    source_abstract = {names[k]: abstract[k] for k in names}
    loaded = checkpointing.load_state(
      config.init_from, source_abstract, which=init_from_which, partial=True
    )
    flat = {k: jnp.asarray(v) for k, v in flatten_state(state).items()}
    flat.update({k: loaded[names[k]] for k in names})
    logging.info(
      "Initialised %d arrays (%s) from %s (config.init_from).",
      len(names),
      ", ".join(sorted(mapping)),
      config.init_from,
    )
    return unflatten_state(state, flat), "init_from"
  return state, "scratch"


def check_finite(host_metrics, step: int, last_good_step: int | None, workdir: str) -> None:
  """Raises TrainingError naming the step, the values and what was kept, if any is not finite."""
  if all_finite(host_metrics):
    return
  where = (
    f"the last good checkpoint (step {last_good_step}) is kept in {workdir}"
    if last_good_step
    else "no checkpoint was written yet"
  )
  values = {k: float(np.asarray(v)) for k, v in host_metrics.items()}
  raise TrainingError(
    f"non-finite training metrics at step {step}: {values}; {where}. "
    "Lower config.optim.lr, set config.optim.clip_norm, or use float32."
  )


def log_train_metrics(
  step_metrics, step: int, *, ckpt, last_good_step, workdir, writer, progress, split="train"
) -> dict[str, Any]:
  """Fetches a step's metrics, stops the run on a non-finite value (once pending checkpoint saves
  have finished, so the last good one is on disk), then writes and prints them."""
  host_metrics = jax.device_get(step_metrics)
  if not all_finite(host_metrics):
    ckpt.wait_until_finished()
  check_finite(host_metrics, step, last_good_step, workdir)
  writer.write_scalars(step, host_metrics, split=split)
  progress(step, host_metrics)
  return host_metrics


# ----------------------------------------------------------------------------------------------
# Keeping the host close behind the devices.
#
# XLA:CPU (jaxlib 0.10.2) admits at most 32 unfinished programs per device, and for a program on
# several devices it takes each device's slot from a pool thread, in no fixed order. With many
# launches queued (one eager add per BatchNorm statistic, a step loop far ahead of the step), the
# later programs can take every slot of one device while they wait for an earlier program's
# output, and that earlier program's part on that device then never gets a slot. With a
# collective in the earlier program (BatchNorm statistics all-reduced over a sharded batch) the
# other devices wait for it in the rendezvous, and XLA aborts the process after 40 s ("only 3 of
# them arrived"): the test suite's occasional lost worker (4 CPU devices), diagnosed from a
# thread dump (docs/performance.md, "The lost test worker"). Hence: the accumulations below are one
# program per batch, waited for, and the step loops stay at most one step ahead.


class StepPacer:
  """Keeps the host at most one step ahead of the devices: `pace(outputs)` after dispatching step
  k waits for step k - 1's outputs, so step k is already queued when k - 1 finishes (the devices
  never idle) while the queue stays two steps long. Loops rebind the step's outputs to what it
  returns: `metrics = pace(metrics)`.

  Where steps run inline (`host_memory.steps_run_inline()`: `busjax.main`'s default on one CPU
  device) a step has finished when its call returns, so there is nothing to pace: it returns the
  outputs as host arrays instead, and the loop's rebinding frees the step's device buffers before
  the next step runs. Alive, those small buffers (allocated after the step's temporaries) could
  keep the freed temporaries from rejoining the top of the never-trimmed heap, and the next step
  would map a second block as large (MobileNetV2 224/32: 5.4 -> 9.9 GB). After steps 1, 2, 4,
  8, ... it also hands the heap's inner free blocks back to the system: the first run of a
  program leaves its temporaries' block where the next step's request no longer fits (ResNet-18
  128/32: a second 386 MB block from step 2 on, peak 1,182 MB above the imports against 810 with
  fresh pages per step; 777 with these trims), and a block stranded later is handed back too, at
  most log2(steps) times (each may re-fault part of the block in use). docs/performance.md,
  "Every step's temporaries".
  """

  def __init__(self):
    self._previous = None
    self._inline = host_memory.steps_run_inline()
    self._steps = 0

  def __call__(self, outputs):
    if self._inline:
      host = jax.device_get(outputs)
      self._steps += 1
      if self._steps & (self._steps - 1) == 0:  # After steps 1, 2, 4, 8, ... (see above).
        host_memory.release_free_heap(keep_top=True)
      return host
    if self._previous is not None:
      jax.block_until_ready(self._previous)
    self._previous = outputs
    return outputs


def _add_floats(a, b):
  """a + b for float statistics; other leaves (RNG keys, counters) are kept from `a`."""
  return a + b if jnp.issubdtype(a.dtype, jnp.floating) else a


@jax.jit
def _accumulate(total, stats):
  return jax.tree.map(_add_floats, total, stats)


@functools.partial(jax.jit, static_argnums=2)
def _mean_or_copy(total, like, count: int):
  # New buffers for the copied leaves too: a step donates its state, never one buffer twice.
  return jax.tree.map(
    lambda t, r: t / count if jnp.issubdtype(r.dtype, jnp.floating) else jnp.copy(r), total, like
  )


def average_statistics(run_batch, batches, like):
  """Mean over `batches` of the float leaves of `run_batch(batch)` (BatchNorm statistics of one
  batch each); the other leaves (RNG streams) are copies of `like`'s. One accumulating program
  per batch, each waited for (see `StepPacer`'s note). None for no batches."""
  total = None
  for batch in batches:
    stats = run_batch(batch)
    total = stats if total is None else _accumulate(total, stats)
    jax.block_until_ready(total)
  return None if total is None else _mean_or_copy(total, like, len(batches))
