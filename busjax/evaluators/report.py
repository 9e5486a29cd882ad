"""Evaluation reports: one strict JSON, three PNG figures and a predictions CSV per evaluated set.

Layout written by `write_report(out_dir, name=NAME, ...)`::

  out_dir/NAME/report.json       metrics with intervals, calibration, reader comparison, provenance
  out_dir/NAME/predictions.csv   one row per image: id, patient_id, label, p_malignant (+ extras)
  out_dir/NAME/roc.png           ROC with the operating point(s) and the reader's point
  out_dir/NAME/reliability.png   reliability diagram and histogram of p(malignant)
  out_dir/NAME/confusion.png     confusion matrix at the operating threshold

NAME is a plain file name such as ``test``, ``fold3_val`` or ``busbra_external``. Every figure and
the JSON state the data source, the split and whether the data is synthetic; synthetic data carries
"SYNTHETIC DATA" in every figure title and as a watermark, so a phantom result cannot pass for a
clinical one. The JSON is strict (NaN and inf are written as null). Call from process 0 only.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import figure as mpl_figure

from busjax.data import records
from busjax.evaluators import calibration, metrics, readers

SCHEMA = "busjax.report/1"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED_PROVENANCE = {"source": str, "split": str, "synthetic": bool}


# ----------------------------------------------------------------------------------------------
# Strict JSON and CSV.
# ----------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
  """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf -> None, Intervals -> dicts."""
  if isinstance(value, metrics.Interval):
    return to_jsonable(value.to_dict())
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if value is None or isinstance(value, str):
    return value
  return str(value)


def _write_atomically(path: str, text: str) -> None:
  tmp_path = f"{path}.tmp"
  with open(tmp_path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp_path, path)  # Readers never see a half-written report.


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Writes strict JSON (``allow_nan=False``; NaN becomes null) atomically."""
  _write_atomically(path, json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")


def _default_class_names(n_classes: int) -> tuple[str, ...]:
  if n_classes == len(records.BINARY_CLASSES):
    return records.BINARY_CLASSES
  if n_classes == len(records.THREE_CLASSES):
    return records.THREE_CLASSES
  return tuple(f"class{i}" for i in range(n_classes))


def write_predictions_csv(
  path: str,
  ids: Sequence[Any],
  labels: Any,
  probs: Any,
  patient_ids: Sequence[Any] | None = None,
  extra: Mapping[str, Sequence[Any]] | None = None,
  class_names: Sequence[str] | None = None,
) -> None:
  """One row per image: ``id, [patient_id], label, p_<class>..., [extra columns]``.

  Args:
    path: the CSV file to write.
    ids: image ids (n,).
    labels: integer labels (n,) (malignant = 1).
    probs: p(malignant) (n,), written as ``p_malignant``; or class probabilities (n, C), written
      as ``p_<class name>`` (so ``p_malignant`` is always there).
    patient_ids: optional patient ids (n,).
    extra: further columns, name -> values (n,), e.g. ``{"birads": ..., "device": ...}``.
    class_names: names for the columns of 2-D ``probs``; by default binary or three-class names.
  """
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  n = labels.shape[0]
  if probs.ndim == 1:
    prob_columns = {"p_malignant": probs}
  elif probs.ndim == 2:
    names = tuple(class_names or _default_class_names(probs.shape[1]))
    if len(names) != probs.shape[1]:
      raise ValueError(f"{len(names)} class names for {probs.shape[1]} probability columns")
    prob_columns = {f"p_{c}": probs[:, i] for i, c in enumerate(names)}
  else:
    raise ValueError(f"probs must be (n,) or (n, C), got shape {probs.shape}")
  columns: dict[str, Sequence[Any]] = {"id": list(ids)}
  if patient_ids is not None:
    columns["patient_id"] = list(patient_ids)
  columns["label"] = [int(v) for v in labels]
  columns.update(prob_columns)
  for column, values in (extra or {}).items():
    if column in columns:
      raise ValueError(f"extra column {column!r} clashes with a standard column")
    columns[column] = list(values)
  for column, values in columns.items():
    if len(values) != n:
      raise ValueError(f"column {column!r} has {len(values)} values for {n} images")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp_path = f"{path}.tmp"
  with open(tmp_path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns.keys())
    for row in zip(*columns.values(), strict=True):
      writer.writerow(repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row)
  os.replace(tmp_path, path)


# ----------------------------------------------------------------------------------------------
# Numbers.
# ----------------------------------------------------------------------------------------------


def _operating_point(y, p, threshold, chosen, clusters, bootstrap, alpha, seed) -> dict[str, Any]:
  point = metrics.threshold_metrics(y, p, threshold)
  point.update(threshold=float(threshold), chosen=chosen)
  if bootstrap:
    point["ci"] = {
      name: metrics.bootstrap_ci(
        metrics.threshold_metric(name, threshold),
        y,
        p,
        clusters=clusters,
        n=bootstrap,
        alpha=alpha,
        seed=seed,
      )
      for name in ("sensitivity", "specificity", "balanced_accuracy")
    }
  return point


def _leak_free(y, p, copy_in_train, clusters, bootstrap, alpha, seed) -> dict[str, Any]:
  """How many images have a copy in the training data, and the AUC without them."""
  leaked = np.asarray(copy_in_train, bool)
  if leaked.shape != y.shape:
    raise ValueError(f"{leaked.shape[0]} copy_in_train flags for {y.shape[0]} images")
  keep = ~leaked
  section: dict[str, Any] = {
    "images_with_copy_in_train": int(leaked.sum()),
    "definition": "same patient or a near-duplicate scan among the training images",
    "leak_free_images": int(keep.sum()),
    "auc_leak_free": None,
    "auc_leak_free_bootstrap_ci": None,
  }
  y_kept, p_kept = y[keep], p[keep]
  if _has_both(y_kept):
    section["auc_leak_free"] = metrics.roc_auc(y_kept, p_kept)
    if bootstrap:
      section["auc_leak_free_bootstrap_ci"] = metrics.bootstrap_ci(
        metrics.roc_auc,
        y_kept,
        p_kept,
        clusters=None if clusters is None else np.asarray(clusters)[keep],
        n=bootstrap,
        alpha=alpha,
        seed=seed,
      )
  return section


def _has_both(y: np.ndarray) -> bool:
  return y.shape[0] > 0 and 0 < int(y.sum()) < y.shape[0]


def evaluate(
  y: Any,
  p: Any,
  *,
  threshold: float | None = None,
  patient_ids: Any = None,
  clusters: Any = None,
  cluster_definition: str = "patient",
  copy_in_train: Any = None,
  class_names: Sequence[str] = records.BINARY_CLASSES,
  probs_full: Any = None,
  labels_full: Any = None,
  bootstrap: int = 2000,
  seed: int = 0,
  alpha: float = 0.05,
  n_bins: int = 15,
  calibrated: Mapping[str, Any] | None = None,
  subgroups: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """All numbers of a report for malignant-vs-rest predictions.

  Args:
    y: truth 0/1, malignant = 1 (for three-class models ``label == 1``).
    p: p(malignant), shape (n,).
    threshold: operating threshold chosen on validation data (e.g. `metrics.youden_threshold`);
      metrics are reported there and always at 0.5 too.
    patient_ids: patient per image (counted in the report).
    clusters: resampling unit per image for every interval; default `patient_ids`. Images that
      are not independent evidence (one patient's images, copies of one scan) must share one:
      `busjax.data.splits.annotate_groups` joins patients and near-duplicate clusters.
    cluster_definition: what `clusters` are, stated in the JSON.
    copy_in_train: bool per image, True where the image has a copy (same patient or a
      near-duplicate) in the training data; then the AUC is also given on the other images.
    class_names: the model's classes (malignant at index 1).
    probs_full: (n, C) class probabilities of a multi-class model, for top-label calibration.
    labels_full: (n,) C-class labels matching ``probs_full``.
    bootstrap: resamples for the intervals (0 skips them).
    seed: resampling seed.
    alpha: 1 - coverage of every interval.
    n_bins: equal-width bins of the calibration error.
    calibrated: ``{"p": p(malignant) after temperature scaling, "temperature": T, "fitted_on":
      where T was fitted}``; its calibration is reported beside the raw one (AUC and operating
      points stay those of the raw p: scaling keeps the ranking), and the decision curve (net
      benefit at threshold probabilities 0.05..0.95 beside biopsy-all and biopsy-none) uses it.
    subgroups: ``{"device": value per image, ...}``: each value's images get their own counts,
      AUC (clustered CI) and operating points (e.g. BUS-BRA's four scanners).

  Returns:
    A dict (not yet JSON-cleaned: it holds `metrics.Interval` objects and may hold NaN).
  """
  y, p = metrics.check_binary(y, p, probabilities=True)
  if p.ndim != 1:
    raise ValueError(f"p must be p(malignant) of shape (n,), got {p.shape}")
  n_patients = y.shape[0]
  if patient_ids is not None:
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != y.shape:
      raise ValueError(f"{patient_ids.shape[0]} patient ids for {y.shape[0]} images")
    n_patients = len(np.unique(patient_ids))
  if clusters is None:
    clusters, cluster_definition = patient_ids, "patient"
  n_clusters = y.shape[0]
  if clusters is not None:
    clusters = np.asarray(clusters)
    if clusters.shape != y.shape:
      raise ValueError(f"{clusters.shape[0]} cluster ids for {y.shape[0]} images")
    n_clusters = len(np.unique(clusters))
    # All-singleton clusters resample exactly like images: skip the grouping work.
    clusters = clusters if n_clusters < y.shape[0] else None
  n_positive = int(y.sum())
  negative_names = [c for i, c in enumerate(class_names) if i != records.MALIGNANT]
  result: dict[str, Any] = {
    "positive_class": class_names[records.MALIGNANT],
    "negative_class": " or ".join(negative_names),
    "counts": {
      "images": int(y.shape[0]),
      "patients": int(n_patients),
      "positive": n_positive,
      "negative": int(y.shape[0] - n_positive),
      "prevalence": n_positive / y.shape[0],
    },
    "bootstrap": {
      "resamples": bootstrap,
      # Resampling unit: a cluster of images that are not independent evidence.
      "clustered": clusters is not None,
      "cluster_definition": cluster_definition,
      "clusters": int(n_clusters),
      "alpha": alpha,
      "seed": seed,
    },
  }
  auc: dict[str, Any] = {"value": None, "bootstrap_ci": None, "delong_ci": None}
  if 0 < n_positive < y.shape[0]:
    auc["value"] = metrics.roc_auc(y, p)
    if bootstrap:
      auc["bootstrap_ci"] = metrics.bootstrap_ci(
        metrics.roc_auc, y, p, clusters=clusters, n=bootstrap, alpha=alpha, seed=seed
      )
    if min(n_positive, y.shape[0] - n_positive) >= 2:
      auc["delong_ci"] = metrics.delong_ci(y, p, alpha=alpha)
      auc["delong_note"] = "assumes independent images; prefer bootstrap_ci when clustered"
  else:
    auc["reason"] = "undefined: the set holds only one class"
  result["auc"] = auc
  if copy_in_train is not None:
    result["leakage"] = _leak_free(y, p, copy_in_train, clusters, bootstrap, alpha, seed)
  points = {}
  if threshold is not None:
    points["at_threshold"] = _operating_point(
      y, p, threshold, "given (chosen on validation data)", clusters, bootstrap, alpha, seed
    )
  points["at_0.5"] = _operating_point(y, p, 0.5, "fixed 0.5", clusters, bootstrap, alpha, seed)
  result["operating_points"] = points
  result["calibration"] = _calibration_numbers(y, p, n_bins)
  if subgroups:
    result["subgroups"] = {
      key: _subgroups(y, p, values, threshold, clusters, bootstrap, alpha, seed)
      for key, values in subgroups.items()
    }
  if calibrated is not None:
    _, p_scaled = metrics.check_binary(y, calibrated["p"], probabilities=True)
    result["calibration"]["temperature_scaled"] = {
      "temperature": float(calibrated["temperature"]),
      "fitted_on": str(calibrated["fitted_on"]),
      **_calibration_numbers(y, p_scaled, n_bins),
    }
  p_decision, which = p, "raw p (no temperature fitted)"
  if calibrated is not None:
    p_decision, which = p_scaled, "temperature-scaled p"
  if _has_both(y):
    result["decision_curve"] = {"probabilities": which, **metrics.decision_curve(y, p_decision)}
  if probs_full is not None and labels_full is not None:
    labels_full, probs_full = calibration.check_multiclass(labels_full, probs_full)
    if probs_full.shape[0] != y.shape[0]:
      raise ValueError(f"probs_full has {probs_full.shape[0]} rows for {y.shape[0]} images")
    if not np.allclose(probs_full[:, records.MALIGNANT], p, atol=1e-5):
      raise ValueError("p must equal probs_full[:, 1] (p(malignant))")
    if not np.array_equal(labels_full == records.MALIGNANT, y == 1):
      raise ValueError("y must equal (labels_full == 1)")
    predicted = probs_full.argmax(axis=1)
    n_classes = probs_full.shape[1]
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (labels_full, predicted), 1)
    result["multiclass"] = {
      "class_names": list(class_names),
      "accuracy": float(np.mean(predicted == labels_full)),
      "confusion_matrix": confusion,  # Rows: truth, columns: argmax prediction.
      "top_label_ece": calibration.top_label_ece(labels_full, probs_full, n_bins),
      "brier": calibration.multiclass_brier(labels_full, probs_full),
      "nll": calibration.multiclass_nll(labels_full, probs_full),
    }
  return result


def _subgroups(y, p, values, threshold, clusters, bootstrap, alpha, seed) -> dict[str, Any]:
  """Per value of one image attribute: counts, AUC with its clustered CI, operating points."""
  values = np.asarray(values, object).astype(str)
  if values.shape != y.shape:
    raise ValueError(f"{values.shape[0]} subgroup values for {y.shape[0]} images")
  out = {}
  for value in sorted(set(values.tolist())):
    members = values == value
    ym, pm = y[members], p[members]
    cm = None if clusters is None else clusters[members]
    group: dict[str, Any] = {"images": int(members.sum()), "positive": int(ym.sum())}
    group["auc"] = metrics.roc_auc(ym, pm) if 0 < ym.sum() < len(ym) else None
    if group["auc"] is not None and bootstrap:
      group["auc_ci"] = metrics.bootstrap_ci(
        metrics.roc_auc, ym, pm, clusters=cm, n=bootstrap, alpha=alpha, seed=seed
      )
    for name, t in (("at_threshold", threshold), ("at_0.5", 0.5)):
      if t is not None:
        point = metrics.threshold_metrics(ym, pm, t)
        group[name] = {k: point[k] for k in ("sensitivity", "specificity", "tp", "fp", "tn", "fn")}
    out[value] = group
  return out


def _calibration_numbers(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict[str, Any]:
  return {
    "ece": calibration.expected_calibration_error(y, p, n_bins),
    # What a perfectly calibrated model with these p would score here: the noise floor.
    "ece_if_calibrated": calibration.ece_if_calibrated(p, n_bins),
    "adaptive_ece": calibration.adaptive_calibration_error(y, p, n_bins),
    "n_bins": n_bins,
    "brier": calibration.brier(y, p),
    "nll": calibration.nll(y, p),
  }


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------


def _new_figure(provenance: Mapping[str, Any], what: str, size=(5.6, 5.6)) -> mpl_figure.Figure:
  """A figure whose title names the data, split and synthetic status; watermarked if synthetic."""
  # No pyplot: no global state and no GUI backend. Constrained layout keeps labels inside the
  # canvas; the bottom strip is left free for the provenance footer.
  fig = mpl_figure.Figure(figsize=size, dpi=110, layout="constrained")
  fig.get_layout_engine().set(rect=(0.0, 0.035, 1.0, 0.965))
  synthetic = bool(provenance["synthetic"])
  title = f"{what}: {provenance['source']}, split {provenance['split']}"
  fig.suptitle(
    ("SYNTHETIC DATA - " if synthetic else "") + title,
    fontsize=10,
    color="firebrick" if synthetic else "black",
  )
  if synthetic:
    fig.text(
      0.5,
      0.5,
      "SYNTHETIC DATA",
      fontsize=38,
      color="firebrick",
      alpha=0.13,
      rotation=30,
      ha="center",
      va="center",
      zorder=0,
    )
  footer = " | ".join(
    f"{key} {provenance[key]}" for key in ("model", "step", "trained_on") if key in provenance
  )
  if footer:
    fig.text(0.01, 0.005, footer, fontsize=7, color="dimgray", ha="left", va="bottom")
  return fig


def _interval_text(interval: Any) -> str:
  if interval is None or not all(math.isfinite(v) for v in interval):
    return ""
  return f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"


def _plot_roc(path, y, p, result, provenance, comparison) -> None:
  fig = _new_figure(provenance, "ROC")
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [0, 1], color="lightgray", lw=1, ls="--")
  counts = result["counts"]
  if result["auc"]["value"] is not None:
    fpr, tpr, _ = metrics.roc_points(y, p)
    ci_text = _interval_text(result["auc"]["bootstrap_ci"])
    label = f"model AUC {result['auc']['value']:.3f}{ci_text}"
    ax.plot(fpr, tpr, color="tab:blue", lw=1.8, label=label)  # Ties run diagonally.
  markers = {"at_threshold": ("o", "tab:orange"), "at_0.5": ("s", "tab:green")}
  for key, point in result["operating_points"].items():
    marker, color = markers[key]
    if math.isfinite(point["sensitivity"]) and math.isfinite(point["specificity"]):
      where = "validation threshold p >= " if key == "at_threshold" else "p >= "
      ax.plot(
        1 - point["specificity"],
        point["sensitivity"],
        marker,
        color=color,
        ms=8,
        mec="black",
        label=f"{where}{point['threshold']:.3g}: sens "
        f"{point['sensitivity']:.2f}, spec {point['specificity']:.2f}",
      )
  if comparison is not None:
    reader = comparison["reader"]
    sens, spec = reader["sensitivity"], reader["specificity"]
    xerr = yerr = None
    if reader["specificity_ci"] is not None:
      lo, hi = reader["specificity_ci"]
      xerr = [[max(hi - spec, 0.0)], [max(spec - lo, 0.0)]]  # 1 - spec flips the interval.
      lo, hi = reader["sensitivity_ci"]
      yerr = [[max(sens - lo, 0.0)], [max(hi - sens, 0.0)]]
    ax.errorbar(
      1 - spec,
      sens,
      xerr=xerr,
      yerr=yerr,
      fmt="*",
      color="crimson",
      ms=13,
      mec="black",
      capsize=3,
      label=f"reader ({reader['rule']}): sens {sens:.2f}, spec {spec:.2f}",
    )
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("1 - specificity (false-positive rate)")
  ax.set_ylabel("sensitivity (true-positive rate)")
  ax.set_title(
    f"{counts['images']} images, {counts['patients']} patients, "
    f"{counts['positive']} {result['positive_class']}",
    fontsize=8,
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=6.5)
  fig.savefig(path)


def _plot_reliability(path, y, p, result, provenance, p_scaled=None) -> None:
  fig = _new_figure(provenance, "Reliability", size=(5.6, 6.4))
  grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
  ax = fig.add_subplot(grid[0])
  hist_ax = fig.add_subplot(grid[1], sharex=ax)
  calib = result["calibration"]
  n_bins = calib["n_bins"]
  ax.plot([0, 1], [0, 1], color="lightgray", ls="--", lw=1, label="perfect calibration")
  curves = [(p, "o-", "tab:blue", f"model: ECE {calib['ece']:.3f} ({n_bins} bins)", calib)]
  scaled = calib.get("temperature_scaled")
  if scaled is not None and p_scaled is not None:
    label = f"temperature-scaled (T={scaled['temperature']:.2f}, fitted on {scaled['fitted_on']}): "
    curves.append((p_scaled, "s--", "tab:orange", label + f"ECE {scaled['ece']:.3f}", scaled))
  for probabilities, style, color, label, numbers in curves:
    curve = calibration.reliability_curve(y, probabilities, n_bins)
    filled = curve["counts"] > 0
    ax.plot(
      curve["mean_predicted"][filled],
      curve["fraction_positive"][filled],
      style,
      color=color,
      label=f"{label}, Brier {numbers['brier']:.3f}",
    )
  floor = calib["ece_if_calibrated"]
  ax.set_title(
    f"a perfectly calibrated model would score ECE {floor['mean']:.3f} (95%: ≤ {floor['p95']:.3f})"
    f" on these {len(p)} images",
    fontsize=7,
  )
  ax.set_ylabel(f"observed fraction {result['positive_class']}")
  ax.set_xlim(0, 1)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=7)
  ax.tick_params(labelbottom=False)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  hist_ax.hist(
    [p[y == 0], p[y == 1]],
    bins=edges,
    stacked=True,
    color=["tab:gray", "tab:red"],
    label=[result["negative_class"], result["positive_class"]],
  )
  hist_ax.set_xlabel(f"predicted p({result['positive_class']})")
  hist_ax.set_ylabel("images")
  hist_ax.legend(fontsize=6.5, loc="upper center")
  fig.savefig(path)


