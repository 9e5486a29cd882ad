"""Classification evaluator: any predict function over any collection, into the standard report.

Every regime (supervised, fusion, GAN rebalancing, SSL fine-tuning, multimodal stacking) hands
the protocol driver a *predictor*: ``predictor(collection) -> (n, C) class probabilities`` of its
selected model. Everything after that is here and shared:

* `predict_collection` runs a jitted ``(variables, batch) -> probabilities`` function over every
  record exactly once (batches are dicts: one image, two modalities, masks: whatever the batch
  function yields), collectively on every process;
* `Predictions` carries the probabilities with what a report needs from the records: labels,
  patients, bootstrap clusters (patient joined with near-duplicate group, see
  `busjax.data.splits.with_groups`), copy-in-train flags and the reader's BI-RADS;
* `write_report` writes one report (JSON, CSV, PNGs) and returns the summary entry;
* `concatenate` pools folds' test predictions for the out-of-fold report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from busjax import sharding
from busjax.data import pipeline, records
from busjax.evaluators import calibration, report

Predictor = Callable[[records.Collection], np.ndarray]


def predict_collection(
  predict,
  variables,
  collection: records.Collection,
  *,
  mesh,
  batch_size: int,
  batches: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None,
  image_size: int | None = None,
) -> np.ndarray:
  """Class probabilities (n, C) of every record, in collection order.

  Args:
    predict: `sharding.jit_predict(apply_fn, mesh)`: ``(variables, batch) -> (probs, index,
      valid)`` with replicated outputs.
    variables: whatever `apply_fn` takes (parameters and statistics of the selected model).
    collection: the records.
    mesh: the device mesh; the global batch is rounded down to a multiple of its size.
    batch_size: global evaluation batch.
    batches: ``batches(collection, batch_size=, process_index=, process_count=)`` yielding dicts
      of this process's rows with ``index`` and ``valid``; default `pipeline.eval_batches` at
      `image_size`.
    image_size: for the default batches.

  Raises:
    RuntimeError: if some record was never predicted (a batch function bug).
  """
  if batches is None:
    if image_size is None:
      raise ValueError("predict_collection needs image_size= for the default eval batches")

    def batches(collection, **kwargs):
      return pipeline.eval_batches(collection, image_size=image_size, **kwargs)

  batch_size = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
  probs, seen = None, np.zeros(len(collection), bool)
  local_batches = batches(
    collection,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  for batch in local_batches:
    arrays = sharding.host_to_global(
      {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}, mesh
    )
    out, index, valid = jax.device_get(predict(variables, arrays))
    if probs is None:
      probs = np.zeros((len(collection), out.shape[-1]), np.float32)
    probs[index[valid]] = out[valid]
    seen[index[valid]] = True
  if not seen.all():
    raise RuntimeError(f"{collection.name}: evaluation missed {int((~seen).sum())} records")
  return probs


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Probabilities of one evaluated set with the per-image facts a report needs."""

  source: str
  synthetic: bool
  class_names: tuple[str, ...]
  ids: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  patient_ids: np.ndarray
  clusters: np.ndarray
  copy_in_train: np.ndarray | None = None
  birads: np.ndarray | None = None
  devices: np.ndarray | None = None  # The scanner per image, where the source records it.

  @property
  def y_malignant(self) -> np.ndarray:
    return (self.labels == records.MALIGNANT).astype(np.int32)

  @property
  def p_malignant(self) -> np.ndarray:
    return self.probs[:, records.MALIGNANT]

  def __len__(self) -> int:
    return len(self.ids)


def _meta_column(collection: records.Collection, key: str) -> list[Any] | None:
  values = [r.meta.get(key) for r in collection.records]
  return None if any(v in (None, "") for v in values) else values


def predictions(collection: records.Collection, probs: np.ndarray) -> Predictions:
  """Joins `probs` (n, C) with the records' labels, patients, clusters, leak flags, BI-RADS."""
  probs = np.asarray(probs, np.float32)
  if probs.shape[0] != len(collection):
    raise ValueError(f"{collection.name}: {probs.shape[0]} predictions for {len(collection)}")
  patients = collection.patient_ids.astype(str)
  clusters = _meta_column(collection, "cluster")
  copies = _meta_column(collection, "copy_in_train")
  birads = _meta_column(collection, "birads")
  devices = _meta_column(collection, "device")
  return Predictions(
    source=collection.name,
    synthetic=bool(collection.synthetic),
    class_names=tuple(collection.class_names),
    ids=np.asarray([r.id for r in collection.records], str),
    labels=collection.labels,
    probs=probs,
    patient_ids=patients,
    clusters=patients if clusters is None else np.asarray(clusters, str),
    copy_in_train=None if copies is None else np.asarray(copies, bool),
    birads=None if birads is None else np.asarray(birads, object),
    devices=None if devices is None else np.asarray(devices, str),
  )


