"""Diagnostic quality on real data: BUSI's own held-out images AND another hospital (BUS-BRA).

Trains each model config under each protocol, then reports, from the run's own reports:
  * BUSI test AUC with a bootstrap 95% CI that resamples clusters (a patient joined with every
    near-duplicate of its scans), on the task --task names
    (protocol "breastmnist": BreastMNIST's val part as test, selection on a grouped part of its
    train; protocol "cv5": 5-fold grouped CV, pooled out-of-fold predictions);
  * on BreastMNIST's split, how many test images have a near-duplicate in train, and the AUC
    without them (the split was not made with copies in mind);
  * BUS-BRA AUC (CI) with no retraining: the generalisation the brief cares about;
  * on BUS-BRA, the radiologists' BI-RADS >= 4 point and the model at the reader's specificity,
    plus the model at the threshold chosen on BUSI validation (an honest transfer).
Prints a markdown table and JSON (``--output``). Data paths are flags; nothing downloads.

  python -m benchmarks.quality --busi_root=../shared/data/Dataset_BUSI_with_GT \\
      --split_file=../shared/data/busi_breastmnist_split.tsv \\
      --busbra_root=../shared/data/BUS-BRA-dev --models=configs/supervised.py,configs/fusion.py \\
      --protocols=breastmnist --workdir=/tmp/quality
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import time

import jax
from absl import app, flags, logging

from benchmarks import common
from busjax import configlib, sharding

_BUSI = flags.DEFINE_string("busi_root", None, "Dataset_BUSI_with_GT folder (required to train).")
_SPLIT = flags.DEFINE_string(
  "split_file", None, "busi_breastmnist_split.tsv (protocol breastmnist)."
)
_BUSBRA = flags.DEFINE_string(
  "busbra_root", None, "BUS-BRA folder (Images/, bus_data.csv); optional."
)
_MODELS = flags.DEFINE_list(
  "models",
  ["configs/supervised.py"],
  "Config files, each optionally with `:args` (e.g. configs/fusion.py:mobilenet).",
)
_PROTOCOLS = flags.DEFINE_list("protocols", ["breastmnist"], "breastmnist and/or cv5.")
_TASK = flags.DEFINE_enum(
  "task",
  "binary",
  ["binary", "malignant_vs_rest"],
  "binary: benign vs malignant (BUSI's normal images dropped); malignant_vs_rest: benign + "
  "normal vs malignant, MedMNIST/BreastMNIST's own task (every image), for comparison with "
  "published BreastMNIST figures.",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Input side for every model.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Override train.epochs (0: the config's).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds; each is a separate run.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/busjax_quality", "Where runs and reports go.")
_OUTPUT = common.output_flag("Write the JSON here.")
_CACHE = flags.DEFINE_string(
  "compilation_cache",
  "",
  "JAX persistent compilation cache (default: WORKDIR/jax_cache; 'none' = off): re-runs and "
  "other seeds of one model skip the minutes-long CPU compile of the big backbones (CV folds "
  "differ in step count, so their train steps still compile).",
)
_RENDER = flags.DEFINE_list(
  "render", [], "Only print the markdown table of these earlier --output JSON files, merged."
)
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra overrides `a.b=value` (Python literal).")

PROTOCOL_ARGS = {"breastmnist": "busi", "cv5": "busi,cv"}
_TASK_NAMES = {"binary": "benign vs malignant", "malignant_vs_rest": "benign+normal vs malignant"}


def _load_config(spec: str, protocol: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  args = [a for a in (arg, PROTOCOL_ARGS[protocol], "busbra" if _BUSBRA.value else "") if a]
  config = module.get_config(",".join(args))
  config.data.root = _BUSI.value
  config.data.split_file = _SPLIT.value
  config.data.image_size = _IMAGE_SIZE.value
  config.data.classes = _TASK.value
  if "busbra" in config.external:
    config.external.busbra.root = _BUSBRA.value
    config.external.busbra.image_size = _IMAGE_SIZE.value
  if _EPOCHS.value:
    config.train.epochs = _EPOCHS.value
  if protocol == "cv5":
    config.split.k = 5
  common.apply_overrides(config, _OVERRIDES.value)
  return config


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _external_row(run_dir: str, name: str) -> dict:
  """AUC, CI and reader comparison of one external report (or of every fold, pooled by mean)."""
  paths = [os.path.join(run_dir, "reports", name, "report.json")]
  if not os.path.exists(paths[0]):
    paths = sorted(
      os.path.join(run_dir, d, "reports", name, "report.json")
      for d in os.listdir(run_dir)
      if d.startswith("fold")
    )
  reports = [_read_json(p) for p in paths if os.path.exists(p)]
  if not reports:
    return {}
  r = reports[0]  # Folds: the first fold's model, one model per row keeps CIs meaningful.
  row = {
    "auc": r["auc"]["value"],
    "auc_ci": [r["auc"]["bootstrap_ci"]["lo"], r["auc"]["bootstrap_ci"]["hi"]],
    "at_busi_threshold": r["operating_points"].get("at_threshold"),
  }
  if len(reports) > 1:
    row["auc_per_fold"] = [x["auc"]["value"] for x in reports]
  comparison = r.get("reader_comparison")
  if comparison:
    reader = comparison["reader"]
    row["reader"] = {"sensitivity": reader["sensitivity"], "specificity": reader["specificity"]}
    row["model_sensitivity_at_reader_specificity"] = comparison[
      "model_sensitivity_at_reader_specificity"
    ]["sensitivity"]
    row["model_specificity_at_reader_sensitivity"] = comparison[
      "model_specificity_at_reader_sensitivity"
    ]["specificity"]
  return row


def _run(spec: str, protocol: str, seed: int) -> dict:
  config = _load_config(spec, protocol)
  config.seed = seed
  configlib.validate(config)
  name = f"{spec.replace('/', '_').replace(':', '-').replace(',', '+')}__{protocol}__seed{seed}"
  run_dir = os.path.join(_WORKDIR.value, name)
  start = time.time()
  trainer = importlib.import_module(f"busjax.trainers.{config.trainer}")
  summary = trainer.train_and_evaluate(config, run_dir)
  row = {
    "model": spec,
    "protocol": protocol,
    "seed": seed,
    "workdir": run_dir,
    "image_size": config.data.image_size,
    "wall_seconds": round(time.time() - start, 1),
  }
  row["task"] = _TASK.value
  if protocol == "cv5":
    entry = summary["out_of_fold"]
    row["busi_test"] = dict(_auc_entry(entry), fold_auc=summary["fold_test_auc"])
    row["busi_test"]["what"] = "5-fold grouped CV, out-of-fold"
  else:
    row["busi_test"] = _auc_entry(summary["reports"]["test"])
    row["busi_test"]["what"] = "BreastMNIST val part"
  if _BUSBRA.value:
    row["busbra"] = _external_row(run_dir, "busbra")
  return row


def _auc_entry(entry: dict) -> dict:
  """AUC, clustered CI, clusters, and the AUC without test images that have a copy in train."""
  out = {
    "auc": entry["auc"],
    "auc_ci": [entry["auc_ci"]["lo"], entry["auc_ci"]["hi"]],
    "images": entry["images"],
    "clusters": entry["clusters"],
  }
  if "images_with_copy_in_train" in entry:
    out["images_with_copy_in_train"] = entry["images_with_copy_in_train"]
    ci = entry.get("auc_leak_free_ci")
    out["auc_leak_free"] = entry.get("auc_leak_free")
    out["auc_leak_free_ci"] = None if ci is None else [ci["lo"], ci["hi"]]
  return out


def _fmt_leak_free(entry) -> str:
  if not entry or "images_with_copy_in_train" not in entry:
    return "n/a"
  copies = entry["images_with_copy_in_train"]
  if not copies:
    return f"= (0 of {entry['images']} have a copy in train)"
  free, ci = entry.get("auc_leak_free"), entry.get("auc_leak_free_ci")
  text = "n/a" if free is None else f"{free:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
  return f"{text} ({copies} of {entry['images']} have a copy in train)"


def _fmt_ci(entry) -> str:
  if not entry or entry.get("auc") is None:
    return "n/a"
  lo, hi = entry["auc_ci"]
  text = f"{entry['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
  per_fold = entry.get("auc_per_fold")
  if per_fold:  # External set under CV: one model per fold; the CI is fold 0's model's.
    text = f"fold 0: {text}; {len(per_fold)}-fold mean {sum(per_fold) / len(per_fold):.3f}"
  return text


def _markdown(rows) -> str:
  lines = [
    "| model | task | protocol | seed | BUSI test AUC [95% CI] | BUSI test AUC without copies "
    "of train images | BUS-BRA AUC [95% CI] | BUS-BRA spec @ reader sens | "
    "BUS-BRA sens @ reader spec | BUS-BRA sens / spec @ BUSI-val threshold | minutes |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  reader = None
  for r in rows:
    bra = r.get("busbra") or {}
    at = bra.get("at_busi_threshold") or {}
    sens_at = bra.get("model_sensitivity_at_reader_specificity")
    spec_at = bra.get("model_specificity_at_reader_sensitivity")
    reader = bra.get("reader") or reader
    lines.append(
      f"| {r['model']} | {_TASK_NAMES[r.get('task', 'binary')]} | {r['protocol']} | {r['seed']} "
      f"| {_fmt_ci(r['busi_test'])} | {_fmt_leak_free(r['busi_test'])} | "
      f"{_fmt_ci(bra)} | "
      f"{'n/a' if spec_at is None else f'{spec_at:.3f}'} | "
      f"{'n/a' if sens_at is None else f'{sens_at:.3f}'} | "
      f"{at.get('sensitivity', float('nan')):.3f} / {at.get('specificity', float('nan')):.3f} | "
      f"{r['wall_seconds'] / 60:.1f} |"
    )
  if reader:
    lines.append(
      f"\nBUS-BRA radiologists (BI-RADS >= 4): sensitivity {reader['sensitivity']:.3f}, "
      f"specificity {reader['specificity']:.3f}."
    )
  return "\n".join(lines)


def main(argv):
  del argv
  if _RENDER.value:
    rows = [row for path in _RENDER.value for row in _read_json(path)["rows"]]
    print(_markdown(rows))
    return
  if not _BUSI.value:
    raise app.UsageError("--busi_root is required (the BUSI folder to train on)")
  logging.set_verbosity(logging.WARNING)
  if _CACHE.value != "none":
    cache = _CACHE.value or os.path.join(_WORKDIR.value, "jax_cache")
    sharding.enable_compilation_cache(cache)
  rows = []

  def result():
    return {
      "benchmark": "quality",
      "data": {"busi": _BUSI.value, "split_file": _SPLIT.value, "busbra": _BUSBRA.value},
      "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
      "rows": rows,
    }

  def save():  # After every run: a later crash or kill must not cost the finished ones.
    common.write_json_atomic(_OUTPUT.value, result())

  for protocol in _PROTOCOLS.value:
    if protocol not in PROTOCOL_ARGS:
      raise app.UsageError(f"--protocols: unknown {protocol!r}; expected {sorted(PROTOCOL_ARGS)}")
    if protocol == "breastmnist" and not _SPLIT.value:
      raise app.UsageError("--protocols=breastmnist needs --split_file")
    for spec in _MODELS.value:
      for seed in _SEEDS.value:
        rows.append(_run(spec, protocol, int(seed)))
        save()
        print(_markdown(rows[-1:]), flush=True)
  print(_markdown(rows))
  print(json.dumps(result(), indent=2))
  save()


if __name__ == "__main__":
  app.run(main)
