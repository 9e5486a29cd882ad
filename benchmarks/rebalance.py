"""Does GAN rebalancing help? Every arm of configs/gan_rebalance.py on one split, several seeds.

Arms (one config argument each, same classifier, split, protocol and seeds):
  none             real images, plain loss
  class_weights    real images, class-weighted loss
  oversample       real images, minority drawn until classes balance
  gan              single-discriminator GAN rebalancing (objective=gan)
  d2gan            dual-discriminator GAN rebalancing (the method)
  d2gan_nodiffaug  D2GAN without DiffAugment

For each run: AUC with a clustered bootstrap CI, and balanced accuracy / sensitivity /
specificity at the threshold chosen on validation, on BUSI's test part (BreastMNIST split) and on
BUS-BRA-dev without retraining. Each arm is compared with `--reference` on the same images and
seed: the AUC difference with a *paired, clustered* bootstrap CI (the same resampled clusters
for both arms, so near-duplicates count once) and DeLong's paired p-value (which assumes
independent images, so it is optimistic on BUSI). Per arm, the mean and standard deviation over
seeds. JSON is saved after every run (``--output``); a re-run skips runs already in it.

  python -m benchmarks.rebalance --busi_root=../shared/data/Dataset_BUSI_with_GT \\
      --split_file=../shared/data/busi_breastmnist_split.tsv \\
      --busbra_root=../shared/data/BUS-BRA-dev --seeds=0,1,2 --workdir=/tmp/rebalance \\
      --output=/tmp/rebalance.json

Without --busi_root it runs on the embedded phantom data (rows marked SYNTHETIC).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from busjax import configlib
from busjax.trainers import gan_rebalance
from configs import gan_rebalance as gan_config

ARMS = {
  "none": "method=none",
  "class_weights": "method=class_weights",
  "oversample": "method=oversample",
  "gan": "objective=gan",
  "d2gan": "",
  "d2gan_nodiffaug": "nodiffaug",
}

_BUSI = flags.DEFINE_string("busi_root", None, "Dataset_BUSI_with_GT folder; none: phantoms.")
_SPLIT = flags.DEFINE_string("split_file", None, "busi_breastmnist_split.tsv.")
_BUSBRA = flags.DEFINE_string("busbra_root", None, "BUS-BRA folder; optional external set.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), f"Arms to run, of {list(ARMS)}.")
_REFERENCE = flags.DEFINE_string("reference", "oversample", "The arm every other is compared to.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (same split).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Classifier and GAN side (0: the config's).")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Classifier epochs (0: the config's).")
_GAN_STEPS = flags.DEFINE_integer("gan_steps_per_round", 0, "GAN steps per round (0: config's).")
_CONFIG_ARGS = flags.DEFINE_string("config_args", "", "Extra config arguments, e.g. gpu.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra overrides `a.b=value` (Python literal).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Paired bootstrap resamples.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/busjax_rebalance", "Where runs go.")
_OUTPUT = common.output_flag("JSON results (also the resume record).")
_RENDER = flags.DEFINE_list("render", [], "Only print the tables of these --output files.")


def _config(arm: str, seed: int):
  args = [a for a in (ARMS[arm], _CONFIG_ARGS.value) if a]
  if _BUSI.value:
    args.append("busi")
    if _BUSBRA.value:
      args.append("busbra")
  config = gan_config.get_config(",".join(args))
  if _BUSI.value:
    config.data.root = _BUSI.value
    config.data.split_file = _SPLIT.value
    if _BUSBRA.value:
      config.external.busbra.root = _BUSBRA.value
  if _IMAGE_SIZE.value:
    config.data.image_size = _IMAGE_SIZE.value
    for name in config.external.keys():
      config.external[name].image_size = _IMAGE_SIZE.value
  if _EPOCHS.value:
    config.train.epochs = _EPOCHS.value
  if _GAN_STEPS.value:
    config.gan.steps_per_round = _GAN_STEPS.value
  common.apply_overrides(config, _OVERRIDES.value)
  config.seed = seed
  configlib.validate(config)
  return config


def _run(arm: str, seed: int) -> dict:
  config = _config(arm, seed)
  run_dir = os.path.join(_WORKDIR.value, f"{arm}__seed{seed}")
  start = time.time()
  summary = gan_rebalance.train_and_evaluate(config, run_dir)
  row = {
    "arm": arm,
    "seed": seed,
    "workdir": run_dir,
    "data": config.data.source,
    "synthetic_data": config.data.source == "phantom",
    "image_size": config.data.image_size,
    "wall_seconds": round(time.time() - start, 1),
    "threshold": summary.get("threshold"),
    "synthetic_train_images": summary.get("synthetic_train_images", 0),
    "rounds": summary.get("rounds"),
    "sets": {},
  }
  for name in ("test", "busbra"):
    preds = common.load_predictions(run_dir, name)
    if preds is not None:
      row["sets"][name] = common.set_metrics(preds, summary.get("threshold"), _BOOTSTRAP.value)
  return row


def _compare(rows: list[dict]) -> list[dict]:
  """Each arm vs the reference, per seed and set: paired clustered bootstrap of the AUC
  difference, and DeLong's paired test."""
  by_key = {(r["arm"], r["seed"]): r for r in rows}
  out = []
  for r in rows:
    ref = by_key.get((_REFERENCE.value, r["seed"]))
    if r["arm"] == _REFERENCE.value or ref is None:
      continue
    for name in r["sets"]:
      paired = common.paired_auc_difference(
        common.load_predictions(r["workdir"], name),
        common.load_predictions(ref["workdir"], name),
        _BOOTSTRAP.value,
      )
      if paired is not None:
        out.append(
          {"arm": r["arm"], "reference": _REFERENCE.value, "seed": r["seed"], "set": name, **paired}
        )
  return out


