"""Tests of paired ultrasound + mammography data (phantom, manifest, patient splits)."""

import numpy as np
import pytest
from PIL import Image

from busjax.data import mammo_phantom, paired, records, splits


def test_paired_phantom_gives_both_modalities_per_patient_with_one_label():
  data = mammo_phantom.make_paired(counts=(6, 4), image_size=64, seed=3)
  ids, labels = data.patients()
  assert len(ids) == 10 and labels.tolist().count(1) == 4
  assert data.synthetic
  label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
  for collection, modality in ((data.us, "us"), (data.mammo, "mammo")):
    assert {r.patient_id for r in collection.records} == set(label_of)
    for r in collection.records:
      assert r.label == label_of[r.patient_id] and r.meta["modality"] == modality
      assert r.image.shape == r.mask.shape == (64, 64) and r.image.dtype == np.uint8
  # Every patient has a CC and an MLO view with the mass inside the breast.
  views = {}
  for r in data.mammo.records:
    views.setdefault(r.patient_id, []).append(r.meta["view"])
    assert r.mask.sum() > 0 and (r.image[r.mask > 0] > 0).all()
  assert all(sorted(v) == ["CC", "MLO"] for v in views.values())
  again = mammo_phantom.make_paired(counts=(6, 4), image_size=64, seed=3)
  assert all(
    np.array_equal(a.image, b.image)
    for a, b in zip(data.mammo.records, again.mammo.records, strict=True)
  )


def test_the_shared_knob_decides_how_often_mammography_repeats_the_ultrasound_lesion():
  def agreement(shared):
    data = mammo_phantom.make_paired(counts=(40, 40), image_size=64, seed=0, shared=shared,
                                     us_images_per_patient=1)  # fmt: skip
    us_shape = {r.patient_id: r.meta["shape"] for r in data.us.records}
    cc = [r for r in data.mammo.records if r.meta["view"] == "CC"]
    copied = np.mean(["shape" in r.meta["copied_from_us"] for r in cc])
    same = np.mean([r.meta["shape"] == us_shape[r.patient_id] for r in cc])
    return copied, same

  copied1, same1 = agreement(1.0)
  copied0, same0 = agreement(0.0)
  assert copied1 == 1.0 and same1 == 1.0
  assert copied0 == 0.0 and same0 < 0.8  # Independent draws given the label often differ.
  with pytest.raises(ValueError, match="shared"):
    mammo_phantom.make_paired(counts=(2, 2), shared=1.5)


def _write_manifest(tmp_path, rows, header="patient_id,us_path,mammo_path,label,split"):
  rng = np.random.default_rng(0)
  for name in {p for row in rows for p in row[1:3] if p}:
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(tmp_path / name)
  path = tmp_path / "pairs.csv"
  path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
  return str(path)


def test_manifest_reads_views_of_both_modalities(tmp_path):
  path = _write_manifest(
    tmp_path,
    [
      ("p1", "u1.png", "m1.png", "malignant", "train"),
      ("p1", "", "m1b.png", "malignant", "train"),
      ("p2", "u2.png", "m2.png", "0", "test"),
    ],
  )
  data = paired.manifest(path)
  assert len(data.us) == 2 and len(data.mammo) == 3
  ids, labels = data.patients()
  assert ids.tolist() == ["p1", "p2"] and labels.tolist() == [1, 0]
  parts = splits.make_splits(
    paired.patient_collection(data), {"kind": "predefined", "near_duplicates": False}
  )
  assert [r.patient_id for r in paired.images_of(parts["test"], "us").records] == ["p2"]
  assert {r.patient_id for r in paired.images_of(parts["train"], "mammo").records} == {"p1"}


def test_manifest_missing_partner_is_an_error_or_a_counted_drop(tmp_path, caplog):
  rows = [("p1", "u1.png", "m1.png", "1", ""), ("p2", "u2.png", "", "0", ""),
          ("p3", "u3.png", "m3.png", "0", "")]  # fmt: skip
  path = _write_manifest(tmp_path, rows)
  with pytest.raises(records.DataError, match="p2 has no mammography image"):
    paired.manifest(path)
  data = paired.manifest(path, missing_partner="drop")
  assert data.patients()[0].tolist() == ["p1", "p3"]
  assert "dropped 1 of 3 patients" in caplog.text


def test_manifest_names_lines_that_disagree_or_are_broken(tmp_path):
  rows = [("p1", "u1.png", "m1.png", "1", "train"), ("p1", "", "m1b.png", "0", "train"),
          ("p2", "u2.png", "m2.png", "normal", ""), ("p3", "", "", "0", "")]  # fmt: skip
  path = _write_manifest(tmp_path, rows)
  with pytest.raises(records.DataError) as error:
    paired.manifest(path)
  message = str(error.value)
  assert "\n" not in message
  assert "line 3: patient 'p1' has label 0" in message and "on line 2" in message
  assert "line 4: label 'normal' is not benign/malignant" in message
  assert "line 5: neither us_path nor mammo_path" in message
  rows = [("p1", "u1.png", "m1.png", "1", ""), ("p2", "u2.png", "m2.png", "0", "")]
  good = _write_manifest(tmp_path, rows)
  (tmp_path / "m2.png").unlink()
  with pytest.raises(records.DataError, match="mammo image .*m2.png not found"):
    paired.manifest(good)


def test_patient_splits_keep_both_modalities_together():
  data = mammo_phantom.make_paired(counts=(30, 20), image_size=64, seed=1)
  config = {"kind": "kfold", "k": 5, "val_fraction": 0.2, "seed": 0, "near_duplicates": False}
  parts = splits.make_splits(paired.patient_collection(data), config, fold=2)
  seen = set()
  for part in parts.values():
    us_ids = {r.patient_id for r in paired.images_of(part, "us").records}
    assert us_ids == {r.patient_id for r in paired.images_of(part, "mammo").records}
    assert not us_ids & seen
    seen |= us_ids
  assert len(seen) == 50


def test_grid_of_paired_phantoms_is_written(tmp_path):
  path = tmp_path / "grid.png"
  mammo_phantom.save_grid(str(path), per_class=1, image_size=64, shared=0.2)
  image = Image.open(path)
  assert image.size[0] > 300 and image.size[1] > 100
