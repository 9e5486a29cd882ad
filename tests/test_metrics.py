"""Tests for evaluators.metrics and .calibration: hand examples, sklearn, a DeLong reference."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from busjax.evaluators import calibration, metrics


def _scores_with_ties(n=300, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  p = np.round(rng.random(n) * 0.7 + 0.3 * y, 1)  # Rounding makes many cross-class ties.
  return y, p


def _delong_reference(y, scores):
  """DeLong et al. (1988) with the explicit O(m n) Mann-Whitney kernel, for comparison."""
  pos, neg = scores[y == 1], scores[y == 0]
  m, n = pos.shape[0], neg.shape[0]
  kernel = (pos[:, None, :] > neg[None, :, :]) + 0.5 * (pos[:, None, :] == neg[None, :, :])
  v10 = kernel.mean(axis=1)  # (m, k): per positive.
  v01 = kernel.mean(axis=0)  # (n, k): per negative.
  aucs = kernel.mean(axis=(0, 1))
  cov = np.atleast_2d(np.cov(v10, rowvar=False)) / m + np.atleast_2d(np.cov(v01, rowvar=False)) / n
  return aucs, cov


# ---------------------------------------------------------------------------------------- AUC


def test_auc_matches_sklearn_with_ties():
  y, p = _scores_with_ties()
  assert metrics.roc_auc(y, p) == pytest.approx(sk_metrics.roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("shape", [(0,), (1,), (9,), (200,), (60, 3), (25, 1)])
@pytest.mark.parametrize("levels", [2, 5, 10_000])  # Mostly ties ... almost none.
def test_midranks_are_scipys_average_ranks(shape, levels):
  import scipy.stats

  values = np.random.default_rng(levels).integers(0, levels, shape) / 7.0
  ranks = metrics.midranks(values)
  np.testing.assert_array_equal(ranks, scipy.stats.rankdata(values, axis=0))
  assert ranks.dtype == np.float64


def test_a_launch_does_not_import_scipy_stats():
  """scipy.stats cost 0.6-1 s of every `busjax.main` launch, for the AUC's ranks alone."""
  import subprocess
  import sys

  code = "import sys, busjax.main, busjax.trainers.supervised; print('scipy.stats' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_auc_known_cases():
  y = np.array([0, 0, 0, 1, 1])
  assert metrics.roc_auc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
  assert metrics.roc_auc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
  assert metrics.roc_auc(y, np.full(5, 0.5)) == 0.5  # All tied: a tie counts 1/2.
  assert metrics.roc_auc(y.astype(bool), [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0


def test_auc_rejects_bad_input():
  with pytest.raises(ValueError, match="both classes"):
    metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="0/1"):
    metrics.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="NaN"):
    metrics.roc_auc([0, 1, 1], [0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match="rows"):
    metrics.roc_auc([0, 1, 1], [0.1, 0.3])


def test_roc_points_match_sklearn():
  y, p = _scores_with_ties(seed=1)
  fpr, tpr, thresholds = metrics.roc_points(y, p)
  sk_fpr, sk_tpr, sk_thresholds = sk_metrics.roc_curve(y, p, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_brackets_auc_and_agrees_with_delong():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, 400)
  p = rng.normal(size=400) + 1.2 * y
  auc = metrics.roc_auc(y, p)
  lo, hi = metrics.bootstrap_ci(metrics.roc_auc, y, p, n=300, seed=0)
  d_lo, d_hi = metrics.delong_ci(y, p)
  assert lo < auc < hi
  assert lo == pytest.approx(d_lo, abs=0.02) and hi == pytest.approx(d_hi, abs=0.02)


def test_bootstrap_ci_perfect_separation_is_degenerate_and_reproducible():
  y = np.array([0] * 10 + [1] * 10)
  p = np.linspace(0, 1, 20)
  ci = metrics.bootstrap_ci(metrics.roc_auc, y, p, n=100, seed=3)
  assert tuple(ci) == (1.0, 1.0)
  assert ci.method == "bootstrap" and ci.n_resamples == 100
  y2, p2 = _scores_with_ties(seed=4)
  first = metrics.bootstrap_ci(metrics.roc_auc, y2, p2, n=50, seed=7)
  assert first == metrics.bootstrap_ci(metrics.roc_auc, y2, p2, n=50, seed=7)


def test_clustered_bootstrap_is_wider_when_patients_repeat_images():
  rng = np.random.default_rng(5)
  n_patients, copies = 40, 5
  y_patient = rng.integers(0, 2, n_patients)
  p_patient = rng.normal(size=n_patients) + y_patient
  # Five identical images per patient: the plain bootstrap counts them as 200 independent cases.
  y, p = np.repeat(y_patient, copies), np.repeat(p_patient, copies)
  patients = np.repeat(np.arange(n_patients), copies)
  plain = metrics.bootstrap_ci(metrics.roc_auc, y, p, n=300, seed=0)
  clustered = metrics.bootstrap_ci(metrics.roc_auc, y, p, clusters=patients, n=300, seed=0)
  assert clustered.method == "bootstrap-clustered"
  assert (clustered.hi - clustered.lo) > 1.6 * (plain.hi - plain.lo)  # ~sqrt(5) expected.


def test_clustered_resample_takes_all_images_of_drawn_patients():
  patients = np.array(["a", "a", "a", "b", "c", "c"])
  for idx in metrics.bootstrap_indices(6, clusters=patients, n_resamples=20, seed=1):
    drawn = patients[idx]
    for patient, size in (("a", 3), ("b", 1), ("c", 2)):
      assert np.sum(drawn == patient) % size == 0


def test_one_class_resamples_are_skipped_and_counted():
  y = np.array([1] + [0] * 9)
  p = np.linspace(0, 1, 10)
  ci = metrics.bootstrap_ci(metrics.roc_auc, y, p, n=200, seed=0)
  assert ci.n_skipped_one_class > 20  # (9/10)^10 ~ 35% of resamples hold no malignant case.
  assert ci.n_resamples + ci.n_skipped_one_class + ci.n_skipped_nan == 200
  ppv_ci = metrics.bootstrap_ci(
    lambda yy, pp: metrics.threshold_metrics(yy, pp, 2.0)["ppv"], y, p, n=20, seed=0
  )
  assert ppv_ci.n_skipped_nan + ppv_ci.n_skipped_one_class == 20  # Never called positive.
  assert np.isnan(ppv_ci.lo) and np.isnan(ppv_ci.hi)


@pytest.mark.parametrize("cells_per_block", [1 << 22, 20])  # One block; blocks of 2-3 rows.
def test_bootstrap_counts_are_the_resamples_of_bootstrap_indices(cells_per_block, monkeypatch):
  monkeypatch.setattr(metrics, "_CELLS_PER_BLOCK", cells_per_block)
  patients = np.array(["a", "a", "a", "b", "c", "c", "d"])
  for clusters in (None, patients):
    counts = metrics.bootstrap_counts(7, clusters=clusters, n_resamples=30, seed=4)
    indices = metrics.bootstrap_indices(7, clusters=clusters, n_resamples=30, seed=4)
    assert counts.shape == (30, 7)
    for row, idx in zip(counts, indices, strict=True):
      np.testing.assert_array_equal(row, np.bincount(idx, minlength=7))


def test_resampled_auc_equals_the_auc_of_each_resample():
  y, p = _scores_with_ties(n=90, seed=8)  # Ties within and across classes.
  y[:3] = 1  # A few positives so that some tiny resamples can still miss a class.
  counts = metrics.bootstrap_counts(90, clusters=np.arange(90) // 4, n_resamples=40, seed=2)
  counts[0] = 0
  counts[0, np.flatnonzero(y == 0)[:5]] = 1  # One resample of negatives only: undefined.
  aucs = metrics.roc_auc_resampled(y, p, counts)
  assert np.isnan(aucs[0])
  for row, auc in zip(counts[1:], aucs[1:], strict=True):
    idx = np.repeat(np.arange(90), row)
    assert auc == pytest.approx(metrics.roc_auc(y[idx], p[idx]), abs=1e-12)
  both = metrics.roc_auc_resampled(y, np.stack([p, -p], axis=1), counts[1:])
  np.testing.assert_allclose(both, np.stack([aucs[1:], 1.0 - aucs[1:]], axis=1), atol=1e-12)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("cells_per_block", [1 << 22, 1000])
def test_vectorised_bootstrap_gives_the_loops_interval(clustered, cells_per_block, monkeypatch):
  monkeypatch.setattr(metrics, "_CELLS_PER_BLOCK", cells_per_block)  # 1000: blocks of 6 rows.
  rng = np.random.default_rng(11)
  y, p = _scores_with_ties(n=150, seed=12)
  clusters = rng.integers(0, 60, 150) if clustered else None
  common = dict(clusters=clusters, n=300, seed=5)
  cases = [(metrics.roc_auc, lambda yy, pp: metrics.roc_auc(yy, pp))]
  for name, threshold in (("sensitivity", 0.4), ("balanced_accuracy", 0.6), ("ppv", 0.9)):
    metric = metrics.threshold_metric(name, threshold)
    cases.append(
      (metric, lambda yy, pp, t=threshold, k=name: metrics.threshold_metrics(yy, pp, t)[k])
    )
  for fast, loop in cases:
    assert hasattr(fast, "resampled") and not hasattr(loop, "resampled")
    got, want = (
      metrics.bootstrap_ci(fast, y, p, **common),
      metrics.bootstrap_ci(loop, y, p, **common),
    )
    assert got.lo == pytest.approx(want.lo, abs=1e-12) and got.hi == pytest.approx(
      want.hi, abs=1e-12
    )
    assert got.details == want.details
  y_rare = np.array([1] + [0] * 19)  # Many one-class resamples, and ppv nan when none is called.
  p_rare = np.linspace(0, 1, 20)
  for fast, loop in cases:
    got = metrics.bootstrap_ci(fast, y_rare, p_rare, n=200, seed=1)
    want = metrics.bootstrap_ci(loop, y_rare, p_rare, n=200, seed=1)
    assert got.details == want.details and got.n_skipped_one_class > 0
    np.testing.assert_allclose(tuple(got), tuple(want), atol=1e-12)


def test_resampled_operating_points_equal_each_resamples_point():
  y, p = _scores_with_ties(n=120, seed=13)
  counts = metrics.bootstrap_counts(120, clusters=np.arange(120) // 3, n_resamples=60, seed=9)
  targets = np.linspace(0.05, 1.0, 60)  # One target per resample, 1.0 included.
  spec = metrics.specificity_at_sensitivity_resampled(y, p, counts, targets)
  sens = metrics.sensitivity_at_specificity_resampled(y, p, counts, targets)
  spec_fixed = metrics.specificity_at_sensitivity_resampled(y, p, counts, 0.8)
  for b, row in enumerate(counts):
    idx = np.repeat(np.arange(120), row)
    yy, pp = y[idx], p[idx]
    assert spec[b] == metrics.specificity_at_sensitivity_point(yy, pp, targets[b])[0]
    assert sens[b] == metrics.sensitivity_at_specificity_point(yy, pp, targets[b])[0]
    assert spec_fixed[b] == metrics.specificity_at_sensitivity_point(yy, pp, 0.8)[0]
  both = metrics.threshold_metrics_resampled(y, p, counts, 0.45)
  for b, row in enumerate(counts[:10]):
    idx = np.repeat(np.arange(120), row)
    for name, value in metrics.threshold_metrics(y[idx], p[idx], 0.45).items():
      assert both[name][b] == pytest.approx(value, nan_ok=True)


def test_operating_point_intervals_match_the_loop():
  y, p = _scores_with_ties(n=200, seed=14)
  clusters = np.arange(200) // 2
  for function, point in (
    (metrics.specificity_at_sensitivity, metrics.specificity_at_sensitivity_point),
    (metrics.sensitivity_at_specificity, metrics.sensitivity_at_specificity_point),
  ):
    got = function(y, p, 0.7, clusters=clusters, n_bootstrap=200, seed=3)["ci"]
    want = metrics.bootstrap_ci(
      lambda yy, pp, point=point: point(yy, pp, 0.7)[0], y, p, clusters=clusters, n=200, seed=3
    )
    assert tuple(got) == pytest.approx(tuple(want), abs=1e-12) and got.details == want.details


def test_threshold_metric_names_a_known_metric():
  assert metrics.threshold_metric("specificity", 0.5)([0, 1, 0], [0.2, 0.9, 0.7]) == 0.5
  with pytest.raises(ValueError, match="unknown threshold metric 'sens'"):
    metrics.threshold_metric("sens", 0.5)


# ------------------------------------------------------------------------------------- DeLong


def test_delong_matches_mann_whitney_reference():
  y, p1 = _scores_with_ties(n=120, seed=6)
  rng = np.random.default_rng(6)
  p2 = np.round(p1 + rng.normal(0, 0.3, p1.shape), 1)
  ref_aucs, ref_cov = _delong_reference(y, np.stack([p1, p2], axis=1))
  result = metrics.delong_test(y, p1, p2)
  assert result["auc1"] == pytest.approx(ref_aucs[0])
  assert result["auc2"] == pytest.approx(ref_aucs[1])
  ref_se = np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
  assert result["se"] == pytest.approx(ref_se, rel=1e-9)
  assert result["z"] == pytest.approx((ref_aucs[0] - ref_aucs[1]) / ref_se, rel=1e-9)
  assert 0.0 <= result["p_value"] <= 1.0
  single = metrics.delong_ci(y, p1)
  assert single.se == pytest.approx(np.sqrt(ref_cov[0, 0]), rel=1e-9)
  assert single.lo < single.estimate < single.hi
  assert single.estimate == pytest.approx(sk_metrics.roc_auc_score(y, p1))


def test_delong_identical_and_clearly_different_models():
  y, p = _scores_with_ties(n=200, seed=8)
  same = metrics.delong_test(y, p, p)
  assert same["diff"] == 0.0 and same["p_value"] == 1.0
  rng = np.random.default_rng(8)
  random_scores = rng.random(200)
  assert metrics.delong_test(y, p, random_scores)["p_value"] < 1e-4


# ---------------------------------------------------------------------------- operating points


def test_threshold_metrics_by_hand():
  y = [1, 1, 1, 0, 0, 0, 0]
  p = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.5]
  m = metrics.threshold_metrics(y, p, 0.5)  # Called: 0.9, 0.6, 0.7, 0.5 (p >= t).
  assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 2, 2)
  assert m["sensitivity"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(0.5)
  assert m["ppv"] == pytest.approx(0.5)
  assert m["npv"] == pytest.approx(2 / 3)
  assert m["accuracy"] == pytest.approx(4 / 7)
  assert m["f1"] == pytest.approx(4 / 7)
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_threshold_metrics_zero_over_zero_is_nan():
  nothing_called = metrics.threshold_metrics([0, 1, 0], [0.1, 0.2, 0.3], 0.9)
  assert np.isnan(nothing_called["ppv"]) and nothing_called["sensitivity"] == 0.0
  no_malignant = metrics.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.9], 0.5)
  assert np.isnan(no_malignant["sensitivity"]) and np.isnan(no_malignant["balanced_accuracy"])
  assert no_malignant["specificity"] == pytest.approx(2 / 3)


