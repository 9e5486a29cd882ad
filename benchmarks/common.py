"""Pieces the quality benchmarks share: config overrides, resumable JSON, a run's stored
predictions and the metrics computed from them (clustered CIs, paired AUC differences)."""

from __future__ import annotations

import ast
import json
import os
import platform
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import flags

from busjax.evaluators import metrics


def apply_overrides(config, overrides: Iterable[str]):
  """Applies `a.b=value` overrides (the value a Python literal) to `config` in place."""
  for override in overrides:
    key, _, value = override.partition("=")
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = ast.literal_eval(value)
  return config


def write_json_atomic(path: str | None, data: Any) -> None:
  """Writes `data` to `path` (nothing if None) via a temporary file, so a kill mid-write never
  leaves a truncated file where the finished runs were recorded."""
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


def load_predictions(run_dir: str, name: str) -> dict[str, np.ndarray] | None:
  """The predictions a run's protocol saved for report `name` (reports/<name>_predictions.npz)."""
  path = os.path.join(run_dir, "reports", f"{name}_predictions.npz")
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as f:
    keys = ("ids", "y_malignant", "p_malignant", "clusters", "copy_in_train", "devices")
    return {k: f[k] for k in keys if k in f}


def set_metrics(preds: dict[str, np.ndarray], threshold: float | None, bootstrap: int) -> dict:
  """AUC with a clustered bootstrap CI, the AUC without images that have a copy in train, and
  balanced accuracy / sensitivity / specificity at `threshold` (chosen on val)."""
  y, p = preds["y_malignant"], preds["p_malignant"]
  ci = metrics.bootstrap_ci(metrics.roc_auc, y, p, clusters=preds["clusters"], n=bootstrap)
  out = {"images": int(len(y)), "auc": metrics.roc_auc(y, p), "auc_ci": [ci.lo, ci.hi]}
  copies = preds.get("copy_in_train")
  if copies is not None and copies.any():  # BreastMNIST's split: test images copied in train.
    free = ~copies.astype(bool)
    out["images_with_copy_in_train"] = int(copies.sum())
    out["auc_leak_free"] = metrics.roc_auc(y[free], p[free])
  if threshold is not None:
    at = metrics.threshold_metrics(y, p, threshold)
    out.update({k: at[k] for k in ("balanced_accuracy", "sensitivity", "specificity")})
  return out


def paired_auc_difference(a: dict, b: dict, bootstrap: int) -> dict | None:
  """AUC(a) - AUC(b) on the same images: paired clustered bootstrap CI (the same resampled
  clusters for both, so near-duplicates count once) and DeLong's paired p-value (which assumes
  independent images: optimistic where copies exist). None if the images differ."""
  if a is None or b is None or not np.array_equal(a["ids"], b["ids"]):
    return None
  y = a["y_malignant"]
  scores = np.stack([a["p_malignant"], b["p_malignant"]], axis=1)

  def diff(y_, s):
    return metrics.roc_auc(y_, s[:, 0]) - metrics.roc_auc(y_, s[:, 1])

  def diff_resampled(y_, s, counts):  # All resamples at once (`metrics.bootstrap_ci`).
    aucs = metrics.roc_auc_resampled(y_, s, counts)
    return aucs[:, 0] - aucs[:, 1]

  diff.resampled = diff_resampled
  ci = metrics.bootstrap_ci(diff, y, scores, clusters=a["clusters"], n=bootstrap)
  test = metrics.delong_test(y, scores[:, 0], scores[:, 1])
  return {
    "auc_diff": test["diff"],
    "auc_diff_ci_clustered": [ci.lo, ci.hi],
    "delong_p": test["p_value"],
  }


def start(workdir: str, output: str | None) -> list[dict]:
  """Quiet logs, a compilation cache in `workdir`, and the rows a previous run of the same
  command already recorded in `output` (the benchmark skips them)."""
  from absl import logging

  from busjax import sharding

  logging.set_verbosity(logging.WARNING)
  sharding.enable_compilation_cache(os.path.join(workdir, "jax_cache"))
  if output and os.path.exists(output):
    with open(output) as f:
      return json.load(f)["rows"]
  return []


def machine() -> dict[str, Any]:
  """Where a benchmark ran (every JSON records it)."""
  import jax

  return {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}


def output_flag(help_text: str) -> flags.FlagHolder:
  """Every benchmark's ``--output``, defined once per process: a test module importing two
  benchmarks (both defining it) shares one flag instead of failing at import."""
  if "output" in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS["output"])
  return flags.DEFINE_string("output", None, help_text)
