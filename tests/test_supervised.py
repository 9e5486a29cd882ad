"""End-to-end tests of the supervised trainer on phantom data (`:smoke` settings)."""

import copy
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from crashing import Crash, CrashingDataset
from flax import nnx
from pacing import logged_all_paced, recording_pacer

from busjax import checkpointing, configlib, sharding
from busjax.data import pipeline, records, sources, splits
from busjax.evaluators import metrics
from busjax.trainers import state_utils, supervised

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _smoke_config(name="supervised", arg="smoke"):
  return configlib.load_file(os.path.join(CONFIGS, f"{name}.py"), arg)


def _mesh(n):
  return jax.sharding.Mesh(
    np.asarray(jax.devices()[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


def test_smoke_run_writes_reports_and_checkpoints(supervised_smoke_run):
  tmp_path, config, summary = supervised_smoke_run
  reports = tmp_path / "reports"
  assert (tmp_path / "summary.json").exists() and (tmp_path / "config.json").exists()
  assert summary["steps"] == config.train.num_steps
  # Each report covers exactly its split's images, and its AUC is the one its predictions give.
  collection = sources.from_config(config.data)
  parts = splits.make_splits(collection, config.split)
  for split in ("val", "test"):
    with open(reports / split / "predictions.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in parts[split].records)
    y = np.asarray([int(r["label"]) for r in rows])
    p = np.asarray([float(r["p_malignant"]) for r in rows])
    assert summary["reports"][split]["auc"] == pytest.approx(metrics.roc_auc(y, p), abs=1e-9)
    assert summary["reports"][split]["images_with_copy_in_train"] == 0  # Grouped k-fold.
  report_files = [p for p in reports.rglob("*.json")]
  assert report_files, "no report.json written"
  text = " ".join(p.read_text() for p in report_files)
  assert '"synthetic": true' in text
  test_report = json.loads((reports / "test" / "report.json").read_text())
  assert test_report["bootstrap"]["resamples"] == config.report.bootstrap_resamples == 200
  assert 0 < test_report["auc"]["bootstrap_ci"]["n_resamples"] <= 200
  # Temperature scaling: fitted on val only (summary), reported beside the raw calibration.
  scaled = test_report["calibration"]["temperature_scaled"]
  assert scaled["temperature"] == pytest.approx(summary["temperature"])
  assert scaled["fitted_on"].endswith("/val") and "adaptive_ece" in test_report["calibration"]
  with open(reports / "test" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  raw = np.asarray([float(r["p_malignant"]) for r in rows])
  calibrated = np.asarray([float(r["p_malignant_calibrated"]) for r in rows])
  logit = lambda q: np.log(q) - np.log1p(-q)  # noqa: E731
  np.testing.assert_allclose(logit(calibrated), logit(raw) / summary["temperature"], atol=1e-3)
  assert any(p.suffix == ".png" for p in reports.rglob("*.png"))
  assert (tmp_path / "metrics.jsonl").exists()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [line for line in lines if line["split"] == "train"]
  assert train_lines and all(np.isfinite(line["loss"]) for line in train_lines)
  assert any(line["split"] == "val" and "val_auc" in line for line in lines)


def _one_step(config, n_devices, batch):
  """One step, jitted as the trainer jits it, on an `n_devices` mesh; (loss, flat params)."""
  mesh = _mesh(n_devices)
  model = supervised.create_model(config.model, 2, config.seed)
  tx = supervised.create_optimizer(config.optim, 10)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  step = sharding.jit_train_step(
    supervised.make_train_step(defs, tx, config), mesh, state, constants=(np.ones(2, np.float32),)
  )
  state = sharding.replicate(state, mesh)
  before = {k: np.asarray(v) for k, v in state_utils.flatten_state(state["params"]).items()}
  new_state, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
  flat = {k: np.asarray(v) for k, v in state_utils.flatten_state(new_state["params"]).items()}
  assert int(new_state["step"]) == 1
  assert any(not np.array_equal(before[k], flat[k]) for k in flat)  # The step moved the weights.
  return float(metrics["loss"]), flat


@pytest.mark.slow
def test_class_weights_are_an_argument_so_folds_share_one_compiled_step():
  config = _smoke_config()
  config.optim.warmup_steps = 0
  mesh = _mesh(1)
  model = supervised.create_model(config.model, 2, config.seed)
  tx = supervised.create_optimizer(config.optim, 10)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  state = sharding.replicate(state, mesh)
  rng = np.random.default_rng(0)
  batch = sharding.host_to_global(
    {
      "image": rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8),
      "label": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int32),
    },
    mesh,
  )
  steps = [
    sharding.jit_train_step(
      supervised.make_train_step(defs, tx, config), mesh, state, constants=(w,), donate=False
    )
    for w in (np.array([0.6, 2.0], np.float32), np.array([1.0, 1.0], np.float32))
  ]
  texts = [step.lower(state, batch, jax.random.key(0)).as_text() for step in steps]
  assert texts[0] == texts[1]  # One program: the persistent cache compiles it once.
  losses = [float(step(state, batch, jax.random.key(0))[1]["loss"]) for step in steps]
  assert abs(losses[0] - losses[1]) > 1e-4  # Yet each step uses its own weights.


@pytest.mark.slow
def test_same_step_on_one_and_four_devices():
  config = _smoke_config()
  config.optim.warmup_steps = 0  # Warm-up starts at lr 0: the first step would not move.
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8),
    "label": rng.integers(0, 2, (8,)).astype(np.int32),
  }
  loss1, params1 = _one_step(config, 1, batch)
  loss4, params4 = _one_step(config, 4, batch)
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5, atol=1e-6)
  assert_same_updates(params1, params4, lr=config.optim.lr)


