"""Grain input pipelines: records -> uint8 batches (train: infinite, augmented; eval: exact).

Train pipeline, per process::

  decoded cache (working resolution) -> shuffle (new order each epoch) | weighted draw
    -> [mix of several sources] -> augment (random_map) -> batch -> [mp_prefetch workers]

Batches are dicts of numpy arrays: ``image`` uint8 [B, H, W, 1], ``label`` int32 [B],
``index`` int32 [B] (position in the collection), ``valid`` bool [B], ``mask`` uint8
[B, H, W, 1] when asked, and ``source`` int32 [B] for mixtures (which collection a row came
from). Images stay uint8 all the way: normalisation belongs inside the jitted step, and uint8 is
4x less to copy. ``busjax.sharding.host_to_global`` turns a batch into global jax.Arrays.

Multi-host: every process builds the same global stream (order and augmentation depend on the
seed only) and yields its ``global_batch_size // process_count`` rows of each global batch, so a
run on any number of processes trains on the same batches as a single process. Eval batches
are laid out so that concatenating the processes' rows in process order gives consecutive
records of the collection.

Every image is decoded once, when the dataset is built, and kept in memory with its longest side
at ``1.15 * image_size``: epochs never re-decode PNGs, and a bad file fails at start-up with
its name (records.DataError), not in a worker process hours later.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from busjax.data import augment, records

# Working resolution of the cache relative to the output: room for crops and rotations to
# sample real pixels, small enough that the warp needs no antialiasing.
WORKING_SCALE = 1.15
# In-process reading threads. Everything is in memory and the work holds the GIL part of the
# time: threads beyond the core count only add contention on a small machine.
_READ_THREADS = 0


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to this JAX process; jax is imported lazily so Grain workers start light."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def _shrink(image: np.ndarray, mask: np.ndarray | None, longest: int):
  """Resizes so the longest side is at most `longest` (antialiased); masks nearest."""
  height, width = image.shape
  if max(height, width) <= longest:
    return image, mask
  scale = longest / max(height, width)
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  image = np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BILINEAR))
  if mask is not None:
    mask = np.asarray(Image.fromarray(mask).resize(new_size, Image.Resampling.NEAREST))
  return image, mask


def _decode(record: records.Record, longest: int | None, with_masks: bool):
  """One record's image (and mask) as uint8 (H, W), optionally shrunk; DataError names it."""
  image = records.load_image(record)
  mask = records.load_mask(record, image.shape) if with_masks else None
  if longest is not None:
    image, mask = _shrink(image, mask, longest)
  return image, mask


class _RecordSource:
  """Random-access source (Grain's protocol: __len__, __getitem__) over some records.

  With ``cache`` every image is decoded here, in the constructing process, at working
  resolution; without it each access decodes (for data that does not fit in memory).
  """

  def __init__(
    self,
    collection: records.Collection,
    positions: np.ndarray,
    *,
    working_size: int,
    with_masks: bool,
    cache: bool,
    source_id: int | None = None,
  ):
    self._records = [collection.records[int(i)] for i in positions]
    self._positions = np.asarray(positions, np.int32)
    self._labels = collection.labels[self._positions] if len(positions) else np.zeros(0, np.int32)
    self._working_size = working_size
    self._with_masks = with_masks
    self._source_id = source_id
    self._decoded = None
    if cache:  # In threads (see `records.decode_threads`); the first bad record in order raises.
      with concurrent.futures.ThreadPoolExecutor(records.decode_threads()) as pool:
        self._decoded = list(
          pool.map(lambda r: _decode(r, working_size, with_masks), self._records)
        )

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if self._decoded is not None:
      image, mask = self._decoded[i]
    else:
      image, mask = _decode(self._records[i], self._working_size, self._with_masks)
    element = {"image": image, "label": self._labels[i], "index": self._positions[i]}
    if mask is not None:
      element["mask"] = mask
    if self._source_id is not None:
      element["source"] = np.int32(self._source_id)
    return element


