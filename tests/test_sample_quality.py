"""Tests for evaluators.sample_quality: KID, Fréchet distance, precision/recall, memorisation."""

import json

import numpy as np
import pytest
import scipy.linalg

from busjax.evaluators import sample_quality


def _gaussian(n, d=8, shift=0.0, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ---------------------------------------------------------------------------------------- KID


def test_kid_matches_explicit_double_loop():
  # With subset_size >= both sets each subset is the whole set, so the value is deterministic.
  rng = np.random.default_rng(0)
  m, d = 6, 3
  x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d)) + 0.3
  kernel = lambda a, b: (a @ b / d + 1) ** 3
  pairs = [(i, j) for i in range(m) for j in range(m)]
  within_x = sum(kernel(x[i], x[j]) for i, j in pairs if i != j) / (m * (m - 1))
  within_y = sum(kernel(y[i], y[j]) for i, j in pairs if i != j) / (m * (m - 1))
  cross = sum(kernel(x[i], y[j]) for i, j in pairs) / m**2
  result = sample_quality.kid(x, y, subsets=5, subset_size=100)
  assert result.mean == pytest.approx(within_x + within_y - 2 * cross, rel=1e-12)
  assert (result.subsets, result.subset_size, result.std) == (1, m, 0.0)


def test_kid_shrinks_subsets_to_the_smaller_set():
  result = sample_quality.kid(_gaussian(40), _gaussian(25, seed=1), subsets=7, subset_size=1000)
  assert (result.subsets, result.subset_size) == (7, 25)
  assert result.std > 0  # The 40-sample set still gives different subsets.


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
  real = _gaussian(300, d=16, seed=0)
  kwargs = dict(subsets=20, subset_size=100)
  copy = sample_quality.kid(real, real.copy(), **kwargs).mean
  same = sample_quality.kid(real, _gaussian(300, d=16, seed=1), **kwargs).mean
  shifted = [
    sample_quality.kid(real, _gaussian(300, d=16, shift=s, seed=1), **kwargs).mean
    for s in (0.25, 0.5, 1.0)
  ]
  # Against a copy, independently drawn subsets share samples, whose large k(x, x) enters the
  # cross term: the estimate sits slightly below 0 (about -2 (E k(x,x) - E k(x,y)) / n).
  assert -0.02 * shifted[2] < copy < 0
  assert abs(same) < 0.02 * shifted[2]
  assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_kid_is_unbiased_where_the_plain_v_statistic_is_not():
  rng = np.random.default_rng(0)
  m, d, repeats = 20, 4, 400
  unbiased, biased = [], []
  for _ in range(repeats):
    x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    unbiased.append(sample_quality.kid(x, y, subset_size=m).mean)
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
  unbiased, biased = np.asarray(unbiased), np.asarray(biased)
  standard_error = unbiased.std() / np.sqrt(repeats)
  assert abs(unbiased.mean()) < 3 * standard_error
  assert np.mean(unbiased < 0) > 0.2  # Not clipped: same-distribution estimates go negative.
  # The test has power: including the diagonal biases the mean well above 0.
  assert biased.mean() > 10 * biased.std() / np.sqrt(repeats)


def test_kid_is_deterministic_given_seed():
  real, fake = _gaussian(60), _gaussian(60, shift=0.3, seed=1)
  first = sample_quality.kid(real, fake, subsets=10, subset_size=30, seed=3)
  assert sample_quality.kid(real, fake, subsets=10, subset_size=30, seed=3) == first
  assert sample_quality.kid(real, fake, subsets=10, subset_size=30, seed=4) != first


# ------------------------------------------------------------------------- Fréchet distance


