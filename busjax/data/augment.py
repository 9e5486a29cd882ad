"""Ultrasound-aware augmentation on uint8 grayscale images (numpy + PIL, runs inside Grain).

Everything here works on one uint8 (H, W) image, optionally with a lesion mask that gets the
same geometry. Geometry is ONE affine warp (crop, fit, field-of-view zoom-out, horizontal flip,
small rotation) done by PIL in C; intensity changes are a 256-entry lookup table (gamma, gain,
contrast) followed, when enabled, by two spatial multiplications (TGC ramp, speckle).

Choices that follow from how B-mode images are made:
  * No vertical flip, ever, and rotations stay small: the vertical axis is depth, with
    direction (skin on top, shadowing below a lesion). Flipping it makes impossible images.
  * Tissue aspect ratio is kept by default (``stretch=0``): "taller than wide" is a BI-RADS
    malignancy feature, so a stretch could change the label's evidence.
  * Zero means "no echo": padding, the fan's black surround and every intensity op keep 0 at 0.
  * Field-of-view jitter (zoom-out with a black border) mimics the gap between BUS-BRA's
    lesion-centred crops and BUSI's wide views.
  * Caliper/text suppression is off by default: it would also erase bright microcalcification
    foci, which are a malignancy sign. Use it as a random augmentation that teaches invariance
    to on-screen marks (many BUSI images carry them), not as cleaning.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

try:  # Optional: a faster resampling backend (config.backend = "cv2").
  import cv2
except ImportError:  # pragma: no cover - depends on the environment.
  cv2 = None

# 8-connectivity: calipers are drawn as diagonal crosses too.
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def default_config(mode: str = "train") -> ml_collections.ConfigDict:
  """The augmentation knobs, with the defaults used for training.

  Args:
    mode: ``"train"`` for the random pipeline below, ``"none"`` for evaluation
      (aspect-preserving resize + zero pad only; every other knob is ignored).

  Returns:
    A ConfigDict; every ``probability`` is per image, ranges are ``(low, high)``.
  """
  c = ml_collections.ConfigDict()
  c.mode = mode  # "train" | "none" (eval: resize_pad only).
  # Resampling library: "pil" (no extra dependency) or "cv2" (opencv-python-headless; its warp
  # is ~5x faster than PIL's, see benchmarks/input_pipeline.py). The two agree to ~1 grey level
  # but not bit for bit, so the backend is part of a run's recipe, never picked silently.
  c.backend = "pil"
  # Random crop that keeps depth order. `scale` is the crop's share of the image area;
  # `aspect` is the crop's aspect relative to the image's (log-uniform). The crop is then fitted
  # aspect-preserving into the output, so this changes the view, not tissue shape.
  c.crop = ml_collections.ConfigDict(dict(probability=0.8, scale=(0.7, 1.0), aspect=(0.8, 1.25)))
  c.hflip_probability = 0.5  # Left/right is arbitrary in breast US (probe orientation).
  # Small in-plane rotation in degrees (probe tilt); keeps depth order.
  c.rotate = ml_collections.ConfigDict(dict(probability=0.5, max_degrees=10.0))
  # Shape distortion: x and y scales differ by up to exp(stretch). 0 keeps tissue aspect.
  c.stretch = 0.0
  # Field-of-view jitter: zoom out by a factor in `zoom` with a black border, random placement.
  c.fov = ml_collections.ConfigDict(dict(probability=0.3, zoom=(0.7, 1.0)))
  # Lesion-centred view (needs the lesion mask; images without one get the random crop): the
  # crop's longer side is `ratio` (uniform) times the lesion box's longer side, clipped to the
  # image, at the image's aspect times a log-uniform `crop.aspect` draw, placed at random where
  # it still holds the whole lesion. BUS-BRA's scans are cropped around the lesion (image/lesion
  # longer-side ratio 1.7-5.0 from its 10th to 90th percentile, median 2.95); BUSI's are mostly
  # wide views (1.4-8.7). Off by default.
  c.lesion_crop = ml_collections.ConfigDict(dict(probability=0.0, ratio=(1.7, 5.0)))
  # Global intensity, as one lookup table: v -> mean + contrast * (gain * v**gamma - mean).
  c.gamma = (0.8, 1.25)  # Log-uniform; display/compression curve differences between scanners.
  c.gain = (0.8, 1.25)  # Log-uniform; overall receive gain.
  c.contrast = (0.8, 1.25)  # Log-uniform; dynamic-range setting.
  # Time-gain compensation: a depth-dependent log-gain = slope * (depth - 0.5) plus a smooth
  # wobble through `knots` random points with std `wobble`, as an operator's TGC sliders do.
  c.tgc = ml_collections.ConfigDict(dict(probability=0.5, slope=0.3, wobble=0.1, knots=4))
  # Speckle-like multiplicative noise: log-normal with mean 1 and std `sigma`, drawn on a
  # grid `correlation` times coarser than the output and upsampled bilinearly (a little spatial
  # correlation, as real speckle has).
  c.speckle = ml_collections.ConfigDict(dict(probability=0.5, sigma=0.15, correlation=2))
  # Caliper/text suppression: near-saturated (>= threshold) connected blobs that are small
  # (area <= max_area) or thin (mean thickness <= max_thickness) are replaced by the median of
  # their surroundings (within `radius` px). Off by default: see the module docstring.
  c.suppress_marks = ml_collections.ConfigDict(
    dict(probability=0.0, threshold=245, max_area=150, max_thickness=3.0, radius=4)
  )
  # Small elastic deformation (tissue compression under the probe): a smooth random
  # displacement field, `alpha` output pixels at most, through `grid` x `grid` random knots.
  # Off by default; contrastive views use it.
  c.elastic = ml_collections.ConfigDict(dict(probability=0.0, alpha=2.0, grid=4))
  # "ultrasound": the intensity model above (gamma/gain/contrast, TGC, speckle).
  # "trivial": a generic TrivialAugment-style policy instead of it (one random PIL op with a
  # random magnitude per image: Mueller & Hutter 2021), after the same geometry; the
  # comparison policy for augmentation ablations (Tupper & Gagne 2025 found generic policies
  # as good as ultrasound-specific ones on 14 tasks: measure, don't assume).
  c.policy = "ultrasound"
  return c


def uses_masks(augment_config) -> bool:
  """Whether this augmentation needs each image's lesion mask (lesion-centred crops)."""
  if augment_config is None:
    return False
  config = _merge_with_defaults(augment_config)
  return config["mode"] == "train" and config["lesion_crop"]["probability"] > 0


