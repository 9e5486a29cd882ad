"""Saliency maps point where the answer comes from; mask agreement and faithfulness numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busjax.evaluators import saliency

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


def _images(n=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, SIZE, SIZE, 1), minval=0.1, maxval=1.0)


def test_every_method_points_at_the_region_the_answer_depends_on():
  x, malignant = _images(), jnp.ones(3, jnp.int32)
  mask = np.broadcast_to(REGION[..., 0], (3, SIZE, SIZE))
  maps = {
    "gradcam": saliency.grad_cam(_maps, _head, x, malignant),
    "gradcam_pp": saliency.grad_cam_plus_plus(_maps, _head, x, malignant),
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


def test_grad_cam_of_the_benign_class_explains_the_benign_logit():
  x = _images(n=2)
  region = REGION[..., 0] > 0
  benign = saliency.grad_cam(_maps, _head, x, jnp.zeros(2, jnp.int32))
  malignant = saliency.grad_cam(_maps, _head, x, jnp.ones(2, jnp.int32))
  assert float(jnp.abs(benign - malignant).max()) > 0.1
  assert float(benign[:, region].max()) < float(benign[:, ~region].max())  # Outside the lesion.
  # A single-logit head: class 0 is minus the logit, not silently class 1 again.
  single = lambda a: _head(a)[:, 1:] - _head(a)[:, :1]  # noqa: E731
  np.testing.assert_allclose(
    saliency.grad_cam(_maps, single, x, jnp.zeros(2, jnp.int32)),
    saliency.grad_cam(
      _maps, lambda a: _head(a)[:, :1] - _head(a)[:, 1:], x, jnp.ones(2, jnp.int32)
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
