"""Generalisation across scanners: train on BUSI, evaluate on BUS-BRA, lever by lever.

Each *lever* is a config switch (``LEVERS``); each is trained with several seeds under the same
protocol (BUSI with BreastMNIST's split: its val part is the in-domain test, checkpoint and
threshold are chosen on a grouped 15% of its train part), then evaluated on BUS-BRA, whose labels
choose nothing. On every finished run, evaluation-only *variants* are added (``VARIANTS``):
horizontal-flip test-time augmentation; BatchNorm statistics re-estimated on BUS-BRA's
unlabelled images (AdaBN: it sees the target domain, so it is a row of its own); and the shortcut
test, "unmarked": every image with its calipers and text suppressed (`augment.suppress_marks`),
with the share of calls that change against the same models on the original images.

For every (lever, variant) row, from the runs' stored predictions:
  * per seed: BUSI test AUC and BUS-BRA AUC (mean and sd over seeds);
  * the gain over the baseline: the mean over seeds of AUC(lever) - AUC(baseline), with a paired
    bootstrap CI that resamples BUS-BRA's clusters (patient joined with near-duplicates) for both
    at once, in-domain and external;
  * the seed ensemble (mean probability): BUS-BRA AUC with a clustered CI, specificity at the
    radiologist's sensitivity and at sensitivity 0.93 (the issue's target), sensitivity at the
    radiologist's specificity, AUC per scanner;
  * where a threshold chosen on BUSI lands on BUS-BRA: Youden's on BUSI val, and the one meant for
    sensitivity 0.93 on BUSI val (the target: it lands within 0.05 of 0.93);
  * the ensemble's gain over the baseline's ensemble, paired as above.
The "folds" lever is a fold ensemble: member k selects its checkpoint on grouped fold k of five of
BUSI's train part (`split.val_fold`) and trains on the other four; its BUSI threshold is chosen on
the members' pooled out-of-fold val predictions. "busbra_cv" is a reference, not a lever: the
baseline recipe trained on BUS-BRA itself (cross-validated over its official patient folds) and
scored out of fold on the same images, i.e. how far in-domain training gets on this model and data.
Prints a ranked markdown table; JSON (``--output``) is rewritten after every run, and a re-run of
the same command skips finished runs (it also resumes a killed one from its last checkpoint).

  python -m benchmarks.external --busi_root=../shared/data/Dataset_BUSI_with_GT \\
      --split_file=../shared/data/busi_breastmnist_split.tsv \\
      --busbra_root=../shared/data/BUS-BRA-dev --levers=baseline,mask,lesion_crop \\
      --seeds=0,1,2 --workdir=runs/external --output=runs/external/external.json
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time

import ml_collections
import numpy as np
from absl import app, flags, logging

from benchmarks import common
from busjax import configlib
from busjax.data import augment, records, sources
from busjax.evaluators import metrics, readers


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """A run whose weights start every seed of a lever (trained once, seed 0, in LEVER/pretrain)."""

  config: str  # A config file with its arguments, as given: no protocol argument is added.
  overrides: tuple[str, ...]
  encoder: bool  # A contrastive run: its encoder is loaded (config.init_from_encoder), not a head.


@dataclasses.dataclass(frozen=True)
class Lever:
  config: str  # A config file with its arguments (the protocol's are added).
  overrides: tuple[str, ...]  # `a.b=value` on top of it.
  what: str
  pretrain: Pretraining | None = None
  # `a.b=value` set per member, "{seed}" replaced by the member's seed (a fold ensemble's folds).
  per_seed: tuple[str, ...] = ()
  # A reference, not a lever: trained on BUS-BRA itself (cross-validated over its official
  # patient folds), its out-of-fold predictions scored on the same images as every lever.
  trains_on_target: bool = False


SSL_STEPS = 500  # Steps of 64 pairs: ~70 epochs of BUSI's 453 non-test benign/malignant images.

LEVERS = {
  "baseline": Lever("configs/supervised.py", (), "README's supervised ResNet-18 (w 0.5), 128 px"),
  "mask": Lever(
    "configs/supervised.py",
    ("train.mask_loss.weight=1.0",),
    "+ lesion-mask auxiliary loss (segmentation head on stage3, BCE + Dice, weight 1)",
  ),
  "mask_light": Lever(
    "configs/supervised.py",
    ("train.mask_loss.weight=0.3",),
    "+ lesion-mask auxiliary loss at weight 0.3",
  ),
  "lesion_crop": Lever(
    "configs/supervised.py",
    ("input.augment.lesion_crop.probability=0.5",),
    "+ lesion-centred crops, randomised field of view (half the images)",
  ),
  "marks": Lever(
    "configs/supervised.py",
    ("input.augment.suppress_marks.probability=0.5",),
    "+ caliper/text suppression as augmentation (half the images)",
  ),
  "trivial": Lever(
    "configs/supervised.py",
    ("input.augment.policy='trivial'",),
    "generic TrivialAugment intensity policy instead of the ultrasound one",
  ),
  "generalise": Lever(
    "configs/generalise.py",
    ("ensemble.members=1",),  # Its seed ensemble is this benchmark's, over the lever's seeds.
    "configs/generalise.py: mask loss + flip TTA",
  ),
  "folds": Lever(
    "configs/supervised.py",
    ("split.val_fraction=0.2",),
    "5-fold ensemble: member k selects its checkpoint on grouped fold k of BUSI's train part "
    "and trains on the other four (run with folds@0+1+2+3+4)",
    per_seed=("split.val_fold={seed}",),
  ),
  "half_data": Lever(
    "configs/supervised.py",
    ("split.label_fraction=0.5",),
    "half of BUSI's train part (whole patients and copies, per class; a different half per seed): "
    "does cross-scanner AUC grow with more BUSI images?",
    per_seed=("split.label_fraction_seed={seed}",),
  ),
  "busbra_cv": Lever(
    "configs/supervised.py",
    (),
    "reference (uses BUS-BRA's labels): the baseline recipe trained on BUS-BRA-dev itself, "
    "cross-validated over its official patient folds, out-of-fold predictions",
    trains_on_target=True,
  ),
  "res224": Lever("configs/supervised.py", ("data.image_size=224",), "224 px instead of 128"),
  "bf16": Lever(
    "configs/supervised.py",
    ("model.dtype='bfloat16'",),
    "bfloat16 compute (float32 parameters, BatchNorm statistics and loss): what an "
    "accelerator run would use, its accuracy effect",
  ),
  "ssl": Lever(
    "configs/supervised.py",
    (),
    "init: SimCLR pretraining (ultrasound views) on BUSI's non-test images, labels ignored",
    Pretraining(
      "configs/ssl_pretrain.py:busi,backbone=plain",
      ("data.image_size=128", f"ssl.steps={SSL_STEPS}"),
      encoder=True,
    ),
  ),
  "ssl_busbra": Lever(
    "configs/supervised.py",
    (),
    "init: SimCLR pretraining on BUSI's non-test + BUS-BRA's images (sees the target, unlabelled)",
    Pretraining(
      "configs/ssl_pretrain.py:busi,backbone=plain,unlabelled_busbra",
      ("data.image_size=128", f"ssl.steps={SSL_STEPS}"),
      encoder=True,
    ),
  ),
  "phantom": Lever(
    "configs/supervised.py",
    (),
    "init: supervised pretraining on 1,941 synthetic phantoms (benign vs malignant, 12 epochs)",
    Pretraining(
      "configs/supervised.py",
      ("data.image_size=128", "data.phantom.counts=(1311, 630, 399)", "train.epochs=12"),
      encoder=False,
    ),
  ),
}
VARIANTS = ("plain", "tta", "adabn", "tta+adabn", "unmarked")
TARGET_SENSITIVITY = 0.93
BASELINE = ("baseline", "plain")

_BUSI = flags.DEFINE_string("busi_root", None, "Dataset_BUSI_with_GT folder.")
_SPLIT = flags.DEFINE_string("split_file", None, "busi_breastmnist_split.tsv.")
_BUSBRA = flags.DEFINE_string("busbra_root", None, "BUS-BRA folder (Images/, bus_data.csv).")
_LEVERS = flags.DEFINE_list(
  "levers",
  ["baseline", "mask", "lesion_crop"],
  f"Of {list(LEVERS)}; NAME@S+S+S gives that lever its own seeds (a final configuration's fresh "
  "seeds, e.g. generalise@10+11+12).",
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (>= 3 for a row).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Evaluation variants, of {VARIANTS}.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/external", "Runs go in WORKDIR/LEVER/seedS.")
_OUTPUT = common.output_flag("JSON, rewritten after every run.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Resamples behind every interval.")
_RENDER = flags.DEFINE_string("render", None, "Only print the table of this --output JSON.")


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def load_config(
  lever: Lever, seed: int, busi_root, split_file, busbra_root, pretrained: str | None = None
):
  """The lever's config under the BUSI -> BUS-BRA protocol, with data paths and seed; starting
  from the `pretrained` run's weights when the lever has a pretraining."""
  path, _, arg = lever.config.partition(":")
  config = configlib.load_file(path, ",".join(a for a in (arg, "busi", "busbra") if a))
  config.data.root, config.data.split_file = busi_root, split_file
  config.external.busbra.root = busbra_root
  config.seed = seed
  common.apply_overrides(config, lever.overrides)
  common.apply_overrides(config, [o.format(seed=seed) for o in lever.per_seed])
  config.external.busbra.image_size = config.data.image_size
  if lever.trains_on_target:  # BUS-BRA becomes the training set, at the size BUSI's runs use.
    config.data = config.external.busbra
    config.external = ml_collections.ConfigDict()
    folds = sources.read_busbra_folds(os.path.join(busbra_root, "5-fold-cv.csv"))
    k = len({f for f in folds.values() if isinstance(f, int)})
    if k < 2:
      raise app.UsageError(f"{lever.what}: {busbra_root}/5-fold-cv.csv has {k} official folds")
    config.split.update(kind="official_folds", k=k, val_from_train=False, cross_validate=True)
  if lever.pretrain is not None:
    config.init_from = pretrained
    config.init_from_encoder = lever.pretrain.encoder
  configlib.validate(config)
  return config


