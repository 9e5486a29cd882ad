"""Tests of contrastive pretraining (busjax.trainers.contrastive) and SSL fine-tuning."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pacing import logged_all_paced, recording_pacer

from busjax import checkpointing, configlib, sharding
from busjax.data import augment, pipeline, records, splits
from busjax.models import contrastive as contrastive_model
from busjax.trainers import contrastive, state_utils, supervised

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config(name, arg="smoke"):
  return configlib.load_file(os.path.join(CONFIGS, f"{name}.py"), arg)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def _nt_xent_numpy(z1, z2, tau, groups=None):
  """Direct loop over anchors, as the SimCLR paper writes it (float64)."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2, n = len(z), len(z1)
  g = None if groups is None else np.concatenate([groups, groups])
  losses = []
  for i in range(n2):
    others = [j for j in range(n2) if j != i]
    denominator = np.log(sum(np.exp(z[i] @ z[j] / tau) for j in others))
    positives = [(i + n) % n2]
    if g is not None:
      positives = sorted({*positives, *[j for j in others if g[j] == g[i]]})
    losses.append(np.mean([denominator - z[i] @ z[p] / tau for p in positives]))
  return float(np.mean(losses))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_a_direct_computation(tau):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  loss, accuracy = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
  np.testing.assert_allclose(float(loss), _nt_xent_numpy(z1, z2, tau), rtol=1e-5)
  assert 0.0 <= float(accuracy) <= 1.0
  groups = np.array([0, 0, 1, 2, 2, 2])
  loss_g, _ = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau, jnp.asarray(groups))
  np.testing.assert_allclose(float(loss_g), _nt_xent_numpy(z1, z2, tau, groups), rtol=1e-5)
  # Identical views are found every time and give a smaller loss than unrelated ones.
  same, top1 = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z1), tau)
  assert float(top1) == 1.0 and float(same) < float(loss)


