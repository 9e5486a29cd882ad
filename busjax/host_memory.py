"""One set of pages for every train step's temporaries (single-device CPU runs under glibc).

XLA:CPU allocates a program's temporaries each time it runs it (ResNet-18 at 128 px, batch 32:
386 MB; DenseNet121 at 224 px, batch 16: 2.9 GB) with glibc's malloc, and frees them when it
finishes. Dispatched asynchronously, the allocation happens on one of XLA's worker threads, whose
malloc arena hands any block over 64 MB to `mmap` and back to the kernel at `free`: every step
faults in and zeroes its temporaries afresh (DenseNet121: ~750,000 page faults, 1.1 s of system
time per 3.4 s step; more on a virtual machine that hands freed memory back to its host).

`reuse_step_memory()` (opt-in: `busjax.main --reuse_step_memory`) runs single-device programs
on the calling thread (JAX's `jax_cpu_enable_async_dispatch=False`, read once when the CPU
client starts) and tells that thread's arena (glibc's main arena) never to `mmap` and never to
trim its top, so a step's temporaries land where the previous step's were, on pages already
mapped. Measured on the 2-core development machine, separate processes, alternating
(docs/performance.md, "Every step's temporaries on the same pages"): the train step 1.15-1.23x
faster with ~20 faults per step instead of 99,000-1,330,000. Memory a compile frees is handed
back after every compile of 0.5 s or longer (`malloc_trim`). The cost is memory: the heap is
never trimmed, and a step's temporaries do not always fit the block the previous step freed
(the previous step's metrics, still alive, can keep that block from rejoining the heap's top), so
the peak can approach twice the step's temporaries (MobileNetV2 224/32: 9.6 GB against 5.0; the
README's BUSI job 1.32 GB against 0.93). Hence opt-in, for long runs of large models on a
machine with memory to spare.

The loop waits for each step on the thread that dispatched it, which busjax's step loops already
nearly do (`state_utils.StepPacer` keeps one step queued).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re

import jax
from absl import logging
from jax import monitoring
from jax._src import xla_bridge  # backends_are_initialized: no public API in jax 0.10-0.12.

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h).
_M_MMAP_MAX = -4
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRIM_AFTER_COMPILE_S = 0.5  # Shorter compiles free little; malloc_trim walks the whole heap.

_libc = None  # Set once the policy is on: the listener below trims through it.


def _glibc():
  """The C library, when it is glibc (mallopt's parameters are glibc's), else None."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def _cpu_devices_asked() -> int:
  """The CPU devices JAX will start with (`jax_num_cpu_devices`, else XLA_FLAGS' count)."""
  configured = jax.config.jax_num_cpu_devices
  if configured is not None and configured > 0:
    return configured
  forced = re.search(
    r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
  )
  return int(forced.group(1)) if forced else 1


def release_free_heap() -> None:
  """Hands the heap's free memory back to the system (glibc's `malloc_trim`; elsewhere nothing)."""
  libc = _libc or _glibc()
  if libc is not None:
    libc.malloc_trim(0)


def steps_run_inline() -> bool:
  """Whether a jitted step has finished when its call returns: JAX's CPU client dispatching
  inline (`reuse_step_memory` turned it so) on a single-device CPU run."""
  return (
    not jax.config.read("jax_cpu_enable_async_dispatch")
    and jax.default_backend() == "cpu"
    and jax.local_device_count() == 1
  )


def _trim_after_big_compiles(event: str, duration_s: float, **kwargs) -> None:
  """A `jax.monitoring` listener: hands a long compile's freed heap back to the system."""
  del kwargs
  if event == _BACKEND_COMPILE_EVENT and duration_s >= TRIM_AFTER_COMPILE_S and _libc is not None:
    _libc.malloc_trim(0)


def reuse_step_memory() -> bool:
  """Keeps each step's temporaries on the pages of the step before (see the module's text).

  Call it before anything starts JAX's backends (`busjax.main --reuse_step_memory` does,
  before its first JAX call). It changes nothing, and returns False, where it cannot help: JAX
  already started, a C library other than glibc, several CPU devices asked for (XLA dispatches
  programs that span devices from its worker threads whatever the setting) or an accelerator
  (there only the idle CPU client runs its programs inline). Returns True when on.
  """
  global _libc
  libc = _glibc()
  if libc is None or xla_bridge.backends_are_initialized() or _cpu_devices_asked() > 1:
    return False
  # Read when the CPU client starts; on an accelerator run the CPU client is idle anyway.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu" or jax.local_device_count() > 1:
    return False
  if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
    logging.warning("glibc refused mallopt: each step's temporaries stay on fresh pages.")
    return False
  _libc = libc
  monitoring.register_event_duration_secs_listener(_trim_after_big_compiles)
  return True
