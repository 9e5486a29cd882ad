"""Real breast-ultrasound sources -> `records.Collection`, validated eagerly at load time.

Sources: BUSI (original folder layout), BUS-BRA (official CSVs and folds), BreastMNIST (MedMNIST
``.npz``), a CSV manifest of the user's own images, and a built TFDS dataset. `from_config` picks
one from ``config.data``.

Every image (and its masks) is fully decoded once at load, in a thread pool, so that a truncated
file, an unreadable mode or a mask of the wrong size is reported here as a `records.DataError`
naming the file, not as a crash an hour into training. Every record is checked before anything
raises: with ``on_error="raise"`` one `records.DataError` lists every bad file and CSV row (a
user fixes them in one pass, not one per run); with ``on_error="skip"`` such records are dropped
and one warning counts them. Structural problems (a missing folder or CSV, a class left with no
images) always raise at once.

Labels follow busjax's convention everywhere: malignant = 1. BreastMNIST's inverted labels
(0 = malignant) are flipped here and nowhere else.

Tasks (``classes``): "binary" is BUSI's benign vs malignant (normal images dropped); "three" keeps
normal as class 2; "malignant_vs_rest" is MedMNIST's BreastMNIST task, every image, benign and
normal together as class 0 ("benign or normal"), each record's ``meta["original_class"]`` saying
which it was.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from busjax.data import records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BREASTMNIST_SPLITS = ("train", "val", "test")
_MASK_NAME = re.compile(r"^(?P<base>.+)_mask(?:_(?P<n>\d+))?$")
_LABEL_NAMES = {name: i for i, name in enumerate(records.THREE_CLASSES)}
CLASSES = ("binary", "three", "malignant_vs_rest")
# Named for what class 0 holds, so that reports do not call normal images "benign".
MALIGNANT_VS_REST_CLASSES = ("benign or normal", "malignant")
_MAX_LOGGED_PROBLEMS = 5  # In the skip warning.
_MAX_RAISED_PROBLEMS = 20  # In the error: enough to fix a batch, short enough to read.


# ----------------------------------------------------------------------------------------------
# Shared validation machinery.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
  """A record before its files are checked; masks are merged during the check."""

  record: records.Record
  mask_paths: tuple[str, ...] = ()
  expected_shape: tuple[int, int] | None = None  # (H, W) a metadata file claims.
  expected_where: str = ""  # Where that claim comes from, for the error message.
  problem: str | None = None  # Found before decoding (bad CSV row, duplicate path, ...).


class _Problems:
  """Collects per-record problems; `finish` raises them all as one error or logs a count."""

  def __init__(self, on_error: str, where: str, unit: str = "file"):
    """where: e.g. "CSV manifest /x/m.csv"; unit: what a problem is counted as, for the error."""
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.on_error = on_error
    self.where = where
    self.unit = unit
    self.messages: list[str] = []
    self.skipped_images = 0

  def add(self, message: str, *, is_image: bool = True) -> None:
    """Records one problem (is_image=False for stray files that are not records)."""
    self.messages.append(message)
    self.skipped_images += int(is_image)

  def finish(self, total: int) -> None:
    """Raises one DataError naming every problem (on_error='raise'), else logs one warning."""
    if not self.messages:
      return
    if self.on_error == "raise":
      raise records.DataError(self.error_message())
    listed = "; ".join(self.messages[:_MAX_LOGGED_PROBLEMS])
    more = len(self.messages) - _MAX_LOGGED_PROBLEMS
    suffix = f"; ... and {more} more" if more > 0 else ""
    logging.warning(
      "%s: skipped %d of %d images: %s%s", self.where, self.skipped_images, total, listed, suffix
    )

  def error_message(self) -> str:
    # One line, so that it reads whole after "busjax: bad data:" and in a grep of a log.
    n = len(self.messages)
    listed = "; ".join(self.messages[:_MAX_RAISED_PROBLEMS])
    more = n - _MAX_RAISED_PROBLEMS
    suffix = f"; ... and {more} more" if more > 0 else ""
    them = "it" if n == 1 else "them"
    return (
      f"{n} bad {self.unit}{'' if n == 1 else 's'} in {self.where}: {listed}{suffix}"
      f" — fix {them} or skip {them} with on_error='skip' (e.g. --config.data.on_error=skip)"
    )


def _check(candidate: _Candidate) -> tuple[records.Record | None, str | None]:
  """Fully decodes one image and its masks; returns (checked record, None) or (None, problem)."""
  if candidate.problem:
    return None, candidate.problem
  record = candidate.record
  try:
    image, mode = records.read_image_file(record.image, with_mode=True)
    shape = tuple(image.shape)
    merged = None
    for mask_path in candidate.mask_paths:
      mask = records.read_image_file(mask_path)
      if mask.shape != shape:
        return None, (
          f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
          f"{record.image} is {shape[1]}x{shape[0]}"
        )
      merged = mask > 0 if merged is None else merged | (mask > 0)
  except records.DataError as e:
    return None, str(e)
  if len(candidate.mask_paths) == 1:
    mask_value = candidate.mask_paths[0]  # One mask: keep the path, load_mask reads it.
  elif candidate.mask_paths:
    mask_value = merged.astype(np.uint8)  # Several masks: the lesion is their union.
  else:
    mask_value = None
  meta = dict(record.meta, height=shape[0], width=shape[1], mode=mode)
  if candidate.expected_shape is not None and shape != tuple(candidate.expected_shape):
    # Metadata, not pixels, is wrong here (BUS-BRA's bus_0857-r: CSV says 409 rows, image and
    # mask agree on 393): note it and let _finish warn, since image and mask are consistent.
    exp_h, exp_w = candidate.expected_shape
    meta["size_note"] = (
      f"{record.image} is {shape[1]}x{shape[0]} but {candidate.expected_where} says {exp_w}x{exp_h}"
    )
  if len(candidate.mask_paths) > 1:
    meta["mask_files"] = len(candidate.mask_paths)
  return dataclasses.replace(record, mask=mask_value, meta=meta), None


def _mark_duplicates(candidates: Sequence[_Candidate]) -> None:
  """Marks every candidate whose image file was already listed (same real path)."""
  seen: dict[str, str] = {}
  for c in candidates:
    if c.problem or not isinstance(c.record.image, str):
      continue
    key = os.path.realpath(c.record.image)
    if key in seen:
      c.problem = f"{c.record.image}: duplicate path (already listed as {seen[key]})"
    else:
      seen[key] = c.record.id


def _finish(
  name: str,
  candidates: Sequence[_Candidate],
  *,
  class_names: tuple[str, ...],
  root: str | None,
  problems: _Problems,
  class_hint: Callable[[str], str] | None = None,
) -> records.Collection:
  """Checks all candidates in a thread pool, then raises every problem at once or builds."""
  # Rows already dropped (e.g. a CSV row with extra fields) never became candidates.
  total = len(candidates) + problems.skipped_images
  _mark_duplicates(candidates)
  with concurrent.futures.ThreadPoolExecutor(records.decode_threads()) as pool:
    checked = list(pool.map(_check, candidates))
  kept = []
  for record, problem in checked:  # In listing order, so the error lists them deterministically.
    if problem is not None:
      problems.add(problem)
    else:
      kept.append(record)
  problems.finish(total)
  notes = [r.meta["size_note"] for r in kept if "size_note" in r.meta]
  if notes:
    logging.warning(
      "%s: %d images differ in size from their metadata (kept, the mask matches the image): %s",
      name,
      len(notes),
      "; ".join(notes[:_MAX_LOGGED_PROBLEMS]),
    )
  counts = np.bincount([r.label for r in kept], minlength=len(class_names))
  for label, class_name in enumerate(class_names):
    if counts[label] == 0:
      where = class_hint(class_name) if class_hint else (root or name)
      raise records.DataError(
        f"{where}: no usable images of class {class_name!r}"
        f" ({problems.skipped_images} records skipped)"
      )
  return records.Collection(
    name=name, records=tuple(kept), class_names=class_names, synthetic=False, root=root
  )


def _natural_key(text: str) -> list[Any]:
  """Sorts 'benign (2)' before 'benign (10)'."""
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise records.DataError(f"{path}: {what} folder not found")


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise records.DataError(f"{path}: {what} file not found")


def _read_csv(
  path: str, required: Iterable[str], delimiter: str = ","
) -> list[tuple[int, dict[str, str], str | None]]:
  """Rows of a CSV/TSV as (line number, row, problem), checking the header's required columns.

  A row with more fields than the header comes back with its problem (None for good rows), so
  that the caller files it under its record like any other per-record problem.
  """
  _require_file(path, "CSV")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      header = [h.strip() for h in (reader.fieldnames or [])]
      reader.fieldnames = header
      missing = [c for c in required if c not in header]
      if missing:
        raise records.DataError(f"{path}: missing column(s) {missing} (header is {header})")
      rows = []
      for row in reader:
        problem = None
        if None in row:  # DictReader files the surplus fields under the key None.
          problem = f"{path} line {reader.line_num}: more fields than the header"
        fields = {k: (v or "").strip() for k, v in row.items() if k is not None}
        rows.append((reader.line_num, fields, problem))
  except UnicodeDecodeError as e:
    raise records.DataError(f"{path}: not a UTF-8 text file ({e})") from e
  except csv.Error as e:
    raise records.DataError(f"{path}: malformed CSV ({e})") from e
  if not rows:
    raise records.DataError(f"{path}: no rows")
  return rows


# ----------------------------------------------------------------------------------------------
# BUSI.
# ----------------------------------------------------------------------------------------------


def _busi_listing(folder: str) -> tuple[dict[str, str], dict[str, list[tuple[int, str]]]]:
  """Images (stem -> path) and masks (image stem -> [(index, path)]) in one class folder."""
  images: dict[str, str] = {}
  masks: dict[str, list[tuple[int, str]]] = {}
  for entry in os.scandir(folder):
    stem, suffix = os.path.splitext(entry.name)
    if entry.name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES or not entry.is_file():
      continue
    match = _MASK_NAME.match(stem)
    if match:
      masks.setdefault(match["base"], []).append((int(match["n"] or 0), entry.path))
    else:
      images[stem] = entry.path
  return images, masks


def _read_busi_split_file(path: str) -> dict[str, tuple[int, str, int, int] | str]:
  """busi_name -> (line, medmnist_split, medmnist_index, breastmnist_label), or the row's problem.

  A bad row becomes its image's problem (reported with every other one, or skipping the image),
  since an image without its split would fail later, in splits.py, one at a time.
  """
  rows = _read_csv(path, ("busi_name", "medmnist_split", "medmnist_index"), delimiter="\t")
  label_column = next((c for c in rows[0][1] if c.startswith("breastmnist_label")), None)
  if label_column is None:
    raise records.DataError(f"{path}: missing column 'breastmnist_label'")
  table: dict[str, tuple[int, str, int, int] | str] = {}
  for line, row, problem in rows:
    split, name = row["medmnist_split"], row["busi_name"]
    where = f"{path} line {line}"
    if problem or name in table:
      table[name] = problem or f"{where}: {name!r} listed twice"
      continue
    try:
      index, label = int(row["medmnist_index"]), int(row[label_column])
    except ValueError as e:
      table[name] = f"{where}: medmnist_index and breastmnist_label must be integers ({e})"
      continue
    if split not in BREASTMNIST_SPLITS:
      table[name] = f"{where}: medmnist_split {split!r} is not one of {BREASTMNIST_SPLITS}"
    elif label not in (0, 1):
      table[name] = f"{where}: breastmnist_label {label} is not 0 or 1"
    else:
      table[name] = (line, split, index, label)
  return table


def busi(
  root: str, *, classes: str = "binary", split_file: str | None = None, on_error: str = "raise"
) -> records.Collection:
  """BUSI in its original layout ``root/{benign,malignant,normal}/``.

  Masks ``X_mask.png``, ``X_mask_1.png``, ... are merged by union; a single mask stays a path,
  several become one uint8 {0, 1} array. Patient ids are unknown in BUSI, so each image is its
  own patient (splits.py groups near-duplicates).

  Args:
    root: the ``Dataset_BUSI_with_GT`` folder.
    classes: "binary" (benign 0, malignant 1; normal dropped), "three" (normal = 2) or
      "malignant_vs_rest" (benign and normal 0, malignant 1; MedMNIST's task).
    split_file: optional ``busi_breastmnist_split.tsv``; adds meta["split"] and
      meta["medmnist_index"] and checks its (inverted, 0 = malignant) labels against the folders.
    on_error: "raise" or "skip" bad images (one counted warning).

  Returns:
    The collection, ordered by class then natural file order.
  """
  # malignant_vs_rest reads all three folders (an empty normal/ still fails) and merges after.
  folders = class_names(classes)
  if classes == "malignant_vs_rest":
    folders = records.THREE_CLASSES
  _require_dir(root, "BUSI")
  split_table = _read_busi_split_file(split_file) if split_file is not None else None
  problems = _Problems(on_error, f"BUSI folder {root}")
  candidates = []
  for label, class_name in enumerate(folders):
    folder = os.path.join(root, class_name)
    _require_dir(folder, f"BUSI class {class_name!r}")
    images, masks = _busi_listing(folder)
    for orphan in sorted(set(masks) - set(images), key=_natural_key):
      problems.add(f"{masks[orphan][0][1]}: mask without an image {orphan}.png", is_image=False)
    for stem in sorted(images, key=_natural_key):
      path = images[stem]
      record_id = f"{class_name}/{os.path.basename(path)}"
      meta: dict[str, Any] = {"class_folder": class_name}
      problem = None
      if split_table is not None:
        meta, problem = _busi_split_meta(record_id, label, meta, split_table, split_file)
      mask_paths = tuple(p for _, p in sorted(masks.get(stem, [])))
      record = records.Record(
        id=record_id, label=label, patient_id=record_id, image=path, meta=meta
      )
      candidates.append(_Candidate(record, mask_paths, problem=problem))
  if split_table is not None:
    unlisted = sum(1 for c in candidates if "split" not in c.record.meta and not c.problem)
    if unlisted:
      logging.warning(
        "busi: %d of %d images are not in %s (no meta['split'])",
        unlisted,
        len(candidates),
        split_file,
      )
  collection = _finish(
    "busi",
    candidates,
    class_names=folders,
    root=root,
    problems=problems,
    class_hint=lambda c: os.path.join(root, c),
  )
  return _malignant_vs_rest(collection) if classes == "malignant_vs_rest" else collection


def _busi_split_meta(record_id, label, meta, split_table, split_file):
  """Adds the BreastMNIST split to meta; returns (meta, problem or None)."""
  entry = split_table.get(record_id)
  if entry is None or isinstance(entry, str):  # Unlisted, or its row's problem.
    return meta, entry
  line, split, index, bm_label = entry
  # BreastMNIST: 0 = malignant, 1 = benign or normal.
  if (bm_label == 0) != (label == records.MALIGNANT):
    return meta, (
      f"{split_file} line {line}: {record_id} has breastmnist_label {bm_label} "
      f"(0 = malignant) but sits in the {meta['class_folder']!r} folder"
    )
  return dict(meta, split=split, medmnist_index=index), None


def class_names(classes: str) -> tuple[str, ...]:
  names = {
    "binary": records.BINARY_CLASSES,
    "three": records.THREE_CLASSES,
    "malignant_vs_rest": MALIGNANT_VS_REST_CLASSES,
  }
  if classes not in names:
    raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")
  return names[classes]


def _malignant_vs_rest(collection: records.Collection) -> records.Collection:
  """A three-class collection as MedMNIST's task: malignant 1, benign and normal 0, all kept."""
  relabelled = tuple(
    dataclasses.replace(
      r,
      label=int(r.label == records.MALIGNANT),
      meta=dict(r.meta, original_class=collection.class_names[r.label]),
    )
    for r in collection.records
  )
  return dataclasses.replace(collection, records=relabelled, class_names=MALIGNANT_VS_REST_CLASSES)


# ----------------------------------------------------------------------------------------------
# BUS-BRA.
# ----------------------------------------------------------------------------------------------


def read_busbra_folds(path: str) -> dict[str, int | str]:
  """ID -> official fold (the ``kFold`` column) or the row's problem; {} when the file is absent."""
  if not os.path.isfile(path):
    logging.warning("busbra: %s not found; no official folds in meta", path)
    return {}
  folds: dict[str, int | str] = {}
  for line, row, problem in _read_csv(path, ("ID", "kFold")):
    try:
      folds[row["ID"]] = problem or int(row["kFold"])
    except ValueError:
      folds[row["ID"]] = f"{path} line {line}: kFold {row['kFold']!r} is not an integer"
  return folds


def busbra(root: str, *, on_error: str = "raise") -> records.Collection:
  """BUS-BRA: ``Images/bus_XXXX-s.png``, ``Masks/mask_XXXX-s.png``, ``bus_data.csv``.

  Patients come from the ``Case`` column; meta holds ``birads`` (int), ``device``, ``histology``,
  ``side`` and, from the official ``5-fold-cv.csv`` / ``10-fold-cv.csv``, ``fold5`` / ``fold10``.
  The image size is checked against the CSV's Width/Height.

  Args:
    root: the BUS-BRA folder.
    on_error: "raise" or "skip" bad images.
  """
  for sub in ("Images", "Masks"):
    _require_dir(os.path.join(root, sub), f"BUS-BRA {sub}")
  data_csv = os.path.join(root, "bus_data.csv")
  rows = _read_csv(data_csv, ("ID", "Case", "Pathology", "BIRADS", "Device"))
  fold5 = read_busbra_folds(os.path.join(root, "5-fold-cv.csv"))
  fold10 = read_busbra_folds(os.path.join(root, "10-fold-cv.csv"))
  problems = _Problems(on_error, f"BUS-BRA folder {root}")
  candidates = []
  for line, row, problem in rows:
    image_id = row["ID"]
    where = f"{data_csv} line {line}"
    image = os.path.join(root, "Images", f"{image_id}.png")
    mask = os.path.join(root, "Masks", f"{image_id.replace('bus_', 'mask_', 1)}.png")
    meta: dict[str, Any] = {
      "device": row["Device"],
      "histology": row.get("Histology", ""),
      "side": row.get("Side", ""),
    }
    label, expected = 0, None
    pathology = row["Pathology"].lower()
    if pathology not in records.BINARY_CLASSES:
      problem = problem or f"{where}: unknown Pathology {row['Pathology']!r} for {image_id}"
    else:
      label = records.BINARY_CLASSES.index(pathology)
    try:
      meta["birads"] = int(row["BIRADS"])
      if row.get("Width") and row.get("Height"):
        expected = (int(row["Height"]), int(row["Width"]))
    except ValueError:
      problem = problem or f"{where}: BIRADS/Width/Height not integers for {image_id}"
    if not os.path.isfile(mask):
      problem = problem or f"{mask}: mask file not found (listed at {where})"
    for key, folds in (("fold5", fold5), ("fold10", fold10)):
      fold = folds.get(image_id)
      if isinstance(fold, str):  # The folds file's row for this image is bad.
        problem = problem or fold
      elif fold is not None:
        meta[key] = fold
    record = records.Record(
      id=image_id, label=label, patient_id=row["Case"], image=image, meta=meta
    )
    candidates.append(
      _Candidate(record, (mask,), expected_shape=expected, expected_where=where, problem=problem)
    )
  seen_ids: set[str] = set()
  for c in candidates:  # Duplicate IDs would silently share one file.
    if c.record.id in seen_ids and not c.problem:
      c.problem = f"{data_csv}: ID {c.record.id} listed twice"
    seen_ids.add(c.record.id)
  return _finish(
    "busbra",
    candidates,
    class_names=records.BINARY_CLASSES,
    root=root,
    problems=problems,
    class_hint=lambda c: f"{data_csv} (Pathology {c})",
  )


# ----------------------------------------------------------------------------------------------
# BreastMNIST.
# ----------------------------------------------------------------------------------------------


def breastmnist(path: str, *, on_error: str = "raise") -> records.Collection:
  """MedMNIST ``breastmnist.npz`` / ``breastmnist_{64,128,224}.npz`` as in-memory records.

  MedMNIST labels are inverted (0 = malignant, 1 = benign or normal); they come out
  malignant = 1, with class 0 named "benign or normal": the npz is natively the
  "malignant_vs_rest" task. meta["split"] is the MedMNIST split.
  """
  _require_file(path, "BreastMNIST .npz")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError) as e:
    raise records.DataError(f"{path}: not a readable numeric .npz ({e})") from e
  problems = _Problems(on_error, f"BreastMNIST file {path}", unit="image")
  kept, total = [], 0
  for split in BREASTMNIST_SPLITS:
    for key in (f"{split}_images", f"{split}_labels"):
      if key not in arrays:
        raise records.DataError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
      raise records.DataError(
        f"{path}: {split}_images is {images.dtype} {images.shape}, expected uint8 (N, H, W)"
      )
    if len(labels) != len(images):
      raise records.DataError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
    total += len(images)
    for i, (image, medmnist_label) in enumerate(zip(images, labels, strict=True)):
      if medmnist_label not in (0, 1):
        problems.add(f"{split}_labels[{i}] = {medmnist_label} is not 0 or 1")
        continue
      record_id = f"{split}/{i}"
      label = int(medmnist_label == 0)
      # original_class as BUSI's malignant_vs_rest has it, as finely as the npz knows.
      meta = {
        "split": split,
        "medmnist_index": i,
        "original_class": MALIGNANT_VS_REST_CLASSES[label],
      }
      kept.append(
        records.Record(id=record_id, label=label, patient_id=record_id, image=image, meta=meta)
      )
  problems.finish(total)
  return _in_memory_collection("breastmnist", kept, MALIGNANT_VS_REST_CLASSES, path)


