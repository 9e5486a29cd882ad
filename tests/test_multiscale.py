"""Tests of the multiscale cross-scale attention classifier (busjax.models.multiscale)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from busjax.models import common, multiscale


def _model(fusion, **kwargs):
  config = ml_collections.ConfigDict(
    dict(name="multiscale", backbone="resnet18", width=0.25, in_channels=1, fusion=fusion,
         fusion_width=32, heads=4, **kwargs)
  )  # fmt: skip
  return multiscale.create(config, num_classes=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fusion", multiscale.FUSIONS)
def test_every_fusion_gives_logits_and_the_pooled_features_map(fusion):
  model = _model(fusion)
  model.eval()
  forward = nnx.jit(lambda m, x: m(x, return_features=True))
  logits, maps = forward(model, jnp.zeros((2, 64, 64, 1)))
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  width = 32 * (3 if fusion == "cross_attention" else 1)
  assert maps["features"].shape == (2, 1, 1, width) == (2, 1, 1, model.num_features)
  # The three scales are the backbone's last three stages, fine to coarse.
  expected = 3 if fusion != "single" else 1
  sides = [maps[f"scale{i}"].shape[1] for i in range(expected)]
  assert sides == sorted(sides, reverse=True) and len(set(sides)) == expected


def test_cross_attention_starts_as_plain_pooling_and_then_mixes_scales():
  model = _model("cross_attention")
  model.eval()
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
  _, maps = nnx.jit(lambda m, x: m(x, return_features=True))(model, x)
  # Zero-initialised output layers: at initialisation each scale's tokens are its own map
  # (+ position and scale codes), untouched by the other scales.
  for i in range(3):
    n, h, w, d = maps[f"scale{i}"].shape
    code = multiscale.sinusoidal_positions(h, w, d) + model.scale_embedding[...][i]
    np.testing.assert_allclose(
      maps[f"tokens{i}"], maps[f"scale{i}"].reshape(n, h * w, d) + code, rtol=1e-5, atol=1e-5
    )
  # Once the output layers are non-zero, the coarse tokens depend on the fine map.
  block = model.coarse_to_fine[0]
  block.out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(2), block.out.kernel.shape)
  fine = jax.random.normal(jax.random.key(3), (2, 16, 32))
  coarse = jax.random.normal(jax.random.key(4), (2, 4, 32))
  other = jax.random.normal(jax.random.key(5), fine.shape)
  moved = block(coarse, other) - block(coarse, fine)
  assert float(jnp.abs(moved).max()) > 1e-3
  weights = block.attention_weights(coarse, fine)
  assert weights.shape == (2, 4, 4, 16)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_positions_match_across_scales():
  fine = multiscale.sinusoidal_positions(8, 8, 16).reshape(8, 8, 16)
  coarse = multiscale.sinusoidal_positions(2, 2, 16).reshape(2, 2, 16)
  # The coarse pixel (0, 0) covers fine pixels (0..3, 0..3): its code is nearest to theirs.
  distance = jnp.linalg.norm(fine - coarse[0, 0], axis=-1)
  assert int(jnp.argmin(distance)) // 8 < 4 and int(jnp.argmin(distance)) % 8 < 4
  with pytest.raises(ValueError, match="divisible by 4"):
    multiscale.sinusoidal_positions(2, 2, 6)


def test_ablations_share_the_backbone_and_differ_only_in_the_fusion():
  counts = {f: common.count_params(_model(f)) for f in multiscale.FUSIONS}
  assert counts["single"] < counts["concat"] < counts["cross_attention"]
  with pytest.raises(ValueError, match="unknown multiscale fusion"):
    _model("sum")
  with pytest.raises(ValueError, match="stages"):
    _model("concat", scales=9)


def test_gradients_reach_every_fine_scale_projection():
  model = _model("concat")
  model.train()

  def loss(m):
    return m(jnp.ones((2, 64, 64, 1))).sum()

  grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))  # Jitted: eager is ~3x slower.
  for i in range(3):
    assert float(jnp.abs(grads["projections"][i]["conv"]["kernel"]).sum()) > 0
