"""The shared protocol: k-fold CV with pooled out-of-fold reports, and runs on several processes."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_supervised import _fresh_state, _smoke_config, assert_same_updates

from busjax import checkpointing
from busjax.evaluators import metrics
from busjax.trainers import state_utils, supervised

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_cross_validation_pools_every_image_once_from_the_model_that_did_not_see_it(tmp_path):
  config = _smoke_config(arg="smoke,cv")
  config.train.num_steps = 2
  config.train.eval_every = 2
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  k = config.split.k
  folds = [_rows(tmp_path / f"fold{f}" / "reports" / "test" / "predictions.csv") for f in range(k)]
  fold_ids = [{r["id"] for r in rows} for rows in folds]
  for a in range(k):
    for b in range(a + 1, k):
      assert not fold_ids[a] & fold_ids[b]  # Test parts are disjoint.
  pooled = _rows(tmp_path / "reports" / "cv_out_of_fold" / "predictions.csv")
  everything = [r for rows in folds for r in rows]
  assert sorted(r["id"] for r in pooled) == sorted(r["id"] for r in everything)
  assert len(pooled) == sum(config.data.phantom.counts[:2])  # Every benign/malignant image once.
  # The pooled figure is the AUC of the folds' own test predictions, concatenated.
  y = np.asarray([int(r["label"]) for r in everything])
  p = np.asarray([float(r["p_malignant"]) for r in everything])
  assert summary["out_of_fold"]["auc"] == pytest.approx(metrics.roc_auc(y, p), abs=1e-9)
  for f, rows in enumerate(folds):
    fold_y = np.asarray([int(r["label"]) for r in rows])
    fold_p = np.asarray([float(r["p_malignant"]) for r in rows])
    assert summary["fold_test_auc"][f] == pytest.approx(metrics.roc_auc(fold_y, fold_p), abs=1e-9)
    fold_report = json.loads(
      (tmp_path / f"fold{f}" / "reports" / "test" / "report.json").read_text()
    )
    at = fold_report["operating_points"]["at_threshold"]
    assert summary["per_fold"]["test"]["specificity"]["values"][f] == at["specificity"]
  # Mean and sd over folds beside the pooled report.
  aucs = summary["per_fold"]["test"]["auc"]
  assert aucs["mean"] == pytest.approx(np.mean(summary["fold_test_auc"]))
  assert aucs["sd"] == pytest.approx(np.std(summary["fold_test_auc"], ddof=1))
  assert "ece_temperature_scaled" in summary["per_fold"]["test"]
  report = json.loads((tmp_path / "reports" / "cv_out_of_fold" / "report.json").read_text())
  assert report["synthetic"] and report["provenance"]["split"].startswith(f"{k}-fold CV")
  # Clusters resample a patient's images together: fewer clusters than images.
  assert report["bootstrap"]["clusters"] < len(pooled)


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _main(workdir, devices, extra=(), process=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  env.pop("BUSJAX_TEST_COMPILATION_CACHE", None)
  args = [
    sys.executable,
    "-m",
    "busjax.main",
    "--config=configs/supervised.py:smoke,cv",
    f"--workdir={workdir}",
    "--config.split.k=2",
    "--config.train.num_steps=3",
    "--config.train.eval_every=3",
    *extra,
  ]
  return subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(workers, timeout=600):
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=timeout)[0])
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for worker, output in zip(workers, outputs, strict=True):
    assert worker.returncode == 0, output[-4000:]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_cross_validate_and_report_like_one(tmp_path):
  """Same global batches, same parameters: 2 processes x 1 device vs 1 process x 2 devices."""
  _finish([_main(tmp_path / "one", devices=2)])
  port = _free_port()
  coordinator = [f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
  _finish([_main(tmp_path / "two", 1, [*coordinator, f"--process_id={i}"]) for i in range(2)])

  config = _smoke_config(arg="smoke,cv")
  for fold in range(2):
    abstract = state_utils.abstract_flat_state(_fresh_state(config, 3))
    one = checkpointing.load_state(str(tmp_path / "one" / f"fold{fold}"), abstract, which="latest")
    two = checkpointing.load_state(str(tmp_path / "two" / f"fold{fold}"), abstract, which="latest")
    assert int(one["step"]) == int(two["step"]) == 3
    weights = [k for k in one if k.startswith(("params.", "ema."))]
    assert_same_updates({k: one[k] for k in weights}, {k: two[k] for k in weights}, lr=1e-3)
  one = _rows(tmp_path / "one" / "reports" / "cv_out_of_fold" / "predictions.csv")
  two = _rows(tmp_path / "two" / "reports" / "cv_out_of_fold" / "predictions.csv")
  assert [r["id"] for r in one] == [r["id"] for r in two]
  np.testing.assert_allclose(
    [float(r["p_malignant"]) for r in one], [float(r["p_malignant"]) for r in two], atol=1e-5
  )
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert len(summary["fold_test_auc"]) == 2 and "out_of_fold" in summary


def test_a_regime_runs_inside_one_decode_per_file(tmp_path, monkeypatch):
  """`protocol.train_and_evaluate` (every regime's entry) keeps decoded files for the whole job:
  two reads of one image inside it decode it once, as the loader's check, the near-duplicate
  search, the pipelines and the reports do in a real job (tests/test_sources.py)."""
  from PIL import Image

  from busjax.data import records
  from busjax.trainers import protocol

  path = str(tmp_path / "a.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
  decoded = []
  real = records._decode_file
  monkeypatch.setattr(records, "_decode_file", lambda p: decoded.append(p) or real(p))

  def job(config, workdir, train_split, loaded):
    records.read_image_file(path)
    records.read_image_file(path)
    return {}

  monkeypatch.setattr(protocol, "_train_and_evaluate", job)
  protocol.train_and_evaluate(_smoke_config(), str(tmp_path), supervised.train_split)
  assert decoded == [path]