def test_youden_and_targets_by_hand():
  y = [0, 0, 1, 1]
  p = [0.1, 0.4, 0.35, 0.8]
  # J = 0.5 at 0.8 and at 0.35: the higher threshold wins.
  assert metrics.youden_threshold(y, p) == 0.8
  at_sens = metrics.specificity_at_sensitivity(y, p, 0.9, n_bootstrap=0)
  assert (at_sens["specificity"], at_sens["sensitivity"], at_sens["threshold"]) == (0.5, 1.0, 0.35)
  at_spec = metrics.sensitivity_at_specificity(y, p, 1.0, n_bootstrap=0)
  assert (at_spec["sensitivity"], at_spec["specificity"], at_spec["threshold"]) == (0.5, 1.0, 0.8)


def test_targets_agree_with_sklearn_curve_and_intervals_bracket():
  y, p = _scores_with_ties(n=300, seed=9)
  fpr, tpr, _ = sk_metrics.roc_curve(y, p)
  result = metrics.specificity_at_sensitivity(y, p, 0.8, n_bootstrap=200, seed=1)
  assert result["specificity"] == pytest.approx(1 - fpr[tpr >= 0.8].min())
  assert result["ci"].lo <= result["specificity"] <= result["ci"].hi
  check = metrics.threshold_metrics(y, p, result["threshold"])
  assert check["sensitivity"] >= 0.8 and check["specificity"] == result["specificity"]
  result = metrics.sensitivity_at_specificity(y, p, 0.8, n_bootstrap=200, seed=1)
  assert result["sensitivity"] == pytest.approx(tpr[1 - fpr >= 0.8].max())
  assert result["ci"].lo <= result["sensitivity"] <= result["ci"].hi


