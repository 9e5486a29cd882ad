"""Tests for busjax.data.augment: geometry conventions, depth order, mask alignment, intensity."""

import ml_collections
import numpy as np
import pytest

from busjax.data import augment

BACKENDS = [
  "pil",
  pytest.param("cv2", marks=pytest.mark.skipif(augment.cv2 is None, reason="no opencv")),
]


def _quiet_config(backend="pil"):
  """Train mode with every random op switched off (identity apart from the fit)."""
  c = augment.default_config("train")
  c.backend = backend
  c.crop.probability = 0.0
  c.hflip_probability = 0.0
  c.rotate.probability = 0.0
  c.fov.probability = 0.0
  c.gamma = c.gain = c.contrast = (1.0, 1.0)
  c.tgc.probability = 0.0
  c.speckle.probability = 0.0
  return c


def _depth_gradient(height=60, width=50):
  """Dark at the skin (top), bright deep down: a direction a vertical flip would invert."""
  rows = np.linspace(30, 230, height)[:, None]
  return np.repeat(rows, width, axis=1).astype(np.uint8)


def test_resize_pad_keeps_aspect_and_pads_with_zero():
  image = np.full((20, 40), 200, np.uint8)  # Wide: pads above and below.
  mask = np.zeros((20, 40), np.uint8)
  mask[5:15, 10:30] = 1
  out, out_mask = augment.resize_pad(image, 64, mask)
  assert out.shape == out_mask.shape == (64, 64) and out.dtype == np.uint8
  nonzero_rows = np.flatnonzero(out.max(axis=1))
  assert nonzero_rows[0] == 16 and nonzero_rows[-1] == 47  # 32 content rows, centred.
  assert np.all(out[:16] == 0) and np.all(out[48:] == 0)
  assert set(np.unique(out_mask)) == {0, 1}
  expected = np.zeros((64, 64), np.uint8)
  expected[16 + 8 : 16 + 24, 16:48] = 1  # Rows 5:15 and cols 10:30 scaled by 1.6, shifted 16.
  np.testing.assert_array_equal(out_mask, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quiet_train_mode_matches_resize_pad(backend):
  # Checks the affine's pixel-centre convention: a shifted warp would differ by ~1 px.
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:48, 0:40]
  image = (120 + 80 * np.sin(xx / 6.0) * np.cos(yy / 7.0)).astype(np.uint8)
  out = augment.Augmenter(_quiet_config(backend), 48)(image, rng)
  reference = augment.resize_pad(image, 48)
  assert np.abs(out.astype(int) - reference.astype(int)).mean() < 2.0


def test_none_mode_is_resize_pad():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 45), dtype=np.uint8)
  out = augment.Augmenter(augment.default_config("none"), 32)(image, rng)
  np.testing.assert_array_equal(out, augment.resize_pad(image, 32))
  np.testing.assert_array_equal(augment.Augmenter(None, 32)(image, rng), out)