def _aggregate(rows: list[dict]) -> list[dict]:
  """Mean and standard deviation over seeds, per arm and set."""
  out = []
  for arm in dict.fromkeys(r["arm"] for r in rows):
    arm_rows = [r for r in rows if r["arm"] == arm]
    for name in ("test", "busbra"):
      sets = [r["sets"][name] for r in arm_rows if name in r["sets"]]
      if not sets:
        continue
      entry = {"arm": arm, "set": name, "seeds": len(sets)}
      for key in ("auc", "auc_leak_free", "balanced_accuracy", "sensitivity", "specificity"):
        values = np.array([s[key] for s in sets if s.get(key) is not None], float)
        if not len(values):
          continue
        entry[key] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]
      if len(sets) == 1:  # One seed: no spread, but its clustered bootstrap CI.
        entry["auc_ci"] = sets[0]["auc_ci"]
      entry["synthetic_train_images"] = float(
        np.mean([r["synthetic_train_images"] for r in arm_rows])
      )
      entry["minutes"] = float(np.mean([r["wall_seconds"] for r in arm_rows]) / 60)
      out.append(entry)
  return out


def _markdown(result: dict) -> str:
  synthetic = any(r.get("synthetic_data") for r in result["rows"])
  names = {"test": "BUSI test" if not synthetic else "phantom test", "busbra": "BUS-BRA-dev"}
  lines = []
  if synthetic:
    lines.append("**SYNTHETIC phantom data: not a clinical result.**\n")
  lines += [
    "| arm | set | seeds | AUC (mean ± sd over seeds; one seed: [clustered 95% CI]) | "
    "balanced acc. @ val threshold | sensitivity | "
    "specificity | synthetic images | minutes |",
    "|---|---|---|---|---|---|---|---|---|",
  ]

  def pm(v, seeds):
    return f"{v[0]:.3f} ± {v[1]:.3f}" if seeds > 1 else f"{v[0]:.3f}"

  for e in result["aggregate"]:
    auc = pm(e["auc"], e["seeds"])
    if "auc_ci" in e:
      auc += f" [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]"
    n = e["seeds"]
    if "auc_leak_free" in e:
      auc += f"; without copies of train images {pm(e['auc_leak_free'], n)}"
    lines.append(
      f"| {e['arm']} | {names.get(e['set'], e['set'])} | {n} | {auc} | "
      f"{pm(e['balanced_accuracy'], n)} | {pm(e['sensitivity'], n)} | "
      f"{pm(e['specificity'], n)} | "
      f"{e['synthetic_train_images']:.0f} | {e['minutes']:.1f} |"
    )
  rounds = [
    (r["arm"], r["seed"], k)
    for r in result["rows"]
    for k in r.get("rounds") or []
    if k.get("sample_quality")
  ]
  if rounds:
    lines += [
      "",
      "| arm | seed | round | kept / needed | candidates: D1 / confidence / distance / not a copy "
      "| KID | Fréchet | precision | recall |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, seed, k in rounds:
      q = k["sample_quality"]
      lines.append(
        f"| {arm} | {seed} | {k['round']} | {k['kept']} / {k['needed']} | {k['candidates']}: "
        f"{k['passed_discriminator']} / {k['passed_confidence']} / {k['passed_distance']} / "
        f"{k['passed_memorisation']} | {q['kid']:.3f} | {q['frechet_distance']:.1f} | "
        f"{q['precision']:.2f} | {q['recall']:.2f} |"
      )
  if result["comparisons"]:
    lines += [
      "",
      f"| arm − {result['reference']} | set | seed | ΔAUC | 95% CI (paired, clustered) | "
      "DeLong p (unclustered) |",
      "|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
      lo, hi = c["auc_diff_ci_clustered"]
      lines.append(
        f"| {c['arm']} | {names.get(c['set'], c['set'])} | {c['seed']} | {c['auc_diff']:+.3f} | "
        f"[{lo:+.3f}, {hi:+.3f}] | {c['delong_p']:.3f} |"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  if _RENDER.value:
    for path in _RENDER.value:
      with open(path) as f:
        result = json.load(f)
      for row in result["rows"]:  # Today's metrics of the stored runs, where their files are.
        for name in list(row["sets"]):
          preds = common.load_predictions(row["workdir"], name)
          if preds is not None:
            row["sets"][name] = common.set_metrics(preds, row.get("threshold"), _BOOTSTRAP.value)
      result["aggregate"] = _aggregate(result["rows"])
      print(_markdown(result))
    return
  unknown = set(_ARMS.value) - set(ARMS) | ({_REFERENCE.value} - set(ARMS))
  if unknown:
    raise app.UsageError(f"unknown arms {sorted(unknown)}; expected {list(ARMS)}")
  if _BUSI.value and not _SPLIT.value:
    raise app.UsageError("--busi_root needs --split_file (the BreastMNIST split)")
  rows = common.start(_WORKDIR.value, _OUTPUT.value)

  def result():
    return {
      "benchmark": "rebalance",
      "data": {"busi": _BUSI.value, "split_file": _SPLIT.value, "busbra": _BUSBRA.value},
      "machine": common.machine(),
      "reference": _REFERENCE.value,
      "rows": rows,
      "aggregate": _aggregate(rows),
      "comparisons": _compare(rows),
    }

  def save():  # After every run: a later crash or kill must not cost the finished ones.
    common.write_json_atomic(_OUTPUT.value, result())

  done = {(r["arm"], r["seed"]) for r in rows}
  # Seed-major: every arm of seed 0 first, so a stopped run still compares arms like for like.
  for seed in (int(s) for s in _SEEDS.value):
    for arm in _ARMS.value:
      if (arm, seed) in done:
        continue
      rows.append(_run(arm, seed))
      save()
      print(f"{arm} seed {seed}: {json.dumps(rows[-1]['sets'])}", flush=True)
  final = result()
  print(_markdown(final))
  print(json.dumps(final, indent=2))
  save()


if __name__ == "__main__":
  app.run(main)
