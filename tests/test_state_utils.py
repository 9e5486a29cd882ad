"""The trainers' shared helpers: host pacing, statistics, norms and weight averages."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax

from busjax import host_memory
from busjax.trainers import state_utils


class _Pending:
  """A stand-in for a step's outputs that records when it is waited for."""

  def __init__(self, name, log):
    self.name, self.log = name, log

  def block_until_ready(self):
    self.log.append(self.name)
    return self


def test_the_pacer_waits_for_the_previous_step_only():
  log = []
  pace = state_utils.StepPacer()
  pace({"loss": _Pending("step1", log)})
  assert log == []  # Nothing before it: step 1 runs while the host prepares step 2.
  pace({"loss": _Pending("step2", log)})
  assert log == ["step1"]
  outputs = {"loss": _Pending("step3", log)}
  assert pace(outputs) is outputs  # The loop rebinds its metrics to this.
  assert log == ["step1", "step2"]


def test_inline_steps_come_back_as_host_arrays_and_nothing_device_side_is_kept(monkeypatch):
  """With steps run inline (`--reuse_step_memory`) a step has finished when it returns: the
  pacer hands back host copies, so the loop's rebinding frees the step's device buffers before
  the next step allocates its temporaries."""
  monkeypatch.setattr(host_memory, "steps_run_inline", lambda: True)
  pace = state_utils.StepPacer()
  loss = jnp.float32(2.5)
  dead = weakref.ref(loss)
  metrics = {"loss": loss, "accuracy": jnp.float32(0.75)}
  metrics = pace(metrics)
  assert all(type(v) is np.ndarray for v in metrics.values())
  assert metrics == {"loss": 2.5, "accuracy": 0.75}
  del loss
  assert dead() is None


def test_average_statistics_is_the_mean_of_floats_and_copies_the_rest(monkeypatch):
  like = {"mean": jnp.zeros(3), "count": jnp.array([7, 8], jnp.int32)}
  batches = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0]), np.array([5.0, 0.0, 1.0])]
  events = []
  real_wait = jax.block_until_ready
  monkeypatch.setattr(
    state_utils.jax, "block_until_ready", lambda x: events.append("wait") or real_wait(x)
  )

  def run_batch(batch):
    events.append("run")
    return {"mean": jnp.asarray(batch), "count": jnp.array([1, 1], jnp.int32)}

  out = state_utils.average_statistics(run_batch, batches, like=like)
  np.testing.assert_allclose(out["mean"], [3.0, 2.0, 3.0], rtol=1e-6)
  np.testing.assert_array_equal(out["count"], [7, 8])  # Non-float leaves: `like`'s.
  # A new buffer, since a step donates its state and must never get one buffer twice.
  assert out["count"].unsafe_buffer_pointer() != like["count"].unsafe_buffer_pointer()
  # Each batch's accumulation is waited for before the next batch runs.
  assert events == ["run", "wait"] * 3
  assert state_utils.average_statistics(run_batch, [], like=like) is None


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  tree = {f"w{i}": jnp.asarray(rng.standard_normal((i % 4 + 1, 3)), jnp.float32) for i in range(40)}
  tree["scalar"] = jnp.float32(-2.5)
  tree["half"] = jnp.asarray(rng.standard_normal(7), jnp.bfloat16)
  return tree


def test_global_norm_is_optax_norm_with_half_the_traced_operations():
  tree = _tree()
  full = {k: v for k, v in tree.items() if v.dtype == jnp.float32}
  np.testing.assert_allclose(state_utils.global_norm(full), optax.tree.norm(full), rtol=1e-6)
  # Every leaf squared and summed in float32, the bfloat16 one too.
  exact = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values()))
  np.testing.assert_allclose(state_utils.global_norm(tree), exact, rtol=1e-6)
  assert state_utils.global_norm(tree).dtype == jnp.float32
  assert float(state_utils.global_norm({})) == 0.0
  # The point of it: a step's trace time. Three primitives per leaf (and a conversion for a
  # leaf not in float32); optax's complex-aware square takes six.
  leaves = len(jax.tree.leaves(tree))
  assert len(jax.make_jaxpr(state_utils.global_norm)(tree).eqns) <= 3 * leaves + 4
  assert len(jax.make_jaxpr(optax.tree.norm)(tree).eqns) > 5 * leaves


def test_ema_update_is_the_warmed_up_average_bit_for_bit():
  params = {k: v for k, v in _tree(1).items() if v.dtype == jnp.float32}
  ema = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
  update = jax.jit(state_utils.ema_update, static_argnums=3)
  # The formula as the trainers wrote it before, compiled as a step compiles it.
  formula = jax.jit(lambda e, p, keep: jax.tree.map(lambda a, b: keep * a + (1.0 - keep) * b, e, p))
  for step in (0, 5, 10_000):
    keep = jnp.float32(min(0.999, (1.0 + step) / (10.0 + step)))  # 0.1 at step 0: the warm-up.
    new, expected = update(ema, params, jnp.int32(step), 0.999), formula(ema, params, keep)
    for name in params:
      np.testing.assert_array_equal(new[name], expected[name], err_msg=f"{name} at step {step}")
