"""ResNet-18/34/50/101/152 in Flax NNX, laid out like torchvision (ResNet v1.5).

Faithful to ``torchvision.models.resnet``: 7x7/2 stem + 3x3/2 max pool, BasicBlock (18, 34)
or Bottleneck (50+) with the stride on the 3x3 conv (v1.5), 1x1 conv + BN projection
shortcuts, no conv biases. At 1000 classes, 3 channels: ResNet-18 has 11,689,512 parameters,
ResNet-50 25,557,032.

Options: `width` scales every stage's channels; `small_stem` swaps the stem for a 3x3/1 conv
without max pool (for 32-96 px inputs); `stride_in_1x1` and `conv_bias` reproduce the
Caffe-style Keras ``ResNet50`` (stride on the first 1x1, biased convs) for weight import.

`attention` ("none", "se", "eca", "cbam", "channel_spatial"; see `busjax.models.attention`) refines
the last stage's map before pooling: "channel_spatial" is the channel + spatial attention
classifier of GAN rebalancing (Zhao et al. 2026).

Feature maps (NHWC) by name: "stem" (after the max pool), "stage1".."stage4", "features"
(the map before global pooling: "stage4" after the attention block, if any).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from busjax.models import attention as attention_lib
from busjax.models import common, layers

# variant -> (block kind, blocks per stage)
VARIANTS = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
  "resnet101": ("bottleneck", (3, 4, 23, 3)),
  "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv_bn(in_features, out_features, kernel_size, *, strides=1, activation=jax.nn.relu, options):
  return layers.ConvBN(
    in_features,
    out_features,
    kernel_size,
    strides=strides,
    activation=activation,
    padding=options["padding"],
    use_bias=options["conv_bias"],
    bn_epsilon=options["bn_epsilon"],
    dtype=options["dtype"],
    rngs=options["rngs"],
  )


class BasicBlock(nnx.Module):
  """Two 3x3 convs + identity or projection shortcut (ResNet-18/34)."""

  def __init__(self, in_features: int, features: int, *, strides: int, options: dict):
    out_features = features * EXPANSION["basic"]
    self.conv1 = _conv_bn(in_features, features, 3, strides=strides, options=options)
    self.conv2 = _conv_bn(features, out_features, 3, activation=None, options=options)
    self.downsample = (
      _conv_bn(in_features, out_features, 1, strides=strides, activation=None, options=options)
      if strides != 1 or in_features != out_features
      else nnx.data(None)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(self.conv2(self.conv1(x)) + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce -> 3x3 (stride here, v1.5) -> 1x1 expand x4, + shortcut (ResNet-50+)."""

  def __init__(self, in_features: int, features: int, *, strides: int, options: dict):
    out_features = features * EXPANSION["bottleneck"]
    stride_1x1, stride_3x3 = (strides, 1) if options["stride_in_1x1"] else (1, strides)
    self.conv1 = _conv_bn(in_features, features, 1, strides=stride_1x1, options=options)
    self.conv2 = _conv_bn(features, features, 3, strides=stride_3x3, options=options)
    self.conv3 = _conv_bn(features, out_features, 1, activation=None, options=options)
    self.downsample = (
      _conv_bn(in_features, out_features, 1, strides=strides, activation=None, options=options)
      if strides != 1 or in_features != out_features
      else nnx.data(None)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class ResNet(nnx.Module):
  """ResNet backbone + classification head.

  Attributes:
    num_features: channels of the "features" map.
    stage_names: feature names at strides 4, 8, 16, 32 (1..8 with `small_stem`); the last is
      "features" (the same map as "stage4").
  """

  def __init__(
    self,
    variant: str = "resnet50",
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    dropout: float = 0.0,
    dtype: Any = "float32",
    small_stem: bool = False,
    bn_epsilon: float = 1e-5,
    padding: str = "symmetric",
    stride_in_1x1: bool = False,
    conv_bias: bool = False,
    attention: str = "none",
    attention_reduction: int = 16,
    rngs: nnx.Rngs,
  ):
    if variant not in VARIANTS:
      raise ValueError(f"ResNet variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    kind, depths = VARIANTS[variant]
    block_class = BasicBlock if kind == "basic" else Bottleneck
    self.variant = variant
    self.small_stem = small_stem
    self.dtype = common.compute_dtype(dtype)
    options = dict(
      padding=layers.canonical_padding(padding),
      bn_epsilon=bn_epsilon,
      dtype=self.dtype,
      stride_in_1x1=stride_in_1x1,
      conv_bias=conv_bias,
      rngs=rngs,
    )
    base = common.scaled_channels(64, width)
    if small_stem:
      self.stem = _conv_bn(in_channels, base, 3, options=options)
    else:
      self.stem = _conv_bn(in_channels, base, 7, strides=2, options=options)
    stages = []
    in_features = base
    for index, depth in enumerate(depths):
      features = common.scaled_channels(64 * 2**index, width)
      blocks = []
      for block_index in range(depth):
        strides = 2 if index > 0 and block_index == 0 else 1
        blocks.append(block_class(in_features, features, strides=strides, options=options))
        in_features = features * EXPANSION[kind]
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = in_features
    self.attention = attention_lib.create_attention(
      attention, in_features, rngs, reduction=attention_reduction, dtype=self.dtype
    )
    self.stage_names = ("stage1", "stage2", "stage3", "features")
    self.head = common.Head(in_features, num_classes, dropout=dropout, dtype=self.dtype, rngs=rngs)

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """Named NHWC feature maps: "stem", "stage1".."stage4", "features"."""
    x = self.stem(jnp.asarray(x, self.dtype))
    if not self.small_stem:
      x = layers.max_pool_3x3_s2(x)
    x = common.tap("stem", x)
    feature_maps = {"stem": x}
    for index, stage in enumerate(self.stages):
      for block in stage:
        x = block(x)
      x = feature_maps[f"stage{index + 1}"] = common.tap(f"stage{index + 1}", x)
    feature_maps["features"] = common.tap("features", self.attention(x))
    return feature_maps

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    """Logits (float32) for NHWC input; with `return_features`, also the feature dict."""
    feature_maps = self.features(x)
    logits = self.head(feature_maps["features"])
    return (logits, feature_maps) if return_features else logits


def create(model_config: Any, *, num_classes: int, rngs: nnx.Rngs) -> ResNet:
  """Builds a ResNet from ``config.model`` (fields: variant, width, in_channels, dropout,
  dtype, small_stem, bn_epsilon, padding, stride_in_1x1, conv_bias, attention,
  attention_reduction)."""
  get = lambda field, default: common.config_get(model_config, field, default)
  return ResNet(
    get("variant", "resnet50"),
    num_classes=num_classes,
    in_channels=get("in_channels", 3),
    width=get("width", 1.0),
    dropout=get("dropout", 0.0),
    dtype=get("dtype", "float32"),
    small_stem=get("small_stem", False),
    bn_epsilon=get("bn_epsilon", 1e-5),
    padding=get("padding", "symmetric"),
    stride_in_1x1=get("stride_in_1x1", False),
    conv_bias=get("conv_bias", False),
    attention=get("attention", "none"),
    attention_reduction=get("attention_reduction", 16),
    rngs=rngs,
  )
