"""Tests for busjax.data.sources on tiny generated BUSI / BUS-BRA / BreastMNIST / CSV data.

Tests on the real shared data run only where /work/shared/data exists; every behaviour is also
covered by the generated data, so the suite passes without it.
"""

import logging
import os
import re
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

import busjax.data
from busjax.data import records, sources

SHARED = "/work/shared/data"
H, W = 32, 40


def _gray(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def _mask(y0: int, x0: int, h: int = 8, w: int = 8, shape=(H, W)) -> np.ndarray:
  m = np.zeros(shape, np.uint8)
  m[y0 : y0 + h, x0 : x0 + w] = 255
  return m


def _save(path, array, mode=None) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
  return str(path)


def make_busi(root, *, benign=3, malignant=2, normal=2) -> str:
  """A BUSI-like tree; 'benign (2)' has two masks whose union is the lesion."""
  root = str(root)
  for cls, n in (("benign", benign), ("malignant", malignant), ("normal", normal)):
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(1, n + 1):
      stem = os.path.join(root, cls, f"{cls} ({i})")
      _save(stem + ".png", _gray(100 * len(cls) + i))
      _save(stem + "_mask.png", _mask(2, 2) if cls != "normal" else np.zeros((H, W), np.uint8))
  if benign >= 2:
    _save(os.path.join(root, "benign", "benign (2)_mask_1.png"), _mask(20, 20))
  return root


def _truncate(path) -> None:
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------
# BUSI.
# ----------------------------------------------------------------------------------------------


def test_busi_binary_labels_order_and_mask_union(tmp_path):
  root = make_busi(tmp_path / "busi", benign=10)
  collection = sources.busi(root)
  assert collection.class_names == records.BINARY_CLASSES
  assert collection.describe()["per_class"] == {"benign": 10, "malignant": 2}
  ids = [r.id for r in collection.records]
  assert ids.index("benign/benign (2).png") < ids.index("benign/benign (10).png")  # natural order
  assert len(set(collection.patient_ids.tolist())) == len(collection)
  assert all(r.label == 1 for r in collection.records if r.id.startswith("malignant/"))
  by_id = {r.id: r for r in collection.records}
  union = by_id["benign/benign (2).png"]
  assert isinstance(union.mask, np.ndarray) and union.mask.dtype == np.uint8
  expected = ((_mask(2, 2) > 0) | (_mask(20, 20) > 0)).astype(np.uint8)
  np.testing.assert_array_equal(records.load_mask(union, (H, W)), expected)
  single = by_id["benign/benign (1).png"]
  assert isinstance(single.mask, str) and single.mask.endswith("benign (1)_mask.png")
  assert records.load_mask(single, (H, W)).sum() == 64
  assert single.meta["height"] == H and single.meta["width"] == W


def test_busi_three_classes_keeps_normal_as_2(tmp_path):
  collection = sources.busi(make_busi(tmp_path / "busi"), classes="three")
  assert collection.class_names == records.THREE_CLASSES
  assert collection.describe()["per_class"] == {"benign": 3, "malignant": 2, "normal": 2}
  normal = [r for r in collection.records if r.label == 2]
  assert all(r.id.startswith("normal/") for r in normal)
  assert all(records.load_mask(r).sum() == 0 for r in normal)


@pytest.mark.parametrize(
  "classes, per_class, labels",
  [
    ("binary", {"benign": 3, "malignant": 2}, {"benign": 0, "malignant": 1}),
    (
      "three",
      {"benign": 3, "malignant": 2, "normal": 2},
      {"benign": 0, "malignant": 1, "normal": 2},
    ),
    (
      "malignant_vs_rest",
      {"benign or normal": 5, "malignant": 2},
      {"benign": 0, "malignant": 1, "normal": 0},
    ),
  ],
)
def test_busi_tasks_counts_and_labels(tmp_path, classes, per_class, labels):
  collection = sources.busi(make_busi(tmp_path / "busi"), classes=classes)
  assert collection.describe()["per_class"] == per_class
  assert {r.id.split("/")[0]: r.label for r in collection.records} == labels
  if classes == "malignant_vs_rest":
    assert collection.class_names == sources.MALIGNANT_VS_REST_CLASSES
    assert all(r.meta["original_class"] == r.id.split("/")[0] for r in collection.records)


def test_busi_converts_rgba_16bit_palette_images(tmp_path):
  root = make_busi(tmp_path / "busi")
  folder = os.path.join(root, "benign")
  ramp16 = (np.arange(H * W).reshape(H, W) * 40).astype(np.uint16)
  _save(os.path.join(folder, "benign (1).png"), ramp16)
  rgba = np.zeros((H, W, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = 200, 255
  rgba[:, : W // 2, 3] = 0  # transparent half -> black
  _save(os.path.join(folder, "benign (2).png"), rgba, "RGBA")
  Image.fromarray(_gray(7)).convert("P").save(os.path.join(folder, "benign (3).png"))
  assert Image.open(os.path.join(folder, "benign (1).png")).mode.startswith("I")
  by_id = {r.id: r for r in sources.busi(root).records}
  img16 = records.load_image(by_id["benign/benign (1).png"])
  assert img16.dtype == np.uint8 and img16.min() == 0 and img16.max() == 255
  assert np.all(np.diff(img16.astype(int).ravel()) >= 0)  # the ramp's order survives rescaling
  img_rgba = records.load_image(by_id["benign/benign (2).png"])
  assert img_rgba.shape == (H, W) and img_rgba[:, 0].max() == 0 and img_rgba[:, -1].min() == 200
  assert by_id["benign/benign (3).png"].meta["mode"] == "P"
  assert records.load_image(by_id["benign/benign (3).png"]).shape == (H, W)


def test_busi_truncated_image_raises_or_skips_with_count(tmp_path, caplog):
  root = make_busi(tmp_path / "busi")
  bad = os.path.join(root, "malignant", "malignant (2).png")
  _truncate(bad)
  with pytest.raises(records.DataError, match=r"malignant \(2\)\.png: corrupt or truncated"):
    sources.busi(root)
  with caplog.at_level(logging.WARNING):
    collection = sources.busi(root, on_error="skip")
  assert len(collection) == 4
  assert "skipped 1 of 5 images" in caplog.text and "malignant (2).png" in caplog.text


def test_busi_wrong_size_mask_names_the_mask(tmp_path):
  root = make_busi(tmp_path / "busi")
  _save(os.path.join(root, "benign", "benign (3)_mask.png"), _mask(0, 0, shape=(H + 1, W)))
  with pytest.raises(records.DataError, match=r"benign \(3\)_mask\.png: mask is 40x33 but"):
    sources.busi(root)


def test_busi_structural_errors(tmp_path):
  with pytest.raises(records.DataError, match="BUSI folder not found"):
    sources.busi(str(tmp_path / "nowhere"))
  root = make_busi(tmp_path / "busi", normal=0)
  os.rmdir(os.path.join(root, "normal"))
  sources.busi(root)  # binary does not need normal/
  with pytest.raises(records.DataError, match="'normal' folder not found"):
    sources.busi(root, classes="three")
  # A class whose only image is unreadable is empty after skipping: always an error.
  root2 = make_busi(tmp_path / "busi2", malignant=1)
  _truncate(os.path.join(root2, "malignant", "malignant (1).png"))
  with pytest.raises(records.DataError, match="no usable images of class 'malignant'"):
    sources.busi(root2, on_error="skip")
  with pytest.raises(ValueError, match="on_error"):
    sources.busi(root2, on_error="ignore")


def test_busi_orphan_mask_is_reported(tmp_path):
  root = make_busi(tmp_path / "busi")
  os.remove(os.path.join(root, "benign", "benign (3).png"))
  with pytest.raises(records.DataError, match=r"mask without an image benign \(3\)"):
    sources.busi(root)
  assert len(sources.busi(root, on_error="skip")) == 4


def test_busi_lists_images_orphan_masks_and_split_rows_together(tmp_path):
  root = make_busi(tmp_path / "busi")
  _truncate(os.path.join(root, "benign", "benign (1).png"))
  os.remove(os.path.join(root, "normal", "normal (2).png"))
  tsv = _write_split_file(
    tmp_path / "split.tsv",
    [
      ("malignant/malignant (1).png", "train", "x", 0),
      ("malignant/malignant (2).png", "val", 1, 0),
    ],
  )
  with pytest.raises(records.DataError) as raised:
    sources.busi(root, classes="three", split_file=tsv)
  message = str(raised.value)
  assert message.startswith(f"3 bad files in BUSI folder {root}: ")
  assert re.search(r"benign \(1\)\.png: corrupt or truncated", message)
  assert "mask without an image normal (2).png" in message
  assert "split.tsv line 2: medmnist_index and breastmnist_label must be integers" in message
  collection = sources.busi(root, classes="three", split_file=tsv, on_error="skip")
  assert collection.describe()["per_class"] == {"benign": 2, "malignant": 1, "normal": 1}


def _write_split_file(path, rows):
  with open(path, "w") as f:
    f.write(
      "busi_name\tmedmnist_split\tmedmnist_index\tbreastmnist_label(0=malignant,1=normal/benign)\n"
    )
    for row in rows:
      f.write("\t".join(str(x) for x in row) + "\n")
  return str(path)


def test_busi_split_file_meta_and_inverted_label_check(tmp_path):
  root = make_busi(tmp_path / "busi", benign=2, malignant=1, normal=1)
  rows = [
    ("benign/benign (1).png", "train", 5, 1),
    ("benign/benign (2).png", "val", 6, 1),
    ("malignant/malignant (1).png", "train", 7, 0),
    ("normal/normal (1).png", "train", 8, 1),
  ]
  tsv = _write_split_file(tmp_path / "split.tsv", rows)
  collection = sources.busi(root, classes="three", split_file=tsv)
  meta = {r.id: r.meta for r in collection.records}
  assert meta["benign/benign (2).png"]["split"] == "val"
  assert meta["malignant/malignant (1).png"]["medmnist_index"] == 7
  # A malignant image carrying BreastMNIST label 1 (benign/normal) contradicts its folder.
  rows[2] = ("malignant/malignant (1).png", "train", 7, 1)
  bad = _write_split_file(tmp_path / "bad.tsv", rows)
  with pytest.raises(records.DataError, match=r"bad\.tsv line 4: malignant/malignant \(1\)"):
    sources.busi(root, split_file=bad)
  rows[2] = ("malignant/malignant (1).png", "holdout", 7, 0)
  with pytest.raises(records.DataError, match="line 4: medmnist_split 'holdout'"):
    sources.busi(root, split_file=_write_split_file(tmp_path / "bad2.tsv", rows))


# ----------------------------------------------------------------------------------------------
# BUS-BRA.
# ----------------------------------------------------------------------------------------------


def make_busbra(root, pathologies=("benign", "malignant", "benign", "malignant")) -> str:
  root = str(root)
  lines = ["ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"]
  fold5, fold10 = ["ID,Pathology,kFold,valid_1"], ["ID,Pathology,kFold,valid_1"]
  for i, pathology in enumerate(pathologies):
    image_id = f"bus_{i // 2 + 1:04d}-{'lr'[i % 2]}"
    _save(os.path.join(root, "Images", f"{image_id}.png"), _gray(i))
    _save(os.path.join(root, "Masks", f"{image_id.replace('bus_', 'mask_')}.png"), _mask(4, 4))
    lines.append(
      f"{image_id},{i // 2 + 1},fibroadenoma,{pathology},{3 + i % 3},GE Logiq 7,"
      f'{W},{H},left,"[1,2,3,4]"'
    )
    fold5.append(f"{image_id},{pathology},{i % 2 + 1},1")
    fold10.append(f"{image_id},{pathology},{i + 1},NaN")
  for name, content in (
    ("bus_data.csv", lines),
    ("5-fold-cv.csv", fold5),
    ("10-fold-cv.csv", fold10),
  ):
    with open(os.path.join(root, name), "w") as f:
      f.write("\n".join(content) + "\n")
  return root


def test_busbra_patients_meta_and_folds(tmp_path):
  collection = sources.busbra(make_busbra(tmp_path / "bra"))
  assert collection.labels.tolist() == [0, 1, 0, 1]
  assert collection.patient_ids.tolist() == ["1", "1", "2", "2"]
  first = collection.records[0]
  assert first.id == "bus_0001-l" and first.meta["birads"] == 3
  assert first.meta["device"] == "GE Logiq 7"
  assert [r.meta["fold5"] for r in collection.records] == [1, 2, 1, 2]
  assert [r.meta["fold10"] for r in collection.records] == [1, 2, 3, 4]
  assert records.load_mask(first, (H, W)).sum() == 64


def test_busbra_errors_name_csv_line_or_file(tmp_path):
  root = make_busbra(tmp_path / "bra", pathologies=("benign", "malignant", "unsure", "benign"))
  with pytest.raises(records.DataError, match=r"bus_data\.csv line 4: unknown Pathology 'unsure'"):
    sources.busbra(root)
  assert len(sources.busbra(root, on_error="skip")) == 3
  root2 = make_busbra(tmp_path / "bra2")
  os.remove(os.path.join(root2, "Masks", "mask_0002-l.png"))
  with pytest.raises(records.DataError, match=r"mask_0002-l\.png: mask file not found"):
    sources.busbra(root2)
  os.rename(os.path.join(root2, "Images"), os.path.join(root2, "Imgs"))
  with pytest.raises(records.DataError, match="BUS-BRA Images folder not found"):
    sources.busbra(root2)


def test_busbra_csv_and_fold_problems_are_listed_together(tmp_path):
  root = make_busbra(
    tmp_path / "bra", pathologies=("benign", "malignant", "unsure", "benign", "malignant", "benign")
  )
  folds = os.path.join(root, "5-fold-cv.csv")
  with open(folds) as f:
    text = f.read()
  with open(folds, "w") as f:
    f.write(text.replace("bus_0002-r,benign,2,", "bus_0002-r,benign,two,"))
  os.remove(os.path.join(root, "Masks", "mask_0001-l.png"))
  with pytest.raises(records.DataError) as raised:
    sources.busbra(root)
  message = str(raised.value)
  assert message.startswith(f"3 bad files in BUS-BRA folder {root}: ")
  assert "mask_0001-l.png: mask file not found" in message
  assert "line 4: unknown Pathology 'unsure'" in message
  assert "5-fold-cv.csv line 5: kFold 'two' is not an integer" in message
  assert [r.id for r in sources.busbra(root, on_error="skip").records] == [
    "bus_0001-r",
    "bus_0003-l",
    "bus_0003-r",
  ]


def test_busbra_metadata_size_mismatch_warns_but_keeps(tmp_path, caplog):
  root = make_busbra(tmp_path / "bra")
  _save(os.path.join(root, "Images", "bus_0001-r.png"), _gray(1)[:30])
  _save(os.path.join(root, "Masks", "mask_0001-r.png"), _mask(1, 1)[:30])
  with caplog.at_level(logging.WARNING):
    collection = sources.busbra(root)
  assert len(collection) == 4 and "bus_data.csv line 3 says 40x32" in caplog.text


# ----------------------------------------------------------------------------------------------
# BreastMNIST.
# ----------------------------------------------------------------------------------------------


def make_breastmnist(path, size=28) -> str:
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 6), ("val", 2), ("test", 3)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
  np.savez(path, **arrays)
  return str(path)


def test_breastmnist_flips_labels_and_keeps_splits(tmp_path):
  path = make_breastmnist(tmp_path / "breastmnist.npz")
  collection = sources.breastmnist(path)
  assert len(collection) == 11
  with np.load(path) as npz:
    raw = npz["train_labels"].ravel()
    np.testing.assert_array_equal(collection.records[1].image, npz["train_images"][1])
  train = [r for r in collection.records if r.meta["split"] == "train"]
  assert [r.label for r in train] == (1 - raw).tolist()  # 0 = malignant in MedMNIST
  assert {r.meta["split"] for r in collection.records} == {"train", "val", "test"}
  assert records.load_image(collection.records[0]).shape == (28, 28)


def test_breastmnist_errors(tmp_path):
  path = tmp_path / "b.npz"
  np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
  with pytest.raises(records.DataError, match="missing array 'val_images'"):
    sources.breastmnist(str(path))
  pickled = tmp_path / "p.npz"
  np.savez(pickled, train_images=np.array([{"a": 1}], dtype=object))
  with pytest.raises(records.DataError, match="not a readable numeric .npz"):
    sources.breastmnist(str(pickled))
  good = make_breastmnist(tmp_path / "g.npz")
  with np.load(good) as npz:
    arrays = dict(npz)
  arrays["test_labels"][0] = 7
  np.savez(tmp_path / "bad_label.npz", **arrays)
  with pytest.raises(records.DataError, match=r"test_labels\[0\] = 7"):
    sources.breastmnist(str(tmp_path / "bad_label.npz"))
  assert len(sources.breastmnist(str(tmp_path / "bad_label.npz"), on_error="skip")) == 10


# ----------------------------------------------------------------------------------------------
# CSV manifest.
# ----------------------------------------------------------------------------------------------


def make_manifest(tmp_path, rows, header="path,label,patient_id,mask,split") -> str:
  for i in range(4):
    _save(tmp_path / "img" / f"{i}.png", _gray(i))
    _save(tmp_path / "img" / f"{i}_m.png", _mask(i, i))
  path = tmp_path / "manifest.csv"
  path.write_text(header + "\n" + "\n".join(rows) + "\n")
  return str(path)


def test_csv_manifest_labels_names_and_numbers(tmp_path):
  path = make_manifest(
    tmp_path,
    [
      "img/0.png,benign,p1,img/0_m.png,train",
      "img/1.png,1,p1,,test",
      "img/2.png,MALIGNANT,p2,,train",
    ],
  )
  collection = sources.csv_manifest(path)
  assert collection.class_names == records.BINARY_CLASSES
  assert collection.labels.tolist() == [0, 1, 1]
  assert collection.patient_ids.tolist() == ["p1", "p1", "p2"]
  assert collection.records[0].mask.endswith("0_m.png") and collection.records[1].mask is None
  assert collection.records[1].meta["split"] == "test"
  assert os.path.isabs(collection.records[0].image)


def test_csv_manifest_normal_makes_three_classes(tmp_path):
  path = make_manifest(
    tmp_path, ["img/0.png,0", "img/1.png,1", "img/2.png,normal"], header="path,label"
  )
  collection = sources.csv_manifest(path)
  assert collection.class_names == records.THREE_CLASSES
  assert collection.patient_ids.tolist() == ["img/0.png", "img/1.png", "img/2.png"]


@pytest.mark.parametrize(
  "bad_row, message",
  [
    ("img/2.png,maybe", r"manifest\.csv line 3: unknown label 'maybe'"),
    ("img/9.png,0", r"manifest\.csv line 3: image file .*9\.png not found"),
    ("img/0.png,0", r"0\.png: duplicate path"),
  ],
)
def test_csv_manifest_bad_rows_name_line(tmp_path, bad_row, message):
  path = make_manifest(tmp_path, ["img/0.png,0", bad_row, "img/1.png,1"], header="path,label")
  with pytest.raises(records.DataError, match=message):
    sources.csv_manifest(path)
  assert len(sources.csv_manifest(path, on_error="skip")) == 2


def test_csv_manifest_every_problem_in_one_error_or_skipped_and_counted(tmp_path, caplog):
  path = make_manifest(
    tmp_path,
    ["img/0.png,0", "img/1.png,1", "img/2.png,maybe", "img/3.png,0", "img/4.png,1"],
    header="path,label",
  )
  _save(tmp_path / "img" / "4.png", _gray(4))
  _truncate(tmp_path / "img" / "0.png")
  _truncate(tmp_path / "img" / "1.png")
  with pytest.raises(records.DataError) as raised:
    sources.csv_manifest(path)
  message = str(raised.value)
  assert message.startswith(f"3 bad files in CSV manifest {path}: ")
  for needle in (
    r"0\.png: corrupt or truncated",
    r"1\.png: corrupt or truncated",
    "line 4: unknown label 'maybe'",
  ):
    assert re.search(needle, message), needle
  assert "\n" not in message and message.endswith("(e.g. --config.data.on_error=skip)")
  with caplog.at_level(logging.WARNING):
    collection = sources.csv_manifest(path, on_error="skip")
  assert [r.id for r in collection.records] == ["img/3.png", "img/4.png"]
  assert "skipped 3 of 5 images" in caplog.text and "line 4: unknown label" in caplog.text


def test_many_problems_list_the_first_twenty_and_count_the_rest(tmp_path):
  rows = ["img/0.png,0", "img/1.png,1"] + [f"img/missing{i}.png,0" for i in range(25)]
  path = make_manifest(tmp_path, rows, header="path,label")
  with pytest.raises(records.DataError, match=r"^25 bad files in .*; \.\.\. and 5 more — fix"):
    sources.csv_manifest(path)


def test_csv_row_with_extra_fields_is_one_of_the_listed_problems(tmp_path):
  path = make_manifest(
    tmp_path, ["img/0.png,0,oops", "img/1.png,1", "img/2.png,9", "img/3.png,0"], header="path,label"
  )
  with pytest.raises(records.DataError, match=r"^2 bad files .*line 2: more fields .*line 4: unk"):
    sources.csv_manifest(path)
  assert len(sources.csv_manifest(path, on_error="skip")) == 2


def test_csv_manifest_missing_column(tmp_path):
  path = make_manifest(tmp_path, ["img/0.png"], header="path")
  with pytest.raises(records.DataError, match=r"missing column\(s\) \['label'\]"):
    sources.csv_manifest(path)


# ----------------------------------------------------------------------------------------------
# from_config.
# ----------------------------------------------------------------------------------------------


def _data_config(**kwargs):
  base = dict(
    source="busi",
    root="",
    classes="binary",
    image_size=32,
    on_error="raise",
    phantom=ml_collections.ConfigDict(),
  )
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def test_from_config_dispatch_and_class_restriction(tmp_path):
  root = make_busi(tmp_path / "busi")
  assert len(sources.from_config(_data_config(root=root))) == 5
  assert len(sources.from_config(_data_config(root=root, classes="three"))) == 7
  manifest = make_manifest(
    tmp_path, ["img/0.png,0", "img/1.png,1", "img/2.png,2"], header="path,label"
  )
  binary = sources.from_config(_data_config(source="csv", root=manifest))
  assert binary.class_names == records.BINARY_CLASSES and len(binary) == 2
  npz = make_breastmnist(tmp_path / "breastmnist_32.npz", size=32)
  assert len(sources.from_config(_data_config(source="breastmnist", root=str(tmp_path)))) == 11
  with pytest.raises(records.DataError, match="cannot serve classes='three'"):
    sources.from_config(_data_config(source="breastmnist", root=npz, classes="three"))
  with pytest.raises(ValueError, match="unknown config.data.source"):
    sources.from_config(_data_config(source="dicom", root=root))


def test_from_config_malignant_vs_rest_wherever_there_are_normal_images(tmp_path, monkeypatch):
  three = make_manifest(
    tmp_path, ["img/0.png,0", "img/1.png,1", "img/2.png,normal", "img/3.png,2"], header="path,label"
  )
  collection = sources.from_config(
    _data_config(source="csv", root=three, classes="malignant_vs_rest")
  )
  assert collection.class_names == ("benign or normal", "malignant")
  assert collection.labels.tolist() == [0, 1, 0, 0]
  assert [r.meta["original_class"] for r in collection.records] == [
    "benign",
    "malignant",
    "normal",
    "normal",
  ]
  binary = tmp_path / "binary.csv"
  binary.write_text("path,label\nimg/0.png,0\nimg/1.png,1\n")
  with pytest.raises(records.DataError, match="malignant_vs_rest.*no normal images"):
    sources.from_config(_data_config(source="csv", root=str(binary), classes="malignant_vs_rest"))
  with pytest.raises(records.DataError, match="no normal images"):
    sources.from_config(
      _data_config(source="busbra", root=make_busbra(tmp_path / "bra"), classes="malignant_vs_rest")
    )
  # A built three-class TFDS dataset is served the same way (its reader is tested in test_tfds).
  monkeypatch.setattr(sources, "tfds_source", lambda *a: sources.csv_manifest(three))
  tfds = sources.from_config(
    _data_config(source="tfds", tfds_name="busi/three", classes="malignant_vs_rest")
  )
  assert tfds.labels.tolist() == [0, 1, 0, 0]


def test_breastmnist_is_natively_malignant_vs_rest(tmp_path, caplog):
  npz = make_breastmnist(tmp_path / "breastmnist.npz")
  native = sources.from_config(
    _data_config(source="breastmnist", root=npz, classes="malignant_vs_rest")
  )
  assert native.class_names == ("benign or normal", "malignant") and len(native) == 11
  assert [r.meta["original_class"] for r in native.records[:2]] == ["malignant", "benign or normal"]
  with caplog.at_level(logging.WARNING):
    binary = sources.from_config(_data_config(source="breastmnist", root=npz))
  assert binary.labels.tolist() == native.labels.tolist()  # as before: nothing to drop
  assert binary.class_names == native.class_names and "'benign or normal'" in caplog.text


def test_config_validation_accepts_every_task_and_lists_them():
  from busjax import configlib

  config = configlib.base_config()
  config.data.classes = "malignant_vs_rest"
  configlib.validate(config)
  config.data.classes = "benign_vs_rest"
  with pytest.raises(
    configlib.ConfigError, match=r"data\.classes=.*'binary', 'three', 'malignant_vs_rest'"
  ):
    configlib.validate(config)


def test_from_config_phantom_passes_arguments(monkeypatch):
  calls = []
  fake = types.ModuleType("busjax.data.phantom")
  fake.make_collection = lambda **kw: calls.append(kw) or "collection"
  monkeypatch.setitem(sys.modules, "busjax.data.phantom", fake)
  monkeypatch.setattr(busjax.data, "phantom", fake, raising=False)
  config = _data_config(
    source="phantom",
    classes="three",
    phantom=ml_collections.ConfigDict({"counts": (4, 2, 2), "seed": 3}),
  )
  assert sources.from_config(config) == "collection"
  assert calls == [{"counts": (4, 2, 2), "seed": 3, "image_size": 32, "include_normal": True}]


# ----------------------------------------------------------------------------------------------
# Real shared data (skipped where absent).
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED, "Dataset_BUSI_with_GT")), reason="shared BUSI data absent"
)
def test_real_busi():
  collection = sources.busi(
    os.path.join(SHARED, "Dataset_BUSI_with_GT"),
    classes="three",
    split_file=os.path.join(SHARED, "busi_breastmnist_split.tsv"),
  )
  assert collection.describe()["per_class"] == {"benign": 345, "malignant": 168, "normal": 111}
  splits = [r.meta["split"] for r in collection.records]
  assert splits.count("train") == 546 and splits.count("val") == 78
  assert sum(isinstance(r.mask, np.ndarray) for r in collection.records) > 0


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED, "BUS-BRA-dev")), reason="shared BUS-BRA data absent"
)
def test_real_busbra():
  collection = sources.busbra(os.path.join(SHARED, "BUS-BRA-dev"))
  assert collection.describe()["per_class"] == {"benign": 514, "malignant": 247}
  assert collection.describe()["patients"] == 425
  assert {r.meta["fold5"] for r in collection.records} == {1, 2}


