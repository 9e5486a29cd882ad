"""Tests for busjax.data.phantom: determinism, contract, lexicon behaviour and the knobs."""

import numpy as np
import pytest

from busjax.data import phantom, records


def _by_label(coll, label):
  return [r for r in coll.records if r.label == label]


@pytest.fixture(scope="module")
def small():
  return phantom.make_collection(counts=(6, 5, 4), image_size=64, seed=3)


def test_same_seed_same_arrays_and_other_seed_differs(small):
  again = phantom.make_collection(counts=(6, 5, 4), image_size=64, seed=3)
  assert [r.id for r in again.records] == [r.id for r in small.records]
  for a, b in zip(small.records, again.records, strict=True):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.meta == b.meta
  # Each (class, patient) has its own stream: fewer malignant images leave benign ones unchanged.
  fewer = phantom.make_collection(counts=(6, 2, 4), image_size=64, seed=3)
  for a, b in zip(_by_label(small, 0), _by_label(fewer, 0), strict=True):
    np.testing.assert_array_equal(a.image, b.image)
  other = phantom.make_collection(counts=(6, 5, 4), image_size=64, seed=4)
  assert not np.array_equal(other.records[0].image, small.records[0].image)


def test_contract_shapes_dtypes_and_counts(small):
  assert small.synthetic and small.class_names == records.THREE_CLASSES
  assert np.bincount(small.labels).tolist() == [6, 5, 4]
  for rec in small.records:
    assert rec.image.dtype == np.uint8 and rec.image.shape == (64, 64)
    assert rec.mask.dtype == np.uint8 and rec.mask.shape == (64, 64)
    assert set(np.unique(rec.mask).tolist()) <= {0, 1}
    assert records.load_image(rec).shape == (64, 64)
    assert records.load_mask(rec, (64, 64)).shape == (64, 64)
    assert rec.image.std() > 10  # speckled tissue, not a flat field
    for key in (
      "shape",
      "margin",
      "orientation",
      "echo",
      "posterior",
      "halo",
      "calipers",
      "birads",
    ):
      assert key in rec.meta


def test_masks_nonempty_for_lesions_and_empty_for_normal(small):
  for rec in small.records:
    if rec.label == 2:
      assert rec.mask.sum() == 0 and rec.meta["shape"] == "none" and rec.meta["birads"] == "1"
    else:
      assert rec.mask.sum() > 4
      # Lesions sit below the skin and the lesion is darker than its surroundings on average.
      assert not rec.mask[:3].any()
      assert rec.image[rec.mask == 1].mean() < rec.image[rec.mask == 0].mean()


def test_sector_masks_lie_inside_the_fan():
  coll = phantom.make_collection(counts=(4, 4, 2), image_size=64, seed=1, field_of_view="sector")
  ones = np.ones((128, 128), np.float32)
  fan, _ = phantom._scan_convert(ones, ones)
  fan = fan.reshape(64, 2, 64, 2).mean(axis=(1, 3)) > 0.99
  for rec in coll.records:
    assert rec.meta["field_of_view"] == "sector"
    assert rec.image[0, 0] == 0 and rec.image[0, -1] == 0  # black outside the fan
    assert not (rec.mask.astype(bool) & ~fan).any()


def test_malignant_lesions_look_more_suspicious():
  coll = phantom.make_collection(
    counts=(60, 60),
    include_normal=False,
    image_size=64,
    seed=0,
    difficulty=0.0,
    images_per_patient=1,
  )
  assert coll.class_names == records.BINARY_CLASSES
  benign, malignant = _by_label(coll, 0), _by_label(coll, 1)

  def rate(recs, fn):
    return np.mean([fn(r) for r in recs])

  # Measured from the mask, not just from the sampled label of the feature.
  assert (
    rate(malignant, lambda r: r.meta["taller_than_wide"])
    > rate(benign, lambda r: r.meta["taller_than_wide"]) + 0.2
  )
  assert (
    rate(malignant, lambda r: r.meta["posterior"] == "shadowing")
    > rate(benign, lambda r: r.meta["posterior"] == "shadowing") + 0.2
  )
  assert rate(malignant, lambda r: r.meta["suspicion"]) > rate(
    benign, lambda r: r.meta["suspicion"]
  )
  # Overlap: some benign lesions are irregular, some cancers oval.
  assert rate(benign, lambda r: r.meta["shape"] == "irregular") > 0
  assert rate(malignant, lambda r: r.meta["shape"] == "oval") > 0