def _mesh(n):
  return jax.sharding.Mesh(
    np.asarray(jax.devices()[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


def test_the_loss_and_its_gradient_agree_on_one_and_four_devices():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)
  groups = np.array([0, 1, 1, 2, 3, 4, 4, 5], np.int32)

  def loss(a, b, g):
    return contrastive.nt_xent(a, b, 0.2, g)[0]

  results = []
  for n in (1, 4):
    mesh = _mesh(n)
    batch = sharding.host_to_global({"a": z1, "b": z2, "g": groups}, mesh)
    assert len(batch["a"].addressable_shards) == n
    value, grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      batch["a"], batch["b"], batch["g"]
    )
    results.append((float(value), np.asarray(grad[0]), np.asarray(grad[1])))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------


def _depth_ramp_collection(n=6, size=80):
  rows = np.linspace(20, 235, size)[:, None] * np.ones((1, size))
  noise = [np.random.default_rng(i).normal(0, 3, rows.shape) for i in range(n)]
  images = [np.clip(rows + e, 0, 255).astype(np.uint8) for e in noise]
  recs = tuple(
    records.Record(id=f"r{i}", label=i % 2, patient_id=f"p{i // 2}", image=img)
    for i, img in enumerate(images)
  )
  return records.Collection(name="ramp", records=recs)


def test_ultrasound_views_keep_depth_order():
  config = _config("ssl_pretrain", "")
  view = contrastive.view_config(config)
  data = pipeline.contrastive_dataset(
    _depth_ramp_collection(), image_size=64, global_batch_size=6, seed=0,
    view_configs=(view, view), process_index=0, process_count=1,
  )  # fmt: skip
  batches = [b for _, b in zip(range(4), data, strict=False)]
  for batch in batches:
    for name in ("view1", "view2"):
      for image in batch[name][..., 0].astype(np.float64):
        profile = np.asarray([row[row > 0].mean() if (row > 0).any() else np.nan for row in image])
        keep = ~np.isnan(profile)
        # Brightness grows with depth in every view: no vertical flip, small rotations only.
        assert np.corrcoef(np.flatnonzero(keep), profile[keep])[0, 1] > 0.8
  assert batches[0]["view1"].shape == (6, 64, 64, 1) and batches[0]["view1"].dtype == np.uint8
  assert not np.array_equal(batches[0]["view1"], batches[0]["view2"])


@pytest.mark.parametrize("policy", ["ultrasound", "trivial"])
def test_no_view_policy_moves_the_top_of_the_image_to_the_bottom(policy):
  config = augment.default_config()
  config.policy = policy
  config.elastic.probability = 1.0
  augmenter = augment.Augmenter(config, 64)
  image = np.random.default_rng(0).integers(1, 255, (80, 60), dtype=np.uint8)
  skin = np.zeros((80, 60), np.uint8)
  skin[:8] = 1
  for seed in range(40):
    out, mask = augmenter(image, np.random.default_rng(seed), mask=skin)
    assert out.shape == mask.shape == (64, 64)
    rows = np.flatnonzero(mask.any(1))
    if len(rows):
      assert rows.mean() < 32, (policy, seed)


def test_same_group_partner_views_come_from_the_group():
  collection = _depth_ramp_collection(8)
  groups = np.array([0, 0, 1, 1, 2, 3, 4, 5])
  view = augment.default_config()
  data = pipeline.contrastive_dataset(
    collection, image_size=32, global_batch_size=8, seed=0, view_configs=(view, view),
    groups=groups, partner_probability=1.0, process_index=0, process_count=1,
  )  # fmt: skip
  batch = next(iter(data))
  for index, partner in zip(batch["index"], batch["partner"], strict=True):
    assert groups[index] == groups[partner]
    assert (partner != index) == (np.sum(groups == groups[index]) > 1)


# ----------------------------------------------------------------------------------------------
# Label fractions and the linear probe
# ----------------------------------------------------------------------------------------------


def test_label_subsets_are_nested_whole_groups_per_class():
  config = configlib.base_config()
  config.data.phantom.counts = (60, 30, 0)
  config.split.near_duplicates = False
  from busjax.data import sources

  collection = sources.from_config(config.data)
  full = splits.make_splits(collection, config.split)
  kept = {}
  for fraction in (0.1, 0.25):
    config.split.label_fraction = fraction
    parts = splits.make_splits(collection, config.split)
    train = parts["train"]
    kept[fraction] = {r.id for r in train.records}
    assert train.name.endswith(f"-{fraction:.0%}labels")
    for label in (0, 1):
      have = int((train.labels == label).sum())
      assert have >= np.ceil(fraction * (full["train"].labels == label).sum())
    clusters = {r.meta["cluster"] for r in train.records}
    whole = [r.id for r in full["train"].records if r.meta["cluster"] in clusters]
    assert sorted(whole) == sorted(kept[fraction])  # Groups are never cut.
    assert [r.id for r in parts["test"].records] == [r.id for r in full["test"].records]
    assert not any(r.meta["copy_in_train"] for r in parts["test"].records)
  assert kept[0.1] < kept[0.25] < {r.id for r in full["train"].records}


def test_linear_probe_moves_only_the_head():
  config = _config("ssl_finetune", "smoke,probe,scratch,backbone=plain")
  config.optim.warmup_steps = 0
  model = supervised.create_model(config.model, 2, 0)
  tx = supervised.head_only(supervised.create_optimizer(config.optim, 10))
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  step = functools.partial(
    jax.jit(supervised.make_train_step(defs, tx, config)), weights=np.ones(2, np.float32)
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 255, (4, 64, 64, 1), dtype=np.uint8),
    "label": np.array([0, 1, 0, 1], np.int32),
  }
  before = {k: np.asarray(v) for k, v in state_utils.flatten_state(state).items()}
  for i in range(2):
    state, _ = step(state, batch, jax.random.key(i))
  after = state_utils.flatten_state(state)
  moved = {k for k in before if k in after and not np.array_equal(before[k], np.asarray(after[k]))}
  assert any(k.startswith("params.head.") for k in moved)
  assert {k for k in moved if k.startswith(("params.", "rest."))} <= {
    k for k in before if k.startswith("params.head.")
  }


# ----------------------------------------------------------------------------------------------
# End to end: pretrain -> fine-tune
# ----------------------------------------------------------------------------------------------


_PACED = []  # The metric names of every step the module's pretraining run paced.


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ssl_pretrain"))
  config = _config("ssl_pretrain", "smoke")
  configlib.validate(config)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(state_utils, "StepPacer", recording_pacer(_PACED))
    summary = contrastive.train_and_evaluate(config, workdir)
  return workdir, config, summary


