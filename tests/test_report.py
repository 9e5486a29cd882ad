"""Tests for busjax.evaluators.report and .readers: files written, strict JSON, reader numbers."""

import csv
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from busjax.data import records
from busjax.evaluators import metrics, readers, report

BUSBRA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "BUS-BRA-dev"
SYNTHETIC = {
  "source": "phantom",
  "split": "fold 0 test",
  "synthetic": True,
  "trained_on": "phantom fold 0 train",
  "model": "mobilenet_v2",
  "step": 12,
}


def _predictions(n_patients=30, images_per_patient=2, seed=0):
  rng = np.random.default_rng(seed)
  y_patient = rng.integers(0, 2, n_patients)
  y = np.repeat(y_patient, images_per_patient)
  p = 1 / (1 + np.exp(-(rng.normal(size=y.shape[0]) + 2.0 * (y - 0.5))))
  patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], images_per_patient)
  birads = np.where(rng.random(y.shape[0]) < 0.8, 4 * y + 3 * (1 - y), 3 * y + 4 * (1 - y))
  birads = np.where((y == 1) & (rng.random(y.shape[0]) < 0.4), 5, birads)
  return y, p, patients, birads


def _strict_json(path):
  def reject(token):
    raise AssertionError(f"non-strict JSON token {token}")

  return json.loads(pathlib.Path(path).read_text(), parse_constant=reject)


