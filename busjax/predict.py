r"""Predicts with a finished busjax run: one CSV row per image.

  python -m busjax.predict --workdir=runs/busi --input=new_scans/ [--input=more.png ...] \
      --output=predictions.csv

`--input` takes folders (every image in them; files named *_mask* are skipped), image files, or a
CSV with a ``path`` (or ``image``) column. Columns: path, p_<class> for each class, p_malignant
and p_malignant_calibrated (temperature fitted on the run's val part), and the decision at the
run's threshold (chosen on its val part). An unreadable image is named on stderr and skipped;
the others are still predicted. A ``# provenance`` comment line heads the CSV (the run, what it
was trained on, its threshold and temperature). With ``--overlays=DIR``, one PNG per image in DIR:
the image and the Grad-CAM of the decided class at the model's last feature map, titled with the
raw and calibrated p(malignant) and the decision (`busjax.explain` has every method and scores
them against lesion masks). A seed ensemble's run predicts with the mean of its members and
overlays the mean of their Grad-CAMs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from absl import flags, logging

from busjax import cli, inference
from busjax.data import records


def _define_flags():
  """Flags exist only when this module runs as the program (its siblings define the same
  names)."""
  global _BATCH, _INPUT, _OUTPUT, _OVERLAYS, _WORKDIR
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
  _INPUT = flags.DEFINE_multi_string("input", None, "Folder, image file or CSV.", required=True)
  _OUTPUT = flags.DEFINE_string("output", "predictions.csv", "The CSV to write.")
  _BATCH = flags.DEFINE_integer("batch_size", 16, "Images per (fixed-size) batch.")
  _OVERLAYS = flags.DEFINE_string("overlays", None, "Folder for Grad-CAM overlay PNGs.")


def predict(
  workdir: str, inputs: list[str], output: str, batch_size: int = 16, overlays: str | None = None
) -> dict:
  """Writes `output` (and the overlay PNGs); returns {"predicted": n, "skipped": [...]}."""
  run = inference.load_run(workdir)
  data = inference.read_inputs(inputs)
  images = run.prepare(data.images)
  probs, calibrated = run.predictor(batch_size)(images)
  malignant = records.MALIGNANT
  threshold = run.decision_threshold
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
  if overlays and data.paths:
    _overlays(run, overlays, data.paths, images, probs, calibrated, batch_size)
  return {"predicted": len(data.paths), "skipped": data.skipped}


def _overlays(run, out, paths, images, probs, calibrated, batch_size) -> None:
  import jax.numpy as jnp
  import numpy as np

  from busjax import explain

  malignant = records.MALIGNANT
  decided = run.decided_class(probs)
  x = np.asarray(run.preprocess(jnp.asarray(images)), np.float32)
  # A seed ensemble's map is the mean of its members' (each normalised as one model's would be).
  members = [dataclasses.replace(run, model=m, ensemble=()) for m in (run.model, *run.ensemble)]
  maps = np.mean(
    [explain.method_maps(m, "gradcam", x, decided, batch_size) for m in members], axis=0
  )
  synthetic = inference.run_provenance(run)["synthetic_training_data"]
  os.makedirs(out, exist_ok=True)
  for i, path in enumerate(paths):
    name = run.class_names[decided[i]]
    explain.write_panel(
      os.path.join(out, f"{i:04d}_{os.path.splitext(os.path.basename(path))[0]}.png"),
      images[i, ..., 0],
      None,
      {"Grad-CAM": maps[i]},
      f"p(malignant) {probs[i, malignant]:.2f} (calibrated {calibrated[i, malignant]:.2f})\n"
      f"decision: {name}",
      name,
      synthetic,
      run.source,
    )


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = inference.run_cli(
    lambda: predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value, _BATCH.value, _OVERLAYS.value)
  )
  if result is None:
    return 1
  print(f"{result['predicted']} images -> {_OUTPUT.value} ({len(result['skipped'])} skipped)")
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