def _plot_decision_curve(path, result, provenance) -> None:
  curve = result["decision_curve"]
  fig = _new_figure(provenance, "Decision curve", size=(5.6, 4.6))
  ax = fig.add_subplot()
  t = curve["thresholds"]
  ax.plot(
    t, curve["model"], "o-", color="tab:blue", ms=3, label=f"model ({curve['probabilities']})"
  )
  ax.plot(t, curve["treat_all"], color="tab:gray", label="biopsy all")
  ax.plot(t, curve["treat_none"], color="black", lw=0.8, label="biopsy none")
  if "reader" in curve:
    ax.plot(t, curve["reader"], "--", color="tab:green", label="reader's BI-RADS calls")
  prevalence = result["counts"]["prevalence"]
  ax.set_ylim(-0.05, max(prevalence, 0.05) * 1.15)
  ax.set_xlabel(f"threshold probability of {result['positive_class']}")
  ax.set_ylabel("net benefit (true positives per patient)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.savefig(path)


def _draw_confusion(ax, matrix, row_names, col_names, title) -> None:
  matrix = np.asarray(matrix)
  row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      ax.text(
        j,
        i,
        f"{matrix[i, j]}\n{100 * row_share[i, j]:.0f}%",
        ha="center",
        va="center",
        color="white" if row_share[i, j] > 0.6 else "black",
        fontsize=9,
      )
  ax.set_xticks(range(len(col_names)), col_names, fontsize=8)
  ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("truth")
  ax.set_title(title, fontsize=8)


def _plot_confusion(path, result, provenance) -> None:
  points = result["operating_points"]
  key = "at_threshold" if "at_threshold" in points else "at_0.5"
  point = points[key]
  multiclass = result.get("multiclass")
  fig = _new_figure(provenance, "Confusion", size=(9.0 if multiclass else 5.0, 4.6))
  names = [result["negative_class"], result["positive_class"]]
  ax = fig.add_subplot(1, 2 if multiclass else 1, 1)
  _draw_confusion(
    ax,
    [[point["tn"], point["fp"]], [point["fn"], point["tp"]]],
    names,
    names,
    f"p >= {point['threshold']:.3g} ({point['chosen']}); row %",
  )
  if multiclass:
    ax = fig.add_subplot(1, 2, 2)
    _draw_confusion(
      ax,
      multiclass["confusion_matrix"],
      multiclass["class_names"],
      multiclass["class_names"],
      "argmax over classes; row %",
    )
  fig.savefig(path)


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def _check_provenance(provenance: Mapping[str, Any]) -> None:
  for key, kind in _REQUIRED_PROVENANCE.items():
    if key not in provenance:
      raise ValueError(
        f"provenance lacks {key!r}: a report must state {sorted(_REQUIRED_PROVENANCE)}"
      )
    if not isinstance(provenance[key], kind):
      raise ValueError(f"provenance[{key!r}] must be {kind.__name__}, got {provenance[key]!r}")


def write_report(
  out_dir: str,
  *,
  name: str,
  provenance: Mapping[str, Any],
  y: Any,
  p: Any,
  patient_ids: Any = None,
  clusters: Any = None,
  cluster_definition: str = "patient",
  copy_in_train: Any = None,
  ids: Sequence[Any] | None = None,
  threshold: float | None = None,
  reader: Any = None,
  class_names: Sequence[str] = records.BINARY_CLASSES,
  probs_full: Any = None,
  labels_full: Any = None,
  bootstrap: int = 2000,
  seed: int = 0,
  calibrated: Mapping[str, Any] | None = None,
  subgroups: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Evaluates and writes ``out_dir/name/`` (see the module docstring); returns the JSON dict.

  Args:
    out_dir: parent folder (created if needed).
    name: sub-folder name for this set, e.g. ``"test"`` or ``"busbra_external"``.
    provenance: must hold ``source`` (str), ``split`` (str) and ``synthetic`` (bool); should hold
      ``trained_on``, ``model`` and ``step``; every key is copied into the JSON.
    y, p, patient_ids, clusters, cluster_definition, copy_in_train, threshold, class_names,
      probs_full, labels_full, bootstrap, seed, calibrated, subgroups: as in `evaluate`
      (each subgroup is also a column of predictions.csv).
    ids: image ids for the predictions CSV (row numbers when None).
    reader: BI-RADS per image (array), or a mapping ``{"birads": ..., "threshold": 4}``; adds a
      `readers.compare_model_to_reader` section and the reader's point on the ROC figure.
  """
  if not isinstance(name, str) or not _NAME_PATTERN.match(name):
    raise ValueError(f"report name {name!r} must be a plain file name (letters, digits, . _ -)")
  _check_provenance(provenance)
  result = evaluate(
    y,
    p,
    threshold=threshold,
    patient_ids=patient_ids,
    clusters=clusters,
    cluster_definition=cluster_definition,
    copy_in_train=copy_in_train,
    class_names=class_names,
    probs_full=probs_full,
    labels_full=labels_full,
    bootstrap=bootstrap,
    seed=seed,
    calibrated=calibrated,
    subgroups=subgroups,
  )
  y, p = metrics.check_binary(y, p, probabilities=True)
  ids = [str(i) for i in range(y.shape[0])] if ids is None else list(ids)
  comparison = None
  extra = {}
  if reader is not None:
    reader_spec = dict(reader) if isinstance(reader, Mapping) else {"birads": reader}
    if clusters is None:
      clusters = patient_ids
    comparison = readers.compare_model_to_reader(
      y,
      p,
      reader_spec["birads"],
      clusters if result["bootstrap"]["clustered"] else None,
      threshold=reader_spec.get("threshold", 4),
      n_bootstrap=bootstrap,
      seed=seed,
    )
    extra["birads"] = list(np.asarray(reader_spec["birads"], dtype=object))
  if result["bootstrap"]["cluster_definition"] != "patient":
    extra["cluster"] = list(np.asarray(clusters))
  if copy_in_train is not None:
    extra["copy_in_train"] = [int(v) for v in np.asarray(copy_in_train, bool)]
  report_dir = os.path.join(out_dir, name)
  os.makedirs(report_dir, exist_ok=True)
  files = {
    "json": "report.json",
    "predictions": "predictions.csv",
    "roc": "roc.png",
    "reliability": "reliability.png",
    "confusion": "confusion.png",
  }
  labels = labels_full if labels_full is not None else y
  for key, values in (subgroups or {}).items():
    extra[key] = [str(v) for v in values]
  p_scaled = None
  if calibrated is not None:
    p_scaled = np.asarray(calibrated["p"], np.float64)
    extra["p_malignant_calibrated"] = [f"{v:.6f}" for v in p_scaled]
  write_predictions_csv(
    os.path.join(report_dir, files["predictions"]),
    ids,
    labels,
    probs_full if probs_full is not None else p,
    patient_ids=patient_ids,
    extra=extra,
    class_names=class_names if probs_full is not None else None,
  )
  _plot_roc(os.path.join(report_dir, files["roc"]), y, p, result, provenance, comparison)
  _plot_reliability(
    os.path.join(report_dir, files["reliability"]), y, p, result, provenance, p_scaled
  )
  _plot_confusion(os.path.join(report_dir, files["confusion"]), result, provenance)
  if "decision_curve" in result:
    curve = result["decision_curve"]
    if comparison is not None:  # The reader's calls act the same at every threshold.
      calls = readers.parse_birads(reader_spec["birads"]) >= reader_spec.get("threshold", 4)
      curve["reader"] = metrics.net_benefit(y, calls.astype(np.float64), curve["thresholds"])
    files["decision_curve"] = "decision_curve.png"
    _plot_decision_curve(os.path.join(report_dir, files["decision_curve"]), result, provenance)
  report = {
    "schema": SCHEMA,
    "name": name,
    "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "provenance": dict(provenance),
    "synthetic": bool(provenance["synthetic"]),  # Top level too: it must be impossible to miss.
    **result,
    "reader_comparison": comparison,
    "files": files,
  }
  report = to_jsonable(report)
  write_json(os.path.join(report_dir, files["json"]), report)
  return report
