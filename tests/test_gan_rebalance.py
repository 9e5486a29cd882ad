"""Tests for busjax.trainers.gan_rebalance: the trainer's own GAN step, the quality filter, the
baselines' data, an end-to-end run (nothing synthetic reaches val/test, every report counts the
synthetic training images) and kill-mid-round-then-resume = uninterrupted."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from crashing import Crash, CrashingDataset
from pacing import logged_all_paced, recording_pacer

from busjax import configlib, sharding
from busjax.data import pipeline, records
from busjax.evaluators import sample_quality
from busjax.trainers import gan_rebalance, state_utils, supervised
from configs import gan_rebalance as gan_config


def _smoke(*args):
  config = gan_config.get_config(",".join(("smoke", *args)))
  configlib.validate(config)
  return config


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["d2gan", "gan"])
def test_trainer_step_updates_every_network_and_the_ema(objective):
  config = _smoke(f"objective={objective}")
  defs, state, g_tx, d_tx = gan_rebalance.create_gan_state(config, num_classes=2)
  assert ("discriminator2" in state) == (objective == "d2gan")
  mesh = sharding.make_mesh(None)
  # Built and donated exactly as the trainer does, so the compiled step is the one the smoke
  # runs use (the suite's compilation cache then compiles it once).
  step = sharding.jit_train_step(
    gan_rebalance.make_gan_step(defs, g_tx, d_tx, config.gan), mesh, state
  )
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  size = gan_rebalance.gan_image_size(config)
  new = sharding.replicate(state, mesh)  # As the trainer places it: one compilation, not two.
  for i in range(3):
    batch = dict(
      image=rng.integers(0, 256, (8, size, size, 1), dtype=np.uint8),
      label=np.array([0, 1] * 4, np.int32),
    )
    new, metrics = step(new, sharding.host_to_global(batch, mesh), jax.random.key(i))
    for name, value in metrics.items():
      assert np.isfinite(float(value)), (i, name, metrics)
  assert int(new["step"]) == 3
  assert float(metrics["r1"]) > 0 and float(metrics["d_grad_norm"]) > 0
  nets = [n for n in ("generator", "discriminator1", "discriminator2") if n in before]
  for name in nets:
    for part in ("params", "rest"):  # rest: generator BN statistics, spectral-norm vectors.
      assert _differ(before[name][part], new[name][part]), (name, part)
  # The average moved away from the initialisation, but not all the way to the live weights.
  assert _differ(new["generator_ema"], before["generator_ema"])
  assert _differ(new["generator_ema"], new["generator"]["params"])


def _differ(a, b) -> bool:
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return any(np.abs(np.asarray(x) - np.asarray(y)).max() > 0 for x, y in zip(a, b, strict=True))


def test_sampler_gives_uint8_images_of_the_asked_class_with_d1_scores(tmp_path):
  config = _smoke()
  collection = _toy_collection(12)
  run = gan_rebalance._GanRun(config, str(tmp_path), collection, sharding.make_mesh(None))
  try:
    images, scores = run.sample(1, 11, jax.random.key(0))
    again, _ = run.sample(1, 11, jax.random.key(0))
  finally:
    run.close()
  size = gan_rebalance.gan_image_size(config)
  assert images.shape == (11, size, size) and images.dtype == np.uint8
  assert scores.shape == (11,) and np.all(np.isfinite(scores)) and np.all(scores > 0)  # Softplus.
  np.testing.assert_array_equal(images, again)  # Same key, same images.


# ----------------------------------------------------------------------------------------------
# The quality filter
# ----------------------------------------------------------------------------------------------


def test_filter_keeps_only_candidates_that_pass_every_stage():
  # Real minority features on a unit grid (nearest real-to-real distance 1), the majority far
  # away, held-out real images 0.2 from the grid (the memorisation baseline: 0.2).
  grid = np.array([(i, j) for i in range(6) for j in range(6)], float)
  minority = grid
  train = np.concatenate([minority, grid + 100.0])
  reference = grid[:20] + np.array([0.2, 0.0])
  # 0: good; 1: D finds it fake; 2: classifier unsure; 3: far from every minority image;
  # 4: a copy of a training image; 5: good. "Good" = 0.71 from the grid: within the
  # real-to-real radius (1.0), beyond the memorisation threshold (0.2).
  features = np.array([[2.5, 2.5], [1.5, 1.5], [3.5, 0.5], [40.0, 40.0], [2.0, 3.0], [0.5, 4.5]])
  features[4] += 1e-6
  masks = sample_quality.filter_candidates(
    d_scores=np.array([5.0, 0.1, 4.0, 6.0, 7.0, 8.0]),
    p_minority=np.array([0.9, 0.9, 0.2, 0.9, 0.9, 0.8]),
    features=features,
    minority_features=minority,
    train_features=train,
    reference_features=reference,
    rebalance_config=ml_collections.ConfigDict(
      dict(d_quantile=0.2, min_confidence=0.5, distance_quantile=0.95, memorisation_quantile=0.05)
    ),
  )
  assert masks["discriminator"].tolist() == [True, False, True, True, True, True]
  assert masks["confidence"].tolist() == [True, True, False, True, True, True]
  assert masks["distance"].tolist() == [True, True, True, False, True, True]
  assert masks["memorisation"].tolist() == [True, True, True, True, False, True]
  assert masks["keep"].tolist() == [True, False, False, False, False, True]


# ----------------------------------------------------------------------------------------------
# Baselines and the real + synthetic mixture
# ----------------------------------------------------------------------------------------------


def _toy_collection(n, minority_every=3):
  rng = np.random.default_rng(1)
  recs = tuple(
    records.Record(
      id=f"toy/{i}",
      label=int(i % minority_every == 0),
      patient_id=f"p{i}",
      image=rng.integers(0, 256, (40, 48), dtype=np.uint8),
    )
    for i in range(n)
  )
  return records.Collection(name="toy", records=recs)


def _labels_drawn(batches, n=60):
  iterator = batches(0)
  return np.concatenate([next(iterator)["label"] for _ in range(n)])


@pytest.mark.parametrize("method", ["none", "class_weights", "oversample"])
def test_baselines_train_on_real_images_with_their_own_rebalancing(method, monkeypatch, tmp_path):
  seen = {}

  def fake_train_split(config, workdir, data, *, train_batches=None, num_examples=None):
    seen.update(config=config, batches=train_batches, data=data)
    return gan_rebalance.protocol.Trained(predict=None, info={})

  monkeypatch.setattr(supervised, "train_split", fake_train_split)
  config = _smoke(f"method={method}")
  collection = _toy_collection(60)  # 20 minority, 40 majority.
  trained = gan_rebalance.train_split(config, str(tmp_path), {"train": collection})
  assert trained.info == {"rebalance": method, "synthetic_train_images": 0}
  expected_weights = "balanced" if method == "class_weights" else "none"
  assert seen["config"].train.class_weights == expected_weights
  if method == "oversample":
    fraction = _labels_drawn(seen["batches"]).mean()
    assert 0.4 < fraction < 0.6  # Balanced draws (1/3 of the records are minority).
  else:
    assert seen["batches"] is None  # The supervised default stream: every record once per epoch.


def test_mixture_of_real_and_synthetic_draws_every_record_equally():
  config = _smoke()
  real = _toy_collection(60)  # 20 minority.
  images = np.zeros((40, 16, 16), np.uint8)
  synthetic = gan_rebalance.synthetic_collection(images, 1, np.ones(40, int), real)
  assert synthetic.synthetic and all(r.id.startswith("synthetic/") for r in synthetic.records)
  batches = gan_rebalance._mixed_batches(config, real, synthetic)
  iterator = batches(0)
  drawn = [next(iterator) for _ in range(50)]
  from_synthetic = np.concatenate([b["source"] for b in drawn]).mean()
  labels = np.concatenate([b["label"] for b in drawn]).mean()
  assert 0.3 < from_synthetic < 0.5  # 40 of 100 records.
  assert 0.5 < labels < 0.7  # (20 + 40) / 100 minority.


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def _check_run(tmp_path, config, summary):
  """What a finished run must show: nothing synthetic in val/test, every report counts the
  synthetic training images, per-round files, the GAN's last checkpoint."""
  rounds = summary["rounds"]
  assert [r["round"] for r in rounds] == [0, 1, 2]
  kept = [r["kept"] for r in rounds[1:]]
  assert summary["synthetic_train_images"] == sum(kept) == rounds[-1]["synthetic_total"]
  for r in rounds[1:]:
    assert r["candidates"] >= r["passed_discriminator"] >= r["passed_keep"] >= r["kept"]
    round_dir = tmp_path / f"round{r['round']}"
    assert (round_dir / "samples.png").stat().st_size > 0
    with np.load(round_dir / "synthetic.npz") as f:
      assert len(f["images"]) == r["kept"] and f["images"].dtype == np.uint8
    quality = json.loads((round_dir / "sample_quality.json").read_text())
    if quality["sample_quality"] is not None:
      assert "classifier" in quality["sample_quality"]["feature_space"]
  for split in ("val", "test"):
    with np.load(tmp_path / "reports" / f"{split}_predictions.npz", allow_pickle=False) as f:
      ids = f["ids"].tolist()
    assert ids and not any(i.startswith("synthetic/") for i in ids)
    provenance = json.loads((tmp_path / "reports" / split / "report.json").read_text())[
      "provenance"
    ]
    assert provenance["synthetic_train_images"] == summary["synthetic_train_images"]
    assert f"+ {summary['synthetic_train_images']} GAN-synthetic" in provenance["trained_on"]
  # The GAN trained steps_per_round per round and its last step is checkpointed.
  assert summary["gan_steps"] == 2 * config.gan.steps_per_round
  assert (tmp_path / "gan" / "checkpoints" / str(summary["gan_steps"])).is_dir()


