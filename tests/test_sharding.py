"""Tests for busjax.sharding on the 4 fake CPU devices from conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from busjax import sharding
from busjax.data import pipeline, records


def test_default_mesh_is_data_parallel_with_auto_axes():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.shape["data"] == jax.device_count() == 4
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_mesh_from_config_fills_minus_one():
  mesh = sharding.make_mesh({"data": -1, "model": 2})
  assert dict(mesh.shape) == {"data": 2, "model": 2}
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh({"data": 3})
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh({"data": -1, "model": -1})


def test_host_to_global_shards_rows_and_keeps_values():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (8, 6, 6, 1), dtype=np.uint8),
    "label": np.arange(8, dtype=np.int32),
    "valid": np.ones(8, bool),
  }
  arrays = sharding.host_to_global(batch, mesh)
  for name, array in arrays.items():
    assert array.shape == batch[name].shape and array.dtype == batch[name].dtype
    assert array.sharding == sharding.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(array), batch[name])
  shards = arrays["label"].addressable_shards
  assert len(shards) == 4
  assert sorted(tuple(np.asarray(s.data)) for s in shards) == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_replicated_puts_a_full_copy_on_each_device():
  mesh = sharding.make_mesh()
  value = jax.device_put(np.arange(3.0), sharding.replicated(mesh))
  assert all(s.data.shape == (3,) for s in value.addressable_shards)


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible"):
    sharding.host_to_global({"label": np.zeros(6, np.int32)}, sharding.make_mesh())
  with pytest.raises(ValueError, match="scalar"):
    sharding.host_to_global({"step": np.int32(3)}, sharding.make_mesh())


def test_a_step_with_constants_compiles_ahead_and_runs_like_the_jitted_one():
  """What benchmarks/speed.py does: lower, compile, read the cost, call with (state, batch, rng)."""
  mesh = sharding.make_mesh()

  def step_fn(state, batch, rng, scale):
    del rng
    total = state["w"] + scale * batch["x"].sum()
    return {"w": total}, {"total": total}

  state = sharding.replicate({"w": jnp.zeros(())}, mesh)
  batch = sharding.host_to_global({"x": np.arange(8, dtype=np.float32)}, mesh)
  step = sharding.jit_train_step(step_fn, mesh, state, constants=(np.float32(2.0),), donate=False)
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  assert compiled.cost_analysis() is not None
  state, metrics = compiled(state, batch, jax.random.key(0))
  assert float(metrics["total"]) == 56.0
  _, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics["total"]) == 112.0


def test_integer_label_cross_entropy_gradient_on_the_mesh():
  # The Auto axis type itself is asserted above; this checks the typical loss gradient runs
  # on the mesh and matches the unsharded one (this minimal case also passes with Explicit axes
  # on jax 0.10.2, so it is not by itself a guard against the ShardingTypeError).
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  batch = sharding.host_to_global(
    {
      "x": rng.normal(size=(8, 5)).astype(np.float32),
      "label": rng.integers(0, 3, 8).astype(np.int32),
    },
    mesh,
  )
  weights = jax.device_put(jnp.zeros((5, 3)), sharding.replicated(mesh))

  def loss_fn(w, x, label):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, label).mean()

  with jax.set_mesh(mesh):
    grad = jax.jit(jax.grad(loss_fn))(weights, batch["x"], batch["label"])
  expected = jax.grad(loss_fn)(
    np.zeros((5, 3), np.float32), np.asarray(batch["x"]), np.asarray(batch["label"])
  )
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_pipeline_batch_becomes_a_global_array():
  rng = np.random.default_rng(0)
  recs = tuple(
    records.Record(
      id=str(i),
      label=i % 2,
      patient_id=str(i),
      image=rng.integers(0, 256, (20, 24), dtype=np.uint8),
    )
    for i in range(8)
  )
  collection = records.Collection(name="toy", records=recs)
  batch = next(
    iter(
      pipeline.train_dataset(
        collection, image_size=16, global_batch_size=8, seed=0, augment_config=None
      )
    )
  )
  arrays = sharding.host_to_global(batch, sharding.make_mesh())
  assert arrays["image"].shape == (8, 16, 16, 1)
  np.testing.assert_array_equal(np.asarray(arrays["index"]), batch["index"])


def _ynn_fusions(fn, *args, jit=jax.jit) -> int:
  return jit(fn).lower(*args).compile().as_text().count("__ynn_fusion")


def test_busjax_jit_keeps_cpu_convolutions_off_ynnpack_with_the_same_values():
  """`sharding.jit` compiles convolutions with XLA's own CPU kernels (YNNPACK ran those with <= 64
  channels on one core), keeps YNNPACK's matmuls, and computes what `jax.jit` computes; with the
  "xla" formulation it adds no options."""
  from busjax.models import layers

  if jax.default_backend() != "cpu":
    pytest.skip("the options are for XLA:CPU")
  x = jax.random.normal(jax.random.key(0), (4, 12, 12, 32))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
  matrix = jax.random.normal(jax.random.key(2), (64, 64))

  def conv(x, kernel):
    dimensions = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dimensions)

  def dot(matrix):
    return matrix @ matrix

  if _ynn_fusions(conv, x, kernel) == 0:
    pytest.skip("this jaxlib gives YNNPACK no convolution to begin with")
  assert layers.compiler_options() is not None
  assert _ynn_fusions(conv, x, kernel, jit=sharding.jit) == 0
  assert _ynn_fusions(dot, matrix, jit=sharding.jit) == _ynn_fusions(dot, matrix) == 1
  np.testing.assert_allclose(
    sharding.jit(conv)(x, kernel), jax.jit(conv)(x, kernel), rtol=1e-5, atol=1e-4
  )
  with layers.conv_formulation("xla"):
    assert layers.compiler_options() is None