def _in_memory_collection(
  name, kept, class_names, root, *, every_class: bool = True
) -> records.Collection:
  """Builds the collection; a class with no images raises (every_class) or warns."""
  if not kept:
    raise records.DataError(f"{root}: {name} has no usable images")
  counts = np.bincount([r.label for r in kept], minlength=len(class_names))
  for label, class_name in enumerate(class_names):
    if counts[label] == 0:
      if every_class:
        raise records.DataError(f"{root}: no usable images of class {class_name!r}")
      logging.warning("%s: no images of class %r", name, class_name)
  return records.Collection(name=name, records=tuple(kept), class_names=class_names, root=root)


# ----------------------------------------------------------------------------------------------
# CSV manifest.
# ----------------------------------------------------------------------------------------------


def _parse_label(text: str) -> int | None:
  if text.isdigit() and int(text) < len(records.THREE_CLASSES):
    return int(text)
  return _LABEL_NAMES.get(text.lower())


def csv_manifest(path: str, *, on_error: str = "raise") -> records.Collection:
  """A CSV ``path,label[,patient_id][,mask][,split]`` with paths relative to the CSV.

  Labels are 0/1/2 or benign/malignant/normal (malignant = 1); any normal row makes the
  collection three-class. Extra columns go to meta as strings. Bad rows name the CSV line.
  """
  rows = _read_csv(path, ("path", "label"))
  base = os.path.dirname(os.path.abspath(path))
  problems = _Problems(on_error, f"CSV manifest {path}")
  candidates = []
  for line, row, problem in rows:
    where = f"{path} line {line}"
    label = _parse_label(row["label"])
    if not row["path"]:
      problem = problem or f"{where}: empty path"
    elif label is None:
      problem = problem or (
        f"{where}: unknown label {row['label']!r} (use 0/1/2 or benign/malignant/normal)"
      )
    image = os.path.join(base, row["path"])
    if not problem and not os.path.isfile(image):
      problem = f"{where}: image file {image} not found"
    mask_paths: tuple[str, ...] = ()
    if row.get("mask"):
      mask_paths = (os.path.join(base, row["mask"]),)
      if not problem and not os.path.isfile(mask_paths[0]):
        problem = f"{where}: mask file {mask_paths[0]} not found"
    meta = {k: v for k, v in row.items() if k not in ("path", "label", "patient_id", "mask")}
    meta["line"] = line
    record = records.Record(
      id=row["path"],
      label=label or 0,
      patient_id=row.get("patient_id") or row["path"],
      image=image,
      meta=meta,
    )
    candidates.append(_Candidate(record, mask_paths, problem=problem))
  has_normal = any(c.record.label == 2 for c in candidates if not c.problem)
  class_names = records.THREE_CLASSES if has_normal else records.BINARY_CLASSES
  return _finish(
    os.path.splitext(os.path.basename(path))[0],
    candidates,
    class_names=class_names,
    root=base,
    problems=problems,
    class_hint=lambda c: f"{path} (label {c})",
  )


