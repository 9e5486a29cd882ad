"""DiffAugment for grey ultrasound (Zhao et al., "Differentiable Augmentation for Data-Efficient
GAN Training", NeurIPS 2020).

The same random transform is applied to real and generated images before every discriminator
call, and it is differentiable, so the generator's gradient passes through it. With a few
hundred images per class this keeps the discriminator from memorising the training set.

Each augmentation is a pure function ``(images (N, H, W, C) float, key) -> images``:

* `translation`: a per-image integer shift of up to 1/8 of each side, zero fill (`translate`).
* `cutout`: a per-image square of half the side set to zero, centred anywhere in the image (so
  it may be clipped at the border), as in the paper.
* `intensity`: per-image brightness (add U(-0.5, 0.5)) and contrast (scale about the image mean
  by U(0.5, 1.5)), the paper's "color" policy without saturation, which a one-channel image
  does not have.

No flips: the vertical axis of a B-mode image is depth (skin at the top, shadowing below a
lesion), and a flipped image is not a plausible ultrasound image.

Randomness depends only on the key and the batch shape: the same key gives the same per-image
parameters whatever the pixels, so ``diff_augment(real, key)`` and ``diff_augment(fake, key)``
transform the i-th real and i-th fake image identically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Canonical order, whatever the order in the policy string: intensity first, as the paper's
# "color,translation,cutout", so translation's fill and cutout's square stay exactly zero.
AUGMENTATIONS = ("intensity", "translation", "cutout")
DEFAULT_POLICY = "translation,cutout,intensity"


def translate(
  images: jax.Array, shifts: jax.Array, max_shift: tuple[int, int] | None = None
) -> jax.Array:
  """Shifts each image by whole pixels, filling with zeros.

  Args:
    images: (N, H, W, C).
    shifts: integer (N, 2) of (down, right) shifts; output[i, r, c] = images[i, r - dy, c - dx],
      zero where that falls outside.
    max_shift: static bound on |dy| and |dx| (the zero padding added); default (H - 1, W - 1),
      any shift. Larger shifts would be clamped, so keep them within it.

  Returns:
    (N, H, W, C), differentiable with respect to `images`.
  """
  _, height, width, channels = images.shape
  pad_h, pad_w = max_shift if max_shift is not None else (height - 1, width - 1)
  padded = jnp.pad(images, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  shifts = jnp.asarray(shifts, jnp.int32)

  def one(image, shift):
    start = (pad_h - shift[0], pad_w - shift[1], 0)
    return jax.lax.dynamic_slice(image, start, (height, width, channels))

  return jax.vmap(one)(padded, shifts)


def translation(images: jax.Array, key: jax.Array, ratio: float = 0.125) -> jax.Array:
  """Random shifts of up to ``round(ratio * side)`` pixels on each axis (uniform integers,
  inclusive), zero fill."""
  n, height, width, _ = images.shape
  max_shift = (int(height * ratio + 0.5), int(width * ratio + 0.5))
  bound = jnp.array(max_shift, jnp.int32)
  shifts = jax.random.randint(key, (n, 2), -bound, bound + 1)
  return translate(images, shifts, max_shift)


def cutout_mask(
  centers: jax.Array, image_shape: tuple[int, int], size: tuple[int, int]
) -> jax.Array:
  """(N, H, W, 1) float mask: 0 inside a (size_h, size_w) box at each (row, col) centre.

  The box covers rows ``[r - size_h // 2, r - size_h // 2 + size_h)`` (same for columns),
  clipped to the image.
  """
  height, width = image_shape
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  top = centers[:, 0, None, None] - size[0] // 2
  left = centers[:, 1, None, None] - size[1] // 2
  inside = (rows >= top) & (rows < top + size[0]) & (cols >= left) & (cols < left + size[1])
  return jnp.where(inside, 0.0, 1.0)[..., None]


def cutout(images: jax.Array, key: jax.Array, ratio: float = 0.5) -> jax.Array:
  """Zeroes a random (ratio * H, ratio * W) box per image, centred anywhere in the image."""
  n, height, width, _ = images.shape
  size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
  centers = jax.random.randint(key, (n, 2), 0, jnp.array([height, width]))
  return images * cutout_mask(centers, (height, width), size).astype(images.dtype)


def intensity(
  images: jax.Array, key: jax.Array, brightness: float = 0.5, contrast: float = 0.5
) -> jax.Array:
  """Per-image brightness then contrast jitter.

  Adds U(-brightness, brightness), then scales about the image mean by
  U(1 - contrast, 1 + contrast) (the paper's values for [-1, 1] images: 0.5 and 0.5).
  """
  n = images.shape[0]
  brightness_key, contrast_key = jax.random.split(key)
  delta = jax.random.uniform(brightness_key, (n, 1, 1, 1), minval=-brightness, maxval=brightness)
  factor = jax.random.uniform(contrast_key, (n, 1, 1, 1), minval=1 - contrast, maxval=1 + contrast)
  x = images + delta.astype(images.dtype)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * factor.astype(images.dtype) + mean


_FUNCTIONS = {"intensity": intensity, "translation": translation, "cutout": cutout}


def parse_policy(policy: str) -> tuple[str, ...]:
  """The augmentations named in a comma-separated policy, in the order they are applied.

  An empty policy (or "none") means no augmentation. Raises ValueError on unknown names.
  """
  names = {name.strip() for name in policy.split(",") if name.strip()} - {"none"}
  unknown = names - set(AUGMENTATIONS)
  if unknown:
    raise ValueError(f"unknown DiffAugment ops {sorted(unknown)}; known: {AUGMENTATIONS}")
  return tuple(name for name in AUGMENTATIONS if name in names)


def diff_augment(images: jax.Array, key: jax.Array, policy: str = DEFAULT_POLICY) -> jax.Array:
  """Applies the policy's augmentations (see `parse_policy`) to float images (N, H, W, C).

  Each augmentation draws from ``fold_in(key, its index in AUGMENTATIONS)``, so its parameters
  do not change when another one is added to or removed from the policy.
  """
  for name in parse_policy(policy):
    images = _FUNCTIONS[name](images, jax.random.fold_in(key, AUGMENTATIONS.index(name)))
  return images
