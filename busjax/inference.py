"""A finished classifier run, loaded for prediction and explanation; image inputs for the CLIs.

`load_run(workdir)` rebuilds the model from the run's config.json and restores the weights the
run's reports evaluated (its selected checkpoint: the EMA weights and their BatchNorm statistics
when the run kept an EMA), with the run's val threshold and temperature from summary.json.
`read_inputs` turns a folder, image files, or a CSV with an image-path column into images, naming
and skipping what cannot be read, so one bad file never stops a batch.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from busjax import checkpointing, sharding
from busjax.data import augment, records, sources
from busjax.evaluators import calibration
from busjax.trainers import state_utils, supervised

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass
class LoadedRun:
  """A trained classifier in evaluation mode, and what its reports used to decide."""

  workdir: str
  config: ml_collections.ConfigDict
  model: nnx.Module
  class_names: tuple[str, ...]
  threshold: float | None  # Chosen on the run's val part (Youden); None if it had none.
  temperature: float | None  # Fitted on the run's val part; None if it had none.
  source: str  # What it was trained on (its summary's `trained_on`).
  # A seed ensemble's other members (same architecture): probabilities are the mean over
  # `model` and these, as the run's reports computed them.
  ensemble: tuple[nnx.Module, ...] = ()

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def decision_threshold(self) -> float:
    """p(malignant) at or above which the run calls an image malignant (0.5 without a val)."""
    return self.threshold if self.threshold is not None else 0.5

  def decided_class(self, probs: np.ndarray) -> np.ndarray:
    """(N,) int32 class index the run decides for each row of `probs` (N, C)."""
    malignant = records.MALIGNANT  # Binary runs: the other index is the benign class.
    called = probs[:, malignant] >= self.decision_threshold
    return np.where(called, malignant, 1 - malignant).astype(np.int32)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 (N, H, W[, 1]) -> the model's float input."""
    return supervised._preprocess(images, self.config.model)  # noqa: SLF001

  @functools.cached_property
  def black(self) -> float:
    """A black pixel in the model's input space ("no signal"; also the padding of a scan)."""
    return float(self.preprocess(jnp.zeros((1, 1, 1, 1), jnp.uint8)).min())

  def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Grey uint8 images of any size -> uint8 (N, S, S, 1) as the run evaluated them."""
    size = self.image_size
    out = np.zeros((len(images), size, size, 1), np.uint8)
    for i, image in enumerate(images):
      out[i, ..., 0] = augment.resize_pad(image, size)
    return out

  def probabilities(self, batch_size: int = 16, *, preprocessed: bool = False):
    """``images -> probs (N, C)``, jitted on fixed-size batches (the last one padded): one
    compile whatever N is. Images are uint8 (N, S, S, 1), or with `preprocessed` the model's
    float input (what saliency maps and deletion curves perturb)."""
    graph, state = nnx.split(self.model)
    states = [state] + [nnx.split(m)[1] for m in self.ensemble]

    @sharding.jit
    def probs(states, images):
      x = images if preprocessed else self.preprocess(images)
      members = [
        supervised.class_probabilities(nnx.merge(graph, s), x, self.config.model) for s in states
      ]
      return sum(members) / len(members)

    def run(images: np.ndarray) -> np.ndarray:
      return batched(
        lambda b: probs(states, b), images, batch_size=batch_size, width=len(self.class_names)
      )

    return run

  def predictor(self, batch_size: int = 16):
    """``uint8 (N, S, S, 1) -> (probs (N, C), temperature-scaled probs (N, C))``."""
    probabilities = self.probabilities(batch_size)

    def run(images: np.ndarray):
      p = probabilities(images)
      scaled = p if self.temperature is None else calibration.apply_temperature(p, self.temperature)
      return p, scaled

    return run


def reestimate_batchnorm(run: LoadedRun, images: np.ndarray, batch_size: int = 32) -> LoadedRun:
  """`run` with every BatchNorm's statistics re-estimated on `images` (uint8 (N, S, S, 1), e.g.
  another scanner's unlabelled scans): AdaBN (Li et al. 2016), the same precise-BN averaging over
  fixed batches that evaluates EMA weights in training. Weights are unchanged; the images' labels
  are never needed. Full batches only (a padded one would count black images), or one batch of
  all the images when there are fewer than `batch_size`."""
  if len(images) == 0:
    raise ValueError("reestimate_batchnorm: no images")
  defs = supervised.ModelDefs(
    train=None, eval=None, bn_refresh=supervised.bn_refresh_graph(run.model)
  )
  refresh = supervised.make_bn_refresh(defs, run.config)
  size = min(batch_size, len(images))
  batches = [jnp.asarray(images[i : i + size]) for i in range(0, len(images) - size + 1, size)]

  def refreshed(model):
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    model = nnx.merge(graph, params, refresh(params, rest, batches))
    model.eval()
    return model

  return dataclasses.replace(
    run, model=refreshed(run.model), ensemble=tuple(refreshed(m) for m in run.ensemble)
  )


def batched(fn, *arrays: np.ndarray, batch_size: int = 16, width: int | None = None) -> np.ndarray:
  """`fn` over fixed-size batches of the arrays' leading axis (the last one zero-padded, the
  padding dropped from the result): one compile for any length."""
  n = len(arrays[0])
  out = []
  for start in range(0, n, batch_size):
    chunks = [a[start : start + batch_size] for a in arrays]
    padded = [np.zeros((batch_size, *a.shape[1:]), a.dtype) for a in arrays]
    for p, c in zip(padded, chunks, strict=True):
      p[: len(c)] = c
    out.append(np.asarray(fn(*padded))[: len(chunks[0])])
  if not out:
    return np.zeros((0,) if width is None else (0, width), np.float32)
  return np.concatenate(out)


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise records.DataError(f"{workdir}: not a busjax run (no config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str) -> LoadedRun:
  """The selected model of a finished classifier run (supervised, fusion, GAN-rebalanced,
  SSL fine-tuned: any run whose checkpoints hold ``params``/``rest``), in evaluation mode.

  Raises:
    records.DataError / checkpointing.CheckpointError: one line naming the run and the problem.
  """
  config = _read_config(workdir)
  summary_path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  # (checkpoint folder, the summary entry that says which checkpoint was reported) per model.
  runs = [(workdir, summary)]
  if summary.get("rounds"):  # GAN rebalancing: the last round's classifier is the reported one.
    runs = [
      (os.path.join(workdir, f"round{summary['rounds'][-1]['round']}", "classifier"), summary)
    ]
  if summary.get("ensemble_members", 1) > 1:  # A seed ensemble: every member, in its folder.
    runs = [(os.path.join(workdir, f"member{k}"), m) for k, m in enumerate(summary["members"])]
  class_names = sources.class_names(config.data.get("classes", "binary"))
  models = [_load_model(config, run_dir, entry, len(class_names)) for run_dir, entry in runs]
  return LoadedRun(
    workdir=workdir,
    config=config,
    model=models[0],
    class_names=class_names,
    threshold=summary.get("threshold"),
    temperature=summary.get("temperature"),
    source=_trained_on(workdir, summary),
    ensemble=tuple(models[1:]),
  )


def _load_model(config, run_dir: str, summary: dict, num_classes: int) -> nnx.Module:
  """The model of `config` with the weights its reports evaluated, from `run_dir`'s checkpoints
  (`summary["selected_checkpoint"]` says best or latest)."""
  model_config = config.model
  if model_config.get("pretrained"):
    model_config.pretrained = None  # The run's own weights replace them.
  model = supervised.create_model(model_config, num_classes, int(config.get("seed", 0)))
  model.eval()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"params": params, "rest": rest}
  abstract = state_utils.abstract_flat_state(state)
  # The reports evaluated the EMA weights (with their refreshed statistics) when there was one.
  stored = {"params.": "ema.", "rest.": "ema_rest."} if config.train.get("ema_decay") else {}
  source = {_rename(k, stored): v for k, v in abstract.items()}
  which = "best" if summary.get("selected_checkpoint", "best").startswith("best") else "latest"
  flat = checkpointing.load_state(run_dir, source, which=which, partial=True)
  restored = state_utils.unflatten_state(state, {k: flat[_rename(k, stored)] for k in abstract})
  model = nnx.merge(graph, restored["params"], restored["rest"])
  model.eval()
  logging.info("Loaded %s (%s checkpoint) from %s.", model_config.name, which, run_dir)
  return model


def _trained_on(workdir: str, summary: dict) -> str:
  """What the run trained on: its summary, else its test report's provenance."""
  if summary.get("trained_on"):
    return str(summary["trained_on"])
  for name in ("test", "val"):
    path = os.path.join(workdir, "reports", name, "report.json")
    if os.path.isfile(path):
      with open(path) as f:
        provenance = json.load(f).get("provenance", {})
      if provenance.get("trained_on"):
        synthetic = " (SYNTHETIC)" if provenance.get("synthetic") else ""
        return str(provenance["trained_on"]) + synthetic
  return "unknown"


