"""Calibration of predicted probabilities: ECE, reliability curve, Brier score, log loss.

Binary functions take ``y`` (0/1, malignant = 1) and ``p`` = p(malignant). Bins are equal-width on
[0, 1]: bin i holds ``i/n_bins <= p < (i+1)/n_bins``, and the last bin also holds ``p == 1``.
Equal-width ECE depends on the number of bins and is biased upwards on small sets (a perfectly
calibrated model with uniform p scores ~0.12 on 100 images and ~0.05 on 700 with 15 bins); report it
with its bin count and compare models on the same set only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from busjax.evaluators import metrics


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}")
  # p == 1 falls in the last bin rather than in an extra one.
  return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def _calibration_gaps(
  hits: np.ndarray, confidence: np.ndarray, n_bins: int
) -> dict[str, np.ndarray]:
  """Per-bin counts, mean confidence and observed frequency (nan in empty bins)."""
  bins = _bin_index(confidence, n_bins)
  counts = np.bincount(bins, minlength=n_bins)
  sum_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)
  sum_hits = np.bincount(bins, weights=hits.astype(np.float64), minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.where(counts > 0, sum_confidence / counts, np.nan)
    observed = np.where(counts > 0, sum_hits / counts, np.nan)
  return {
    "bin_edges": np.linspace(0.0, 1.0, n_bins + 1),
    "counts": counts,
    "mean_predicted": mean_confidence,
    "fraction_positive": observed,
  }


def _ece_from_curve(curve: dict[str, np.ndarray]) -> float:
  counts = curve["counts"]
  filled = counts > 0
  gaps = np.abs(curve["fraction_positive"][filled] - curve["mean_predicted"][filled])
  return float(np.sum(counts[filled] * gaps) / np.sum(counts))


def reliability_curve(y: Any, p: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
  """Data for a reliability diagram of p(malignant).

  Returns:
    ``dict(bin_edges (n_bins+1,), counts, mean_predicted, fraction_positive)``, the last three of
    shape (n_bins,), with nan where a bin is empty.
  """
  y, p = metrics.check_binary(y, p, probabilities=True)
  return _calibration_gaps(y, p, n_bins)


def expected_calibration_error(y: Any, p: Any, n_bins: int = 15) -> float:
  """ECE of p(malignant): sum over bins of (bin share) * |fraction malignant - mean p|."""
  return _ece_from_curve(reliability_curve(y, p, n_bins))


def ece_if_calibrated(
  p: Any, n_bins: int = 15, *, samples: int = 500, seed: int = 0
) -> dict[str, float]:
  """The ECE a *perfectly calibrated* model with these predictions would show on this many
  images: outcomes drawn as Bernoulli(p), `samples` times. Its mean and 95th percentile are the
  sampling-noise floor an observed ECE should be read against (on 60 images it is ~0.1)."""
  p = np.asarray(p, np.float64)
  if p.ndim != 1 or not len(p):
    raise ValueError(f"p must be a non-empty vector, got shape {p.shape}")
  rng = np.random.default_rng(seed)
  draws = rng.random((samples, len(p))) < p[None, :]
  bins = _bin_index(p, n_bins)
  counts = np.bincount(bins, minlength=n_bins)
  sum_p = np.bincount(bins, weights=p, minlength=n_bins)
  # Per draw, per bin: |observed positives - expected positives| / n, summed over bins.
  offsets = (np.arange(samples)[:, None] * n_bins + bins[None, :]).ravel()
  hits = np.bincount(offsets, weights=draws.ravel(), minlength=samples * n_bins)
  eces = np.abs(hits.reshape(samples, n_bins) - sum_p[None, :]).sum(axis=1) / counts.sum()
  return {"mean": float(eces.mean()), "p95": float(np.percentile(eces, 95)), "samples": samples}


def brier(y: Any, p: Any) -> float:
  """Brier score: mean squared difference between p(malignant) and the 0/1 truth."""
  y, p = metrics.check_binary(y, p, probabilities=True)
  return float(np.mean((p - y) ** 2))


def nll(y: Any, p: Any, eps: float = 1e-7) -> float:
  """Mean negative log-likelihood (log loss, nats) of the truth, with p clipped to [eps, 1-eps].

  The clip keeps one confidently wrong case from making the mean infinite.
  """
  y, p = metrics.check_binary(y, p, probabilities=True)
  p = np.clip(p, eps, 1.0 - eps)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def check_multiclass(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates integer labels (n,) and probability rows (n, C) that sum to 1."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or labels.shape != (probs.shape[0],):
    raise ValueError(f"expected labels (n,) and probs (n, C); got {labels.shape} and {probs.shape}")
  if not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0:
    raise ValueError("class probabilities must be finite and lie in [0, 1]")
  row_sums = probs.sum(axis=1)
  if not np.allclose(row_sums, 1.0, atol=1e-3):
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    raise ValueError(
      f"class probabilities must sum to 1 per row; row {worst} sums to "
      f"{row_sums[worst]:.4f} (pass softmax outputs, not logits)"
    )
  n_classes = probs.shape[1]
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes:
    raise ValueError(f"labels must be integers in [0, {n_classes}); got {np.unique(labels)[:5]}")
  return labels.astype(np.int64), probs


def top_label_ece(labels: Any, probs: Any, n_bins: int = 15) -> float:
  """Top-label ECE for C-class probabilities: calibration of the confidence of the argmax class."""
  labels, probs = check_multiclass(labels, probs)
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  return _ece_from_curve(_calibration_gaps(correct, confidence, n_bins))


def multiclass_brier(labels: Any, probs: Any) -> float:
  """Multi-class Brier score: mean over cases of the squared distance to the one-hot truth."""
  labels, probs = check_multiclass(labels, probs)
  one_hot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def multiclass_nll(labels: Any, probs: Any, eps: float = 1e-7) -> float:
  """Mean negative log-probability of the true class (nats), clipped at eps."""
  labels, probs = check_multiclass(labels, probs)
  return float(-np.mean(np.log(np.clip(probs[np.arange(labels.shape[0]), labels], eps, 1.0))))


def adaptive_calibration_error(y: Any, p: Any, n_bins: int = 15) -> float:
  """ECE with equal-mass bins (adaptive ECE; Nixon et al. 2019): each bin holds ~n/n_bins images
  sorted by p, so sparse regions of p do not get bins of one or two images."""
  y, p = metrics.check_binary(y, p, probabilities=True)
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}")
  order = np.argsort(p, kind="stable")
  total = 0.0
  for members in np.array_split(order, min(n_bins, len(order))):
    if len(members):
      total += len(members) * abs(float(y[members].mean()) - float(p[members].mean()))
  return total / len(p)


def apply_temperature(probs: Any, temperature: float, eps: float = 1e-12) -> np.ndarray:
  """Class probabilities (n, C) rescaled by a temperature: softmax(log(probs) / T).

  log(probs) equals the logits up to a per-row constant, which the softmax ignores, so this is
  temperature scaling of the model's logits. T > 1 softens, T < 1 sharpens; the argmax and the
  ranking of p(class) (hence every AUC) are unchanged.
  """
  probs = np.asarray(probs, np.float64)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  scaled = np.log(np.clip(probs, eps, 1.0)) / float(temperature)
  scaled -= scaled.max(axis=1, keepdims=True)
  out = np.exp(scaled)
  return out / out.sum(axis=1, keepdims=True)


def fit_temperature(labels: Any, probs: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
  """The temperature minimising the NLL of `apply_temperature(probs, T)` on (labels, probs):
  temperature scaling (Guo et al. 2017), fitted on validation data only.

  A one-parameter convex problem in log T, solved by bounded scalar minimisation; with one class
  only, or perfectly separated data, the optimum runs to a bound, which is returned.
  """
  from scipy import optimize

  labels, probs = check_multiclass(labels, probs)

  def loss(log_t: float) -> float:
    return multiclass_nll(labels, apply_temperature(probs, float(np.exp(log_t))), eps=1e-12)

  lo, hi = np.log(bounds[0]), np.log(bounds[1])
  found = optimize.minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
  return float(np.exp(found.x))
