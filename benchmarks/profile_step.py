"""Where one busjax train step's time goes: a `jax.profiler` trace read back without TensorBoard.

Compiles the supervised train step of one `benchmarks/speed.py` row (the same step a run executes),
runs `--steps` steps under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` and attributes every XLA thunk to the JAX operation in its HLO metadata
(``op_name``; e.g. ``transpose(jvp())/conv_general_dilated`` is a convolution's gradient). Ops
XLA added itself (layout copies, the expansion of a primitive) carry no ``op_name`` and are listed
by HLO instruction. Also how busy the worker threads were: the time both ran a thunk, only one,
or none (XLA:CPU's thunk executor runs one thunk at a time unless they are independent; a loop
fusion it does not partition runs on one thread).

  python -m benchmarks.profile_step --row=resnet18:128:32 --output=profile.json
  python -m benchmarks.profile_step --row=densenet121:224:16:float32:xla --top=30

Prints markdown tables; ``--output`` writes them as JSON. Thread times are per step, summed over
threads (a convolution on both threads for 10 ms counts 20 ms).
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common, speed
from busjax import sharding
from busjax.models import layers

_ROW = flags.DEFINE_string(
  "row", "resnet18:128:32", "One speed.py row: model:side:batch[:dtype[:conv]]."
)
_STEPS = flags.DEFINE_integer("profiled_steps", 3, "Profiled steps (after two untimed ones).")
_TOP = flags.DEFINE_integer("top", 20, "Rows of each table.")
_OUTPUT = common.output_flag("JSON of the tables.")

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([a-z\-]+)\(")


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (kind, JAX op path) from a compiled module's text. The kind is the
  opcode, with the fusion kind for fusions (``fusion/kLoop``); the path is ``op_name`` without
  its ``jit(...)`` scopes, "" where XLA made the instruction itself."""
  index = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    kind = match.group(3)
    fusion_kind = re.search(r"kind=(k\w+)", line)
    if fusion_kind:
      kind += "/" + fusion_kind.group(1)
    op_name = re.search(r'op_name="([^"]*)"', line)
    parts = op_name.group(1).split("/") if op_name else []
    index[match.group(1)] = (kind, "/".join(p for p in parts if p and not p.startswith("jit(")))
  return index