def load_pretrain_config(pretrain: Pretraining, busi_root, split_file, busbra_root):
  """The pretraining's config with the data paths its arguments ask for (BUSI's split when it
  trains on BUSI: the in-domain test images stay unseen; BUS-BRA when it is an extra source)."""
  path, _, arg = pretrain.config.partition(":")
  config = configlib.load_file(path, arg or None)
  common.apply_overrides(config, pretrain.overrides)
  if "busi" in configlib.parse_arg(arg):
    config.data.root, config.data.split_file = busi_root, split_file
  for section in (config.external, config.get("ssl", {}).get("extra_sources", {})):
    if "busbra" in section:
      section.busbra.root, section.busbra.image_size = busbra_root, config.data.image_size
  configlib.validate(config)
  return config


def _differences(stored: dict, new: dict, prefix: str = "") -> list[str]:
  """Fields of a stored run's config that the new config sets otherwise. Fields the stored one
  lacks are options added since it ran (off by default), so they are not differences."""
  out = []
  for key, value in stored.items():
    if key not in new:
      out.append(f"{prefix}{key} (gone)")
    elif isinstance(value, dict) and isinstance(new[key], dict):
      out += _differences(value, new[key], f"{prefix}{key}.")
    elif value != new[key]:
      out.append(f"{prefix}{key}={value!r} -> {new[key]!r}")
  return out