def assert_same_updates(a, b, *, lr):
  """Parameters after the same steps on different device layouts agree.

  Adam divides each gradient by its own magnitude, so an entry whose gradient is ~0 can move by
  up to +-lr on either layout (summation order flips its sign). Everything else must agree to
  float precision: at most 0.1% of the entries may differ, and none by more than 2 lr.
  """
  assert a.keys() == b.keys()
  total = off = 0
  for name in a:
    diff = np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64))
    assert diff.max() <= 2 * lr, (name, diff.max())
    total += diff.size
    off += int((diff > 1e-5 + 1e-4 * np.abs(np.asarray(b[name]))).sum())
  assert off <= max(1, total // 1000), f"{off} of {total} parameters differ"


def test_kill_and_resume_gives_identical_parameters(tmp_path, monkeypatch):
  config = _smoke_config()
  config.train.num_steps = 6
  config.train.checkpoint_every = 2
  config.train.eval_every = 3
  paced = []
  monkeypatch.setattr(state_utils, "StepPacer", recording_pacer(paced))

  supervised.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  # Every step goes through the pacer (see state_utils.StepPacer).
  assert len(paced) == 6 and all("loss" in names for names in paced)
  assert logged_all_paced(tmp_path / "uninterrupted" / "metrics.jsonl", "train")

  # Simulate a crash on the 4th batch (after the checkpoints at steps 2 and 3, before the one at 4).
  real_train_dataset = pipeline.train_dataset

  created = []

  def crashing_dataset(*args, **kwargs):
    # The first dataset is the training stream; later ones (EMA BatchNorm batches) stay real.
    created.append(kwargs.get("seed"))
    dataset = real_train_dataset(*args, **kwargs)
    return CrashingDataset(dataset, after=3) if len(created) == 1 else dataset

  monkeypatch.setattr(pipeline, "train_dataset", crashing_dataset)
  with pytest.raises(Crash):
    supervised.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(pipeline, "train_dataset", real_train_dataset)
  resumed = supervised.train_and_evaluate(config, str(tmp_path / "resumed"))
  # The last checkpoint before the crash: step 3, the evaluation step (evaluations checkpoint too).
  assert resumed["resumed_at_step"] == 3 and resumed["steps"] == 6

  def final_params(workdir):
    state = _fresh_state(config, 6)
    flat = checkpointing.load_state(
      str(workdir), state_utils.abstract_flat_state(state), which="latest"
    )
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith(("params.", "ema."))}

  a, b = final_params(tmp_path / "uninterrupted"), final_params(tmp_path / "resumed")
  assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)  # EMA resumes too.
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _fresh_state(config, total_steps):
  model = supervised.create_model(config.model, 2, config.seed)
  tx = supervised.create_optimizer(config.optim, total_steps)
  return supervised.create_train_state(model, tx, use_ema=bool(config.train.ema_decay))[1]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
  config = _smoke_config()
  config.train.num_steps = 6
  config.train.checkpoint_every = 1
  config.train.log_every = 1
  config.train.eval_every = 6
  config.train.ema_decay = 0.0
  config.optim.lr = 1e6  # Diverges after a few steps.
  config.optim.warmup_steps = 0
  config.optim.clip_norm = 0.0
  with pytest.raises(supervised.TrainingError, match="non-finite") as error:
    supervised.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  # The error names the last good step, and that checkpoint is on disk and finite.
  found = __import__("re").search(r"last good checkpoint \(step (\d+)\)", message)
  assert found, message
  good = int(found.group(1))
  state = _fresh_state(config, 6)
  flat = checkpointing.load_state(
    str(tmp_path), state_utils.abstract_flat_state(state), which="latest"
  )
  assert int(flat["step"]) == good
  assert all(np.all(np.isfinite(np.asarray(v))) for k, v in flat.items() if "params" in k)