def _closed_form_frechet(mu1, s1, mu2, s2):
  """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) via the symmetric S1^(1/2) S2 S1^(1/2)."""
  root = scipy.linalg.sqrtm(s1).real
  eigenvalues = np.linalg.eigvalsh(root @ s2 @ root)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_frechet_identical_sets_is_zero():
  x = _gaussian(500)
  assert sample_quality.frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_exact_on_diagonal_sample_covariances():
  # Hadamard columns (without the all-ones one) are orthogonal and zero-mean: the sample
  # covariance of mu + H * sigma is exactly diag(sigma^2 * n / (n - 1)).
  h = scipy.linalg.hadamard(64)[:, 1:7].astype(float)
  n = h.shape[0]
  mu1, mu2 = np.arange(6.0), np.arange(6.0)[::-1] * 0.5
  sd1, sd2 = np.linspace(0.5, 2.0, 6), np.linspace(3.0, 1.0, 6)
  real, fake = mu1 + h * sd1, mu2 + h[::-1] * sd2
  var1, var2 = sd1**2 * n / (n - 1), sd2**2 * n / (n - 1)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  assert sample_quality.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-10)


def test_frechet_equals_closed_form_of_sample_moments_and_of_population():
  rng = np.random.default_rng(0)
  d = 4
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  real = rng.multivariate_normal(mu1, s1, 20000)
  fake = rng.multivariate_normal(mu2, s2, 20000)
  value = sample_quality.frechet_distance(real, fake)
  from_samples = _closed_form_frechet(
    real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)
  )
  assert value == pytest.approx(from_samples, rel=1e-8)
  assert value == pytest.approx(_closed_form_frechet(mu1, s1, mu2, s2), rel=0.03)


def test_frechet_finite_when_covariances_are_singular():
  # Fewer samples than dimensions: the reference's eps * I path, or a finite root without it.
  x, y = _gaussian(10, d=32), _gaussian(10, d=32, shift=1.0, seed=1)
  assert np.isfinite(sample_quality.frechet_distance(x, y))
  assert sample_quality.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-3)


# ----------------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets():
  x = _gaussian(200)
  assert sample_quality.precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0, "k": 3}


def test_precision_recall_mode_collapse():
  rng = np.random.default_rng(0)
  centres = np.eye(8)[:4] * 20.0  # Four well-separated modes.
  real = np.concatenate([c + rng.normal(size=(100, 8)) for c in centres])
  fake = real[rng.choice(100, 60, replace=False)]  # Only samples of the first mode.
  result = sample_quality.precision_recall(real, fake, batch_size=37)  # Odd batches on purpose.
  assert result["precision"] == 1.0
  assert result["recall"] < 0.3


def test_precision_recall_far_away_fakes():
  real = _gaussian(100)
  result = sample_quality.precision_recall(real, real + 100.0)
  assert result["precision"] == 0.0
  assert result["recall"] == 0.0


def test_precision_recall_does_not_depend_on_batch_size():
  real, fake = _gaussian(90), _gaussian(70, shift=0.5, seed=1)
  results = [sample_quality.precision_recall(real, fake, batch_size=b) for b in (1, 16, 1000)]
  assert results[0] == results[1] == results[2]
  assert 0 < results[0]["precision"] < 1 and 0 < results[0]["recall"] < 1


# ---------------------------------------------------------------------------- memorisation


def test_memorisation_flags_copies_and_keeps_fresh_samples():
  train, reference = _gaussian(300, seed=0), _gaussian(300, seed=1)
  copied = np.array([3, 50, 51, 120, 299])
  fresh = _gaussian(200, seed=2)
  fake = np.concatenate([fresh, train[copied]])
  result = sample_quality.memorisation(train, fake, reference=reference, batch_size=64)
  copies = np.arange(200, 205)
  assert result.baseline == "reference"
  np.testing.assert_array_equal(result.fake_to_train[copies], 0.0)
  np.testing.assert_array_equal(result.nearest_train[copies], copied)
  assert set(result.closest(5).tolist()) == set(copies.tolist())
  keep = result.keep_mask(0.05)
  assert not keep[copies].any()
  assert keep[:200].mean() > 0.85  # About 95% expected: fresh fakes look like held-out reals.
  np.testing.assert_array_equal(
    sample_quality.memorisation_mask(train, fake, reference=reference, quantile=0.05), keep
  )
  report = result.to_dict(n_closest=5)
  assert report["n_fake_exact_copies"] == 5
  assert report["n_reference_exact_copies"] == 0
  assert report["fraction_at_or_below_reference_p05"] == pytest.approx(1 - keep.mean())
  assert (
    report["fraction_at_or_below_reference_p01"] <= report["fraction_at_or_below_reference_p05"]
  )
  assert report["fraction_at_or_below_reference_p01"] >= 5 / 205
  assert {c["fake_index"] for c in report["closest"]} == set(copies.tolist())


