"""The command line: bad flags and bad config values give one clear line, not a traceback."""

import glob
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from busjax import configlib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(*args, timeout=120, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  return subprocess.run(
    [sys.executable, "-m", "busjax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "override, field",
  [
    ("--config.optim.lr=-1.0", "optim.lr"),
    ("--config.data.source=imagenet", "data.source"),
    ("--config.model.name=transformer9000", "model.name"),
    ("--config.split.fold=7", "split.fold"),
    ("--config.data.image_size=5", "data.image_size"),
  ],
)
def test_bad_config_value_is_one_clear_line(tmp_path, override, field):
  result = _run("--config=configs/supervised.py:smoke", f"--workdir={tmp_path}", override)
  assert result.returncode != 0
  assert field in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--config=configs/supervised.py:smoke", "--config.optim.lrr=1"], "lrr"),
    (["--config=configs/does_not_exist.py"], "does_not_exist"),
    (["--config=configs/supervised.py:smoke", "--config.optim.lr=fast"], "lr"),
  ],
)
def test_bad_flags_are_clear(tmp_path, args, needle):
  result = _run(*args, f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert needle in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_real_data_root_names_the_flag():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "sup", os.path.join(ROOT, "configs", "supervised.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("busi,smoke")
  with pytest.raises(configlib.ConfigError, match="data.root"):
    configlib.validate(config)
  config.data.root = "/no/such/folder"
  with pytest.raises(configlib.ConfigError, match="/no/such/folder"):
    configlib.validate(config)


def test_bad_data_is_one_clear_line_naming_the_file(tmp_path):
  """A truncated image in the user's CSV manifest: exit code 2 and the file's name, no stack."""
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  data = (tmp_path / "2.png").read_bytes()
  (tmp_path / "2.png").write_bytes(data[: len(data) // 2])
  manifest = tmp_path / "manifest.csv"
  manifest.write_text("path,label\n0.png,benign\n1.png,malignant\n2.png,benign\n3.png,malignant\n")
  result = _run(
    "--config=configs/supervised.py:smoke",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.source=csv",
    f"--config.data.root={manifest}",
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"busjax: bad data: 1 bad file in CSV manifest {manifest}: " in result.stderr
  assert f"{tmp_path / '2.png'}: corrupt or truncated image" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("by_name", [False, True])
def test_page_reuse_where_it_cannot_apply_warns_only_when_asked_for(tmp_path, by_name):
  """Two CPU devices: the default stays silent; `--reuse_step_memory` by name gets one line.
  (A bad config value ends the run right after the flag is handled.)"""
  result = _run(
    "--config=configs/supervised.py:smoke",
    f"--workdir={tmp_path}",
    "--config.optim.lr=-1.0",
    *(["--reuse_step_memory"] if by_name else []),
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  assert result.returncode == 2, result.stderr[-2000:]
  warned = "--reuse_step_memory does nothing here" in result.stderr
  assert warned == by_name
  assert "Train steps reuse" not in result.stderr


def test_bad_checkpoint_is_one_clear_line(tmp_path):
  (tmp_path / "not_a_run").mkdir()
  result = _run(
    "--config=configs/supervised.py:smoke",
    f"--workdir={tmp_path / 'run'}",
    f"--config.init_from={tmp_path / 'not_a_run'}",
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"busjax: bad checkpoint: {tmp_path / 'not_a_run'}: no 'best' checkpoint" in result.stderr
  assert "Traceback" not in result.stderr


def test_smoke_run_from_the_command_line_reports_and_stays_quiet(tmp_path):
  """The CLI path end to end: reports land in the workdir, the console shows busjax's own lines
  (progress, the final AUCs marked SYNTHETIC) and not the hundreds of library INFO lines Orbax
  writes per checkpoint. On this one-CPU-device process under glibc, by default, a whole run
  (training, checkpoints, reports) with the host-page reuse: programs run inline. Compiled
  programs go to the user's shared cache folder, size-capped (JAX's eviction keeps a lock file)."""
  shared = tmp_path / "user_cache"
  workdir = tmp_path / "run"
  result = _run(
    "--config=configs/supervised.py:smoke", f"--workdir={workdir}", timeout=300,
    BUSJAX_CACHE_DIR=str(shared),
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  reuses = "Train steps reuse one set of host pages" in result.stderr
  assert reuses == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
  assert "--reuse_step_memory does nothing here" not in result.stderr  # Not asked for by name.
  for split in ("val", "test"):
    assert os.path.exists(workdir / "reports" / split / "report.json")
    assert f"{split}: AUC" in result.stderr
  assert "SYNTHETIC" in result.stderr
  assert "step 4/4" in result.stderr
  # The compile cache keeps the eager ops' small programs too (the next launch reads them back).
  assert not os.path.exists(workdir / "jax_cache")
  cached = os.listdir(shared / "jax")
  assert ".lockfile" in cached
  assert any(name.startswith("jit_train_step") for name in cached)
  assert sum(name.startswith("jit__normal") for name in cached) >= 1, sorted(cached)[:20]
  # Orbax's INFO chatter is filtered: every INFO line comes from a busjax file. Library warnings
  # stay visible (e.g. Orbax's "Waiting for previous save", which a fast smoke run can trigger).
  own_files = {
    os.path.basename(p)
    for p in glob.glob(os.path.join(ROOT, "busjax", "**", "*.py"), recursive=True)
  }
  info_files = re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", result.stderr, re.MULTILINE)
  assert info_files and set(info_files) <= own_files, set(info_files) - own_files


_EXIT_SCRIPT = """
import atexit, concurrent.futures, sys, threading, time
from busjax import cli

def handler():
  print("handler ran")  # Buffered stdout: must still be flushed.
  open(sys.argv[1] + ".handler", "w").write("ok")

def late_writer():
  time.sleep(0.3)
  open(sys.argv[1] + ".thread", "w").write("ok")

atexit.register(handler)
threading.Thread(target=late_writer).start()  # Not a daemon: the exit waits for it.
idle = concurrent.futures.ThreadPoolExecutor(2)  # Never shut down: its idle workers must be
idle.submit(int).result()  # told to stop, as Python's own exit does, or the exit would hang.
cli.exit_without_teardown(eval(sys.argv[2]))
print("not reached")
"""


@pytest.mark.parametrize("code, status", [("3", 3), ("None", 0), ("'bad thing'", 1)])
def test_exit_without_teardown_keeps_what_python_exit_does_first(tmp_path, code, status):
  stem = str(tmp_path / "out")
  result = subprocess.run(
    [sys.executable, "-c", _EXIT_SCRIPT, stem, code], cwd=ROOT, capture_output=True, text=True,
    timeout=60,
  )  # fmt: skip
  assert result.returncode == status
  assert result.stdout == "handler ran\n"  # Flushed, and nothing after the exit ran.
  assert os.path.exists(stem + ".handler") and os.path.exists(stem + ".thread")
  assert result.stderr.strip() == ("bad thing" if status == 1 else "")
