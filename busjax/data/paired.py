"""Paired ultrasound + mammography data: one label per patient, images of both modalities.

Sources: the synthetic paired phantom (`busjax.data.mammo_phantom.make_paired`) and a CSV
manifest ``patient_id,us_path,mammo_path,label[,split]`` (paths relative to the CSV; a patient
may have several rows, one per view; a row may leave one of the two paths empty). Validation is
that of every busjax source (one line naming the file and line; ``on_error="skip"`` skips and
counts), plus the pairing: a patient's rows must agree on label and split, and a patient without
an image of one modality either stops loading (default) or, with ``missing_partner="drop"``, is
dropped with a counted warning.

Splits are by patient: the shared protocol splits `patient_collection` (one record per patient),
so both modalities of a patient always land in the same part; `images_of` expands a part.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging

from busjax.data import records, sources

MODALITIES = ("us", "mammo")


@dataclasses.dataclass(frozen=True)
class PairedData:
  """Ultrasound and mammography images of the same patients (one label per patient).

  Attributes:
    us, mammo: one record per image; ``patient_id`` joins them, and every image of a patient
      carries the patient's label (and ``meta["split"]`` when the source assigns one).
    name: where the pair came from.
  """

  us: records.Collection
  mammo: records.Collection
  name: str

  @property
  def synthetic(self) -> bool:
    return self.us.synthetic and self.mammo.synthetic

  def patients(self) -> tuple[np.ndarray, np.ndarray]:
    """(patient ids, sorted; their labels)."""
    labels: dict[str, int] = {}
    for r in (*self.us.records, *self.mammo.records):
      labels.setdefault(r.patient_id, r.label)
    ids = np.asarray(sorted(labels))
    return ids, np.asarray([labels[i] for i in ids], np.int32)


def _drop_unpaired(
  us: list[records.Record],
  mammo: list[records.Record],
  *,
  where: str,
  missing_partner: str,
) -> tuple[list[records.Record], list[records.Record]]:
  """Patients need both modalities: raise naming them, or drop them with a counted warning."""
  have_us = {r.patient_id for r in us}
  have_mammo = {r.patient_id for r in mammo}
  lonely = sorted(have_us ^ have_mammo)
  if not lonely:
    return us, mammo
  described = [
    f"{p} has no {'mammography' if p in have_us else 'ultrasound'} image" for p in lonely[:20]
  ]
  more = f"; ... and {len(lonely) - 20} more" if len(lonely) > 20 else ""
  if missing_partner == "raise":
    raise records.DataError(
      f"{where}: {len(lonely)} patient(s) without a partner image: {'; '.join(described)}{more}"
      " — add the missing images or drop such patients with missing_partner='drop'"
    )
  logging.warning(
    "%s: dropped %d of %d patients without a partner image: %s%s",
    where,
    len(lonely),
    len(have_us | have_mammo),
    "; ".join(described[:5]),
    "" if len(lonely) <= 5 else f"; ... and {len(lonely) - 5} more",
  )
  lonely_set = set(lonely)
  return (
    [r for r in us if r.patient_id not in lonely_set],
    [r for r in mammo if r.patient_id not in lonely_set],
  )


def manifest(path: str, *, on_error: str = "raise", missing_partner: str = "raise") -> PairedData:
  """Reads a paired CSV manifest ``patient_id,us_path,mammo_path,label[,split]``.

  Args:
    path: the CSV; image paths are relative to its folder.
    on_error: "raise" (one error naming every bad row and file) or "skip" (skip them, counted).
    missing_partner: "raise", or "drop" patients left without an image of one modality.

  Returns:
    PairedData with binary labels (benign 0, malignant 1; also 0/1).
  """
  if missing_partner not in ("raise", "drop"):
    raise ValueError(f"missing_partner must be 'raise' or 'drop', got {missing_partner!r}")
  rows = sources._read_csv(path, ("patient_id", "us_path", "mammo_path", "label"))
  base = os.path.dirname(os.path.abspath(path))
  problems = sources._Problems(on_error, f"paired manifest {path}", unit="row")
  first_seen: dict[str, tuple[int, int, str]] = {}  # patient -> (line, label, split)
  candidates = {m: [] for m in MODALITIES}
  bad_patients = set()
  for line, row, problem in rows:
    where = f"{path} line {line}"
    patient = row["patient_id"]
    label = sources._parse_label(row["label"])
    split = row.get("split", "")
    if not patient:
      problem = problem or f"{where}: empty patient_id"
    elif label is None or label > 1:
      problem = problem or f"{where}: label {row['label']!r} is not benign/malignant (0/1)"
    elif not row["us_path"] and not row["mammo_path"]:
      problem = problem or f"{where}: neither us_path nor mammo_path is given"
    elif patient in first_seen and first_seen[patient][1:] != (label, split):
      seen_line, seen_label, seen_split = first_seen[patient]
      problem = problem or (
        f"{where}: patient {patient!r} has label {label}, split {split!r} here but label "
        f"{seen_label}, split {seen_split!r} on line {seen_line}"
      )
      bad_patients.add(patient)
    if problem:
      problems.add(problem)
      continue
    first_seen.setdefault(patient, (line, label, split))
    for modality in MODALITIES:
      relative = row[f"{modality}_path"]
      if not relative:
        continue
      image = os.path.join(base, relative)
      record = records.Record(
        id=f"{modality}/{relative}",
        label=label,
        patient_id=patient,
        image=image,
        meta={"line": line, "modality": modality, **({"split": split} if split else {})},
      )
      missing = None if os.path.isfile(image) else f"{where}: {modality} image {image} not found"
      candidates[modality].append(sources._Candidate(record, problem=missing))
  problems.finish(len(rows))
  checked = {}
  for modality in MODALITIES:
    # Patients whose rows disagree are dropped whole (their other rows are not trusted either).
    kept = [c for c in candidates[modality] if c.record.patient_id not in bad_patients]
    if not kept:
      raise records.DataError(f"{path}: no usable {modality} images")
    collection = sources._finish(
      f"{os.path.splitext(os.path.basename(path))[0]}/{modality}",
      kept,
      class_names=records.BINARY_CLASSES,
      root=base,
      problems=sources._Problems(on_error, f"paired manifest {path} ({modality} images)"),
      class_hint=lambda c, m=modality: f"{path} ({m} images of class {c})",
    )
    checked[modality] = list(collection.records)
  us, mammo = _drop_unpaired(
    checked["us"], checked["mammo"], where=path, missing_partner=missing_partner
  )
  name = os.path.splitext(os.path.basename(path))[0]
  return PairedData(
    us=records.Collection(f"{name}/us", tuple(us), root=base),
    mammo=records.Collection(f"{name}/mammo", tuple(mammo), root=base),
    name=name,
  )


def from_config(data_config: Any) -> PairedData:
  """``config.data`` with source "paired_phantom" (knobs in ``data.paired``) or "paired_csv"
  (``data.root`` = the manifest, ``data.missing_partner``)."""
  source = data_config.source
  if source == "paired_phantom":
    from busjax.data import mammo_phantom

    knobs = dict(data_config.paired)
    return mammo_phantom.make_paired(image_size=int(data_config.image_size), **knobs)
  if source == "paired_csv":
    return manifest(
      data_config.root,
      on_error=data_config.get("on_error", "raise"),
      missing_partner=data_config.get("missing_partner", "raise"),
    )
  raise ValueError(f"paired data source must be 'paired_phantom' or 'paired_csv', got {source!r}")


def patient_collection(data: PairedData) -> records.Collection:
  """One record per patient, for the shared protocol (splits, reports, clustered CIs).

  Each record's ``meta["us"]`` and ``meta["mammo"]`` hold the patient's image records; its own
  image is the first ultrasound image (so single-image tools still see something sensible).
  """
  by_patient: dict[str, dict[str, list[records.Record]]] = {}
  for modality, collection in (("us", data.us), ("mammo", data.mammo)):
    for r in collection.records:
      by_patient.setdefault(r.patient_id, {"us": [], "mammo": []})[modality].append(r)
  out = []
  for patient in sorted(by_patient):
    us, mammo = by_patient[patient]["us"], by_patient[patient]["mammo"]
    first = us[0]
    meta = {"us": tuple(us), "mammo": tuple(mammo), "modality": "paired"}
    if "split" in first.meta:
      meta["split"] = first.meta["split"]
    out.append(records.Record(patient, first.label, patient, first.image, first.mask, meta))
  return records.Collection(
    name=data.name, records=tuple(out), synthetic=data.synthetic, root=data.us.root
  )


def images_of(patients: records.Collection, modality: str) -> records.Collection:
  """The `modality` images of a patient collection's patients (one record per image)."""
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
  images = tuple(r for p in patients.records for r in p.meta[modality])
  return dataclasses.replace(patients, name=f"{patients.name}/{modality}", records=images)
