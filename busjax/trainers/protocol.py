"""The evaluation protocol every regime shares: one split, k-fold CV, external sources.

A regime module provides ``train_split(config, workdir, data) -> Trained``: train on
``data["train"]``, select on ``data["val"]``, and hand back a predictor of the selected model.
Its ``train_and_evaluate(config, workdir)`` is then one line::

  return protocol.train_and_evaluate(config, workdir, train_split)

and this module does the rest, the same way for every regime:

* data: loads ``config.data`` once, finds near-duplicates once (``config.split.near_duplicates``),
  makes the split(s) and annotates every record with its bootstrap cluster (patient joined with
  near-duplicate group) and, for evaluated parts, whether a copy of it is in train;
* external sets (``config.external.NAME``): loaded and annotated once, never trained on;
* evaluation: the threshold is chosen on val (Youden), then val, test and every external set get
  a report (AUC with clustered CI, the leak-free AUC where copies straddle the split, operating
  points, calibration, the reader's point where BI-RADS is known);
* k-fold CV (``config.split.cross_validate``): every fold in ``workdir/foldK``, then one pooled
  out-of-fold report from the folds' in-memory predictions (no process reads another's files);
* files: process 0 writes reports, predictions and summary.json; every process runs the
  (collective) predictions.

A finished run re-run with a new ``config.external`` entry restores, skips training (the regime's
`train_split` resumes at its last step) and reports on the new source.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from busjax.data import records, sources, splits
from busjax.evaluators import calibration, classification, metrics, report


@dataclasses.dataclass
class Trained:
  """What a regime's `train_split` returns.

  Attributes:
    predict: collection -> (n, C) class probabilities of the selected model.
    info: facts for summary.json: ``steps``, ``train_seconds``, ``resumed_at_step``,
      ``selected_checkpoint``, ``selected_step``, ``model`` (a name for reports), and anything
      regime-specific (e.g. how many synthetic images trained the model).
    features: collection -> (n, d) embeddings of the selected model (its pooled last feature
      map), for sample-quality measures and explanations; None when the regime has none.
  """

  predict: classification.Predictor
  info: dict[str, Any]
  features: classification.Predictor | None = None


TrainSplit = Callable[[ml_collections.ConfigDict, str, dict[str, records.Collection]], Trained]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _pairs(collection: records.Collection, near_duplicates: bool):
  """Near-duplicate pairs, searched once per collection (the search is ~20 s on BUSI)."""
  if not near_duplicates:
    return None
  pairs = splits.near_duplicate_pairs(collection)
  logging.info(
    "%s: %d near-duplicate pairs (grouped in splits and CIs).", collection.name, len(pairs)
  )
  return pairs


def load_data(config: ml_collections.ConfigDict):
  """(collection, near-duplicate pairs or None) of ``config.data``."""
  collection = sources.from_config(config.data)
  logging.info("Data: %s", json.dumps(collection.describe()))
  return collection, _pairs(collection, bool(config.split.get("near_duplicates", True)))


def load_external(config: ml_collections.ConfigDict) -> dict[str, records.Collection]:
  """External evaluation sets (another hospital / scanner), annotated with their clusters."""
  near_duplicates = bool(config.split.get("near_duplicates", True))
  external = {}
  for name, data_config in (config.get("external") or {}).items():
    collection = sources.from_config(data_config)
    external[name] = splits.annotate_groups(
      collection, near_duplicates=near_duplicates, pairs=_pairs(collection, near_duplicates)
    )
  return external


# ----------------------------------------------------------------------------------------------
# One split
# ----------------------------------------------------------------------------------------------


def _provenance(config, preds: classification.Predictions, split: str, trained_on: str, info):
  return {
    "source": preds.source,
    "split": split,
    "synthetic": bool(preds.synthetic),
    "task": " vs ".join(_task_names(preds.class_names)),
    # A regime that adds synthetic images says so here (and in the figures' footer).
    "trained_on": info.get("trained_on", trained_on),
    "synthetic_train_images": int(info.get("synthetic_train_images", 0)),
    "trainer": config.trainer,
    "model": info.get("model") or _model_name(config),
    "step": int(info.get("selected_step", info.get("steps", 0))),
    "images": len(preds),
    "config_seed": int(config.seed),
    # A seed ensemble: this many models (seeds config_seed, config_seed + 1, ...), mean probability.
    "ensemble_members": int(info.get("ensemble_members", 1)),
  }


def _task_names(class_names) -> tuple[str, str]:
  """(negative, positive) class names of the malignant-vs-rest task."""
  negatives = [c for i, c in enumerate(class_names) if i != records.MALIGNANT]
  return " or ".join(negatives), class_names[records.MALIGNANT]


def _model_name(config) -> str:
  model = config.get("model") or {}
  name = model.get("name", config.trainer)
  return name + (f"/{model['variant']}" if model.get("variant") else "")


def _log_entry(name: str, entry: dict, preds: classification.Predictions, selected: str) -> None:
  ci = entry["auc_ci"] or {"lo": float("nan"), "hi": float("nan")}
  leak = ""
  if entry.get("images_with_copy_in_train"):
    free = entry.get("auc_leak_free")
    leak = f"; {entry['images_with_copy_in_train']} with a copy in train, leak-free AUC " + (
      "n/a" if free is None else f"{free:.3f}"
    )
  logging.info(
    "%s: AUC %s [%.3f, %.3f] on %s (%d images, %d clusters%s%s), checkpoint %s -> %s",
    name,
    "n/a" if entry["auc"] is None else f"{entry['auc']:.3f}",
    ci["lo"],
    ci["hi"],
    preds.source,
    len(preds),
    entry["clusters"],
    ", SYNTHETIC" if preds.synthetic else "",
    leak,
    selected,
    entry["report"],
  )


def run_split(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: dict[str, records.Collection],
  external: dict[str, records.Collection],
  train_split: TrainSplit,
) -> tuple[dict[str, Any], dict[str, classification.Predictions]]:
  """Trains one split (one model or a seed ensemble), reports on val/test/external;
  (summary, predictions by report name)."""
  os.makedirs(workdir, exist_ok=True)
  members = _train_members(config, workdir, data, train_split)
  info = dict(members[0].info) if len(members) == 1 else _ensemble_info(config, workdir, members)
  summary = {"workdir": workdir, **info, "reports": {}}
  threshold = temperature = None
  evaluations = [("val", data.get("val")), ("test", data.get("test")), *external.items()]
  all_preds = {}
  is_writer = jax.process_index() == 0
  for name, collection in evaluations:
    if collection is None or len(collection) == 0:
      continue
    member_probs = [m.predict(collection) for m in members]
    preds = classification.predictions(collection, np.mean(member_probs, axis=0))
    all_preds[name] = preds
    if len(members) > 1:  # Each member's own AUC beside the ensemble's.
      summary.setdefault("member_auc", {})[name] = [
        metrics.roc_auc(preds.y_malignant, p[:, records.MALIGNANT]) for p in member_probs
      ]
    if name == "val" and 0 < preds.y_malignant.sum() < len(preds):
      threshold = float(metrics.youden_threshold(preds.y_malignant, preds.p_malignant))
      summary["threshold"] = threshold
      # Temperature scaling, fitted here on val only, then shown beside the raw calibration in
      # every report (test and external sets never choose it).
      temperature = (calibration.fit_temperature(preds.labels, preds.probs), preds.source)
      summary["temperature"] = temperature[0]
    if not is_writer:
      continue  # Every process ran the (collective) prediction; one writes the files.
    provenance = _provenance(config, preds, name, data["train"].name, info)
    reports_dir = os.path.join(workdir, "reports")
    entry = classification.write_report(
      reports_dir,
      name,
      preds,
      provenance=provenance,
      threshold=threshold,
      bootstrap=config.report.bootstrap_resamples,
      temperature=temperature,
    )
    classification.save_predictions(os.path.join(reports_dir, f"{name}_predictions.npz"), preds)
    summary["reports"][name] = entry
    _log_entry(name, entry, preds, str(info.get("selected_checkpoint", "")))
  if is_writer:
    report.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary, all_preds


def _train_members(config, workdir, data, train_split) -> list[Trained]:
  """The model, or with `config.ensemble.members` > 1 every member of a seed ensemble (seeds
  seed, seed + 1, ...), each trained (or resumed) in WORKDIR/memberK."""
  count = int(config.get("ensemble", {}).get("members", 1) or 1)
  if count == 1:
    return [train_split(config, workdir, data)]
  members = []
  for k in range(count):
    member = config.copy_and_resolve_references()
    member.seed = int(config.seed) + k
    member.ensemble.members = 1
    member_dir = os.path.join(workdir, f"member{k}")
    _write_config(member, member_dir)
    members.append(train_split(member, member_dir, data))
    if jax.process_index() == 0:  # What a member's own loading (predict, explain) needs.
      report.write_json(os.path.join(member_dir, "summary.json"), dict(members[-1].info))
  return members


def _write_config(config, workdir: str) -> None:
  """`workdir`/config.json (process 0), what `busjax.inference.load_run` rebuilds the model from."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _ensemble_info(config, workdir, members: list[Trained]) -> dict[str, Any]:
  """summary.json's facts for a seed ensemble: per member its own, in `members`."""
  first = members[0].info
  return {
    "model": f"{first.get('model') or _model_name(config)} x{len(members)} seed ensemble",
    "ensemble_members": len(members),
    "members": [
      dict(m.info, seed=int(config.seed) + k, workdir=os.path.join(workdir, f"member{k}"))
      for k, m in enumerate(members)
    ],
    "steps": int(first.get("steps", 0)),  # Per member (every member trains alike).
    "train_seconds": sum(float(m.info.get("train_seconds", 0.0)) for m in members),
    "selected_checkpoint": ", ".join(str(m.info.get("selected_checkpoint", "")) for m in members),
    **{k: first[k] for k in ("trained_on", "synthetic_train_images") if k in first},
  }


