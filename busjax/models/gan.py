"""Class-conditional GAN for minority-class rebalancing: generator, discriminators, losses.

The networks follow the SNGAN/BigGAN ResNet design at small widths (the training sets are a few
hundred ultrasound images per class):

* `Generator`: ``[z, class embedding]`` -> linear -> 4x4 map -> residual up-blocks (nearest
  upsampling, 3x3 convs, class-conditional BatchNorm) -> BN -> ReLU -> 3x3 conv -> tanh. One
  channel, values in [-1, 1], ``image_size`` = 4 * 2**k pixels.
* `Discriminator`: residual down-blocks (3x3 convs, 2x2 average pooling) -> ReLU -> global sum
  pool -> linear + class projection ``<embed(y), h>`` (Miyato & Koyama 2018). Optional softplus
  output (the positive D1, D2 of D2GAN). Spectral normalisation of every weight by a config
  switch.
* Losses: D2GAN (Nguyen et al., NeurIPS 2017) and the non-saturating single-discriminator GAN;
  the R1 gradient penalty (Mescheder et al. 2018).

Spectral normalisation is implemented here (`SpectralNorm`) rather than taken from
``nnx.SpectralNorm``: in flax 0.12.8 that wrapper writes ``W / sigma`` back into the wrapped layer's
Param on every call, so the trained parameter drifts from the raw weight and an optimiser would
update an already-normalised copy. Here the Param stays the raw weight, the power-iteration vector
``u`` is a non-trainable `SpectralVector` (a ``nnx.BatchStat``, via `layers.RunningStat`, so it
travels with the BatchNorm statistics in ``nnx.split(model, nnx.Param, ...)``), and it is updated
only in training mode (``model.train()``; ``model.eval()`` freezes it). A training-mode
discriminator must therefore be an argument of any gradient that runs it (``nnx.value_and_grad``
over it, or merged inside a ``jax.grad``-ed function); one that is only closed over (R1's inner
gradient, the generator's loss) raises flax's TraceContextError when it writes ``u``, so run it
there as an evaluation-mode view, ``nnx.with_attributes(d, use_running_average=True)``.

Real uint8 images enter the discriminators through `to_model_range` ([-1, 1], the generator's
range), inside the jitted step like every other model's `common.preprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from busjax.models import common, layers

OBJECTIVES = ("d2gan", "gan")
# Spatial size of the generator's first map and the discriminator's last.
BOTTOM_SIZE = 4
# A positive discriminator output can underflow to 0 (softplus of a logit below about -100);
# the log in the D2GAN losses is taken of at least this, so the losses stay finite.
_LOG_FLOOR = float(jnp.finfo(jnp.float32).tiny)

# LeCun normal: with spectral normalisation the scale of a weight does not change the
# function, and without it this keeps activations O(1) through the discriminator.
_d_kernel_init = layers.he_normal(1.0, "fan_in")


def num_resolution_steps(image_size: int) -> int:
  """How many 2x up- (generator) or down-sampling (discriminator) steps `image_size` needs.

  Raises ValueError unless ``image_size = 4 * 2**k`` with k >= 1 (8, 16, 32, 64, 128, 256...).
  """
  steps = math.log2(image_size / BOTTOM_SIZE) if image_size > 0 else -1
  if image_size < 2 * BOTTOM_SIZE or steps != int(steps):
    raise ValueError(f"image_size must be {BOTTOM_SIZE} * 2**k with k >= 1, got {image_size}")
  return int(steps)


def channels_at(resolution: int, image_size: int, width: int, max_multiplier: int) -> int:
  """Channels of a map at `resolution`: `width` at full size, doubling per halving, capped at
  ``width * max_multiplier`` (shared by generator and discriminator)."""
  return width * min(max_multiplier, image_size // resolution)


def to_model_range(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 (N, H, W[, C]) -> one-channel float images in [-1, 1] (the generator's range)."""
  return common.preprocess(images, in_channels=1, mean=0.5, std=0.5, dtype=dtype)


def to_uint8(images: jax.Array) -> jax.Array:
  """Generator output in [-1, 1] -> uint8 [0, 255] (e.g. to add synthetic images to a set)."""
  scaled = (jnp.asarray(images, jnp.float32) + 1.0) * 127.5
  return jnp.clip(jnp.round(scaled), 0, 255).astype(jnp.uint8)