# --------------------------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_large_when_overconfident():
  rng = np.random.default_rng(10)
  p = rng.random(20000)
  y = (rng.random(20000) < p).astype(int)
  assert calibration.expected_calibration_error(y, p) < 0.02
  overconfident = np.where(p > 0.5, 1 - (1 - p) ** 4, p**4)
  assert calibration.expected_calibration_error(y, overconfident) > 0.15


def test_ece_and_curve_by_hand():
  y = [0, 1, 1, 0, 1]
  p = [0.1, 0.1, 0.9, 0.9, 1.0]  # p == 1 belongs to the last bin.
  # Bin [0, .5): mean y .5 vs mean p .1; bin [.5, 1]: 2/3 vs 2.8/3.
  expected = (2 * 0.4 + 3 * abs(2 / 3 - 2.8 / 3)) / 5
  assert calibration.expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
  curve = calibration.reliability_curve(y, p, n_bins=4)
  np.testing.assert_array_equal(curve["counts"], [2, 0, 0, 3])
  assert np.isnan(curve["mean_predicted"][1]) and curve["fraction_positive"][0] == 0.5


def test_brier_and_nll_match_sklearn():
  rng = np.random.default_rng(11)
  p = rng.random(100)
  y = (rng.random(100) < p).astype(int)
  assert calibration.brier(y, p) == pytest.approx(sk_metrics.brier_score_loss(y, p))
  assert calibration.nll(y, p) == pytest.approx(sk_metrics.log_loss(y, p))
  assert np.isfinite(calibration.nll([1, 0], [0.0, 1.0]))  # Clipped, not infinite.
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    calibration.brier([0, 1], [0.2, 1.5])