def test_write_report_writes_all_files_with_provenance(tmp_path):
  y, p, patients, birads = _predictions()
  ids = [f"img{i}" for i in range(y.shape[0])]
  returned = report.write_report(
    str(tmp_path),
    name="test",
    provenance=SYNTHETIC,
    y=y,
    p=p,
    patient_ids=patients,
    ids=ids,
    threshold=0.4,
    reader=birads,
    bootstrap=50,
  )
  folder = tmp_path / "test"
  assert sorted(f.name for f in folder.iterdir()) == [
    "confusion.png",
    "decision_curve.png",
    "predictions.csv",
    "reliability.png",
    "report.json",
    "roc.png",
  ]
  data = _strict_json(folder / "report.json")
  assert data == returned
  assert data["synthetic"] is True and data["provenance"] == SYNTHETIC
  assert data["schema"] == report.SCHEMA
  assert data["counts"] == {
    "images": 60,
    "patients": 30,
    "positive": int(y.sum()),
    "negative": int(60 - y.sum()),
    "prevalence": y.mean(),
  }
  assert data["bootstrap"]["clustered"] is True
  assert data["bootstrap"]["cluster_definition"] == "patient"
  assert data["auc"]["bootstrap_ci"]["method"] == "bootstrap-clustered"
  assert data["auc"]["value"] == pytest.approx(metrics.roc_auc(y, p))
  assert data["operating_points"]["at_threshold"]["threshold"] == 0.4
  assert set(data["operating_points"]) == {"at_threshold", "at_0.5"}
  curve = data["decision_curve"]
  assert curve["probabilities"].startswith("raw") and len(curve["model"]) == 19
  np.testing.assert_allclose(curve["model"], metrics.net_benefit(y, p, curve["thresholds"]))
  np.testing.assert_allclose(
    curve["reader"], metrics.net_benefit(y, (birads >= 4).astype(float), curve["thresholds"])
  )
  for png in ("roc.png", "reliability.png", "confusion.png", "decision_curve.png"):
    with Image.open(folder / png) as image:
      assert image.size[0] > 300 and image.size[1] > 300
  with open(folder / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 60
  assert list(rows[0]) == ["id", "patient_id", "label", "p_malignant", "birads"]
  assert rows[5]["id"] == "img5" and float(rows[5]["p_malignant"]) == p[5]


def test_nan_is_written_as_null_and_unclustered_when_patients_unique(tmp_path):
  y, p, _, _ = _predictions()
  provenance = dict(SYNTHETIC, synthetic=False, source="BUSI")
  data = report.write_report(
    str(tmp_path),
    name="val",
    provenance=provenance,
    y=y,
    p=p,
    patient_ids=np.arange(60),
    threshold=1.5,
    bootstrap=20,
  )
  point = _strict_json(tmp_path / "val" / "report.json")["operating_points"]["at_threshold"]
  assert point["ppv"] is None and point["tp"] == 0 and point["fp"] == 0  # 0/0, not 0.
  assert data["synthetic"] is False
  assert data["bootstrap"]["clustered"] is False
  assert data["reader_comparison"] is None


def test_figures_say_synthetic_only_for_synthetic_data():
  def texts(provenance):
    fig = report._new_figure(provenance, "ROC")
    return " ".join(t.get_text() for t in fig.texts)  # The suptitle is one of them.

  assert texts(SYNTHETIC).count("SYNTHETIC DATA") == 2  # Title and watermark.
  real = texts(dict(SYNTHETIC, synthetic=False, source="BUS-BRA-dev"))
  assert "SYNTHETIC" not in real and "BUS-BRA-dev" in real and "fold 0 test" in real


def test_write_report_rejects_missing_provenance_and_bad_names(tmp_path):
  y, p, _, _ = _predictions(n_patients=6)
  with pytest.raises(ValueError, match="synthetic"):
    report.write_report(
      str(tmp_path), name="x", provenance={"source": "a", "split": "b"}, y=y, p=p, bootstrap=0
    )
  with pytest.raises(ValueError, match="bool"):
    report.write_report(
      str(tmp_path),
      name="x",
      y=y,
      p=p,
      bootstrap=0,
      provenance={"source": "a", "split": "b", "synthetic": "no"},
    )
  with pytest.raises(ValueError, match="plain file name"):
    report.write_report(str(tmp_path), name="../up", provenance=SYNTHETIC, y=y, p=p, bootstrap=0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    report.evaluate(y, p * 3, bootstrap=0)


def test_evaluate_three_class_adds_multiclass_section():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 40)
  logits = rng.normal(size=(40, 3)) + 2.0 * np.eye(3)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  y = (labels == records.MALIGNANT).astype(int)
  result = report.evaluate(
    y,
    probs[:, 1],
    class_names=records.THREE_CLASSES,
    probs_full=probs,
    labels_full=labels,
    bootstrap=0,
  )
  assert result["negative_class"] == "benign or normal"
  assert result["multiclass"]["confusion_matrix"].sum() == 40
  assert 0 <= result["multiclass"]["top_label_ece"] <= 1
  assert result["auc"]["bootstrap_ci"] is None
  with pytest.raises(ValueError, match="probs_full"):
    report.evaluate(
      y,
      probs[:, 0],
      probs_full=probs,
      labels_full=labels,
      bootstrap=0,
      class_names=records.THREE_CLASSES,
    )


def test_evaluate_one_class_set_reports_undefined_auc():
  result = report.evaluate([0, 0, 0], [0.1, 0.6, 0.3], bootstrap=10)
  assert result["auc"]["value"] is None and "one class" in result["auc"]["reason"]
  assert result["operating_points"]["at_0.5"]["specificity"] == pytest.approx(2 / 3)


def test_predictions_csv_columns_and_errors(tmp_path):
  path = tmp_path / "preds.csv"
  probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
  report.write_predictions_csv(str(path), ["a,b", "c"], [1, 0], probs, extra={"device": ["x", "y"]})
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows[0]["id"] == "a,b" and rows[0]["p_malignant"] == "0.5" and rows[1]["device"] == "y"
  assert list(rows[0]) == ["id", "label", "p_benign", "p_malignant", "p_normal", "device"]
  with pytest.raises(ValueError, match="clashes"):
    report.write_predictions_csv(str(path), ["a"], [1], [0.5], extra={"label": [1]})
  with pytest.raises(ValueError, match="patient_id"):
    report.write_predictions_csv(str(path), ["a", "b"], [1, 0], [0.5, 0.2], patient_ids=["p"])


# -------------------------------------------------------------------------------------- readers


def test_parse_birads():
  np.testing.assert_allclose(
    readers.parse_birads([2, "3", "4a", "4C", 5.0, " 6 "]), [2, 3, 4.1, 4.3, 5, 6]
  )
  for bad in ("7", "4d", "3a", None, float("nan"), "x"):
    with pytest.raises(records.DataError, match="BI-RADS"):
      readers.parse_birads([bad])


def test_reader_operating_point_by_hand():
  y = [1, 1, 1, 0, 0, 0, 0]
  birads = ["5", "4b", 3, 4, 2, 3, "4a"]
  point = readers.reader_operating_point(y, birads, n_bootstrap=0)
  assert (point["tp"], point["fn"], point["fp"], point["tn"]) == (2, 1, 2, 2)
  assert point["sensitivity"] == pytest.approx(2 / 3) and point["specificity"] == 0.5
  stricter = readers.reader_operating_point(y, birads, threshold="4b", n_bootstrap=0)
  assert (stricter["tp"], stricter["fp"]) == (2, 0)


def test_report_reader_comparison_is_consistent(tmp_path):
  y, p, patients, birads = _predictions(seed=3)
  data = report.write_report(
    str(tmp_path),
    name="ext",
    provenance=SYNTHETIC,
    y=y,
    p=p,
    patient_ids=patients,
    reader={"birads": birads, "threshold": 4},
    bootstrap=60,
  )
  comparison = data["reader_comparison"]
  reader = comparison["reader"]
  by_hand = metrics.threshold_metrics(y, (birads >= 4).astype(float), 0.5)
  assert reader["sensitivity"] == pytest.approx(by_hand["sensitivity"])
  assert reader["specificity"] == pytest.approx(by_hand["specificity"])
  assert reader["sensitivity_ci"]["method"] == "bootstrap-clustered"
  assert reader["sensitivity_ci"]["lo"] <= reader["sensitivity"] <= reader["sensitivity_ci"]["hi"]
  at_sens = comparison["model_specificity_at_reader_sensitivity"]
  model = metrics.threshold_metrics(y, p, at_sens["threshold"])
  assert model["sensitivity"] >= reader["sensitivity"] - 1e-12
  assert model["specificity"] == pytest.approx(at_sens["specificity"])
  assert comparison["specificity_difference"]["value"] == pytest.approx(
    at_sens["specificity"] - reader["specificity"]
  )
  at_spec = comparison["model_sensitivity_at_reader_specificity"]
  assert comparison["sensitivity_difference"]["value"] == pytest.approx(
    at_spec["sensitivity"] - reader["sensitivity"]
  )
  assert comparison["model_auc"] == pytest.approx(data["auc"]["value"])
  # McNemar at the sensitivity-matched point counts the images each side alone gets right.
  test = comparison["mcnemar"]["at_reader_sensitivity"]
  model_right = (p >= test["model_threshold"]) == y
  reader_right = (birads >= 4) == y
  assert test["model_only_right"] == int(np.sum(model_right & ~reader_right))
  assert test["reader_only_right"] == int(np.sum(reader_right & ~model_right))
  assert 0.0 < test["p_value"] <= 1.0


def test_reader_difference_intervals_match_the_per_resample_loop():
  y, p, patients, birads = _predictions(seed=5)
  comparison = readers.compare_model_to_reader(y, p, birads, patients, n_bootstrap=150, seed=2)
  calls = (readers.parse_birads(birads) >= 4).astype(float)
  both = np.stack([p, calls], axis=1)
  for key, which in (("specificity_difference", 0), ("sensitivity_difference", 1)):
    loop = metrics.bootstrap_ci(
      lambda yy, ss, which=which: readers._matched_differences(yy, ss)[which],
      y, both, clusters=patients, n=150, seed=2,
    )  # fmt: skip
    got = comparison[key]["ci"]
    assert tuple(got) == pytest.approx(tuple(loop), abs=1e-12) and got.details == loop.details


@pytest.mark.skipif(not (BUSBRA / "bus_data.csv").is_file(), reason="BUS-BRA dev data absent")
def test_busbra_reader_point_on_real_data():
  with open(BUSBRA / "bus_data.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  y = np.array([r["Pathology"] == "malignant" for r in rows], int)
  point = readers.reader_operating_point(
    y, [r["BIRADS"] for r in rows], clusters=[r["Case"] for r in rows], n_bootstrap=100
  )
  # One senior reader, BI-RADS >= 4: very sensitive, moderately specific.
  assert point["n"] == len(rows) and point["sensitivity"] > 0.9 and 0.6 < point["specificity"] < 0.9
  assert point["sensitivity_ci"].method == "bootstrap-clustered"


def test_clusters_join_copies_and_the_leak_free_auc_leaves_them_out(tmp_path):
  y, p, _, _ = _predictions(n_patients=60, images_per_patient=1)
  patients = np.asarray([f"P{i}" for i in range(60)])
  # Copies of one scan: pairs (2k, 2k+1) for the first 20 images share a cluster.
  clusters = np.asarray([f"g{i // 2}" if i < 20 else f"g{i}" for i in range(60)])
  copy_in_train = np.zeros(60, bool)
  copy_in_train[:6] = True
  p_leaky = p.copy()
  p_leaky[:6] = y[:6]  # A memorised copy is scored perfectly.
  data = report.write_report(
    str(tmp_path),
    name="test",
    provenance=dict(SYNTHETIC),
    y=y,
    p=p_leaky,
    patient_ids=patients,
    clusters=clusters,
    cluster_definition="patient joined with near-duplicate group",
    copy_in_train=copy_in_train,
    bootstrap=200,
  )
  assert data["bootstrap"]["clustered"] and data["bootstrap"]["clusters"] == 50
  assert data["bootstrap"]["cluster_definition"] == "patient joined with near-duplicate group"
  assert data["counts"]["patients"] == 60
  leak = data["leakage"]
  assert leak["images_with_copy_in_train"] == 6 and leak["leak_free_images"] == 54
  assert leak["auc_leak_free"] == pytest.approx(metrics.roc_auc(y[6:], p_leaky[6:]))
  assert leak["auc_leak_free"] != pytest.approx(data["auc"]["value"])
  lo, hi = leak["auc_leak_free_bootstrap_ci"]["lo"], leak["auc_leak_free_bootstrap_ci"]["hi"]
  assert lo < leak["auc_leak_free"] < hi
  with open(tmp_path / "test" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows[1]["cluster"] == "g0" and rows[0]["copy_in_train"] == "1"
  # Without clusters every image is its own resampling unit.
  independent = report.evaluate(y, p_leaky, patient_ids=patients, bootstrap=200)
  assert independent["bootstrap"]["clusters"] == 60


def test_per_device_breakdown_matches_each_scanners_own_numbers(tmp_path):
  rng = np.random.default_rng(3)
  n = 120
  y = (np.arange(n) % 3 == 0).astype(int)
  devices = np.where(np.arange(n) % 2 == 0, "GE", "Toshiba")
  # Scanner GE separates well, Toshiba barely: the pooled AUC hides the difference.
  p = np.where(devices == "GE", 0.6 * y + 0.4 * rng.random(n), 0.1 * y + 0.9 * rng.random(n))
  result = report.write_report(
    str(tmp_path),
    name="ext",
    provenance={"source": "toy", "split": "external", "synthetic": True},
    y=y,
    p=p,
    threshold=0.5,
    subgroups={"device": devices},
    bootstrap=50,
  )
  groups = result["subgroups"]["device"]
  assert set(groups) == {"GE", "Toshiba"}
  for name, group in groups.items():
    members = devices == name
    assert group["images"] == members.sum() and group["positive"] == y[members].sum()
    assert group["auc"] == pytest.approx(metrics.roc_auc(y[members], p[members]))
    point = metrics.threshold_metrics(y[members], p[members], 0.5)
    assert group["at_threshold"]["sensitivity"] == pytest.approx(point["sensitivity"])
    assert group["auc_ci"]["lo"] <= group["auc"] <= group["auc_ci"]["hi"]
  assert groups["GE"]["auc"] > 0.95 > 0.8 > groups["Toshiba"]["auc"]
  with open(tmp_path / "ext" / "predictions.csv", newline="") as f:
    assert [r["device"] for r in csv.DictReader(f)] == devices.tolist()
