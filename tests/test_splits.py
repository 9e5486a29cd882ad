"""Tests for busjax.data.splits: near-duplicate search, grouped stratified folds, split kinds."""

import os

import ml_collections
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from busjax.data import records, splits

BUSI_ROOT = "/work/shared/data/Dataset_BUSI_with_GT"


def _scan(seed: int, h: int = 64, w: int = 72) -> np.ndarray:
  """Speckle-like B-mode look-alike: textured tissue, depth fall-off, dark lesion, speckle."""
  rng = np.random.default_rng(seed)
  tissue = sum(scipy.ndimage.gaussian_filter(rng.normal(size=(h, w)), s) * s for s in (1.5, 3, 6))
  tissue = (tissue - tissue.mean()) / tissue.std()
  yy, xx = np.mgrid[:h, :w]
  cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
  lesion = ((yy - cy) / (0.18 * h)) ** 2 + ((xx - cx) / (0.22 * w)) ** 2 < 1
  image = (120 + 40 * tissue) * np.linspace(1.0, 0.4, h)[:, None] * np.where(lesion, 0.25, 1.0)
  image *= rng.gamma(8.0, 1 / 8.0, size=(h, w))
  return np.clip(image, 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def _collection(images, labels=None, patients=None, meta=None) -> records.Collection:
  n = len(images)
  labels = [k % 2 for k in range(n)] if labels is None else labels
  patients = [f"p{k}" for k in range(n)] if patients is None else patients
  meta = [{}] * n if meta is None else meta
  recs = tuple(
    records.Record(
      id=f"img{k}", label=int(labels[k]), patient_id=patients[k], image=images[k], meta=meta[k]
    )
    for k in range(n)
  )
  return records.Collection(name="synth", records=recs)


@pytest.fixture(scope="module")
def copies_and_lookalikes():
  """Scans 0..5 each followed by a copy (re-cropped; odd ones also rescaled), then 6 look-alikes."""
  images, expected = [], set()
  for seed in range(6):
    base = _scan(seed)
    copy = base[5:60, 4:66]
    if seed % 2:
      copy = _resize(copy, 44, 50)
    expected.add((len(images), len(images) + 1))
    images += [base, copy]
  images += [_scan(100 + seed) for seed in range(6)]
  return _collection(images), expected


def test_copies_found_and_lookalikes_not(copies_and_lookalikes):
  collection, expected = copies_and_lookalikes
  pairs = splits.near_duplicate_pairs(collection)
  assert {(i, j) for i, j, _ in pairs} == expected
  assert all(0.65 <= s <= 1.0 for _, _, s in pairs)
  # Look-alikes are far below the threshold, not just under it.
  scored = splits.near_duplicate_pairs(collection, threshold=-1.0)
  others = [s for i, j, s in scored if (i, j) not in expected]
  assert others and max(others) < 0.45


def test_search_is_deterministic_and_clusters_transitive(copies_and_lookalikes):
  collection, _ = copies_and_lookalikes
  assert splits.near_duplicate_pairs(collection) == splits.near_duplicate_pairs(collection)
  pairs = [(0, 1, 0.9), (1, 5, 0.8), (7, 9, 0.7)]
  assert splits.near_duplicate_clusters(collection, pairs=pairs) == [[0, 1, 5], [7, 9]]


def test_pairs_are_cached_by_content_and_settings(copies_and_lookalikes, tmp_path, monkeypatch):
  collection, _ = copies_and_lookalikes
  monkeypatch.setenv("BUSJAX_CACHE_DIR", str(tmp_path))
  first = splits.near_duplicate_pairs(collection)
  assert len(list((tmp_path / "near_duplicates").glob("*.json"))) == 1

  def no_search(*args, **kwargs):
    raise AssertionError("searched again although the pairs are cached")

  with monkeypatch.context() as patch:
    patch.setattr(splits, "_coarse_scores", no_search)
    assert splits.near_duplicate_pairs(collection) == first  # Same images: read back.
    with pytest.raises(AssertionError, match="searched again"):
      splits.near_duplicate_pairs(collection, threshold=0.5)  # Another setting: searches.
    images = [r.image.copy() for r in collection.records]
    images[3][10, 10] ^= 1  # One pixel of one image.
    with pytest.raises(AssertionError, match="searched again"):
      splits.near_duplicate_pairs(collection, images=images)
  # A damaged cache file is ignored and rewritten, never trusted.
  (cached,) = (tmp_path / "near_duplicates").glob("*.json")
  cached.write_text("{not json")
  assert splits.near_duplicate_pairs(collection) == first
  assert splits.near_duplicate_pairs(collection) == first


def test_group_ids_join_patients_and_duplicates():
  collection = _collection(
    [_scan(k, 24, 24) for k in range(6)], patients=["a", "b", "a", "c", "d", "e"]
  )
  groups = splits.group_ids(collection, pairs=[(1, 4, 0.9)])
  assert groups.tolist() == [0, 1, 0, 2, 1, 3]
  alone = splits.group_ids(collection, near_duplicates=False)
  assert alone.tolist() == [0, 1, 0, 2, 3, 4]


def test_grouped_stratified_kfold_properties():
  rng = np.random.default_rng(0)
  n = 300
  groups = rng.integers(0, 120, n)
  labels = rng.choice(3, n, p=[0.55, 0.3, 0.15])
  folds = splits.grouped_stratified_kfold(labels, groups, 5, seed=3)
  for g in np.unique(groups):
    assert len(set(folds[groups == g].tolist())) == 1, "a group straddles folds"
  overall = np.bincount(labels, minlength=3) / n
  for f in range(5):
    in_fold = folds == f
    assert abs(in_fold.sum() - n / 5) <= 0.25 * n / 5
    share = np.bincount(labels[in_fold], minlength=3) / in_fold.sum()
    assert np.all(np.abs(share - overall) < 0.06), (f, share, overall)
  again = splits.grouped_stratified_kfold(labels, groups, 5, seed=3)
  other = splits.grouped_stratified_kfold(labels, groups, 5, seed=4)
  assert np.array_equal(folds, again)
  assert not np.array_equal(folds, other)
  with pytest.raises(ValueError, match="groups cannot fill"):
    splits.grouped_stratified_kfold([0, 1, 0], [0, 0, 1], 3, seed=0)


def _many(n=60, patients_per=2):
  images = [np.full((8, 8), k, np.uint8) for k in range(n)]
  labels = [int(k % 3 == 0) for k in range(n)]
  patients = [f"p{k // patients_per}" for k in range(n)]
  return _collection(images, labels, patients)


def test_make_splits_kfold_disjoint_grouped_and_named():
  collection = _many()
  pairs = [(0, 10, 0.9), (20, 41, 0.8)]
  config = ml_collections.ConfigDict(
    {"kind": "kfold", "k": 5, "fold": 0, "val_fraction": 0.2, "seed": 0, "near_duplicates": True}
  )
  tests = set()
  for fold in range(5):
    parts = splits.make_splits(collection, config, fold=fold, pairs=pairs)
    assert parts["test"].name == f"synth/kfold5-fold{fold}/test"
    ids = {p: {r.id for r in parts[p].records} for p in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
    assert not (ids["val"] & ids["test"])
    assert sum(map(len, ids.values())) == len(collection)
    assert 0.1 * len(collection) < len(ids["val"]) < 0.3 * len(collection)
    report = splits.leakage_report(collection, parts, pairs=pairs)
    assert report["straddling_pairs"] == report["straddling_patients"] == 0
    tests |= ids["test"]
  assert len(tests) == len(collection)  # every record is tested exactly once over the folds


def test_make_splits_predefined_and_leakage_report():
  collection = _many(12)
  meta = [{"split": "train"}] * 8 + [{"split": "val"}] * 4
  collection = _collection([r.image for r in collection.records], meta=meta)
  parts = splits.make_splits(collection, ml_collections.ConfigDict({"kind": "predefined"}))
  assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (8, 4, 0)
  assert parts["val"].name == "synth/predefined/val"
  report = splits.leakage_report(collection, parts, pairs=[(0, 9, 0.9), (1, 2, 0.9)])
  assert report["straddling_pairs"] == 1
  assert report["pair_details"][0]["a"] == "img0"
  bad = _collection([r.image for r in collection.records], meta=[{"split": "dev"}] * 12)
  with pytest.raises(records.DataError, match="img0"):
    splits.make_splits(bad, {"kind": "predefined"})


def test_predefined_val_from_train_reports_val_as_test_and_groups_the_carved_val():
  base = _many(60)
  meta = [{"split": "train"}] * 48 + [{"split": "val"}] * 12
  images = [r.image for r in base.records]
  collection = _collection(images, base.labels, base.patient_ids, meta=meta)
  config = {
    "kind": "predefined",
    "val_from_train": True,
    "val_fraction": 0.2,
    "near_duplicates": True,
  }
  pairs = [(0, 30, 0.9), (5, 50, 0.9)]  # 50 is in the given val part: that pair stays as given.
  parts = splits.make_splits(collection, config, pairs=pairs)
  ids = {p: [r.id for r in parts[p].records] for p in ("train", "val", "test")}
  assert ids["test"] == [f"img{k}" for k in range(48, 60)]  # exactly BreastMNIST's val part
  assert parts["test"].name == "synth/predefined-valtest/test"
  assert not set(ids["train"]) & set(ids["val"])
  assert len(ids["train"]) + len(ids["val"]) == 48 and 6 <= len(ids["val"]) <= 14
  # The carved val never splits a patient or a near-duplicate pair of the train part.
  val_patients = {r.patient_id for r in parts["val"].records}
  assert not val_patients & {r.patient_id for r in parts["train"].records}
  assert ("img0" in ids["val"]) == ("img30" in ids["val"])
  assert 0 < parts["val"].labels.sum() < len(ids["val"])  # stratified: both classes
  with_test = _collection([r.image for r in base.records], meta=[{"split": "test"}] * 60)
  with pytest.raises(ValueError, match="val_from_train"):
    splits.make_splits(with_test, config)


def test_val_folds_partition_the_train_part_for_a_fold_ensemble():
  base = _many(60)
  meta = [{"split": "train"}] * 48 + [{"split": "val"}] * 12
  collection = _collection([r.image for r in base.records], base.labels, base.patient_ids, meta)
  config = {"kind": "predefined", "val_from_train": True, "val_fraction": 0.2}
  members = [splits.make_splits(collection, dict(config, val_fold=k)) for k in range(5)]
  vals = [{r.id for r in m["val"].records} for m in members]
  train_part = {f"img{k}" for k in range(48)}
  # Five disjoint val parts that cover the train part; each member trains on the rest.
  assert set().union(*vals) == train_part and sum(map(len, vals)) == 48
  for m, val in zip(members, vals, strict=True):
    assert {r.id for r in m["train"].records} == train_part - val
    assert [r.id for r in m["test"].records] == [f"img{k}" for k in range(48, 60)]
  # Fold 0 is the single model's val part: the default is unchanged.
  assert vals[0] == {r.id for r in splits.make_splits(collection, config)["val"].records}
  with pytest.raises(ValueError, match="val_fold 5 is outside 0..4"):
    splits.make_splits(collection, dict(config, val_fold=5))


def test_make_splits_official_folds_and_holdout():
  base = _many(40)
  meta = [{"fold5": 1 + k % 2} for k in range(40)]
  collection = _collection([r.image for r in base.records], base.labels, base.patient_ids, meta)
  config = {
    "kind": "official_folds",
    "fold": 1,
    "val_fraction": 0.25,
    "seed": 0,
    "near_duplicates": False,
  }
  parts = splits.make_splits(collection, config)
  assert all(r.meta["fold5"] == 2 for r in parts["test"].records)
  assert len(parts["test"]) == 20 and len(parts["train"]) + len(parts["val"]) == 20
  assert parts["test"].name == "synth/official-fold2/test"
  holdout = splits.make_splits(
    base, {"kind": "holdout", "val_fraction": 0.2, "test_fraction": 0.2, "near_duplicates": False}
  )
  assert sum(len(p) for p in holdout.values()) == 40 and len(holdout["test"]) > 0
  with pytest.raises(ValueError, match="unknown split kind"):
    splits.make_splits(base, {"kind": "random"})


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(BUSI_ROOT), reason="shared BUSI data not present")
def test_busi_known_copy_is_found():
  names = [
    "benign/benign (233).png",
    "benign/benign (299).png",
    "benign/benign (49).png",
    "benign/benign (68).png",
    "benign/benign (62).png",
    "benign/benign (188).png",
  ]
  images = [records.read_image_file(os.path.join(BUSI_ROOT, n)) for n in names]
  pairs = splits.near_duplicate_pairs(_collection(images))
  # 233/299: one scan at two sizes. 49/68 and 62/188: distinct cysts that score high globally.
  assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_split_records_carry_their_cluster_and_whether_a_copy_is_in_train():
  collection = _many(12)
  meta = [{"split": "train"}] * 8 + [{"split": "val"}] * 4
  collection = _collection([r.image for r in collection.records], meta=meta)
  config = {"kind": "predefined", "near_duplicates": True}
  parts = splits.make_splits(collection, config, pairs=[(0, 9, 0.9), (1, 2, 0.9)])
  cluster = {r.id: r.meta["cluster"] for p in parts.values() for r in p.records}
  assert cluster["img0"] == cluster["img9"] and cluster["img1"] == cluster["img2"]
  assert len(set(cluster.values())) == 10  # 12 images, 2 pairs joined.
  copies = {r.id: r.meta["copy_in_train"] for r in parts["val"].records}
  assert copies == {"img8": False, "img9": True, "img10": False, "img11": False}
  assert all("copy_in_train" not in r.meta for r in parts["train"].records)
  # Grouped k-fold never leaves a copy across the boundary.
  folds = splits.make_splits(collection, {"kind": "kfold", "k": 3, "fold": 0}, pairs=[(0, 9, 0.9)])
  assert not any(r.meta["copy_in_train"] for r in folds["test"].records)
  # An external set gets clusters only.
  external = splits.annotate_groups(collection, near_duplicates=True, pairs=[(3, 4, 0.9)])
  assert external.records[3].meta["cluster"] == external.records[4].meta["cluster"]
  assert "copy_in_train" not in external.records[3].meta


def test_folds_spread_each_original_class_evenly_when_labels_merge_classes():
  # malignant_vs_rest: benign and normal share label 0; each should spread over the folds.
  n = 60
  labels = [1] * 20 + [0] * 40
  original = ["malignant"] * 20 + ["benign"] * 20 + ["normal"] * 20
  base = _many(n)
  collection = _collection(
    [r.image for r in base.records], labels, meta=[{"original_class": o} for o in original]
  )
  for fold in range(4):
    test = splits.make_splits(
      collection, {"kind": "kfold", "k": 4, "fold": fold, "near_duplicates": False}
    )["test"]
    kinds = [r.meta["original_class"] for r in test.records]
    assert kinds.count("normal") == kinds.count("benign") == kinds.count("malignant") == 5