class _ProcessRows(grain.MapDataset):
  """Process p's rows ``p * local ... (p + 1) * local`` of every global batch of `parent`.

  Grain derives each element's randomness from its index in the dataset, and MapDatasets are
  lazy, so every process sees exactly the rows a single process would put at those places of
  the global batch, and computes only its own: any process count trains on the same batches.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, local: int):
    super().__init__(parent)
    self._offset = process_index * local
    self._local = local
    self._global = local * process_count

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + row]


class _WeightedDraw(grain.transforms.RandomMap):
  """Maps a step number to a record drawn with replacement, with the given weights."""

  def __init__(self, source: _RecordSource, weights: np.ndarray):
    self._source = source
    self._cdf = np.cumsum(weights / weights.sum())

  def random_map(self, element: int, rng: np.random.Generator):
    del element  # Only the step's rng matters: it is seeded by (seed, step).
    position = int(np.searchsorted(self._cdf, rng.random(), side="right"))
    return self._source[min(position, len(self._source) - 1)]


class _Augment(grain.transforms.RandomMap):
  """Applies the Augmenter and shapes one example for batching."""

  def __init__(self, augmenter: augment.Augmenter):
    self._augmenter = augmenter

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    out = {
      "label": np.int32(element["label"]),
      "index": np.int32(element["index"]),
      "valid": np.bool_(True),
    }
    if "mask" in element:
      image, mask = self._augmenter(element["image"], rng, mask=element["mask"])
      out["mask"] = mask[..., None]
    else:
      image = self._augmenter(element["image"], rng)
    out["image"] = image[..., None]
    if "source" in element:
      out["source"] = element["source"]
    return out


def _derived_seed(*parts: int) -> int:
  """A 32-bit seed from several integers (Grain seeds must fit in uint32)."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _records_stream(
  collection: records.Collection,
  *,
  seed: int,
  process_index: int,
  process_count: int,
  image_size: int,
  with_masks: bool,
  cache: bool,
  sample_weights,
  source_id: int | None = None,
) -> grain.MapDataset:
  """The infinite stream of (un-augmented) examples from one collection, the same on every
  process (`_finish` takes each process's rows of every global batch)."""
  del process_index, process_count
  positions = np.arange(len(collection))
  if len(positions) == 0:
    raise ValueError(f"collection {collection.name!r} has no records")
  source = _RecordSource(
    collection,
    positions,
    working_size=round(WORKING_SCALE * image_size),
    with_masks=with_masks,
    cache=cache,
    source_id=source_id,
  )
  stream_seed = _derived_seed(seed, source_id or 0, 0)
  if sample_weights is None:
    # Shuffle before repeat: each epoch is a fresh permutation (repeat reseeds per epoch).
    return grain.MapDataset.source(source).shuffle(seed=stream_seed).repeat()
  weights = np.asarray(sample_weights, np.float64)
  if weights.shape != (len(collection),) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError(
      f"sample_weights must be {len(collection)} finite values >= 0, one per "
      f"record of {collection.name!r}; got shape {weights.shape}"
    )
  if weights.sum() <= 0:
    raise ValueError(f"sample_weights of {collection.name!r} sum to 0")
  return (
    grain.MapDataset.range(len(source))
    .repeat()
    .random_map(_WeightedDraw(source, weights), seed=stream_seed)
  )


def _finish(
  stream: grain.MapDataset,
  *,
  image_size: int,
  global_batch_size: int,
  seed: int,
  augment_config,
  num_workers: int,
  process_index: int,
  process_count: int,
  transform: grain.transforms.RandomMap | None = None,
) -> grain.IterDataset:
  """Augment (or `transform`) -> batch -> iterate (in-process or in worker processes)."""
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
    )
  local_batch = global_batch_size // process_count
  if transform is None:
    transform = _Augment(augment.Augmenter(augment_config, image_size))
  dataset = stream.random_map(transform, seed=_derived_seed(seed, 7, 0))
  if process_count > 1:
    dataset = _ProcessRows(dataset, process_index, process_count, local_batch)
  # Batching before to_iter_dataset makes a worker's unit of work (and of pickling) a batch.
  dataset = dataset.batch(local_batch, drop_remainder=True)
  dataset = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_THREADS)
  )
  if num_workers > 0:
    # Grain's workers read absl flags; a notebook or test that never ran absl.app would crash
    # with UnparsedFlagAccessError, so fall back to the flags' defaults there.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
    )
  return dataset