def test_class_weights_balanced_matches_sklearn_formula():
  w = supervised.class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
  np.testing.assert_allclose(w, [4 / (2 * 3), 4 / (2 * 1)])
  with pytest.raises(ValueError, match="class_weights"):
    supervised.class_weights(np.array([0, 1]), 2, "bogus")


def test_focal_loss_down_weights_easy_examples():
  logits = jnp.array([[4.0, -4.0], [0.1, -0.1]])
  labels = jnp.array([0, 0])
  w = jnp.ones(2)
  ce = supervised.classification_loss(logits[:1], labels[:1], w)
  focal = supervised.classification_loss(logits[:1], labels[:1], w, focal_gamma=2.0)
  assert focal < ce * 0.01  # An easy, confident example contributes almost nothing.
  hard_ce = supervised.classification_loss(logits[1:], labels[1:], w)
  hard_focal = supervised.classification_loss(logits[1:], labels[1:], w, focal_gamma=2.0)
  assert hard_focal > hard_ce * 0.2


def test_finished_run_evaluates_new_external_source_without_retraining(tmp_path):
  config = _smoke_config()
  first = supervised.train_and_evaluate(config, str(tmp_path))
  assert "shifted" not in first["reports"]
  # Same command on the finished workdir, plus an external source (a phantom "scanner" with other
  # gain and sector probes): restores, does not train, and reports on the new source.
  config = _smoke_config()
  config.external.shifted = configlib.phantom_data(
    image_size=64, counts=(10, 6, 0), seed=3, gain_db=6.0, field_of_view="sector"
  )
  checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_dir())
  train_lines = (tmp_path / "metrics.jsonl").read_text().count('"split": "train"')
  second = supervised.train_and_evaluate(config, str(tmp_path))
  # Not one training step ran: no new checkpoint, no new training metrics.
  assert (first["resumed_at_step"], second["resumed_at_step"]) == (0, config.train.num_steps)
  assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_dir()) == checkpoints
  assert (tmp_path / "metrics.jsonl").read_text().count('"split": "train"') == train_lines
  assert second["reports"]["test"]["auc"] == first["reports"]["test"]["auc"]
  shifted = json.loads((tmp_path / "reports" / "shifted" / "report.json").read_text())
  assert shifted["provenance"]["synthetic"] and shifted["counts"]["images"] == 16
  assert shifted["provenance"]["trained_on"].endswith("/train")


