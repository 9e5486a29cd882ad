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
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
