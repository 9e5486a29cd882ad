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


# ----------------------------------------------------------------------------------------------
# End-to-end fused network (the ablation of the two stages)
# ----------------------------------------------------------------------------------------------


def _patients(n=6, us_per_patient=(1, 2), size=40):
  """Paired patients whose every pixel encodes (patient, modality, view): 10*p + 3*m + v."""
  from busjax.data import paired

  us, mammo = [], []
  for p in range(n):
    for v in range(us_per_patient[p % len(us_per_patient)]):
      image = np.full((size, size), 10 * p + v, np.uint8)
      us.append(records.Record(f"us{p}_{v}", p % 2, f"p{p}", image))
    for v in range(2):  # CC and MLO.
      image = np.full((size, size), 10 * p + 3 + v, np.uint8)
      mammo.append(records.Record(f"mammo{p}_{v}", p % 2, f"p{p}", image))
  data = paired.PairedData(
    us=records.Collection("t/us", tuple(us), synthetic=True),
    mammo=records.Collection("t/mammo", tuple(mammo), synthetic=True),
    name="t",
  )
  return paired.patient_collection(data)


def test_paired_batches_stack_one_image_of_each_modality_of_the_same_patient():
  from busjax.data import pipeline

  patients = _patients()
  batches = iter(
    pipeline.paired_dataset(
      patients,
      modalities=("us", "mammo"),
      image_size=32,
      global_batch_size=3,
      seed=0,
      augment_config=None,
    )
  )
  seen_views = set()
  for _ in range(8):  # Four epochs of six patients.
    batch = next(batches)
    assert batch["image"].shape == (3, 32, 32, 2) and batch["image"].dtype == np.uint8
    for image, label, index in zip(batch["image"], batch["label"], batch["index"], strict=True):
      us_value, mammo_value = int(image[16, 16, 0]), int(image[16, 16, 1])
      assert us_value // 10 == mammo_value // 10 == index  # Both channels: this patient.
      assert us_value % 10 in (0, 1) and mammo_value % 10 in (3, 4)  # Each from its modality.
      assert label == index % 2
      seen_views.add((int(index), us_value % 10, mammo_value % 10))
  # Views are redrawn across epochs: some patient was seen with more than one mammographic view.
  assert len({(p, m) for p, _, m in seen_views}) > len({p for p, _, _ in seen_views})


def test_every_combination_of_views_is_evaluated_once_in_patient_order():
  from busjax.data import pipeline

  patients = _patients(n=4, us_per_patient=(1, 2))
  combinations, counts = pipeline.view_combinations(patients, ("us", "mammo"))
  assert counts.tolist() == [2, 4, 2, 4]  # (1 or 2 ultrasound images) x (CC, MLO).
  batches = list(pipeline.paired_eval_batches(combinations, image_size=32, batch_size=5))
  valid = np.concatenate([b["valid"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[valid]
  assert valid.sum() == len(combinations) == 12
  pairs = [(int(i[16, 16, 0]), int(i[16, 16, 1])) for i in images]
  assert pairs[:6] == [(0, 3), (0, 4), (10, 13), (10, 14), (11, 13), (11, 14)]


def test_end_to_end_network_routes_each_channel_to_its_own_branch():
  import jax
  from flax import nnx

  from busjax.models import multimodal as multimodal_model

  config = multimodal.end_to_end_config(_config("smoke"))
  configlib.validate_model(config.model)
  model = multimodal_model.create(config.model, num_classes=2, rngs=nnx.Rngs(0))
  model.eval()
  forward = nnx.jit(lambda m, x: m(x, return_features=True))  # Eager ResNets are slow on CPU.
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 2))
  logits, features = forward(model, x)
  assert logits.shape == (2, 2) and features["features"].shape == (2, 1, 1, model.num_features)
  changed = x.at[..., 1].set(0.0)  # Only the mammography channel changes.
  _, features_changed = forward(model, changed)
  np.testing.assert_array_equal(features_changed["us"], features["us"])
  assert not np.allclose(features_changed["mammo"], features["mammo"])
  with pytest.raises(ValueError, match="expects 2 channels"):
    model(x[..., :1])


@pytest.mark.slow
def test_end_to_end_smoke_run_reports_per_patient_without_test_patients_in_training(
  tmp_path, monkeypatch
):
  from busjax.data import pipeline

  trained_on = []
  real_dataset = pipeline.paired_dataset

  def recording_dataset(patients, **kwargs):
    trained_on.extend(patients.patient_ids.tolist())
    return real_dataset(patients, **kwargs)

  monkeypatch.setattr(pipeline, "paired_dataset", recording_dataset)
  config = _config("smoke,fusion=end_to_end")
  config.train.num_steps = 2
  configlib.validate(config)
  summary = multimodal.train_and_evaluate(config, str(tmp_path))

  assert summary["model"] == "end_to_end(us + mammo)"
  predictions = np.load(tmp_path / "reports" / "test_predictions.npz", allow_pickle=False)
  test_patients = predictions["ids"].tolist()
  assert len(test_patients) == len(set(test_patients)) == summary["reports"]["test"]["images"]
  assert trained_on and not set(test_patients) & set(trained_on)
  np.testing.assert_allclose(predictions["probs"].sum(-1), 1.0, rtol=1e-5)  # Mean of softmaxes.
