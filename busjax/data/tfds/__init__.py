"""TFDS builders (manual_dir) for BUSI and BUS-BRA, and helpers to build and encode.

The builders live in `busi.py` and `busbra.py`; import those modules (not this package) to
register them with tfds. This package imports nothing heavy, so Grain workers that re-import a
builder module pay only for tensorflow_datasets itself.

Building and reading both work without TensorFlow: images and masks are handed to TFDS as PNG
bytes (numpy arrays would make TFDS call TensorFlow to encode) and the files are written as
``array_record``, which `tfds.data_source` reads with random access.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FILE_FORMAT = "array_record"


def png_bytes(array: np.ndarray) -> bytes:
  """Encodes a uint8 (H, W) array as grayscale PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8), "L").save(buffer, format="PNG")
  return buffer.getvalue()


def _is_gray8_png(path) -> bool:
  """True for an 8-bit grayscale PNG file, whose bytes TFDS can store unchanged."""
  if not isinstance(path, str) or not path.lower().endswith(".png"):
    return False
  with Image.open(path) as img:
    return img.format == "PNG" and img.mode == "L"


def encode_record(record) -> tuple[bytes, bytes]:
  """(image PNG bytes, mask PNG bytes 0/255) for a validated `records.Record`.

  8-bit grayscale PNG files are passed through byte for byte (most of BUSI and BUS-BRA):
  re-encoding them was most of the build time. Other modes are converted by `records`.
  """
  from busjax.data import records  # Lazy: keep this package import-light.

  if _is_gray8_png(record.image):
    with open(record.image, "rb") as f:
      image_bytes = f.read()
    shape = (record.meta["height"], record.meta["width"]) if "height" in record.meta else None
  else:
    image = records.load_image(record)
    image_bytes, shape = png_bytes(image), image.shape
  if _is_gray8_png(record.mask):
    with open(record.mask, "rb") as f:
      mask_bytes = f.read()  # Readers threshold at > 0, as records.load_mask does.
  else:
    mask_bytes = png_bytes(records.load_mask(record, shape) * np.uint8(255))
  return image_bytes, mask_bytes


def encoded_records(collection):
  """Yields (record, image bytes, mask bytes) in order, encoding in a thread pool."""
  import concurrent.futures
  import os

  with concurrent.futures.ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1))) as pool:
    for record, (image, mask) in zip(
      collection.records, pool.map(encode_record, collection.records), strict=True
    ):
      yield record, image, mask


def prepare(builder_cls, *, manual_dir: str, data_dir: str, config: str | None = None):
  """Builds `builder_cls` from the user's folder into `data_dir`; returns the builder.

  Args:
    builder_cls: `busi.Busi` or `busbra.Busbra`.
    manual_dir: the folder holding the user's copy of the dataset (see the builder's
      MANUAL_DOWNLOAD_INSTRUCTIONS).
    data_dir: where the TFDS files go; read them back with `sources.tfds_source`.
    config: builder config name (BUSI: "binary" or "three").
  """
  import tensorflow_datasets as tfds  # Lazy: an optional dependency.

  kwargs = {"config": config} if config else {}
  builder = builder_cls(data_dir=data_dir, file_format=FILE_FORMAT, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
