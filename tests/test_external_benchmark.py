"""benchmarks/external.py's statistics on synthetic predictions (the runs need real data)."""

import json

import numpy as np
import pytest

from benchmarks import external


def _preds(p, y, clusters, devices=None):
  ids = np.asarray([f"img{i}" for i in range(len(y))])
  out = {
    "ids": ids,
    "y_malignant": y,
    "p_malignant": np.asarray(p, np.float64),
    "clusters": clusters,
  }
  if devices is not None:
    out["devices"] = devices
  return out


def _data(n=200, seed=0):
  rng = np.random.default_rng(seed)
  y = (rng.random(n) < 0.35).astype(np.int32)
  clusters = np.asarray([f"c{i // 2}" for i in range(n)])  # Pairs of copies.
  return rng, y, clusters


def test_paired_gain_is_zero_for_identical_models_and_positive_for_a_better_one():
  rng, y, clusters = _data()
  base = [_preds(y + rng.normal(0, 1.0, len(y)), y, clusters) for _ in range(3)]
  same = external.paired_gain(base, base, bootstrap=200)
  assert same["gain"] == 0.0 and same["ci"] == [0.0, 0.0]
  better = [_preds(y + rng.normal(0, 0.4, len(y)), y, clusters) for _ in range(3)]
  gain = external.paired_gain(better, base, bootstrap=200)
  assert gain["gain"] > 0.1 and 0 < gain["ci"][0] < gain["gain"] < gain["ci"][1]
  shuffled = [dict(p, ids=p["ids"][::-1]) for p in better]
  with pytest.raises(ValueError, match="different images"):
    external.paired_gain(shuffled, base, bootstrap=10)


def test_paired_gain_interval_is_the_per_resample_loops():
  from benchmarks import common
  from busjax.evaluators import metrics

  rng, y, clusters = _data(seed=3)
  lever = [_preds(y + rng.normal(0, 0.5, len(y)), y, clusters) for _ in range(2)]
  base = [_preds(y + rng.normal(0, 0.8, len(y)), y, clusters) for _ in range(2)]
  scores = np.stack([p["p_malignant"] for p in (*lever, *base)], axis=1)

  def loop_gain(y_, s):
    aucs = [metrics.roc_auc(y_, s[:, j]) for j in range(4)]
    return np.mean(aucs[:2]) - np.mean(aucs[2:])

  want = metrics.bootstrap_ci(loop_gain, y, scores, clusters=clusters, n=150)
  assert external.paired_gain(lever, base, bootstrap=150)["ci"] == pytest.approx(
    list(want), abs=1e-12
  )
  diff = common.paired_auc_difference(lever[0], base[0], bootstrap=150)
  want = metrics.bootstrap_ci(
    lambda y_, s: metrics.roc_auc(y_, s[:, 0]) - metrics.roc_auc(y_, s[:, 1]),
    y, scores[:, [0, 2]], clusters=clusters, n=150,
  )  # fmt: skip
  assert diff["auc_diff_ci_clustered"] == pytest.approx(list(want), abs=1e-12)