def train(config, run_dir: str) -> float:
  """Trains and reports unless `run_dir` holds this finished run; seconds spent."""
  summary = os.path.join(run_dir, "summary.json")
  stored = os.path.join(run_dir, "config.json")
  if os.path.exists(summary) and os.path.exists(stored):
    with open(stored) as f:
      changed = _differences(json.load(f), json.loads(config.to_json_best_effort()))
    if changed:
      raise app.UsageError(
        f"{run_dir} holds a run of another config ({', '.join(changed[:5])}): delete or move it"
      )
    return 0.0
  start = time.time()
  importlib.import_module(f"busjax.trainers.{config.trainer}").train_and_evaluate(config, run_dir)
  return time.time() - start


# ----------------------------------------------------------------------------------------------
# Evaluation variants (need the trained model; cached next to the run's own predictions)
# ----------------------------------------------------------------------------------------------


_DECODED: dict = {}  # Decoded, resized images by (collection, ids, size, unmarked): every run
# and variant evaluates the same images, and decoding BUS-BRA's full-size PNGs is the slow part.


def _images(
  collection: records.Collection, ids: np.ndarray, image_size: int, unmarked: bool = False
) -> np.ndarray:
  """uint8 (N, S, S, 1) of the records `ids`, in that order, as the protocol evaluated them
  (resize_pad of the decoded file); with `unmarked`, calipers and text suppressed first."""
  key = (collection.name, tuple(ids), image_size, unmarked)
  if key not in _DECODED:
    _DECODED[key] = _decode(collection, ids, image_size, unmarked)
  return _DECODED[key]


