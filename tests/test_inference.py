"""A finished run, loaded back: the predict CLI gives the probabilities the run's reports used."""

import csv

import numpy as np
import pytest
from PIL import Image

from busjax import inference, predict
from busjax.data import records, sources, splits


@pytest.fixture(scope="module")
def smoke_run(supervised_smoke_run):
  workdir, config, _ = supervised_smoke_run
  parts = splits.make_splits(sources.from_config(config.data), config.split)
  return workdir, parts["test"]


def _read(path):
  with open(path, newline="") as f:
    lines = [line for line in f if not line.startswith("#")]
  return list(csv.DictReader(lines))


@pytest.mark.slow
def test_predict_cli_reproduces_the_runs_test_probabilities_and_skips_bad_files(
  smoke_run, tmp_path
):
  workdir, test = smoke_run
  folder = tmp_path / "images"
  folder.mkdir()
  names = []
  for i, record in enumerate(test.records):
    names.append(folder / f"{i:03d}.png")
    Image.fromarray(records.load_image(record)).save(names[-1])
  (folder / "zz_broken.png").write_bytes(b"not a png")
  out = tmp_path / "pred.csv"
  result = predict.predict(str(workdir), [str(folder)], str(out))

  assert result["predicted"] == len(test) and len(result["skipped"]) == 1
  assert "zz_broken.png" in result["skipped"][0]
  rows = _read(out)
  saved = np.load(workdir / "reports" / "test_predictions.npz")
  np.testing.assert_allclose(
    [float(r["p_malignant"]) for r in rows], saved["p_malignant"], atol=2e-5
  )
  reported = _read(workdir / "reports" / "test" / "predictions.csv")
  np.testing.assert_allclose(
    [float(r["p_malignant_calibrated"]) for r in rows],
    [float(r["p_malignant_calibrated"]) for r in reported],
    atol=2e-5,
  )
  header = out.read_text().splitlines()[0]
  assert header.startswith("# provenance:") and "SYNTHETIC" in header

  # A CSV input: paths relative to it, the same numbers.
  listing = tmp_path / "list.csv"
  listing.write_text("path\n" + "\n".join(f"images/{n.name}" for n in names[:3]) + "\n")
  overlays = tmp_path / "overlays"
  again = predict.predict(
    str(workdir), [str(listing)], str(tmp_path / "again.csv"), overlays=str(overlays)
  )
  assert again["predicted"] == 3
  assert sorted(p.name for p in overlays.iterdir()) == [
    "0000_000.png",
    "0001_001.png",
    "0002_002.png",
  ]
  assert [r["p_malignant"] for r in _read(tmp_path / "again.csv")] == [
    r["p_malignant"] for r in rows[:3]
  ]


def test_not_a_run_is_a_one_line_error(tmp_path):
  with pytest.raises(records.DataError, match="not a busjax run"):
    inference.load_run(str(tmp_path))


@pytest.mark.slow
def test_explain_cli_writes_panels_and_scores_maps_against_lesion_masks(smoke_run, tmp_path):
  from busjax import explain

  workdir, test = smoke_run
  rows = ["path,mask"]
  for i, record in enumerate(test.records[:4]):
    Image.fromarray(records.load_image(record)).save(tmp_path / f"{i}.png")
    mask = records.load_mask(record) * 255
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / f"{i}_lesion.png")
    rows.append(f"{i}.png,{i}_lesion.png")
  rows.append("missing.png,")
  (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  methods = ["gradcam", "ig", "eg", "shap"]
  result = explain.explain(
    str(workdir),
    [str(tmp_path / "in.csv")],
    methods,
    str(out),
    target="malignant",
    layer="stage3",
    shap_evals=64,
  )
  assert result["images"] == 4 and "missing.png" in result["skipped"][0]
  assert len(list((out / "panels").glob("*.png"))) == 4
  table = result["faithfulness"]
  assert set(table) == {*methods, "random", "lesion_share_of_image"}
  assert (out / "shap.png").stat().st_size > 0
  for method in (*methods, "random"):
    for value in table[method].values():
      assert 0.0 <= value <= 1.0
  assert "| random |" in (out / "faithfulness.md").read_text()
  with pytest.raises(records.DataError, match="unknown"):
    explain.explain(str(workdir), [str(tmp_path / "in.csv")], ["lime"], str(out))
  with pytest.raises(records.DataError, match="no feature map 'stage9'; its maps: stem, stage1"):
    explain.explain(str(workdir), [str(tmp_path / "in.csv")], ["gradcam"], str(out), layer="stage9")


def test_batchnorm_reestimated_on_target_images_predicts_with_their_statistics(smoke_run):
  import jax
  from flax import nnx

  from busjax.trainers import supervised

  workdir, test = smoke_run
  run = inference.load_run(str(workdir))
  images = run.prepare([records.load_image(r) for r in test.records])
  shifted = (images // 2).astype(np.uint8)  # Another "scanner": half the gain.
  before = run.probabilities()(shifted)
  adapted = inference.reestimate_batchnorm(run, shifted, batch_size=len(shifted))
  # Eval mode with the re-estimated statistics = training mode on that very batch (BatchNorm
  # normalising by the batch's own statistics): the statistics are exactly the images'.
  graph = supervised.bn_refresh_graph(run.model)
  _, params, rest = nnx.split(nnx.clone(run.model), nnx.Param, ...)  # A copy: this updates it.
  logits = nnx.merge(graph, params, rest)(run.preprocess(shifted))
  np.testing.assert_allclose(
    adapted.probabilities()(shifted), jax.nn.softmax(logits, axis=-1), atol=1e-4
  )
  assert np.abs(adapted.probabilities()(shifted) - before).max() > 1e-3
  # The original run is untouched, and its weights are shared, not retrained.
  np.testing.assert_array_equal(run.probabilities()(shifted), before)
  with pytest.raises(ValueError, match="no images"):
    inference.reestimate_batchnorm(run, shifted[:0])
