"""Binary diagnostic metrics with confidence intervals: AUC, DeLong, operating points.

Conventions, everywhere in this module:

* ``y`` holds the truth as 0/1 (or bool) with **malignant = 1** (the positive class).
* ``p`` holds a score that grows with malignancy (usually p(malignant), but any monotone score
  works for AUC and operating points).
* A case is called positive when ``p >= threshold``.
* Ratios whose denominator is zero (e.g. PPV when nothing is called positive) are ``nan``, not 0:
  a 0 would read as "measured and terrible" when nothing was measured. Reports write them as null.

Intervals are percentile bootstrap intervals. When ``clusters`` (patient ids) are given, the
bootstrap resamples patients and takes all their images, so that images of one patient, which are
correlated, do not count as independent evidence. Resamples that hold only one class (an AUC or a
sensitivity is undefined there) are skipped and counted, never silently filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.special

# Targets such as "the reader's sensitivity" are ratios computed elsewhere; compare with a little
# slack so that 0.7 computed two ways still counts as reaching 0.7.
_TARGET_TOLERANCE = 1e-12


class Interval(tuple):
  """A confidence interval ``(lo, hi)`` that also says how it was obtained.

  It unpacks like a pair (``lo, hi = bootstrap_ci(...)``); the attributes carry the details a
  report needs: ``method``, ``n_resamples`` (used), ``n_skipped_one_class``, ``n_skipped_nan``,
  ``alpha`` and, for DeLong, ``estimate`` and ``se``.
  """

  def __new__(cls, lo: float, hi: float, **details: Any) -> Interval:
    interval = super().__new__(cls, (float(lo), float(hi)))
    interval.details = dict(details)
    return interval

  @property
  def lo(self) -> float:
    return self[0]

  @property
  def hi(self) -> float:
    return self[1]

  def __getattr__(self, name: str) -> Any:
    details = self.__dict__.get("details", {})
    if name in details:
      return details[name]
    raise AttributeError(name)

  def to_dict(self) -> dict[str, Any]:
    """``{"lo", "hi", **details}`` for JSON reports."""
    return {"lo": self.lo, "hi": self.hi, **self.details}


def check_binary(y: Any, p: Any, *, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts truth and scores; raises ValueError saying what is wrong.

  Args:
    y: truth, 0/1 or bool, shape (n,).
    p: scores, shape (n,) or (n, k) (extra columns ride along for joint bootstraps).
    probabilities: also require ``0 <= p <= 1``.

  Returns:
    ``y`` as int8 and ``p`` as float64.
  """
  y = np.asarray(y)
  p = np.asarray(p, dtype=np.float64)
  if y.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {y.shape}")
  if p.ndim < 1 or p.shape[0] != y.shape[0]:
    raise ValueError(f"labels have {y.shape[0]} rows but scores have shape {p.shape}")
  if y.size == 0:
    raise ValueError("no samples to evaluate")
  if y.dtype != bool and not np.all(np.isin(y, (0, 1))):
    bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
    raise ValueError(f"labels must be 0/1 (malignant = 1); found {bad.tolist()}")
  if not np.all(np.isfinite(p)):
    raise ValueError(f"scores contain {int(np.sum(~np.isfinite(p)))} NaN or inf values")
  if probabilities and (p.min() < 0.0 or p.max() > 1.0):
    raise ValueError(f"probabilities must lie in [0, 1]; found range [{p.min()}, {p.max()}]")
  return y.astype(np.int8), p


def _has_both_classes(y: np.ndarray) -> bool:
  return bool(0 < int(y.sum()) < y.shape[0])


def _ratio(numerator: float, denominator: float) -> float:
  """numerator / denominator, with 0/0 (and x/0) as nan rather than 0 or an exception."""
  return float(numerator) / float(denominator) if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# AUC and its intervals.
# ----------------------------------------------------------------------------------------------


def roc_auc(y: Any, p: Any) -> float:
  """Area under the ROC curve (Mann-Whitney; ties count 1/2), equal to sklearn's roc_auc_score.

  Raises ValueError when ``y`` holds only one class: the AUC is undefined there.
  """
  y, p = check_binary(y, p)
  return _auc_unchecked(y, p)