def test_same_rng_same_output_different_rng_different():
  image = _depth_gradient()
  augmenter = augment.Augmenter(augment.default_config(), 32)
  a = augmenter(image, np.random.default_rng(3))
  b = augmenter(image, np.random.default_rng(3))
  c = augmenter(image, np.random.default_rng(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_order_survives_every_augmentation(backend):
  image = _depth_gradient()
  config = augment.default_config()
  config.backend = backend
  config.fov.probability = 0.5
  augmenter = augment.Augmenter(config, 48)
  rng = np.random.default_rng(0)
  for _ in range(60):
    out = augmenter(image, rng).astype(float)
    valid = out > 0
    row_means = [out[r][valid[r]].mean() for r in range(48) if valid[r].sum() > 8]
    top, bottom = np.mean(row_means[:8]), np.mean(row_means[-8:])
    assert top < bottom - 40, "deep tissue must stay at the bottom (no vertical flip)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_horizontal_flip_mirrors(backend):
  yy, xx = np.mgrid[0:40, 0:40]
  image = (20 + 5 * xx).astype(np.uint8)  # Dark left, bright right.
  config = _quiet_config(backend)
  config.hflip_probability = 1.0
  out = augment.Augmenter(config, 40)(image, np.random.default_rng(0))
  reference = augment.resize_pad(image, 40)[:, ::-1]
  assert np.abs(out.astype(int) - reference.astype(int)).mean() < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_follows_image_geometry(backend):
  image = np.full((56, 64), 30, np.uint8)
  mask = np.zeros((56, 64), np.uint8)
  mask[10:30, 35:55] = 1  # Off-centre so flips, crops and shifts all show.
  image[mask == 1] = 220
  config = augment.default_config()
  config.gamma = config.gain = config.contrast = (1.0, 1.0)
  config.tgc.probability = config.speckle.probability = 0.0
  config.fov.probability = 0.5
  config.stretch = 0.1
  config.backend = backend
  augmenter = augment.Augmenter(config, 48)
  rng = np.random.default_rng(1)
  for _ in range(30):
    out, out_mask = augmenter(image, rng, mask=mask)
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) <= {0, 1}
    bright = out > 125
    union = np.logical_or(bright, out_mask == 1).sum()
    if union == 0:
      continue  # The crop can miss the lesion entirely; then both must be empty.
    iou = np.logical_and(bright, out_mask == 1).sum() / union
    assert iou > 0.8


@pytest.mark.parametrize("backend", BACKENDS)
def test_intensity_ops_keep_black_black_and_change_levels(backend):
  image = np.full((20, 40), 100, np.uint8)  # Padded rows above and below stay "no echo".
  config = _quiet_config(backend)
  config.gamma = config.gain = config.contrast = (0.6, 1.6)
  config.tgc.probability = config.speckle.probability = 1.0
  augmenter = augment.Augmenter(config, 40)
  rng = np.random.default_rng(0)
  levels = []
  for _ in range(20):
    out = augmenter(image, rng)
    assert np.all(out[:10] == 0) and np.all(out[30:] == 0)
    levels.append(out[10:30].mean())
  assert np.std(levels) > 5  # Global intensity really jitters.


@pytest.mark.parametrize("backend", BACKENDS)
def test_speckle_is_unit_mean_multiplicative_and_correlated(backend):
  image = np.full((64, 64), 100, np.uint8)
  config = _quiet_config(backend)
  config.speckle.probability = 1.0
  config.speckle.sigma = 0.3
  out = augment.Augmenter(config, 64)(image, np.random.default_rng(0)).astype(float)
  assert abs(out.mean() - 100) < 4
  assert 8 < out.std() < 30  # Sigma 0.3, smoothed a little by the upsampling.
  centred = out - out.mean()
  neighbour_corr = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
  assert neighbour_corr > 0.3


def test_tgc_changes_brightness_with_depth():
  image = np.full((64, 64), 100, np.uint8)
  config = _quiet_config()
  config.tgc.probability = 1.0
  config.tgc.slope, config.tgc.wobble = 1.0, 0.0
  augmenter = augment.Augmenter(config, 64)
  rng = np.random.default_rng(0)
  ratios = []
  for _ in range(10):
    out = augmenter(image, rng).astype(float)
    ratios.append(out[-4:].mean() / out[:4].mean())
  assert max(ratios) > 1.3 and min(ratios) < 0.77  # Both signs of slope occur.
  assert all(abs(np.log(r)) <= 1.0 + 0.05 for r in ratios)


@pytest.mark.skipif(augment.cv2 is None, reason="no opencv")
def test_backends_agree():
  yy, xx = np.mgrid[0:70, 0:60]
  image = (120 + 80 * np.sin(xx / 5.0) * np.cos(yy / 6.0)).astype(np.uint8)
  mask = ((yy - 30) ** 2 + (xx - 35) ** 2 < 150).astype(np.uint8)
  outputs = {}
  for backend in ("pil", "cv2"):
    config = augment.default_config()
    config.backend = backend
    outputs[backend] = augment.Augmenter(config, 48)(image, np.random.default_rng(7), mask=mask)
  (pil_image, pil_mask), (cv_image, cv_mask) = outputs["pil"], outputs["cv2"]
  assert np.abs(pil_image.astype(int) - cv_image.astype(int)).mean() < 2.0
  assert (pil_mask != cv_mask).mean() < 0.01


def test_suppress_marks_removes_calipers_and_text_but_not_tissue():
  rng = np.random.default_rng(0)
  image = rng.integers(60, 120, (80, 80), dtype=np.uint8)
  image[10, 5:12] = 255  # Caliper "+".
  image[7:14, 8] = 255
  image[70:72, 10:70] = 250  # A thin text/measurement line (area 120, 2 px thick).
  image[35:55, 35:55] = 250  # A large bright region: tissue, must stay.
  out = augment.suppress_marks(image, threshold=245, max_area=60, max_thickness=3.0)
  assert out[7:14, 5:12].max() < 200 and out[70:72, 10:70].max() < 200
  assert abs(float(np.median(out[7:14, 5:12])) - 90) < 20
  np.testing.assert_array_equal(out[35:55, 35:55], image[35:55, 35:55])
  assert out is not image and image[10, 5] == 255  # Input untouched.
  quiet = rng.integers(60, 120, (20, 20), dtype=np.uint8)
  assert augment.suppress_marks(quiet) is quiet


def test_partial_config_takes_defaults():
  image = _depth_gradient()
  partial = augment.Augmenter({"hflip_probability": 0.0, "rotate": {"max_degrees": 5.0}}, 32)
  assert partial.config["crop"] == augment.default_config().crop.to_dict()
  assert partial.config["rotate"]["max_degrees"] == 5.0
  assert partial(image, np.random.default_rng(0)).shape == (32, 32)
  frozen = ml_collections.FrozenConfigDict(augment.default_config())
  assert augment.Augmenter(frozen, 32).train


def test_large_inputs_are_reduced_before_warping():
  image = _depth_gradient(600, 500)
  out = augment.Augmenter(augment.default_config(), 32)(image, np.random.default_rng(0))
  assert out.shape == (32, 32)


def test_bad_inputs_raise():
  augmenter = augment.Augmenter(augment.default_config(), 32)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="uint8"):
    augmenter(np.zeros((10, 10), np.float32), rng)
  with pytest.raises(ValueError, match="mask shape"):
    augmenter(np.zeros((10, 10), np.uint8), rng, mask=np.zeros((9, 10), np.uint8))
  bad = augment.default_config()
  bad.mode = "eval"
  with pytest.raises(ValueError, match="mode"):
    augment.Augmenter(bad, 32)
  with pytest.raises(ValueError, match="unknown augment option 'crop.scal'"):
    augment.Augmenter({"crop": {"scal": (0.5, 1.0)}}, 32)
  bad = augment.default_config()
  bad.backend = "skimage"
  with pytest.raises(ValueError, match="backend"):
    augment.Augmenter(bad, 32)


