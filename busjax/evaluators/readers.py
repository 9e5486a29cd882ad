"""Radiologist operating points from BI-RADS, and a model compared with the reader on the same data.

A reader's BI-RADS category becomes a binary call: ``BI-RADS >= threshold`` (default 4,
"suspicious") is "call malignant". On BUS-BRA, ``bus_data.csv`` holds one senior reader's BI-RADS
for every image, so the reader's sensitivity and specificity are measured on exactly the images the
model sees.

BI-RADS values may be integers 0-6 or strings such as ``"4"``, ``"4a"``, ``"4B"``; the subcategories
4a/4b/4c map to 4.1/4.2/4.3 so that ``threshold=4`` includes all of them and ``threshold="4b"``
works too. Category 0 (incomplete) is kept as 0, i.e. not called malignant.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from busjax.data import records
from busjax.evaluators import metrics

_BIRADS_PATTERN = re.compile(r"^\s*([0-6])\s*([abcABC])?\s*$")
_SUBCATEGORY = {"a": 0.1, "b": 0.2, "c": 0.3}


def parse_birads(values: Any) -> np.ndarray:
  """BI-RADS categories as floats (4a -> 4.1, 4b -> 4.2, 4c -> 4.3); DataError on anything else."""
  values = np.asarray(values, dtype=object).reshape(-1)
  parsed = np.empty(values.shape[0], np.float64)
  for i, value in enumerate(values):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      number, sub = int(value), None
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
      number, sub = int(value), None
    else:
      match = _BIRADS_PATTERN.match(str(value))
      if match is None:
        raise records.DataError(
          f"BI-RADS value {value!r} at position {i} is not a category 0-6 (optionally 4a/4b/4c)"
        )
      number, sub = int(match.group(1)), match.group(2)
    if not 0 <= number <= 6 or (sub is not None and number != 4):
      raise records.DataError(f"BI-RADS value {value!r} at position {i} is not a valid category")
    parsed[i] = number + (_SUBCATEGORY[sub.lower()] if sub else 0.0)
  return parsed


def _threshold_value(threshold: Any) -> float:
  return float(parse_birads([threshold])[0])


# A reader's calls are 0/1: called malignant at >= 0.5.
_sensitivity_of_calls = metrics.threshold_metric("sensitivity", 0.5)
_specificity_of_calls = metrics.threshold_metric("specificity", 0.5)


def reader_operating_point(
  y: Any,
  birads: Any,
  threshold: Any = 4,
  *,
  clusters: Any = None,
  n_bootstrap: int = 2000,
  alpha: float = 0.05,
  seed: int = 0,
) -> dict[str, Any]:
  """The reader's sensitivity and specificity when ``BI-RADS >= threshold`` is called malignant.

  Args:
    y: truth 0/1 (malignant = 1).
    birads: the reader's category per image (see `parse_birads`).
    threshold: lowest category called malignant.
    clusters: patient ids for a patient-clustered bootstrap.
    n_bootstrap: resamples for the intervals (0 skips them).
    alpha: 1 - coverage.
    seed: resampling seed; both intervals use the same resamples.

  Returns:
    ``threshold_metrics`` of the calls plus ``threshold``, ``rule``, ``n``, ``sensitivity_ci`` and
    ``specificity_ci`` (`metrics.Interval`, or None).
  """
  y, _ = metrics.check_binary(y, np.zeros(np.shape(y)))
  birads = parse_birads(birads)
  if birads.shape != y.shape:
    raise ValueError(f"{y.shape[0]} labels but {birads.shape[0]} BI-RADS values")
  threshold_value = _threshold_value(threshold)
  calls = (birads >= threshold_value).astype(np.float64)
  point = metrics.threshold_metrics(y, calls, 0.5)
  point.update(
    threshold=threshold_value,
    rule=f"BI-RADS >= {threshold} called malignant",
    n=int(y.shape[0]),
    sensitivity_ci=None,
    specificity_ci=None,
  )
  if n_bootstrap:
    common = dict(clusters=clusters, n=n_bootstrap, alpha=alpha, seed=seed)
    point["sensitivity_ci"] = metrics.bootstrap_ci(_sensitivity_of_calls, y, calls, **common)
    point["specificity_ci"] = metrics.bootstrap_ci(_specificity_of_calls, y, calls, **common)
  return point


def _matched_differences(y: np.ndarray, model_and_calls: np.ndarray) -> tuple[float, float]:
  """(model spec - reader spec at reader's sens, model sens - reader sens at reader's spec)."""
  scores, calls = model_and_calls[:, 0], model_and_calls[:, 1]
  reader = metrics.threshold_metrics(y, calls, 0.5)
  spec, _, _ = metrics.specificity_at_sensitivity_point(y, scores, reader["sensitivity"])
  sens, _, _ = metrics.sensitivity_at_specificity_point(y, scores, reader["specificity"])
  return spec - reader["specificity"], sens - reader["sensitivity"]


def _matched_differences_resampled(y, model_and_calls, counts) -> tuple[np.ndarray, np.ndarray]:
  """`_matched_differences` of every bootstrap resample (rows of `counts`) at once."""
  scores, calls = model_and_calls[:, 0], model_and_calls[:, 1]
  reader = metrics.threshold_metrics_resampled(y, calls, counts, 0.5)
  spec = metrics.specificity_at_sensitivity_resampled(y, scores, counts, reader["sensitivity"])
  sens = metrics.sensitivity_at_specificity_resampled(y, scores, counts, reader["specificity"])
  return spec - reader["specificity"], sens - reader["sensitivity"]


def _matched_difference(which: int):
  """Item `which` of `_matched_differences` as a metric `metrics.bootstrap_ci` vectorises."""

  def difference(y, model_and_calls):
    return _matched_differences(y, model_and_calls)[which]

  difference.resampled = lambda y, s, counts: _matched_differences_resampled(y, s, counts)[which]
  return difference


def compare_model_to_reader(
  y: Any,
  p: Any,
  birads: Any,
  clusters: Any = None,
  *,
  threshold: Any = 4,
  n_bootstrap: int = 2000,
  alpha: float = 0.05,
  seed: int = 0,
) -> dict[str, Any]:
  """The model at the reader's operating point, on the same images.

  The model's threshold is chosen on these images to match the reader (as reader studies do), so
  its operating point is a best case; the AUC does not depend on it.

  Returns:
    ``reader``: `reader_operating_point`;
    ``model_auc``;
    ``model_specificity_at_reader_sensitivity`` / ``model_sensitivity_at_reader_specificity``:
      `metrics.specificity_at_sensitivity` / `sensitivity_at_specificity` with the reader's point
      estimate as a fixed target;
    ``specificity_difference`` / ``sensitivity_difference``: model minus reader at the reader's
      sensitivity / specificity, with a paired bootstrap interval in which the reader's point is
      re-measured in each resample (so it includes the reader's own uncertainty). An interval
      entirely above 0 means the model beats the reader at that operating point.
    ``mcnemar``: at each matched point, the images only the model / only the reader calls
      right and the exact McNemar p-value (images as independent: optimistic when clustered).
  """
  y, p = metrics.check_binary(y, p)
  reader = reader_operating_point(
    y, birads, threshold, clusters=clusters, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed
  )
  if np.isnan(reader["sensitivity"]) or np.isnan(reader["specificity"]):
    raise ValueError("comparing with a reader needs both benign and malignant cases")
  common = dict(clusters=clusters, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
  spec_at_sens = metrics.specificity_at_sensitivity(y, p, reader["sensitivity"], **common)
  sens_at_spec = metrics.sensitivity_at_specificity(y, p, reader["specificity"], **common)
  calls = (parse_birads(birads) >= _threshold_value(threshold)).astype(np.float64)
  model_and_calls = np.stack([p, calls], axis=1)
  spec_diff, sens_diff = _matched_differences(y, model_and_calls)
  spec_diff_ci = sens_diff_ci = None
  if n_bootstrap:
    boot = dict(clusters=clusters, n=n_bootstrap, alpha=alpha, seed=seed)
    spec_diff_ci = metrics.bootstrap_ci(_matched_difference(0), y, model_and_calls, **boot)
    sens_diff_ci = metrics.bootstrap_ci(_matched_difference(1), y, model_and_calls, **boot)
  # McNemar on the same images with the model thresholded at each matched point.
  matched = {}
  for key, point in (
    (
      "at_reader_sensitivity",
      metrics.specificity_at_sensitivity_point(y, p, reader["sensitivity"]),
    ),
    (
      "at_reader_specificity",
      metrics.sensitivity_at_specificity_point(y, p, reader["specificity"]),
    ),
  ):
    test = metrics.mcnemar(y, p >= point[2], calls)
    matched[key] = {
      "model_threshold": point[2],
      "model_only_right": test["a_only"],
      "reader_only_right": test["b_only"],
      "p_value": test["p_value"],
    }
  matched["note"] = "exact McNemar on discordant images; assumes independent images"
  return {
    "reader": reader,
    "model_auc": metrics.roc_auc(y, p),
    "mcnemar": matched,
    "model_specificity_at_reader_sensitivity": spec_at_sens,
    "model_sensitivity_at_reader_specificity": sens_at_spec,
    "specificity_difference": {"value": spec_diff, "ci": spec_diff_ci},
    "sensitivity_difference": {"value": sens_diff, "ci": sens_diff_ci},
    "note": "model thresholds chosen on these images to match the reader's operating point",
  }