def _upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of NHWC (a broadcast, no gather)."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def _avg_pool2x(x: jax.Array) -> jax.Array:
  """2x2 stride-2 average pooling of NHWC (even sizes) as a reshape-mean."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------------------------
# Spectral normalisation
# ----------------------------------------------------------------------------------------------


class SpectralVector(layers.RunningStat):
  """The power-iteration vector ``u`` of `SpectralNorm`: state, not a trained parameter."""


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x), eps))


def spectral_normalize(
  weight: jax.Array, u: jax.Array, num_iterations: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``weight / sigma`` with sigma the largest singular value estimated by power iteration.

  The weight is seen as a matrix ``(prod(shape[:-1]), shape[-1])`` (a conv kernel HWIO as
  (kh*kw*in, out)), as in Miyato et al. 2018.

  Args:
    weight: any array with at least 2 dimensions.
    u: current estimate of the top right singular vector, shape ``(shape[-1],)``.
    num_iterations: power-iteration steps from `u` (0 reuses `u` as it is).

  Returns:
    (normalised weight, the new u, sigma). u and v are constants for the gradient, so sigma's
    gradient is ``v u^T`` (the paper's choice); sigma = ||W u|| <= the true top singular value.
  """
  matrix = weight.reshape(-1, weight.shape[-1]).astype(jnp.float32)
  u = u.astype(jnp.float32)
  for _ in range(num_iterations):
    v = _l2_normalize(matrix @ u)
    u = _l2_normalize(matrix.T @ v)
  u = jax.lax.stop_gradient(u)
  v = jax.lax.stop_gradient(_l2_normalize(matrix @ u))
  sigma = v @ (matrix @ u)
  normalized = weight / jnp.maximum(sigma, 1e-12).astype(weight.dtype)
  return normalized, u, sigma


class SpectralNorm(nnx.Module):
  """Divides a weight by its power-iteration spectral norm; owns only the ``u`` vector.

  Training mode (``use_running_average=False``, what ``model.train()`` sets) runs
  `num_iterations` steps from the stored ``u`` and stores the result; evaluation mode
  (``model.eval()``) uses the stored ``u`` as it is and changes nothing, so evaluation right
  after a training call with the same weights gives the same sigma.
  """

  def __init__(self, features: int, *, num_iterations: int = 1, rngs: nnx.Rngs):
    if num_iterations < 1:
      raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    self.num_iterations = num_iterations
    self.use_running_average = False
    start = layers.dense_kernel_init(rngs.params(), (1, features))[0]
    self.u = SpectralVector(_l2_normalize(start))

  def __call__(self, weight: jax.Array) -> jax.Array:
    steps = 0 if self.use_running_average else self.num_iterations
    normalized, u, _ = spectral_normalize(weight, self.u[...], steps)
    if not self.use_running_average:
      self.u[...] = u
    return normalized

  def sigma(self, weight: jax.Array) -> jax.Array:
    """The current estimate of the top singular value of `weight` (stored ``u``, no update)."""
    return spectral_normalize(weight, self.u[...], 0)[2]


