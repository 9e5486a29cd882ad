"""Input-pipeline speed: images/s of busjax.data.pipeline at 224x224, with a same-run reference.

Measures, in one run on one machine (numbers from different runs or machines don't compare):
  * reference: plain decode + resize_pad per image, no augmentation, no Grain;
  * cache build: decoding every image once at working resolution (start-up cost);
  * in-process Grain pipeline without augmentation and with the default train augmentation;
  * the augmented pipeline with 1..N Grain worker processes (steady state, start-up apart),
    for each resampling backend (PIL, and OpenCV when installed).
Prints a markdown table and writes JSON (``--output``).

  python -m benchmarks.input_pipeline                       # phantom data, in-memory arrays
  python -m benchmarks.input_pipeline --source=busi --root=../shared/data/Dataset_BUSI_with_GT
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

from benchmarks import common
from busjax.data import augment, phantom, pipeline, records, sources

_SOURCE = flags.DEFINE_enum("source", "phantom", ["phantom", "busi", "busbra"], "Data source.")
_ROOT = flags.DEFINE_string("root", None, "Dataset folder for --source=busi/busbra.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per configuration.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker-process counts to time.")
_BACKENDS = flags.DEFINE_list(
  "backends",
  ["pil"] + (["cv2"] if augment.cv2 is not None else []),
  "Augmentation resampling backends to time (cv2 needs opencv-python-headless).",
)
_PHANTOM_COUNT = flags.DEFINE_integer("phantom_count", 240, "Phantom images (3 classes).")
_PHANTOM_SIZE = flags.DEFINE_integer("phantom_size", 256, "Phantom image side.")
_OUTPUT = common.output_flag("Where to write the JSON (default: print only).")


def _collection() -> records.Collection:
  if _SOURCE.value == "phantom":
    per_class = max(1, _PHANTOM_COUNT.value // 3)
    return phantom.make_collection(counts=(per_class,) * 3, image_size=_PHANTOM_SIZE.value, seed=0)
  if not _ROOT.value:
    raise app.UsageError(f"--source={_SOURCE.value} needs --root")
  if _SOURCE.value == "busi":
    return sources.busi(_ROOT.value, classes="three")
  return sources.busbra(_ROOT.value)


def _time_reference(collection: records.Collection, size: int, count: int) -> float:
  """Images/s of decode + resize_pad, the cheapest thing that yields a model input."""
  start = time.perf_counter()
  for i in range(count):
    augment.resize_pad(records.load_image(collection.records[i % len(collection)]), size)
  return count / (time.perf_counter() - start)


def _time_dataset(dataset, batches: int, batch_size: int) -> dict[str, float]:
  """First-batch latency and steady-state images/s of a Grain IterDataset."""
  start = time.perf_counter()
  iterator = iter(dataset)
  next(iterator)
  first = time.perf_counter() - start
  for _ in range(2):  # Let worker buffers fill; not timed.
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * batch_size / (time.perf_counter() - start)
  if hasattr(iterator, "close"):
    iterator.close()
  return {"first_batch_s": first, "images_per_s": rate}


def main(argv):
  del argv
  size, batch_size, batches = _IMAGE_SIZE.value, _BATCH_SIZE.value, _BATCHES.value
  collection = _collection()
  common = dict(
    image_size=size, global_batch_size=batch_size, seed=0, process_index=0, process_count=1
  )
  reference = _time_reference(collection, size, min(len(collection), batches * batch_size))

  start = time.perf_counter()
  pipeline.train_dataset(collection, augment_config=None, **common)
  cache_s = time.perf_counter() - start

  rows = [("reference: decode + resize_pad (no Grain)", {"images_per_s": reference})]
  rows.append(
    (
      "Grain in-process, no augmentation (cached)",
      _time_dataset(
        pipeline.train_dataset(collection, augment_config=None, **common), batches, batch_size
      ),
    )
  )
  for backend in _BACKENDS.value:
    train_config = augment.default_config()
    train_config.backend = backend
    rows.append(
      (
        f"Grain in-process, train augmentation ({backend})",
        _time_dataset(
          pipeline.train_dataset(collection, augment_config=train_config, **common),
          batches,
          batch_size,
        ),
      )
    )
    for workers in (int(w) for w in _WORKERS.value):
      rows.append(
        (
          f"Grain {workers} worker process(es), train augmentation ({backend})",
          _time_dataset(
            pipeline.train_dataset(
              collection, augment_config=train_config, num_workers=workers, **common
            ),
            batches,
            batch_size,
          ),
        )
      )

  result = {
    "benchmark": "input_pipeline",
    "source": collection.name,
    "synthetic": collection.synthetic,
    "images": len(collection),
    "image_size": size,
    "batch_size": batch_size,
    "timed_batches": batches,
    "cache_build_s": cache_s,
    "cpu_count": os.cpu_count(),
    "load_average": os.getloadavg(),
    "python": platform.python_version(),
    "rows": [
      {
        "name": name,
        **{k: round(v, 3) for k, v in r.items()},
        "ratio_to_reference": round(r["images_per_s"] / reference, 3),
      }
      for name, r in rows
    ],
  }
  print(
    f"\n{len(collection)} {collection.name} images -> {size}x{size}, batch {batch_size}, "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
    f"cache build {cache_s:.2f} s\n"
  )
  print("| configuration | images/s | x reference | first batch (s) |")
  print("|---|---:|---:|---:|")
  for row in result["rows"]:
    first = f"{row['first_batch_s']:.2f}" if "first_batch_s" in row else "-"
    print(
      f"| {row['name']} | {row['images_per_s']:.0f} | {row['ratio_to_reference']:.2f} | {first} |"
    )
  text = json.dumps(result, indent=2)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")
  else:
    print("\n" + text)


if __name__ == "__main__":  # Grain worker processes re-import this module: keep the guard.
  app.run(main)
