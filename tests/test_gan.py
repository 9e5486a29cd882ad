"""Tests for the GAN networks, losses, spectral norm, R1 and DiffAugment (tiny 16-32 px shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from busjax.models import common, diffaugment, gan

# A few channels per layer: the tests check wiring and maths, not image quality.
TINY = dict(image_size=32, latent_dim=8, embed_dim=4, g_width=4, d_width=4, max_multiplier=2)


def _jit_call(module, *args):
  """One jitted forward pass of `module` (state updates, such as BatchNorm's, are dropped)."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [16, 32])
def test_generator_shape_range_and_class_conditioning(image_size):
  generator = gan.create_generator(
    dict(TINY, image_size=image_size), num_classes=2, rngs=nnx.Rngs(0)
  )
  generator.eval()
  z = jax.random.normal(jax.random.key(1), (1, TINY["latent_dim"]))
  z = jnp.concatenate([z, z, z * 0.5])
  images = np.asarray(_jit_call(generator, z, jnp.array([0, 1, 1])))
  assert images.shape == (3, image_size, image_size, 1)
  assert images.dtype == np.float32
  assert np.all(np.abs(images) <= 1.0)
  # Same latent, other class: a different image; other latent, same class: different too.
  assert np.abs(images[0] - images[1]).max() > 1e-2
  assert np.abs(images[1] - images[2]).max() > 1e-2


def test_image_size_must_be_four_times_a_power_of_two():
  for bad in (4, 24, 100):
    with pytest.raises(ValueError, match="image_size"):
      gan.num_resolution_steps(bad)
  assert gan.num_resolution_steps(128) == 5


def test_discriminator_shape_and_positive_option():
  make = lambda positive: gan.create_discriminator(
    TINY, num_classes=3, positive=positive, rngs=nnx.Rngs(0)
  )
  images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 1), minval=-1.0, maxval=1.0)
  labels = jnp.array([0, 1, 2, 1])
  logits_model, positive_model = make(False), make(True)
  logits_model.eval()
  positive_model.eval()
  logits = np.asarray(_jit_call(logits_model, images, labels))
  positive = np.asarray(_jit_call(positive_model, images, labels))
  assert logits.shape == positive.shape == (4,)
  assert logits.dtype == np.float32
  assert np.all(positive > 0)
  # Same seed, same weights: the positive output is softplus of the logit.
  np.testing.assert_allclose(positive, np.logaddexp(0.0, logits), rtol=1e-5, atol=1e-6)
  # The class projection matters: another label, another output.
  other = np.asarray(_jit_call(logits_model, images, jnp.array([1, 2, 0, 0])))
  assert np.all(np.abs(other - logits) > 1e-6)


def test_create_builds_two_positive_discriminators_for_d2gan_and_one_for_gan():
  d2 = gan.create(TINY, num_classes=2, rngs=nnx.Rngs(0))
  assert d2.discriminator1.positive and d2.discriminator2.positive
  assert d2.discriminator1 is not d2.discriminator2
  single = gan.create(dict(TINY, objective="gan"), num_classes=2, rngs=nnx.Rngs(0))
  assert single.discriminator2 is None and not single.discriminator1.positive
  with pytest.raises(ValueError, match="objective"):
    gan.create(dict(TINY, objective="wgan"), num_classes=2, rngs=nnx.Rngs(0))


def test_uint8_round_trip():
  pixels = jnp.arange(256, dtype=jnp.uint8).reshape(1, 16, 16)
  scaled = gan.to_model_range(pixels)
  assert scaled.shape == (1, 16, 16, 1)
  assert float(scaled.min()) == -1.0 and float(scaled.max()) == 1.0
  np.testing.assert_array_equal(np.asarray(gan.to_uint8(scaled))[..., 0], np.asarray(pixels))


# ----------------------------------------------------------------------------------------------
# Losses and R1
# ----------------------------------------------------------------------------------------------

D1_REAL = np.array([0.5, 2.0, 1.1], np.float32)
D1_FAKE = np.array([0.3, 1.2, 0.05], np.float32)
D2_REAL = np.array([1.5, 0.2, 0.9], np.float32)
D2_FAKE = np.array([0.7, 3.0, 0.01], np.float32)


