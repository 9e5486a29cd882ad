r"""Explains a finished busjax run's predictions: saliency panels and, with masks, how they score.

  python -m busjax.explain --workdir=runs/busi --input=scans.csv \
      --methods=gradcam,ig,smoothgrad,eg,shap --layer=stage3 --out=runs/busi/explanations

`--input` as `busjax.predict` (folders, files, or a CSV with ``path`` and optional ``mask``
columns). For each image, ``panels/NAME.png``: the image (the lesion outlined when a mask is
given) and one map per method (its positive part), each explaining the class the run predicts
at its threshold (``--target=malignant|benign`` to fix it), titled with p(malignant). With
masks, ``explain.json`` and ``faithfulness.md``: per method, the mean pointing game, energy
inside the lesion, top-10% IoU with the lesion, and deletion / insertion areas, beside a
random-map baseline row (a method is only worth trusting where it beats it). Unreadable images
are named and skipped. Figures say SYNTHETIC when the run trained on synthetic data.

Methods (`evaluators.saliency`): gradcam / gradcam_pp at `--layer` (any named feature map of the
model; the last by default; an unknown name lists the model's maps), gradients, smoothgrad, ig
(from the run's black level), eg (expected gradients over up to 32 of the inputs as the
background), shap (Owen values from shap's Partition explainer, hidden superpixels set to the
black level, `--shap_evals` model calls per image; also ``shap.png``, shap's own image plot of
the first eight images). shap needs ``pip install 'busjax[explain]'``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from busjax import cli, inference
from busjax.data import augment, records
from busjax.evaluators import saliency


def _define_flags():
  """Flags exist only when this module runs as the program (its siblings define the same
  names)."""
  global _BATCH, _INPUT, _LAYER, _METHODS, _OUT, _SHAP_EVALS, _TARGET, _WORKDIR
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
  _INPUT = flags.DEFINE_multi_string("input", None, "Folder, image file or CSV.", required=True)
  _METHODS = flags.DEFINE_list(
    "methods", ["gradcam", "ig", "smoothgrad"], f"Of {saliency.METHODS}."
  )
  _LAYER = flags.DEFINE_string("layer", None, "Grad-CAM's feature map (default: the last).")
  _SHAP_EVALS = flags.DEFINE_integer("shap_evals", 500, "Model calls per image for shap.")
  _OUT = flags.DEFINE_string("out", "explanations", "Output folder.")
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Images per (fixed-size) batch.")
  _TARGET = flags.DEFINE_enum(
    "target", "predicted", ["predicted", "malignant", "benign"], "Which class each map explains."
  )


def write_panel(path, image, mask, maps, title, target_name, synthetic, source) -> None:
  """One PNG: the image (lesion outlined when `mask`), then each map's positive part over it."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 3.0))
  axes = np.atleast_1d(axes)
  axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
  if mask is not None:
    axes[0].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
  axes[0].set_title(title, fontsize=8)
  for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(np.maximum(m, 0.0), cmap="jet", alpha=0.45)  # Evidence for the class.
    if mask is not None:
      ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(f"{name} ({target_name})", fontsize=8)
  for ax in axes:
    ax.axis("off")
  note = "SYNTHETIC DATA - " if synthetic else ""
  fig.suptitle(f"{note}model trained on {source}", fontsize=7, color="firebrick" if note else "k")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def explain(
  workdir: str,
  inputs: list[str],
  methods: list[str],
  out: str,
  batch_size: int = 8,
  target: str = "predicted",
  layer: str | None = None,
  shap_evals: int = 500,
) -> dict:
  """Writes panels (and the faithfulness table when masks are given); returns the table."""
  unknown = set(methods) - set(saliency.METHODS)
  if unknown:
    raise records.DataError(f"--methods: unknown {sorted(unknown)}; expected {saliency.METHODS}")
  run = inference.load_run(workdir)
  if run.ensemble:  # A map explains one model's gradients; the members' would differ.
    raise records.DataError(
      f"{workdir} is a seed ensemble of {len(run.ensemble) + 1} models: explain one member, "
      f"e.g. --workdir={os.path.join(workdir, 'member0')}"
    )
  data = inference.read_inputs(inputs)
  if not data.paths:
    raise records.DataError(f"no readable image in {inputs}: {'; '.join(data.skipped)}")
  size = run.image_size
  images = run.prepare(data.images)  # uint8 (N, S, S, 1), as the run evaluated them.
  probs, _ = run.predictor(batch_size)(images)
  if target == "predicted":
    targets = run.decided_class(probs)
  else:
    targets = np.full(len(images), run.class_names.index(target), np.int32)
  masks = [None if m is None else augment.resize_pad(m, size) for m in data.masks]
  x = np.asarray(run.preprocess(jnp.asarray(images)), np.float32)
  os.makedirs(os.path.join(out, "panels"), exist_ok=True)
  maps = {}
  for method in methods:
    maps[method] = method_maps(run, method, x, targets, batch_size, layer, shap_evals)
    if method == "shap":
      _shap_plot(os.path.join(out, "shap.png"), images, maps[method], targets, run)

  provenance = inference.run_provenance(run)
  synthetic = provenance["synthetic_training_data"]
  for i, path in enumerate(data.paths):
    name = os.path.splitext(os.path.basename(path))[0]
    write_panel(
      os.path.join(out, "panels", f"{i:04d}_{name}.png"),
      images[i, ..., 0],
      masks[i],
      {m: maps[m][i] for m in methods},
      f"p(malignant) {probs[i, records.MALIGNANT]:.2f}",
      run.class_names[targets[i]],
      synthetic,
      run.source,
    )
  result = {"provenance": provenance, "images": len(data.paths), "skipped": data.skipped}
  with_mask = [i for i, m in enumerate(masks) if m is not None and m.any()]
  if with_mask:
    result["faithfulness"] = _faithfulness(run, x, maps, targets, masks, with_mask, batch_size)
    result["images_with_mask"] = len(with_mask)
    _write_table(out, result)
  with open(os.path.join(out, "explain.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def method_maps(run, method, x, targets, batch_size, layer=None, shap_evals=300) -> np.ndarray:
  """(N, S, S) maps of one method on the preprocessed images `x`, explaining class `targets`
  (N,), in fixed-size jitted batches (`predict --overlays` uses it too)."""
  if method == "shap":
    prob_fn = run.probabilities(64, preprocessed=True)
    return saliency.partition_shap(
      prob_fn, x, targets, mask_value=run.black, max_evals=shap_evals, batch_size=64
    )
  kwargs = {}
  if method == "ig":
    kwargs = {"baseline": run.black}
  elif method == "eg":
    pick = np.random.default_rng(0).permutation(len(x))[:32]
    kwargs = {"background": jnp.asarray(x[np.sort(pick)])}
  elif method in ("gradcam", "gradcam_pp"):
    kwargs = {"layer": layer}
  try:
    explainer = saliency.make_explainer(run.model, method, **kwargs)
    return inference.batched(
      lambda xx, tt: explainer(jnp.asarray(xx), jnp.asarray(tt)), x, targets, batch_size=batch_size
    )
  except ValueError as error:  # E.g. an unknown --layer: the message lists the model's maps.
    raise records.DataError(f"--methods={method}: {error}") from None


def _shap_plot(path, images, values, targets, run) -> None:
  """shap's own image plot (red: evidence for the explained class) of the first 8 images."""
  import matplotlib

  matplotlib.use("Agg")
  import shap
  from matplotlib import pyplot as plt

  n = min(8, len(images))
  shap.image_plot(
    [values[:n, ..., None]],
    images[:n].astype(np.float32) / 255.0,
    labels=np.array([[f"SHAP: {run.class_names[t]}"] for t in targets[:n]]),
    show=False,
  )
  plt.gcf().savefig(path, dpi=100)
  plt.close("all")


def _faithfulness(run, x, maps, targets, masks, rows, batch_size) -> dict:
  """Mean mask agreement and deletion/insertion areas per method, and a random-map baseline."""
  prob_fn = run.probabilities(batch_size, preprocessed=True)
  mask_array = np.stack([masks[i] for i in rows]).astype(np.float64)
  random = np.random.default_rng(0).random(mask_array.shape)
  table = {}
  for method, m in {**{k: v[rows] for k, v in maps.items()}, "random": random}.items():
    curves = saliency.deletion_insertion(
      prob_fn, x[rows], m, targets[rows], steps=10, baseline=run.black
    )
    table[method] = {
      "pointing_game": float(np.mean(saliency.pointing_game(m, mask_array))),
      "energy_in_mask": float(np.nanmean(saliency.energy_in_mask(m, mask_array))),
      "top10_iou": float(np.mean(saliency.top_fraction_iou(m, mask_array, 0.1))),
      "deletion_auc": float(np.mean(curves["deletion"])),
      "insertion_auc": float(np.mean(curves["insertion"])),
    }
  table["lesion_share_of_image"] = float(mask_array.mean())
  return table


def _write_table(out: str, result: dict) -> None:
  table = result["faithfulness"]
  lines = [
    f"Images with a lesion mask: {result['images_with_mask']}; model trained on "
    f"{result['provenance']['trained_on']}. Lesions cover {table['lesion_share_of_image']:.1%} "
    "of the image on average (a uniform map's energy in the mask).",
    "",
    "| method | pointing game | energy in lesion | top-10% IoU | deletion AUC (lower better) | "
    "insertion AUC (higher better) |",
    "|---|---|---|---|---|---|",
  ]
  for method, row in table.items():
    if isinstance(row, dict):
      lines.append(
        f"| {method} | {row['pointing_game']:.2f} | {row['energy_in_mask']:.2f} | "
        f"{row['top10_iou']:.2f} | {row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} |"
      )
  with open(os.path.join(out, "faithfulness.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = inference.run_cli(
    lambda: explain(
      _WORKDIR.value,
      _INPUT.value,
      _METHODS.value,
      _OUT.value,
      _BATCH.value,
      _TARGET.value,
      _LAYER.value,
      _SHAP_EVALS.value,
    )
  )
  if result is None:
    return 1
  print(f"{result['images']} images explained -> {_OUT.value}")
  if "faithfulness" in result:
    with open(os.path.join(_OUT.value, "faithfulness.md")) as f:
      print(f.read())
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