def test_from_config_real_phantom_classes():
  phantom = pytest.importorskip("busjax.data.phantom")
  if not hasattr(phantom, "make_collection"):
    pytest.skip("phantom.make_collection not written yet")
  config = _data_config(
    source="phantom",
    classes="binary",
    image_size=64,
    phantom=ml_collections.ConfigDict({"counts": (3, 2, 2), "seed": 1}),
  )
  collection = sources.from_config(config)
  assert collection.synthetic and collection.class_names == records.BINARY_CLASSES
  assert collection.describe()["per_class"] == {"benign": 3, "malignant": 2}
  config.classes = "malignant_vs_rest"
  collection = sources.from_config(config)
  assert collection.synthetic and collection.class_names == ("benign or normal", "malignant")
  assert collection.describe()["per_class"] == {"benign or normal": 5, "malignant": 2}
  normal = [r for r in collection.records if r.meta["original_class"] == "normal"]
  assert len(normal) == 2 and all(r.label == 0 for r in normal)


# ----------------------------------------------------------------------------------------------
# Each file decoded once per job (records.decoded_files_kept).
# ----------------------------------------------------------------------------------------------


def _counting_decodes(monkeypatch) -> list[str]:
  decoded = []
  real = records._decode_file

  def counting(path):
    decoded.append(os.path.basename(path))
    return real(path)

  monkeypatch.setattr(records, "_decode_file", counting)
  return decoded