def train_dataset(
  collection: records.Collection,
  *,
  image_size: int,
  global_batch_size: int,
  seed: int,
  augment_config: ml_collections.ConfigDict | None,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  with_masks: bool = False,
  sample_weights: Sequence[float] | np.ndarray | None = None,
  cache: bool = True,
) -> grain.IterDataset:
  """Infinite, augmented, reshuffled-each-epoch training batches for this process.

  Args:
    collection: the training records.
    image_size: output side (square).
    global_batch_size: rows per step over all processes; each process yields
      ``global_batch_size // process_count`` (must divide).
    seed: one seed for order and augmentation; same seed, same batches.
    augment_config: ``augment.default_config()``-shaped; None or mode "none" = resize_pad only.
    num_workers: Grain worker processes; 0 runs in-process (fastest on few cores).
      Workers need a ``if __name__ == "__main__":`` guard in the launching script.
    process_index, process_count: this process's slot; default from JAX.
    with_masks: also yield ``mask`` (same geometry as the image).
    sample_weights: optional per-record weights (len(collection)); then records are drawn
      with replacement in proportion to them instead of epoch permutations.
    cache: decode every image once at start-up (default); False decodes at each access.

  Returns:
    A grain.IterDataset; ``iter(ds)`` gives an iterator with get_state()/set_state().
  """
  process_index, process_count = _process_slot(process_index, process_count)
  stream = _records_stream(
    collection,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    image_size=image_size,
    with_masks=with_masks,
    cache=cache,
    sample_weights=sample_weights,
  )
  return _finish(
    stream,
    image_size=image_size,
    global_batch_size=global_batch_size,
    seed=seed,
    augment_config=augment_config,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
  )


def mixture_dataset(
  collections: Sequence[records.Collection],
  weights: Sequence[float],
  *,
  image_size: int,
  global_batch_size: int,
  seed: int,
  augment_config: ml_collections.ConfigDict | None,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  with_masks: bool = False,
  sample_weights=None,
  cache: bool = True,
) -> grain.IterDataset:
  """Like train_dataset, over several collections mixed in proportion to `weights`.

  Rows carry ``source`` (int32, position of their collection in `collections`) and ``index``
  (position within that collection). Used e.g. for real + GAN-synthetic rebalancing.

  Args:
    collections: collections with identical class_names.
    weights: one non-negative weight per collection (normalised here); each batch draws
      rows from the collections in these proportions (deterministic interleaving).
    sample_weights: None, or one entry per collection (None or per-record weights).
    Others: as train_dataset.
  """
  if not collections or len(weights) != len(collections):
    raise ValueError(
      f"need one weight per collection, got {len(weights)} weights for "
      f"{len(collections)} collections"
    )
  class_names = {tuple(c.class_names) for c in collections}
  if len(class_names) != 1:
    raise ValueError(f"mixed collections must share class_names, got {sorted(class_names)}")
  weights = [float(w) for w in weights]
  if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {weights}")
  per_collection = sample_weights if sample_weights is not None else [None] * len(collections)
  if len(per_collection) != len(collections):
    raise ValueError("sample_weights must hold one entry (or None) per collection")
  process_index, process_count = _process_slot(process_index, process_count)
  # Zero-weight collections are left out (Grain's mix wants positive proportions).
  streams, kept = [], []
  for source_id, (collection, w) in enumerate(zip(collections, weights, strict=True)):
    if w > 0:
      streams.append(
        _records_stream(
          collection,
          seed=seed,
          process_index=process_index,
          process_count=process_count,
          image_size=image_size,
          with_masks=with_masks,
          cache=cache,
          sample_weights=per_collection[source_id],
          source_id=source_id,
        )
      )
      kept.append(w)
  mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, kept)
  return _finish(
    mixed,
    image_size=image_size,
    global_batch_size=global_batch_size,
    seed=seed,
    augment_config=augment_config,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
  )


class _TwoViews(grain.transforms.RandomMap):
  """Two independently augmented views of one image: the positive pair of contrastive learning.

  With `partner_probability` > 0, the second view comes, that often, from another image of the
  same group (patient or near-duplicate cluster) when the group has one: a positive pair across
  scans of one lesion rather than two crops of one scan.
  """

  def __init__(
    self,
    augmenters: tuple[augment.Augmenter, augment.Augmenter],
    source: _RecordSource,
    groups: np.ndarray | None,
    partner_probability: float,
  ):
    self._augmenters = augmenters
    self._source = source
    self._partner_probability = float(partner_probability)
    self._members = None
    if groups is not None and self._partner_probability > 0:
      members: dict[int, list[int]] = {}
      for position, group in enumerate(np.asarray(groups).tolist()):
        members.setdefault(int(group), []).append(position)
      self._members = [members[int(g)] for g in np.asarray(groups).tolist()]

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    index = int(element["index"])
    partner = element
    if self._members is not None and rng.random() < self._partner_probability:
      others = [p for p in self._members[index] if p != index]
      if others:
        partner = self._source[others[int(rng.integers(len(others)))]]
    first = self._augmenters[0](element["image"], rng)
    second = self._augmenters[1](partner["image"], rng)
    return {
      "view1": first[..., None],
      "view2": second[..., None],
      "index": np.int32(index),
      "partner": np.int32(partner["index"]),
      "valid": np.bool_(True),
    }


