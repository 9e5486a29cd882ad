"""MobileNetV2 in Flax NNX, faithful to torchvision and Keras (3,504,872 params at 1000 classes).

Stem 3x3/2 conv (32 * width) -> 17 inverted residual blocks -> 1x1 conv to 1280 -> pool ->
dropout -> linear. ReLU6 everywhere, no conv biases. Depthwise and 1x1 convolutions use the
CPU-friendly rewrites in `busjax.models.layers` (same parameters as nnx.Conv).

Two conventions differ between the references and are constructor options:
* `padding`: "symmetric" (torchvision, default) or "same" (Keras: 'SAME' stem and
  ``correct_pad`` + 'valid' before the stride-2 depthwise convs, i.e. TF 'SAME').
* `bn_epsilon`: torchvision 1e-5 (default), Keras 1e-3.

Feature maps (NHWC) by name: "stem", "block_0".."block_16" (Keras block numbering: block_0
is the un-expanded first block), "features" (after the last 1x1 conv, before pooling).
`stage_names` lists the last map at each stride 2, 4, 8, 16, 32.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from busjax.models import common, layers

# (expansion t, output channels c, repeats n, first stride s), as in the paper / torchvision.
INVERTED_RESIDUAL_SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


class InvertedResidual(nnx.Module):
  """1x1 expand (unless t == 1) -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    strides: int,
    expansion: int,
    padding: str,
    bn_epsilon: float,
    bn_momentum: float,
    dtype: Any,
    rngs: nnx.Rngs,
  ):
    hidden = int(round(in_features * expansion))
    common_args = dict(bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)
    self.use_residual = strides == 1 and in_features == out_features
    self.expand = (
      layers.ConvBN(in_features, hidden, 1, activation=jax.nn.relu6, **common_args)
      if expansion != 1
      else nnx.data(None)
    )
    self.depthwise = layers.ConvBN(
      hidden,
      hidden,
      3,
      strides=strides,
      padding=padding,
      kind="depthwise",
      activation=jax.nn.relu6,
      **common_args,
    )
    self.project = layers.ConvBN(hidden, out_features, 1, activation=None, **common_args)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x if self.expand is None else self.expand(x)
    y = self.project(self.depthwise(y))
    return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
  """MobileNetV2 backbone + head.

  Attributes:
    num_features: channels of the "features" map (1280 for width <= 1).
    stage_names: names of the last feature map at strides 2, 4, 8, 16, 32.
  """

  def __init__(
    self,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    dropout: float = 0.2,
    dtype: Any = "float32",
    bn_epsilon: float = 1e-5,
    bn_momentum: float = 0.9,
    padding: str = "symmetric",
    rngs: nnx.Rngs,
  ):
    self.dtype = common.compute_dtype(dtype)
    padding = layers.canonical_padding(padding)
    common_args = dict(bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=self.dtype, rngs=rngs)
    stem_features = common.make_divisible(32 * width)
    self.stem = layers.ConvBN(
      in_channels,
      stem_features,
      3,
      strides=2,
      padding=padding,
      activation=jax.nn.relu6,
      **common_args,
    )
    blocks = []
    stage_names = []
    in_features = stem_features
    for expansion, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
      out_features = common.make_divisible(channels * width)
      if first_stride == 2 and blocks:
        stage_names.append(f"block_{len(blocks) - 1}")
      for repeat in range(repeats):
        blocks.append(
          InvertedResidual(
            in_features,
            out_features,
            strides=first_stride if repeat == 0 else 1,
            expansion=expansion,
            padding=padding,
            **common_args,
          )
        )
        in_features = out_features
    self.blocks = nnx.List(blocks)
    # Both references widen the last conv only for width > 1.
    self.num_features = common.make_divisible(LAST_CHANNELS * max(1.0, width))
    self.last_conv = layers.ConvBN(
      in_features, self.num_features, 1, activation=jax.nn.relu6, **common_args
    )
    self.stage_names = (*stage_names, "features")
    self.head = common.Head(
      self.num_features, num_classes, dropout=dropout, dtype=self.dtype, rngs=rngs
    )

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """Named NHWC feature maps: "stem", "block_0".."block_16", "features"."""
    x = self.stem(jax.numpy.asarray(x, self.dtype))
    x = common.tap("stem", x)
    feature_maps = {"stem": x}
    for index, block in enumerate(self.blocks):
      x = feature_maps[f"block_{index}"] = common.tap(f"block_{index}", block(x))
    feature_maps["features"] = common.tap("features", self.last_conv(x))
    return feature_maps

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    """Logits (float32) for NHWC input; with `return_features`, also the feature dict."""
    feature_maps = self.features(x)
    logits = self.head(feature_maps["features"])
    return (logits, feature_maps) if return_features else logits


def create(model_config: Any, *, num_classes: int, rngs: nnx.Rngs) -> MobileNetV2:
  """Builds MobileNetV2 from ``config.model`` (fields: width, in_channels, dropout, dtype,
  bn_epsilon, bn_momentum, padding; `variant` is accepted and must be "mobilenet_v2")."""
  get = lambda field, default: common.config_get(model_config, field, default)
  variant = get("variant", "mobilenet_v2")
  if variant not in ("mobilenet_v2", "mobilenetv2", None):
    raise ValueError(f"mobilenet_v2 has no variant {variant!r} (use width for size)")
  return MobileNetV2(
    num_classes=num_classes,
    in_channels=get("in_channels", 3),
    width=get("width", 1.0),
    dropout=get("dropout", 0.2),
    dtype=get("dtype", "float32"),
    bn_epsilon=get("bn_epsilon", 1e-5),
    bn_momentum=get("bn_momentum", 0.9),
    padding=get("padding", "symmetric"),
    rngs=rngs,
  )