def test_resume_continues_another_runs_state_and_init_from_takes_only_weights(tmp_path):
  config = _smoke_config()
  config.train.num_steps = 4
  supervised.train_and_evaluate(config, str(tmp_path / "a"))
  best_a = checkpointing.load_state(
    str(tmp_path / "a"), state_utils.abstract_flat_state(_fresh_state(config, 4)), which="best"
  )

  # config.resume: the other run's latest full state; training goes on from its step.
  config_b = _smoke_config()
  config_b.train.num_steps = 6
  config_b.resume = str(tmp_path / "a")
  summary = supervised.train_and_evaluate(config_b, str(tmp_path / "b"))
  assert summary["resumed_at_step"] == 4 and summary["steps"] == 6

  # config.init_from: weights of the other run's best checkpoint; fresh step and optimiser.
  config_c = _smoke_config()
  config_c.init_from = str(tmp_path / "a")
  fresh = _fresh_state(config_c, 4)
  with checkpointing.Checkpointer(tmp_path / "c", best_metric="val_auc") as ckpt:
    state, origin = state_utils.restore_or_init(ckpt, config_c, fresh)
  assert origin == "init_from" and int(state["step"]) == 0
  flat = state_utils.flatten_state(state)
  fresh_flat = state_utils.flatten_state(fresh)
  for name, value in flat.items():
    expected = best_a[name] if name.startswith(("params.", "rest.")) else fresh_flat[name]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=name)

  # Named sub-trees: only the head's parameters, everything else stays fresh.
  with checkpointing.Checkpointer(tmp_path / "d", best_metric="val_auc") as ckpt:
    state, _ = state_utils.restore_or_init(ckpt, config_c, fresh, init_from=("params.head.",))
  flat = state_utils.flatten_state(state)
  head = [k for k in flat if k.startswith("params.head.")]
  assert head
  for name, value in flat.items():
    expected = best_a[name] if name in head else fresh_flat[name]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=name)


class _TinyBN(nnx.Module):
  """BatchNorm straight on the image, then a head: its statistics are easy to compute by hand."""

  def __init__(self, rngs):
    self.bn = nnx.BatchNorm(1, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(1, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.bn(x).mean(axis=(1, 2)))


def test_ema_batchnorm_statistics_are_re_estimated_for_the_averaged_weights():
  config = _smoke_config()
  tx = supervised.create_optimizer(config.optim, 10)
  defs, state = supervised.create_train_state(_TinyBN(nnx.Rngs(0)), tx, use_ema=True)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)) for _ in range(3)]
  refreshed = supervised.make_bn_refresh(defs, config)(state["ema"], state["rest"], batches)
  pixels = [(np.asarray(b, np.float64) / 255.0 - 0.5) / 0.25 for b in batches]
  stats = refreshed["bn"]
  # Equal-weight average of each batch's statistics (precise BatchNorm), not a momentum blend.
  np.testing.assert_allclose(stats["mean"][...], [np.mean([x.mean() for x in pixels])], rtol=1e-5)
  np.testing.assert_allclose(stats["var"][...], [np.mean([x.var() for x in pixels])], rtol=1e-4)
  # The evaluated variables are the EMA weights with these statistics.
  state["ema_rest"] = refreshed
  params, rest = supervised.eval_variables(state)
  assert params is state["ema"] and rest is refreshed


def test_weight_decay_skips_norms_and_biases_by_default():
  config = _smoke_config()
  config.optim.weight_decay = 0.1
  config.optim.warmup_steps = 0
  model = supervised.create_model(config.model, 2, config.seed)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for decay, expect_decayed in (("kernels", lambda p: p.ndim > 1), ("all", lambda p: True)):
    config.optim.decay = decay
    tx = supervised.create_optimizer(config.optim, 10)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat_p = state_utils.flatten_state(params)
    flat_u = state_utils.flatten_state(updates)
    for name, p in flat_p.items():
      moved = bool(np.any(np.asarray(flat_u[name]) != 0)) and bool(np.any(np.asarray(p) != 0))
      if np.any(np.asarray(p) != 0):
        assert moved == expect_decayed(p), (decay, name)