def test_a_job_decodes_each_file_once(tmp_path, monkeypatch):
  from busjax.data import pipeline, splits

  monkeypatch.setenv("BUSJAX_CACHE_DIR", "none")  # The near-duplicate search really runs.
  root = make_busi(tmp_path / "busi", benign=4, malignant=3, normal=0)
  decoded = _counting_decodes(monkeypatch)
  files = sorted(n for _, _, names in os.walk(root) for n in names)
  with records.decoded_files_kept():
    collection = sources.busi(root)  # The check: every image and mask.
    splits.near_duplicate_pairs(collection)
    batches = pipeline.train_dataset(
      collection, image_size=16, global_batch_size=2, seed=0, augment_config=None,
      with_masks=True,
    )  # fmt: skip
    next(iter(batches))
    again = records.load_image(collection.records[0])
    assert again is records.load_image(collection.records[0])  # One array, shared...
    assert not again.flags.writeable  # ...and nobody can change it under the others.
  assert sorted(decoded) == files
  records.load_image(collection.records[0])  # Outside the job: read again.
  assert len(decoded) == len(files) + 1


def test_kept_files_are_read_again_when_they_change(tmp_path, monkeypatch):
  path = _save(tmp_path / "a.png", _gray(1))
  decoded = _counting_decodes(monkeypatch)
  with records.decoded_files_kept():
    first = records.read_image_file(path)
    os.utime(path, ns=(0, 0))  # Same pixels, another modification time.
    records.read_image_file(path)
    _save(tmp_path / "a.png", _gray(2)[:, :-1])  # Another size and content.
    changed = records.read_image_file(path)
    assert records.read_image_file(path) is changed
  assert len(decoded) == 3
  np.testing.assert_array_equal(first, _gray(1))
  np.testing.assert_array_equal(changed, _gray(2)[:, :-1])