@pytest.mark.slow
def test_pretraining_keeps_one_step_ahead_of_the_devices(pretrained_run):
  workdir, config, _ = pretrained_run
  # Every contrastive step goes through the pacer (see state_utils.StepPacer).
  assert sum("positive_top1" in names for names in _PACED) == config.ssl.steps
  assert logged_all_paced(os.path.join(workdir, "metrics.jsonl"), "train")


@pytest.mark.slow
def test_pretraining_checkpoints_and_reports_its_linear_probe(pretrained_run):
  workdir, config, summary = pretrained_run
  assert summary["pretraining_steps"] == config.ssl.steps
  assert summary["pretrained_on"] == "phantom/train+val"
  # Test images are never pretrained on: train + val only.
  assert (
    summary["pretraining_images"] < config.data.phantom.counts[0] + config.data.phantom.counts[1]
  )
  report = json.load(open(os.path.join(workdir, "reports", "test", "report.json")))
  assert report["provenance"]["synthetic"] is True
  assert "pretrained unlabelled on phantom/train+val" in report["provenance"]["trained_on"]
  with checkpointing.Checkpointer(workdir) as ckpt:
    assert ckpt.latest_step() == config.ssl.steps
  # The same command on the same workdir resumes: nothing left to train.
  again = contrastive.pretrain(config, workdir)
  assert again.info["resumed_at_step"] == config.ssl.steps


@pytest.mark.slow
def test_init_from_restores_exactly_the_encoder_and_nothing_else(pretrained_run, tmp_path):
  pretrain_dir, pretrain_config, _ = pretrained_run
  config = _config("ssl_finetune", "smoke")
  config.init_from = pretrain_dir
  configlib.validate(config)
  model = supervised.create_model(config.model, 2, config.seed)
  tx = supervised.create_optimizer(config.optim, 10)
  _, fresh = supervised.create_train_state(model, tx, use_ema=False)
  mapping = contrastive_model.encoder_mapping(state_utils.flatten_state(fresh))
  with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
    state, origin = state_utils.restore_or_init(
      ckpt, config, fresh, init_from=mapping, init_from_which="latest"
    )
  assert origin == "init_from"
  # The pretraining state, read independently.
  ssl_model = contrastive.create_model(pretrain_config, 2)
  _, ssl_state = supervised.create_train_state(
    ssl_model, contrastive.create_optimizer(pretrain_config, 4), use_ema=False
  )
  source = checkpointing.load_state(
    pretrain_dir, state_utils.abstract_flat_state(ssl_state), which="latest"
  )
  loaded = state_utils.flatten_state(state)
  before = state_utils.flatten_state(fresh)
  # Every module under params/rest but the classifier's own head (top level) is the encoder's.
  encoder = {k for k in loaded if k.startswith(("params.", "rest.")) and k.split(".")[1] != "head"}
  assert len(encoder) > 50
  for name in loaded:
    tree, _, rest = name.partition(".")
    if name in encoder:
      np.testing.assert_array_equal(loaded[name], source[f"{tree}.encoder.{rest}"], err_msg=name)
    else:  # The head, the optimiser state and the step keep their fresh values.
      np.testing.assert_array_equal(
        np.asarray(loaded[name]), np.asarray(before[name]), err_msg=name
      )
  assert any(k.startswith("params.head.") for k in loaded)


@pytest.mark.slow
def test_finetune_smoke_run_from_the_pretrained_encoder(pretrained_run, tmp_path):
  pretrain_dir, _, _ = pretrained_run
  config = _config("ssl_finetune", "smoke,labels=25")
  config.init_from = pretrain_dir
  configlib.validate(config)
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  assert summary["resumed_at_step"] == 0
  report = json.load(open(os.path.join(tmp_path, "reports", "test", "report.json")))
  assert report["provenance"]["trained_on"].endswith("-25%labels")


def test_bad_ssl_configs_are_one_line_errors():
  config = _config("ssl_pretrain", "smoke")
  config.ssl.views = "colour"
  with pytest.raises(configlib.ConfigError, match="ssl.views"):
    configlib.validate(config)
  config = _config("ssl_pretrain", "smoke")
  config.split.cross_validate = True
  with pytest.raises(configlib.ConfigError, match="once per split"):
    configlib.validate(config)
  with pytest.raises(configlib.ConfigError, match="init_from_encoder"):
    configlib.validate(_config("ssl_finetune", "smoke"))
  with pytest.raises(ValueError, match="labels="):
    _config("ssl_finetune", "labels=50")