def contrastive_dataset(
  collection: records.Collection,
  *,
  image_size: int,
  global_batch_size: int,
  seed: int,
  view_configs: tuple[ml_collections.ConfigDict, ml_collections.ConfigDict],
  groups: np.ndarray | None = None,
  partner_probability: float = 0.0,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  cache: bool = True,
) -> grain.IterDataset:
  """Infinite batches of two augmented views per image, labels ignored (contrastive pretraining).

  Batches hold ``view1``, ``view2`` uint8 [B, H, W, 1], ``index`` (the image's position in the
  collection), ``partner`` (where ``view2`` came from: ``index`` unless a same-group partner was
  drawn) and ``valid``. Same seed, same batches on any number of processes, as `train_dataset`.

  Args:
    collection: the pretraining images (their labels are never read).
    view_configs: the augmentation of the first and of the second view
      (`augment.default_config()`-shaped; SimCLR uses one policy for both).
    groups: optional group id per record (`splits.group_ids`), for same-group positives.
    partner_probability: how often ``view2`` comes from another image of the same group.
    Others: as `train_dataset`.
  """
  process_index, process_count = _process_slot(process_index, process_count)
  if len(collection) == 0:
    raise ValueError(f"collection {collection.name!r} has no records")
  if groups is not None and len(groups) != len(collection):
    raise ValueError(f"groups has {len(groups)} entries for {len(collection)} records")
  source = _RecordSource(
    collection,
    np.arange(len(collection)),
    working_size=round(WORKING_SCALE * image_size),
    with_masks=False,
    cache=cache,
  )
  stream = grain.MapDataset.source(source).shuffle(seed=_derived_seed(seed, 0, 0)).repeat()
  views = tuple(augment.Augmenter(c, image_size) for c in view_configs)
  return _finish(
    stream,
    image_size=image_size,
    global_batch_size=global_batch_size,
    seed=seed,
    augment_config=None,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
    transform=_TwoViews(views, source, groups, partner_probability),
  )