def _decode(collection, ids, image_size, unmarked) -> np.ndarray:
  by_id = {r.id: r for r in collection.records}
  out = np.zeros((len(ids), image_size, image_size, 1), np.uint8)
  for row, i in enumerate(ids):
    image = records.load_image(by_id[i])
    out[row, ..., 0] = augment.resize_pad(augment.suppress_marks(image) if unmarked else image,
                                          image_size)  # fmt: skip
  return out


def variant_predictions(run_dir: str, variant: str, collections: dict) -> dict[str, dict]:
  """{split: predictions} of one evaluation variant of a finished run (val, test, busbra)."""
  plain = {s: common.load_predictions(run_dir, s) for s in ("val", "test", "busbra")}
  if variant == "plain":
    return plain
  cache = os.path.join(run_dir, "external", f"{variant.replace('+', '_')}.npz")
  if os.path.exists(cache):
    with np.load(cache, allow_pickle=False) as f:
      return {s: dict(plain[s], p_malignant=f[s]) for s in plain}
  from busjax import inference  # Lazy: only variants need the model.

  run = inference.load_run(run_dir)
  if "tta" in variant:  # The run's predictions, averaged with the mirror image's.
    config = run.config.copy_and_resolve_references()
    config.model.test_time_flip = True
    run = dataclasses.replace(run, config=config)
  out = {}
  for split, preds in plain.items():
    images = _images(collections[split], preds["ids"], run.image_size, "unmarked" in variant)
    model = run
    if "adabn" in variant and split == "busbra":
      # BUS-BRA's own images, unlabelled, set the statistics it is evaluated with; BUSI's val
      # and test keep the trained statistics (the threshold is still chosen on BUSI val).
      model = inference.reestimate_batchnorm(run, images)
    out[split] = model.probabilities(batch_size=32)(images)[:, records.MALIGNANT]
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  np.savez(cache, **out)
  return {s: dict(plain[s], p_malignant=out[s]) for s in plain}


# ----------------------------------------------------------------------------------------------
# Metrics of a row
# ----------------------------------------------------------------------------------------------


def _ci(interval) -> list[float] | None:
  return None if interval is None else [float(interval.lo), float(interval.hi)]


def _ensemble(per_seed: list[dict]) -> dict:
  first = per_seed[0]
  for other in per_seed[1:]:
    if not np.array_equal(first["ids"], other["ids"]):
      raise ValueError("seeds were evaluated on different images; ensemble undefined")
  return dict(first, p_malignant=np.mean([p["p_malignant"] for p in per_seed], axis=0))


def _present(per_seed: dict, splits: tuple[str, ...]) -> list[str]:
  """The `splits` a row has predictions for, in that order (a target-trained row has no BUSI)."""
  return [s for s in splits if s in per_seed]


def _pooled_val(per_seed: list[dict]) -> dict:
  """The predictions a BUSI threshold is chosen on: the seeds' mean where they share the val
  images; a fold ensemble's members each hold out their own fold, so their out-of-fold
  predictions are pooled (every train image once, scored by the member that did not train on it)."""
  ids = [p["ids"] for p in per_seed]
  if all(np.array_equal(ids[0], i) for i in ids[1:]):
    return _ensemble(per_seed)
  every = np.concatenate(ids)
  if len(np.unique(every)) != len(every):
    raise ValueError("members' val parts overlap without being equal: no threshold set to pool")
  keys = ("ids", "y_malignant", "p_malignant")
  return {k: np.concatenate([p[k] for p in per_seed]) for k in keys}


