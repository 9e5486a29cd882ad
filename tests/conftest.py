"""Test set-up: 4 fake CPU devices so sharding tests run anywhere; small, real tests only.

One persistent JAX compilation cache for the whole run, shared by the xdist workers: many tests
train the same smoke config (kill-and-resume alone runs it three times) and would otherwise
recompile identical programs, which is most of the suite's time on a 2-core CPU. The cache is a
fresh temporary folder removed at the end, so every run still compiles everything at least once;
set BUSJAX_TEST_COMPILATION_CACHE=/some/folder to keep one between runs, or =none to turn it off.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# No on-disk data cache (near-duplicate pairs) in the user's home from tests; the tests of the
# cache itself point it at their own temporary folder.
os.environ["BUSJAX_CACHE_DIR"] = "none"

_CACHE_ENV = "BUSJAX_TEST_COMPILATION_CACHE"
# The first process to load this file (pytest itself, or the xdist controller) makes the folder;
# the workers it starts inherit the variable and share it.
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="busjax-test-jax-cache-")
if os.environ[_CACHE_ENV] != "none":
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session")
def supervised_smoke_run(tmp_path_factory):
  """One finished `configs/supervised.py:smoke` run, shared by the tests that read a trained run
  (reports, predict/explain): (workdir, config, summary). Tests must not write into it."""
  from busjax import configlib
  from busjax.trainers import supervised

  workdir = tmp_path_factory.mktemp("supervised_smoke")
  config = configlib.load_file("supervised", "smoke")
  configlib.validate(config)
  summary = supervised.train_and_evaluate(config, str(workdir))
  return workdir, config, summary