def test_d2gan_losses_match_a_direct_computation():
  alpha, beta = 0.2, 0.1
  # Nguyen et al. 2017, eq. 1: J = a E log D1(x) - E D1(G(z)) - E D2(x) + b E log D2(G(z)).
  objective = (
    alpha * np.log(D1_REAL).mean() - D1_FAKE.mean() - D2_REAL.mean() + beta * np.log(D2_FAKE).mean()
  )
  d_loss = gan.d2gan_discriminator_loss(D1_REAL, D1_FAKE, D2_REAL, D2_FAKE, alpha, beta)
  g_loss = gan.d2gan_generator_loss(D1_FAKE, D2_FAKE, beta)
  np.testing.assert_allclose(float(d_loss), -objective, rtol=1e-6)
  np.testing.assert_allclose(
    float(g_loss), -D1_FAKE.mean() + beta * np.log(D2_FAKE).mean(), rtol=1e-6
  )
  # The discriminators gain by scoring real data high on D1 and fakes high on D2; the
  # generator by scoring high on D1 and low on D2.
  grads = jax.grad(gan.d2gan_discriminator_loss, argnums=(0, 1, 2, 3))(
    D1_REAL, D1_FAKE, D2_REAL, D2_FAKE, alpha, beta
  )
  assert np.all(grads[0] < 0) and np.all(grads[1] > 0)
  assert np.all(grads[2] > 0) and np.all(grads[3] < 0)
  g_grads = jax.grad(gan.d2gan_generator_loss, argnums=(0, 1))(D1_FAKE, D2_FAKE, beta)
  assert np.all(g_grads[0] < 0) and np.all(g_grads[1] > 0)


def test_d2gan_losses_stay_finite_when_an_output_underflows_to_zero():
  zero = np.zeros(3, np.float32)
  assert np.isfinite(float(gan.d2gan_discriminator_loss(zero, zero, zero, zero, 0.2, 0.1)))
  assert np.isfinite(float(gan.d2gan_generator_loss(D1_FAKE, zero, 0.1)))


def test_single_discriminator_losses_are_the_standard_cross_entropies():
  real = jnp.array([2.0, -1.0, 60.0, -60.0])
  fake = jnp.array([-3.0, 0.5, 60.0, -60.0])
  bce = optax.sigmoid_binary_cross_entropy
  expected_d = bce(real, jnp.ones(4)).mean() + bce(fake, jnp.zeros(4)).mean()
  expected_g = bce(fake, jnp.ones(4)).mean()
  np.testing.assert_allclose(float(gan.gan_discriminator_loss(real, fake)), expected_d, rtol=1e-6)
  np.testing.assert_allclose(float(gan.gan_generator_loss(fake)), expected_g, rtol=1e-6)