# ----------------------------------------------------------------------------------------------
# Entry point: one split, or k-fold cross-validation
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_split: TrainSplit,
  *,
  loaded: tuple[records.Collection, Any] | None = None,
) -> dict[str, Any]:
  """Runs `train_split` under the protocol `config` describes; reports go under `workdir`.

  `loaded`: `load_data(config)`'s result when the regime already has it (no second near-duplicate
  search). Each image file is decoded once for the whole job (`records.decoded_files_kept`).
  """
  with records.decoded_files_kept():
    return _train_and_evaluate(config, workdir, train_split, loaded)


def _train_and_evaluate(config, workdir, train_split, loaded) -> dict[str, Any]:
  _write_config(config, workdir)
  collection, pairs = loaded or load_data(config)
  external = load_external(config)
  if not config.split.get("cross_validate"):
    data = splits.make_splits(collection, config.split, pairs=pairs)
    return run_split(config, workdir, data, external, train_split)[0]

  k = int(config.split.k)
  summaries, tests = [], []
  for fold in range(k):
    data = splits.make_splits(collection, config.split, fold=fold, pairs=pairs)
    summary, preds = run_split(
      config, os.path.join(workdir, f"fold{fold}"), data, external, train_split
    )
    summaries.append(summary)
    tests.append(preds["test"])
  return _aggregate_folds(config, workdir, collection, summaries, tests)


