"""benchmarks/speed.py: its row specs and one tiny row per convolution formulation (no torch)."""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from absl import app, flags
from absl.testing import flagsaver

from benchmarks import speed
from busjax.models import layers


def test_row_specs_default_to_float32_and_auto_and_reject_bad_fields():
  assert speed.parse_row("resnet18:128:32") == ("resnet18", 128, 32, "float32", "auto")
  assert speed.parse_row("fusion:224:64:bfloat16") == ("fusion", 224, 64, "bfloat16", "auto")
  assert speed.parse_row("mobilenet_v2:224:32:float32:cpu")[3:] == ("float32", "cpu")
  for bad in (
    "resnet18:128",
    "resnet18:a:32",
    "vgg16:128:32",
    "resnet18:128:32:float16",
    "resnet18:128:32:float32:cudnn",
    "resnet18:128:32:float32:xla:extra",
  ):
    with pytest.raises(app.UsageError, match="expected model:side:batch"):
      speed.parse_row(bad)


@pytest.mark.parametrize("conv", ["cpu", "xla"])
def test_a_row_times_the_formulation_it_names(conv):
  """A row compiles busjax's real train step and eval with the formulation it was asked for
  and reports finite speeds, FLOPs and the formulation (what a GPU session reads back)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(repeats=1, steps=1, warmup=1), layers.conv_formulation(conv):
    row = speed._row("resnet18", 32, 4, with_torch=False)  # 4: the tests run 4 CPU devices.
  assert row["conv"] == conv and row["dtype"] == "float32"
  assert row["params"] == 11_171_266  # ResNet-18 w1.0, one grey channel, two classes.
  for key in ("busjax_train_img_s", "busjax_eval_img_s", "busjax_compile_s"):
    assert row[key] > 0
  assert math.isfinite(row["gflop_per_image_train"]) and row["gflop_per_image_train"] > 0
  assert 0 < row["gmac_per_image_forward"] < row["gflop_per_image_train"]
  assert "train_ratio" not in row  # No reference timed, no ratio invented.


def _ynnpack_convolutions(compiled_text: str) -> int:
  """Convolutions that XLA:CPU handed to YNNPACK: those inside a `ynn_fusion`'s computation."""
  called = re.findall(r"%ynn_fusion[.\d]* = [^\n]*calls=%([\w.]+)", compiled_text)
  blocks = {b.split(" ", 1)[0].lstrip("%"): b for b in re.split(r"\n(?=\S)", compiled_text)}
  return sum("convolution(" in blocks.get(name, "") for name in called)


def test_the_eval_column_times_the_program_busjax_predicts_with():
  """busjax's predictions are jitted with its XLA options (`sharding.jit`: on CPU, convolutions
  stay with XLA); the eval timed beside PyTorch's must be that program. Under a plain `jax.jit`
  YNNPACK took the convolutions and the column read 1.2-1.3x slow (ResNet-18, DenseNet121)."""
  with layers.conv_formulation("cpu"):
    _, state, apply, _, _ = speed.busjax_step("resnet18", 4)
    args = ((state["params"], state["rest"]), {"image": jnp.zeros((4, 32, 32, 1), jnp.uint8)})
    timed = apply.lower(*args).compile().as_text()
    plain = jax.jit(apply.__wrapped__).lower(*args).compile().as_text()
  assert _ynnpack_convolutions(plain) > 0  # What the check looks for exists.
  assert _ynnpack_convolutions(timed) == 0


def test_a_memory_probe_counts_the_models_state_and_not_the_imports():
  """The child process `--memory` starts for each side: its peak counts what training adds to
  the process (ResNet-18's parameters, gradients and AdamW moments alone are 4 x 42.6 MiB), not
  the interpreter and JAX it started with (~400 MiB here)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  probe = speed._child("busjax_memory", "resnet18:32:4")
  assert probe["kind"] == "host RSS above imports"
  state_mib = 4 * 11_171_266 * 4 / 2**20
  assert state_mib < probe["peak_mb"] < state_mib + 1024


def test_the_table_marks_what_was_not_measured():
  """A GPU row has no FLOP count (XLA:GPU leaves cuDNN's convolutions out) and a busjax-only
  row no ratio: the table shows '–' there, never 'nan'."""
  row = {
    "model": "resnet18", "side": 128, "batch": 32, "dtype": "bfloat16", "conv": "xla",
    "busjax_train_img_s": 6000.0, "busjax_eval_img_s": 27000.0, "busjax_compile_s": 9.0,
    "gflop_per_image_train": float("nan"), "gmac_per_image_forward": float("nan"),
    "busjax_train_gflop_s": float("nan"),
  }  # fmt: skip
  result = {
    "machine": {"platform": "test"}, "threads": 16, "backend": "gpu", "torch_device": None,
    "matmul_gflop_s": {"jax": 380_000.0, "jax_bfloat16": 700_000.0}, "rows": [row],
  }  # fmt: skip
  table = speed._markdown(result)
  assert "nan" not in table
  assert (
    "| resnet18, 128, 32, bfloat16, conv xla | 6000.0 / – | – | 27000.0 / – | – | 9.0 |" in table
  )
  assert table.splitlines()[4].endswith("| – / – |")  # No memory probe ran.
  assert "Train peak memory" not in table


def test_the_benchmarks_the_tests_import_share_one_output_flag():
  """The test modules import speed and external into one process: both define `--output`,
  which once failed the whole test collection (absl DuplicateFlagError)."""
  from benchmarks import external

  assert speed._OUTPUT.name == external._OUTPUT.name == "output"
  assert flags.FLAGS["output"].default is None