# ----------------------------------------------------------------------------------------------
# TFDS.
# ----------------------------------------------------------------------------------------------


def _text(value: Any) -> Any:
  """TFDS numpy decoding gives bytes for Text features."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  if isinstance(value, np.generic):
    return value.item()
  return value


def _register_builders() -> None:
  """Imports busjax's builders so that tfds finds them by name."""
  from busjax.data.tfds import busbra as _busbra  # noqa: F401
  from busjax.data.tfds import busi as _busi  # noqa: F401


def tfds_source(name: str, data_dir: str, split: str = "train") -> records.Collection:
  """A built TFDS dataset (e.g. "busi/binary", "busbra") read with tfds, without TensorFlow.

  Records hold decoded uint8 arrays. Nothing is downloaded or built here: build first with
  ``tfds build`` or the builder's ``download_and_prepare`` (see busjax/data/tfds/).
  """
  import tensorflow_datasets as tfds  # Lazy: an optional dependency.

  _register_builders()
  if not os.path.isdir(data_dir):
    raise records.DataError(f"{data_dir}: TFDS data_dir not found")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for "not built here".
    raise records.DataError(
      f"{data_dir}: cannot read TFDS dataset {name!r} split {split!r} ({type(e).__name__}: {e})"
    ) from e
  class_names = tuple(builder.info.features["label"].names)
  if "malignant" in class_names and class_names.index("malignant") != records.MALIGNANT:
    raise records.DataError(
      f"{data_dir}/{name}: label 'malignant' is class "
      f"{class_names.index('malignant')}, busjax needs it at 1"
    )
  kept = []
  for i in range(len(source)):
    example = source[i]
    image = np.asarray(example["image"])
    if image.ndim == 3:
      image = image[..., 0]
    mask = example.get("mask")
    if mask is not None:
      mask = (np.asarray(mask)[..., 0] > 0).astype(np.uint8)
    record_id = _text(example.get("id", f"{split}/{i}"))
    # TFDS has no null: busjax's builders write "" or -1 for "unknown", which we drop again.
    meta = {k: _text(v) for k, v in dict(example.get("metadata", {})).items()}
    meta = {k: v for k, v in meta.items() if not (isinstance(v, str | int) and v in ("", -1))}
    kept.append(
      records.Record(
        id=record_id,
        label=int(example["label"]),
        patient_id=_text(example.get("patient_id", record_id)),
        image=image,
        mask=mask,
        meta=meta,
      )
    )
  # A slice such as "train[:2]" may legitimately miss a class; the build checked the whole set.
  return _in_memory_collection(
    f"tfds:{name}[{split}]", kept, class_names, data_dir, every_class=False
  )