def paired_gain(lever: list[dict], base: list[dict], bootstrap: int) -> dict:
  """mean_s AUC(lever_s) - mean_s AUC(base_s) on the same images, with a clustered bootstrap CI
  (each resample draws clusters once, for every column)."""
  y, clusters = base[0]["y_malignant"], base[0]["clusters"]
  for p in (*lever, *base):
    if not np.array_equal(p["ids"], base[0]["ids"]):
      raise ValueError("the lever and the baseline were evaluated on different images")
  scores = np.stack([p["p_malignant"] for p in (*lever, *base)], axis=1)
  k = len(lever)

  def gain(y_, s):
    aucs = [metrics.roc_auc(y_, s[:, j]) for j in range(s.shape[1])]
    return float(np.mean(aucs[:k]) - np.mean(aucs[k:]))

  def gain_resampled(y_, s, counts):  # All resamples at once (`metrics.bootstrap_ci`).
    aucs = metrics.roc_auc_resampled(y_, s, counts)
    return aucs[:, :k].mean(axis=1) - aucs[:, k:].mean(axis=1)

  gain.resampled = gain_resampled
  ci = metrics.bootstrap_ci(gain, y, scores, clusters=clusters, n=bootstrap)
  return {"gain": gain(y, scores), "ci": _ci(ci)}


def _landing(target: dict, threshold: float) -> dict:
  """Sensitivity and specificity on `target` at a threshold chosen elsewhere."""
  at = metrics.threshold_metrics(target["y_malignant"], target["p_malignant"], threshold)
  return {
    "threshold": threshold,
    "sensitivity": at["sensitivity"],
    "specificity": at["specificity"],
  }


def row_metrics(per_seed: dict[str, list[dict]], birads, bootstrap: int, view=None) -> dict:
  """Everything a table row shows, from the per-seed predictions of val, test and busbra.

  `view`: per BUS-BRA image, its longer side over its lesion's (how tightly it is cropped); the
  ensemble's AUC is then also given per tertile of it."""
  out = {"seeds": len(per_seed["busbra"])}
  for split in _present(per_seed, ("test", "busbra")):
    aucs = [metrics.roc_auc(p["y_malignant"], p["p_malignant"]) for p in per_seed[split]]
    out[f"{split}_auc_per_seed"] = aucs
    out[f"{split}_auc_mean"] = float(np.mean(aucs))
    out[f"{split}_auc_sd"] = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0
  ens = {s: _ensemble(per_seed[s]) for s in _present(per_seed, ("test", "busbra"))}
  y, p, clusters = (ens["busbra"][k] for k in ("y_malignant", "p_malignant", "clusters"))
  ci = metrics.bootstrap_ci(metrics.roc_auc, y, p, clusters=clusters, n=bootstrap)
  out["ensemble"] = {"busbra_auc": metrics.roc_auc(y, p), "busbra_auc_ci": _ci(ci)}
  if "test" in ens:
    t = ens["test"]
    out["ensemble"]["test_auc"] = metrics.roc_auc(t["y_malignant"], t["p_malignant"])
  common_args = dict(clusters=clusters, n_bootstrap=bootstrap)
  at_target = metrics.specificity_at_sensitivity(y, p, TARGET_SENSITIVITY, **common_args)
  out["ensemble"]["spec_at_sens_target"] = at_target["specificity"]
  out["ensemble"]["spec_at_sens_target_ci"] = _ci(at_target["ci"])
  if birads is not None:
    reader = readers.reader_operating_point(y, birads, n_bootstrap=0)
    out["reader"] = {"sensitivity": reader["sensitivity"], "specificity": reader["specificity"]}
    spec = metrics.specificity_at_sensitivity(y, p, reader["sensitivity"], **common_args)
    sens = metrics.sensitivity_at_specificity(y, p, reader["specificity"], **common_args)
    out["ensemble"]["spec_at_reader_sens"] = spec["specificity"]
    out["ensemble"]["spec_at_reader_sens_ci"] = _ci(spec["ci"])
    out["ensemble"]["sens_at_reader_spec"] = sens["sensitivity"]
    out["ensemble"]["sens_at_reader_spec_ci"] = _ci(sens["ci"])
  devices = ens["busbra"].get("devices")
  if devices is not None:
    out["ensemble"]["auc_per_device"] = {
      str(d): {"images": int((devices == d).sum()), "auc": metrics.roc_auc(y[devices == d],
                                                                           p[devices == d])}
      for d in sorted(set(devices.tolist()))
    }  # fmt: skip
  if view is not None:
    edges = np.quantile(view, [1 / 3, 2 / 3])
    tertile = np.digitize(view, edges)
    out["ensemble"]["auc_by_view"] = {
      name: {
        "view_ratio": [float(view[tertile == t].min()), float(view[tertile == t].max())],
        "auc": metrics.roc_auc(y[tertile == t], p[tertile == t]),
      }
      for t, name in enumerate(("tight", "medium", "wide"))
    }
  if "val" not in per_seed:  # Trained on the target: no BUSI threshold to carry over.
    return out
  val = _pooled_val(per_seed["val"])
  youden = float(metrics.youden_threshold(val["y_malignant"], val["p_malignant"]))
  _, _, for_target = metrics.specificity_at_sensitivity_point(
    val["y_malignant"], val["p_malignant"], TARGET_SENSITIVITY
  )
  out["ensemble"]["busi_youden_on_busbra"] = _landing(ens["busbra"], youden)
  out["ensemble"]["busi_sens_target_on_busbra"] = _landing(ens["busbra"], for_target)
  return out


