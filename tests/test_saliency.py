"""Saliency maps point where the answer comes from; mask agreement and faithfulness numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busjax.evaluators import saliency
from busjax.models import common

SIZE = 16
REGION = np.zeros((SIZE, SIZE, 1), np.float32)
REGION[2:6, 9:13] = 1.0  # The lesion: the malignant logit reads only these pixels.


def _maps(x):
  """A two-channel 'last feature map': the image inside the region, and outside it."""
  region = jnp.asarray(REGION)
  return jnp.concatenate([x * region, x * (1.0 - region)], axis=-1)


def _head(a):
  """Softmax head: malignant logit from the region's channel, benign from the rest."""
  pooled = jnp.mean(a, axis=(1, 2))
  return jnp.stack([4.0 * pooled[:, 1], 40.0 * pooled[:, 0]], axis=-1)


def _logits(x):
  return jnp.tanh(_head(_maps(x)))  # Nonlinear, so IG's completeness is not trivial.


_split = saliency.split_at(_maps, _head)


def _images(n=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, SIZE, SIZE, 1), minval=0.1, maxval=1.0)


def test_every_method_points_at_the_region_the_answer_depends_on():
  x, malignant = _images(), jnp.ones(3, jnp.int32)
  mask = np.broadcast_to(REGION[..., 0], (3, SIZE, SIZE))
  maps = {
    "gradcam": saliency.grad_cam(_split, x, malignant),
    "gradcam_pp": saliency.grad_cam_plus_plus(_split, x, malignant),
    "gradients": saliency.gradients(_logits, x, malignant),
    "smoothgrad": saliency.smoothgrad(_logits, x, malignant, jax.random.key(1), samples=4),
    "ig": saliency.integrated_gradients(_logits, x, malignant),
  }
  for name, m in maps.items():
    assert m.shape == (3, SIZE, SIZE), name
    assert saliency.pointing_game(m, mask).all(), name
    assert np.all(saliency.energy_in_mask(m, mask) > 0.99), name


def test_integrated_gradients_are_complete():
  x, targets = _images(seed=2), jnp.array([0, 1, 1])
  ig = saliency.integrated_gradients(_logits, x, targets, baseline=0.0, steps=64)
  scores = saliency.class_scores(_logits(x), targets)
  base = saliency.class_scores(_logits(jnp.zeros_like(x)), targets)
  np.testing.assert_allclose(ig.sum(axis=(1, 2)), scores - base, rtol=1e-3, atol=1e-4)


def test_expected_gradients_are_complete_on_average_and_exactly_for_a_linear_model():
  weights = jax.random.normal(jax.random.key(7), (SIZE, SIZE, 1))

  def linear(x):  # Two logits, each linear in the input.
    score = jnp.sum(x * weights, axis=(1, 2, 3))
    return jnp.stack([-score, score], axis=-1)

  x, targets = _images(n=3, seed=5), jnp.array([1, 0, 1])
  # One background image: every draw's path gradient is the same, so completeness is exact.
  base = _images(n=1, seed=6)
  eg = saliency.expected_gradients(linear, x, targets, base, jax.random.key(0), samples=4)
  gap = saliency.class_scores(linear(x), targets) - saliency.class_scores(
    linear(jnp.repeat(base, 3, axis=0)), targets
  )
  np.testing.assert_allclose(eg.sum(axis=(1, 2)), gap, rtol=1e-4, atol=1e-4)
  background = _images(n=5, seed=6)
  # And on the nonlinear model it points at the region, as the other methods do.
  mask = np.broadcast_to(REGION[..., 0], (3, SIZE, SIZE))
  ones = jnp.ones(3, jnp.int32)
  eg = saliency.expected_gradients(_logits, x, ones, background, jax.random.key(1), samples=16)
  assert np.all(saliency.energy_in_mask(eg, mask) > 0.99)


def test_partition_shap_is_efficient_and_finds_the_region():
  pytest.importorskip("shap")
  x, targets = np.asarray(_images(n=2, seed=8)), np.array([1, 0])

  def probs(images):
    return np.asarray(jax.nn.softmax(_head(_maps(jnp.asarray(images))), axis=-1))

  values = saliency.partition_shap(probs, x, targets, mask_value=0.0, max_evals=300)
  assert values.shape == (2, SIZE, SIZE)
  # Efficiency: the values add up to p(target | x) - p(target | all masked).
  full, masked = probs(x), probs(np.zeros_like(x))
  np.testing.assert_allclose(
    values.sum(axis=(1, 2)), full[[0, 1], targets] - masked[[0, 1], targets], atol=1e-4
  )
  mask = np.broadcast_to(REGION[..., 0], (2, SIZE, SIZE))
  # Malignant evidence sits in the region; for the benign target the region counts against.
  assert saliency.pointing_game(values[:1], mask[:1]).all()
  assert values[1][REGION[..., 0] > 0].sum() < 0


def test_grad_cam_of_the_benign_class_explains_the_benign_logit():
  x = _images(n=2)
  region = REGION[..., 0] > 0
  benign = saliency.grad_cam(_split, x, jnp.zeros(2, jnp.int32))
  malignant = saliency.grad_cam(_split, x, jnp.ones(2, jnp.int32))
  assert float(jnp.abs(benign - malignant).max()) > 0.1
  assert float(benign[:, region].max()) < float(benign[:, ~region].max())  # Outside the lesion.
  # A single-logit head: class 0 is minus the logit, not silently class 1 again.
  single = lambda a: _head(a)[:, 1:] - _head(a)[:, :1]  # noqa: E731
  np.testing.assert_allclose(
    saliency.grad_cam(saliency.split_at(_maps, single), x, jnp.zeros(2, jnp.int32)),
    saliency.grad_cam(
      saliency.split_at(_maps, lambda a: _head(a)[:, :1] - _head(a)[:, 1:]),
      x,
      jnp.ones(2, jnp.int32),
    ),
  )