def test_lesion_loss_rewards_the_lesion_and_skips_images_without_one():
  masks = np.zeros((2, 16, 16, 1), np.uint8)
  masks[0, :8, :8] = 1  # Image 0: lesion in the top-left quarter; image 1: no lesion known.
  features = np.zeros((2, 4, 4, 1), np.float32)
  features[:, :2, :2] = 1.0  # Both images "see" the top-left quarter.
  blind = supervised.init_mask_head(1)
  seeing = {"kernel": jnp.full((1, 1), 10.0), "bias": jnp.full((1,), -5.0)}
  loss = lambda f, m, h: float(supervised.lesion_loss(jnp.asarray(f), jnp.asarray(m), h))
  assert loss(features, masks, seeing) < 0.1 < loss(features, masks, blind)
  # Image 1's empty mask teaches nothing: the loss is image 0's alone.
  assert loss(features, masks, seeing) == pytest.approx(loss(features[:1], masks[:1], seeing))
  # A mask whose side is not a multiple of the map's is resampled, not rejected.
  odd = np.zeros((2, 15, 15, 1), np.uint8)
  odd[0, :7, :7] = 1
  assert loss(features, odd, seeing) < 0.5 < loss(features, odd, blind)


def test_mask_loss_trains_a_head_that_prediction_never_needs(tmp_path):
  from busjax import inference

  config = _smoke_config()
  config.train.mask_loss.weight = 1.0
  config.input.augment.lesion_crop.probability = 0.5
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in lines if x.get("split") == "train"]
  assert train and all(np.isfinite(x["mask_loss"]) and x["mask_loss"] > 0 for x in train)
  # The head (it starts at zero) was trained and is checkpointed beside the model.
  channels = supervised._feature_channels(supervised.create_model(config.model, 2, 0), config)
  head = checkpointing.load_state(
    str(tmp_path), {"aux.kernel": np.zeros((channels, 1), np.float32)}, which="latest",
    partial=True,
  )  # fmt: skip
  assert np.abs(np.asarray(head["aux.kernel"])).max() > 0
  # The reloaded classifier (no head) gives the run's own test predictions.
  run = inference.load_run(str(tmp_path))
  stored = np.load(tmp_path / "reports" / "test_predictions.npz")
  parts = splits.make_splits(sources.from_config(config.data), config.split)
  images = run.prepare([records.load_image(r) for r in parts["test"].records])
  np.testing.assert_allclose(run.probabilities()(images), stored["probs"], atol=1e-5)
  assert summary["reports"]["test"]["auc"] is not None


