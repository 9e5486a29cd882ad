"""One set of pages for every train step's temporaries (single-device CPU runs under glibc).

XLA:CPU allocates a program's temporaries each time it runs it (ResNet-18 at 128 px, batch 32:
386 MB; DenseNet121 at 224 px, batch 16: 2.9 GB) with glibc's malloc, and frees them when it
finishes. Dispatched asynchronously, the allocation happens on one of XLA's worker threads, whose
malloc arena hands any block over 64 MB to `mmap` and back to the kernel at `free`: every step
faults in and zeroes its temporaries afresh (DenseNet121: ~750,000 page faults, 1.1 s of system
time per 3.4 s step; more on a virtual machine that hands freed memory back to its host).

`reuse_step_memory()` (`busjax.main` calls it unless `--noreuse_step_memory`) runs
single-device programs on the calling thread (JAX's `jax_cpu_enable_async_dispatch=False`, read
once when the CPU client starts) and tells that thread's arena (glibc's main arena) never to
`mmap` and never to trim its top, so a step's temporaries land where the previous step's were,
on pages already mapped. Measured on the 2-core development machine, separate processes
(docs/performance.md, "Every step's temporaries on the same pages"): the train step 1.15-1.3x
faster with ~20-300 faults per step instead of 49,000-1,330,000.

A never-trimmed heap keeps every block it maps, so the step loops keep it to one block of
temporaries: `state_utils.StepPacer` takes each inline step's outputs to the host at once (alive
on the device, they could keep the freed block from serving the next step) and after steps 1,
2, 4, 8, ... hands the heap's inner free blocks back (`release_free_heap(keep_top=True)`: the
first run of a program leaves its block where the next request does not fit). Memory a compile frees
is handed back after every compile of 0.5 s or longer. A train step's peak memory then matches
asynchronous dispatch's within a few percent either way; a whole job's can differ from run to run
(the supervised BUSI job: 0.90-1.21 GB against 0.94 GB; docs/performance.md, "A batch still
being copied"). `sharding.host_to_global` waits for its copies: a step called with a batch still
being copied would run on one of XLA's threads, on fresh pages.

The loop waits for each step on the thread that dispatched it; busjax's step loops kept at most
one step queued anyway (`StepPacer`). JAX releases the GIL while a program runs inline, so an
input pipeline's threads keep working.
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
_KEEP_ALL = 1 << 62  # A malloc_trim pad larger than any heap's top: the top stays as it is.
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


def release_free_heap(keep_top: bool = False) -> None:
  """Hands the heap's free memory back to the system (glibc's `malloc_trim`; elsewhere nothing).
  `keep_top`: only the free blocks inside the heap, not the free space at its top, where the
  next step's temporaries land (glibc trims the top down to `malloc_trim`'s pad)."""
  libc = _libc or _glibc()
  if libc is not None:
    libc.malloc_trim(ctypes.c_size_t(_KEEP_ALL if keep_top else 0))


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
    release_free_heap()


def reuse_step_memory() -> bool:
  """Keeps each step's temporaries on the pages of the step before (see the module's text).

  Call it before anything starts JAX's backends (`busjax.main` does, before its first JAX
  call, unless `--noreuse_step_memory`). It changes nothing, and returns False, where it cannot
  help: JAX already started, a C library other than glibc, several CPU devices asked for (XLA
  dispatches programs that span devices from its worker threads whatever the setting) or an
  accelerator (there only the idle CPU client runs its programs inline). Returns True when on.
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
