"""The record type every data source produces, and strict image/mask reading.

A `Record` is one image with its label, patient and (optional) lesion mask. A `Collection`
is an ordered, immutable set of records plus what a report must say about where they came
from (source name, class names, whether the data is synthetic).

Label convention, everywhere in busjax: **malignant = 1**. Binary tasks use
``("benign", "malignant")``; three-class tasks append ``"normal"`` as class 2, so that
"malignant vs rest" is always ``label == 1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

BINARY_CLASSES = ("benign", "malignant")
THREE_CLASSES = ("benign", "malignant", "normal")
MALIGNANT = 1


class DataError(ValueError):
  """A data problem a user can fix; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image.

  Attributes:
    id: unique key within its collection (e.g. ``"benign/benign (12).png"``).
    label: index into ``Collection.class_names``; malignant is always 1.
    patient_id: patients group images for leakage-free splits; unique per image if unknown.
    image: a file path, or a uint8 array (H, W) for in-memory data (phantoms, BreastMNIST).
    mask: lesion mask path, uint8 array (H, W) with values {0, 1}, or None (no mask known).
    meta: source-specific metadata (``birads``, ``device``, ``split``, ``fold``, ...).
  """

  id: str
  label: int
  patient_id: str
  image: str | np.ndarray
  mask: str | np.ndarray | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Collection:
  """An ordered set of records plus the provenance every report must state."""

  name: str
  records: tuple[Record, ...]
  class_names: tuple[str, ...] = BINARY_CLASSES
  synthetic: bool = False
  root: str | None = None

  def __len__(self) -> int:
    return len(self.records)

  @property
  def labels(self) -> np.ndarray:
    return np.asarray([r.label for r in self.records], np.int32)

  @property
  def patient_ids(self) -> np.ndarray:
    return np.asarray([r.patient_id for r in self.records])

  def subset(self, indices: Sequence[int], name: str | None = None) -> Collection:
    """Records at `indices`, keeping provenance; `name` defaults to the parent's."""
    records = tuple(self.records[int(i)] for i in indices)
    return dataclasses.replace(self, records=records, name=name or self.name)

  def describe(self) -> dict[str, Any]:
    """Counts per class and patients, for logs and reports."""
    counts = np.bincount(self.labels, minlength=len(self.class_names))
    return {
      "source": self.name,
      "synthetic": self.synthetic,
      "images": len(self),
      "patients": int(len(set(self.patient_ids.tolist()))),
      "per_class": {c: int(n) for c, n in zip(self.class_names, counts, strict=True)},
    }


