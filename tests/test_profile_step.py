"""benchmarks/profile_step.py: the trace's attribution arithmetic and a real trace read back."""

import glob

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_step


def test_sweep_splits_the_span_into_two_one_and_no_busy_threads():
  index = {"fusion.1": ("fusion/kLoop", "jvp()/add"), "conv.2": ("convolution", "")}
  events = [(0, 10, 0, "fusion.1"), (5, 20, 1, "conv.2"), (25, 30, 0, "fusion.1")]
  result = profile_step.attribute(events, index, steps=1)
  ms = 1e-6
  assert result["span_ms_per_step"] == pytest.approx(30 * ms)
  assert result["two_threads_ms"] == pytest.approx(5 * ms)  # 5..10.
  assert result["one_thread_ms"] == pytest.approx(20 * ms)  # 0..5, 10..20, 25..30.
  assert result["no_thread_ms"] == pytest.approx(5 * ms)  # 20..25.
  by_op = dict(result["by_op"])
  assert by_op == pytest.approx(
    {"fusion/kLoop | jvp()/add": 15 * ms, "convolution | (XLA's own) conv.2": 15 * ms}
  )
  alone = dict(result["one_thread_by_op"])
  assert alone["convolution | (XLA's own) conv.2"] == pytest.approx(10 * ms)
  assert alone["fusion/kLoop | jvp()/add"] == pytest.approx(10 * ms)
  assert profile_step.attribute(events, index, steps=2)["two_threads_ms"] == pytest.approx(2.5 * ms)
  assert result["by_op_and_shape"] == []  # Without shapes, no per-shape table.
  shaped = profile_step.attribute(events, index, steps=1, shapes={"fusion.1": "f32[8,4]"})
  assert shaped["by_op_and_shape"] == [
    ("fusion/kLoop | jvp()/add | f32[8,4]", pytest.approx(15 * ms), 2),  # Two instances.
    ("convolution | (XLA's own) conv.2 | ?", pytest.approx(15 * ms), 1),
  ]


def test_hlo_text_gives_each_instruction_its_kind_op_and_shape():
  text = "\n".join([
    '  %fusion.3 = f32[32768,32]{1,0} fusion(%p), kind=kLoop, calls=%c, '
    'metadata={op_name="jit(step)/jvp()/slice"}',
    '  ROOT %dot.1 = f32[32,96]{1,0} dot(%a, %b), '
    'metadata={op_name="jit(step)/transpose(jvp())/dot_general"}',
  ])  # fmt: skip
  assert profile_step.hlo_index(text) == {
    "fusion.3": ("fusion/kLoop", "jvp()/slice"),
    "dot.1": ("dot", "transpose(jvp())/dot_general"),
  }
  assert profile_step.hlo_shapes(text) == {"fusion.3": "f32[32768,32]", "dot.1": "f32[32,96]"}


def test_a_real_trace_is_attributed_to_its_jax_operations(tmp_path):
  x = jnp.ones((8, 32, 32, 16))
  kernel = jnp.ones((3, 3, 16, 16)) * 0.01

  def loss(kernel, x):
    y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.tanh(y))

  compiled = jax.jit(jax.grad(loss)).lower(kernel, x).compile()
  compiled(kernel, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    compiled(kernel, x).block_until_ready()
  (path,) = glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)
  events = profile_step.thunk_events(jax.profiler.ProfileData.from_file(path))
  index = profile_step.hlo_index(compiled.as_text())
  assert events and all(event[3] in index for event in events)
  result = profile_step.attribute(
    events, index, steps=1, shapes=profile_step.hlo_shapes(compiled.as_text())
  )
  parts = result["two_threads_ms"] + result["one_thread_ms"] + result["no_thread_ms"]
  assert parts == pytest.approx(result["span_ms_per_step"])
  assert sum(ms for _, ms in result["by_op"]) == pytest.approx(result["thread_ms_per_step"])
  assert any("conv_general_dilated" in label for label, _ in result["by_op"])
  # The kernel gradient's convolution has the kernel's shape.
  assert any(
    "conv_general_dilated" in label and label.endswith("f32[3,3,16,16]")
    for label, _, _ in result["by_op_and_shape"]
  )