def test_top_label_ece():
  labels = np.array([0, 1, 2, 1])
  confident_right = np.eye(3)[labels]
  assert calibration.top_label_ece(labels, confident_right) == 0.0
  confident_wrong = np.eye(3)[(labels + 1) % 3]
  assert calibration.top_label_ece(labels, confident_wrong) == pytest.approx(1.0)
  assert calibration.multiclass_nll(labels, confident_right) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="sum to 1"):
    calibration.top_label_ece(labels, confident_right * 0.5)


def _overconfident(n=4000, seed=0, sharpen=3.0):
  """Labels drawn from true probabilities q; the model reports q sharpened (logits x sharpen)."""
  rng = np.random.default_rng(seed)
  logit = rng.normal(0.0, 1.5, n)
  y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
  p = 1 / (1 + np.exp(-sharpen * logit))
  return y, np.stack([1 - p, p], axis=1)


def test_temperature_scaling_recovers_the_sharpening_and_lowers_nll():
  y, probs = _overconfident()
  t = calibration.fit_temperature(y, probs)
  assert t == pytest.approx(3.0, rel=0.1)  # It undoes the x3 on the logits.
  scaled = calibration.apply_temperature(probs, t)
  assert calibration.multiclass_nll(y, scaled) < calibration.multiclass_nll(y, probs) - 0.05
  assert calibration.expected_calibration_error(y, scaled[:, 1]) < 0.03
  assert calibration.expected_calibration_error(y, probs[:, 1]) > 0.1
  np.testing.assert_array_equal(np.argsort(scaled[:, 1]), np.argsort(probs[:, 1]))  # Same AUC.


