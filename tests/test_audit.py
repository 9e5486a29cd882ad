"""Tests for the busjax.data.audit CLI on a tiny synthetic BUSI-layout folder."""

import json
import os

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from busjax.data import audit, records


def _scan(seed: int, h: int = 64, w: int = 72) -> np.ndarray:
  """Speckle-like scan: textured tissue, depth fall-off, dark lesion (as in test_splits)."""
  rng = np.random.default_rng(seed)
  tissue = sum(scipy.ndimage.gaussian_filter(rng.normal(size=(h, w)), s) * s for s in (1.5, 3, 6))
  tissue = (tissue - tissue.mean()) / tissue.std()
  yy, xx = np.mgrid[:h, :w]
  lesion = ((yy - h / 2) / (0.18 * h)) ** 2 + ((xx - w / 2) / (0.22 * w)) ** 2 < 1
  image = (120 + 40 * tissue) * np.linspace(1.0, 0.4, h)[:, None] * np.where(lesion, 0.25, 1.0)
  image *= rng.gamma(8.0, 1 / 8.0, size=(h, w))
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def busi_folder(tmp_path):
  """benign (3) is a re-crop of benign (1); malignant (1) is a rescaled copy of benign (2)."""
  a, b = _scan(1), _scan(2)
  files = {
    "benign/benign (1).png": a,
    "benign/benign (2).png": b,
    "benign/benign (3).png": a[4:60, 6:68],
    "benign/benign (4).png": _scan(3),
    "malignant/malignant (1).png": np.asarray(Image.fromarray(b).resize((60, 53))),
    "malignant/malignant (2).png": _scan(4),
    "normal/normal (1).png": _scan(5),
    "normal/normal (2).png": _scan(6),
  }
  split = {"benign/benign (1).png": "train", "benign/benign (3).png": "val"}
  header = ["busi_name", "medmnist_split", "medmnist_index", "breastmnist_label(0=malignant)"]
  lines = ["\t".join(header)]
  for index, (name, image) in enumerate(sorted(files.items())):
    os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
    Image.fromarray(image).save(tmp_path / name)
    Image.fromarray(np.zeros_like(image)).save(tmp_path / name.replace(".png", "_mask.png"))
    label = 0 if name.startswith("malignant") else 1
    lines.append(f"{name}\t{split.get(name, 'train')}\t{index}\t{label}")
  (tmp_path / "split.tsv").write_text("\n".join(lines) + "\n")
  return tmp_path


def test_cli_reports_clusters_cross_class_and_straddling_pairs(busi_folder, capsys):
  out = busi_folder / "report.json"
  code = audit.main(
    [
      "--source=busi",
      f"--root={busi_folder}",
      f"--split_file={busi_folder / 'split.tsv'}",
      f"--out={out}",
    ]
  )
  assert code == 0
  report = json.loads(out.read_text())
  clusters = sorted(sorted(c) for c in report["clusters"])
  assert clusters == [
    ["benign/benign (1).png", "benign/benign (3).png"],
    ["benign/benign (2).png", "malignant/malignant (1).png"],
  ]
  assert report["cross_class"] == [
    {
      "records": ["benign/benign (2).png", "malignant/malignant (1).png"],
      "classes": ["benign", "malignant"],
    }
  ]
  split = report["split"]
  assert split["kind"] == "predefined" and split["straddling_pairs"] == 1
  assert {split["pair_details"][0]["a"], split["pair_details"][0]["b"]} == {
    "benign/benign (1).png",
    "benign/benign (3).png",
  }
  printed = capsys.readouterr().out
  assert "2 clusters" in printed and "cross-class clusters: 1" in printed


def test_kfold_audit_has_no_straddling_copies(busi_folder):
  collection = audit.load_collection("busi", str(busi_folder), None)
  report = audit.audit(collection, split_kind="kfold", k=2, fold=1)
  assert report["near_duplicate_pairs"] == 2
  assert report["split"]["straddling_pairs"] == 0
  assert report["split"]["split_sizes"]["test"] > 0


def test_bad_root_is_a_clear_error(tmp_path, capsys):
  assert audit.main(["--source=busi", f"--root={tmp_path / 'missing'}"]) == 2
  assert "missing" in capsys.readouterr().err


def test_cross_class_clusters_in_memory():
  recs = tuple(
    records.Record(id=f"r{k}", label=k % 2, patient_id=f"r{k}", image=np.zeros((4, 4), np.uint8))
    for k in range(4)
  )
  collection = records.Collection(name="x", records=recs)
  found = audit.cross_class_clusters(collection, [[0, 2], [1, 2]])
  assert found == [{"records": ["r1", "r2"], "classes": ["benign", "malignant"]}]
