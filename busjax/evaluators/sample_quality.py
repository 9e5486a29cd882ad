"""Generated vs real samples in a feature space: KID, Fréchet distance, precision/recall, copies.

Every function takes feature arrays of shape ``[n, d]`` (any float dtype; computed in float64) and
does not care where they came from. Inception-v3 weights cannot be downloaded here, so the features
come from the trained classifier or an SSL encoder: the numbers are therefore **not** comparable
with published FID/KID values, nor between two feature spaces (or two checkpoints of one encoder).
That is why `summary` requires the caller to name the feature space, and why the Fréchet distance
is not called FID anywhere in this module. `filter_candidates` (which generated images GAN
rebalancing keeps) and `save_grid` (a sample grid marked SYNTHETIC) live here too.

Conventions:

* ``real`` is held-out real data (never the generator's training set); ``fake`` is generated;
  ``train`` is what the generator was trained on (memorisation only).
* Distances are Euclidean. Pairwise distances are exact (no approximate neighbour search) and
  computed in row batches of ``batch_size``, so a few thousand samples per set fit in memory.
* Everything is deterministic: the only randomness is KID's subset sampling, driven by ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import scipy.linalg

# Quantiles reported for distance distributions, as (name, quantile).
_QUANTILES = (
  ("min", 0.0),
  ("p01", 0.01),
  ("p05", 0.05),
  ("p25", 0.25),
  ("median", 0.5),
  ("p75", 0.75),
  ("max", 1.0),
)


def _check_features(x: Any, name: str, *, min_rows: int = 1) -> np.ndarray:
  """``x`` as a finite float64 ``[n, d]`` array; raises ValueError naming ``name`` otherwise."""
  try:
    x = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a float array of shape [n, d]: {e}") from e
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [n, d], got shape {x.shape}")
  if x.shape[1] == 0:
    raise ValueError(f"{name} has no feature columns (shape {x.shape})")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} samples here, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(x)))} NaN or inf values")
  return x


def _check_same_dim(**arrays: np.ndarray) -> None:
  dims = {name: x.shape[1] for name, x in arrays.items()}
  if len(set(dims.values())) > 1:
    described = ", ".join(f"{name} has {d}" for name, d in dims.items())
    raise ValueError(f"feature dimensions differ: {described}")


def _check_int(value: Any, name: str, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------------------------
# KID.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelDistance:
  """KID estimate: mean and spread of the unbiased MMD^2 over random subsets.

  Attributes:
    mean: mean of the per-subset unbiased MMD^2 estimates; the KID. It can be slightly negative
      when the two sets come from the same distribution (the estimator is unbiased, not clipped).
    std: standard deviation (ddof 0, as torch-fidelity reports it) of the per-subset estimates.
      Subsets overlap, so it is a spread, not a standard error of ``mean``.
    subsets: number of subsets actually evaluated.
    subset_size: samples per subset actually used (``min(subset_size, n_real, n_fake)``).
  """

  mean: float
  std: float
  subsets: int
  subset_size: int

  def to_dict(self) -> dict[str, Any]:
    """``{"mean", "std", "subsets", "subset_size"}`` for JSON reports."""
    return dataclasses.asdict(self)


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """KID's kernel ``(a . b / d + 1) ** 3`` for all pairs of rows."""
  return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) between the rows of x and of y.

  Within-set sums leave out the diagonal (a sample with itself); the cross term keeps every pair,
  which is unbiased because x and y are drawn independently.
  """
  m, n = x.shape[0], y.shape[0]
  k_xx = _polynomial_kernel(x, x)
  k_yy = _polynomial_kernel(y, y)
  k_xy = _polynomial_kernel(x, y)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(
  real: Any, fake: Any, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KernelDistance:
  """Kernel Inception Distance (Bińkowski et al. 2018) on the given features.

  For each of ``subsets`` rounds, draws ``subset_size`` real and ``subset_size`` fake samples
  without replacement and computes the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x . y / d + 1) ** 3``; reports the mean and spread over rounds (the same procedure
  as the reference implementation and torch-fidelity).

  When a set has fewer than ``subset_size`` samples, the subset size shrinks to the smaller set
  (and is reported). When both sets are no larger than that, every subset would be both whole sets
  and give the same value, so it is computed once (``subsets == 1``, ``std == 0``).

  Against a copy of the very same samples KID reads slightly below 0 (about
  ``-2 (E k(x,x) - E k(x,y)) / n``): subsets drawn independently share samples, and their large
  ``k(x, x)`` enters the cross term.

  Args:
    real: real features, ``[n_real, d]``, n_real >= 2.
    fake: generated features, ``[n_fake, d]``, n_fake >= 2.
    subsets: number of random subsets.
    subset_size: samples per subset and per set (1000 in the reference implementation).
    seed: seed of the subset sampling.

  Returns:
    A `KernelDistance` (``mean`` is the KID).
  """
  real = _check_features(real, "real", min_rows=2)
  fake = _check_features(fake, "fake", min_rows=2)
  _check_same_dim(real=real, fake=fake)
  subsets = _check_int(subsets, "subsets")
  subset_size = _check_int(subset_size, "subset_size", minimum=2)
  n_real, n_fake = real.shape[0], fake.shape[0]
  m = min(subset_size, n_real, n_fake)
  if m == n_real == n_fake:
    subsets = 1
  rng = np.random.default_rng(seed)
  estimates = np.empty(subsets)
  for i in range(subsets):
    real_subset = real[rng.choice(n_real, m, replace=False)]
    fake_subset = fake[rng.choice(n_fake, m, replace=False)]
    estimates[i] = _mmd2_unbiased(real_subset, fake_subset)
  return KernelDistance(
    mean=float(estimates.mean()), std=float(estimates.std()), subsets=subsets, subset_size=m
  )


# ----------------------------------------------------------------------------------------------
# Fréchet distance.
# ----------------------------------------------------------------------------------------------


def frechet_distance(real: Any, fake: Any, *, eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets: the FID formula, not FID.

  FID is this formula on Inception-v3 pool features; here the features are whatever the caller
  passes (classifier or SSL embeddings), so the value is not comparable with published FIDs or
  across feature spaces. Computed as in the reference implementation (pytorch-fid):
  ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 sqrtm(S_r S_f))`` with sample means and covariances
  (ddof 1); when the square root of the product is not finite (singular product), ``eps * I`` is
  added to both covariances; imaginary parts from round-off are discarded.

  It is biased upwards on small sets and unreliable when a set has no more samples than feature
  dimensions (rank-deficient covariance); compare values computed on equal set sizes only.

  Args:
    real: real features, ``[n_real, d]``, n_real >= 2.
    fake: generated features, ``[n_fake, d]``, n_fake >= 2.
    eps: diagonal offset used when the covariance product is singular.

  Returns:
    The distance (>= 0 up to round-off).

  Raises:
    ValueError: bad shapes, or a square root whose diagonal has an imaginary part above 1e-3 (the
      reference raises there too: the result would be meaningless).
  """
  real = _check_features(real, "real", min_rows=2)
  fake = _check_features(fake, "fake", min_rows=2)
  _check_same_dim(real=real, fake=fake)
  mu_real, mu_fake = real.mean(axis=0), fake.mean(axis=0)
  cov_real = np.atleast_2d(np.cov(real, rowvar=False))
  cov_fake = np.atleast_2d(np.cov(fake, rowvar=False))
  with warnings.catch_warnings():
    # Singular covariances (fewer samples than dimensions) are expected; `summary` flags them.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(cov_real @ cov_fake)
    if not np.all(np.isfinite(covmean)):
      offset = eps * np.eye(cov_real.shape[0])
      covmean = scipy.linalg.sqrtm((cov_real + offset) @ (cov_fake + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
      raise ValueError(
        "Fréchet distance: the covariance product's square root has an imaginary part of "
        f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too ill-conditioned"
      )
    covmean = covmean.real
  diff = mu_real - mu_fake
  return float(diff @ diff + np.trace(cov_real) + np.trace(cov_fake) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Exact nearest neighbours, in row batches.
# ----------------------------------------------------------------------------------------------


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq_norms: np.ndarray) -> np.ndarray:
  """``[len(a), len(b)]`` squared Euclidean distances via ``|a|^2 + |b|^2 - 2 a.b`` (one GEMM).

  Round-off can make near-zero values slightly negative; they are clipped at 0. Callers centre the
  features first so that the norms, and with them the round-off, stay small.
  """
  a_sq_norms = np.einsum("ij,ij->i", a, a)
  d2 = a_sq_norms[:, None] + b_sq_norms[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d2, 0.0, out=d2)


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def _kth_neighbour_sq_distance(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance from each row of x to its k-th nearest other row (itself excluded)."""
  sq_norms = np.einsum("ij,ij->i", x, x)
  out = np.empty(x.shape[0])
  for start, stop in _batches(x.shape[0], batch_size):
    d2 = _squared_distances(x[start:stop], x, sq_norms)
    # Excluded by index rather than by its zero distance, so duplicates still count as neighbours.
    d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
    out[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
  return out


def _inside_balls(
  queries: np.ndarray, centres: np.ndarray, sq_radii: np.ndarray, batch_size: int
) -> np.ndarray:
  """For each query row: is it within the radius of at least one centre? (bool, len(queries))."""
  sq_norms = np.einsum("ij,ij->i", centres, centres)
  out = np.empty(queries.shape[0], dtype=bool)
  for start, stop in _batches(queries.shape[0], batch_size):
    d2 = _squared_distances(queries[start:stop], centres, sq_norms)
    out[start:stop] = np.any(d2 <= sq_radii[None, :], axis=1)
  return out


def _nearest(
  queries: np.ndarray, points: np.ndarray, batch_size: int, *, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """Distance from each query row to its nearest row of ``points``, and that row's index.

  The neighbour is found with the batched GEMM; its distance is then recomputed directly from the
  difference, so an exact copy reads exactly 0 rather than GEMM round-off (~1e-7).
  With ``exclude_self``, queries are ``points`` and each row's own index is skipped.
  """
  centre = points.mean(axis=0)
  q, p = queries - centre, points - centre
  sq_norms = np.einsum("ij,ij->i", p, p)
  index = np.empty(queries.shape[0], dtype=np.int64)
  for start, stop in _batches(queries.shape[0], batch_size):
    d2 = _squared_distances(q[start:stop], p, sq_norms)
    if exclude_self:
      d2[np.arange(stop - start), np.arange(start, stop)] = np.inf
    index[start:stop] = np.argmin(d2, axis=1)
  return np.linalg.norm(queries - points[index], axis=1), index


# ----------------------------------------------------------------------------------------------
# Precision and recall.
# ----------------------------------------------------------------------------------------------


def precision_recall(real: Any, fake: Any, *, k: int = 3, batch_size: int = 1024) -> dict[str, Any]:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of balls around its samples, each ball's radius being the
  distance to that sample's k-th nearest neighbour in its own set (itself excluded). Precision is
  the fraction of fake samples inside the real manifold (fidelity); recall is the fraction of real
  samples inside the fake manifold (coverage; low under mode collapse). Both depend on ``k`` and
  on the set sizes: compare runs with equal sizes and the same ``k``.

  Args:
    real: real features, ``[n_real, d]``, n_real > k.
    fake: generated features, ``[n_fake, d]``, n_fake > k.
    k: neighbour defining the radii (3 in the paper).
    batch_size: rows per distance batch (memory ~ ``8 * batch_size * max(n_real, n_fake)`` bytes).

  Returns:
    ``{"precision", "recall", "k"}``.
  """
  k = _check_int(k, "k")
  batch_size = _check_int(batch_size, "batch_size")
  real = _check_features(real, "real", min_rows=k + 1)
  fake = _check_features(fake, "fake", min_rows=k + 1)
  _check_same_dim(real=real, fake=fake)
  centre = real.mean(axis=0)
  real, fake = real - centre, fake - centre
  real_sq_radii = _kth_neighbour_sq_distance(real, k, batch_size)
  fake_sq_radii = _kth_neighbour_sq_distance(fake, k, batch_size)
  return {
    "precision": float(np.mean(_inside_balls(fake, real, real_sq_radii, batch_size))),
    "recall": float(np.mean(_inside_balls(real, fake, fake_sq_radii, batch_size))),
    "k": k,
  }


# ----------------------------------------------------------------------------------------------
# Memorisation.
# ----------------------------------------------------------------------------------------------


def _quantile_summary(values: np.ndarray) -> dict[str, float]:
  return {name: float(np.quantile(values, q)) for name, q in _QUANTILES}


# eq=False: the generated __eq__ would compare arrays elementwise and raise on truth testing.
@dataclasses.dataclass(frozen=True, eq=False)
class Memorisation:
  """Nearest-training-sample distances of generated samples, and the real baseline they face.

  A fake much closer to a training sample than real held-out images ever are is a candidate
  near-copy of that training image.

  Attributes:
    fake_to_train: ``[n_fake]`` distance of each fake to its nearest training sample.
    nearest_train: ``[n_fake]`` index of that training sample.
    reference_to_train: the baseline: each reference (held-out real) sample's distance to its
      nearest training sample, or, without a reference, each training sample's distance to its
      nearest other training sample.
    baseline: ``"reference"`` or ``"train_leave_one_out"``.
  """

  fake_to_train: np.ndarray
  nearest_train: np.ndarray
  reference_to_train: np.ndarray
  baseline: str

  def threshold(self, quantile: float) -> float:
    """The ``quantile`` of the baseline distances (linear interpolation)."""
    if not 0.0 <= quantile <= 1.0:
      raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    return float(np.quantile(self.reference_to_train, quantile))

  def keep_mask(self, quantile: float = 0.05) -> np.ndarray:
    """Bool ``[n_fake]``: True for fakes farther from train than ``threshold(quantile)``.

    Fakes at or below the threshold are dropped, so exact copies (distance 0) are dropped even
    when the threshold itself is 0 (a reference sample duplicating a training one).
    """
    return self.fake_to_train > self.threshold(quantile)

  def fraction_at_or_below(self, quantile: float) -> float:
    """Fraction of fakes at or below ``threshold(quantile)``: those ``keep_mask`` drops.

    For fakes as far from train as real held-out images are, it is about ``quantile``.
    """
    return float(np.mean(~self.keep_mask(quantile)))

  def closest(self, n: int = 10) -> np.ndarray:
    """Indices of the ``n`` fakes nearest to a training sample, nearest first (ties by index)."""
    n = _check_int(n, "n", minimum=0)
    return np.argsort(self.fake_to_train, kind="stable")[:n]

  def to_dict(self, *, n_closest: int = 10, per_sample: bool = False) -> dict[str, Any]:
    """Summary for JSON reports; the per-sample arrays only with ``per_sample``.

    Returns:
      ``{"baseline", "n_reference", "fake_to_train" (quantiles), "reference_to_train"
      (quantiles), "fraction_at_or_below_reference_p01", "..._p05", "n_fake_exact_copies",
      "n_reference_exact_copies", "closest": [{"fake_index", "train_index", "distance"}]}``.
    """
    summary = {
      "baseline": self.baseline,
      "n_reference": int(self.reference_to_train.shape[0]),
      "fake_to_train": _quantile_summary(self.fake_to_train),
      "reference_to_train": _quantile_summary(self.reference_to_train),
      "fraction_at_or_below_reference_p01": self.fraction_at_or_below(0.01),
      "fraction_at_or_below_reference_p05": self.fraction_at_or_below(0.05),
      "n_fake_exact_copies": int(np.sum(self.fake_to_train == 0.0)),
      # Nonzero means held-out images duplicate training ones: a split leak, which also drags the
      # baseline (and the guard's threshold) down.
      "n_reference_exact_copies": int(np.sum(self.reference_to_train == 0.0)),
      "closest": [
        {
          "fake_index": int(i),
          "train_index": int(self.nearest_train[i]),
          "distance": float(self.fake_to_train[i]),
        }
        for i in self.closest(n_closest)
      ],
    }
    if per_sample:
      summary["per_sample"] = {
        "fake_to_train": self.fake_to_train.tolist(),
        "nearest_train": self.nearest_train.tolist(),
        "reference_to_train": self.reference_to_train.tolist(),
      }
    return summary


def memorisation(
  train: Any, fake: Any, *, reference: Any = None, batch_size: int = 1024
) -> Memorisation:
  """Distances from generated samples to their nearest training sample, with a real baseline.

  Pass the held-out real set as ``reference``, split from ``train`` by patient: its distances to
  train are what "new image of the same distribution" looks like. Without it the baseline is
  leave-one-out within train, which is lower (so the guard is more lenient) when train holds
  several near-identical images of one patient.

  Args:
    train: the generator's training features, ``[n_train, d]`` (>= 2 without a reference).
    fake: generated features, ``[n_fake, d]``.
    reference: held-out real features, ``[n_ref, d]``, or None.
    batch_size: rows per distance batch.

  Returns:
    A `Memorisation`; ``.keep_mask(quantile)`` is the guard, ``.to_dict()`` the report.
  """
  batch_size = _check_int(batch_size, "batch_size")
  train = _check_features(train, "train", min_rows=1 if reference is not None else 2)
  fake = _check_features(fake, "fake")
  if reference is not None:
    reference = _check_features(reference, "reference")
    _check_same_dim(train=train, fake=fake, reference=reference)
  else:
    _check_same_dim(train=train, fake=fake)
  fake_to_train, nearest_train = _nearest(fake, train, batch_size)
  if reference is not None:
    reference_to_train, _ = _nearest(reference, train, batch_size)
    baseline = "reference"
  else:
    reference_to_train, _ = _nearest(train, train, batch_size, exclude_self=True)
    baseline = "train_leave_one_out"
  return Memorisation(
    fake_to_train=fake_to_train,
    nearest_train=nearest_train,
    reference_to_train=reference_to_train,
    baseline=baseline,
  )


def memorisation_mask(
  train: Any, fake: Any, *, reference: Any = None, quantile: float = 0.05, batch_size: int = 1024
) -> np.ndarray:
  """Memorisation guard: keep mask over fakes, dropping those suspiciously close to train.

  A fake is dropped when its nearest-train distance is at or below the ``quantile`` of the
  baseline (reference-to-train) distances; see `memorisation` for the baseline.

  Returns:
    Bool ``[n_fake]``, True = keep.
  """
  result = memorisation(train, fake, reference=reference, batch_size=batch_size)
  return result.keep_mask(quantile)


# ----------------------------------------------------------------------------------------------
# A quality filter for generated samples (GAN rebalancing)
# ----------------------------------------------------------------------------------------------


def filter_candidates(
  *,
  d_scores: np.ndarray,
  p_minority: np.ndarray,
  features: np.ndarray,
  minority_features: np.ndarray,
  train_features: np.ndarray,
  reference_features: np.ndarray | None,
  rebalance_config,
) -> dict[str, np.ndarray]:
  """Keep masks over candidates, stage by stage; ``"keep"`` is their conjunction.

  Args:
    d_scores: D1's output per candidate (higher = more real).
    p_minority: the previous classifier's probability of the minority class.
    features: the candidates' pooled classifier features.
    minority_features: real minority training images' features (the distance filter).
    train_features: every training image's features (the memorisation guard).
    reference_features: held-out real images' features, the guard's baseline distances
      (None: leave-one-out distances within train).
    rebalance_config: ``config.rebalance``.
  """
  r = rebalance_config
  masks = {
    "discriminator": d_scores >= np.quantile(d_scores, r.d_quantile),
    "confidence": p_minority >= r.min_confidence,
  }
  if len(minority_features) >= 2:
    minority_features = np.asarray(minority_features, np.float64)
    to_real, _ = _nearest(minority_features, minority_features, 1024, exclude_self=True)
    radius = np.quantile(to_real, r.distance_quantile)
    to_candidates, _ = _nearest(np.asarray(features, np.float64), minority_features, 1024)
    masks["distance"] = to_candidates <= radius
  else:
    masks["distance"] = np.ones(len(features), bool)
  masks["memorisation"] = memorisation_mask(
    train_features, features, reference=reference_features, quantile=r.memorisation_quantile
  )
  keep = np.ones(len(features), bool)
  for mask in masks.values():
    keep &= mask
  masks["keep"] = keep
  return masks


# ----------------------------------------------------------------------------------------------
# Sample grid
# ----------------------------------------------------------------------------------------------


def save_grid(
  path: str, real: np.ndarray, fake: np.ndarray, *, title: str, per_row: int = 8
) -> None:
  """Real training images (top row) above kept synthetic ones, marked SYNTHETIC."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fake_rows = max(1, min(3, math.ceil(len(fake) / per_row)))
  rows = [("real (training)", real[:per_row])] + [
    (f"SYNTHETIC {i + 1}", fake[i * per_row : (i + 1) * per_row]) for i in range(fake_rows)
  ]
  fig, axes = plt.subplots(
    len(rows), per_row, figsize=(1.3 * per_row, 1.45 * len(rows) + 0.5), dpi=100, squeeze=False
  )
  for row_axes, (label, images) in zip(axes, rows, strict=True):
    for j, ax in enumerate(row_axes):
      ax.set_xticks([])
      ax.set_yticks([])
      if j < len(images):
        ax.imshow(images[j], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
      else:
        ax.axis("off")
    row_axes[0].set_ylabel(label, fontsize=7)
  fig.suptitle(title, fontsize=8, color="firebrick")
  fig.text(
    0.5, 0.5, "SYNTHETIC", fontsize=40, color="firebrick", alpha=0.15, rotation=30,
    ha="center", va="center",
  )  # fmt: skip
  fig.savefig(path)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Everything at once.
# ----------------------------------------------------------------------------------------------


def _frechet_or_none(real: np.ndarray, fake: np.ndarray) -> float | None:
  """The Fréchet distance, or None where the covariances are too ill-conditioned for one."""
  try:
    return frechet_distance(real, fake)
  except ValueError:
    return None


def summary(
  real: Any,
  fake: Any,
  train: Any = None,
  *,
  feature_space: str,
  kid_subsets: int = 100,
  kid_subset_size: int = 1000,
  k: int = 3,
  memorisation_quantile: float = 0.05,
  n_closest: int = 10,
  seed: int = 0,
  batch_size: int = 1024,
) -> dict[str, Any]:
  """All sample-quality measures as one strict-JSON-ready dict (no NaN, plain Python types).

  Args:
    real: held-out real features, ``[n_real, d]``; also the memorisation baseline.
    fake: generated features, ``[n_fake, d]``.
    train: the generator's training features, ``[n_train, d]``, or None to skip memorisation.
    feature_space: which features these are (e.g. ``"resnet18 classifier penultimate, ckpt 4000"``);
      required because every number here depends on it.
    kid_subsets: see `kid`.
    kid_subset_size: see `kid`.
    k: see `precision_recall`.
    memorisation_quantile: the guard's quantile of real-to-train distances.
    n_closest: how many of the closest fakes to list.
    seed: KID's subset sampling.
    batch_size: rows per distance batch.

  Returns:
    ``{"feature_space", "feature_dim", "n_real", "n_fake", "n_train", "kid", "frechet_distance",
    "frechet_rank_deficient", "precision_recall", "memorisation"}``; ``memorisation`` is None
    without ``train`` and otherwise holds `Memorisation.to_dict` plus the guard's ``quantile``,
    ``threshold`` and ``n_dropped``. ``frechet_distance`` is None where the covariances are too
    ill-conditioned for a real square root.
  """
  if not isinstance(feature_space, str) or not feature_space.strip():
    raise ValueError(f"feature_space must name the features used, got {feature_space!r}")
  real = _check_features(real, "real", min_rows=2)
  fake = _check_features(fake, "fake", min_rows=2)
  if train is not None:
    train = _check_features(train, "train")
    _check_same_dim(real=real, fake=fake, train=train)
  else:
    _check_same_dim(real=real, fake=fake)
  d = real.shape[1]
  report = {
    "feature_space": feature_space,
    "feature_dim": int(d),
    "n_real": int(real.shape[0]),
    "n_fake": int(fake.shape[0]),
    "n_train": None if train is None else int(train.shape[0]),
    "kid": kid(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed).to_dict(),
    "frechet_distance": _frechet_or_none(real, fake),
    # With no more samples than dimensions a covariance is singular and the distance unreliable.
    "frechet_rank_deficient": bool(min(real.shape[0], fake.shape[0]) <= d),
    "precision_recall": precision_recall(real, fake, k=k, batch_size=batch_size),
    "memorisation": None,
  }
  if train is not None:
    result = memorisation(train, fake, reference=real, batch_size=batch_size)
    keep = result.keep_mask(memorisation_quantile)
    report["memorisation"] = {
      **result.to_dict(n_closest=n_closest),
      "guard": {
        "quantile": float(memorisation_quantile),
        "threshold": result.threshold(memorisation_quantile),
        "n_dropped": int(np.sum(~keep)),
      },
    }
  return report
