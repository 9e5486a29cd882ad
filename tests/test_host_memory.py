"""busjax.host_memory: steps reuse their temporaries' pages on a single-device glibc CPU run, and
nothing changes where the policy cannot help."""

import json
import os
import platform
import subprocess
import sys

import jax
import pytest

from busjax import host_memory

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Five train steps of the e2e model (ResNet-18 w0.5, 128 px, batch 32: ~190 MB of temporaries,
# over glibc's 64 MB arena heaps, so from XLA's worker threads every step maps them afresh).
# Faults per step after two warm-up steps.
_PROBE = """
import json, resource, sys
import jax, numpy as np
from busjax import host_memory, sharding
if sys.argv[1] == "devices2":
  jax.config.update("jax_num_cpu_devices", 2)
on = host_memory.reuse_step_memory() if sys.argv[1] != "off" else False
if sys.argv[1] == "devices2":
  print(json.dumps({"on": on, "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
  sys.exit()
from benchmarks import speed
step, state, _, mesh, _ = speed.busjax_step("resnet18_w05", 32)
batch = {"image": np.zeros((32, 128, 128, 1), np.uint8), "label": np.zeros(32, np.int32)}
batch = sharding.host_to_global(batch, mesh)
compiled = step.lower(state, batch, jax.random.key(0)).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, metrics = compiled(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
inline = host_memory.steps_run_inline()
print(json.dumps({"on": on, "inline": inline, "temp_pages": temp // 4096, "faults": faults[2:]}))
"""

glibc_only = pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
  reason="the policy is glibc's malloc settings",
)


def _probe(mode: str, script: str = _PROBE) -> dict:
  """The last line of `script` run with argument `mode` in a fresh process, as JSON."""
  done = subprocess.run(
    [sys.executable, "-c", script, mode],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_steps_reuse_the_pages_of_the_step_before():
  """Off, each step faults in at least its temporaries' pages; on, almost none.

  On, a step still faults in a few hundred pages now and then (up to 1,651 of 31,364, 5%, seen
  with a second process busy on the same two cores), which the bound on every step allows."""
  off, on = _probe("off"), _probe("on")
  assert on["on"] and not off["on"]
  assert on["inline"] and not off["inline"]  # What the step loops' pacer asks.
  assert off["temp_pages"] > 16_384  # Over 64 MB.
  assert min(off["faults"]) > off["temp_pages"]  # Why the policy exists.
  assert sorted(on["faults"])[len(on["faults"]) // 2] < on["temp_pages"] // 20
  assert max(on["faults"]) < on["temp_pages"] // 4


# A 64 MB batch through `sharding.host_to_global` with the policy on: XLA's CPU client copies
# a host array that large on one of its threads, after `device_put` has returned.
_BATCH_PROBE = """
import json, numpy as np
from busjax import host_memory, sharding
on = host_memory.reuse_step_memory()
mesh, ready = sharding.make_mesh({"data": 1}), []
for _ in range(3):
  host = {"image": np.ones((4096, 128, 128, 1), np.uint8), "label": np.zeros(4096, np.int32)}
  ready += [bool(a.is_ready()) for a in sharding.host_to_global(host, mesh).values()]
print(json.dumps({"on": on, "ready": ready}))
"""


@glibc_only
def test_inline_steps_get_batches_whose_copy_has_finished():
  """A program called with an input still being copied runs later, on one of XLA's threads,
  with its temporaries on fresh pages beside the block the inline steps keep (the BUSI job: a
  second 192 MB block at some steps). host_to_global hands the loops finished copies."""
  probe = _probe("on", _BATCH_PROBE)
  assert probe["on"] and all(probe["ready"])


@glibc_only
def test_several_cpu_devices_leave_the_policy_off():
  """XLA dispatches multi-device programs from its worker threads whatever the setting: the
  policy stays off and JAX's dispatch untouched."""
  probe = _probe("devices2")
  assert not probe["on"] and probe["async"]


def test_nothing_changes_once_jax_has_started():
  """In this process the backends are up (conftest's 4 devices): too late, so no change."""
  jax.devices()
  assert not host_memory.reuse_step_memory()
  assert jax.config.read("jax_cpu_enable_async_dispatch")
  assert not host_memory.steps_run_inline()


def test_only_long_compiles_hand_memory_back(monkeypatch):
  trims = []

  class FakeLibc:
    def malloc_trim(self, pad):
      trims.append(pad.value)

  monkeypatch.setattr(host_memory, "_libc", FakeLibc())
  compile_event = "/jax/core/compile/backend_compile_duration"
  host_memory._trim_after_big_compiles(compile_event, 0.1)
  host_memory._trim_after_big_compiles("/jax/core/compile/jaxpr_trace_duration", 5.0)
  assert trims == []
  host_memory._trim_after_big_compiles(
    compile_event, host_memory.TRIM_AFTER_COMPILE_S, fun_name="f"
  )
  assert trims == [0]


# glibc's heap under the policy: a freed block inside the heap stays resident until
# release_free_heap hands it back; a freed block at the top stays with keep_top=True.
_HEAP = """
import ctypes, json
from busjax import host_memory
assert host_memory.reuse_step_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))
def touched(size):
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  return p
out = {}
inner = touched(256 * MB)
pin = touched(16 * MB)  # Above it (no free block that large below): the freed one stays inside.
libc.free(inner)
out["inner_freed"] = rss()
host_memory.release_free_heap(keep_top=True)
out["inner_released"] = rss()
top = touched(320 * MB)  # Larger than the inner hole: from the top.
libc.free(top)
out["top_freed"] = rss()
host_memory.release_free_heap(keep_top=True)
out["top_kept"] = rss()
host_memory.release_free_heap()
out["top_released"] = rss()
print(json.dumps(out))
"""


@glibc_only
def test_release_free_heap_hands_back_inner_blocks_and_keeps_the_top_when_asked():
  mb = _probe("heap", _HEAP)
  assert mb["inner_freed"] - mb["inner_released"] > 200  # Freed inside the heap: resident till now.
  assert abs(mb["top_freed"] - mb["top_kept"]) < 16  # The top stays for the next step.
  assert mb["top_kept"] - mb["top_released"] > 200


def test_the_pacer_hands_inner_heap_blocks_back_after_steps_1_2_4_8(monkeypatch):
  from busjax.trainers import state_utils

  paced, trimmed_after = [], []
  monkeypatch.setattr(host_memory, "steps_run_inline", lambda: True)
  monkeypatch.setattr(
    host_memory, "release_free_heap", lambda **kw: trimmed_after.append((len(paced), kw))
  )
  pace = state_utils.StepPacer()
  for _ in range(10):
    paced.append(pace({"loss": jax.numpy.float32(1.0)}))
  # Trimmed inside step n's pace call, when n - 1 steps had come back.
  assert trimmed_after == [(n - 1, {"keep_top": True}) for n in (1, 2, 4, 8)]