def midranks(x: Any) -> np.ndarray:
  """1-based ranks along axis 0, tied values sharing the mean of their ranks: what
  ``scipy.stats.rankdata(x, axis=0)`` returns (tested), without importing scipy.stats, which
  took 0.6-1 s of every launch for the AUC alone."""
  x = np.asarray(x)
  if x.ndim != 1:
    return np.stack([midranks(column) for column in x.reshape(x.shape[0], -1).T], -1).reshape(
      x.shape
    )
  order = np.argsort(x, kind="stable")
  ordered = x[order]
  new_value = np.concatenate([[True], ordered[1:] != ordered[:-1]])
  bounds = np.concatenate([np.flatnonzero(new_value), [x.shape[0]]])  # Where each tie run starts.
  run_ranks = (bounds[:-1] + 1 + bounds[1:]) / 2.0  # Mean of the 1-based ranks start+1 .. end.
  ranks = np.empty(x.shape[0], np.float64)
  ranks[order] = run_ranks[np.cumsum(new_value) - 1]
  return ranks


def _auc_unchecked(y: np.ndarray, p: np.ndarray) -> float:
  n_pos = int(y.sum())
  n_neg = y.shape[0] - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative")
  ranks = midranks(p)  # Average ranks: a tie between classes counts 1/2.
  return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# `bootstrap_ci` hands the vectorised metrics blocks of at most this many (resample, image)
# cells, which keeps their float64 temporaries near 32 MB whatever the set's size.
_CELLS_PER_BLOCK = 1 << 22


