"""DenseNet-121/169/201/161 in Flax NNX, laid out like torchvision and Keras.

Stem 7x7/2 conv -> BN -> ReLU -> 3x3/2 max pool; dense blocks of pre-activation layers
(BN -> ReLU -> 1x1 conv to bn_size*growth -> BN -> ReLU -> 3x3 conv to growth, concatenated
onto the input); transitions (BN -> ReLU -> 1x1 conv halving channels -> 2x2 average pool);
final BN -> ReLU -> pool -> linear. At 1000 classes, 3 channels: DenseNet-121 has 7,978,856
parameters, 169: 14,149,480, 201: 20,013,928. Both references pad symmetrically (Keras with
explicit ZeroPadding2D), so `padding` defaults to "symmetric"; Keras uses BatchNorm epsilon
1.001e-5, torchvision 1e-5.

Size options: `growth_rate` and `num_init_features` (defaults from the variant), or `width`
scaling both; `block_config` (layers per dense block, for tiny test/smoke models);
`small_stem` (3x3/1 conv, no max pool) for 32-96 px inputs.

Feature maps (NHWC) by name: "stem" (after the max pool), "block_1".."block_4" (dense block
outputs, pre-activation as in the network: a head on them should normalise), "features"
(norm5 + ReLU of block_4, the map before pooling). `stage_names` lists one map per stride.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from busjax.models import common, layers

# variant -> (growth rate, layers per dense block, initial features)
VARIANTS = {
  "densenet121": (32, (6, 12, 24, 16), 64),
  "densenet169": (32, (6, 12, 32, 32), 64),
  "densenet201": (32, (6, 12, 48, 32), 64),
  "densenet161": (48, (6, 12, 36, 24), 96),
}


class DenseLayer(nnx.Module):
  """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, output concatenated to the input (torchvision names)."""

  def __init__(self, in_features: int, *, growth_rate: int, bn_size: int, options: dict):
    bottleneck = bn_size * growth_rate
    norm_args = dict(
      epsilon=options["bn_epsilon"], dtype=options["dtype"], fused=True, rngs=options["rngs"]
    )
    conv_args = dict(dtype=options["dtype"], rngs=options["rngs"])
    self.norm1 = layers.batch_norm(in_features, **norm_args)
    self.conv1 = layers.Conv(in_features, bottleneck, 1, **conv_args)
    self.norm2 = layers.batch_norm(bottleneck, **norm_args)
    self.conv2 = layers.Conv(bottleneck, growth_rate, 3, padding=options["padding"], **conv_args)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv1(self.norm1(x, activation=jax.nn.relu))
    y = self.conv2(self.norm2(y, activation=jax.nn.relu))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nnx.Module):
  """BN-ReLU-Conv1x1 (compress channels) then 2x2 average pool."""

  def __init__(self, in_features: int, out_features: int, *, options: dict):
    self.norm = layers.batch_norm(
      in_features,
      epsilon=options["bn_epsilon"],
      dtype=options["dtype"],
      fused=True,
      rngs=options["rngs"],
    )
    self.conv = layers.Conv(
      in_features, out_features, 1, dtype=options["dtype"], rngs=options["rngs"]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.norm(x, activation=jax.nn.relu))
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nnx.Module):
  """DenseNet backbone + head.

  Attributes:
    num_features: channels of the "features" map (1024 for DenseNet-121).
    stage_names: "block_1", "block_2", "block_3", "features" (strides 4..32; 1..8 with
      `small_stem`).
  """

  def __init__(
    self,
    variant: str = "densenet121",
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    growth_rate: int | None = None,
    num_init_features: int | None = None,
    width: float = 1.0,
    block_config: tuple[int, ...] | None = None,
    bn_size: int = 4,
    compression: float = 0.5,
    dropout: float = 0.0,
    dtype: Any = "float32",
    small_stem: bool = False,
    bn_epsilon: float = 1e-5,
    padding: str = "symmetric",
    rngs: nnx.Rngs,
  ):
    if variant not in VARIANTS:
      raise ValueError(f"DenseNet variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    default_growth, default_blocks, default_init = VARIANTS[variant]
    block_config = tuple(block_config or default_blocks)
    growth_rate = growth_rate or common.scaled_channels(default_growth, width)
    num_init_features = num_init_features or common.scaled_channels(default_init, width)
    self.variant = variant
    self.small_stem = small_stem
    self.dtype = common.compute_dtype(dtype)
    options = dict(
      padding=layers.canonical_padding(padding),
      bn_epsilon=bn_epsilon,
      dtype=self.dtype,
      rngs=rngs,
    )
    self.stem = layers.ConvBN(
      in_channels,
      num_init_features,
      3 if small_stem else 7,
      strides=1 if small_stem else 2,
      padding=options["padding"],
      bn_epsilon=bn_epsilon,
      dtype=self.dtype,
      rngs=rngs,
    )
    blocks, transitions = [], []
    features = num_init_features
    for index, num_layers in enumerate(block_config):
      block = []
      for _ in range(num_layers):
        block.append(
          DenseLayer(features, growth_rate=growth_rate, bn_size=bn_size, options=options)
        )
        features += growth_rate
      blocks.append(nnx.List(block))
      if index != len(block_config) - 1:
        compressed = int(features * compression)
        transitions.append(Transition(features, compressed, options=options))
        features = compressed
    self.blocks = nnx.List(blocks)
    self.transitions = nnx.List(transitions)
    self.final_norm = layers.batch_norm(
      features, epsilon=bn_epsilon, dtype=self.dtype, fused=True, rngs=rngs
    )
    self.num_features = features
    self.stage_names = ("block_1", "block_2", "block_3", "features")
    self.head = common.Head(features, num_classes, dropout=dropout, dtype=self.dtype, rngs=rngs)

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """Named NHWC feature maps: "stem", "block_1".."block_4", "features"."""
    x = self.stem(jnp.asarray(x, self.dtype))
    if not self.small_stem:
      x = layers.max_pool_3x3_s2(x)
    x = common.tap("stem", x)
    feature_maps = {"stem": x}
    for index, block in enumerate(self.blocks):
      for layer in block:
        x = layer(x)
      x = feature_maps[f"block_{index + 1}"] = common.tap(f"block_{index + 1}", x)
      if index < len(self.transitions):
        x = self.transitions[index](x)
    feature_maps["features"] = common.tap("features", self.final_norm(x, activation=jax.nn.relu))
    return feature_maps

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    """Logits (float32) for NHWC input; with `return_features`, also the feature dict."""
    feature_maps = self.features(x)
    logits = self.head(feature_maps["features"])
    return (logits, feature_maps) if return_features else logits


def create(model_config: Any, *, num_classes: int, rngs: nnx.Rngs) -> DenseNet:
  """Builds a DenseNet from ``config.model`` (fields: variant, width, growth_rate,
  num_init_features, block_config, in_channels, dropout, dtype, small_stem, bn_epsilon, padding)."""
  get = lambda field, default: common.config_get(model_config, field, default)
  return DenseNet(
    get("variant", "densenet121"),
    num_classes=num_classes,
    in_channels=get("in_channels", 3),
    growth_rate=get("growth_rate", None),
    num_init_features=get("num_init_features", None),
    width=get("width", 1.0),
    block_config=get("block_config", None),
    dropout=get("dropout", 0.0),
    dtype=get("dtype", "float32"),
    small_stem=get("small_stem", False),
    bn_epsilon=get("bn_epsilon", 1e-5),
    padding=get("padding", "symmetric"),
    rngs=rngs,
  )