class SNConv(nnx.Module):
  """Stride-1 'same' convolution (kernel (k, k, in, out), bias), optionally spectrally normed.

  1x1 kernels run as a channel matmul (fast on XLA:CPU, see `busjax.models.layers`).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    spectral_norm: bool = True,
    num_iterations: int = 1,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    self.kernel_size = kernel_size
    self.dtype = dtype
    self.kernel = nnx.Param(
      _d_kernel_init(rngs.params(), (kernel_size, kernel_size, in_features, out_features))
    )
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.sn = (
      SpectralNorm(out_features, num_iterations=num_iterations, rngs=rngs)
      if spectral_norm
      else nnx.data(None)
    )

  def weight(self) -> jax.Array:
    """The kernel the layer applies (normalised when spectral norm is on)."""
    kernel = self.kernel[...]
    return kernel if self.sn is None else self.sn(kernel)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = jnp.asarray(x, dtype)
    kernel = jnp.asarray(self.weight(), dtype)
    if self.kernel_size == 1:
      y = jnp.dot(x, kernel[0, 0])
    else:
      pad = self.kernel_size // 2
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    return y + jnp.asarray(self.bias[...], dtype)


class SNLinear(nnx.Module):
  """Dense layer (kernel (in, out), bias), optionally spectrally normed; float32."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    spectral_norm: bool = True,
    num_iterations: int = 1,
    rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(_d_kernel_init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.sn = (
      SpectralNorm(out_features, num_iterations=num_iterations, rngs=rngs)
      if spectral_norm
      else nnx.data(None)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...] if self.sn is None else self.sn(self.kernel[...])
    return jnp.asarray(x, jnp.float32) @ kernel + self.bias[...]


class SNEmbed(nnx.Module):
  """Class embedding table (num_classes, features), optionally spectrally normed (as in the
  projection discriminator of Miyato & Koyama 2018)."""

  def __init__(
    self,
    num_classes: int,
    features: int,
    *,
    spectral_norm: bool = True,
    num_iterations: int = 1,
    rngs: nnx.Rngs,
  ):
    self.embedding = nnx.Param(_d_kernel_init(rngs.params(), (num_classes, features)))
    self.sn = (
      SpectralNorm(features, num_iterations=num_iterations, rngs=rngs)
      if spectral_norm
      else nnx.data(None)
    )

  def __call__(self, labels: jax.Array) -> jax.Array:
    table = self.embedding[...] if self.sn is None else self.sn(self.embedding[...])
    return jnp.take(table, labels, axis=0)


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


class ConditionalBatchNorm(nnx.Module):
  """BatchNorm without its own affine; gain ``1 + A e`` and bias ``B e`` from the class
  embedding e (BigGAN). A and B start at zero, so it starts as plain BatchNorm and the class
  enters through the generator's input until these learn."""

  def __init__(self, features: int, embed_dim: int, *, dtype: Any = None, rngs: nnx.Rngs):
    self.bn = layers.BatchNorm(
      features, use_scale=False, use_bias=False, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs
    )
    zeros = nnx.initializers.zeros_init()
    self.gain = nnx.Linear(embed_dim, features, use_bias=False, kernel_init=zeros, rngs=rngs)
    self.bias = nnx.Linear(embed_dim, features, use_bias=False, kernel_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    x = self.bn(x)
    gain = (1.0 + self.gain(embedding)).astype(x.dtype)
    bias = self.bias(embedding).astype(x.dtype)
    return x * gain[:, None, None, :] + bias[:, None, None, :]


class GeneratorBlock(nnx.Module):
  """CBN -> ReLU -> 2x up -> 3x3 conv -> CBN -> ReLU -> 3x3 conv, + (2x up -> 1x1 conv) shortcut."""

  def __init__(
    self, in_features: int, out_features: int, embed_dim: int, *, dtype: Any, rngs: nnx.Rngs
  ):
    conv = lambda i, o, k: layers.Conv(i, o, k, use_bias=True, dtype=dtype, rngs=rngs)
    self.bn1 = ConditionalBatchNorm(in_features, embed_dim, dtype=dtype, rngs=rngs)
    self.conv1 = conv(in_features, out_features, 3)
    self.bn2 = ConditionalBatchNorm(out_features, embed_dim, dtype=dtype, rngs=rngs)
    self.conv2 = conv(out_features, out_features, 3)
    self.shortcut = conv(in_features, out_features, 1)

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    h = _upsample2x(jax.nn.relu(self.bn1(x, embedding)))
    h = self.conv2(jax.nn.relu(self.bn2(self.conv1(h), embedding)))
    return h + self.shortcut(_upsample2x(x))


class Generator(nnx.Module):
  """Class-conditional ResNet generator: (z, labels) -> (N, size, size, 1) float32 in [-1, 1].

  Attributes:
    image_size, latent_dim, num_classes: as given.
  """

  def __init__(
    self,
    *,
    num_classes: int,
    image_size: int = 128,
    latent_dim: int = 128,
    embed_dim: int = 64,
    width: int = 32,
    max_multiplier: int = 8,
    dtype: Any = "float32",
    rngs: nnx.Rngs,
  ):
    steps = num_resolution_steps(image_size)
    self.num_classes = num_classes
    self.image_size = image_size
    self.latent_dim = latent_dim
    self.dtype = common.compute_dtype(dtype)
    channels = [
      channels_at(BOTTOM_SIZE * 2**i, image_size, width, max_multiplier) for i in range(steps + 1)
    ]
    self.bottom_features = channels[0]
    self.class_embed = nnx.Embed(
      num_classes, embed_dim, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
    )
    self.project = nnx.Linear(
      latent_dim + embed_dim,
      BOTTOM_SIZE * BOTTOM_SIZE * channels[0],
      kernel_init=layers.dense_kernel_init,
      rngs=rngs,
    )
    self.blocks = nnx.List(
      [
        GeneratorBlock(channels[i], channels[i + 1], embed_dim, dtype=self.dtype, rngs=rngs)
        for i in range(steps)
      ]
    )
    self.out_bn = layers.batch_norm(channels[-1], dtype=self.dtype, rngs=rngs)
    # Fan-in scaling (He's fan-out would be fan-in / C here): pre-tanh values start O(1), not
    # saturated at +-1 where tanh passes almost no gradient.
    self.out_conv = layers.Conv(
      channels[-1],
      1,
      3,
      use_bias=True,
      kernel_init=layers.dense_kernel_init,
      dtype=self.dtype,
      rngs=rngs,
    )

  def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
    """Images (N, image_size, image_size, 1), float32 in [-1, 1], for latents z (N, latent_dim)
    and integer class labels (N,)."""
    embedding = self.class_embed(labels).astype(jnp.float32)
    h = self.project(jnp.concatenate([jnp.asarray(z, jnp.float32), embedding], axis=-1))
    h = h.reshape(h.shape[0], BOTTOM_SIZE, BOTTOM_SIZE, self.bottom_features).astype(self.dtype)
    for block in self.blocks:
      h = block(h, embedding)
    h = self.out_conv(jax.nn.relu(self.out_bn(h)))
    return jnp.tanh(h.astype(jnp.float32))

  def sample(self, key: jax.Array, labels: jax.Array) -> jax.Array:
    """Images for `labels` from fresh standard-normal latents drawn with `key`."""
    return self(sample_latent(key, labels.shape[0], self.latent_dim), labels)


def sample_latent(key: jax.Array, batch_size: int, latent_dim: int) -> jax.Array:
  """Standard-normal latents (batch_size, latent_dim), float32."""
  return jax.random.normal(key, (batch_size, latent_dim), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------


class DiscriminatorBlock(nnx.Module):
  """[ReLU] -> 3x3 conv -> ReLU -> 3x3 conv [-> 2x2 avg pool], + shortcut (SNGAN).

  The first block (`first`) takes the image itself: no leading ReLU, and its shortcut pools
  before the 1x1 conv (the "optimised block"). The shortcut is a 1x1 conv whenever the block
  changes channels or resolution, the identity otherwise.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    downsample: bool,
    first: bool = False,
    options: dict,
  ):
    self.downsample = downsample
    self.first = first
    self.conv1 = SNConv(in_features, out_features, 3, **options)
    self.conv2 = SNConv(out_features, out_features, 3, **options)
    self.shortcut = (
      SNConv(in_features, out_features, 1, **options)
      if downsample or in_features != out_features
      else nnx.data(None)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x if self.first else jax.nn.relu(x)
    h = self.conv2(jax.nn.relu(self.conv1(h)))
    if self.downsample:
      h = _avg_pool2x(h)
    shortcut = x
    if self.shortcut is not None:
      if self.first:
        shortcut = self.shortcut(_avg_pool2x(x) if self.downsample else x)
      else:
        shortcut = self.shortcut(x)
        shortcut = _avg_pool2x(shortcut) if self.downsample else shortcut
    return h + shortcut


class Discriminator(nnx.Module):
  """Projection discriminator: (images in [-1, 1] (N, H, W, 1), labels (N,)) -> (N,) float32.

  Outputs are logits, or with `positive` softplus(logit) > 0 (D2GAN's D1 and D2). Holds no
  BatchNorm, so each sample's output depends on that sample only (what `r1_penalty` assumes).
  """

  def __init__(
    self,
    *,
    num_classes: int,
    image_size: int = 128,
    width: int = 32,
    max_multiplier: int = 8,
    in_channels: int = 1,
    positive: bool = False,
    spectral_norm: bool = True,
    num_iterations: int = 1,
    dtype: Any = "float32",
    rngs: nnx.Rngs,
  ):
    steps = num_resolution_steps(image_size)
    self.num_classes = num_classes
    self.image_size = image_size
    self.positive = positive
    self.dtype = common.compute_dtype(dtype)
    options = dict(
      spectral_norm=spectral_norm, num_iterations=num_iterations, dtype=self.dtype, rngs=rngs
    )
    blocks = []
    in_features = in_channels
    for index in range(steps):
      out_features = channels_at(image_size >> (index + 1), image_size, width, max_multiplier)
      blocks.append(
        DiscriminatorBlock(
          in_features, out_features, downsample=True, first=index == 0, options=options
        )
      )
      in_features = out_features
    # One more block at the bottom resolution, as SNGAN's discriminators end.
    blocks.append(DiscriminatorBlock(in_features, in_features, downsample=False, options=options))
    self.blocks = nnx.List(blocks)
    self.num_features = in_features
    sn_options = dict(spectral_norm=spectral_norm, num_iterations=num_iterations, rngs=rngs)
    self.linear = SNLinear(in_features, 1, **sn_options)
    self.class_embed = SNEmbed(num_classes, in_features, **sn_options)

  def features(self, images: jax.Array) -> jax.Array:
    """(N, C) features: the blocks, ReLU, then a global sum over positions (SNGAN)."""
    h = jnp.asarray(images, self.dtype)
    for block in self.blocks:
      h = block(h)
    return jnp.sum(jax.nn.relu(h).astype(jnp.float32), axis=(1, 2))

  def __call__(self, images: jax.Array, labels: jax.Array) -> jax.Array:
    features = self.features(images)
    logits = self.linear(features)[:, 0] + jnp.sum(self.class_embed(labels) * features, axis=-1)
    return jax.nn.softplus(logits) if self.positive else logits


class GAN(nnx.Module):
  """The networks of one run: ``generator``, ``discriminator1`` and, for D2GAN,
  ``discriminator2`` (None for the single-discriminator GAN). Nothing is shared between them;
  split each one separately (``nnx.split(gan.generator, nnx.Param, ...)``) for its optimiser."""

  def __init__(
    self,
    generator: Generator,
    discriminator1: Discriminator,
    discriminator2: Discriminator | None = None,
  ):
    self.generator = generator
    self.discriminator1 = discriminator1
    self.discriminator2 = discriminator2 if discriminator2 is not None else nnx.data(None)


def _get(model_config: Any, field: str, default: Any) -> Any:
  return common.config_get(model_config, field, default)


def create_generator(model_config: Any, *, num_classes: int, rngs: nnx.Rngs) -> Generator:
  """A `Generator` from ``config.model`` (fields: image_size, latent_dim, embed_dim, g_width,
  max_multiplier, dtype)."""
  return Generator(
    num_classes=num_classes,
    image_size=_get(model_config, "image_size", 128),
    latent_dim=_get(model_config, "latent_dim", 128),
    embed_dim=_get(model_config, "embed_dim", 64),
    width=_get(model_config, "g_width", 32),
    max_multiplier=_get(model_config, "max_multiplier", 8),
    dtype=_get(model_config, "dtype", "float32"),
    rngs=rngs,
  )


def create_discriminator(
  model_config: Any, *, num_classes: int, positive: bool, rngs: nnx.Rngs
) -> Discriminator:
  """A `Discriminator` from ``config.model`` (fields: image_size, d_width, max_multiplier,
  spectral_norm, power_iterations, dtype); `positive` adds the softplus output."""
  return Discriminator(
    num_classes=num_classes,
    image_size=_get(model_config, "image_size", 128),
    width=_get(model_config, "d_width", 32),
    max_multiplier=_get(model_config, "max_multiplier", 8),
    positive=positive,
    spectral_norm=_get(model_config, "spectral_norm", True),
    num_iterations=_get(model_config, "power_iterations", 1),
    dtype=_get(model_config, "dtype", "float32"),
    rngs=rngs,
  )


def create(model_config: Any, *, num_classes: int, rngs: nnx.Rngs) -> GAN:
  """Generator and discriminator(s) from ``config.model``.

  ``objective`` "d2gan" (default) builds two positive-output discriminators, "gan" one
  discriminator with logits. Other fields: see `create_generator` and `create_discriminator`.
  """
  objective = _get(model_config, "objective", "d2gan")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  dual = objective == "d2gan"
  generator = create_generator(model_config, num_classes=num_classes, rngs=rngs)
  make_d = lambda: create_discriminator(
    model_config, num_classes=num_classes, positive=dual, rngs=rngs
  )
  return GAN(generator, make_d(), make_d() if dual else None)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _safe_log(x: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(jnp.asarray(x, jnp.float32), _LOG_FLOOR))


def d2gan_objective(d1_real, d1_fake, d2_real, d2_fake, alpha: float, beta: float) -> jax.Array:
  """D2GAN's J = alpha E[log D1(x)] - E[D1(G(z))] - E[D2(x)] + beta E[log D2(G(z))]
  (Nguyen et al. 2017, eq. 1): discriminators maximise it, the generator minimises it.

  All inputs are the (positive) discriminator outputs, shape (N,).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (
    alpha * jnp.mean(_safe_log(d1_real))
    - jnp.mean(f32(d1_fake))
    - jnp.mean(f32(d2_real))
    + beta * jnp.mean(_safe_log(d2_fake))
  )


def d2gan_discriminator_loss(
  d1_real, d1_fake, d2_real, d2_fake, alpha: float, beta: float
) -> jax.Array:
  """Scalar for D1 and D2 to minimise: ``-J`` (see `d2gan_objective`).

  D1 rewards real data (alpha weighs its log term), D2 rewards generated data (beta weighs
  its log term).
  """
  return -d2gan_objective(d1_real, d1_fake, d2_real, d2_fake, alpha, beta)


def d2gan_generator_loss(d1_fake, d2_fake, beta: float) -> jax.Array:
  """Scalar for the generator to minimise: the terms of J that depend on G,
  ``-E[D1(G(z))] + beta E[log D2(G(z))]``."""
  return -jnp.mean(jnp.asarray(d1_fake, jnp.float32)) + beta * jnp.mean(_safe_log(d2_fake))


def gan_discriminator_loss(real_logits, fake_logits) -> jax.Array:
  """Standard GAN discriminator loss on logits:
  ``E[-log sigmoid(real)] + E[-log(1 - sigmoid(fake))]`` (softplus form, stable)."""
  real_logits = jnp.asarray(real_logits, jnp.float32)
  fake_logits = jnp.asarray(fake_logits, jnp.float32)
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def gan_generator_loss(fake_logits) -> jax.Array:
  """Non-saturating generator loss ``E[-log sigmoid(D(G(z)))]`` (Goodfellow et al. 2014)."""
  return jnp.mean(jax.nn.softplus(-jnp.asarray(fake_logits, jnp.float32)))


def r1_penalty(
  d_apply: Callable[[jax.Array, jax.Array], jax.Array], images: jax.Array, labels: jax.Array
) -> jax.Array:
  """R1 penalty ``E_x ||grad_x D(x, y)||^2`` at real images (Mescheder et al. 2018).

  Multiply by gamma / 2 in the discriminator loss.

  Args:
    d_apply: a pure ``(images, labels) -> (N,)`` discriminator function. The per-sample
      gradients come from one gradient of the batch sum, which is exact because the
      discriminator has no cross-sample layer (no BatchNorm). It must not update state inside
      this gradient: pass an evaluation-mode view (e.g.
      ``nnx.with_attributes(d, use_running_average=True)``) so spectral norm's ``u`` stays.
    images: real images (N, H, W, C), float.
    labels: their classes (N,).

  Returns:
    The batch mean of the squared gradient norms, float32 scalar.
  """
  images = jnp.asarray(images, jnp.float32)
  grads = jax.grad(lambda x: jnp.sum(jnp.asarray(d_apply(x, labels), jnp.float32)))(images)
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))