# ----------------------------------------------------------------------------------------------
# Config dispatch.
# ----------------------------------------------------------------------------------------------


def _breastmnist_file(root: str, image_size: int | None) -> str:
  """root may be the .npz itself or a folder holding breastmnist[_SIZE].npz."""
  if os.path.isfile(root) or not os.path.isdir(root):
    return root
  for name in (f"breastmnist_{image_size}.npz", "breastmnist.npz"):
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name)
  raise records.DataError(f"{root}: no breastmnist_{image_size}.npz or breastmnist.npz here")


def _serve_classes(collection: records.Collection, classes: str) -> records.Collection:
  """A three-class source serves every task (normal dropped or merged); others only their own."""
  want = class_names(classes)
  have = collection.class_names
  if have == want:
    return collection
  if have == records.THREE_CLASSES and classes == "binary":
    keep = [i for i, r in enumerate(collection.records) if r.label != 2]
    return dataclasses.replace(collection.subset(keep), class_names=want)
  if have == records.THREE_CLASSES and classes == "malignant_vs_rest":
    return _malignant_vs_rest(collection)
  if have == MALIGNANT_VS_REST_CLASSES and classes == "binary":
    # BreastMNIST: its npz cannot tell normal from benign, so nothing can be dropped. Serving
    # it as before keeps old configs running; the class names say what class 0 really holds.
    logging.warning(
      "%s: class 0 is 'benign or normal' (normal images cannot be told apart and dropped), so "
      "classes='binary' gets MedMNIST's task; set classes='malignant_vs_rest' to say so",
      collection.name,
    )
    return collection
  reason = " (it has no normal images)" if classes == "malignant_vs_rest" else ""
  raise records.DataError(
    f"{collection.root}: source {collection.name!r} has classes {have}, "
    f"cannot serve classes={classes!r}{reason}"
  )