def test_a_seed_ensemble_reports_and_reloads_as_the_mean_of_its_members(tmp_path):
  from PIL import Image

  from busjax import explain, inference, predict

  config = _smoke_config()
  config.seed, config.ensemble.members = 5, 2
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  assert summary["ensemble_members"] == 2 and "x2 seed ensemble" in summary["model"]
  members = [inference.load_run(str(tmp_path / f"member{k}")) for k in range(2)]
  assert [m.config.seed for m in members] == [5, 6]
  parts = splits.make_splits(sources.from_config(config.data), config.split)
  images = members[0].prepare([records.load_image(r) for r in parts["test"].records])
  member_probs = [m.probabilities()(images) for m in members]
  assert np.abs(member_probs[0] - member_probs[1]).max() > 1e-4  # Two different models.
  # The reports score the mean probability; each member's own AUC is kept beside it.
  stored = np.load(tmp_path / "reports" / "test_predictions.npz")
  np.testing.assert_allclose(stored["probs"], np.mean(member_probs, axis=0), atol=1e-5)
  y = stored["y_malignant"]
  np.testing.assert_allclose(
    summary["member_auc"]["test"],
    [metrics.roc_auc(y, p[:, records.MALIGNANT]) for p in member_probs],
  )
  report = json.loads((tmp_path / "reports" / "test" / "report.json").read_text())
  assert report["provenance"]["ensemble_members"] == 2
  # Loaded back, the ensemble predicts what its reports used, with the ensemble's threshold.
  run = inference.load_run(str(tmp_path))
  assert len(run.ensemble) == 1 and run.threshold == summary["threshold"]
  np.testing.assert_allclose(run.probabilities()(images), stored["probs"], atol=1e-5)
  # The predict CLI: the ensemble's probabilities, and an overlay per image.
  folder = tmp_path / "scans"
  folder.mkdir()
  for i, record in enumerate(parts["test"].records[:2]):
    Image.fromarray(records.load_image(record)).save(folder / f"{i}.png")
  result = predict.predict(
    str(tmp_path), [str(folder)], str(tmp_path / "p.csv"), overlays=str(tmp_path / "overlays")
  )
  assert result["predicted"] == 2 and len(list((tmp_path / "overlays").iterdir())) == 2
  with open(tmp_path / "p.csv") as f:
    rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
  np.testing.assert_allclose(
    [float(r["p_malignant"]) for r in rows], stored["p_malignant"][:2], atol=2e-5
  )
  with pytest.raises(records.DataError, match="seed ensemble of 2 models: explain one member"):
    explain.explain(str(tmp_path), [str(tmp_path)], ["gradcam"], str(tmp_path / "maps"))
  config.trainer = "gan_rebalance"
  with pytest.raises(configlib.ConfigError, match="seed ensembles are for the supervised"):
    configlib.validate(config)


def test_test_time_flip_predicts_the_same_for_an_image_and_its_mirror():
  config = _smoke_config()
  config.model.test_time_flip = True
  model = supervised.create_model(config.model, 2, 0)
  model.eval()
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 1), dtype=np.uint8)
  x = supervised._preprocess(jnp.asarray(images), config.model)
  flipped = supervised.class_probabilities(model, x[:, :, ::-1], config.model)
  np.testing.assert_allclose(
    supervised.class_probabilities(model, x, config.model), flipped, atol=1e-6
  )
  config.model.test_time_flip = False  # Without it, a random network tells them apart.
  plain = supervised.class_probabilities(model, x, config.model)
  assert (
    np.abs(plain - supervised.class_probabilities(model, x[:, :, ::-1], config.model)).max() > 1e-4
  )


@pytest.mark.parametrize("best_eval", ["last", "first"])
def test_the_selected_checkpoint_is_read_back_only_when_it_is_not_the_last_step(
  tmp_path, monkeypatch, best_eval
):
  """The last step's state and val predictions are already in memory and the report uses them;
  an earlier best step is restored from disk. Either way val is reported with the predictions
  the selected step made during training."""
  config = _smoke_config()
  config.train.num_steps = 4
  config.train.eval_every = 2
  data = splits.make_splits(sources.from_config(config.data), config.split)
  val_predictions = []  # p_malignant of val at steps 2 and 4, as training saw them.
  aucs = iter([0.9, 0.5] if best_eval == "first" else [0.5, 0.9])

  def roc_auc(y, p):
    val_predictions.append(np.asarray(p))
    return next(aucs)

  restored = []
  restore_best = checkpointing.Checkpointer.restore_best

  def counting_restore_best(self, abstract):
    restored.append(self.best_step())
    return restore_best(self, abstract)

  monkeypatch.setattr(supervised.metrics, "roc_auc", roc_auc)
  monkeypatch.setattr(checkpointing.Checkpointer, "restore_best", counting_restore_best)
  trained = supervised.train_split(config, str(tmp_path), data)
  best = 0 if best_eval == "first" else 1
  assert trained.info["selected_step"] == (2, 4)[best]
  assert restored == ([2] if best_eval == "first" else [])
  assert not np.allclose(val_predictions[0], val_predictions[1])  # The steps differ.
  for collection in (data["val"], copy.copy(data["val"])):  # Reused, then predicted again.
    probs = trained.predict(collection)[:, records.MALIGNANT]
    np.testing.assert_allclose(probs, val_predictions[best], rtol=1e-6, atol=1e-7)