def test_lesion_crop_zooms_on_the_whole_lesion():
  rng = np.random.default_rng(0)
  image = rng.integers(40, 200, (200, 300), dtype=np.uint8)
  mask = np.zeros_like(image)
  mask[140:160, 40:60] = 1  # A 20 px lesion in a 300 px wide view.
  config = _quiet_config()
  config.lesion_crop.probability = 1.0
  augmenter = augment.Augmenter(config, 64)
  assert augment.uses_masks(config) and not augment.uses_masks(_quiet_config())
  assert not augment.uses_masks(augment.default_config("none"))
  _, plain = augment.resize_pad(image, 64, mask)
  sides = []
  for _ in range(30):
    _, out = augmenter(image, rng, mask=mask)
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert abs(height - width) <= 2  # Square stays square: the lesion is never cut.
    sides.append(max(height, width))
  # The crop's longer side is 1.7-5x the lesion's and fills the 64 px output.
  assert 64 / 5 - 2 <= min(sides) and max(sides) <= 64 / 1.7 + 2
  assert np.median(sides) > 2 * plain.any(0).sum()  # Zoomed in against the whole view.
  # No lesion (or no mask given): the ordinary random view, no error.
  assert augmenter(image, rng, mask=np.zeros_like(mask))[0].shape == (64, 64)
  assert augmenter(image, rng).shape == (64, 64)
