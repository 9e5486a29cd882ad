"""Tests for the BUSI and BUS-BRA TFDS builders: build on tiny generated folders, read back
with `sources.tfds_source`, all without TensorFlow."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import test_sources  # The generated BUSI / BUS-BRA folders; tests/ is on sys.path under pytest.
from PIL import Image

from busjax.data import records, sources
from busjax.data import tfds as busjax_tfds
from busjax.data.tfds import busbra, busi

SHARED = test_sources.SHARED


def _odd_modes_busi(root) -> str:
  """A BUSI-like tree whose benign images are 16-bit, RGBA and palette, plus a split file."""
  root = test_sources.make_busi(os.path.join(root, busi.BUSI_FOLDER))
  h, w = test_sources.H, test_sources.W
  folder = os.path.join(root, "benign")
  Image.fromarray((np.arange(h * w).reshape(h, w) * 30).astype(np.uint16)).save(
    os.path.join(folder, "benign (1).png")
  )
  rgba = np.full((h, w, 4), 180, np.uint8)
  Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "benign (3).png"))
  Image.fromarray(test_sources._gray(5)).convert("P").save(os.path.join(folder, "malign.png"))
  os.rename(
    os.path.join(folder, "malign.png"), os.path.join(root, "malignant", "malignant (2).png")
  )
  test_sources._write_split_file(
    os.path.join(os.path.dirname(root), busi.SPLIT_FILE),
    [("benign/benign (1).png", "val", 3, 1), ("malignant/malignant (1).png", "train", 4, 0)],
  )
  return os.path.dirname(root)


def _assert_same_records(built, reference):
  """Images, masks, labels and patients read back equal what sources.* loads directly."""
  by_id = {r.id: r for r in reference.records}
  assert sorted(by_id) == sorted(r.id for r in built.records)
  for record in built.records:
    original = by_id[record.id]
    image = records.load_image(original)
    np.testing.assert_array_equal(record.image, image)
    np.testing.assert_array_equal(record.mask, records.load_mask(original, image.shape))
    assert record.label == original.label and record.patient_id == original.patient_id


def test_busi_builder_round_trip_three_classes(tmp_path):
  manual = _odd_modes_busi(tmp_path / "manual")
  builder = busjax_tfds.prepare(
    busi.Busi, manual_dir=manual, data_dir=str(tmp_path / "data"), config="three"
  )
  assert builder.info.splits["train"].num_examples == 7
  assert list(builder.info.features["label"].names) == list(records.THREE_CLASSES)
  files = os.listdir(tmp_path / "data" / "busi" / "three" / "1.0.0")
  assert any(".array_record" in f for f in files)
  built = sources.tfds_source("busi/three", str(tmp_path / "data"), "train")
  assert built.class_names == records.THREE_CLASSES
  reference = sources.busi(os.path.join(manual, busi.BUSI_FOLDER), classes="three")
  _assert_same_records(built, reference)
  by_id = {r.id: r for r in built.records}
  union = by_id["benign/benign (2).png"].mask
  assert union[2:10, 2:10].all() and union[20:28, 20:28].all()  # both mask files
  assert by_id["benign/benign (1).png"].meta == {
    "split": "val",
    "medmnist_index": 3,
    "mode": "I;16",
  }
  assert "split" not in by_id["benign/benign (2).png"].meta  # unknown -> dropped, not ""
  assert "tensorflow" not in sys.modules


def test_busi_builder_binary_config_and_subsplit(tmp_path):
  manual = test_sources.make_busi(tmp_path / "manual")  # manual_dir = the BUSI folder itself
  busjax_tfds.prepare(
    busi.Busi, manual_dir=manual, data_dir=str(tmp_path / "data"), config="binary"
  )
  built = sources.tfds_source("busi/binary", str(tmp_path / "data"), "train")
  assert built.describe()["per_class"] == {"benign": 3, "malignant": 2}
  head = sources.tfds_source("busi/binary", str(tmp_path / "data"), "train[:2]")
  assert len(head) == 2 and head.name == "tfds:busi/binary[train[:2]]"


def test_busi_builder_refuses_bad_image(tmp_path):
  manual = test_sources.make_busi(tmp_path / "manual")
  test_sources._truncate(os.path.join(manual, "normal", "normal (1).png"))
  with pytest.raises(records.DataError, match=r"normal \(1\)\.png: corrupt or truncated"):
    busjax_tfds.prepare(
      busi.Busi, manual_dir=manual, data_dir=str(tmp_path / "data"), config="three"
    )


def test_busbra_builder_round_trip(tmp_path):
  manual = test_sources.make_busbra(tmp_path / "bra")
  busjax_tfds.prepare(busbra.Busbra, manual_dir=manual, data_dir=str(tmp_path / "data"))
  built = sources.tfds_source("busbra", str(tmp_path / "data"), "train")
  _assert_same_records(built, sources.busbra(manual))
  meta = {r.id: r.meta for r in built.records}
  assert meta["bus_0002-r"] == {
    "birads": 3 + 3 % 3,
    "device": "GE Logiq 7",
    "histology": "fibroadenoma",
    "side": "left",
    "fold5": 2,
    "fold10": 4,
  }


def test_tfds_source_errors(tmp_path):
  with pytest.raises(records.DataError, match="TFDS data_dir not found"):
    sources.tfds_source("busbra", str(tmp_path / "nowhere"), "train")
  with pytest.raises(records.DataError, match="cannot read TFDS dataset 'busbra'"):
    sources.tfds_source("busbra", str(tmp_path), "train")


def test_builders_import_without_tensorflow():
  """Grain workers re-import builder modules: they must import cleanly and pull in no TF."""
  code = (
    "import sys, busjax.data.tfds.busi as a, busjax.data.tfds.busbra as b; "
    "assert a.Busi.name == 'busi' and b.Busbra.name == 'busbra'; "
    "assert 'tensorflow' not in sys.modules"
  )
  subprocess.run(
    [sys.executable, "-c", code],
    check=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here; the no-TF guarantee was only partly checked")


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED, busi.BUSI_FOLDER)), reason="shared BUSI data absent"
)
def test_real_busi_builder(tmp_path):
  busjax_tfds.prepare(busi.Busi, manual_dir=SHARED, data_dir=str(tmp_path), config="three")
  built = sources.tfds_source("busi/three", str(tmp_path), "train")
  assert built.describe()["per_class"] == {"benign": 345, "malignant": 168, "normal": 111}
  assert sum(r.meta.get("split") == "val" for r in built.records) == 78