def eval_batches(
  collection: records.Collection,
  *,
  image_size: int,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  with_masks: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Every record exactly once, resize_pad geometry, last batch padded.

  Global batch b holds records ``b * batch_size ...``; process p yields its rows
  ``p * local ... (p + 1) * local`` of it (local = batch_size // process_count), so every
  process yields the same number of batches and ``host_to_global`` reassembles collection
  order. Padding rows have ``valid=False``, ``index=-1``, label 0 and a black image.

  Args:
    collection: records to evaluate.
    image_size: output side.
    batch_size: global rows per batch (divisible by process_count).
    process_index, process_count: this process's slot; default from JAX.
    with_masks: also yield ``mask``.

  Yields:
    Batch dicts (see module docstring).
  """
  for batch, rows in _eval_rows(collection, batch_size, process_index, process_count):
    local = len(batch["label"])
    batch["image"] = np.zeros((local, image_size, image_size, 1), np.uint8)
    if with_masks:
      batch["mask"] = np.zeros((local, image_size, image_size, 1), np.uint8)
    for row, position in rows:
      image, mask = _decode(collection.records[position], None, with_masks)
      if with_masks:
        image, mask = augment.resize_pad(image, image_size, mask)
        batch["mask"][row, ..., 0] = mask
      else:
        image = augment.resize_pad(image, image_size)
      batch["image"][row, ..., 0] = image
    yield batch


def _eval_rows(collection: records.Collection, batch_size: int, process_index, process_count):
  """(batch with label/index/valid filled and padding rows, [(row, position), ...]) for this
  process's rows of every global batch, in collection order (see `eval_batches`)."""
  process_index, process_count = _process_slot(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
  local = batch_size // process_count
  labels = collection.labels
  for start in range(0, len(collection), batch_size):
    first = start + process_index * local
    batch = {
      "label": np.zeros(local, np.int32),
      "index": np.full(local, -1, np.int32),
      "valid": np.zeros(local, bool),
    }
    rows = list(enumerate(range(first, min(first + local, len(collection)))))
    for row, position in rows:
      batch["label"][row] = labels[position]
      batch["index"][row] = position
      batch["valid"][row] = True
    yield batch, rows


# ----------------------------------------------------------------------------------------------
# Paired modalities (end-to-end multimodal network): one channel per modality
# ----------------------------------------------------------------------------------------------


class _PatientViews:
  """Random access over patients (Grain's protocol): every image of each modality of a patient
  (``record.meta[modality]``, as `busjax.data.paired.patient_collection` builds), decoded once at
  working resolution."""

  def __init__(self, patients: records.Collection, modalities: Sequence[str], working_size: int):
    self._views = []
    for p in patients.records:
      per_modality = []
      for modality in modalities:
        views = p.meta.get(modality) or ()
        if not views:
          raise records.DataError(
            f"{patients.name}: patient {p.patient_id} has no {modality} image"
          )
        per_modality.append([_decode(r, working_size, False)[0] for r in views])
      self._views.append(per_modality)
    self._labels = patients.labels

  def __len__(self) -> int:
    return len(self._views)

  def __getitem__(self, i: int) -> dict:
    return {"views": self._views[i], "label": self._labels[i], "index": np.int32(i)}


class _OneViewPerModality(grain.transforms.RandomMap):
  """Draws one image of each modality, augments each on its own, stacks them as channels."""

  def __init__(self, augmenter: augment.Augmenter):
    self._augmenter = augmenter

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    channels = [
      self._augmenter(views[int(rng.integers(len(views)))], rng) for views in element["views"]
    ]
    return {
      "image": np.stack(channels, axis=-1),
      "label": np.int32(element["label"]),
      "index": np.int32(element["index"]),
      "valid": np.bool_(True),
    }


def paired_dataset(
  patients: records.Collection,
  *,
  modalities: Sequence[str],
  image_size: int,
  global_batch_size: int,
  seed: int,
  augment_config: ml_collections.ConfigDict | None,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """Infinite training batches of patients: ``image`` uint8 (B, H, W, len(modalities)), channel
  m one of the patient's images of modality m (a fresh draw each epoch, e.g. the CC or the MLO
  view), each augmented independently; ``label``, ``index`` (patient position), ``valid``.

  Epochs are permutations of the patients; same seed, same batches on any number of processes,
  as `train_dataset` (whose other arguments these are).
  """
  process_index, process_count = _process_slot(process_index, process_count)
  if len(patients) == 0:
    raise ValueError(f"collection {patients.name!r} has no patients")
  source = _PatientViews(patients, modalities, round(WORKING_SCALE * image_size))
  stream = grain.MapDataset.source(source).shuffle(seed=_derived_seed(seed, 0, 0)).repeat()
  return _finish(
    stream,
    image_size=image_size,
    global_batch_size=global_batch_size,
    seed=seed,
    augment_config=None,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
    transform=_OneViewPerModality(augment.Augmenter(augment_config, image_size)),
  )


def view_combinations(
  patients: records.Collection, modalities: Sequence[str]
) -> tuple[records.Collection, np.ndarray]:
  """Every combination of one image per modality of each patient, as records (patient order;
  ``meta["views"]`` the images, one per modality), and each patient's number of combinations
  (for averaging per patient with ``np.add.reduceat``)."""
  out, counts = [], []
  for p in patients.records:
    combos = list(itertools.product(*(p.meta.get(m) or () for m in modalities)))
    if not combos:
      raise records.DataError(f"{patients.name}: patient {p.patient_id} lacks a modality")
    counts.append(len(combos))
    for views in combos:
      out.append(
        records.Record(
          id="+".join(v.id for v in views),
          label=p.label,
          patient_id=p.patient_id,
          image=views[0].image,
          meta={"views": views},
        )
      )
  combinations = records.Collection(
    name=f"{patients.name}/{'+'.join(modalities)}",
    records=tuple(out),
    class_names=patients.class_names,
    synthetic=patients.synthetic,
    root=patients.root,
  )
  return combinations, np.asarray(counts, np.int64)


def paired_eval_batches(
  combinations: records.Collection,
  *,
  image_size: int,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """`eval_batches` of `view_combinations` records: ``image`` (B, H, W, modalities), each view
  resize_pad-ed into its channel; padding rows as `eval_batches`."""
  channels = len(combinations.records[0].meta["views"]) if len(combinations) else 1
  for batch, rows in _eval_rows(combinations, batch_size, process_index, process_count):
    batch["image"] = np.zeros((len(batch["label"]), image_size, image_size, channels), np.uint8)
    for row, position in rows:
      for channel, view in enumerate(combinations.records[position].meta["views"]):
        image, _ = _decode(view, None, False)
        batch["image"][row, ..., channel] = augment.resize_pad(image, image_size)
    yield batch