def test_r1_penalty_matches_analytic_gradients():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(1, 4, 4, 1)), jnp.float32)
  images = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
  labels = jnp.array([0, 1, 0])
  # D(x) = sum(w x): the gradient is w for every sample, so R1 = ||w||^2.
  linear = lambda x, y: jnp.sum(w * x, axis=(1, 2, 3)) + y
  np.testing.assert_allclose(
    float(gan.r1_penalty(linear, images, labels)), float(jnp.sum(w**2)), rtol=1e-5
  )
  # D(x) = sum(w x^2): per-sample gradient 2 w x, so R1 = mean_i ||2 w x_i||^2.
  quadratic = lambda x, y: jnp.sum(w * x**2, axis=(1, 2, 3))
  expected = np.mean(np.sum((2 * np.asarray(w) * np.asarray(images)) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(float(gan.r1_penalty(quadratic, images, labels)), expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Spectral normalisation
# ----------------------------------------------------------------------------------------------


def test_spectral_norm_converges_to_unit_top_singular_value_and_eval_freezes_u():
  layer = gan.SNConv(3, 5, 3, num_iterations=1, rngs=nnx.Rngs(0))
  kernel = np.asarray(layer.kernel[...])
  step = nnx.jit(lambda m: m.weight())
  layer.train()
  for _ in range(30):
    step(layer)
  # The trained parameter stays the raw weight; only the applied kernel is normalised.
  np.testing.assert_array_equal(np.asarray(layer.kernel[...]), kernel)
  layer.eval()
  u = np.asarray(layer.sn.u[...])
  normalized = np.asarray(step(layer))
  top = np.linalg.svd(normalized.reshape(-1, 5), compute_uv=False)[0]
  np.testing.assert_allclose(top, 1.0, rtol=1e-3)
  np.testing.assert_allclose(
    float(layer.sn.sigma(layer.kernel[...])),
    np.linalg.svd(kernel.reshape(-1, 5), compute_uv=False)[0],
    rtol=1e-3,
  )
  # Evaluation mode: u stays, the output is deterministic.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  first = nnx.jit(lambda m, x: m(x))(layer, x)
  second = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_array_equal(np.asarray(layer.sn.u[...]), u)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  # Training mode moves u again (here it has converged, so perturb it first).
  layer.sn.u[...] = jnp.roll(layer.sn.u[...], 1)
  moved = np.asarray(layer.sn.u[...])
  layer.train()
  step(layer)
  assert np.abs(np.asarray(layer.sn.u[...]) - moved).max() > 1e-4


def test_spectral_vector_is_state_not_a_parameter():
  model = gan.create_discriminator(TINY, num_classes=2, positive=True, rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  param_paths = [path for path, _ in nnx.to_flat_state(params)]
  rest_paths = [path for path, _ in nnx.to_flat_state(rest)]
  assert not any("u" in path for path in param_paths)
  assert any(path[-1] == "u" for path in rest_paths)
  assert all(isinstance(v, gan.SpectralVector) for _, v in nnx.to_flat_state(rest))
  without = gan.create_discriminator(
    dict(TINY, spectral_norm=False), num_classes=2, positive=True, rngs=nnx.Rngs(0)
  )
  assert common.count_params(without) == common.count_params(model)
  assert not jax.tree.leaves(nnx.state(without, gan.SpectralVector))


# ----------------------------------------------------------------------------------------------
# DiffAugment
# ----------------------------------------------------------------------------------------------


# One compiled program per batch shape instead of many small eager ones (faster on 2 cores).
_augment = jax.jit(diffaugment.diff_augment, static_argnames="policy")


def _random_images(seed=0, n=4, size=32):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 1), minval=-1.0, maxval=1.0)


def test_diff_augment_is_differentiable():
  images = _random_images()
  weights = _random_images(seed=1)
  loss = lambda x: jnp.sum(weights * diffaugment.diff_augment(x, jax.random.key(3)))
  grads = jax.jit(jax.grad(loss))(images)
  grads = np.asarray(grads)
  assert np.all(np.isfinite(grads))
  assert np.abs(grads).max() > 0


def test_same_key_same_transform_other_key_other_transform():
  images = _random_images()
  key = jax.random.key(5)
  out = np.asarray(_augment(images, key))
  np.testing.assert_array_equal(out, np.asarray(_augment(images, key)))
  assert np.abs(out - np.asarray(_augment(images, jax.random.key(6)))).max() > 0
  # The parameters depend on the key only, not on the pixels: change image 0, the others keep
  # their exact output (so real[i] and fake[i] augmented with one key see the same transform).
  changed = np.asarray(_augment(images.at[0].set(0.3), key))
  np.testing.assert_array_equal(changed[1:], out[1:])
  # Translation and cutout are linear in the pixels for a fixed key.
  for op in (diffaugment.translation, diffaugment.cutout):
    np.testing.assert_allclose(
      np.asarray(op(0.5 * images, key)), 0.5 * np.asarray(op(images, key)), rtol=1e-6
    )
  # The policy is a set: its order in the string does not change the result.
  np.testing.assert_array_equal(
    out, np.asarray(_augment(images, key, "intensity,cutout,translation"))
  )
  with pytest.raises(ValueError, match="unknown"):
    diffaugment.diff_augment(images, key, "translation,flip")


def test_translate_shifts_content_with_zero_fill():
  image = np.arange(1, 8 * 8 + 1, dtype=np.float32).reshape(1, 8, 8, 1)
  shifted = np.asarray(diffaugment.translate(jnp.asarray(image), jnp.array([[2, -3]])))
  expected = np.zeros_like(image)
  expected[:, 2:, :5] = image[:, :6, 3:]
  np.testing.assert_array_equal(shifted, expected)


def test_random_translation_is_a_bounded_whole_pixel_shift():
  images = _random_images(n=6)
  out = np.asarray(diffaugment.translation(images, jax.random.key(7)))
  bound = 4  # 32 / 8
  shifts = np.array(
    [(dy, dx) for dy in range(-bound, bound + 1) for dx in range(-bound, bound + 1)]
  )
  # Every image under every allowed shift, in one call: (6 * 81, 32, 32, 1).
  candidates = diffaugment.translate(
    jnp.repeat(images, len(shifts), axis=0), jnp.asarray(np.tile(shifts, (6, 1)))
  )
  candidates = np.asarray(candidates).reshape(6, len(shifts), 32, 32, 1)
  for result, options in zip(out, candidates, strict=True):
    matches = [
      shift for shift, option in zip(shifts, options, strict=True) if np.array_equal(result, option)
    ]
    assert len(matches) == 1


def test_cutout_zeroes_half_side_square():
  mask = np.asarray(diffaugment.cutout_mask(jnp.array([[16, 10]]), (32, 32), (16, 16)))[0, ..., 0]
  assert (mask == 0).sum() == 256
  assert np.all(mask[8:24, 2:18] == 0)
  ones = jnp.ones((8, 32, 32, 1))
  zeros_per_image = (np.asarray(diffaugment.cutout(ones, jax.random.key(0))) == 0).sum((1, 2, 3))
  assert np.all(zeros_per_image > 0) and np.all(zeros_per_image <= 256)


def test_no_vertical_flip():
  # Rows 10..41 top to bottom: brightness/contrast keep every value positive and in order.
  rows = np.arange(10, 42, dtype=np.float32)
  images = jnp.asarray(np.broadcast_to(rows[None, :, None, None], (8, 32, 32, 1)))
  for seed in range(3):
    out = np.asarray(_augment(images, jax.random.key(seed)))
    assert (out == 0).any()  # padding and cutout are there...
    for image in out[..., 0]:
      for column in image.T:
        kept = column[column != 0]
        assert np.all(np.diff(kept) > 0)  # ...and what is left is still shallow-to-deep.