_PER_FOLD_FIELDS = (
  "auc",
  "sensitivity",
  "specificity",
  "balanced_accuracy",
  "ece",
  "ece_temperature_scaled",
)


def _mean_sd_over_folds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
  """Per evaluated set (test and each external one), each fold's value of every headline number
  (operating points at each fold's own validation threshold) with their mean and sd: the
  spread between folds, beside the pooled out-of-fold report."""
  out = {}
  for name in summaries[0]["reports"]:
    if name == "val":
      continue
    fields = {}
    for field in _PER_FOLD_FIELDS:
      values = [s["reports"][name].get(field) for s in summaries]
      if all(isinstance(v, float | int) for v in values):
        fields[field] = {
          "values": [float(v) for v in values],
          "mean": float(np.mean(values)),
          "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }
    out[name] = fields
  return out


def _aggregate_folds(config, workdir, collection, summaries, tests) -> dict[str, Any]:
  """Out-of-fold report: every image predicted once by the model that did not see it."""
  pooled = classification.concatenate(tests, source=collection.name)
  split = f"{config.split.k}-fold CV, out-of-fold test predictions"
  fold_aucs = [metrics.roc_auc(t.y_malignant, t.p_malignant) for t in tests]
  summary = {
    "folds": summaries,
    "fold_test_auc": fold_aucs,
    "fold_test_auc_mean": float(np.mean(fold_aucs)),
    "fold_test_auc_sd": float(np.std(fold_aucs)),
    "per_fold": _mean_sd_over_folds(summaries),
  }
  if jax.process_index() != 0:
    return summary
  info = dict(summaries[0], model=summaries[0].get("model"))
  provenance = _provenance(
    config, pooled, split, f"{collection.name} (each fold's training part)", info
  )
  entry = classification.write_report(
    os.path.join(workdir, "reports"),
    "cv_out_of_fold",
    pooled,
    provenance=provenance,
    threshold=None,
    bootstrap=config.report.bootstrap_resamples,
  )
  summary["out_of_fold"] = entry
  for name in summaries[0]["reports"]:
    if name not in ("val", "test"):
      aucs = [s["reports"][name]["auc"] for s in summaries]
      summary[f"{name}_auc_per_fold"] = aucs
      summary[f"{name}_auc_mean"] = float(np.mean(aucs))
  report.write_json(os.path.join(workdir, "summary.json"), summary)
  ci = entry["auc_ci"]
  logging.info(
    "%d-fold CV: out-of-fold AUC %.3f [%.3f, %.3f] (%d clusters); fold test AUCs %s -> %s",
    config.split.k,
    entry["auc"],
    ci["lo"],
    ci["hi"],
    entry["clusters"],
    ", ".join(f"{a:.3f}" for a in fold_aucs),
    entry["report"],
  )
  return summary
