"""Tests of the multimodal regime (two attention branches, then a stacking ensemble)."""

import json
import os

import numpy as np
import pytest
import skops.io as sio

from busjax import configlib
from busjax.data import records
from busjax.trainers import multimodal, supervised

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config(arg="smoke"):
  return configlib.load_file(os.path.join(CONFIGS, "multimodal.py"), arg)


def _features(seed=0, n=60, widths=(6, 10)):
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 2
  x = rng.normal(size=(n, sum(widths))) + 0.8 * y[:, None]
  return x, y


@pytest.mark.parametrize("learner", multimodal.LEARNERS)
def test_saved_stage2_models_give_identical_probabilities(tmp_path, learner):
  x, y = _features()
  estimator = multimodal.make_estimator(
    learner, (6, 10), normalization="per_modality", cv=3, seed=0
  )
  estimator.fit(x, y)
  path = str(tmp_path / "stack.skops")
  multimodal.save_estimator(estimator, path)
  loaded = multimodal.load_estimator(path)
  np.testing.assert_array_equal(loaded.predict_proba(x), estimator.predict_proba(x))
  assert not (tmp_path / "stack.skops.tmp").exists()


def test_loading_refuses_types_outside_the_allow_list(tmp_path):
  from sklearn.neighbors import KNeighborsClassifier

  x, y = _features()
  path = str(tmp_path / "other.skops")
  sio.dump(KNeighborsClassifier(algorithm="kd_tree").fit(x, y), path)
  with pytest.raises(records.DataError, match="refusing to load types.*KDTree"):
    multimodal.load_estimator(path)


def test_block_scaler_gives_each_modality_the_same_total_variance():
  x, _ = _features(widths=(2, 30), n=200)
  scaled = multimodal.BlockScaler((2, 30)).fit_transform(x)
  np.testing.assert_allclose(scaled[:, :2].var(0).sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(scaled[:, 2:].var(0).sum(), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_smoke_run_fits_stage2_on_train_patients_only(tmp_path, monkeypatch):
  seen_images, seen_rows = [], []
  real_train_split = supervised.train_split

  def recording_train_split(config, workdir, data, **kwargs):
    for collection in data.values():
      seen_images.extend(r.patient_id for r in collection.records)
    return real_train_split(config, workdir, data, **kwargs)

  real_make = multimodal.make_estimator

  def recording_make(*args, **kwargs):
    estimator = real_make(*args, **kwargs)
    fit = estimator.fit

    def recording_fit(x, y):
      seen_rows.append(len(x))
      del estimator.fit  # Back to the class's own method before the model is saved.
      return fit(x, y)

    estimator.fit = recording_fit
    return estimator

  monkeypatch.setattr(supervised, "train_split", recording_train_split)
  monkeypatch.setattr(multimodal, "make_estimator", recording_make)
  config = _config("smoke")
  configlib.validate(config)
  summary = multimodal.train_and_evaluate(config, str(tmp_path))

  reports = tmp_path / "reports"
  test = json.load(open(reports / "test" / "report.json"))
  assert test["provenance"]["synthetic"] is True and test["provenance"]["trainer"] == "multimodal"
  predictions = np.load(reports / "test_predictions.npz", allow_pickle=False)
  test_patients = set(predictions["ids"].tolist())
  assert test_patients and not test_patients & set(seen_images)  # No test image trained a branch.
  assert seen_rows == [summary["train_patients"]]  # The stack saw the train patients only.
  assert f"{summary['train_patients']} patients" in summary["trained_on"]
  assert os.path.exists(summary["stage2_file"])
  assert set(summary["branches"]) == {"us", "mammo"}
  assert (tmp_path / "branch_us" / "checkpoints").exists()


@pytest.mark.parametrize(
  "arg", ["", "modality=us", "modality=mammo,learner=rf", "attention=none,learner=svm"]
)
def test_ablation_arguments_validate(arg):
  config = _config(arg)
  configlib.validate(config)
  if "modality=us" in arg:
    assert tuple(config.multimodal.modalities) == ("us",)
  if "attention=none" in arg:
    assert config.multimodal.us.model.attention == config.multimodal.mammo.model.attention == "none"
  else:
    assert (config.multimodal.us.model.attention, config.multimodal.mammo.model.attention) == (
      "eca",
      "cbam",
    )


def test_bad_multimodal_configs_are_one_line_errors():
  config = _config()
  config.data.source = "phantom"
  with pytest.raises(configlib.ConfigError, match="needs paired data"):
    configlib.validate(config)
  config = _config()
  config.multimodal.learner = "knn"
  with pytest.raises(configlib.ConfigError, match="multimodal.learner"):
    configlib.validate(config)
  with pytest.raises(ValueError, match="modality="):
    _config("modality=eeg")
