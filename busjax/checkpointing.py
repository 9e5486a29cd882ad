"""The one Orbax wrapper: latest and best checkpoints, with the Grain iterator, atomically.

Layout under a run's workdir::

  checkpoints/<step>/{state, data_iterator, metrics}   the last `keep_latest` saves + the best one
  checkpoints/metadata/                                which metric ranks the steps (for load_state)

One ``CheckpointManager``, whose preservation policy keeps the newest `keep_latest` steps (for
resume) and the best step by `best_metric` (for evaluation; ties keep the earlier step), so the
best state is written once. Orbax's ``best_fn`` alone would not do: it deletes the newest
checkpoint when its metric is poor, so a resumed run would go back in time; and ``BestN`` keeps
the later step of a tie. Old workdirs (checkpoints/{latest,best}/<step>) are not read.

Why the iterator: a resumed run must see the same data order as an uninterrupted one, so the
Grain ``DatasetIterator`` state is saved in the same atomic step directory as the train state.

Atomicity: Orbax writes every step into ``<step>.orbax-checkpoint-tmp*`` and renames it when all
items are written (on GCS it writes a commit file instead). A process killed mid-save leaves a
temporary directory that is ignored, and removed when the next ``Checkpointer`` opens the
directory; the previous step stays restorable.

Multi-process: every process calls every method (Orbax coordinates the collective writes and
each process writes its own iterator state file); metric values must be the same on all
processes, which holds for metrics computed from global arrays.

No pickle: arrays go through tensorstore, metrics and iterator state are JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE_ITEM = "state"
DATA_ITERATOR_ITEM = "data_iterator"
METRICS_ITEM = "metrics"
LATEST = "latest"
BEST = "best"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit; the message names the path and the problem."""


def _item_handlers() -> dict[str, Any]:
  # Explicit handlers (rather than ones inferred from the first save) let a manager that has
  # not saved anything read metadata and restore any item, e.g. another run's checkpoint.
  return {
    STATE_ITEM: ocp.PyTreeCheckpointHandler(),
    DATA_ITERATOR_ITEM: grain.checkpoint.CheckpointHandler(),
    METRICS_ITEM: ocp.JsonCheckpointHandler(),
  }


@dataclasses.dataclass
class _KeepStep:
  """Preservation policy: keeps the step `step()` returns (the best so far), if any."""

  step: Callable[[], int | None]

  def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
    best = self.step()
    return [info.step == best for info in checkpoints]


# Orbax writes a step to `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete.
_UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"


def _remove_unfinished_saves(directory: epath.Path) -> None:
  """Deletes step folders a process killed mid-save left half-written (process 0 only).

  Orbax can do this itself (``cleanup_tmp_directories``), but in a background thread that
  ``CheckpointManager.close()`` does not join (orbax-checkpoint 0.12): a run that stopped right
  after opening its manager (a bad ``init_from``) printed that thread's traceback at exit.
  """
  if jax.process_index() != 0 or not directory.exists():
    return
  for path in directory.iterdir():
    if _UNFINISHED_SUFFIX in path.name:
      logging.info("Removing an unfinished checkpoint save: %s", path)
      if path.is_dir():
        path.rmtree()
      else:
        path.unlink()


def _open_manager(
  directory: epath.Path,
  *,
  policy: Any = None,
  metadata: Mapping[str, Any] | None = None,
  async_save: bool = False,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=False,  # Done synchronously by `_remove_unfinished_saves`.
    create=not read_only,
    read_only=read_only,
    # load_state may read another run while this run's Checkpointer is open; in a multi-process
    # run their barriers would collide without distinct prefixes.
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix="busjax_load" if read_only else "busjax_ckpt"
    ),
  )
  if not read_only:
    _remove_unfinished_saves(directory)
  return ocp.CheckpointManager(
    directory, options=options, metadata=metadata, item_handlers=_item_handlers()
  )


# ---------------------------------------------------------------------------------------------
# Metrics as strict JSON.
# ---------------------------------------------------------------------------------------------


