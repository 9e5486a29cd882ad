"""Attention blocks on NHWC feature maps: squeeze-excitation, ECA, CBAM and a channel+spatial pair.

Every block returns ``x * gate`` with gates in [0, 1] (sigmoids), so a block can only re-weight a
feature map, never invent new features; this keeps Grad-CAM on the attended map meaningful. Each
block exposes its gates as methods (``channel_gate``, ``spatial_gate``) so tests and saliency code
can look at them directly.

References:
  SE: Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.
  ECA: Wang et al., "ECA-Net: Efficient Channel Attention", CVPR 2020 (adaptive 1-D kernel).
  CBAM: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
  Channel + spatial pair: the plain SE-style channel gate followed by a 1x1-conv spatial gate, as
  used in breast-ultrasound fusion models (e.g. Zhao et al.).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_NAMES = ("none", "se", "eca", "cbam", "channel_spatial")


def _hidden_channels(channels: int, reduction: int) -> int:
  """Bottleneck width of an SE-style MLP; at least 1 so tiny test widths still work."""
  return max(1, channels // reduction)


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
  """ECA's adaptive kernel size: k = |log2(C)/gamma + b/gamma|, made odd (ECA-Net eq. 12).

  Args:
    channels: number of channels C.
    gamma, b: the paper's constants (2 and 1).

  Returns:
    An odd kernel size >= 1 (e.g. C=64 -> 3, C=256 -> 5, C=1024 -> 5, C=2048 -> 7).
  """
  if channels < 1:
    raise ValueError(f"ECA needs at least one channel, got {channels}")
  t = int(abs(math.log2(channels) / gamma + b / gamma))
  return t if t % 2 == 1 else t + 1


class Identity(nnx.Module):
  """The "none" attention: returns its input, so ablations keep the same model graph."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class SqueezeExcitation(nnx.Module):
  """SE block: global average pool -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> scale channels."""

  def __init__(self, channels: int, reduction: int = 16, *, rngs: nnx.Rngs, dtype=None):
    hidden = _hidden_channels(channels, reduction)
    self.fc1 = nnx.Linear(channels, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, rngs=rngs)

  def channel_gate(self, x: jax.Array) -> jax.Array:
    """Gate of shape (N, 1, 1, C) in [0, 1]."""
    pooled = jnp.mean(x, axis=(1, 2))
    gate = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))
    return gate[:, None, None, :]

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.channel_gate(x).astype(x.dtype)


class ECA(nnx.Module):
  """Efficient channel attention: a 1-D convolution across the pooled channel vector, no MLP."""

  def __init__(
    self, channels: int, *, rngs: nnx.Rngs, gamma: float = 2.0, b: float = 1.0, dtype=None
  ):
    self.kernel_size = eca_kernel_size(channels, gamma, b)
    # One input and one output feature: the same k weights slide over the channel axis.
    self.conv = nnx.Conv(
      1, 1, kernel_size=(self.kernel_size,), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
    )

  def channel_gate(self, x: jax.Array) -> jax.Array:
    """Gate of shape (N, 1, 1, C) in [0, 1]."""
    pooled = jnp.mean(x, axis=(1, 2))  # (N, C)
    mixed = self.conv(pooled[:, :, None])[:, :, 0]  # channels as the 1-D "length" axis
    return jax.nn.sigmoid(mixed)[:, None, None, :]

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.channel_gate(x).astype(x.dtype)


class CBAM(nnx.Module):
  """CBAM: channel gate from a shared MLP on avg- and max-pooled vectors, then a 7x7 spatial gate.

  The spatial gate convolves the 2-channel map [mean over C, max over C] of the channel-refined
  features, as in the paper (without the optional BatchNorm, so the block has no batch state).
  """

  def __init__(
    self, channels: int, reduction: int = 16, *, rngs: nnx.Rngs, spatial_kernel: int = 7, dtype=None
  ):
    hidden = _hidden_channels(channels, reduction)
    self.fc1 = nnx.Linear(channels, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, rngs=rngs)
    self.spatial_conv = nnx.Conv(
      2, 1, kernel_size=(spatial_kernel, spatial_kernel), padding="SAME", dtype=dtype, rngs=rngs
    )

  def _mlp(self, v: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(v)))

  def channel_gate(self, x: jax.Array) -> jax.Array:
    """sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), shape (N, 1, 1, C)."""
    logits = self._mlp(jnp.mean(x, axis=(1, 2))) + self._mlp(jnp.max(x, axis=(1, 2)))
    return jax.nn.sigmoid(logits)[:, None, None, :]

  def spatial_gate(self, x: jax.Array) -> jax.Array:
    """sigmoid(conv7x7([mean_c(x), max_c(x)])), shape (N, H, W, 1)."""
    stacked = jnp.concatenate(
      [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1
    )
    return jax.nn.sigmoid(self.spatial_conv(stacked))

  def __call__(self, x: jax.Array) -> jax.Array:
    refined = x * self.channel_gate(x).astype(x.dtype)
    return refined * self.spatial_gate(refined).astype(x.dtype)


class ChannelSpatialAttention(nnx.Module):
  """Plain channel + spatial attention pair: SE-style channel gate, then a 1x1-conv spatial gate.

  Unlike CBAM, the channel gate sees only the average-pooled vector, and the spatial gate is a
  learned 1x1 projection of all channels to one map (not a 7x7 filter over [avg, max]).
  """

  def __init__(self, channels: int, reduction: int = 16, *, rngs: nnx.Rngs, dtype=None):
    hidden = _hidden_channels(channels, reduction)
    self.fc1 = nnx.Linear(channels, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, rngs=rngs)
    self.spatial_conv = nnx.Conv(channels, 1, kernel_size=(1, 1), dtype=dtype, rngs=rngs)

  def channel_gate(self, x: jax.Array) -> jax.Array:
    """Gate of shape (N, 1, 1, C) in [0, 1]."""
    pooled = jnp.mean(x, axis=(1, 2))
    return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))[:, None, None, :]

  def spatial_gate(self, x: jax.Array) -> jax.Array:
    """Gate of shape (N, H, W, 1) in [0, 1]."""
    return jax.nn.sigmoid(self.spatial_conv(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    refined = x * self.channel_gate(x).astype(x.dtype)
    return refined * self.spatial_gate(refined).astype(x.dtype)


def create_attention(
  name: str, channels: int, rngs: nnx.Rngs, *, reduction: int = 16, dtype=None
) -> nnx.Module:
  """Builds an attention block by name.

  Args:
    name: one of ``ATTENTION_NAMES`` ("none", "se", "eca", "cbam", "channel_spatial").
    channels: channels of the NHWC map the block will see.
    rngs: parameter initialisation keys.
    reduction: MLP bottleneck ratio for "se", "cbam" and "channel_spatial".
    dtype: computation dtype (parameters stay float32).

  Returns:
    A module mapping (N, H, W, C) -> (N, H, W, C).
  """
  if name == "none":
    return Identity()
  if name == "se":
    return SqueezeExcitation(channels, reduction, rngs=rngs, dtype=dtype)
  if name == "eca":
    return ECA(channels, rngs=rngs, dtype=dtype)
  if name == "cbam":
    return CBAM(channels, reduction, rngs=rngs, dtype=dtype)
  if name == "channel_spatial":
    return ChannelSpatialAttention(channels, reduction, rngs=rngs, dtype=dtype)
  raise ValueError(f"unknown attention {name!r}; expected one of {ATTENTION_NAMES}")