def _to_gray_uint8(img: Image.Image, path: str) -> np.ndarray:
  """Converts any PIL mode (16-bit, RGBA, palette, RGB, LA) to uint8 grayscale."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
  if img.mode == "F":
    arr = np.asarray(img, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
      raise DataError(f"{path}: float image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
  if img.mode in ("P", "PA"):
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA"):
    # Composite on black: transparent regions are "no echo", which is what a scanner shows.
    background = Image.new("RGBA", img.size, (0, 0, 0, 255))
    img = Image.alpha_composite(background, img.convert("RGBA"))
  return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_threads() -> int:
  """Threads for decoding many images: PIL releases the GIL while inflating PNGs, so threads
  scale a little beyond the core count."""
  return min(16, 2 * (os.cpu_count() or 1))


DECODED_CACHE_ENV = "BUSJAX_DECODED_CACHE_MB"
_DECODED_CACHE_MAX_MB = 1024


class _DecodedFiles:
  """Decoded files by (absolute path, size, modification time), up to `budget` bytes.

  Full, it keeps what it has and takes no more: the readers scan whole datasets in order, which
  would leave a least-recently-used cache smaller than the dataset with no hits at all.
  """

  def __init__(self, budget: int):
    self._budget = budget
    self._used = 0
    self._arrays: dict[tuple, tuple[np.ndarray, str]] = {}  # (pixels, PIL mode on disk)
    self._lock = threading.Lock()  # The loaders decode in threads.

  def get(self, key: tuple) -> tuple[np.ndarray, str] | None:
    with self._lock:
      return self._arrays.get(key)

  def put(self, key: tuple, decoded: tuple[np.ndarray, str]) -> None:
    with self._lock:
      if key not in self._arrays and self._used + decoded[0].nbytes <= self._budget:
        self._arrays[key] = decoded
        self._used += decoded[0].nbytes


_decoded: _DecodedFiles | None = None


def _decoded_cache_budget() -> int:
  """Bytes: $BUSJAX_DECODED_CACHE_MB, else 1 GiB but at most 1/8 of the machine's memory."""
  value = os.environ.get(DECODED_CACHE_ENV)
  if value is not None:
    try:
      return max(0, int(float(value) * 2**20))
    except ValueError:
      raise DataError(f"${DECODED_CACHE_ENV}={value!r}: expected megabytes, e.g. 512") from None
  budget = _DECODED_CACHE_MAX_MB * 2**20
  try:
    budget = min(budget, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
  except (ValueError, OSError, AttributeError):  # No sysconf (Windows) or no such name.
    pass
  return budget


@contextlib.contextmanager
def decoded_files_kept() -> Iterator[None]:
  """Within it, `read_image_file` decodes each file once and hands out the same read-only array
  after (a changed file, by size or modification time, is read again).

  A job reads every image several times: the loader's check, the near-duplicate search, each
  training pipeline's cache (one per fold of a cross-validation, one more for the EMA
  BatchNorm batches), every evaluation. The trainers' `train_and_evaluate` run inside it; the
  arrays are dropped when the outermost one exits. Budget: $BUSJAX_DECODED_CACHE_MB megabytes
  (0 turns it off), default 1 GiB or 1/8 of the machine's memory if less; files beyond it are
  decoded at every read, as outside it.
  """
  global _decoded
  if _decoded is not None:  # Nested: the outer one's arrays serve.
    yield
    return
  budget = _decoded_cache_budget()
  _decoded = _DecodedFiles(budget) if budget > 0 else None
  try:
    yield
  finally:
    _decoded = None


def read_image_file(path: str, *, with_mode: bool = False):
  """Reads an image file fully as uint8 grayscale (H, W), read-only, or raises DataError naming
  it; with `with_mode`, (pixels, the PIL mode on disk, e.g. "RGB" for colour annotations).
  Inside `decoded_files_kept` a file already read comes back without decoding."""
  try:
    info = os.stat(path)
  except OSError:
    info = None
  if info is None or not stat.S_ISREG(info.st_mode):
    raise DataError(f"{path}: image file not found")
  memo = _decoded
  key = (os.path.abspath(path), info.st_size, info.st_mtime_ns)
  decoded = memo.get(key) if memo is not None else None
  if decoded is None:
    decoded = _decode_file(path)
    decoded[0].flags.writeable = False  # Shared by every later reader.
    if memo is not None:
      memo.put(key, decoded)
  return decoded if with_mode else decoded[0]


def _decode_file(path: str) -> tuple[np.ndarray, str]:
  try:
    with Image.open(path) as img:
      mode = img.mode  # As the header says (before any conversion the decode may make).
      img.load()  # Forces a full decode: truncated files fail here, not mid-training.
      return _to_gray_uint8(img, path), mode
  except UnidentifiedImageError as e:
    raise DataError(f"{path}: not a readable image ({e})") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: corrupt or truncated image ({e})") from e


def load_image(record: Record) -> np.ndarray:
  """The record's image as uint8 grayscale (H, W)."""
  if isinstance(record.image, np.ndarray):
    arr = record.image
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim != 2:
      raise DataError(f"{record.id}: in-memory image has shape {arr.shape}, expected (H, W)")
    return arr.astype(np.uint8, copy=False)
  return read_image_file(record.image)


def load_mask(record: Record, shape: tuple[int, int] | None = None) -> np.ndarray:
  """The record's lesion mask as uint8 {0, 1} (H, W); zeros when the record has none.

  Args:
    record: the record.
    shape: the image's (H, W); a mask of another size is an error naming the file.
  """
  if record.mask is None:
    if shape is None:
      shape = load_image(record).shape
    return np.zeros(shape, np.uint8)
  if isinstance(record.mask, np.ndarray):
    mask, where = record.mask, record.id
  else:
    mask, where = read_image_file(record.mask), record.mask
  if shape is not None and tuple(mask.shape) != tuple(shape):
    raise DataError(
      f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}"
    )
  return (mask > 0).astype(np.uint8)
