"""Multimodal mammography + ultrasound (after Yan et al., MPM-MU): two stages, one report.

Stage 1: an ultrasound branch with ECA attention and a mammography branch with CBAM attention
(any busjax classifier, by ``config.multimodal.<modality>``) each learn their modality alone: each
is the supervised regime's `train_split` on that modality's images of the train patients
(checkpoint selection on the val patients' images), so branches resume, select and log like any
classifier. Then they are frozen.

Stage 2: per patient, each branch's pooled features are averaged over the patient's images of its
modality, standardised per modality (each modality's block scaled to the same total variance, so
the wider branch does not dominate), concatenated, and fed to a scikit-learn
`StackingClassifier`: logistic regression, an SVM (Platt-calibrated), a random forest and
extra-trees as base learners, an MLP as the meta-learner, with its out-of-fold base predictions
cross-validated inside the train patients only. The fitted stack is saved with skops (no pickle)
and read back through an explicit allow-list of types before it predicts.

The protocol sees one record per patient (`busjax.data.paired.patient_collection`), so splits,
thresholds, reports and clustered CIs are those of every other regime. Ablations are config
arguments (configs/multimodal.py): one modality alone, branches without attention, each base
learner alone, and the end-to-end network (``multimodal.fusion="end_to_end"``: the same two
branch networks under one head, `busjax.models.multimodal`, trained jointly on patients with one
image of each modality per example; no frozen stage, no stack).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from sklearn.base import BaseEstimator, TransformerMixin

from busjax import configlib
from busjax.data import paired, pipeline, records
from busjax.evaluators import metrics
from busjax.trainers import protocol, supervised

FUSIONS = ("two_stage", "end_to_end")
BASE_LEARNERS = ("lr", "svm", "rf", "et")
LEARNERS = ("stack", *BASE_LEARNERS)
NORMALIZATIONS = ("per_modality", "none")
STACK_FILE = "stack.skops"
# Every type a saved stack may contain beyond what skops trusts by default: checked before load,
# so a file from someone else cannot make us build anything else.
TRUSTED_TYPES = (
  "sklearn.model_selection._split.StratifiedKFold",
  "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
  "sklearn.tree._tree.Tree",
  "sklearn.utils._bunch.Bunch",
  "sklearn.calibration._CalibratedClassifier",
  "sklearn.calibration._SigmoidCalibration",
  "busjax.trainers.multimodal.BlockScaler",
)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def validate_config(c: ml_collections.ConfigDict) -> None:
  """This regime's sections (called by `configlib.validate`)."""
  m = c.multimodal
  configlib.check(
    c.data.source in ("paired_phantom", "paired_csv"),
    f"data.source={c.data.source!r}: the multimodal regime needs paired data "
    "('paired_phantom' or 'paired_csv')",
  )
  modalities = tuple(m.modalities)
  configlib.check(
    bool(modalities)
    and set(modalities) <= set(paired.MODALITIES)
    and len(set(modalities)) == len(modalities),
    f"multimodal.modalities={modalities!r}: expected a non-empty subset of {paired.MODALITIES}",
  )
  for modality in modalities:
    configlib.validate_model(m[modality].model, prefix=f"multimodal.{modality}.model")
  configlib.validate_optim(c.optim)
  configlib.validate_train(c.train)
  configlib.check(
    m.get("fusion", "two_stage") in FUSIONS,
    f"multimodal.fusion={m.get('fusion')!r}: one of {FUSIONS}",
  )
  configlib.check(m.learner in LEARNERS, f"multimodal.learner={m.learner!r}: one of {LEARNERS}")
  configlib.check(
    m.normalization in NORMALIZATIONS,
    f"multimodal.normalization={m.normalization!r}: one of {NORMALIZATIONS}",
  )
  configlib.check(m.stack_cv >= 2, f"multimodal.stack_cv={m.stack_cv!r}: expected >= 2")
  configlib.check(
    not (m.get("branches_dir") and c.split.get("cross_validate")),
    "multimodal.branches_dir reuses one split's branches; it cannot serve cross-validation",
  )


def branch_config(config: ml_collections.ConfigDict, modality: str) -> ml_collections.ConfigDict:
  """The supervised config of one branch: the run's, with that branch's model."""
  branch = copy.deepcopy(config)
  branch.trainer = "supervised"
  branch.model = config.multimodal[modality].model
  return branch


# ----------------------------------------------------------------------------------------------
# Stage 2: features and the stack
# ----------------------------------------------------------------------------------------------


def patient_features(
  trained: protocol.Trained, patients: records.Collection, modality: str
) -> np.ndarray:
  """(patients, d): the branch's pooled features averaged over each patient's images."""
  images = paired.images_of(patients, modality)
  features = np.asarray(trained.features(images), np.float64)
  return mean_per_patient(features, [len(p.meta[modality]) for p in patients.records])