def from_config(data_config: Any) -> records.Collection:
  """The collection ``config.data`` describes (``source`` picks the loader)."""
  source = data_config.source
  classes = data_config.get("classes", "binary")
  on_error = data_config.get("on_error", "raise")
  root = data_config.get("root")
  if source == "phantom":
    from busjax.data import phantom  # Lazy: written in parallel, heavy numpy set-up.

    phantom_kwargs = data_config.get("phantom") or {}
    if hasattr(phantom_kwargs, "to_dict"):  # ConfigDict: plain nested dicts for the generator.
      phantom_kwargs = phantom_kwargs.to_dict()
    collection = phantom.make_collection(
      **dict(phantom_kwargs), image_size=data_config.image_size, include_normal=classes != "binary"
    )
    return _malignant_vs_rest(collection) if classes == "malignant_vs_rest" else collection
  if source in ("paired_phantom", "paired_csv"):
    from busjax.data import paired  # Lazy: the mammography phantom is only needed here.

    return paired.patient_collection(paired.from_config(data_config))
  if source != "tfds" and not root:
    raise records.DataError(f"config.data.root is empty for source {source!r}")
  if source == "busi":
    collection = busi(
      root, classes=classes, split_file=data_config.get("split_file"), on_error=on_error
    )
  elif source == "busbra":
    collection = busbra(root, on_error=on_error)
  elif source == "breastmnist":
    path = _breastmnist_file(root, data_config.get("image_size"))
    collection = breastmnist(path, on_error=on_error)
  elif source == "csv":
    collection = csv_manifest(root, on_error=on_error)
  elif source == "tfds":
    collection = tfds_source(
      data_config.tfds_name,
      data_config.get("tfds_data_dir") or root,
      data_config.get("tfds_split", "train"),
    )
  else:
    raise ValueError(f"unknown config.data.source {source!r}")
  return _serve_classes(collection, classes)
