"""Does fusing mammography with ultrasound help? The multimodal ablations at two phantom settings.

Rows (configs/multimodal.py arguments), per phantom setting and seed:
  stack            both modalities, attention branches, the four-learner stack (the method)
  us_only          ultrasound branch alone, same stack
  mammo_only       mammography branch alone, same stack
  lr, svm, rf, et  one base learner alone on both modalities
  no_attention     both modalities, branches without ECA / CBAM, the stack
  end_to_end       the same two attention branches under one head, trained jointly (no stack)
Rows that differ only in stage 2 reuse the `stack` run's trained branches
(``multimodal.branches_dir``), so they compare stage-2 choices on identical features.

The paired phantom's ``shared`` knob (how often the mammographic mass repeats the ultrasound
lesion's shape and margin) is run at two settings, so that "fusion helps" is not built into one
choice of data. We know of no public paired mammography + ultrasound set: every row is on
SYNTHETIC phantoms. Per run: test AUC with a clustered CI (patients are the clusters); each row vs
`stack` at the same setting and seed: paired clustered bootstrap ΔAUC and DeLong.

  python -m benchmarks.multimodal --shared=0.2,0.8 --seeds=0,1,2 --workdir=/tmp/mm \\
      --output=/tmp/multimodal.json
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from busjax import configlib
from busjax.trainers import multimodal
from configs import multimodal as multimodal_config

ROWS = {
  "stack": "",
  "us_only": "modality=us",
  "mammo_only": "modality=mammo",
  "lr": "learner=lr",
  "svm": "learner=svm",
  "rf": "learner=rf",
  "et": "learner=et",
  "no_attention": "attention=none",
  "end_to_end": "fusion=end_to_end",
}
_OWN_BRANCHES = (
  "stack",
  "no_attention",
  "end_to_end",
)  # The others reuse the `stack` run's branches.

_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to run, of {list(ROWS)}.")
_SHARED = flags.DEFINE_list("shared", ["0.2", "0.8"], "Phantom settings of data.paired.shared.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (phantom draw, split and training).")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra overrides `a.b=value` (Python literal).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/busjax_multimodal", "Where runs go.")
_OUTPUT = common.output_flag("JSON results (also the resume record).")
_RENDER = flags.DEFINE_list("render", [], "Only print the tables of these --output files.")


def _run_dir(row: str, shared: float, seed: int) -> str:
  return os.path.join(_WORKDIR.value, f"shared{shared:g}__seed{seed}__{row}")


def _run(row: str, shared: float, seed: int) -> dict:
  config = multimodal_config.get_config(ROWS[row])
  config.data.paired.shared = shared
  config.data.paired.seed = seed
  config.split.seed = seed
  config.seed = seed
  if row not in _OWN_BRANCHES:
    config.multimodal.branches_dir = _run_dir("stack", shared, seed)
  common.apply_overrides(config, _OVERRIDES.value)
  configlib.validate(config)
  run_dir = _run_dir(row, shared, seed)
  start = time.time()
  summary = multimodal.train_and_evaluate(config, run_dir)
  preds = common.load_predictions(run_dir, "test")
  return {
    "row": row,
    "shared": shared,
    "seed": seed,
    "workdir": run_dir,
    "synthetic_data": True,
    "wall_seconds": round(time.time() - start, 1),
    "threshold": summary.get("threshold"),
    "stage2_val_auc": summary.get("stage2_val_auc"),
    "sets": {"test": common.set_metrics(preds, summary.get("threshold"), _BOOTSTRAP.value)},
  }


def _compare(rows: list[dict]) -> list[dict]:
  by_key = {(r["row"], r["shared"], r["seed"]): r for r in rows}
  out = []
  for r in rows:
    ref = by_key.get(("stack", r["shared"], r["seed"]))
    if r["row"] == "stack" or ref is None:
      continue
    paired = common.paired_auc_difference(
      common.load_predictions(r["workdir"], "test"),
      common.load_predictions(ref["workdir"], "test"),
      _BOOTSTRAP.value,
    )
    if paired is not None:
      out.append({"row": r["row"], "shared": r["shared"], "seed": r["seed"], **paired})
  return out


def _aggregate(rows: list[dict]) -> list[dict]:
  out = []
  for key in dict.fromkeys((r["shared"], r["row"]) for r in rows):
    members = [r for r in rows if (r["shared"], r["row"]) == key]
    aucs = np.array([m["sets"]["test"]["auc"] for m in members], float)
    entry = {"shared": key[0], "row": key[1], "seeds": len(members)}
    entry["auc"] = [float(aucs.mean()), float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0]
    if len(members) == 1:
      entry["auc_ci"] = members[0]["sets"]["test"]["auc_ci"]
    entry["minutes"] = float(np.mean([m["wall_seconds"] for m in members]) / 60)
    out.append(entry)
  return out


def _markdown(result: dict) -> str:
  lines = [
    "**SYNTHETIC paired phantoms (no public paired set exists): not a clinical result.**"
    + (f" Config overrides: `{' '.join(result['overrides'])}`." if result.get("overrides") else "")
    + "\n",
    "| shared | row | seeds | test AUC per patient (mean ± sd; one seed: [clustered 95% CI]) | "
    "minutes |",
    "|---|---|---|---|---|",
  ]
  for e in sorted(result["aggregate"], key=lambda e: (e["shared"], list(ROWS).index(e["row"]))):
    auc = f"{e['auc'][0]:.3f}" + (f" ± {e['auc'][1]:.3f}" if e["seeds"] > 1 else "")
    if "auc_ci" in e:
      auc += f" [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]"
    lines.append(f"| {e['shared']:g} | {e['row']} | {e['seeds']} | {auc} | {e['minutes']:.1f} |")
  if result["comparisons"]:
    lines += [
      "",
      "| row − stack | shared | seed | ΔAUC | 95% CI (paired, clustered) | DeLong p |",
      "|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
      lo, hi = c["auc_diff_ci_clustered"]
      lines.append(
        f"| {c['row']} | {c['shared']:g} | {c['seed']} | {c['auc_diff']:+.3f} | "
        f"[{lo:+.3f}, {hi:+.3f}] | {c['delong_p']:.3f} |"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  if _RENDER.value:
    for path in _RENDER.value:
      with open(path) as f:
        result = json.load(f)
      result["aggregate"] = _aggregate(result["rows"])
      print(_markdown(result))
    return
  unknown = set(_ROWS.value) - set(ROWS)
  if unknown:
    raise app.UsageError(f"unknown rows {sorted(unknown)}; expected {list(ROWS)}")
  rows = common.start(_WORKDIR.value, _OUTPUT.value)

  def result():
    return {
      "benchmark": "multimodal",
      "data": "paired phantoms (SYNTHETIC)",
      "overrides": list(_OVERRIDES.value),
      "machine": common.machine(),
      "rows": rows,
      "aggregate": _aggregate(rows),
      "comparisons": _compare(rows),
    }

  done = {(r["row"], r["shared"], r["seed"]) for r in rows}
  # `stack` first in every (setting, seed): the stage-2 rows reuse its branches.
  order = ["stack", *[r for r in _ROWS.value if r != "stack"]]
  for seed in (int(s) for s in _SEEDS.value):
    for shared in (float(s) for s in _SHARED.value):
      for row in order:
        if (row, shared, seed) in done or (row not in _ROWS.value and row != "stack"):
          continue
        rows.append(_run(row, shared, seed))
        common.write_json_atomic(_OUTPUT.value, result())
        print(f"{row} shared={shared:g} seed {seed}: {json.dumps(rows[-1]['sets'])}", flush=True)
  final = result()
  print(_markdown(final))
  common.write_json_atomic(_OUTPUT.value, final)


if __name__ == "__main__":
  app.run(main)