def mean_per_patient(values: np.ndarray, counts) -> np.ndarray:
  """(patients, ...) means of consecutive runs of `values` rows, `counts[i]` rows per patient."""
  counts = np.asarray(counts)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return np.add.reduceat(values, starts, axis=0) / counts[:, None]


class BlockScaler(TransformerMixin, BaseEstimator):
  """Standardises every feature, then scales each modality's block by 1/sqrt(its width), so
  every modality contributes the same total variance (a scikit-learn transformer)."""

  def __init__(self, widths: tuple[int, ...] = ()):
    self.widths = widths

  def fit(self, x, y=None):
    del y
    x = np.asarray(x, np.float64)
    self.mean_ = x.mean(axis=0)
    self.scale_ = np.where(x.std(axis=0) > 1e-12, x.std(axis=0), 1.0)
    weights = [np.full(w, 1.0 / np.sqrt(w)) for w in self.widths] or [np.ones(x.shape[1])]
    self.block_weight_ = np.concatenate(weights)
    return self

  def transform(self, x):
    return (np.asarray(x, np.float64) - self.mean_) / self.scale_ * self.block_weight_


def make_estimator(
  learner: str, widths: tuple[int, ...], *, normalization: str, cv: int, seed: int
):
  """The stage-2 model: one base learner, or the stack of all four with an MLP on top."""
  from sklearn.calibration import CalibratedClassifierCV
  from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier, StackingClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold
  from sklearn.neural_network import MLPClassifier
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import SVC

  def scaled(estimator):
    scaler = BlockScaler(widths) if normalization == "per_modality" else StandardScaler()
    return make_pipeline(scaler, estimator)

  bases = {
    "lr": scaled(LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced")),
    # Platt-scaled probabilities (SVC(probability=True) is deprecated in scikit-learn 1.9).
    "svm": scaled(
      CalibratedClassifierCV(
        SVC(C=1.0, class_weight="balanced"), method="sigmoid", ensemble=False, cv=cv
      )
    ),
    "rf": RandomForestClassifier(
      n_estimators=300, min_samples_leaf=2, class_weight="balanced", random_state=seed
    ),
    "et": ExtraTreesClassifier(
      n_estimators=300, min_samples_leaf=2, class_weight="balanced", random_state=seed
    ),
  }
  if learner != "stack":
    return bases[learner]
  return StackingClassifier(
    estimators=list(bases.items()),
    final_estimator=MLPClassifier(
      hidden_layer_sizes=(16,), alpha=1e-2, max_iter=3000, random_state=seed
    ),
    # Out-of-fold base predictions from the train patients only; patients are the rows.
    cv=StratifiedKFold(cv, shuffle=True, random_state=seed),
    stack_method="predict_proba",
  )


def save_estimator(estimator, path: str) -> None:
  import skops.io as sio

  tmp = path + ".tmp"
  sio.dump(estimator, tmp)
  os.replace(tmp, path)


def load_estimator(path: str):
  """Reads a saved stage-2 model; refuses any type outside skops' defaults and TRUSTED_TYPES."""
  import skops.io as sio

  untrusted = sio.get_untrusted_types(file=path)
  unknown = sorted(set(untrusted) - set(TRUSTED_TYPES))
  if unknown:
    raise records.DataError(
      f"{path}: refusing to load types outside busjax's allow-list: {', '.join(unknown)}"
    )
  return sio.load(path, trusted=list(untrusted))


# ----------------------------------------------------------------------------------------------
# One split
# ----------------------------------------------------------------------------------------------


def train_split(
  config: ml_collections.ConfigDict, workdir: str, data: dict[str, records.Collection]
) -> protocol.Trained:
  """Stage 1 (one branch per modality) then stage 2 (the stack) on data["train"]'s patients;
  with ``multimodal.fusion="end_to_end"``, `train_end_to_end` instead."""
  if config.multimodal.get("fusion", "two_stage") == "end_to_end":
    return train_end_to_end(config, workdir, data)
  m = config.multimodal
  modalities = tuple(m.modalities)
  branches, branch_info = {}, {}
  # Stage-2 ablations share stage 1: a finished branch run in `branches_dir` is restored, not
  # retrained (same split and branch config required; the branch's own checkpoint checks shapes).
  branch_root = m.get("branches_dir") or workdir
  for modality in modalities:
    images = {
      part: paired.images_of(data[part], modality)
      for part in ("train", "val")
      if part in data and len(data[part])
    }
    logging.info("Stage 1, %s branch: %d train images.", modality, len(images["train"]))
    branches[modality] = supervised.train_split(
      branch_config(config, modality), os.path.join(branch_root, f"branch_{modality}"), images
    )
    info = branches[modality].info
    branch_info[modality] = {
      k: info[k] for k in ("model", "steps", "selected_checkpoint", "train_seconds") if k in info
    }

  def blocks(patients: records.Collection) -> list[np.ndarray]:
    return [patient_features(branches[mod], patients, mod) for mod in modalities]

  def features(patients: records.Collection) -> np.ndarray:
    return np.concatenate(blocks(patients), axis=1)

  train = data["train"]
  train_blocks = blocks(train)
  x_train, y_train = np.concatenate(train_blocks, axis=1), train.labels
  widths = tuple(b.shape[1] for b in train_blocks)
  estimator = make_estimator(
    m.learner, widths, normalization=m.normalization, cv=int(m.stack_cv), seed=int(config.seed)
  )
  estimator.fit(x_train, y_train)
  path = os.path.join(workdir, STACK_FILE)
  save_estimator(estimator, path)
  estimator = load_estimator(path)  # What predicts is what a reader of the file would get.
  info = {
    "model": f"{m.learner}({' + '.join(modalities)})",
    "branches": branch_info,
    "stage2_features": int(x_train.shape[1]),
    "train_patients": len(train),
    "stage2_file": path,
    "steps": sum(int(b.info.get("steps", 0)) for b in branches.values()),
    "train_seconds": round(
      sum(float(b.info.get("train_seconds", 0)) for b in branches.values()), 1
    ),
    "resumed_at_step": 0,
    "selected_checkpoint": "; ".join(
      f"{mod}: {b.info.get('selected_checkpoint')}" for mod, b in branches.items()
    ),
    "selected_step": 0,
    "trained_on": f"{train.name} ({len(train)} patients: {', '.join(modalities)})",
  }
  val = data.get("val")
  if val is not None and len(set(val.labels.tolist())) == 2:
    p_val = estimator.predict_proba(features(val))[:, records.MALIGNANT]
    info["stage2_val_auc"] = metrics.roc_auc(val.labels == records.MALIGNANT, p_val)
  logging.info("Stage 2: %s on %d features; %s", m.learner, x_train.shape[1], info)

  def predict(patients: records.Collection) -> np.ndarray:
    return estimator.predict_proba(features(patients))

  return protocol.Trained(predict=predict, info=info, features=features)


def end_to_end_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The supervised config of the end-to-end network: the branch models under one
  `busjax.models.multimodal` network, one channel per modality."""
  e2e = copy.deepcopy(config)
  e2e.trainer = "supervised"
  modalities = tuple(config.multimodal.modalities)
  e2e.model = ml_collections.ConfigDict(
    {
      "name": "multimodal",
      "modalities": modalities,
      "in_channels": len(modalities),
      "dropout": float(config.multimodal.get("end_to_end_dropout", 0.2)),
      **{mod: config.multimodal[mod].model.to_dict() for mod in modalities},
    }
  )
  return e2e


def train_end_to_end(
  config: ml_collections.ConfigDict, workdir: str, data: dict[str, records.Collection]
) -> protocol.Trained:
  """The end-to-end ablation: both branches and one head trained jointly on patients.

  Each training example is one patient with one image of each modality (a fresh draw each
  epoch, `pipeline.paired_dataset`); a patient's probability is the mean over every
  combination of its images (`pipeline.view_combinations`), on val (checkpoint selection) as
  on test. Same optimiser, epochs (counted in patients) and checkpointing as the branches.
  """
  e2e = end_to_end_config(config)
  modalities = tuple(config.multimodal.modalities)

  def train_batches(seed):
    return iter(
      pipeline.paired_dataset(
        data["train"],
        modalities=modalities,
        image_size=e2e.data.image_size,
        global_batch_size=e2e.input.batch_size,
        seed=seed,
        augment_config=e2e.input.augment,
        num_workers=e2e.input.get("num_workers", 0),
      )
    )

  def eval_batches(combinations, **kwargs):
    return pipeline.paired_eval_batches(combinations, image_size=e2e.data.image_size, **kwargs)

  parts = {"train": data["train"]}
  if data.get("val") is not None and len(data["val"]):
    parts["val"] = pipeline.view_combinations(data["val"], modalities)[0]
  trained = supervised.train_split(
    e2e,
    workdir,
    parts,
    train_batches=train_batches,
    num_examples=len(data["train"]),
    eval_batches=eval_batches,
  )

  def per_patient(fn, patients: records.Collection) -> np.ndarray:
    combinations, counts = pipeline.view_combinations(patients, modalities)
    return mean_per_patient(np.asarray(fn(combinations), np.float64), counts)

  info = dict(trained.info)
  info["model"] = f"end_to_end({' + '.join(modalities)})"
  info["trained_on"] = f"{data['train'].name} ({len(data['train'])} patients: end to end)"
  return protocol.Trained(
    predict=lambda patients: per_patient(trained.predict, patients),
    info=info,
    features=lambda patients: per_patient(trained.features, patients),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains both stages and reports per patient like every regime."""
  return protocol.train_and_evaluate(config, workdir, train_split)