def test_difficulty_moves_class_distributions_together():
  for feature in phantom.LEXICON:
    gaps = [
      np.abs(
        phantom.class_probabilities(feature, 1, d) - phantom.class_probabilities(feature, 0, d)
      ).sum()
      for d in (0.0, 0.35, 0.7, 1.0)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-12
  hard = phantom.make_collection(
    counts=(60, 60),
    include_normal=False,
    image_size=64,
    seed=0,
    difficulty=1.0,
    images_per_patient=1,
  )
  benign, malignant = _by_label(hard, 0), _by_label(hard, 1)
  gap = abs(
    np.mean([r.meta["shape"] == "irregular" for r in malignant])
    - np.mean([r.meta["shape"] == "irregular" for r in benign])
  )
  assert gap < 0.25  # at difficulty 0 the expected gap is 0.70


def test_audit_lexicon_separates_and_histogram_is_weaker():
  coll = phantom.make_collection(
    counts=(50, 50),
    include_normal=False,
    image_size=64,
    seed=2,
    difficulty=0.0,
    images_per_patient=1,
  )
  result = phantom.audit(coll, folds=4)
  assert result["lexicon_auc"] > 0.85
  assert result["histogram_auc"] < result["lexicon_auc"]


def test_patients_group_views_of_the_same_lesion():
  coll = phantom.make_collection(counts=(6, 6, 4), image_size=64, seed=5, images_per_patient=2)
  by_patient = {}
  for rec in coll.records:
    by_patient.setdefault(rec.patient_id, []).append(rec)
  assert len(by_patient) == 8
  for views in by_patient.values():
    assert len(views) == 2 and len({r.label for r in views}) == 1
    assert views[0].meta["shape"] == views[1].meta["shape"]
    assert views[0].meta["margin"] == views[1].meta["margin"]
    assert not np.array_equal(views[0].image, views[1].image)  # new probe position and speckle
  ranged = phantom.make_collection(counts=(20, 0, 0), image_size=64, images_per_patient=(1, 3))
  sizes = np.unique(ranged.patient_ids, return_counts=True)[1]
  assert sizes.max() <= 3 and len(sizes) < 20 and sizes.sum() == 20


def test_calipers_knob_adds_bright_marks_per_class():
  plain = phantom.make_collection(counts=(3, 3, 3), image_size=64, seed=7, images_per_patient=1)
  marked = phantom.make_collection(
    counts=(3, 3, 3),
    image_size=64,
    seed=7,
    images_per_patient=1,
    calipers={"malignant": 1.0, "normal": 1.0},
  )
  for a, b in zip(plain.records, marked.records, strict=True):
    assert b.meta["calipers"] == (b.label != 0)
    if b.label == 0:
      np.testing.assert_array_equal(a.image, b.image)
    else:
      assert (b.image >= 235).sum() > (a.image >= 235).sum() + 10
  all_marked = phantom.make_collection(counts=(2, 2, 0), image_size=64, calipers=1.0)
  assert all(r.meta["calipers"] for r in all_marked.records)


@pytest.mark.parametrize("size", [64, 256])
def test_generate_image_sizes(size):
  for label in (0, 1, 2):
    image, mask, feats = phantom.generate_image(
      np.random.default_rng(label), label, image_size=size
    )
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == mask.dtype == np.uint8
    assert (mask.sum() > 0) == (label != 2)
    assert (feats["lesion_width_px"] > 0) == (label != 2)


def test_scanner_gain_shifts_brightness():
  dark = phantom.make_collection(counts=(3, 0, 0), image_size=64, gain_db=-8.0)
  bright = phantom.make_collection(counts=(3, 0, 0), image_size=64, gain_db=8.0)
  for a, b in zip(dark.records, bright.records, strict=True):
    assert b.image.mean() > a.image.mean() + 20
    assert a.meta["gain_db"] == -8.0


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="image_size"):
    phantom.make_collection(counts=(1, 1, 1), image_size=32)
  with pytest.raises(TypeError, match="unknown scanner"):
    phantom.make_collection(counts=(1, 1, 1), image_size=64, gian_db=3)
  with pytest.raises(ValueError, match="calipers"):
    phantom.make_collection(counts=(1, 1, 1), image_size=64, calipers={"cancer": 1.0})
  with pytest.raises(ValueError, match="difficulty"):
    phantom.make_collection(counts=(1, 1, 1), image_size=64, difficulty=1.5)
  with pytest.raises(ValueError, match="field_of_view"):
    phantom.make_collection(counts=(1, 1, 1), image_size=64, field_of_view="convex")
  with pytest.raises(ValueError, match="label"):
    phantom.generate_image(np.random.default_rng(0), 3)


def test_grid_png_is_written_and_small(tmp_path):
  path = tmp_path / "grid.png"
  phantom.main([f"--out={path}", "--image_size=64", "--per_class=2"])
  assert 0 < path.stat().st_size < 400_000