def shortcut(unmarked: dict[str, list[dict]], plain: dict[str, list[dict]]) -> dict:
  """How much the seed ensemble's answers move when calipers and text are removed: the share of
  calls (at the BUSI-val Youden threshold of the plain ensemble) that change, the mean absolute
  change of p(malignant) and the AUC change, on BUSI test and BUS-BRA."""
  val = _pooled_val(plain["val"])
  threshold = float(metrics.youden_threshold(val["y_malignant"], val["p_malignant"]))
  out = {"threshold": threshold}
  for split in ("test", "busbra"):
    a, b = _ensemble(plain[split]), _ensemble(unmarked[split])
    pa, pb, y = a["p_malignant"], b["p_malignant"], a["y_malignant"]
    out[split] = {
      "calls_changed": float(np.mean((pa >= threshold) != (pb >= threshold))),
      "mean_abs_change": float(np.mean(np.abs(pa - pb))),
      "auc_change": metrics.roc_auc(y, pb) - metrics.roc_auc(y, pa),
    }
  return out


def view_ratios(collection: records.Collection) -> dict[str, float]:
  """Image longer side / lesion-box longer side per record with a lesion mask."""
  out = {}
  for r in collection.records:
    mask = records.load_mask(r)
    box = augment.lesion_box(mask)
    if box is not None:
      out[r.id] = max(mask.shape) / max(box[2] - box[0], box[3] - box[1])
  return out


def parse_levers(specs: list[str], seeds: list[int]) -> dict[str, list[int]]:
  """`NAME` or `NAME@S+S+S` -> {name: seeds}; unknown names are an error."""
  out = {}
  for spec in specs:
    name, _, own = spec.partition("@")
    if name not in LEVERS:
      raise ValueError(f"unknown lever {name!r}; known: {sorted(LEVERS)}")
    out[name] = [int(s) for s in own.split("+")] if own else list(seeds)
  return out


def out_of_fold(run_dir: str, order: list[str]) -> dict:
  """A cross-validated run's test predictions of every fold, concatenated and put in `order`."""
  folds = sorted(d for d in os.listdir(run_dir) if d.startswith("fold"))
  parts = [common.load_predictions(os.path.join(run_dir, d), "test") for d in folds]
  pooled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  where = {i: n for n, i in enumerate(pooled["ids"])}
  if sorted(where) != sorted(order):
    raise ValueError(f"{run_dir}: its folds' test images are not the {len(order)} evaluated")
  index = np.asarray([where[i] for i in order])
  return {k: v[index] for k, v in pooled.items()}


