r"""Predicts with a finished busjax run: one CSV row per image.

  python -m busjax.predict --workdir=runs/busi --input=new_scans/ [--input=more.png ...] \
      --output=predictions.csv

`--input` takes folders (every image in them; files named *_mask* are skipped), image files, or a
CSV with a ``path`` (or ``image``) column. Columns: path, p_<class> for each class, p_malignant
and p_malignant_calibrated (temperature fitted on the run's val part), and the decision at the
run's threshold (chosen on its val part). An unreadable image is named on stderr and skipped;
the others are still predicted. A ``# provenance`` comment line heads the CSV (the run, what it
was trained on, its threshold and temperature).
"""

from __future__ import annotations

import csv
import json
import os

from absl import app, flags, logging

from busjax import inference
from busjax.data import records


def _define_flags():
  """Flags exist only when this module runs as the program (its siblings define the same
  names)."""
  global _BATCH, _INPUT, _OUTPUT, _WORKDIR
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
  _INPUT = flags.DEFINE_multi_string("input", None, "Folder, image file or CSV.", required=True)
  _OUTPUT = flags.DEFINE_string("output", "predictions.csv", "The CSV to write.")
  _BATCH = flags.DEFINE_integer("batch_size", 16, "Images per (fixed-size) batch.")


def predict(workdir: str, inputs: list[str], output: str, batch_size: int = 16) -> dict:
  """Writes `output`; returns {"predicted": n, "skipped": [one line each]}."""
  run = inference.load_run(workdir)
  data = inference.read_inputs(inputs)
  probs, calibrated = run.predictor(batch_size)(run.prepare(data.images))
  malignant = records.MALIGNANT
  threshold = run.threshold if run.threshold is not None else 0.5
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".tmp"
  with open(tmp, "w", newline="") as f:
    f.write(f"# provenance: {json.dumps(inference.run_provenance(run))}\n")
    writer = csv.writer(f)
    writer.writerow(
      [
        "path",
        *[f"p_{c}" for c in run.class_names],
        "p_malignant_calibrated",
        f"decision_at_{threshold:.4f}",
      ]
    )
    for path, p, pc in zip(data.paths, probs, calibrated, strict=True):
      call = (
        run.class_names[malignant]
        if p[malignant] >= threshold
        else "not " + (run.class_names[malignant])
      )
      writer.writerow([path, *[f"{v:.6f}" for v in p], f"{pc[malignant]:.6f}", call])
  os.replace(tmp, output)
  return {"predicted": len(data.paths), "skipped": data.skipped}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = inference.run_cli(
    lambda: predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value, _BATCH.value)
  )
  if result is None:
    return 1
  print(f"{result['predicted']} images -> {_OUTPUT.value} ({len(result['skipped'])} skipped)")
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