def test_temperature_on_three_classes_keeps_rows_normalised_and_argmax():
  rng = np.random.default_rng(1)
  probs = rng.dirichlet(np.ones(3) * 0.3, size=50)
  for t in (0.5, 2.0):
    scaled = calibration.apply_temperature(probs, t)
    np.testing.assert_allclose(scaled.sum(1), 1.0)
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))
  with pytest.raises(ValueError, match="temperature"):
    calibration.apply_temperature(probs, 0.0)


def test_adaptive_ece_uses_equal_mass_bins():
  y = np.array([0, 0, 1, 1])
  p = np.array([0.1, 0.1, 0.9, 0.9])
  # Two bins of two images: |0 - 0.1| and |1 - 0.9|, each half the images.
  assert calibration.adaptive_calibration_error(y, p, n_bins=2) == pytest.approx(0.1)
  y, probs = _overconfident(seed=2)
  assert calibration.adaptive_calibration_error(y, probs[:, 1]) > 0.1


def test_net_benefit_and_decision_curve_by_hand():
  y = np.array([1, 1, 0, 0, 0])
  p = np.array([0.9, 0.3, 0.6, 0.2, 0.1])
  # t = 0.5: called {0.9, 0.6}: TP 1, FP 1 -> 1/5 - 1/5 = 0; t = 0.25: TP 2, FP 1 -> 2/5 - 1/15.
  np.testing.assert_allclose(metrics.net_benefit(y, p, [0.5, 0.25]), [0.0, 0.4 - 0.2 / 3])
  curve = metrics.decision_curve(y, p)
  t = curve["thresholds"]
  np.testing.assert_allclose(curve["treat_all"], 0.4 - 0.6 * t / (1 - t))
  assert t[0] == 0.05 and t[-1] == 0.95 and np.all(curve["treat_none"] == 0)
  with pytest.raises(ValueError, match="strictly between"):
    metrics.net_benefit(y, p, [0.0])


