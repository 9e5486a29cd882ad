"""Tests for busjax.models.fusion: fusion modes, alignment, ablations, gradients, config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from busjax.models import fusion

SMALL_WIDTHS = (0.25, 0.125)  # MobileNetV2, DenseNet121: seconds, not minutes, on 2 CPU cores


def _config(**fields):
  base = dict(
    name="fusion",
    backbones=("mobilenet_v2", "densenet121"),
    backbone_widths=SMALL_WIDTHS,
    projection_channels=16,
    fusion="concat",
    attention="cbam",
    attention_reduction=4,
    dropout=0.0,
    in_channels=1,
    dtype="float32",
  )
  base.update(fields)
  return ml_collections.ConfigDict(base)


@nnx.jit
def _forward(model, x):
  return model(x, return_features=True)


def _images(n=2, size=64, channels=1):
  return jax.random.normal(jax.random.key(0), (n, size, size, channels), jnp.float32)


@pytest.mark.slow
def test_default_concat_cbam_model_shapes_and_features():
  model = fusion.create(_config(), num_classes=3, rngs=nnx.Rngs(0))
  model.eval()
  logits, features = _forward(model, _images())
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert {"mobilenet_v2", "densenet121", "fused", "attended", "features"} <= set(features)
  assert features["fused"].shape == (2, 2, 2, 32)  # 64 px / 32, two branches of 16 channels
  np.testing.assert_array_equal(np.asarray(features["features"]), np.asarray(features["attended"]))
  assert features["mobilenet_v2"].shape[-1] == model.backbones["mobilenet_v2"].num_features
  assert features["densenet121"].shape[-1] == model.backbones["densenet121"].num_features
  assert model.num_features == 32
  # CBAM re-weights the fused map: attended = fused * gates with gates in [0, 1].
  fused, attended = np.asarray(features["fused"]), np.asarray(features["attended"])
  assert np.all(np.abs(attended) <= np.abs(fused) + 1e-6)
  assert not np.allclose(attended, fused)


def test_add_fusion_is_the_sum_of_projections_and_no_attention_is_identity():
  model = fusion.create(_config(fusion="add", attention="none"), num_classes=2, rngs=nnx.Rngs(1))
  model.eval()
  x = _images()
  _, features = _forward(model, x)
  projected = [model.projections[name](features[name]) for name in model.backbone_names]
  np.testing.assert_allclose(
    np.asarray(features["fused"]), np.asarray(projected[0] + projected[1]), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(features["attended"]), np.asarray(features["fused"]))
  assert features["fused"].shape[-1] == 16


def test_attention_weighted_fusion_weights_sum_to_one():
  # ResNet-18 as the second branch: cheaper to compile than DenseNet, and shows any pair works.
  model = fusion.create(
    _config(
      fusion="attention_weighted",
      attention="eca",
      backbones=("mobilenet_v2", "resnet18"),
      backbone_widths=(0.25, 0.125),
    ),
    num_classes=2,
    rngs=nnx.Rngs(2),
  )
  # Training mode: BatchNorm normalises with batch statistics (untrained running statistics
  # leave DenseNet activations unnormalised and the branch softmax saturated).
  model.train()
  _, features = _forward(model, _images(n=3))
  weights = np.asarray(features["branch_weights"])
  assert weights.shape == (3, 2)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert np.all(weights > 0)
  # Still in training mode: each projection re-normalises the same batch exactly as in the call.
  projected = [np.asarray(model.projections[n](features[n])) for n in model.backbone_names]
  expected = sum(weights[:, i, None, None, None] * projected[i] for i in range(2))
  np.testing.assert_allclose(np.asarray(features["fused"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["se", "channel_spatial"])
def test_single_backbone_ablation(attention):
  model = fusion.create(
    _config(backbones=("mobilenet_v2",), backbone_widths=(0.25,), attention=attention),
    num_classes=2,
    rngs=nnx.Rngs(3),
  )
  model.eval()
  logits, features = _forward(model, _images(size=32))
  assert logits.shape == (2, 2)
  assert "densenet121" not in features
  assert features["fused"].shape == (2, 1, 1, 16)


def test_align_spatial_resizes_to_the_smallest_map():
  maps = [jnp.ones((1, 7, 9, 2)), jnp.full((1, 4, 5, 3), 2.0), jnp.zeros((1, 4, 6, 1))]
  aligned = fusion.align_spatial(maps)
  assert [m.shape for m in aligned] == [(1, 4, 5, 2), (1, 4, 5, 3), (1, 4, 5, 1)]
  np.testing.assert_allclose(np.asarray(aligned[0]), 1.0, rtol=1e-6)  # constants stay constant
  assert aligned[1] is maps[1]  # already the right size: untouched


@pytest.mark.slow
def test_gradients_reach_both_backbones_and_the_head():
  # A DenseNet with 2 layers per block: the wiring under test is the same as DenseNet121's
  # 6-12-24-16,
  # whose backward pass takes XLA:CPU minutes to compile (the full model trains in
  # test_configs.test_fusion_smoke_trains_end_to_end).
  config = _config(dropout=0.1)
  config.densenet121 = ml_collections.ConfigDict(dict(block_config=(2, 2, 2, 2)))
  model = fusion.create(config, num_classes=2, rngs=nnx.Rngs(4))
  model.train()
  x, labels = _images(size=32), jnp.array([0, 1])

  def loss_fn(m, x):
    logits = m(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  # jit around grad: one compiled program (grad of a jitted function runs the backward pass
  # op by op).
  grads = nnx.jit(nnx.grad(loss_fn))(model, x)
  for part in ("backbones", "projections", "attention", "head"):
    leaves = jax.tree.leaves(nnx.state(getattr(grads, part), nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), part
  for name in ("mobilenet_v2", "densenet121"):
    stem = np.asarray(grads.backbones[name].stem.conv.kernel[...])
    assert np.abs(stem).max() > 0, name


def test_backbone_config_inherits_and_overrides():
  config = _config(padding="same", bn_epsilon=1e-3)
  config.densenet121 = ml_collections.ConfigDict(dict(padding="symmetric", bn_epsilon=1.001e-5))
  mnv2 = fusion.backbone_config(config, "mobilenet_v2", 0)
  dense = fusion.backbone_config(config, "densenet121", 1)
  assert (mnv2.name, mnv2.width, mnv2.padding, mnv2.bn_epsilon) == (
    "mobilenet_v2",
    0.25,
    "same",
    1e-3,
  )
  assert (dense.name, dense.variant, dense.width) == ("densenet", "densenet121", 0.125)
  assert (dense.padding, dense.bn_epsilon, dense.in_channels) == ("symmetric", 1.001e-5, 1)


@pytest.mark.parametrize(
  "fields,message",
  [
    (dict(fusion="mean"), "unknown fusion 'mean'"),
    (dict(backbones=("vgg16",), backbone_widths=None), "unknown backbone 'vgg16'"),
    (dict(backbones=("mobilenet_v2", "mobilenet_v2")), "lists a backbone twice"),
    (dict(backbone_widths=(0.25,)), "one width per backbone"),
    (dict(attention="transformer"), "unknown attention 'transformer'"),
  ],
)
def test_bad_configs_fail_clearly(fields, message):
  with pytest.raises(ValueError, match=message):
    fusion.create(_config(**fields), num_classes=2, rngs=nnx.Rngs(0))


def test_pretrained_backbone_is_loaded_from_its_sub_config(tmp_path):
  pretrained = pytest.importorskip("busjax.models.pretrained")
  pytest.importorskip("safetensors")
  donor = fusion.create(
    _config(backbones=("mobilenet_v2",), backbone_widths=(0.35,)), num_classes=2, rngs=nnx.Rngs(5)
  )
  flat = {
    k: np.asarray(v[...]) + 0.5
    for k, v in pretrained.model_variables(donor.backbones["mobilenet_v2"]).items()
  }
  path = str(tmp_path / "mnv2_busjax.safetensors")
  pretrained.save_flat(flat, path)
  config = _config(backbones=("mobilenet_v2",), backbone_widths=(0.35,))
  config.mobilenet_v2 = ml_collections.ConfigDict(dict(pretrained=path))
  model = fusion.create(config, num_classes=2, rngs=nnx.Rngs(6))
  np.testing.assert_array_equal(
    np.asarray(model.backbones["mobilenet_v2"].stem.conv.kernel[...]), flat["stem.conv.kernel"]
  )
