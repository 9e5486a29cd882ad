"""Tests for busjax.checkpointing: round trips, latest and best, iterator state, killed saves."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busjax import checkpointing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_sharding():
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _state(scale=1.0):
  sharding = _mesh_sharding()
  return {
    "params": {
      "kernel": jax.device_put(jnp.arange(16.0).reshape(8, 2) * scale, sharding),
      "bias": np.full((3,), scale, np.float32),
    },
    "step": jnp.asarray(7, jnp.int32),
    "rng": jax.random.key(3),
  }


def _values(state):
  return {
    "kernel": np.asarray(state["params"]["kernel"]),
    "bias": np.asarray(state["params"]["bias"]),
  }


def _steps(workdir):
  """The step directories under workdir/checkpoints (finished saves only), as ints."""
  return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def _iterator():
  dataset = grain.MapDataset.range(40).shuffle(seed=5).map(lambda x: x * 10).batch(4)
  return iter(dataset.to_iter_dataset())


def test_round_trip_keeps_values_and_shardings(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.restore_latest(checkpointing.abstract_like(state)) is None
    ckpt.save(7, state, metrics={"loss": 0.5})
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    step, restored = ckpt.restore_latest(checkpointing.abstract_like(state))
  assert step == 7
  kernel = restored["params"]["kernel"]
  assert isinstance(kernel, jax.Array)
  assert kernel.sharding == state["params"]["kernel"].sharding
  assert len(kernel.addressable_shards) == 4
  np.testing.assert_array_equal(np.asarray(kernel), np.arange(16.0).reshape(8, 2))
  np.testing.assert_array_equal(restored["params"]["bias"], state["params"]["bias"])
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(
    jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
  )


def test_abstract_state_without_shardings_gives_typed_key(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    _, restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
    jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
  )
  np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"]), _values(state)["kernel"])


def test_async_save_is_safe_against_deleting_the_arrays(tmp_path):
  # A jitted step donates the state: the arrays may be gone right after save() returns.
  state = _state(scale=2.0)
  expected = _values(state)
  abstract = checkpointing.abstract_like(state)
  with checkpointing.Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(3, state)
    state["params"]["kernel"].delete()
    ckpt.wait_until_finished()
    _, restored = ckpt.restore_latest(abstract)
  np.testing.assert_array_equal(_values(restored)["kernel"], expected["kernel"])


def test_latest_survives_when_best_is_worse_and_best_tracks_max(tmp_path):
  aucs = {1: 0.6, 2: 0.8, 3: 0.7, 4: 0.75}
  with checkpointing.Checkpointer(tmp_path, keep_latest=2, best_metric="val/auc") as ckpt:
    for step, auc in aucs.items():
      ckpt.save(step, _state(scale=step), metrics={"val/auc": auc, "val/loss": 1.0 / step})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 4
    assert ckpt.best_step() == 2
  # Reopen: everything comes from disk.
  with checkpointing.Checkpointer(tmp_path, keep_latest=2, best_metric="val/auc") as ckpt:
    assert ckpt.latest_step() == 4
    assert ckpt.best_step() == 2
    assert ckpt.best_metrics()["val/auc"] == pytest.approx(0.8)
    abstract = checkpointing.abstract_like(_state())
    step, latest = ckpt.restore_latest(abstract)
    assert step == 4 and _values(latest)["bias"][0] == 4.0
    step, best = ckpt.restore_best(abstract)
    assert step == 2 and _values(best)["bias"][0] == 2.0
    # A later, better step replaces the best one.
    ckpt.save(5, _state(scale=5), metrics={"val/auc": 0.9})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 5
  # The best step is one of the latest: nothing else is kept.
  assert _steps(tmp_path) == [4, 5]


def test_best_min_mode_ignores_nan_and_missing_metric(tmp_path):
  with checkpointing.Checkpointer(
    tmp_path, best_metric="loss", best_mode="min", async_save=False
  ) as ckpt:
    ckpt.save(1, _state(), metrics={"loss": 2.0})
    ckpt.save(2, _state(), metrics={"loss": float("nan")})
    ckpt.save(3, _state(), metrics={"acc": 0.1})
    ckpt.save(4, _state(), metrics={"loss": jnp.asarray(1.5)})
    ckpt.save(5, _state(), metrics={"loss": 1.7})
    assert ckpt.best_step() == 4
    assert ckpt.best_metrics() == {"loss": 1.5}
  # Metrics are stored as strict JSON next to the state.
  with open(tmp_path / "checkpoints" / "5" / "metrics" / "metrics", encoding="utf-8") as f:
    assert json.load(f) == {"loss": 1.7}


def test_poor_metric_on_newest_step_keeps_it_for_resume(tmp_path):
  iterator = _iterator()
  with checkpointing.Checkpointer(
    tmp_path, keep_latest=1, best_metric="auc", async_save=False
  ) as ckpt:
    ckpt.save(1, _state(scale=1), data_iterator=iterator, metrics={"auc": 0.9})
    next(iterator)
    ckpt.save(2, _state(scale=2), data_iterator=iterator, metrics={"auc": 0.1})
  expected = next(iterator)
  assert _steps(tmp_path) == [1, 2]
  fresh = _iterator()
  with checkpointing.Checkpointer(tmp_path, keep_latest=1, best_metric="auc") as ckpt:
    assert ckpt.best_step() == 1
    step, latest = ckpt.restore_latest(checkpointing.abstract_like(_state()), data_iterator=fresh)
  assert step == 2 and _values(latest)["bias"][0] == 2.0
  np.testing.assert_array_equal(next(fresh), expected)


def test_best_state_is_written_once(tmp_path):
  with checkpointing.Checkpointer(tmp_path, best_metric="auc", async_save=False) as ckpt:
    ckpt.save(1, _state(), metrics={"auc": 0.5})
    ckpt.save(2, _state(), metrics={"auc": 0.9})
    assert ckpt.best_step() == 2
  state_dirs = sorted(os.path.relpath(p, tmp_path) for p in tmp_path.rglob("state"))
  assert state_dirs == [
    os.path.join("checkpoints", "1", "state"),
    os.path.join("checkpoints", "2", "state"),
  ]


def _five_saves(workdir):
  with checkpointing.Checkpointer(workdir, keep_latest=2, best_metric="auc") as ckpt:
    for step, auc in enumerate([0.5, 0.9, 0.6, 0.7, 0.4], start=1):
      ckpt.save(step, _state(scale=step), metrics={"auc": auc, "loss": 1.0 / step})
    ckpt.wait_until_finished()
    return ckpt.best_step(), ckpt.best_metrics()


def test_keeps_best_and_latest_only_and_reopening_knows_the_best(tmp_path):
  best_step, best_metrics = _five_saves(tmp_path)
  assert best_step == 2 and best_metrics == {"auc": 0.9, "loss": 0.5}
  assert _steps(tmp_path) == [2, 4, 5]
  with checkpointing.Checkpointer(tmp_path, keep_latest=2, best_metric="auc") as ckpt:
    assert (ckpt.best_step(), ckpt.best_metrics()) == (best_step, best_metrics)
    assert ckpt.latest_step() == 5
    # A tie keeps the earlier step; the tying step is saved as a latest one.
    ckpt.save(6, _state(scale=6), metrics={"auc": 0.9})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 2
    # A step before the newest is not saved, even if it improves the metric.
    ckpt.save(3, _state(scale=3), metrics={"auc": 0.99})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
  assert _steps(tmp_path) == [2, 5, 6]


def test_load_state_best_and_latest_from_a_workdir(tmp_path):
  _five_saves(tmp_path / "run")
  abstract = checkpointing.abstract_like(_state())
  best = checkpointing.load_state(tmp_path / "run", abstract, which="best")
  assert _values(best)["bias"][0] == 2.0
  latest = checkpointing.load_state(tmp_path / "run", abstract, which="latest")
  assert _values(latest)["bias"][0] == 5.0
  # The checkpoints directory itself works too.
  best = checkpointing.load_state(tmp_path / "run" / "checkpoints", abstract)
  assert _values(best)["bias"][0] == 2.0


def test_every_steps_and_force(tmp_path):
  with checkpointing.Checkpointer(
    tmp_path, every_steps=10, keep_latest=5, async_save=False
  ) as ckpt:
    for step in (5, 10, 15):
      ckpt.save(step, _state())
    ckpt.save(17, _state(), force=True)
    ckpt.save(17, _state(), force=True)  # same step again: no error, not rewritten
    assert _steps(tmp_path) == [10, 17]


def test_iterator_state_resumes_same_elements(tmp_path):
  iterator = _iterator()
  for _ in range(3):
    next(iterator)
  state = _state()
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, data_iterator=iterator)
    expected = [next(iterator) for _ in range(4)]
  fresh = _iterator()
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    step, _ = ckpt.restore_latest(checkpointing.abstract_like(state), data_iterator=fresh)
  assert step == 3
  resumed = [next(fresh) for _ in range(4)]
  for want, got in zip(expected, resumed, strict=True):
    np.testing.assert_array_equal(got, want)
  # And the fresh iterator from the start differs, so the comparison above means something.
  assert not np.array_equal(next(_iterator()), expected[0])


def test_restore_with_iterator_but_none_saved_is_clear(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    with pytest.raises(checkpointing.CheckpointError, match="no iterator state"):
      ckpt.restore_latest(checkpointing.abstract_like(state), data_iterator=_iterator())


_KILLED_SAVE_SCRIPT = textwrap.dedent(
  """
  import os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax, numpy as np
  from busjax import checkpointing

  class DiesWhileSaved:
    # The Grain handler asks the iterator for its state in the middle of the save, after the
    # temporary step directory exists and the arrays are being written.
    def get_state(self):
      os._exit(17)

  ckpt = checkpointing.Checkpointer(sys.argv[1], async_save=True)
  ckpt.save(1, {"w": np.full((256, 256), 1.0, np.float32)})
  ckpt.wait_until_finished()
  ckpt.save(2, {"w": np.full((256, 256), 2.0, np.float32)}, data_iterator=DiesWhileSaved())
  ckpt.wait_until_finished()
  os._exit(0)
  """
)


def test_process_killed_mid_save_leaves_last_good_checkpoint(tmp_path):
  script = tmp_path / "killed_save.py"
  script.write_text(_KILLED_SAVE_SCRIPT)
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
    [sys.executable, str(script), str(workdir)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 17, result.stderr[-2000:]
  latest_dir = workdir / "checkpoints"
  leftovers = [name for name in os.listdir(latest_dir) if ".orbax-checkpoint-tmp" in name]
  assert leftovers, f"expected a partial save of step 2, found {os.listdir(latest_dir)}"

  abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
    assert ckpt.latest_step() == 1
    step, restored = ckpt.restore_latest(abstract)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.ones((256, 256), np.float32))
    # The partial directory is cleaned up and step 2 can be saved again.
    assert not [n for n in os.listdir(latest_dir) if ".orbax-checkpoint-tmp" in n]
    ckpt.save(2, {"w": np.zeros((256, 256), np.float32)})
    assert ckpt.latest_step() == 2


def test_load_state_from_workdir_manager_dir_and_step_dir(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "run", best_metric="auc", async_save=False) as ckpt:
    ckpt.save(1, _state(scale=1), metrics={"auc": 0.9})
    ckpt.save(2, _state(scale=2), metrics={"auc": 0.5})
  abstract = checkpointing.abstract_like(_state())
  best = checkpointing.load_state(tmp_path / "run", abstract)
  assert _values(best)["bias"][0] == 1.0
  latest = checkpointing.load_state(tmp_path / "run", abstract, which="latest")
  assert _values(latest)["bias"][0] == 2.0
  assert best["params"]["kernel"].sharding == abstract["params"]["kernel"].sharding
  from_dir = checkpointing.load_state(tmp_path / "run" / "checkpoints" / "1", abstract)
  assert _values(from_dir)["bias"][0] == 1.0
  params_only = checkpointing.load_state(
    tmp_path / "run", {"params": abstract["params"]}, which="latest", partial=True
  )
  assert set(params_only) == {"params"} and _values(params_only)["bias"][0] == 2.0


def test_load_state_errors_name_path_and_keys(tmp_path):
  abstract = checkpointing.abstract_like(_state())
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    checkpointing.load_state(tmp_path / "nowhere", abstract)
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpointing.CheckpointError, match=r"empty: no 'best' checkpoint"):
    checkpointing.load_state(tmp_path / "empty", abstract)

  with checkpointing.Checkpointer(tmp_path / "run", async_save=False) as ckpt:
    ckpt.save(1, _state())
  # No best metric was tracked, so there is no "best": the error says to ask for "latest".
  with pytest.raises(checkpointing.CheckpointError, match=r"no 'best' checkpoint.*which='latest'"):
    checkpointing.load_state(tmp_path / "run", abstract)

  wrong = jax.tree.map(lambda x: x, abstract)
  wrong["params"]["kernel"] = jax.ShapeDtypeStruct((8, 3), jnp.float32)
  wrong["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  del wrong["step"]
  with pytest.raises(checkpointing.CheckpointError) as error:
    checkpointing.load_state(tmp_path / "run", wrong, which="latest")
  message = str(error.value)
  assert str(tmp_path / "run" / "checkpoints" / "1") in message
  assert "params/extra" in message  # expected, not in the checkpoint
  assert "step" in message  # in the checkpoint, not expected
  assert "params/kernel: checkpoint (8, 2) vs expected (8, 3)" in message
  # partial=True forgives keys left out, not keys that are missing.
  with pytest.raises(checkpointing.CheckpointError, match="params/extra"):
    checkpointing.load_state(
      tmp_path / "run", {"params": wrong["params"]}, which="latest", partial=True
    )


def test_to_json_value_is_strict():
  converted = checkpointing.to_json_value(
    {"a": np.float32(0.5), "b": jnp.asarray(float("inf")), "c": {"d": np.int64(3)}, "e": True}
  )
  assert converted == {"a": 0.5, "b": None, "c": {"d": 3}, "e": True}
  json.dumps(converted, allow_nan=False)
  with pytest.raises(ValueError, match=r"metrics\.x: expected a scalar"):
    checkpointing.to_json_value({"x": np.zeros(3)}, name="metrics")


_TWO_PROCESS_SCRIPT = textwrap.dedent(
  """
  import os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  import grain, numpy as np
  from jax.experimental import multihost_utils
  from busjax import checkpointing

  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  full = np.arange(16.0, dtype=np.float32).reshape(8, 2)
  state = {"w": jax.make_array_from_callback((8, 2), sharding, lambda idx: full[idx]), "step": 4}

  def make_iterator():
    # Each process reads its own shard, so each has its own iterator state.
    return iter(grain.MapDataset.range(100).shuffle(seed=pid).to_iter_dataset())

  iterator = make_iterator()
  for _ in range(3 + pid):
    next(iterator)
  # Step 4 is both the newest and the best: one save, with the barriers of one manager.
  ckpt = checkpointing.Checkpointer(workdir, best_metric="auc", async_save=True)
  ckpt.save(4, state, data_iterator=iterator, metrics={"auc": 0.5})
  expected = [next(iterator) for _ in range(3)]
  fresh = make_iterator()
  step, restored = ckpt.restore_latest(checkpointing.abstract_like(state), data_iterator=fresh)
  assert step == 4 and [next(fresh) for _ in range(3)] == expected
  assert restored["w"].sharding == sharding
  gathered = multihost_utils.process_allgather(restored["w"], tiled=True)
  assert np.array_equal(np.asarray(gathered), full)
  assert ckpt.best_step() == 4
  ckpt.close()
  print("OK", pid, flush=True)
  """
)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_save_and_restore_sharded_state_and_iterators(tmp_path):
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  script = tmp_path / "two_process.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(pid), str(tmp_path / "run")],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(2)
  ]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=180)[0])
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for pid, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
    assert worker.returncode == 0 and f"OK {pid}" in output, output[-3000:]
  iterator_dir = tmp_path / "run" / "checkpoints" / "4" / "data_iterator"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(iterator_dir))