def roc_auc_resampled(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """AUC of every bootstrap resample at once, from how often each image was drawn.

  Args:
    y: truth 0/1, shape (n,).
    p: scores, shape (n,) or (n, k) (one AUC per column).
    counts: (B, n) times each image appears in each resample (one block of `bootstrap_ci`'s).

  Returns:
    (B,) or (B, k) AUCs, nan where a resample holds one class only. Equal (to float rounding) to
    `roc_auc` on the resampled images: an image drawn twice weighs 2 in the Mann-Whitney sum and
    a tie between classes counts 1/2. Each positive's negatives below and tied come from one
    sort (searchsorted), each resample's from prefix sums of its negatives' counts: O(B n) array
    work where the loop it replaces ranked every resample in Python.
  """
  y = np.asarray(y)
  p = np.asarray(p, dtype=np.float64)
  counts = np.asarray(counts)
  if p.ndim == 2:
    return np.stack([roc_auc_resampled(y, p[:, j], counts) for j in range(p.shape[1])], axis=1)
  positive = y == 1
  negative_order = np.flatnonzero(~positive)[np.argsort(p[~positive], kind="stable")]
  negative_scores = p[negative_order]
  below = np.searchsorted(negative_scores, p[positive], side="left")  # Negatives scored lower.
  up_to = np.searchsorted(negative_scores, p[positive], side="right")  # ... lower or tied.
  # Images along axis 0 (resamples along axis 1): the gathers below copy whole rows.
  weights = np.ascontiguousarray(counts.T, dtype=np.float64)
  w_pos = weights[positive]
  prefix = np.zeros((negative_order.shape[0] + 1, weights.shape[1]))
  np.cumsum(weights[negative_order], axis=0, out=prefix[1:])  # prefix[j]: the j lowest negatives.
  wins = 0.5 * np.einsum("ib,ib->b", w_pos, prefix[below] + prefix[up_to])
  pairs = w_pos.sum(axis=0) * prefix[-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


roc_auc.resampled = roc_auc_resampled


def _cluster_of_image(n: int, clusters: Any) -> tuple[np.ndarray, int]:
  """(cluster index 0..k-1 of each image, k) for the clustered bootstrap."""
  clusters = np.asarray(clusters)
  if clusters.shape != (n,):
    raise ValueError(f"clusters must have shape ({n},), got {clusters.shape}")
  _, cluster_of_image = np.unique(clusters, return_inverse=True)
  return cluster_of_image, int(cluster_of_image.max()) + 1


def bootstrap_indices(
  n: int, *, clusters: Any = None, n_resamples: int = 2000, seed: int = 0
) -> Any:
  """Yields ``n_resamples`` index arrays: plain, or patient-clustered when ``clusters`` is given.

  A clustered resample draws as many patients as there are, with replacement, and takes every
  image of each drawn patient (a patient drawn twice contributes its images twice), so resample
  sizes vary.
  """
  rng = np.random.default_rng(seed)
  if clusters is None:
    for _ in range(n_resamples):
      yield rng.integers(0, n, n)
    return
  cluster_of_image, n_clusters = _cluster_of_image(n, clusters)
  image_index = np.arange(n)
  for _ in range(n_resamples):
    times_drawn = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
    yield np.repeat(image_index, times_drawn[cluster_of_image])


def _count_blocks(n: int, clusters: Any, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
  """`bootstrap_counts` in blocks of rows (at most `_CELLS_PER_BLOCK` cells each), so that memory
  stays bounded for large sets: the generator's stream is consumed draw by draw, so blocks of any
  size give the rows `bootstrap_indices` draws one at a time."""
  rng = np.random.default_rng(seed)
  if clusters is None:
    cluster_of_image, units = None, n
  else:
    cluster_of_image, units = _cluster_of_image(n, clusters)
  rows = max(1, _CELLS_PER_BLOCK // max(n, units))
  for start in range(0, n_resamples, rows):
    m = min(rows, n_resamples - start)
    draws = rng.integers(0, units, (m, units))
    # One bincount for the block: row r's draws are offset by r * units.
    flat = (draws + np.arange(m)[:, None] * units).ravel()
    times_drawn = np.bincount(flat, minlength=m * units).reshape(m, units).astype(np.int32)
    yield times_drawn if cluster_of_image is None else times_drawn[:, cluster_of_image]


def bootstrap_counts(
  n: int, *, clusters: Any = None, n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
  """(n_resamples, n) times each image appears in each resample of `bootstrap_indices` with the
  same arguments (the same random draws, so both give the same intervals)."""
  return np.concatenate(list(_count_blocks(n, clusters, n_resamples, seed)), axis=0)


def bootstrap_ci(
  metric_fn: Callable[[np.ndarray, np.ndarray], float],
  y: Any,
  p: Any,
  *,
  clusters: Any = None,
  n: int = 2000,
  alpha: float = 0.05,
  seed: int = 0,
) -> Interval:
  """Percentile bootstrap interval of ``metric_fn(y, p)``.

  Args:
    metric_fn: ``(y, p) -> float``; ``p`` is indexed along axis 0, so it may be (n, k) to bootstrap
      several score columns jointly (paired comparisons).
    y: truth 0/1, shape (n,).
    p: scores, shape (n,) or (n, k).
    clusters: patient ids, shape (n,); when given, patients are resampled (clustered bootstrap).
    n: number of resamples drawn.
    alpha: 1 - coverage (0.05 gives a 95% interval).
    seed: seed of the resampling; the same seed gives the same resamples for the same shapes.

  Returns:
    An `Interval`. Resamples holding one class only, or where the metric is nan, are skipped and
    counted (``n_skipped_one_class``, ``n_skipped_nan``); if none remain the interval is (nan, nan).

  A ``metric_fn`` that carries ``metric_fn.resampled(y, p, counts) -> (B,) values`` (``counts``
  from `bootstrap_counts`) is evaluated for all resamples at once: `roc_auc`, `threshold_metric`,
  the operating points of `specificity_at_sensitivity` and `sensitivity_at_specificity`. Any
  other is called once per resample. Both give the same interval.
  """
  y, p = check_binary(y, p)
  resampled = getattr(metric_fn, "resampled", None)
  if resampled is not None:
    blocks, skipped_one_class, skipped_nan = [], 0, 0
    for counts in _count_blocks(y.shape[0], clusters, n, seed):
      positives = counts @ y.astype(np.int64)
      one_class = (positives == 0) | (positives == counts.sum(axis=1))
      drawn = np.asarray(resampled(y, p, counts[~one_class]), dtype=np.float64)
      blocks.append(drawn[~np.isnan(drawn)])
      skipped_one_class += int(one_class.sum())
      skipped_nan += int(np.isnan(drawn).sum())
    values = np.concatenate(blocks)
  else:
    values = []
    skipped_one_class = skipped_nan = 0
    for idx in bootstrap_indices(y.shape[0], clusters=clusters, n_resamples=n, seed=seed):
      y_resampled = y[idx]
      if not _has_both_classes(y_resampled):
        skipped_one_class += 1
        continue
      value = float(metric_fn(y_resampled, p[idx]))
      if np.isnan(value):
        skipped_nan += 1
        continue
      values.append(value)
  if len(values):
    lo, hi = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
  else:
    lo = hi = float("nan")
  return Interval(
    lo,
    hi,
    method="bootstrap-clustered" if clusters is not None else "bootstrap",
    alpha=alpha,
    n_resamples=len(values),
    n_skipped_one_class=skipped_one_class,
    n_skipped_nan=skipped_nan,
  )


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """AUCs (k,) and their DeLong covariance (k, k) for score columns (n, k); Sun & Xu (2014).

  Midranks within positives, within negatives and overall give DeLong's structural components in
  O(n log n) instead of the O(m n) pairwise kernel.
  """
  positives = scores[y == 1]
  negatives = scores[y == 0]
  m, n = positives.shape[0], negatives.shape[0]
  if m < 2 or n < 2:
    raise ValueError(f"DeLong needs at least 2 cases per class; got {m} positive and {n} negative")
  rank_pos = midranks(positives)
  rank_neg = midranks(negatives)
  rank_all = midranks(np.concatenate([positives, negatives]))
  aucs = rank_all[:m].sum(axis=0) / (m * n) - (m + 1.0) / (2.0 * n)
  # V10: for each positive, the fraction of negatives it outranks; V01: per negative, likewise.
  v10 = (rank_all[:m] - rank_pos) / n
  v01 = 1.0 - (rank_all[m:] - rank_neg) / m
  cov = np.atleast_2d(np.cov(v10, rowvar=False)) / m + np.atleast_2d(np.cov(v01, rowvar=False)) / n
  return aucs, cov


def delong_ci(y: Any, p: Any, *, alpha: float = 0.05) -> Interval:
  """DeLong interval for one AUC: ``auc ± z * se``, clipped to [0, 1].

  Assumes images are independent; with several images per patient prefer the clustered bootstrap.
  The returned `Interval` carries ``estimate`` and ``se``.
  """
  y, p = check_binary(y, p)
  aucs, cov = _delong_components(y, p.reshape(-1, 1))
  auc, se = float(aucs[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
  z = scipy.special.ndtri(1.0 - alpha / 2.0)  # The standard normal's quantile.
  return Interval(
    max(auc - z * se, 0.0),
    min(auc + z * se, 1.0),
    method="delong",
    alpha=alpha,
    estimate=auc,
    se=se,
  )


def delong_test(y: Any, p1: Any, p2: Any) -> dict[str, float]:
  """Paired DeLong test of two models' AUCs on the same cases (fast DeLong, Sun & Xu 2014).

  Returns:
    ``dict(auc1, auc2, diff=auc1-auc2, se, z, p_value)`` (two-sided). When the variance of the
    difference is 0 (e.g. identical scores), ``z`` is nan and ``p_value`` is 1 if the AUCs are
    equal.
  """
  y, p1 = check_binary(y, p1)
  _, p2 = check_binary(y, p2)
  if p1.ndim != 1 or p2.ndim != 1:
    raise ValueError("delong_test compares two 1-D score vectors")
  aucs, cov = _delong_components(y, np.stack([p1, p2], axis=1))
  diff = float(aucs[0] - aucs[1])
  variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
  if variance > 1e-18:
    z = diff / np.sqrt(variance)
    p_value = float(2.0 * scipy.special.ndtr(-abs(z)))  # The normal's two tails.
  else:
    z = float("nan")
    p_value = 1.0 if abs(diff) < 1e-12 else float("nan")
  return {
    "auc1": float(aucs[0]),
    "auc2": float(aucs[1]),
    "diff": diff,
    "se": float(np.sqrt(max(variance, 0.0))),
    "z": float(z),
    "p_value": p_value,
  }


# ----------------------------------------------------------------------------------------------
# Operating points.
# ----------------------------------------------------------------------------------------------


def roc_points(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve at every distinct score: ``(fpr, tpr, thresholds)``, thresholds decreasing.

  The first point is (0, 0) at threshold +inf; point i calls ``p >= thresholds[i]`` positive.
  Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
  """
  y, p = check_binary(y, p)
  return _roc_points_unchecked(y, p)


def _roc_points_unchecked(y: np.ndarray, p: np.ndarray):
  order = np.argsort(-p, kind="mergesort")
  p_sorted, y_sorted = p[order], y[order]
  last_of_each_score = np.r_[np.flatnonzero(np.diff(p_sorted)), y.shape[0] - 1]
  tps = np.cumsum(y_sorted, dtype=np.int64)[last_of_each_score]
  fps = last_of_each_score + 1 - tps
  n_pos, n_neg = int(y.sum()), int(y.shape[0] - y.sum())
  tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.shape[0] + 1, np.nan)
  fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(tps.shape[0] + 1, np.nan)
  return fpr, tpr, np.r_[np.inf, p_sorted[last_of_each_score]]


def _roc_resampled(y: np.ndarray, p: np.ndarray, counts: np.ndarray):
  """(fpr, tpr) of every resample's ROC curve, each (G + 1, B): the curve of
  `_roc_points_unchecked` at all G distinct scores of `p` (descending, (0, 0) first). A score no
  image of a resample holds repeats the previous point, which moves no operating point below.
  Resamples must hold both classes (else their rates are nan)."""
  order = np.argsort(-p, kind="mergesort")
  scores = p[order]
  starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
  weights = np.asarray(counts).T[order].astype(np.float64)  # (n, B): images in score order.
  positive = (np.asarray(y)[order] == 1)[:, None]
  rates = []
  for in_class in (~positive, positive):
    cumulative = np.zeros((starts.shape[0] + 1, weights.shape[1]))
    np.cumsum(np.add.reduceat(np.where(in_class, weights, 0.0), starts, axis=0), axis=0,
              out=cumulative[1:])  # fmt: skip
    with np.errstate(invalid="ignore", divide="ignore"):
      rates.append(cumulative / cumulative[-1])
  return rates[0], rates[1]


def specificity_at_sensitivity_resampled(
  y: np.ndarray, p: np.ndarray, counts: np.ndarray, target_sens: Any
) -> np.ndarray:
  """`specificity_at_sensitivity_point(...)[0]` of every resample (rows of `counts`) at once;
  `target_sens` is one number or one per resample."""
  fpr, tpr = _roc_resampled(y, p, counts)
  first = np.argmax(tpr >= np.asarray(target_sens) - _TARGET_TOLERANCE, axis=0)
  return 1.0 - fpr[first, np.arange(fpr.shape[1])]


def sensitivity_at_specificity_resampled(
  y: np.ndarray, p: np.ndarray, counts: np.ndarray, target_spec: Any
) -> np.ndarray:
  """`sensitivity_at_specificity_point(...)[0]` of every resample at once (see above)."""
  fpr, tpr = _roc_resampled(y, p, counts)
  reached = (1.0 - fpr) >= np.asarray(target_spec) - _TARGET_TOLERANCE
  last = reached.shape[0] - 1 - np.argmax(reached[::-1], axis=0)  # (0, 0) always qualifies.
  return tpr[last, np.arange(tpr.shape[1])]


def youden_threshold(y: Any, p: Any) -> float:
  """The score threshold maximising sensitivity + specificity - 1 (Youden's J).

  Returns an observed score (rule ``p >= t``); among equal J the highest threshold wins. Choose it
  on validation data and apply it to the test set: chosen on the test set it is optimistic.
  """
  y, p = check_binary(y, p)
  if not _has_both_classes(y):
    raise ValueError("Youden's threshold needs both classes")
  fpr, tpr, thresholds = _roc_points_unchecked(y, p)
  return float(thresholds[1 + int(np.argmax((tpr - fpr)[1:]))])


def threshold_metrics(y: Any, p: Any, threshold: float) -> dict[str, float]:
  """Confusion counts and ratios when ``p >= threshold`` is called malignant.

  Ratios with a zero denominator are nan, not 0 (e.g. ``ppv`` when nothing is called positive,
  ``sensitivity`` when there are no malignant cases); ``balanced_accuracy`` is nan if either part
  is.

  Returns:
    ``dict(accuracy, sensitivity, specificity, ppv, npv, f1, balanced_accuracy, tp, fp, tn, fn)``.
  """
  y, p = check_binary(y, p)
  called = p >= threshold
  truth = y == 1
  tp = int(np.sum(called & truth))
  fp = int(np.sum(called & ~truth))
  tn = int(np.sum(~called & ~truth))
  fn = int(np.sum(~called & truth))
  sensitivity = _ratio(tp, tp + fn)
  specificity = _ratio(tn, tn + fp)
  return {
    "accuracy": _ratio(tp + tn, y.shape[0]),
    "sensitivity": sensitivity,
    "specificity": specificity,
    "ppv": _ratio(tp, tp + fp),
    "npv": _ratio(tn, tn + fn),
    "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    "balanced_accuracy": (sensitivity + specificity) / 2.0,  # nan propagates.
    "tp": tp,
    "fp": fp,
    "tn": tn,
    "fn": fn,
  }


def threshold_metrics_resampled(
  y: np.ndarray, p: np.ndarray, counts: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
  """`threshold_metrics` of every resample at once, from how often each image was drawn
  (`counts`, (B, n)): a dict of (B,) arrays, nan where a denominator is zero."""
  called = np.asarray(p) >= threshold
  truth = np.asarray(y) == 1
  counts = np.asarray(counts, np.int64)
  tp, fp, tn, fn = (
    counts @ (a & b).astype(np.int64)
    for a, b in ((called, truth), (called, ~truth), (~called, ~truth), (~called, truth))
  )

  def ratio(numerator, denominator):
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)

  sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
  return {
    "accuracy": ratio(tp + tn, tp + fp + tn + fn),
    "sensitivity": sensitivity,
    "specificity": specificity,
    "ppv": ratio(tp, tp + fp),
    "npv": ratio(tn, tn + fn),
    "f1": ratio(2 * tp, 2 * tp + fp + fn),
    "balanced_accuracy": (sensitivity + specificity) / 2.0,
    "tp": tp,
    "fp": fp,
    "tn": tn,
    "fn": fn,
  }


def threshold_metric(name: str, threshold: float) -> Callable[[Any, Any], float]:
  """``(y, p) -> threshold_metrics(y, p, threshold)[name]``, which `bootstrap_ci` evaluates for
  all resamples at once."""
  if name not in _THRESHOLD_METRIC_NAMES:
    raise ValueError(
      f"unknown threshold metric {name!r}; expected one of {_THRESHOLD_METRIC_NAMES}"
    )

  def metric(y: Any, p: Any) -> float:
    return threshold_metrics(y, p, threshold)[name]

  metric.resampled = lambda y, p, counts: threshold_metrics_resampled(y, p, counts, threshold)[name]
  return metric


_THRESHOLD_METRIC_NAMES = (
  "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy",
  "tp", "fp", "tn", "fn",
)  # fmt: skip


def specificity_at_sensitivity_point(
  y: np.ndarray, p: np.ndarray, target_sens: float
) -> tuple[float, float, float]:
  """(specificity, achieved sensitivity, threshold) of the best point with sens >= target.

  No validation and no interval: the fast core for bootstraps. ``y`` must hold both classes.
  """
  fpr, tpr, thresholds = _roc_points_unchecked(y, p)
  # tpr and fpr never decrease along the curve: the first point reaching the target has least fpr.
  i = int(np.argmax(tpr >= target_sens - _TARGET_TOLERANCE))
  return 1.0 - float(fpr[i]), float(tpr[i]), float(thresholds[i])


def sensitivity_at_specificity_point(
  y: np.ndarray, p: np.ndarray, target_spec: float
) -> tuple[float, float, float]:
  """(sensitivity, achieved specificity, threshold) of the best point with spec >= target.

  No validation and no interval: the fast core for bootstraps. ``y`` must hold both classes.
  """
  fpr, tpr, thresholds = _roc_points_unchecked(y, p)
  i = int(np.flatnonzero(1.0 - fpr >= target_spec - _TARGET_TOLERANCE)[-1])
  return float(tpr[i]), 1.0 - float(fpr[i]), float(thresholds[i])


def specificity_at_sensitivity(
  y: Any,
  p: Any,
  target_sens: float,
  *,
  clusters: Any = None,
  n_bootstrap: int = 2000,
  alpha: float = 0.05,
  seed: int = 0,
) -> dict[str, Any]:
  """Best specificity among thresholds whose sensitivity is at least ``target_sens``.

  The interval re-chooses the threshold inside every resample (the target stays fixed), so it
  covers the uncertainty of the operating point, not of one frozen threshold.

  Returns:
    ``dict(target_sensitivity, specificity, sensitivity (achieved), threshold, ci)``;
    ``ci`` is an `Interval`, or None when ``n_bootstrap`` is 0.
  """
  y, p = check_binary(y, p)
  if not _has_both_classes(y):
    raise ValueError("specificity at sensitivity needs both classes")
  spec, sens, threshold = specificity_at_sensitivity_point(y, p, target_sens)
  ci = None
  if n_bootstrap:

    def metric(yy, pp):
      return specificity_at_sensitivity_point(yy, pp, target_sens)[0]

    metric.resampled = lambda yy, pp, counts: specificity_at_sensitivity_resampled(
      yy, pp, counts, target_sens
    )
    ci = bootstrap_ci(
      metric,
      y,
      p,
      clusters=clusters,
      n=n_bootstrap,
      alpha=alpha,
      seed=seed,
    )
  return {
    "target_sensitivity": float(target_sens),
    "specificity": spec,
    "sensitivity": sens,
    "threshold": threshold,
    "ci": ci,
  }


def sensitivity_at_specificity(
  y: Any,
  p: Any,
  target_spec: float,
  *,
  clusters: Any = None,
  n_bootstrap: int = 2000,
  alpha: float = 0.05,
  seed: int = 0,
) -> dict[str, Any]:
  """Best sensitivity among thresholds whose specificity is at least ``target_spec``.

  Returns:
    ``dict(target_specificity, sensitivity, specificity (achieved), threshold, ci)``; see
    `specificity_at_sensitivity` for how the interval is made.
  """
  y, p = check_binary(y, p)
  if not _has_both_classes(y):
    raise ValueError("sensitivity at specificity needs both classes")
  sens, spec, threshold = sensitivity_at_specificity_point(y, p, target_spec)
  ci = None
  if n_bootstrap:

    def metric(yy, pp):
      return sensitivity_at_specificity_point(yy, pp, target_spec)[0]

    metric.resampled = lambda yy, pp, counts: sensitivity_at_specificity_resampled(
      yy, pp, counts, target_spec
    )
    ci = bootstrap_ci(
      metric,
      y,
      p,
      clusters=clusters,
      n=n_bootstrap,
      alpha=alpha,
      seed=seed,
    )
  return {
    "target_specificity": float(target_spec),
    "sensitivity": sens,
    "specificity": spec,
    "threshold": threshold,
    "ci": ci,
  }


def net_benefit(y: Any, p: Any, thresholds: Any) -> np.ndarray:
  """Net benefit of acting on ``p >= t`` at each threshold probability t (Vickers & Elkin
  2006): TP/n - FP/n * t / (1 - t), the true positives gained per patient after charging each
  false positive the harm that t implies. Meaningful for calibrated probabilities only."""
  y, p = check_binary(y, p, probabilities=True)
  t = np.asarray(thresholds, np.float64)
  if np.any((t <= 0) | (t >= 1)):
    raise ValueError("decision thresholds must lie strictly between 0 and 1")
  called = p[None, :] >= t[:, None]
  tp = np.sum(called & (y[None, :] == 1), axis=1) / y.shape[0]
  fp = np.sum(called & (y[None, :] == 0), axis=1) / y.shape[0]
  return tp - fp * t / (1.0 - t)


def decision_curve(y: Any, p: Any, thresholds: Any = None) -> dict[str, np.ndarray]:
  """Net benefit of the model, of treating everyone (biopsy all) and of treating no one (0), at
  threshold probabilities 0.05 .. 0.95 unless given."""
  y, p = check_binary(y, p, probabilities=True)
  t = np.round(np.arange(0.05, 0.951, 0.05), 2) if thresholds is None else np.asarray(thresholds)
  return {
    "thresholds": t,
    "model": net_benefit(y, p, t),
    "treat_all": net_benefit(y, np.ones_like(p), t),
    "treat_none": np.zeros_like(t, dtype=np.float64),
  }


def mcnemar(y: Any, calls_a: Any, calls_b: Any) -> dict[str, Any]:
  """Exact McNemar test of two sets of 0/1 calls on the same images: ``a_only`` images called
  right by a alone, ``b_only`` by b alone; the two-sided binomial p-value of the split of the
  discordant images. Assumes independent images (optimistic for clustered data)."""
  y = np.asarray(y).astype(bool)
  right_a = np.asarray(calls_a).astype(bool) == y
  right_b = np.asarray(calls_b).astype(bool) == y
  a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
  discordant = a_only + b_only
  if discordant == 0:
    p_value = 1.0
  else:
    import scipy.stats  # Here: 0.6-1 s to import, and only reader comparisons need it.

    p_value = scipy.stats.binomtest(a_only, discordant).pvalue
  return {"a_only": a_only, "b_only": b_only, "p_value": float(p_value)}