def _fit_matrix(width: float, height: float, size: int) -> np.ndarray:
  """Input->output affine (3x3) fitting a width x height box centred in size x size."""
  scale = size / max(width, height)
  return np.array(
    [
      [scale, 0.0, (size - width * scale) / 2],
      [0.0, scale, (size - height * scale) / 2],
      [0.0, 0.0, 1.0],
    ]
  )


def _warp(
  image: np.ndarray, forward: np.ndarray, size: int, nearest: bool, backend: str
) -> np.ndarray:
  """Applies the input->output affine `forward`; outside the input is 0."""
  inverse = np.linalg.inv(forward)
  if backend == "cv2":
    # OpenCV puts pixel centres at integers, the matrices here at i + 0.5: shift in and out.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(shift) @ inverse @ shift
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
      image, inverse[:2], (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
  # PIL wants output->input coefficients; its coordinates put pixel centres at i + 0.5, the
  # same continuous convention as the matrices built here.
  data = tuple(float(v) for v in inverse[:2].ravel())
  resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
  return np.asarray(
    Image.fromarray(image).transform(
      (size, size), Image.Transform.AFFINE, data, resample=resample, fillcolor=0
    )
  )


def _apply_lut(image: np.ndarray, lut: np.ndarray, backend: str) -> np.ndarray:
  """uint8 table lookup in C (both are faster than numpy fancy indexing)."""
  if backend == "cv2":
    return cv2.LUT(image, lut)
  return np.asarray(Image.fromarray(image).point(lut.tolist()))


def _upsample(field: np.ndarray, size: int, backend: str) -> np.ndarray:
  """Bilinear float32 resize of a square field to size x size."""
  if backend == "cv2":
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
  return np.asarray(
    Image.fromarray(field, mode="F").resize((size, size), Image.Resampling.BILINEAR)
  )


def resize_pad(image: np.ndarray, size: int, mask: np.ndarray | None = None):
  """Aspect-preserving resize into size x size, centred, zero padding (the eval geometry).

  Args:
    image: uint8 (H, W).
    size: output side.
    mask: optional uint8 (H, W) lesion mask; resized nearest-neighbour.

  Returns:
    uint8 (size, size) image, and the mask likewise when one is given.
  """
  height, width = image.shape
  scale = size / max(width, height)
  new_w = max(1, min(size, round(width * scale)))
  new_h = max(1, min(size, round(height * scale)))
  top, left = (size - new_h) // 2, (size - new_w) // 2

  def place(array, resample):
    small = np.asarray(Image.fromarray(array).resize((new_w, new_h), resample))
    canvas = np.zeros((size, size), np.uint8)
    canvas[top : top + new_h, left : left + new_w] = small
    return canvas

  # PIL's resize filters (unlike transform) antialias when shrinking: no aliasing at eval.
  out = place(image, Image.Resampling.BILINEAR)
  if mask is None:
    return out
  return out, place(mask, Image.Resampling.NEAREST)


def suppress_marks(
  image: np.ndarray,
  *,
  threshold: int = 245,
  max_area: int = 150,
  max_thickness: float = 3.0,
  radius: int = 4,
) -> np.ndarray:
  """Replaces small or thin near-saturated marks (calipers, text) by their local median.

  Args:
    image: uint8 (H, W).
    threshold: pixels >= this are candidate marks.
    max_area: blobs up to this many pixels are marks.
    max_thickness: larger blobs are marks too when area / longest bbox side <= this (lines).
    radius: the surrounding window (px) whose unmarked pixels give the fill value.

  Returns:
    A new uint8 (H, W) array (the input when nothing is found).
  """
  bright = image >= threshold
  if not bright.any():
    return image
  labels, count = ndimage.label(bright, structure=_EIGHT_CONNECTED)
  areas = np.bincount(labels.ravel(), minlength=count + 1)
  out = image.copy()
  height, width = image.shape
  for label, box in enumerate(ndimage.find_objects(labels), start=1):
    rows, cols = box
    longest = max(rows.stop - rows.start, cols.stop - cols.start)
    area = areas[label]
    if area > max_area and area > max_thickness * longest:
      continue  # Large and thick: tissue (or a bright region we must not erase).
    y0, y1 = max(rows.start - radius, 0), min(rows.stop + radius, height)
    x0, x1 = max(cols.start - radius, 0), min(cols.stop + radius, width)
    window = image[y0:y1, x0:x1]
    # One pixel of growth also takes the mark's antialiased edge.
    mark = ndimage.binary_dilation(labels[y0:y1, x0:x1] == label, _EIGHT_CONNECTED)
    surround = ~mark & (window < threshold)
    fill = np.median(window[surround]) if surround.any() else 0
    out[y0:y1, x0:x1][mark] = np.uint8(fill)
  return out


def elastic_field(size: int, alpha: float, grid: int, rng: np.random.Generator) -> np.ndarray:
  """A smooth (2, size, size) displacement field in output pixels, |d| <= alpha per axis."""
  knots = rng.uniform(-1.0, 1.0, (2, max(2, int(grid)), max(2, int(grid)))).astype(np.float32)
  return alpha * np.stack([_upsample(k, size, "pil") for k in knots])


def elastic(
  image: np.ndarray, field: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Resamples `image` (bilinear; `mask` nearest) at positions displaced by `field`."""
  size_y, size_x = image.shape
  yy, xx = np.meshgrid(np.arange(size_y), np.arange(size_x), indexing="ij")
  coords = np.stack([yy + field[0], xx + field[1]])
  out = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, cval=0.0)
  out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
  if mask is None:
    return out
  return out, ndimage.map_coordinates(mask, coords, order=0, mode="constant", cval=0)


# TrivialAugment (wide) on one grey image. Photometric ops: name -> op(PIL image, magnitude in
# [0, 1], sign). Geometric ops: name -> PIL affine coefficients (output -> input) for a size, so
# the image and its mask get the same warp; they are horizontal or small, so depth order survives
# (no vertical flip, at most 10% vertical shift).
_PHOTOMETRIC_OPS = {
  "identity": lambda im, m, s: im,
  "autocontrast": lambda im, m, s: ImageOps.autocontrast(im),
  "equalize": lambda im, m, s: ImageOps.equalize(im),
  "brightness": lambda im, m, s: ImageEnhance.Brightness(im).enhance(1.0 + s * 0.99 * m),
  "contrast": lambda im, m, s: ImageEnhance.Contrast(im).enhance(1.0 + s * 0.99 * m),
  "sharpness": lambda im, m, s: ImageEnhance.Sharpness(im).enhance(1.0 + s * 0.99 * m),
  "posterize": lambda im, m, s: ImageOps.posterize(im, 8 - int(round(6 * m))),
  "solarize": lambda im, m, s: ImageOps.solarize(im, 256 - int(round(256 * m))),
}


def _rotation(width: int, height: int, degrees: float) -> tuple[float, ...]:
  angle = math.radians(degrees)
  cos, sin = math.cos(angle), math.sin(angle)
  cx, cy = width / 2, height / 2
  # Output -> input: rotate about the centre.
  return (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


_GEOMETRIC_OPS = {
  "rotate": lambda w, h, m, s: _rotation(w, h, s * 30.0 * m),
  "shear_x": lambda w, h, m, s: (1, s * 0.3 * m, -s * 0.3 * m * h / 2, 0, 1, 0),
  "translate_x": lambda w, h, m, s: (1, 0, s * 0.3 * m * w, 0, 1, 0),
  "translate_y": lambda w, h, m, s: (1, 0, 0, 0, 1, s * 0.1 * m * h),
}
TRIVIAL_OPS = tuple(sorted((*_PHOTOMETRIC_OPS, *_GEOMETRIC_OPS)))


def trivial_augment(image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None):
  """One uniformly drawn op of `TRIVIAL_OPS` at a uniform magnitude (the mask follows geometry).

  Returns the uint8 image, and the mask too when one is given.
  """
  name = TRIVIAL_OPS[int(rng.integers(len(TRIVIAL_OPS)))]
  magnitude = float(rng.uniform())
  sign = 1.0 if rng.random() < 0.5 else -1.0
  if name in _PHOTOMETRIC_OPS:
    out = np.asarray(_PHOTOMETRIC_OPS[name](Image.fromarray(image), magnitude, sign), np.uint8)
    return out if mask is None else (out, mask)
  height, width = image.shape
  coefficients = _GEOMETRIC_OPS[name](width, height, magnitude, sign)

  def warp(array, resample):
    pil = Image.fromarray(array)
    return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, coefficients, resample))

  out = warp(image, Image.Resampling.BILINEAR)
  return out if mask is None else (out, warp(mask, Image.Resampling.NEAREST))


def _merge_with_defaults(config) -> dict:
  """The config as a plain dict, missing knobs filled from default_config(its mode).

  A config file may then set only what it changes; a misspelt knob is an error, not ignored.
  """
  given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  merged = default_config(given.get("mode", "train")).to_dict()

  def update(target: dict, source: dict, path: str) -> None:
    for key, value in source.items():
      if key not in target:
        raise ValueError(f"unknown augment option '{path}{key}'; known: {sorted(target)}")
      if isinstance(target[key], dict):
        if not isinstance(value, dict):
          raise ValueError(f"augment option '{path}{key}' must be a dict, got {value!r}")
        update(target[key], value, f"{path}{key}.")
      else:
        target[key] = value

  update(merged, given, "")
  return merged


def lesion_box(mask: np.ndarray | None) -> tuple[float, float, float, float] | None:
  """The lesion's bounding box (x0, y0, x1, y1) in pixel edges; None without a lesion."""
  if mask is None:
    return None
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return None
  return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _log_uniform(rng: np.random.Generator, bounds) -> float:
  low, high = float(bounds[0]), float(bounds[1])
  if low <= 0 or high < low:
    raise ValueError(f"log-uniform range must be 0 < low <= high, got {bounds}")
  return math.exp(rng.uniform(math.log(low), math.log(high)))


class Augmenter:
  """Random ultrasound augmentation to a fixed square size; picklable for Grain workers.

  Usage: ``Augmenter(default_config(), 224)(image, rng)`` or with ``mask=`` to get
  ``(image, mask)``. Deterministic for a given ``rng`` state.
  """

  def __init__(self, augment_config: ml_collections.ConfigDict | dict | None, image_size: int):
    """Args: augment_config: default_config()-shaped (missing knobs take the defaults of its
    mode; unknown ones raise); None means mode "none". image_size: output side."""
    config = augment_config if augment_config is not None else default_config("none")
    # Plain dict: cheap access per image, picklable for workers, no ConfigDict locking.
    self.config = _merge_with_defaults(config)
    if self.config["mode"] not in ("train", "none"):
      raise ValueError(f"augment mode must be 'train' or 'none', got {self.config['mode']!r}")
    if self.config["policy"] not in ("ultrasound", "trivial"):
      raise ValueError(
        f"augment policy must be 'ultrasound' or 'trivial', got {self.config['policy']!r}"
      )
    self.image_size = int(image_size)
    self.train = self.config["mode"] == "train"
    self._lesion_crops = self.train and self.config["lesion_crop"]["probability"] > 0
    self.backend = self.config["backend"]
    if self.backend not in ("pil", "cv2"):
      raise ValueError(f"augment backend must be 'pil' or 'cv2', got {self.backend!r}")
    if self.backend == "cv2" and cv2 is None:
      raise ValueError(
        "augment backend 'cv2' needs opencv-python-headless "
        "(pip install 'busjax[explain]'), or set backend='pil'"
      )

  def _lesion_crop(self, width: int, height: int, box, rng: np.random.Generator):
    """(crop_w, crop_h, x0, y0): a view `lesion_crop.ratio` times the lesion box (x0, y0, x1,
    y1), holding the whole lesion where the image allows."""
    c = self.config
    bx0, by0, bx1, by1 = box
    side = rng.uniform(*c["lesion_crop"]["ratio"]) * max(bx1 - bx0, by1 - by0)
    aspect = (width / height) * _log_uniform(rng, c["crop"]["aspect"])  # crop_w / crop_h
    crop_w, crop_h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    crop_w, crop_h = min(max(crop_w, bx1 - bx0), width), min(max(crop_h, by1 - by0), height)
    # Any placement inside the image that keeps the lesion box inside the crop.
    lo_x, lo_y = max(0.0, bx1 - crop_w), max(0.0, by1 - crop_h)
    x0 = rng.uniform(lo_x, max(lo_x, min(bx0, width - crop_w)))
    y0 = rng.uniform(lo_y, max(lo_y, min(by0, height - crop_h)))
    return crop_w, crop_h, x0, y0

  def _geometry(self, width: int, height: int, rng: np.random.Generator, box=None) -> np.ndarray:
    """Samples the input->output affine for one image (identity crop = resize_pad).

    `box` (x0, y0, x1, y1): the lesion's bounding box, for `lesion_crop`.
    """
    c, size = self.config, self.image_size
    # Crop box in input coordinates.
    crop_w, crop_h, x0, y0 = float(width), float(height), 0.0, 0.0
    if box is not None and rng.random() < c["lesion_crop"]["probability"]:
      crop_w, crop_h, x0, y0 = self._lesion_crop(width, height, box, rng)
    elif rng.random() < c["crop"]["probability"]:
      area = rng.uniform(*c["crop"]["scale"])
      aspect = _log_uniform(rng, c["crop"]["aspect"])
      crop_w = min(width * math.sqrt(area * aspect), float(width))
      crop_h = min(height * math.sqrt(area / aspect), float(height))
      x0 = rng.uniform(0.0, width - crop_w)
      y0 = rng.uniform(0.0, height - crop_h)
    scale = size / max(crop_w, crop_h)
    log_stretch = rng.uniform(-c["stretch"], c["stretch"]) if c["stretch"] > 0 else 0.0
    scale_x, scale_y = scale * math.exp(log_stretch / 2), scale * math.exp(-log_stretch / 2)
    offset_x = offset_y = 0.0
    if rng.random() < c["fov"]["probability"]:
      zoom = rng.uniform(*c["fov"]["zoom"])
      scale_x, scale_y = scale_x * zoom, scale_y * zoom
      # Place the shrunken view anywhere it still fits in the canvas.
      slack_x = max(size - crop_w * scale_x, 0.0) / 2
      slack_y = max(size - crop_h * scale_y, 0.0) / 2
      offset_x, offset_y = rng.uniform(-slack_x, slack_x), rng.uniform(-slack_y, slack_y)
    flip = -1.0 if rng.random() < c["hflip_probability"] else 1.0
    angle = 0.0
    if rng.random() < c["rotate"]["probability"]:
      angle = math.radians(rng.uniform(-1.0, 1.0) * c["rotate"]["max_degrees"])
    cos, sin = math.cos(angle), math.sin(angle)
    # output = T(centre + offset) . R(angle) . Flip . S(scale) . T(-crop centre)
    to_origin = np.array([[1, 0, -(x0 + crop_w / 2)], [0, 1, -(y0 + crop_h / 2)], [0, 0, 1.0]])
    scale_flip = np.diag([flip * scale_x, scale_y, 1.0])
    rotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1.0]])
    to_canvas = np.array([[1, 0, size / 2 + offset_x], [0, 1, size / 2 + offset_y], [0, 0, 1.0]])
    return to_canvas @ rotate @ scale_flip @ to_origin

  def _intensity(self, warped: np.ndarray, pivot: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma/gain/contrast as one lookup table, then optional TGC ramp and speckle.

    Args:
      warped: the geometrically augmented uint8 image, image_size square.
      pivot: mean intensity in [0, 1] that contrast scales around.
      rng: randomness.
    """
    c, size = self.config, self.image_size
    gamma = _log_uniform(rng, c["gamma"])
    gain = _log_uniform(rng, c["gain"])
    contrast = _log_uniform(rng, c["contrast"])
    levels = np.arange(256, dtype=np.float64) / 255.0
    levels = pivot + contrast * (gain * levels**gamma - pivot)
    lut = np.clip(levels * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    lut[0] = 0  # "No echo" stays black: padding and the fan's surround must not light up.
    out = _apply_lut(warped, lut, self.backend)
    use_tgc = rng.random() < c["tgc"]["probability"]
    use_speckle = rng.random() < c["speckle"]["probability"]
    if not (use_tgc or use_speckle):
      return np.array(out)  # Writable, owned by the caller.
    out = out.astype(np.float32)
    if use_speckle:
      # Log-normal with mean 1 and std sigma (close to gamma-distributed speckle), drawn coarse
      # and upsampled so neighbouring pixels correlate, as real speckle grains span pixels.
      sigma = float(c["speckle"]["sigma"])
      log_std = math.sqrt(math.log1p(sigma * sigma))
      coarse = max(2, size // max(1, int(c["speckle"]["correlation"])))
      noise = rng.standard_normal((coarse, coarse), dtype=np.float32)
      noise = np.exp(noise * np.float32(log_std) - np.float32(log_std * log_std / 2))
      out *= _upsample(noise, size, self.backend)
    if use_tgc:
      depth = np.linspace(0.0, 1.0, size)
      knots = int(c["tgc"]["knots"])
      wobble = np.interp(
        depth, np.linspace(0.0, 1.0, knots), rng.normal(0.0, c["tgc"]["wobble"], knots)
      )
      slope = rng.uniform(-c["tgc"]["slope"], c["tgc"]["slope"])
      out *= np.exp(slope * (depth - 0.5) + wobble).astype(np.float32)[:, None]
    np.clip(out, 0.0, 255.0, out=out)
    out += 0.5
    return out.astype(np.uint8)

  def __call__(self, image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None):
    """Augments one image (and its mask with the same geometry).

    Args:
      image: uint8 (H, W) grayscale, any size (best: longest side ~1.15 * image_size).
      rng: the only source of randomness.
      mask: optional uint8 (H, W) lesion mask, same shape as `image`.

    Returns:
      uint8 (image_size, image_size), plus the mask when one is given.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
      raise ValueError(f"Augmenter wants uint8 (H, W), got {image.dtype} {image.shape}")
    if mask is not None and mask.shape != image.shape:
      raise ValueError(f"mask shape {mask.shape} != image shape {image.shape}")
    size = self.image_size
    if not self.train:
      return resize_pad(image, size, mask)
    marks = self.config["suppress_marks"]
    if marks["probability"] > 0 and rng.random() < marks["probability"]:
      image = suppress_marks(
        image,
        threshold=marks["threshold"],
        max_area=marks["max_area"],
        max_thickness=marks["max_thickness"],
        radius=marks["radius"],
      )
    height, width = image.shape
    # The warp samples bilinearly without antialiasing: shrink big inputs by an integer
    # factor first (box filter) so they don't alias; the pipeline's cache makes this rare.
    factor = int(max(height, width) // (1.5 * size))
    if factor >= 2:
      image = np.asarray(Image.fromarray(image).reduce(factor))
      if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(image.shape[::-1], Image.Resampling.NEAREST))
      height, width = image.shape
    forward = self._geometry(width, height, rng, lesion_box(mask) if self._lesion_crops else None)
    warped = _warp(image, forward, size, False, self.backend)
    warped_mask = None if mask is None else np.array(_warp(mask, forward, size, True, self.backend))
    c = self.config
    if c["elastic"]["probability"] > 0 and rng.random() < c["elastic"]["probability"]:
      field = elastic_field(size, float(c["elastic"]["alpha"]), int(c["elastic"]["grid"]), rng)
      if warped_mask is None:
        warped = elastic(warped, field)
      else:
        warped, warped_mask = elastic(warped, field, warped_mask)
    if c["policy"] == "trivial":
      if warped_mask is None:
        return np.array(trivial_augment(warped, rng))
      out, warped_mask = trivial_augment(warped, rng, warped_mask)
      return np.array(out), np.array(warped_mask)
    pivot = float(image[::4, ::4].mean()) / 255.0  # A subsample is plenty for a mean.
    out = self._intensity(warped, pivot, rng)
    if warped_mask is None:
      return out
    return out, warped_mask