def concatenate(parts: list[Predictions], source: str) -> Predictions:
  """Pools disjoint sets (e.g. every fold's test part) into one."""
  if not parts:
    raise ValueError("nothing to concatenate")

  def join(name):
    values = [getattr(p, name) for p in parts]
    return None if any(v is None for v in values) else np.concatenate(values)

  return Predictions(
    source=source,
    synthetic=any(p.synthetic for p in parts),
    class_names=parts[0].class_names,
    ids=join("ids"),
    labels=join("labels"),
    probs=join("probs"),
    patient_ids=join("patient_ids"),
    clusters=join("clusters"),
    copy_in_train=join("copy_in_train"),
    birads=join("birads"),
    devices=join("devices"),
  )


def _cluster_definition(preds: Predictions) -> str:
  """ "patient" when the clusters partition the images exactly as patients do."""
  joint = len(set(zip(preds.clusters.tolist(), preds.patient_ids.tolist(), strict=True)))
  if joint == len(set(preds.clusters.tolist())) == len(set(preds.patient_ids.tolist())):
    return "patient"
  return "patient joined with near-duplicate group"


def write_report(
  out_dir: str,
  name: str,
  preds: Predictions,
  *,
  provenance: Mapping[str, Any],
  threshold: float | None,
  bootstrap: int,
  temperature: tuple[float, str] | None = None,
) -> dict[str, Any]:
  """Writes ``out_dir/name/`` (report.json, predictions.csv, PNGs); returns its summary entry.

  `temperature`: (T, the set it was fitted on); the report then also gives the calibration of
  the temperature-scaled probabilities (`calibration.apply_temperature`).

  The reader's point is added when every image has a BI-RADS (BI-RADS >= 4, biopsy recommended,
  is the reader's "malignant" call, e.g. BUS-BRA's radiologists).
  """
  reader = None
  if preds.birads is not None and 0 < preds.y_malignant.sum() < len(preds):
    reader = {"birads": preds.birads, "threshold": 4}
  result = report.write_report(
    out_dir,
    name=name,
    provenance=provenance,
    y=preds.y_malignant,
    p=preds.p_malignant,
    patient_ids=preds.patient_ids,
    clusters=preds.clusters,
    cluster_definition=_cluster_definition(preds),
    copy_in_train=preds.copy_in_train,
    ids=preds.ids,
    threshold=threshold,
    reader=reader,
    class_names=preds.class_names,
    bootstrap=bootstrap,
    subgroups=None if preds.devices is None else {"device": preds.devices},
    calibrated=None
    if temperature is None
    else {
      "p": calibration.apply_temperature(preds.probs, temperature[0])[:, records.MALIGNANT],
      "temperature": temperature[0],
      "fitted_on": temperature[1],
    },
  )
  entry = {
    "auc": result["auc"]["value"],
    "auc_ci": result["auc"]["bootstrap_ci"],
    "source": preds.source,
    "images": len(preds),
    "clusters": result["bootstrap"]["clusters"],
    "report": os.path.join(out_dir, name, "report.json"),
  }
  if "subgroups" in result:
    entry["auc_by_device"] = {k: g["auc"] for k, g in result["subgroups"]["device"].items()}
  point = result["operating_points"].get("at_threshold")
  if point is not None:
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
      entry[key] = point[key]
  entry["ece"] = result["calibration"]["ece"]
  if "temperature_scaled" in result["calibration"]:
    entry["ece_temperature_scaled"] = result["calibration"]["temperature_scaled"]["ece"]
  if "leakage" in result:
    leakage = result["leakage"]
    entry["images_with_copy_in_train"] = leakage["images_with_copy_in_train"]
    entry["auc_leak_free"] = leakage["auc_leak_free"]
    entry["auc_leak_free_ci"] = leakage["auc_leak_free_bootstrap_ci"]
  return entry


def save_predictions(path: str, preds: Predictions) -> None:
  """The probabilities with ids, labels, patients and clusters, as a (pickle-free) .npz."""
  arrays = {
    "ids": preds.ids,
    "labels": preds.labels,
    "probs": preds.probs,
    "p_malignant": preds.p_malignant,
    "y_malignant": preds.y_malignant,
    "patient_ids": preds.patient_ids,
    "clusters": preds.clusters,
  }
  if preds.copy_in_train is not None:
    arrays["copy_in_train"] = preds.copy_in_train
  if preds.devices is not None:
    arrays["devices"] = preds.devices
  np.savez(path, **arrays)
