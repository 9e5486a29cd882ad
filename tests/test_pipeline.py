"""Tests for busjax.data.pipeline: determinism, resume, epochs, process slices, eval, mixing."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from busjax.data import augment, pipeline, records


def _collection(n=12, name="toy", seed=0, label_of=lambda i: i % 2):
  """Records of different sizes with a bright square lesion and its mask."""
  rng = np.random.default_rng(seed)
  recs = []
  for i in range(n):
    height, width = (40, 52) if i % 3 else (56, 44)
    image = rng.integers(20, 60, (height, width), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[10:25, 12:30] = 1
    image[mask == 1] = 230
    recs.append(
      records.Record(
        id=f"{name}/{i}", label=label_of(i), patient_id=f"p{i}", image=image, mask=mask
      )
    )
  return records.Collection(name=name, records=tuple(recs))


def _train(collection, seed=0, **kwargs):
  kwargs.setdefault("augment_config", augment.default_config())
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return pipeline.train_dataset(collection, image_size=32, global_batch_size=4, seed=seed, **kwargs)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batch_layout():
  batch = next(iter(_train(_collection(), with_masks=True)))
  assert batch["image"].shape == (4, 32, 32, 1) and batch["image"].dtype == np.uint8
  assert batch["mask"].shape == (4, 32, 32, 1) and batch["mask"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
  assert batch["valid"].dtype == bool and batch["valid"].all()
  collection = _collection()
  np.testing.assert_array_equal(batch["label"], collection.labels[batch["index"]])


def test_same_seed_same_batches_other_seed_other_batches():
  collection = _collection()
  a = _take(iter(_train(collection, seed=1)), 4)
  b = _take(iter(_train(collection, seed=1)), 4)
  c = _take(iter(_train(collection, seed=2)), 4)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))


def test_resume_from_iterator_state():
  collection = _collection()
  iterator = iter(_train(collection))
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  fresh = iter(_train(collection))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)


def test_each_epoch_is_a_new_permutation():
  collection = _collection(12)
  batches = _take(iter(_train(collection)), 6)  # 2 epochs of 3 batches.
  first = np.concatenate([b["index"] for b in batches[:3]])
  second = np.concatenate([b["index"] for b in batches[3:]])
  assert sorted(first) == sorted(second) == list(range(12))
  assert not np.array_equal(first, second)


def test_processes_split_the_single_process_batches():
  """Each process yields its own rows of the same global batches one process would build, so
  any process count trains on the same data; within a batch the process slices are disjoint."""
  collection = _collection(12)  # Batches do not straddle epochs, so none repeats a record.
  single = _take(iter(_train(collection)), 6)
  per_process = [
    _take(iter(_train(collection, process_index=p, process_count=2)), 6) for p in range(2)
  ]
  for whole, first, second in zip(single, *per_process, strict=True):
    assert first["image"].shape[0] == second["image"].shape[0] == 2  # Global 4 // 2 processes.
    assert not set(first["index"].tolist()) & set(second["index"].tolist())
    glued = {key: np.concatenate([first[key], second[key]]) for key in whole}
    _assert_batches_equal([glued], [whole])


def test_eval_covers_every_record_once_with_padding():
  collection = _collection(11)
  per_process = [
    list(
      pipeline.eval_batches(
        collection, image_size=32, batch_size=4, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == 3
  rows = []
  for b0, b1 in zip(*per_process, strict=True):
    glued = {k: np.concatenate([b0[k], b1[k]]) for k in b0}  # What host_to_global builds.
    rows.append(glued)
  index = np.concatenate([r["index"] for r in rows])
  valid = np.concatenate([r["valid"] for r in rows])
  np.testing.assert_array_equal(index[valid], np.arange(11))  # Collection order, once each.
  assert valid.sum() == 11 and np.all(index[~valid] == -1)
  padded = rows[-1]
  assert np.all(padded["image"][~padded["valid"]] == 0)
  first = collection.records[0]
  np.testing.assert_array_equal(
    rows[0]["image"][0, ..., 0], augment.resize_pad(records.load_image(first), 32)
  )
  np.testing.assert_array_equal(rows[0]["label"][rows[0]["valid"]], collection.labels[:4])


def test_eval_masks_align():
  collection = _collection(3)
  batch = next(
    pipeline.eval_batches(
      collection, image_size=32, batch_size=4, process_index=0, process_count=1, with_masks=True
    )
  )
  bright = batch["image"][:3, ..., 0] > 125
  lesion = batch["mask"][:3, ..., 0] == 1
  # Bilinear image vs nearest mask may differ on the boundary only.
  assert (bright & lesion).sum() / (bright | lesion).sum() > 0.95


def test_mixture_respects_weights_and_tags_source():
  real = _collection(12, name="real")
  synthetic = _collection(6, name="synthetic", seed=1, label_of=lambda i: 1)
  dataset = pipeline.mixture_dataset(
    [real, synthetic],
    [0.75, 0.25],
    image_size=32,
    global_batch_size=8,
    seed=0,
    augment_config=None,
    process_index=0,
    process_count=1,
  )
  batches = _take(iter(dataset), 25)
  source = np.concatenate([b["source"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert abs((source == 1).mean() - 0.25) < 0.05
  assert set(index[source == 1]) == set(range(6)) and set(index[source == 0]) == set(range(12))


def test_mixture_rejects_different_classes():
  three = records.Collection(
    name="three", records=_collection(4).records, class_names=records.THREE_CLASSES
  )
  with pytest.raises(ValueError, match="class_names"):
    pipeline.mixture_dataset(
      [_collection(4), three],
      [1, 1],
      image_size=32,
      global_batch_size=4,
      seed=0,
      augment_config=None,
      process_index=0,
      process_count=1,
    )


def test_sample_weights_control_draws():
  collection = _collection(12)
  weights = np.where(collection.labels == 1, 3.0, 1.0)
  weights[0] = 0.0  # Never drawn.
  batches = _take(iter(_train(collection, sample_weights=weights, augment_config=None)), 100)
  index = np.concatenate([b["index"] for b in batches])
  assert 0 not in index
  malignant_share = (collection.labels[index] == 1).mean()
  assert abs(malignant_share - 18 / 23) < 0.06  # 6 * 3 / (6 * 3 + 5 * 1).
  with pytest.raises(ValueError, match="sample_weights"):
    _train(collection, sample_weights=np.ones(5))


def test_bad_file_fails_at_build_with_its_name(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.full((20, 20), 99, np.uint8)).save(good)
  broken = tmp_path / "broken.png"
  broken.write_bytes(good.read_bytes()[:40])  # Truncated PNG.
  recs = tuple(
    records.Record(id=str(i), label=0, patient_id=str(i), image=str(p))
    for i, p in enumerate([good, broken])
  )
  collection = records.Collection(name="files", records=recs)
  with pytest.raises(records.DataError, match="broken.png"):
    _train(collection)
  # Without the cache the error comes at read time, still a DataError naming the file.
  iterator = iter(_train(collection, cache=False, augment_config=None))
  with pytest.raises(records.DataError, match="broken.png"):
    _take(iterator, 2)


def test_cached_files_decode_in_threads_to_the_uncached_batches(tmp_path):
  recs = []
  for i in range(10):  # Distinct files, so a mix-up between records would show.
    path = tmp_path / f"img{i}.png"
    Image.fromarray(np.full((24 + i, 30), 10 * i, np.uint8)).save(path)
    recs.append(records.Record(id=str(i), label=i % 2, patient_id=str(i), image=str(path)))
  collection = records.Collection(name="files", records=tuple(recs))
  cached = _take(iter(_train(collection, augment_config=None)), 5)
  uncached = _take(iter(_train(collection, cache=False, augment_config=None)), 5)
  _assert_batches_equal(cached, uncached)
  for batch in cached:  # Each image still shows its own record's grey level.
    np.testing.assert_array_equal(batch["image"].max(axis=(1, 2, 3)), 10 * batch["index"])


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(
      _collection(),
      image_size=32,
      global_batch_size=5,
      seed=0,
      augment_config=None,
      process_index=0,
      process_count=2,
    )


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() is None, reason="needs process spawning")
def test_worker_processes_give_the_in_process_batches():
  collection = _collection()
  expected = _take(iter(_train(collection, seed=5)), 3)
  iterator = iter(_train(collection, seed=5, num_workers=1))
  try:
    _assert_batches_equal(_take(iterator, 3), expected)
  finally:
    iterator.close()


_BUSI = os.path.join(
  os.path.dirname(__file__), "..", "..", "shared", "data", "Dataset_BUSI_with_GT"
)


@pytest.mark.skipif(not os.path.isdir(_BUSI), reason="real BUSI data not present")
def test_real_busi_files_through_train_and_eval():
  from busjax.data import sources  # pylint: disable=g-import-not-at-top

  collection = sources.busi(_BUSI, classes="three")
  small = collection.subset(np.linspace(0, len(collection) - 1, 8).astype(int))
  batch = next(
    iter(
      pipeline.train_dataset(
        small,
        image_size=64,
        global_batch_size=4,
        seed=0,
        augment_config=augment.default_config(),
        process_index=0,
        process_count=1,
        with_masks=True,
      )
    )
  )
  assert batch["image"].shape == (4, 64, 64, 1) and batch["image"].max() > 0
  assert set(np.unique(batch["mask"])) <= {0, 1}
  evals = list(
    pipeline.eval_batches(small, image_size=64, batch_size=8, process_index=0, process_count=1)
  )
  np.testing.assert_array_equal(evals[0]["index"], np.arange(8))
  np.testing.assert_array_equal(evals[0]["label"], small.labels)
