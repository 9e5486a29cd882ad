"""The trainers' shared helpers that keep the host close behind the devices."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np

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
