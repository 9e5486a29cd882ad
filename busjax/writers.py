"""Metric output of a run: JSONL + TensorBoard events, and a one-line progress log.

Only process 0 writes (other processes get writers whose methods do nothing), so a multi-process
run produces one ``metrics.jsonl`` and one set of event files.

- ``workdir/metrics.jsonl``: one strict-JSON object per line,
  ``{"step": 120, "split": "train", "wall_time": 1.7e9, "loss": 0.41, ...}``; non-finite values
  are written as ``null`` (NaN/Infinity are not JSON). The file is appended to, so a resumed run
  continues it (steps between the last checkpoint and a crash then appear twice; readers keep
  the last line per (step, split)).
- ``workdir/tensorboard/``: tensorboardX event files (``clu.metric_writers`` would import
  TensorFlow); tags are ``<split>/<name>``.
- ``workdir/hparams.json``: the run's config, written once by `write_hparams`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
HPARAMS_FILE = "hparams.json"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("step", "split", "wall_time")


def to_scalar(value: Any, *, name: str = "value") -> float | int | bool | None:
  """A python scalar for a python/numpy/jax scalar; non-finite floats become None.

  Raises:
    ValueError: naming `name`, for arrays with more than one element or non-numeric values.
  """
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
      raise ValueError(f"{name}: expected a scalar, got an array of shape {array.shape}")
    value = array.reshape(()).item()
  if isinstance(value, (bool, int)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  raise ValueError(f"{name}: expected a number, got {type(value).__name__}")


def _jsonable(value: Any) -> Any:
  """Config values as strict JSON; anything JSON cannot hold becomes its repr."""
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    return _jsonable(np.asarray(value).item())
  return repr(value)


def _as_dict(config: Any) -> dict[str, Any]:
  # ml_collections.ConfigDict and FrozenConfigDict have to_dict(); plain mappings pass through.
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"hparams must be a mapping or ConfigDict, got {type(config).__name__}")
  return dict(config)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix=f"{name}."))
    else:
      flat[name] = value
  return flat


def _tensorboardx():
  """tensorboardX, imported here (processes that never write do not pay for it) and without
  torch: where torch is installed (Colab, or the speed benchmark's extra) tensorboardX imports it
  only to accept torch tensors, which busjax never passes, and that import took 0.9 s of every
  launch (1.3 s under a profiler; `python -X importtime -c "import tensorboardX"`). Another
  thread importing torch for the first time during these lines would see an ImportError; busjax
  creates its writers on the main thread before any work starts."""
  if "torch" in sys.modules:  # Already paid for.
    import tensorboardX

    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def _is_process_zero(process_index: int | None) -> bool:
  return (jax.process_index() if process_index is None else process_index) == 0


class MetricWriter:
  """Writes scalars, text and hyperparameters to JSONL and TensorBoard, on process 0 only."""

  def __init__(
    self,
    workdir: str | os.PathLike[str],
    *,
    process_index: int | None = None,
    tensorboard: bool = True,
  ):
    """Opens ``workdir/metrics.jsonl`` for appending and a TensorBoard writer.

    Args:
      workdir: the run's working directory (created if needed).
      process_index: this process's index; default ``jax.process_index()``. Non-zero: no-op.
      tensorboard: also write TensorBoard event files.
    """
    self.workdir = os.fspath(workdir)
    self.active = _is_process_zero(process_index)
    self._jsonl = None
    self._tensorboard = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    # Line-buffered: a killed run keeps every line it wrote (read_metrics drops the ones a resumed
    # run wrote again).
    self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), "a", buffering=1, encoding="utf-8")
    if tensorboard:
      self._tensorboard = _tensorboardx().SummaryWriter(
        logdir=os.path.join(self.workdir, TENSORBOARD_DIR)
      )

  def _write_line(self, record: Mapping[str, Any]) -> None:
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, split: str = "train") -> None:
    """Writes one JSONL line ``{"step", "split", "wall_time", **scalars}`` and TB scalars.

    Args:
      step: global training step.
      scalars: name -> python/numpy/jax scalar (device values are fetched here).
      split: "train", "val", "test", ...; TB tags are ``<split>/<name>``.

    Raises:
      ValueError: naming the metric, for a non-scalar value or a reserved name.
    """
    if not self.active:
      return
    values = {}
    for name, value in scalars.items():
      if name in _RESERVED_KEYS:
        raise ValueError(f"metric name {name!r} is reserved in {METRICS_FILE}")
      values[str(name)] = to_scalar(value, name=f"{split}/{name}")
    self._write_line({"step": int(step), "split": split, "wall_time": time.time(), **values})
    if self._tensorboard is not None:
      for name, value in values.items():
        tag = name if name.startswith(f"{split}/") else f"{split}/{name}"
        # TensorBoard shows NaN; JSONL has null because strict JSON has no NaN.
        self._tensorboard.add_scalar(tag, float("nan") if value is None else value, int(step))

  def write_text(self, step: int, name: str, text: str) -> None:
    """Writes a text record (JSONL ``split: "text"``) and a TensorBoard text summary."""
    if not self.active:
      return
    self._write_line(
      {"step": int(step), "split": "text", "wall_time": time.time(), "name": name, "text": text}
    )
    if self._tensorboard is not None:
      self._tensorboard.add_text(name, text, int(step))

  def write_hparams(self, config: Any) -> None:
    """Writes the config to ``hparams.json`` and as a TensorBoard text table.

    Args:
      config: an ``ml_collections.ConfigDict`` or a (nested) mapping.
    """
    if not self.active:
      return
    hparams = _jsonable(_as_dict(config))
    path = os.path.join(self.workdir, HPARAMS_FILE)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(hparams, f, indent=2, sort_keys=True, allow_nan=False)
      f.write("\n")
    if self._tensorboard is not None:
      rows = [f"| {k} | {json.dumps(v)} |" for k, v in sorted(_flatten(hparams).items())]
      self._tensorboard.add_text("hparams", "\n".join(["| name | value |", "|---|---|", *rows]), 0)

  def flush(self) -> None:
    """Pushes buffered lines and events to disk."""
    if not self.active:
      return
    self._jsonl.flush()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files; later writes are errors."""
    if not self.active or self._jsonl is None:
      return
    self.flush()
    self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
    self._jsonl = None
    self.active = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads ``workdir/metrics.jsonl`` back (one dict per line), naming the line on bad JSON.

  A run resumed from its last checkpoint writes the steps after that checkpoint again: for each
  (step, split, name) only the last line is kept, in the order the lines were last written.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  records = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
      key = (record.get("step"), record.get("split"), record.get("name"))
      records.pop(key, None)
      records[key] = record
  return list(records.values())


# ---------------------------------------------------------------------------------------------
# Progress line.
# ---------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
  """``4m12s``, ``1h03m``, ``12s``; ``?`` when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format_value(value: Any) -> str:
  scalar = to_scalar(value)
  if scalar is None:
    return "nan"
  if isinstance(scalar, bool) or isinstance(scalar, int):
    return str(scalar)
  return f"{scalar:.3g}"


class ProgressLogger:
  """Logs ``step 120/2000  loss 0.412  grad_norm 1.3  312.4 img/s  ETA 4m12s`` every N steps.

  Throughput and ETA use the interval since the previous logged line, so compilation time only
  affects the first line.
  """

  def __init__(
    self,
    total_steps: int,
    *,
    every: int = 100,
    batch_size: int | None = None,
    start_step: int = 0,
    logger: Callable[[str], Any] | None = None,
    process_index: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    """Starts the clock.

    Args:
      total_steps: the step count the run ends at.
      every: log when ``step % every == 0`` and at the last step.
      batch_size: global batch size, for img/s; None leaves throughput out.
      start_step: the step the run (re)starts from.
      logger: called with each line; default ``absl.logging.info`` (``print`` also works).
      process_index: default ``jax.process_index()``; non-zero processes log nothing.
      clock: seconds; injectable for tests.
    """
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    self.total_steps = int(total_steps)
    self.every = int(every)
    self.batch_size = batch_size
    self.active = _is_process_zero(process_index)
    self._logger = logger or logging.info
    self._clock = clock
    self._last_step = int(start_step)
    self._last_time = clock()

  def __call__(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
    """Logs and returns the line if `step` is due, else returns None (and fetches nothing)."""
    step = int(step)
    if not self.active or (step % self.every != 0 and step != self.total_steps):
      return None
    now = self._clock()
    steps_done = step - self._last_step
    elapsed = now - self._last_time
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{name} {_format_value(value)}" for name, value in (metrics or {}).items()]
    if steps_done > 0 and elapsed > 0:
      if self.batch_size:
        parts.append(f"{steps_done * self.batch_size / elapsed:.1f} img/s")
      eta = (self.total_steps - step) * elapsed / steps_done
      parts.append(f"ETA {format_duration(eta)}")
    self._last_step, self._last_time = step, now
    line = "  ".join(parts)
    self._logger(line)
    return line