def _rename(name: str, mapping: dict[str, str]) -> str:
  for old, new in mapping.items():
    if name.startswith(old):
      return new + name[len(old) :]
  return name


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
  paths: list[str]  # Readable images, in input order.
  images: list[np.ndarray]  # uint8 grey (H, W), one per path.
  masks: list[np.ndarray | None]  # Lesion masks {0, 1} where given (same size as the image).
  skipped: list[str]  # One line per input that could not be used, naming it.


def _listed(inputs: Sequence[str]) -> list[tuple[str, str | None]]:
  """(image path, mask path or None) from folders, image files and CSVs (columns ``path`` or
  ``image``, optional ``mask``; relative paths are relative to the CSV)."""
  out = []
  for item in inputs:
    if os.path.isdir(item):
      names = sorted(n for n in os.listdir(item) if n.lower().endswith(IMAGE_SUFFIXES))
      out += [(os.path.join(item, n), None) for n in names if "_mask" not in n.lower()]
    elif item.lower().endswith(".csv"):
      base = os.path.dirname(os.path.abspath(item))
      with open(item, newline="") as f:
        reader = csv.DictReader(f)
        column = next((c for c in ("path", "image") if c in (reader.fieldnames or [])), None)
        if column is None:
          raise records.DataError(f"{item}: needs a 'path' or 'image' column")
        for row in reader:
          mask = row.get("mask") or None
          out.append(
            (
              os.path.join(base, row[column]),
              None if mask is None else os.path.join(base, mask),
            )
          )
    else:
      out.append((item, None))
  return out