def test_mcnemar_counts_discordant_images_and_matches_the_binomial():
  y = np.array([1] * 10 + [0] * 10)
  a = y.copy()  # Always right.
  b = y.copy()
  b[:7] = 0  # Wrong on 7 positives.
  b[-1] = 1  # ...and one negative; a is wrong there too.
  a[-1] = 1
  result = metrics.mcnemar(y, a, b)
  assert (result["a_only"], result["b_only"]) == (7, 0)
  assert result["p_value"] == pytest.approx(2 * 0.5**7)
  assert metrics.mcnemar(y, a, a)["p_value"] == 1.0


def test_ece_if_calibrated_is_the_mean_ece_of_outcomes_drawn_from_p():
  p = np.random.default_rng(1).random(60)
  floor = calibration.ece_if_calibrated(p, 15, samples=50, seed=3)
  draws = np.random.default_rng(3).random((50, 60)) < p[None, :]
  by_hand = [calibration.expected_calibration_error(d.astype(int), p, 15) for d in draws]
  assert floor["mean"] == pytest.approx(np.mean(by_hand))
  assert floor["p95"] == pytest.approx(np.percentile(by_hand, 95))
  # The floor shrinks with the set: ~0.1 on 60 images, much less on 6000.
  big = calibration.ece_if_calibrated(np.random.default_rng(1).random(6000), 15, samples=20)
  assert 0.05 < floor["mean"] < 0.2 and big["mean"] < 0.03
