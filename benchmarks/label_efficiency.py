"""Does contrastive pretraining help with few labels? SSL-init vs scratch at 10 / 25 / 100% labels.

Encoders (configs/ssl_pretrain.py, one pretraining run each, labels never read):
  ssl_busi         pretrained on BUSI's non-test images (BreastMNIST split: train + val parts)
  ssl_busi_busbra  the same plus every BUS-BRA-dev image: it has SEEN the external domain's
                   images (not its labels), so its BUS-BRA row is not an external test in the
                   strict sense: it is reported as its own row.
Fine-tuning (configs/ssl_finetune.py, same multiscale model): from each encoder and from scratch,
with 10 / 25 / 100% of the train part's labels (whole groups per class, nested per seed; val
and test whole), several seeds. Plus the multiscale ablation, from scratch at 100%: a single
scale, three scales concatenated top-down, three scales with cross-scale attention (the
method) and a plain ResNet-18.

Per run: AUC with a clustered bootstrap CI (and without test images that have a copy in train)
on BUSI's test part and on BUS-BRA-dev without retraining; each SSL run vs scratch at the same
fraction and seed: paired clustered bootstrap ΔAUC and DeLong. Every pretraining run's linear
probe is reported too. JSON after every run (``--output``, also the resume record).

  python -m benchmarks.label_efficiency --busi_root=../shared/data/Dataset_BUSI_with_GT \\
      --split_file=../shared/data/busi_breastmnist_split.tsv \\
      --busbra_root=../shared/data/BUS-BRA-dev --workdir=/tmp/ssl --output=/tmp/ssl.json

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
from busjax.trainers import contrastive, supervised
from configs import ssl_finetune, ssl_pretrain

ENCODERS = ("ssl_busi", "ssl_busi_busbra")
INITS = ("scratch", *ENCODERS)
ABLATION = {  # name -> (config arguments) of the from-scratch ablation at 100% labels.
  "single_scale": "fusion=single",
  "concat": "fusion=concat",
  "cross_attention": "",
  "plain_resnet18": "backbone=plain",
}

_BUSI = flags.DEFINE_string("busi_root", None, "Dataset_BUSI_with_GT folder; none: phantoms.")
_SPLIT = flags.DEFINE_string("split_file", None, "busi_breastmnist_split.tsv.")
_BUSBRA = flags.DEFINE_string(
  "busbra_root", None, "BUS-BRA folder (external set; ssl_busi_busbra)."
)
_INITS = flags.DEFINE_list("inits", list(INITS), f"Fine-tuning starts, of {list(INITS)}.")
_FRACTIONS = flags.DEFINE_list("fractions", ["10", "25", "100"], "Label percentages.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds (label subset + init).")
_FULL_SEEDS = flags.DEFINE_integer("full_label_seeds", 1, "Seeds at 100% (the first N).")
_ABLATION = flags.DEFINE_list("ablation", list(ABLATION), "Multiscale ablation rows (100%).")
_ABLATION_SEEDS = flags.DEFINE_integer("ablation_seeds", 1, "Seeds per ablation row.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of every image.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 0, "SSL steps (0: the config's).")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Fine-tune overrides `a.b=value`.")
_PRETRAIN_OVERRIDES = flags.DEFINE_multi_string("pretrain_set", [], "Pretraining overrides.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/busjax_ssl", "Where runs go.")
_OUTPUT = common.output_flag("JSON results (also the resume record).")
_RENDER = flags.DEFINE_list("render", [], "Only print the tables of these --output files.")


def _data_args() -> list[str]:
  if not _BUSI.value:
    return []
  return ["busi", "busbra"] if _BUSBRA.value else ["busi"]


def _set_data(config):
  if _BUSI.value:
    config.data.root = _BUSI.value
    config.data.split_file = _SPLIT.value
    if _BUSBRA.value:
      config.external.busbra.root = _BUSBRA.value
  config.data.image_size = _IMAGE_SIZE.value
  for name in config.external.keys():
    config.external[name].image_size = _IMAGE_SIZE.value


def _pretrain_config(encoder: str):
  args = _data_args()
  if encoder == "ssl_busi_busbra":
    args.append("unlabelled_busbra")
  config = ssl_pretrain.get_config(",".join(args))
  _set_data(config)
  if encoder == "ssl_busi_busbra":
    if not _BUSBRA.value:
      raise app.UsageError("ssl_busi_busbra needs --busbra_root")
    config.ssl.extra_sources.busbra.root = _BUSBRA.value
    config.ssl.extra_sources.busbra.image_size = _IMAGE_SIZE.value
  if _PRETRAIN_STEPS.value:
    config.ssl.steps = _PRETRAIN_STEPS.value
  common.apply_overrides(config, _PRETRAIN_OVERRIDES.value)
  configlib.validate(config)
  return config


def _finetune_config(init: str, percent: str, seed: int, model_arg: str = ""):
  args = [*_data_args(), f"labels={percent}"]
  if init == "scratch":
    args.append("scratch")
  if model_arg:
    args.append(model_arg)
  config = ssl_finetune.get_config(",".join(args))
  _set_data(config)
  if init != "scratch":
    config.init_from = os.path.join(_WORKDIR.value, f"pretrain_{init}")
  config.seed = seed
  config.split.label_fraction_seed = seed
  common.apply_overrides(config, _OVERRIDES.value)
  configlib.validate(config)
  return config


def _sets(run_dir: str, threshold) -> dict:
  out = {}
  for name in ("test", "busbra"):
    preds = common.load_predictions(run_dir, name)
    if preds is not None:
      out[name] = common.set_metrics(preds, threshold, _BOOTSTRAP.value)
  return out


def _pretrain(encoder: str) -> dict:
  config = _pretrain_config(encoder)
  run_dir = os.path.join(_WORKDIR.value, f"pretrain_{encoder}")
  start = time.time()
  summary = contrastive.train_and_evaluate(config, run_dir)
  return {
    "kind": "pretrain",
    "encoder": encoder,
    "workdir": run_dir,
    "data": config.data.source,
    "synthetic_data": config.data.source == "phantom",
    "image_size": config.data.image_size,
    "pretraining_images": summary.get("pretraining_images"),
    "pretrained_on": summary.get("pretrained_on"),
    "steps": int(config.ssl.steps),
    "wall_seconds": round(time.time() - start, 1),
    "threshold": summary.get("threshold"),
    "sets": _sets(run_dir, summary.get("threshold")),  # The linear probe's.
  }


def _finetune(init: str, percent: str, seed: int, variant: str = "cross_attention") -> dict:
  config = _finetune_config(init, percent, seed, ABLATION[variant])
  run_dir = os.path.join(_WORKDIR.value, f"{init}__{variant}__{percent}pct__seed{seed}")
  start = time.time()
  summary = supervised.train_and_evaluate(config, run_dir)
  return {
    "kind": "finetune",
    "init": init,
    "variant": variant,
    "labels_percent": int(percent),
    "seed": seed,
    "workdir": run_dir,
    "data": config.data.source,
    "synthetic_data": config.data.source == "phantom",
    "image_size": config.data.image_size,
    "steps": summary.get("steps"),
    "wall_seconds": round(time.time() - start, 1),
    "threshold": summary.get("threshold"),
    "sets": _sets(run_dir, summary.get("threshold")),
  }


def _key(row: dict) -> tuple:
  if row["kind"] == "pretrain":
    return ("pretrain", row["encoder"])
  return ("finetune", row["init"], row["variant"], row["labels_percent"], row["seed"])


def _compare(rows: list[dict]) -> list[dict]:
  """SSL vs scratch at the same fraction and seed; ablation variants vs cross-attention."""
  by_key = {_key(r): r for r in rows}
  out = []
  for r in rows:
    if r["kind"] != "finetune":
      continue
    if r["init"] != "scratch":
      ref_key = ("finetune", "scratch", r["variant"], r["labels_percent"], r["seed"])
      what = f"{r['init']} − scratch"
    elif r["variant"] != "cross_attention":
      ref_key = ("finetune", "scratch", "cross_attention", r["labels_percent"], r["seed"])
      what = f"{r['variant']} − cross_attention"
    else:
      continue
    ref = by_key.get(ref_key)
    if ref is None:
      continue
    for name in r["sets"]:
      paired = common.paired_auc_difference(
        common.load_predictions(r["workdir"], name),
        common.load_predictions(ref["workdir"], name),
        _BOOTSTRAP.value,
      )
      if paired is not None:
        out.append(
          {"comparison": what, "labels_percent": r["labels_percent"], "seed": r["seed"],
           "set": name, **paired}
        )  # fmt: skip
  return out


def _aggregate(rows: list[dict]) -> list[dict]:
  """Mean and sd over seeds per (init, variant, fraction, set); one seed keeps its CI."""
  out = []
  groups = dict.fromkeys(_key(r)[:4] for r in rows if r["kind"] == "finetune")
  for group in groups:
    members = [r for r in rows if r["kind"] == "finetune" and _key(r)[:4] == group]
    for name in ("test", "busbra"):
      sets = [m["sets"][name] for m in members if name in m["sets"]]
      if not sets:
        continue
      entry = {"init": group[1], "variant": group[2], "labels_percent": group[3]}
      entry.update(set=name, seeds=len(sets))
      for key in ("auc", "auc_leak_free", "balanced_accuracy", "sensitivity", "specificity"):
        values = np.array([s[key] for s in sets if s.get(key) is not None], float)
        if len(values):
          spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
          entry[key] = [float(values.mean()), spread]
      if len(sets) == 1:
        entry["auc_ci"] = sets[0]["auc_ci"]
      entry["minutes"] = float(np.mean([m["wall_seconds"] for m in members]) / 60)
      out.append(entry)
  return out


def _markdown(result: dict) -> str:
  synthetic = any(r.get("synthetic_data") for r in result["rows"])
  names = {"test": "phantom test" if synthetic else "BUSI test", "busbra": "BUS-BRA-dev"}
  lines = ["**SYNTHETIC phantom data: not a clinical result.**\n"] if synthetic else []

  def pm(v, seeds):
    return f"{v[0]:.3f} ± {v[1]:.3f}" if seeds > 1 else f"{v[0]:.3f}"

  pretrains = [r for r in result["rows"] if r["kind"] == "pretrain"]
  if pretrains:
    lines += [
      "| encoder | pretrained on (unlabelled) | images | steps | linear probe AUC, test "
      "[clustered 95% CI] | linear probe AUC, BUS-BRA-dev | minutes |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in pretrains:
      cells = []
      for name in ("test", "busbra"):
        s = r["sets"].get(name)
        cells.append(
          "–" if s is None else f"{s['auc']:.3f} [{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}]"
        )
      lines.append(
        f"| {r['encoder']} | {r['pretrained_on']} | {r['pretraining_images']} | {r['steps']} | "
        f"{cells[0]} | {cells[1]} | {r['wall_seconds'] / 60:.1f} |"
      )
    lines.append("")
  lines += [
    "| start | model | labels | set | seeds | AUC (mean ± sd; one seed: [clustered 95% CI]) | "
    "balanced acc. @ val threshold | sensitivity | specificity | minutes |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for e in result["aggregate"]:
    n = e["seeds"]
    auc = pm(e["auc"], n)
    if "auc_ci" in e:
      auc += f" [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]"
    if "auc_leak_free" in e:
      auc += f"; without copies of train images {pm(e['auc_leak_free'], n)}"
    set_name = names.get(e["set"], e["set"])
    if e["set"] == "busbra" and e["init"] == "ssl_busi_busbra":
      set_name += " (images seen unlabelled)"
    lines.append(
      f"| {e['init']} | {e['variant']} | {e['labels_percent']}% | {set_name} | {n} | {auc} | "
      f"{pm(e['balanced_accuracy'], n)} | {pm(e['sensitivity'], n)} | "
      f"{pm(e['specificity'], n)} | {e['minutes']:.1f} |"
    )
  if result["comparisons"]:
    lines += [
      "",
      "| comparison | labels | set | seed | ΔAUC | 95% CI (paired, clustered) | DeLong p |",
      "|---|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
      lo, hi = c["auc_diff_ci_clustered"]
      lines.append(
        f"| {c['comparison']} | {c['labels_percent']}% | {names.get(c['set'], c['set'])} | "
        f"{c['seed']} | {c['auc_diff']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {c['delong_p']:.3f} |"
      )
    lines += [
      "",
      "| comparison | labels | set | seeds | mean ΔAUC (range) | seeds whose paired CI is above 0 "
      "/ below 0 |",
      "|---|---|---|---|---|---|",
    ]
    groups = dict.fromkeys(
      (c["comparison"], c["labels_percent"], c["set"]) for c in result["comparisons"]
    )
    for what, percent, name in groups:
      cs = [
        c
        for c in result["comparisons"]
        if (c["comparison"], c["labels_percent"], c["set"]) == (what, percent, name)
      ]
      deltas = [c["auc_diff"] for c in cs]
      above = sum(c["auc_diff_ci_clustered"][0] > 0 for c in cs)
      below = sum(c["auc_diff_ci_clustered"][1] < 0 for c in cs)
      lines.append(
        f"| {what} | {percent}% | {names.get(name, name)} | {len(cs)} | {np.mean(deltas):+.3f} "
        f"({min(deltas):+.3f} to {max(deltas):+.3f}) | {above} / {below} |"
      )
  return "\n".join(lines)


def _plan() -> list[tuple]:
  """Run order: encoders first, then the small fractions seed by seed (so a stopped benchmark
  still compares like with like), then 100%, then the ablation."""
  plan = [("pretrain", e) for e in ENCODERS if e in _INITS.value]
  seeds = [int(s) for s in _SEEDS.value]
  small = [f for f in _FRACTIONS.value if f != "100"]
  for seed in seeds:
    for percent in small:
      plan += [("finetune", init, "cross_attention", int(percent), seed) for init in _INITS.value]
  if "100" in _FRACTIONS.value:
    for seed in seeds[: _FULL_SEEDS.value]:
      plan += [("finetune", init, "cross_attention", 100, seed) for init in _INITS.value]
  for seed in seeds[: _ABLATION_SEEDS.value]:
    plan += [("finetune", "scratch", v, 100, seed) for v in _ABLATION.value]
  return list(dict.fromkeys(plan))


def main(argv):
  del argv
  if _RENDER.value:
    for path in _RENDER.value:
      with open(path) as f:
        result = json.load(f)
      result["aggregate"] = _aggregate(result["rows"])
      print(_markdown(result))
    return
  unknown = (set(_INITS.value) - set(INITS)) | (set(_ABLATION.value) - set(ABLATION))
  unknown |= set(_FRACTIONS.value) - set(ssl_finetune.LABEL_PERCENTS)
  if unknown:
    raise app.UsageError(f"unknown inits / ablation rows / fractions: {sorted(unknown)}")
  if _BUSI.value and not _SPLIT.value:
    raise app.UsageError("--busi_root needs --split_file (the BreastMNIST split)")
  rows = common.start(_WORKDIR.value, _OUTPUT.value)

  def result():
    return {
      "benchmark": "label_efficiency",
      "data": {"busi": _BUSI.value, "split_file": _SPLIT.value, "busbra": _BUSBRA.value},
      "machine": common.machine(),
      "rows": rows,
      "aggregate": _aggregate(rows),
      "comparisons": _compare(rows),
    }

  done = {_key(r) for r in rows}
  for item in _plan():
    if item in done:
      continue
    row = _pretrain(item[1]) if item[0] == "pretrain" else _finetune(item[1], str(item[3]),
                                                                      item[4], item[2])  # fmt: skip
    rows.append(row)
    # After every run: a later crash or kill must not cost the finished ones.
    common.write_json_atomic(_OUTPUT.value, result())
    print(f"{_key(row)}: {json.dumps(row['sets'])}", flush=True)
  final = result()
  print(_markdown(final))
  common.write_json_atomic(_OUTPUT.value, final)


if __name__ == "__main__":
  app.run(main)