def to_json_value(value: Any, *, name: str = "value") -> Any:
  """Converts a metric value (python, numpy or 0-d jax scalar, or nested dict) to strict JSON.

  Non-finite floats become ``None`` so that the result is valid JSON (no NaN/Infinity tokens).

  Raises:
    ValueError: naming `name` if the value is an array with more than one element or an
      unsupported type.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, Mapping):
    return {str(k): to_json_value(v, name=f"{name}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v, name=f"{name}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
      raise ValueError(f"{name}: expected a scalar, got an array of shape {array.shape}")
    value = array.reshape(()).item()
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  raise ValueError(f"{name}: cannot write a {type(value).__name__} as JSON")


# ---------------------------------------------------------------------------------------------
# Tree checks: Orbax silently restores a checkpoint array into a target of another shape when no
# sharding is given, so shapes and keys are compared here, before restoring.
# ---------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _flatten_with_names(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _leaf_shape(leaf: Any) -> tuple[int, ...] | None:
  """Shape as stored on disk: typed PRNG keys are stored as their uint32 key data."""
  if isinstance(leaf, (int, float, complex, bool, np.number)):
    return ()
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  if shape is None:
    return None
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype)).shape)
  return tuple(shape)


def _compare_trees(stored: Any, expected: Any, *, where: str, partial: bool) -> None:
  """Raises CheckpointError listing missing keys, unexpected keys and shape mismatches."""
  stored_leaves = _flatten_with_names(stored)
  expected_leaves = _flatten_with_names(expected)
  missing = sorted(set(expected_leaves) - set(stored_leaves))
  unexpected = [] if partial else sorted(set(stored_leaves) - set(expected_leaves))
  mismatched = []
  for name in sorted(set(expected_leaves) & set(stored_leaves)):
    stored_shape = _leaf_shape(stored_leaves[name])
    expected_shape = _leaf_shape(expected_leaves[name])
    if stored_shape is not None and expected_shape is not None and stored_shape != expected_shape:
      mismatched.append(f"{name}: checkpoint {stored_shape} vs expected {expected_shape}")
  if not (missing or unexpected or mismatched):
    return
  problems = []
  if missing:
    problems.append(f"keys expected but not in the checkpoint: {_shorten(missing)}")
  if unexpected:
    problems.append(f"keys in the checkpoint but not expected: {_shorten(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches: {_shorten(mismatched)}")
  raise CheckpointError(f"{where}: state tree does not match; " + "; ".join(problems))


def _shorten(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _restore_state(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  *,
  data_iterator: Any = None,
  partial: bool = False,
) -> Any:
  """Restores `state` (and the iterator in place) from one step of `manager`, checked first."""
  step_dir = epath.Path(manager.directory) / str(step)
  if not (step_dir / STATE_ITEM).exists():
    raise CheckpointError(f"{step_dir}: no '{STATE_ITEM}' item in this checkpoint")
  metadata = manager.item_metadata(step)[STATE_ITEM]
  stored_tree = metadata.tree if hasattr(metadata, "tree") else metadata
  _compare_trees(stored_tree, abstract_state, where=str(step_dir), partial=partial)
  abstract_state = _place_keys(abstract_state)
  items = {
    STATE_ITEM: ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
      partial_restore=partial,
    )
  }
  if data_iterator is not None:
    if not (step_dir / DATA_ITERATOR_ITEM).exists():
      raise CheckpointError(
        f"{step_dir}: a data iterator was given but this checkpoint has no iterator state "
        f"(it was saved without data_iterator=)"
      )
    items[DATA_ITERATOR_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE_ITEM]


def _place_keys(abstract_state: Any) -> Any:
  """Gives typed PRNG key leaves a device if they have no sharding.

  Without a sharding Orbax restores a leaf as numpy, which for a typed key means its raw uint32
  data; with one it restores a typed key again.
  """

  def place(leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return leaf
    if getattr(leaf, "sharding", None) is not None:
      return leaf
    device = jax.local_devices()[0]
    return jax.ShapeDtypeStruct(
      leaf.shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device)
    )

  return jax.tree.map(place, abstract_state)


def _metric(metrics: Mapping[str, Any] | None, name: str | None) -> float | None:
  """`metrics[name]` if it is a finite number, else None."""
  value = (metrics or {}).get(name)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return value if ok else None


def _improves(value: float | None, best: float | None, mode: str) -> bool:
  if value is None:
    return False
  # Ties keep the earlier checkpoint.
  return best is None or (value > best if mode == "max" else value < best)


def _best_on_disk(
  manager: ocp.CheckpointManager, name: str | None, mode: str
) -> tuple[int | None, dict[str, Any] | None]:
  """(step, metrics) of the best step in `manager` by metric `name`, or (None, None)."""
  best_step, best_metrics = None, None
  for step in manager.all_steps():  # Increasing, so ties keep the earlier step.
    metrics = manager.metrics(step)
    if _improves(_metric(metrics, name), _metric(best_metrics, name), mode):
      best_step, best_metrics = step, metrics
  return best_step, best_metrics


# ---------------------------------------------------------------------------------------------
# Checkpointer.
# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """Latest + best checkpoints of a run, with the data iterator state.

  Usage in a loop file::

    ckpt = checkpointing.Checkpointer(workdir, best_metric="val/auc", every_steps=500)
    restored = ckpt.restore_latest(abstract_state, data_iterator=train_iter)
    ...
    ckpt.save(step, state, data_iterator=train_iter, metrics=val_metrics)
    ...
    ckpt.close()

  `state` is a pytree of jax.Arrays / numpy arrays / python scalars (e.g. a dict of
  ``nnx.to_pure_dict`` trees, optax state, step and RNG key). Restoring takes an abstract tree of
  the same structure (``jax.ShapeDtypeStruct`` with ``.sharding`` for sharded arrays, or real
  arrays) and returns arrays with those shardings.
  """

  def __init__(
    self,
    workdir: str | os.PathLike[str],
    *,
    keep_latest: int = 2,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
    every_steps: int = 1,
  ):
    """Opens (creating if needed) ``workdir/checkpoints``.

    Args:
      workdir: the run's working directory.
      keep_latest: how many of the newest checkpoints to keep for resuming.
      best_metric: key of `metrics` in `save` that picks the best checkpoint; None: no best.
      best_mode: "max" (e.g. AUC) or "min" (e.g. loss).
      async_save: write in a background thread; `save` returns once arrays are on the host,
        so the caller may donate or overwrite them.
      every_steps: `save` writes only on multiples of this (or when forced, or when Orbax
        detects a preemption), or when the step improves `best_metric`.
    """
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_latest < 1:
      raise ValueError(f"keep_latest must be >= 1, got {keep_latest}")
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    self.directory = _absolute(workdir) / CHECKPOINTS_DIR
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._every_steps = every_steps
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
      [ocp.checkpoint_managers.LatestN(n=keep_latest), _KeepStep(lambda: self._best_step)]
    )
    # The metadata (written by the first Checkpointer only) tells load_state how to rank steps.
    metadata = {"best_metric": best_metric, "best_mode": best_mode}
    self._manager = _open_manager(
      self.directory, policy=policy, metadata=metadata, async_save=async_save
    )
    # The best step survives a restart: it is found again from the metrics saved with each step.
    self._best_step, self._best_metrics = _best_on_disk(self._manager, best_metric, best_mode)

  # -- queries ---------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest saved (or being saved) step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step of the best checkpoint, or None (none yet, or no best_metric)."""
    return self._best_step

  def best_metrics(self) -> dict[str, Any] | None:
    """The metrics saved with the best checkpoint (strict JSON values), or None."""
    return None if self._best_metrics is None else dict(self._best_metrics)

  # -- save ------------------------------------------------------------------------------------

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_iterator: Any = None,
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> None:
    """Saves on `every_steps` multiples, if `force`, or if the step improves `best_metric`.

    Args:
      step: the training step the state belongs to (the number of updates applied).
      state: pytree of arrays to save.
      data_iterator: a Grain ``DatasetIterator`` (or DataLoader iterator) whose state is saved
        with the step, so that `restore_latest` resumes the same data order.
      metrics: scalars (python/numpy/jax) saved as JSON; `best_metric` is looked up here.
      force: save even off the `every_steps` grid (end of training).
    """
    step = int(step)
    metrics_json = to_json_value(dict(metrics or {}), name="metrics")
    improves = _improves(
      _metric(metrics_json, self.best_metric),
      _metric(self._best_metrics, self.best_metric),
      self.best_mode,
    )
    # The grid is decided here rather than by Orbax's interval policy, which also saves the
    # first step of every run whatever its number.
    on_grid = force or step % self._every_steps == 0 or self._manager.reached_preemption(step)
    if not (on_grid or improves):
      return
    latest = self.latest_step()
    if latest is not None and step <= latest:
      # Orbax keeps steps in save order: an older step would count as the newest. Only a run
      # that went back without restoring this workdir gets here with a new step; it is not
      # saved even if it improves the metric, so the best step stays at or before the newest.
      logging.info("Step %d is not after the newest checkpoint (%d); not saved.", step, latest)
      return
    if improves:
      # Set before saving: the preservation policy reads it and deletes the previous best.
      self._best_step, self._best_metrics = step, metrics_json
      logging.info(
        "New best %s=%s at step %d.", self.best_metric, metrics_json[self.best_metric], step
      )
    items = {
      STATE_ITEM: ocp.args.PyTreeSave(state),
      METRICS_ITEM: ocp.args.JsonSave(metrics_json),
    }
    if data_iterator is not None:
      items[DATA_ITERATOR_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  # -- restore ---------------------------------------------------------------------------------

  def restore_latest(
    self, abstract_state: Any, *, data_iterator: Any = None
  ) -> tuple[int, Any] | None:
    """Restores the newest checkpoint; None if there is none.

    Args:
      abstract_state: tree like the saved state: ``jax.ShapeDtypeStruct`` (with ``.sharding`` for
        device arrays; without, a leaf comes back as numpy) or real arrays.
      data_iterator: a fresh Grain iterator of the same pipeline; its state is set in place.

    Returns:
      (step, state), or None.

    Raises:
      CheckpointError: naming the step directory, if the tree does not match.
    """
    self.wait_until_finished()
    step = self.latest_step()
    if step is None:
      return None
    state = _restore_state(self._manager, step, abstract_state, data_iterator=data_iterator)
    return step, state

  def restore_best(self, abstract_state: Any) -> tuple[int, Any] | None:
    """Restores the best checkpoint; None if there is none (or no best_metric was given)."""
    self.wait_until_finished()
    if self._best_step is None:
      return None
    return self._best_step, _restore_state(self._manager, self._best_step, abstract_state)

  def wait_until_finished(self) -> None:
    """Blocks until asynchronous saves have been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Loading another run's checkpoint (config.init_from).
# ---------------------------------------------------------------------------------------------


def _is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / STATE_ITEM).exists()


def _has_steps(path: epath.Path) -> bool:
  return path.is_dir() and any(_is_step_dir(child) for child in path.iterdir())


def _resolve(path: epath.Path, which: str) -> tuple[epath.Path, int | None]:
  """Finds (manager directory, step or None) for a workdir, its checkpoints dir or a step dir."""
  # Former two-manager workdirs (checkpoints/{latest,best}/<step>) are not supported.
  if _is_step_dir(path):
    return path.parent, int(path.name)
  candidates = [path / CHECKPOINTS_DIR, path]
  for candidate in candidates:
    if _has_steps(candidate):
      return candidate, None
  looked = ", ".join(str(c) for c in candidates)
  raise CheckpointError(f"{path}: no '{which}' checkpoint found (looked in {looked})")


def _absolute(path: str | os.PathLike[str]) -> epath.Path:
  """Orbax wants absolute paths; gs:// and the like already are."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def load_state(
  path_or_workdir: str | os.PathLike[str],
  abstract_state: Any,
  *,
  which: str = "best",
  partial: bool = False,
) -> Any:
  """Loads the state of another run's checkpoint (for config.init_from).

  Args:
    path_or_workdir: a run's workdir, its ``checkpoints`` directory, or one step directory
      (``.../checkpoints/1200``).
    abstract_state: the tree to restore into (``jax.ShapeDtypeStruct`` with shardings, or
      arrays); the checkpoint's tree must match it (same keys, same shapes).
    which: "best" (by the metric the run's Checkpointer ranked with) or "latest" (ignored for a
      step directory).
    partial: restore only the keys of `abstract_state` (e.g. ``{"params": ...}`` out of a full
      train state); keys missing from the checkpoint are still an error.

  Returns:
    The restored state tree.

  Raises:
    CheckpointError: naming the path, when there is no checkpoint or the tree does not match.
  """
  if which not in (BEST, LATEST):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  path = _absolute(path_or_workdir)
  if not path.exists():
    raise CheckpointError(f"{path}: does not exist")
  manager_dir, step = _resolve(path, which)
  manager = _open_manager(manager_dir, read_only=True)
  try:
    if step is None and which == LATEST:
      step = manager.latest_step()
    elif step is None:
      ranking = manager.metadata().custom_metadata or {}
      name, mode = ranking.get("best_metric"), ranking.get("best_mode", "max")
      step, _ = _best_on_disk(manager, name, mode)
      if step is None:
        raise CheckpointError(
          f"{manager_dir}: no 'best' checkpoint (no step has a finite best metric, {name!r}); "
          f"checkpoints exist (pass which='latest' for the newest)"
        )
    return _restore_state(manager, step, abstract_state, partial=partial)
  finally:
    manager.close()


def abstract_like(state: Any) -> Any:
  """The abstract tree (``jax.ShapeDtypeStruct`` with shardings) of a concrete state tree."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def metrics_as_json(metrics: Mapping[str, Any]) -> str:
  """Metrics as one strict-JSON string (non-finite values as null)."""
  return json.dumps(to_json_value(dict(metrics), name="metrics"), allow_nan=False, sort_keys=True)
