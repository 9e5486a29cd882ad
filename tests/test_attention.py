"""Tests for busjax.models.attention: shapes, ECA kernel sizes, gate ranges, reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busjax.models import attention


def _input(shape=(2, 6, 5, 32), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", attention.ATTENTION_NAMES)
def test_create_attention_keeps_shape(name):
  x = _input()
  block = attention.create_attention(name, 32, nnx.Rngs(0))
  y = block(x)
  assert y.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(y)))
  if name == "none":
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  else:
    assert not np.allclose(np.asarray(y), np.asarray(x))


def test_create_attention_rejects_unknown_name():
  with pytest.raises(ValueError, match="unknown attention 'sk'"):
    attention.create_attention("sk", 8, nnx.Rngs(0))


@pytest.mark.parametrize(
  "channels,expected",
  [
    (1, 1),
    (8, 3),
    (16, 3),
    (32, 3),
    (64, 3),
    (128, 5),
    (256, 5),
    (512, 5),
    (1024, 5),
    (1280, 5),
    (2048, 7),
  ],
)
def test_eca_kernel_size_formula(channels, expected):
  assert attention.eca_kernel_size(channels) == expected
  block = attention.ECA(channels, rngs=nnx.Rngs(0))
  assert block.kernel_size == expected
  assert block.conv.kernel.shape == (expected, 1, 1)


def test_eca_kernel_size_rejects_zero_channels():
  with pytest.raises(ValueError):
    attention.eca_kernel_size(0)


@pytest.mark.parametrize("cls", [attention.SqueezeExcitation, attention.ECA])
def test_channel_only_blocks_are_input_times_gate(cls):
  x = _input() * 5.0  # large inputs push sigmoids toward the ends of [0, 1]
  block = cls(32, rngs=nnx.Rngs(1))
  gate = block.channel_gate(x)
  assert gate.shape == (2, 1, 1, 32)
  assert float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
  np.testing.assert_allclose(np.asarray(block(x)), np.asarray(x * gate), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [attention.CBAM, attention.ChannelSpatialAttention])
def test_two_gate_blocks_are_input_times_both_gates(cls):
  x = _input() * 5.0
  block = cls(32, rngs=nnx.Rngs(2))
  channel = block.channel_gate(x)
  refined = x * channel
  spatial = block.spatial_gate(refined)
  assert channel.shape == (2, 1, 1, 32)
  assert spatial.shape == (2, 6, 5, 1)
  for gate in (channel, spatial):
    assert float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
  np.testing.assert_allclose(
    np.asarray(block(x)), np.asarray(x * channel * spatial), rtol=1e-5, atol=1e-6
  )


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _set_linear(layer, kernel, bias):
  layer.kernel[...] = jnp.asarray(kernel, jnp.float32)
  layer.bias[...] = jnp.asarray(bias, jnp.float32)


def test_se_gate_matches_hand_formula():
  # A 1x2x2x4 input and a 4 -> 2 -> 4 MLP with hand-picked weights.
  x = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4) / 8.0 - 1.0
  block = attention.SqueezeExcitation(4, reduction=2, rngs=nnx.Rngs(0))
  w1 = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32) * 0.5
  b1 = np.array([0.1, -0.2], np.float32)
  w2 = np.array([[1, -1, 2, 0], [0.5, 0.5, -1, 1]], np.float32)
  b2 = np.array([0.0, 0.1, -0.1, 0.2], np.float32)
  _set_linear(block.fc1, w1, b1)
  _set_linear(block.fc2, w2, b2)
  pooled = x.mean(axis=(1, 2))[0]
  expected = _sigmoid(np.maximum(pooled @ w1 + b1, 0) @ w2 + b2)
  np.testing.assert_allclose(
    np.asarray(block.channel_gate(jnp.asarray(x)))[0, 0, 0], expected, rtol=1e-6
  )


def test_cbam_channel_gate_matches_hand_formula():
  x = np.cos(np.arange(24, dtype=np.float32)).reshape(1, 2, 3, 4)
  block = attention.CBAM(4, reduction=2, rngs=nnx.Rngs(0))
  w1 = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
  b1 = np.array([0.0, 0.3], np.float32)
  w2 = np.array([[1, -1, 2, 0], [0.5, 0.5, -1, 1]], np.float32)
  b2 = np.array([0.2, 0.0, 0.0, -0.2], np.float32)
  _set_linear(block.fc1, w1, b1)
  _set_linear(block.fc2, w2, b2)

  def mlp(v):
    return np.maximum(v @ w1 + b1, 0) @ w2 + b2

  expected = _sigmoid(mlp(x.mean(axis=(1, 2))[0]) + mlp(x.max(axis=(1, 2))[0]))
  np.testing.assert_allclose(
    np.asarray(block.channel_gate(jnp.asarray(x)))[0, 0, 0], expected, rtol=1e-6
  )


def test_eca_gate_matches_hand_convolution():
  # C=8 -> k=3: gate_c = sigmoid(w0*p[c-1] + w1*p[c] + w2*p[c+1]) with zero padding at the ends.
  x = np.sin(np.arange(2 * 3 * 3 * 8, dtype=np.float32)).reshape(2, 3, 3, 8)
  block = attention.ECA(8, rngs=nnx.Rngs(0))
  w = np.array([0.5, -1.0, 2.0], np.float32)
  block.conv.kernel[...] = jnp.asarray(w.reshape(3, 1, 1))
  p = np.pad(x.mean(axis=(1, 2)), ((0, 0), (1, 1)))
  expected = _sigmoid(w[0] * p[:, :-2] + w[1] * p[:, 1:-1] + w[2] * p[:, 2:])
  np.testing.assert_allclose(
    np.asarray(block.channel_gate(jnp.asarray(x)))[:, 0, 0], expected, rtol=1e-5, atol=1e-6
  )


def test_cbam_spatial_gate_uses_mean_and_max_over_channels():
  x = _input((1, 4, 4, 6), seed=3)
  block = attention.CBAM(6, reduction=2, rngs=nnx.Rngs(0), spatial_kernel=1)
  # A 1x1 kernel with weights (a, b) on [mean, max] makes the gate checkable by hand.
  block.spatial_conv.kernel[...] = jnp.asarray([[[[0.7], [-0.4]]]], jnp.float32)
  block.spatial_conv.bias[...] = jnp.asarray([0.05], jnp.float32)
  xn = np.asarray(x)
  expected = _sigmoid(0.7 * xn.mean(-1) - 0.4 * xn.max(-1) + 0.05)
  np.testing.assert_allclose(np.asarray(block.spatial_gate(x))[..., 0], expected, rtol=1e-5)


def test_attention_is_jittable_and_differentiable():
  block = attention.create_attention("cbam", 16, nnx.Rngs(0))
  x = _input((2, 4, 4, 16))

  @nnx.jit
  def loss(module, x):
    return jnp.mean(module(x) ** 2)

  grads = nnx.grad(loss)(block, x)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