def test_row_metrics_ensemble_operating_points_and_threshold_landing():
  rng, y, clusters = _data()
  devices = np.asarray(["A", "B"] * (len(y) // 2))
  birads = np.where(y == 1, 5, 3).astype(object)  # A perfect reader.
  birads[:20] = 4
  per_seed = {
    split: [_preds(y + rng.normal(0, 0.6, len(y)), y, clusters, devices) for _ in range(3)]
    for split in ("val", "test", "busbra")
  }
  view = np.linspace(1.5, 6.0, len(y))
  row = external.row_metrics(per_seed, birads, bootstrap=100, view=view)
  tight, medium, wide = (
    row["ensemble"]["auc_by_view"][k]["view_ratio"] for k in ("tight", "medium", "wide")
  )
  assert tight[0] == 1.5 and tight[1] < medium[0] <= medium[1] < wide[0] and wide[1] == 6.0
  assert row["seeds"] == 3 and len(row["busbra_auc_per_seed"]) == 3
  e = row["ensemble"]
  # Averaging three noisy copies beats the mean single model.
  assert e["busbra_auc"] > row["busbra_auc_mean"]
  lo, hi = e["busbra_auc_ci"]
  assert lo < e["busbra_auc"] < hi
  assert set(e["auc_per_device"]) == {"A", "B"}
  assert row["reader"]["sensitivity"] == 1.0 and 0.8 < row["reader"]["specificity"] < 1.0
  assert 0.0 <= e["spec_at_reader_sens"] <= e["spec_at_sens_target"] <= 1.0
  # The threshold for sensitivity 0.93 on val lands near 0.93 when val and target match.
  landing = e["busi_sens_target_on_busbra"]["sensitivity"]
  assert abs(landing - external.TARGET_SENSITIVITY) < 0.1
  json.dumps(row)  # The JSON the benchmark writes.


def test_a_fold_ensemble_pools_its_members_out_of_fold_val_predictions():
  rng, y, clusters = _data(n=100)
  members = [
    {k: v[i::4] for k, v in _preds(y + rng.normal(0, 0.6, len(y)), y, clusters).items()}
    for i in range(4)
  ]
  pooled = external._pooled_val(members)
  assert sorted(pooled["ids"]) == sorted(f"img{i}" for i in range(100))
  by_id = dict(zip(pooled["ids"], pooled["p_malignant"], strict=True))
  assert all(
    by_id[i] == p for m in members for i, p in zip(m["ids"], m["p_malignant"], strict=True)
  )
  # Seeds sharing one val part are averaged, as before.
  shared = [members[0], dict(members[0], p_malignant=members[0]["p_malignant"] + 1.0)]
  np.testing.assert_allclose(external._pooled_val(shared)["p_malignant"],
                             members[0]["p_malignant"] + 0.5)  # fmt: skip
  stray = np.concatenate([members[0]["ids"][:1], members[1]["ids"][1:]])  # One image in both.
  overlapping = [members[0], dict(members[1], ids=stray)]
  with pytest.raises(ValueError, match="overlap"):
    external._pooled_val(overlapping)


def test_a_run_trained_on_the_target_is_scored_out_of_fold_on_the_same_images(tmp_path):

  rng, y, clusters = _data(n=60)
  devices = np.asarray(["A", "B", "C"] * 20)
  full = _preds(y + rng.normal(0, 0.6, len(y)), y, clusters, devices)
  for fold, rows in enumerate((np.arange(1, 60, 2), np.arange(0, 60, 2))):
    reports = tmp_path / f"fold{fold}" / "reports"
    reports.mkdir(parents=True)
    np.savez(reports / "test_predictions.npz", **{k: v[rows] for k, v in full.items()})
  order = list(full["ids"])
  pooled = external.out_of_fold(str(tmp_path), order)
  assert list(pooled["ids"]) == order
  np.testing.assert_array_equal(pooled["p_malignant"], full["p_malignant"])
  np.testing.assert_array_equal(pooled["devices"], devices)
  with pytest.raises(ValueError, match="not the 61 evaluated"):
    external.out_of_fold(str(tmp_path), [*order, "img60"])
  # Its row has BUS-BRA figures only (no BUSI test, no BUSI threshold) and renders.
  row = external.row_metrics({"busbra": [pooled, pooled]}, None, bootstrap=100)
  assert row["busbra_auc_mean"] == pytest.approx(row["ensemble"]["busbra_auc"])
  assert "test_auc_mean" not in row and "busi_youden_on_busbra" not in row["ensemble"]
  table = external.markdown([dict(row, lever="busbra_cv", variant="plain")])
  assert "| busbra_cv | plain | 2 | n/a ± n/a |" in table


def test_levers_load_as_valid_configs(tmp_path):
  busi, busbra, split = tmp_path / "busi", tmp_path / "busbra", tmp_path / "split.tsv"
  busi.mkdir(), busbra.mkdir(), split.write_text("")
  (busbra / "5-fold-cv.csv").write_text("ID,Pathology,kFold\nbus_1-l,benign,1\nbus_2-l,benign,2\n")
  pretrained = tmp_path / "pretrain"
  pretrained.mkdir()
  data = (str(busi), str(split), str(busbra))
  for name, lever in external.LEVERS.items():
    config = external.load_config(lever, 1, *data, str(pretrained))
    assert config.seed == 1, name
    assert lever.trains_on_target or config.external.busbra.root == str(busbra), name
    if name == "folds":  # Member 1 validates on fold 1 of 5.
      assert (config.split.val_fraction, config.split.val_fold) == (0.2, 1)
    if lever.trains_on_target:  # Cross-validated over BUS-BRA's own folds, nothing external.
      assert config.data.source == "busbra" and config.data.root == str(busbra), name
      assert (config.split.kind, config.split.k, config.split.cross_validate) == (
        "official_folds", 2, True
      ), name  # fmt: skip
      assert not config.external and config.data.image_size == 128, name
      continue
    assert config.external.busbra.image_size == config.data.image_size
    if lever.pretrain is None:
      assert not config.init_from and not config.init_from_encoder, name
      continue
    assert config.init_from == str(pretrained), name
    assert config.init_from_encoder == lever.pretrain.encoder, name
    pre = external.load_pretrain_config(lever.pretrain, *data)
    # The pretraining's classifier (or encoder) is the fine-tuned model, at the same size.
    assert pre.data.image_size == config.data.image_size, name
    assert (pre.model.name, pre.model.variant, pre.model.width) == (
      config.model.name, config.model.variant, config.model.width
    ), name  # fmt: skip
    if pre.trainer == "contrastive":  # On BUSI's split: its in-domain test images stay unseen.
      assert pre.data.root == str(busi) and pre.data.split_file == str(split), name
    if "busbra" in pre.get("ssl", {}).get("extra_sources", {}):
      assert pre.ssl.extra_sources.busbra.root == str(busbra), name


def test_shortcut_counts_calls_that_change_when_marks_are_removed():
  rng, y, clusters = _data()
  plain = {
    s: [_preds(y + rng.normal(0, 0.6, len(y)), y, clusters)] for s in ("val", "test", "busbra")
  }
  same = external.shortcut(plain, plain)
  assert same["test"]["calls_changed"] == 0.0 and same["busbra"]["auc_change"] == 0.0
  moved = {
    s: [dict(p, p_malignant=p["p_malignant"] + 10.0 * (y == 1)) for p in plain[s]] for s in plain
  }
  out = external.shortcut(moved, plain)
  assert out["busbra"]["auc_change"] > 0 and out["busbra"]["calls_changed"] > 0.05


def test_a_stored_run_matches_unless_a_field_it_recorded_changed():
  stored = {"seed": 0, "train": {"epochs": 40}}
  assert external._differences(stored, {"seed": 0, "train": {"epochs": 40, "new_option": 0}}) == []
  assert external._differences(stored, {"seed": 1, "train": {"epochs": 40}}) == ["seed=0 -> 1"]


def test_levers_take_their_own_seeds():
  assert external.parse_levers(["baseline", "mask@10+11"], [0, 1, 2]) == {
    "baseline": [0, 1, 2],
    "mask": [10, 11],
  }
  with pytest.raises(ValueError, match="unknown lever"):
    external.parse_levers(["nope"], [0])
