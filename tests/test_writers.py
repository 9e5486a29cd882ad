"""Tests for busjax.writers: strict JSONL, TensorBoard events, process-0 only, progress line."""

import glob
import json
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from busjax import writers


def _read_tensorboard_scalars(workdir):
  # TFRecord framing: u64 length, u32 length crc, payload (an Event proto), u32 payload crc.
  scalars = {}
  texts = []
  for path in glob.glob(os.path.join(workdir, writers.TENSORBOARD_DIR, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("Q", data[offset : offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars[(value.tag, event.step)] = value.simple_value
        else:
          texts.append(value.tag)
  return scalars, texts


def test_jsonl_is_strict_and_parseable(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": jnp.asarray(0.5), "grad_norm": np.float32(1.25)})
    writer.write_scalars(2, {"loss": float("nan"), "lr": float("inf"), "count": np.int64(3)})
    writer.write_scalars(2, {"val/auc": 0.75}, split="val")
    writer.write_text(2, "note", "hello")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 4
  # Strict JSON: Python's parser would accept NaN, so reject those tokens explicitly.
  records = [json.loads(line, parse_constant=pytest.fail) for line in lines]
  assert records[0]["step"] == 1 and records[0]["split"] == "train"
  assert records[0]["loss"] == 0.5 and records[0]["grad_norm"] == 1.25
  assert records[1]["loss"] is None and records[1]["lr"] is None and records[1]["count"] == 3
  assert records[2] == {**records[2], "split": "val", "val/auc": 0.75}
  assert records[3]["text"] == "hello"
  assert writers.read_metrics(tmp_path) == records


def test_jsonl_appends_on_resume(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(2, {"loss": 0.5})
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1, 2]


def test_killed_run_keeps_its_lines_and_resume_replaces_the_redone_steps(tmp_path):
  killed = writers.MetricWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3):
    killed.write_scalars(step, {"loss": 1.0 / step})
  # Not closed or flushed (as after SIGKILL): the lines must already be on disk.
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1, 2, 3]
  with writers.MetricWriter(tmp_path, tensorboard=False) as resumed:  # Checkpoint was at step 1.
    for step in (2, 3, 4):
      resumed.write_scalars(step, {"loss": 0.5 / step})
    resumed.write_scalars(4, {"auc": 0.9}, split="val")
  got = writers.read_metrics(tmp_path)
  assert [(r["step"], r["split"]) for r in got] == [
    (1, "train"),
    (2, "train"),
    (3, "train"),
    (4, "train"),
    (4, "val"),
  ]
  assert got[1]["loss"] == 0.25 and got[0]["loss"] == 1.0
  killed._jsonl.close()


def test_tensorboard_event_file_holds_scalars(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(3, {"loss": 0.25})
    writer.write_scalars(3, {"val/auc": 0.5, "ece": 0.125}, split="val")
    writer.write_hparams({"model": {"name": "resnet", "width": 0.5}, "seed": 1})
  scalars, texts = _read_tensorboard_scalars(tmp_path)
  assert scalars == {("train/loss", 3): 0.25, ("val/auc", 3): 0.5, ("val/ece", 3): 0.125}
  assert any(tag.startswith("hparams") for tag in texts)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  # A stand-in torch on the path (tensorboardX imports the real one, where installed, at import
  # time: ~1 s of every launch); the writer must neither import it nor block it afterwards.
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("Tensor = type('Tensor', (), {})\n")
  script = f"""
import sys
sys.path.insert(0, {str(tmp_path / "site")!r})
from busjax import writers
with writers.MetricWriter({str(tmp_path / "run")!r}) as writer:
  writer.write_scalars(1, {{"loss": 0.5}})
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch
assert torch.Tensor.__name__ == "Tensor"
print("ok")
"""
  done = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120
  )
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
  assert _read_tensorboard_scalars(tmp_path / "run")[0] == {("train/loss", 1): 0.5}


def test_write_hparams_from_config_dict(tmp_path):
  config = ml_collections.ConfigDict(
    {"seed": 0, "data": {"source": "phantom", "image_size": 64}, "lr": float("nan")}
  )
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_hparams(config)
  with open(tmp_path / "hparams.json", encoding="utf-8") as f:
    hparams = json.load(f, parse_constant=pytest.fail)
  assert hparams == {"seed": 0, "data": {"source": "phantom", "image_size": 64}, "lr": None}


def test_bad_values_are_named(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match=r"train/logits: expected a scalar"):
      writer.write_scalars(1, {"logits": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(1, {"step": 1})


def test_non_zero_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with writers.MetricWriter(workdir, process_index=1) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_text(1, "note", "x")
    writer.write_hparams({"a": 1})
    writer.flush()
  assert not workdir.exists()
  lines = []
  progress = writers.ProgressLogger(10, every=1, logger=lines.append, process_index=1)
  assert progress(1, {"loss": 1.0}) is None
  assert lines == []


class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_line_throughput_and_eta():
  clock = _FakeClock()
  lines = []
  progress = writers.ProgressLogger(
    2000, every=120, batch_size=32, logger=lines.append, process_index=0, clock=clock
  )
  clock.now += 5.0
  assert progress(119, {"loss": 1.0}) is None  # not due
  clock.now += 7.29
  line = progress(120, {"loss": jnp.asarray(0.41234), "grad_norm": 1.3})
  # 120 steps * 32 images in 12.29 s; 1880 steps left at 12.29/120 s each.
  assert line == "step 120/2000  loss 0.412  grad_norm 1.3  312.4 img/s  ETA 3m13s"
  assert lines == [line]
  clock.now += 1.0
  last = progress(2000, {"loss": float("nan")})  # the last step is always logged
  assert last.startswith("step 2000/2000  loss nan  ") and last.endswith("ETA 0s")


def test_format_duration():
  assert writers.format_duration(252) == "4m12s"
  assert writers.format_duration(3780) == "1h03m"
  assert writers.format_duration(12.4) == "12s"
  assert writers.format_duration(float("inf")) == "?"