def table_rows(
  levers: dict[str, list[int]],
  variants,
  workdir,
  collections,
  birads_by_id,
  bootstrap,
  view_by_id=None,
) -> list:
  """One dict per (lever, variant) with finished runs, gains against the baseline included
  (seeds pair up in the order given: the k-th of a lever with the baseline's k-th)."""
  predictions = {}
  for lever, seeds in levers.items():
    runs = [os.path.join(workdir, lever, f"seed{s}") for s in seeds]
    runs = [r for r in runs if os.path.exists(os.path.join(r, "summary.json"))]
    if runs and LEVERS[lever].trains_on_target:  # Out-of-fold on BUS-BRA; nothing else to show.
      order = [r.id for r in collections["busbra"].records]
      predictions[lever, "plain"] = [{"busbra": out_of_fold(r, order)} for r in runs]
      continue
    for variant in variants:
      if runs:
        predictions[lever, variant] = [variant_predictions(r, variant, collections) for r in runs]
  rows = []
  base = predictions.get(BASELINE)
  for (lever, variant), per_run in predictions.items():
    per_seed = {s: [p[s] for p in per_run] for s in per_run[0]}
    ids = per_seed["busbra"][0]["ids"]
    birads = None if birads_by_id is None else np.asarray([birads_by_id[i] for i in ids], object)
    row = {"lever": lever, "variant": variant, "what": LEVERS[lever].what}
    view = None
    if view_by_id is not None and all(i in view_by_id for i in ids):
      view = np.asarray([view_by_id[i] for i in ids])
    row.update(row_metrics(per_seed, birads, bootstrap, view))
    if variant == "unmarked" and (lever, "plain") in predictions:
      plain = {s: [p[s] for p in predictions[lever, "plain"]] for s in ("val", "test", "busbra")}
      row["shortcut"] = shortcut(per_seed, plain)
    if base is not None and (lever, variant) != BASELINE:
      n = min(len(per_run), len(base))  # Seeds pair up in order (seed s with seed s).
      for split in _present(per_seed, ("busbra", "test")):
        lever_preds = [p[split] for p in per_run[:n]]
        row[f"{split}_gain"] = paired_gain(lever_preds, [p[split] for p in base[:n]], bootstrap)
      # Ensemble against ensemble, every member of each (a fold ensemble may have more).
      row["ensemble_gain"] = paired_gain(
        [_ensemble(per_seed["busbra"])], [_ensemble([p["busbra"] for p in base])], bootstrap
      )
    rows.append(row)
  rows.sort(key=lambda r: -r.get("busbra_gain", {"gain": 0.0})["gain"])
  return rows


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------


