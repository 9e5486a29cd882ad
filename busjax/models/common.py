"""Helpers shared by the backbones: input preprocessing, dtypes, config reading, counting, taps.

`preprocess` runs inside the jitted step: the pipeline ships uint8 images and the
normalisation happens on the accelerator (see ARCHITECTURE.md, Grain).

`tap` marks a named feature map inside a model's forward pass (the names of its
``return_features`` dict). It is the identity, except inside `tapping(layer, delta)`, where the
map called `layer` is recorded and `delta` added to it: the gradient with respect to `delta` at
zero is the gradient at that map (Grad-CAM on any named map, `evaluators.saliency`). A model
that runs a sub-model under `tap_scope("name/")` qualifies its sub-model's names.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from busjax.models import layers

# Per-channel RGB statistics of ImageNet (torchvision, Keras "torch" mode: DenseNet, ResNet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (mean, std) on [0, 1] intensities.
NORMALIZATIONS = {
  # From scratch on grayscale ultrasound: maps typical B-mode intensities to about [-2, 2].
  "default": (0.5, 0.25),
  "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
  # Keras "tf" mode (MobileNetV2, Inception): x / 127.5 - 1.
  "inception": (0.5, 0.5),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Tapped:
  """What one `tapping` context saw: every tapped name in order, and the map called `layer`."""

  layer: str
  delta: Any = None
  prefix: str = ""
  names: list[str] = dataclasses.field(default_factory=list)
  value: Any = None


_TAPPING: contextvars.ContextVar[Tapped | None] = contextvars.ContextVar("tapping", default=None)


def tap(name: str, x: jax.Array) -> jax.Array:
  """`x`, or inside `tapping(layer, delta)` and when this map is `layer`: `x + delta`."""
  tapped = _TAPPING.get()
  if tapped is None:
    return x
  full = tapped.prefix + name
  tapped.names.append(full)
  if full != tapped.layer:
    return x
  if tapped.value is not None:
    raise ValueError(f"feature map {full!r} is tapped twice in one forward pass")
  tapped.value = x
  return x if tapped.delta is None else x + tapped.delta.astype(x.dtype)


@contextlib.contextmanager
def tapping(layer: str, delta: Any = None) -> Iterator[Tapped]:
  """Records the map called `layer` (and every name seen) during a forward pass in this
  context, adding `delta` (same shape) to it when given. Trace-time only: use inside the
  function that jit/grad transform."""
  token = _TAPPING.set(Tapped(layer, delta))
  try:
    yield _TAPPING.get()
  finally:
    _TAPPING.reset(token)


@contextlib.contextmanager
def tap_scope(prefix: str) -> Iterator[None]:
  """Qualifies the names tapped inside (a sub-model's maps) with `prefix`."""
  tapped = _TAPPING.get()
  if tapped is None:
    yield
    return
  outer = tapped.prefix
  tapped.prefix = outer + prefix
  try:
    yield
  finally:
    tapped.prefix = outer


def normalization_stats(name: str) -> tuple[Any, Any]:
  """(mean, std) for a named normalisation: "default", "imagenet" or "inception"."""
  try:
    return NORMALIZATIONS[name]
  except KeyError:
    raise ValueError(
      f"normalization must be one of {sorted(NORMALIZATIONS)}, got {name!r}"
    ) from None


def compute_dtype(dtype: str | jnp.dtype | None) -> jnp.dtype:
  """Resolves a config dtype ("float32" | "bfloat16" | "float16" or a numpy dtype)."""
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    try:
      return _DTYPES[dtype]
    except KeyError:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None
  return jnp.dtype(dtype)


def preprocess(
  images: jax.Array,
  *,
  in_channels: int,
  mean: float | Sequence[float] = 0.5,
  std: float | Sequence[float] = 0.25,
  dtype: str | jnp.dtype = jnp.float32,
) -> jax.Array:
  """uint8 images -> normalised float model input (N, H, W, in_channels).

  Args:
    images: uint8 (N, H, W), (N, H, W, 1), (N, H, W, 3), or (N, H, W, in_channels).
    in_channels: what the model expects. Grayscale is repeated to 3 channels (ImageNet
      weights); RGB is averaged to 1 channel for a grayscale model; other channel counts
      (one per modality of a multimodal network) pass through.
    mean: on [0, 1] intensities; a scalar or one value per output channel
      (e.g. ``IMAGENET_MEAN``, or ``normalization_stats("imagenet")``).
    std: likewise.
    dtype: the compute dtype of the model.

  Returns:
    ``(images / 255 - mean) / std`` in `dtype`, with `in_channels` channels.
  """
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in {1, 3, in_channels}:
    raise ValueError(
      f"preprocess expects (N, H, W[, 1|3|{in_channels}]) images, got shape {images.shape}"
    )
  if in_channels < 1:
    raise ValueError(f"in_channels must be >= 1, got {in_channels}")
  # Normalise in float32 whatever the compute dtype: bf16 has 8 bits of mantissa.
  x = images.astype(jnp.float32) / 255.0
  if in_channels == 3 and x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  elif in_channels == 1 and x.shape[-1] == 3:
    x = jnp.mean(x, axis=-1, keepdims=True)
  mean_array = jnp.asarray(mean, jnp.float32).reshape(-1)
  std_array = jnp.asarray(std, jnp.float32).reshape(-1)
  for name, value in (("mean", mean_array), ("std", std_array)):
    if value.shape[0] not in (1, in_channels):
      raise ValueError(f"{name} has {value.shape[0]} values for {in_channels} channels")
  x = (x - mean_array) / std_array
  return x.astype(compute_dtype(dtype))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds channels to a multiple of `divisor`, never more than 10% below `value`.

  The rule of the TF-slim/torchvision/Keras MobileNets, so widths match theirs.
  """
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def scaled_channels(channels: int, width: float) -> int:
  """Channels times a width multiplier, at least 1 (ResNet/DenseNet widths)."""
  return max(1, int(round(channels * width)))


def global_average_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C), averaged in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def config_get(config: Any, field: str, default: Any) -> Any:
  """`config.get(field, default)` for ConfigDict / dict; plain attribute lookup otherwise."""
  if config is None:
    return default
  if hasattr(config, "get"):
    return config.get(field, default)
  return getattr(config, field, default)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves; BatchNorm running stats excluded)."""
  state = nnx.state(model, nnx.Param)
  return sum(int(leaf.size) for leaf in jax.tree.leaves(state))


def count_params_abstract(create_fn) -> int:
  """Parameter count of `create_fn()` without allocating (shapes only, via nnx.eval_shape)."""
  return count_params(nnx.eval_shape(create_fn))


class Head(nnx.Module):
  """Global average pool -> dropout -> linear; logits in float32.

  Holds ``fc.kernel`` (C, num_classes) and ``fc.bias``: the torchvision ``fc``/``classifier``
  and Keras ``predictions`` layers map onto it directly.
  """

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    dropout: float = 0.0,
    dtype: jnp.dtype | None = None,
    rngs: nnx.Rngs,
  ):
    # Only create the dropout (and its RNG state) when it is used: a model without
    # dropout then needs no RNG stream in the train step.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else nnx.data(None)
    self.fc = nnx.Linear(
      in_features, num_classes, dtype=dtype, kernel_init=layers.dense_kernel_init, rngs=rngs
    )

  def __call__(self, features: jax.Array) -> jax.Array:
    pooled = global_average_pool(features)
    if self.dropout is not None:
      pooled = self.dropout(pooled)
    return self.fc(pooled.astype(self.fc.dtype or jnp.float32)).astype(jnp.float32)