@pytest.mark.slow
def test_smoke_run_then_kill_mid_round_and_resume_ends_identical(tmp_path, monkeypatch):
  """One end-to-end run checked by `_check_run`, then the same config killed in round 2's GAN
  training and resumed: same synthetic images, same rounds, same predictions."""
  config = _smoke()
  config.gan.steps_per_round = 4
  config.gan.checkpoint_every = 3
  paced = []
  monkeypatch.setattr(state_utils, "StepPacer", recording_pacer(paced))
  uninterrupted = gan_rebalance.train_and_evaluate(config, str(tmp_path / "a"))
  _check_run(tmp_path / "a", config, uninterrupted)
  # Every GAN step goes through the pacer (see state_utils.StepPacer).
  assert sum("g_loss" in names for names in paced) == uninterrupted["gan_steps"] > 0
  assert logged_all_paced(tmp_path / "a" / "gan" / "metrics.jsonl", "gan")

  real_train_dataset = pipeline.train_dataset

  def gan_crashes(collection, *, image_size, **kwargs):
    dataset = real_train_dataset(collection, image_size=image_size, **kwargs)
    is_gan = image_size == gan_rebalance.gan_image_size(config)
    # The GAN's stream dies on its 6th batch: round 2, after the step-3 and step-4 checkpoints.
    return CrashingDataset(dataset, after=5) if is_gan else dataset

  monkeypatch.setattr(pipeline, "train_dataset", gan_crashes)
  with pytest.raises(Crash):
    gan_rebalance.train_and_evaluate(config, str(tmp_path / "b"))
  assert (tmp_path / "b" / "round1" / "synthetic.npz").exists()
  assert not (tmp_path / "b" / "round2" / "synthetic.npz").exists()
  monkeypatch.setattr(pipeline, "train_dataset", real_train_dataset)
  resumed = gan_rebalance.train_and_evaluate(config, str(tmp_path / "b"))

  for k in (1, 2):
    with (
      np.load(tmp_path / "a" / f"round{k}" / "synthetic.npz") as a,
      np.load(tmp_path / "b" / f"round{k}" / "synthetic.npz") as b,
    ):
      np.testing.assert_array_equal(a["images"], b["images"])
  assert resumed["rounds"] == uninterrupted["rounds"]
  for split in ("val", "test"):
    with (
      np.load(tmp_path / "a" / "reports" / f"{split}_predictions.npz") as a,
      np.load(tmp_path / "b" / "reports" / f"{split}_predictions.npz") as b,
    ):
      np.testing.assert_array_equal(a["probs"], b["probs"])


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_arguments_and_errors():
  assert gan_config.get_config().rebalance.method == "gan"
  assert gan_config.get_config("objective=gan").gan.objective == "gan"
  assert gan_config.get_config("nodiffaug").gan.diffaugment == ""
  with pytest.raises(ValueError, match="method= takes one of"):
    gan_config.get_config("method=smote")
  config = _smoke()
  config.gan.image_size = 48
  with pytest.raises(configlib.ConfigError, match="gan: image_size must be"):
    configlib.validate(config)
  config = _smoke()
  config.rebalance.d_quantile = 1.0
  with pytest.raises(configlib.ConfigError, match=r"rebalance\.d_quantile"):
    configlib.validate(config)
