"""End-to-end tests of the supervised trainer on phantom data (`:smoke` settings)."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busjax import configlib
from busjax.data import pipeline
from busjax.trainers import state_utils, supervised

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _smoke_config(name="supervised", arg="smoke"):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _mesh(n):
  return jax.sharding.Mesh(
    np.asarray(jax.devices()[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


def test_smoke_run_writes_reports_and_checkpoints(tmp_path):
  config = _smoke_config()
  configlib.validate(config)
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  reports = tmp_path / "reports"
  assert (tmp_path / "summary.json").exists() and (tmp_path / "config.json").exists()
  assert summary["steps"] == config.train.num_steps
  for split in ("val", "test"):
    assert split in summary["reports"]
    auc = summary["reports"][split]["auc"]
    assert auc is None or 0.0 <= auc <= 1.0
  report_files = [p for p in reports.rglob("*.json")]
  assert report_files, "no report.json written"
  text = " ".join(p.read_text() for p in report_files)
  assert '"synthetic": true' in text
  test_report = json.loads((reports / "test" / "report.json").read_text())
  assert test_report["bootstrap"]["resamples"] == config.report.bootstrap_resamples == 200
  assert 0 < test_report["auc"]["bootstrap_ci"]["n_resamples"] <= 200
  assert any(p.suffix == ".png" for p in reports.rglob("*.png"))
  assert (tmp_path / "metrics.jsonl").exists()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [line for line in lines if line["split"] == "train"]
  assert train_lines and all(np.isfinite(line["loss"]) for line in train_lines)
  assert any(line["split"] == "val" and "val_auc" in line for line in lines)


def _one_step(config, n_devices, batch):
  """One jitted train step on an `n_devices` mesh; returns (loss, flat params)."""
  mesh = _mesh(n_devices)
  model = supervised.create_model(config.model, 2, config.seed)
  tx = supervised.create_optimizer(config.optim, 10)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state_shardings = jax.tree.map(lambda _: replicated, state)
  step = jax.jit(
    supervised.make_train_step(defs, tx, config, np.ones(2, np.float32)),
    in_shardings=(state_shardings, {"image": data, "label": data}, replicated),
    out_shardings=(state_shardings, replicated),
  )
  state = jax.device_put(state, state_shardings)
  batch = jax.device_put(batch, data)
  new_state, metrics = step(state, batch, jax.random.key(1))
  assert new_state["params"] is not None
  flat = state_utils.flatten_state(new_state["params"])
  return float(metrics["loss"]), {k: np.asarray(v) for k, v in flat.items()}


def test_same_step_on_one_and_four_devices():
  config = _smoke_config()
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8),
    "label": rng.integers(0, 2, (8,)).astype(np.int32),
  }
  loss1, params1 = _one_step(config, 1, batch)
  loss4, params4 = _one_step(config, 4, batch)
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5, atol=1e-6)
  for name in params1:
    np.testing.assert_allclose(params1[name], params4[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_kill_and_resume_gives_identical_parameters(tmp_path, monkeypatch):
  config = _smoke_config()
  config.train.num_steps = 6
  config.train.checkpoint_every = 2
  config.train.eval_every = 3

  supervised.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

  # Simulate a crash on the 4th batch (after the checkpoints at steps 2 and 3, before the one at 4).
  real_train_dataset = pipeline.train_dataset

  class Crash(Exception):
    pass

  class CrashingIterator(grain.DatasetIterator):
    """The real iterator (state and all) that dies on its 4th batch, like a killed process."""

    def __init__(self, parent):
      super().__init__(parent)
      self.count = 0

    def __next__(self):
      self.count += 1
      if self.count > 3:
        raise Crash()
      return next(self._parent)

    def get_state(self):
      return self._parent.get_state()

    def set_state(self, state):
      self._parent.set_state(state)

  class CrashingDataset:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      return CrashingIterator(iter(self.ds))

  def crashing_dataset(*args, **kwargs):
    return CrashingDataset(real_train_dataset(*args, **kwargs))

  monkeypatch.setattr(pipeline, "train_dataset", crashing_dataset)
  with pytest.raises(Crash):
    supervised.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(pipeline, "train_dataset", real_train_dataset)
  resumed = supervised.train_and_evaluate(config, str(tmp_path / "resumed"))
  # The last checkpoint before the crash: step 3, the evaluation step (evaluations checkpoint too).
  assert resumed["resumed_at_step"] == 3 and resumed["steps"] == 6

  def final_params(workdir):
    from busjax import checkpointing

    model = supervised.create_model(config.model, 2, config.seed)
    tx = supervised.create_optimizer(config.optim, 6)
    _, state = supervised.create_train_state(model, tx, use_ema=bool(config.train.ema_decay))
    flat = checkpointing.load_state(
      str(workdir), state_utils.abstract_flat_state(state), which="latest"
    )
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith(("params.", "ema."))}

  a, b = final_params(tmp_path / "uninterrupted"), final_params(tmp_path / "resumed")
  assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)  # EMA resumes too.
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
  config = _smoke_config()
  config.train.num_steps = 6
  config.train.checkpoint_every = 2
  config.train.eval_every = 6
  config.optim.lr = 1e30  # Diverges within a few steps.
  config.optim.clip_norm = 0.0
  with pytest.raises(supervised.TrainingError, match="non-finite"):
    supervised.train_and_evaluate(config, str(tmp_path))


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
  second = supervised.train_and_evaluate(config, str(tmp_path))
  assert second["train_seconds"] < 1.0
  assert (first["resumed_at_step"], second["resumed_at_step"]) == (0, config.train.num_steps)
  assert second["reports"]["test"]["auc"] == first["reports"]["test"]["auc"]
  shifted = json.loads((tmp_path / "reports" / "shifted" / "report.json").read_text())
  assert shifted["provenance"]["synthetic"] and shifted["counts"]["images"] == 16
  assert shifted["provenance"]["trained_on"].endswith("/train")