def test_a_bad_file_inside_a_job_still_names_itself(tmp_path):
  path = _save(tmp_path / "a.png", _gray(1))
  _truncate(path)
  with records.decoded_files_kept():
    for _ in range(2):  # Not kept as a success the second time.
      with pytest.raises(records.DataError, match=re.escape(f"{path}: corrupt or truncated")):
        records.read_image_file(path)
    with pytest.raises(records.DataError, match="missing.png: image file not found"):
      records.read_image_file(str(tmp_path / "missing.png"))


def test_kept_files_budget_nesting_and_mode(tmp_path, monkeypatch):
  paths = [_save(tmp_path / f"{i}.png", _gray(i)) for i in range(3)]
  rgb = _save(tmp_path / "rgb.png", np.stack([_gray(5)] * 3, -1), "RGB")
  decoded = _counting_decodes(monkeypatch)
  monkeypatch.setenv(records.DECODED_CACHE_ENV, str(2.5 * H * W / 2**20))  # Room for two.
  with records.decoded_files_kept():
    with records.decoded_files_kept():  # Nested: the outer one's arrays serve.
      for path in paths * 2:
        records.read_image_file(path)
    records.read_image_file(paths[0])
    assert records.read_image_file(rgb, with_mode=True)[1] == "RGB"
  # The first two fit and were decoded once; the third, over the budget, at every read.
  assert decoded == ["0.png", "1.png", "2.png", "2.png", "rgb.png"]
  monkeypatch.setenv(records.DECODED_CACHE_ENV, "0")  # Off.
  with records.decoded_files_kept():
    records.read_image_file(paths[0])
    records.read_image_file(paths[0])
  assert decoded[-2:] == ["0.png", "0.png"]
  monkeypatch.setenv(records.DECODED_CACHE_ENV, "lots")
  with pytest.raises(records.DataError, match="BUSJAX_DECODED_CACHE_MB='lots': expected megab"):
    with records.decoded_files_kept():
      pass