def test_explainer_on_a_busjax_resnet_gives_class_specific_maps():
  from busjax.models import resnet

  config = {"variant": "resnet18", "width": 0.25, "in_channels": 1, "small_stem": True}
  model = resnet.create(config, num_classes=2, rngs=nnx.Rngs(0))
  explain = saliency.make_explainer(model, "gradcam")
  x = jnp.concatenate([_images(n=1)] * 2)  # The same image, explained for each class.
  maps = np.asarray(explain(x, jnp.array([0, 1])))
  assert maps.shape == (2, SIZE, SIZE) and np.all(np.isfinite(maps)) and np.all(maps >= 0)
  assert not np.allclose(maps[0], maps[1])
  with pytest.raises(ValueError, match="unknown saliency method"):
    saliency.make_explainer(model, "lime")


class _Tapped(nnx.Module):
  """A busjax-style model with named maps: 'early' (full resolution, one channel per region)
  feeds 'late' (2 x 2 pooled: too coarse to place the lesion); the logits read 'late'."""

  def __call__(self, x):
    early = common.tap("early", _maps(x))
    late = common.tap("late", nnx.avg_pool(early, (8, 8), strides=(8, 8)))
    return _head(late)


def test_grad_cam_at_a_named_intermediate_map_is_finer_than_at_the_last():
  x, malignant = _images(), jnp.ones(3, jnp.int32)
  mask = np.broadcast_to(REGION[..., 0], (3, SIZE, SIZE))
  model = _Tapped()
  assert saliency.layer_names(model, x) == ["early", "late"]
  early = saliency.grad_cam(saliency.tapped_model(model, "early"), x, malignant)
  late = saliency.grad_cam(saliency.tapped_model(model, "late"), x, malignant)
  # The same model split by hand at 'early' gives the same map: the tap is the gradient there.
  by_hand = saliency.split_at(_maps, lambda a: _head(nnx.avg_pool(a, (8, 8), strides=(8, 8))))
  np.testing.assert_allclose(early, saliency.grad_cam(by_hand, x, malignant), rtol=1e-5, atol=1e-6)
  assert np.all(saliency.energy_in_mask(early, mask) > 0.99)
  assert np.all(saliency.energy_in_mask(late, mask) < saliency.energy_in_mask(early, mask))
  with pytest.raises(ValueError, match="no feature map 'middle'; its maps: early, late"):
    saliency.grad_cam(saliency.tapped_model(model, "middle"), x, malignant)


def test_named_maps_of_the_fusion_model_are_qualified_by_branch():
  import ml_collections

  from busjax.models import fusion

  config = ml_collections.ConfigDict(
    dict(
      backbones=("mobilenet_v2", "densenet121"),
      backbone_widths=(0.25, 0.125),
      projection_channels=8,
      attention="none",  # Untrained CBAM saturates to an all-zero gate: nothing to explain.
      dropout=0.0,
      in_channels=1,
    )
  )
  model = fusion.create(config, num_classes=2, rngs=nnx.Rngs(0))
  kernel = model.head.kernel  # Zero at initialisation: no gradient would reach any map.
  kernel[...] = jax.random.normal(jax.random.key(5), kernel.shape)
  x = jnp.tile(_images(n=1, seed=4), (2, 2, 2, 1))  # (2, 32, 32, 1): one image, both classes.
  names = saliency.layer_names(model, x)
  assert {"mobilenet_v2/block_3", "densenet121/block_2", "fused", "features"} <= set(names)
  assert "block_2" not in names  # Qualified: the two backbones' maps cannot be confused.
  maps = np.asarray(
    saliency.make_explainer(model, "gradcam", layer="densenet121/block_2")(x, jnp.array([0, 1]))
  )
  assert maps.shape == (2, 32, 32) and np.all(np.isfinite(maps))
  assert not np.allclose(maps[0], maps[1])


def test_mask_agreement_numbers_by_hand():
  maps = np.zeros((2, 4, 4))
  maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0  # Peak inside, a quarter of the energy outside.
  maps[1, 3, 3], maps[1, 3, 2] = 1.0, 0.5  # Everything outside.
  masks = np.zeros((2, 4, 4), int)
  masks[:, 0, :2] = 1
  np.testing.assert_array_equal(saliency.pointing_game(maps, masks), [True, False])
  np.testing.assert_allclose(saliency.energy_in_mask(maps, masks), [0.75, 0.0])
  # Top 2 of 16 pixels: {(0,0), (3,3)} vs the mask {(0,0), (0,1)}: IoU 1/3; {(3,3), (3,2)}: 0.
  np.testing.assert_allclose(saliency.top_fraction_iou(maps, masks, 2 / 16), [1 / 3, 0.0])
  with pytest.raises(ValueError, match="must both be"):
    saliency.energy_in_mask(maps, masks[:, :3])


def test_deletion_and_insertion_reward_the_faithful_map():
  x = np.asarray(_images(n=2, seed=3))
  targets = np.ones(2, int)

  def probs(images):
    return np.asarray(jax.nn.softmax(_head(_maps(jnp.asarray(images))), axis=-1))

  faithful = np.broadcast_to(REGION[..., 0], (2, SIZE, SIZE)) + 1e-3 * x[..., 0]
  random = np.random.default_rng(0).random((2, SIZE, SIZE))
  good = saliency.deletion_insertion(probs, x, faithful, targets)
  bad = saliency.deletion_insertion(probs, x, random, targets)
  assert np.all(good["deletion"] < bad["deletion"]) and np.all(good["insertion"] > bad["insertion"])