def test_memorisation_without_reference_uses_leave_one_out_train():
  train = _gaussian(100)
  result = sample_quality.memorisation(train, train[:10])
  assert result.baseline == "train_leave_one_out"
  assert np.all(result.reference_to_train > 0)  # Its own zero distance is excluded.
  assert not result.keep_mask(0.01).any()


def test_memorisation_guard_drops_copies_even_when_threshold_is_zero():
  # A reference leaking training images makes the threshold 0; copies must still be dropped.
  train = _gaussian(50)
  result = sample_quality.memorisation(train, train[:3], reference=train[:10])
  assert result.threshold(0.05) == 0.0
  assert not result.keep_mask(0.05).any()
  assert result.to_dict()["n_reference_exact_copies"] == 10


# --------------------------------------------------------------------------------- summary


def test_summary_is_strict_json_and_names_the_feature_space():
  real, fake, train = _gaussian(80), _gaussian(60, shift=0.3, seed=1), _gaussian(100, seed=2)
  fake[:2] = train[:2]
  report = sample_quality.summary(
    real, fake, train, feature_space="phantom classifier penultimate", kid_subsets=5
  )
  text = json.dumps(report, allow_nan=False)
  assert json.loads(text) == report
  assert report["feature_space"] == "phantom classifier penultimate"
  assert (report["feature_dim"], report["n_real"], report["n_fake"], report["n_train"]) == (
    8,
    80,
    60,
    100,
  )
  assert report["kid"]["subset_size"] == 60
  assert report["frechet_distance"] > 0
  assert report["frechet_rank_deficient"] is False
  assert set(report["precision_recall"]) == {"precision", "recall", "k"}
  assert report["memorisation"]["baseline"] == "reference"
  assert report["memorisation"]["guard"]["n_dropped"] >= 2
  assert (
    sample_quality.summary(
      real, fake, train, feature_space="phantom classifier penultimate", kid_subsets=5
    )
    == report
  )


def test_summary_without_train_and_feature_space_required():
  real, fake = _gaussian(20), _gaussian(20, seed=1)
  report = sample_quality.summary(real, fake, feature_space="ssl encoder", kid_subsets=2)
  assert report["memorisation"] is None and report["n_train"] is None
  json.dumps(report, allow_nan=False)
  with pytest.raises(ValueError, match="feature_space"):
    sample_quality.summary(real, fake, feature_space=" ")
  with pytest.raises(TypeError):
    sample_quality.summary(real, fake)  # feature_space is required.


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
  ("call", "message"),
  [
    (lambda x: sample_quality.kid(x, x[:, 0]), "fake must have shape"),
    (lambda x: sample_quality.kid(x[:1], x), "real needs at least 2"),
    (lambda x: sample_quality.frechet_distance(x, x[:, :4]), "real has 8, fake has 4"),
    (lambda x: sample_quality.precision_recall(x, x[:3]), "fake needs at least 4"),
    (lambda x: sample_quality.precision_recall(x, x, k=0), "k must be"),
    (lambda x: sample_quality.memorisation(x, x, reference=x[:, :2]), "reference has 2"),
    (lambda x: sample_quality.memorisation(x[:1], x), "train needs at least 2"),
    (lambda x: sample_quality.memorisation(x, np.where(x > 1, np.nan, x)), "fake contains"),
    (lambda x: sample_quality.kid(x, x, subset_size=1), "subset_size"),
    (lambda x: sample_quality.memorisation(x, x).keep_mask(5), "quantile"),
  ],
)
def test_bad_inputs_raise_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call(_gaussian(20))