def _f(value, digits=3) -> str:
  return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _gain(entry) -> str:
  if not entry:
    return "—"
  lo, hi = entry["ci"] or (float("nan"), float("nan"))
  return f"{entry['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(rows: list[dict]) -> str:
  lines = [
    "| lever | eval | seeds | BUSI test AUC (mean ± sd) | Δ in-domain [paired 95% CI] | "
    "BUS-BRA AUC (mean ± sd) | Δ BUS-BRA [paired 95% CI] | ensemble BUS-BRA AUC [95% CI] | "
    "Δ ensemble [paired 95% CI] | "
    f"spec @ sens {TARGET_SENSITIVITY} | spec @ reader sens | sens @ reader spec | "
    f"BUSI threshold for sens {TARGET_SENSITIVITY} → BUS-BRA sens / spec | "
    "BUSI Youden threshold → BUS-BRA sens / spec | AUC per scanner | AUC by view (tight / "
    "medium / wide) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  reader = None
  for r in rows:
    e = r["ensemble"]
    reader = r.get("reader") or reader
    ci = e["busbra_auc_ci"] or (float("nan"), float("nan"))
    devices = "; ".join(
      f"{d} {_f(v['auc'], 2)} ({v['images']})" for d, v in (e.get("auc_per_device") or {}).items()
    )
    na = {"sensitivity": None, "specificity": None}  # Trained on the target: no BUSI threshold.
    target = e.get("busi_sens_target_on_busbra", na)
    youden = e.get("busi_youden_on_busbra", na)
    views = " / ".join(_f(v["auc"], 2) for v in (e.get("auc_by_view") or {}).values())
    lines.append(
      f"| {r['lever']} | {r['variant']} | {r['seeds']} | "
      f"{_f(r.get('test_auc_mean'))} ± {_f(r.get('test_auc_sd'))} | {_gain(r.get('test_gain'))} | "
      f"{_f(r['busbra_auc_mean'])} ± {_f(r['busbra_auc_sd'])} | {_gain(r.get('busbra_gain'))} | "
      f"{_f(e['busbra_auc'])} [{_f(ci[0])}, {_f(ci[1])}] | {_gain(r.get('ensemble_gain'))} | "
      f"{_f(e['spec_at_sens_target'])} | "
      f"{_f(e.get('spec_at_reader_sens'))} | {_f(e.get('sens_at_reader_spec'))} | "
      f"{_f(target['sensitivity'])} / {_f(target['specificity'])} | "
      f"{_f(youden['sensitivity'])} / {_f(youden['specificity'])} | {devices} | {views} |"
    )
  for r in rows:
    if "shortcut" in r:
      t, b = r["shortcut"]["test"], r["shortcut"]["busbra"]
      lines.append(
        f"\nShortcut test ({r['lever']}, calipers/text removed at test time): calls changed "
        f"{t['calls_changed']:.1%} on BUSI test, {b['calls_changed']:.1%} on BUS-BRA; mean "
        f"|Δp| {t['mean_abs_change']:.3f} / {b['mean_abs_change']:.3f}; AUC change "
        f"{t['auc_change']:+.3f} / {b['auc_change']:+.3f}."
      )
  if reader:
    lines.append(
      f"\nBUS-BRA radiologist (BI-RADS >= 4): sensitivity {reader['sensitivity']:.3f}, "
      f"specificity {reader['specificity']:.3f}. Ensemble = mean probability over the seeds."
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if _RENDER.value:
    with open(_RENDER.value) as f:
      print(markdown(json.load(f)["rows"]))
    return
  if not (_BUSI.value and _SPLIT.value and _BUSBRA.value):
    raise app.UsageError("--busi_root, --split_file and --busbra_root are required")
  if set(_VARIANTS.value) - set(VARIANTS):
    raise app.UsageError(f"unknown variants {sorted(set(_VARIANTS.value) - set(VARIANTS))}")
  try:
    levers = parse_levers(_LEVERS.value, [int(s) for s in _SEEDS.value])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  common.start(_WORKDIR.value, None)  # Quiet logs, a compilation cache shared by the runs.
  logging.set_verbosity(logging.WARNING)
  result = {"benchmark": "external", "machine": common.machine(), "runs": [], "rows": []}
  if _OUTPUT.value and os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value) as f:
      result["runs"] = json.load(f).get("runs", [])
  runs = {(r["lever"], r["seed"]): r for r in result["runs"]}
  result["data"] = {
    "train": f"BUSI ({_BUSI.value}), BreastMNIST split ({_SPLIT.value}): checkpoint and threshold "
    "on a grouped 15% of its train part; its val part is the in-domain test",
    "external": f"BUS-BRA-dev ({_BUSBRA.value}): labels used for nothing but these figures",
  }

  def run(config, lever, seed, run_dir):
    """Trains (or finds) one run and records it; the JSON is rewritten after each new one."""
    seconds = train(config, run_dir)
    if (lever, seed) not in runs or seconds:
      runs[lever, seed] = {"lever": lever, "seed": seed, "run_dir": run_dir,
                           "train_and_report_seconds": round(seconds, 1)}  # fmt: skip
      result["runs"] = list(runs.values())
      common.write_json_atomic(_OUTPUT.value, result)

  data = (_BUSI.value, _SPLIT.value, _BUSBRA.value)
  config0 = load_config(LEVERS["baseline"], 0, *data)  # BUSI and BUS-BRA as every lever sees them.
  for lever, seeds in levers.items():
    pretrained = None
    if LEVERS[lever].pretrain is not None:
      pretrained = os.path.join(_WORKDIR.value, lever, "pretrain")
      run(load_pretrain_config(LEVERS[lever].pretrain, *data), lever, "pretrain", pretrained)
    for seed in seeds:
      config = load_config(LEVERS[lever], seed, *data, pretrained)
      run(config, lever, seed, os.path.join(_WORKDIR.value, lever, f"seed{seed}"))
  busi = sources.from_config(config0.data)
  busbra = sources.from_config(config0.external.busbra)
  collections = {"val": busi, "test": busi, "busbra": busbra}
  birads = {r.id: r.meta.get("birads") for r in busbra.records}
  if any(v is None for v in birads.values()):
    birads = None
  result["rows"] = table_rows(
    levers,
    _VARIANTS.value,
    _WORKDIR.value,
    collections,
    birads,
    _BOOTSTRAP.value,
    view_ratios(busbra),
  )
  common.write_json_atomic(_OUTPUT.value, result)
  print(markdown(result["rows"]))


if __name__ == "__main__":
  app.run(main)