def read_inputs(inputs: Sequence[str]) -> Inputs:
  """Reads every image (and mask) the inputs name; unreadable ones are named and skipped."""
  paths, images, masks, skipped = [], [], [], []
  for path, mask_path in _listed(inputs):
    try:
      image = records.read_image_file(path)
      mask = None
      if mask_path is not None:
        mask = (records.read_image_file(mask_path) > 0).astype(np.uint8)
        if mask.shape != image.shape:
          raise records.DataError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {path} is "
            f"{image.shape[1]}x{image.shape[0]}"
          )
    except records.DataError as e:
      skipped.append(str(e))
      logging.warning("Skipped: %s", e)
      continue
    paths.append(path)
    images.append(image)
    masks.append(mask)
  return Inputs(paths, images, masks, skipped)


def run_cli(body: Callable[[], dict]) -> dict | None:
  """A CLI's work: a data or checkpoint problem is one line on stderr (None returned), and every
  skipped input is named there too."""
  try:
    result = body()
  except (records.DataError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return None
  for line in result["skipped"]:
    print(f"skipped: {line}", file=sys.stderr)
  return result


def run_provenance(run: LoadedRun) -> dict[str, Any]:
  return {
    "run": os.path.abspath(run.workdir),
    "model": str(run.config.model.name),
    "trained_on": run.source,
    "synthetic_training_data": "SYNTHETIC" in run.source.upper() or "phantom" in run.source,
    "threshold": run.threshold,
    "temperature": run.temperature,
    "ensemble_members": 1 + len(run.ensemble),
  }