def hlo_shapes(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its result shape without the layout (``f32[32768,32]``)."""
  shapes = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      shapes[match.group(1)] = re.sub(r"\{[^}]*\}", "", match.group(2))
  return shapes


def thunk_events(profile) -> list[tuple[int, int, int, str]]:
  """(start ns, end ns, thread, HLO instruction) of every XLA thunk in a `ProfileData`."""
  events = []
  for plane in profile.planes:
    for thread, line in enumerate(plane.lines):
      if not line.name.startswith("tf_XLA"):  # XLA:CPU's worker and client threads.
        continue
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          start = int(event.start_ns)
          events.append((start, start + int(event.duration_ns), thread, stats["hlo_op"]))
  return sorted(events)


def _label(index: dict, instruction: str, depth: int = 2) -> str:
  kind, path = index.get(instruction, ("?", ""))
  if not path:
    return f"{kind} | (XLA's own) {instruction}"
  return f"{kind} | {'/'.join(path.split('/')[-depth:])}"


def attribute(events, index: dict, steps: int, shapes: dict | None = None) -> dict:
  """Per-step thread time by operation (and with `shapes`, by operation and result shape, with
  the instances per step: which of an op's layers cost what), and the busy/idle split of the
  traced span."""
  by_op = collections.Counter()
  by_shape, instances = collections.Counter(), collections.Counter()
  for start, end, _, instruction in events:
    by_op[_label(index, instruction)] += end - start
    if shapes is not None:
      key = f"{_label(index, instruction)} | {shapes.get(instruction, '?')}"
      by_shape[key] += end - start
      instances[key] += 1
  # Sweep the span: at each moment count the threads running a thunk.
  boundaries = sorted({e[0] for e in events} | {e[1] for e in events})
  starting, ending = collections.defaultdict(list), collections.defaultdict(list)
  for event in events:
    starting[event[0]].append(event)
    ending[event[1]].append(event)
  running: set = set()
  split = collections.Counter()
  alone = collections.Counter()
  for before, now in zip(boundaries, boundaries[1:], strict=False):
    for event in ending[before]:
      running.discard(event)
    for event in starting[before]:
      running.add(event)
    threads = {e[2] for e in running}
    split[min(len(threads), 2)] += now - before
    if len(threads) == 1:
      alone[_label(index, next(iter(running))[3])] += now - before
  ms = lambda ns: ns / steps / 1e6  # noqa: E731
  span = boundaries[-1] - boundaries[0] if boundaries else 0
  return {
    "span_ms_per_step": ms(span),
    "thread_ms_per_step": ms(sum(by_op.values())),
    "two_threads_ms": ms(split[2]),
    "one_thread_ms": ms(split[1]),
    "no_thread_ms": ms(split[0]),
    "by_op": [(label, ms(ns)) for label, ns in by_op.most_common()],
    "one_thread_by_op": [(label, ms(ns)) for label, ns in alone.most_common()],
    "by_op_and_shape": [
      (label, ms(ns), instances[label] / steps) for label, ns in by_shape.most_common()
    ],
  }


def _markdown(result: dict, top: int) -> str:
  total = result["thread_ms_per_step"]
  lines = [
    f"{result['row']}: step {result['step_ms']:.0f} ms (timed outside the trace); traced span "
    f"{result['span_ms_per_step']:.0f} ms per step, thread time {total:.0f} ms. Both threads busy "
    f"{result['two_threads_ms']:.0f} ms, one {result['one_thread_ms']:.0f} ms, none "
    f"{result['no_thread_ms']:.0f} ms.",
    "",
    "| thread ms / step | share | HLO kind \\| JAX operation |",
    "|---|---|---|",
  ]
  lines += [
    f"| {ms:.1f} | {100 * ms / total:.1f}% | {label} |" for label, ms in result["by_op"][:top]
  ]
  lines += ["", "| one thread busy, ms / step | HLO kind \\| JAX operation |", "|---|---|"]
  lines += [f"| {ms:.1f} | {label} |" for label, ms in result["one_thread_by_op"][:top]]
  if result["by_op_and_shape"]:
    lines += [
      "",
      "| thread ms / step | instances / step | HLO kind \\| JAX operation \\| result shape |",
      "|---|---|---|",
    ]
    lines += [
      f"| {ms:.1f} | {count:g} | {label} |" for label, ms, count in result["by_op_and_shape"][:top]
    ]
  return "\n".join(lines)


def main(argv):
  del argv
  name, side, batch, dtype, conv = speed.parse_row(_ROW.value)
  with layers.conv_formulation(conv):
    step, state, _, mesh, _ = speed.busjax_step(name, batch, dtype)
    rng = np.random.default_rng(0)
    data = {
      "image": rng.integers(0, 256, (batch, side, side, 1), dtype=np.uint8),
      "label": rng.integers(0, 2, (batch,)).astype(np.int32),
    }
    global_batch = sharding.host_to_global(data, mesh)
    key = jax.random.key(0)
    compiled = step.lower(state, global_batch, key).compile()
  for _ in range(2):
    state, metrics = compiled(state, global_batch, key)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, global_batch, key)
  jax.block_until_ready(metrics)
  step_ms = (time.perf_counter() - t) / _STEPS.value * 1e3
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(_STEPS.value):
        state, metrics = compiled(state, global_batch, key)
      jax.block_until_ready(metrics)
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    events = thunk_events(profile)
  hlo = compiled.as_text()
  result = {
    "row": _ROW.value,
    "conv": conv,
    "backend": jax.default_backend(),
    "machine": common.machine(),
    "step_ms": step_ms,
    **attribute(events, hlo_index(hlo), _STEPS.value, hlo_shapes(hlo)),
  }
  print(_markdown(result, _TOP.value), flush=True)
  common.write_json_atomic(_OUTPUT.value, result)


if __name__ == "__main__":
  app.run(main)
