"""Train-step and eval speed of busjax's models beside the same models in plain PyTorch.

For each row (model, input side, batch): busjax's own supervised train step (forward, backward,
AdamW, donated state: `trainers.supervised.make_train_step` jitted by `sharding.jit_train_step`,
exactly what a run executes) and the eval forward, beside PyTorch's
(`benchmarks/torch_reference.py`, parameter counts checked equal; channels-last,
`torch.set_num_threads` = the machine's cores).
Timed runs alternate between the two (warm-up excluded, median of `--repeats`), so a noisy shared
machine slows both alike: the ratio is the figure, absolute images/s drift between days. Also the
busjax step's compile time, its FLOPs per image (XLA's cost analysis) and achieved FLOP/s against a
plain float32 matmul measured in the same run, and the compiled step's memory.

  pip install -e '.[speed]'   # torch, CPU build (benchmark only)
  python -m benchmarks.speed --output=speed.json
  python -m benchmarks.speed --rows=resnet18:128:32 --repeats=7

Prints a markdown table and writes JSON after every row (``--output``).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from benchmarks import common
from busjax import configlib, sharding
from busjax.models import common as model_common
from busjax.trainers import supervised

# name -> busjax model config (width 1.0, one grey channel, the configs' heads).
MODELS = {
  "resnet18": dict(name="resnet", variant="resnet18", width=1.0),
  "mobilenet_v2": dict(name="mobilenet_v2", variant="mobilenet_v2", width=1.0, dropout=0.2),
  "densenet121": dict(name="densenet", variant="densenet121"),
}
DEFAULT_ROWS = ["resnet18:128:32", "mobilenet_v2:224:32", "densenet121:224:16"]

_ROWS = flags.DEFINE_list("rows", DEFAULT_ROWS, f"model:side:batch, models of {list(MODELS)}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per side (median reported).")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps (or eval batches) per timed repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling, per side.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch reference too.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results (rewritten after every row).")


def _busjax_step(model_name: str, batch: int):
  """(jitted step, state, eval fn, params) of busjax's supervised regime for one model."""
  config = configlib.base_config()
  config.model = ml_collections.ConfigDict({**config.model.to_dict(), **MODELS[model_name]})
  config.model.in_channels = 1
  config.train.ema_decay = 0.0  # Plain AdamW, as the reference.
  model = supervised.create_model(config.model, 2, seed=0)
  tx = supervised.create_optimizer(config.optim, total_steps=1000)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  mesh = sharding.make_mesh({"data": 1}) if jax.device_count() == 1 else sharding.make_mesh(None)
  step = sharding.jit_train_step(
    supervised.make_train_step(defs, tx, config, np.ones(2, np.float32)), mesh, state
  )
  apply = jax.jit(supervised.make_apply(defs, config))
  return step, state, apply, mesh, model_common.count_params(model)


def _matmul_gflops(torch_module=None) -> dict:
  """Float32 2048² matmul GFLOP/s of jnp (and torch): the machine's dense peak, this run."""
  n, flops = 2048, 2 * 2048**3
  a = jnp.ones((n, n), jnp.float32)
  jax.block_until_ready(a @ a)
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(a @ a)
    times.append(time.perf_counter() - t)
  out = {"jax": flops / statistics.median(times) / 1e9}
  if torch_module is not None:
    b = torch_module.ones(n, n)
    b @ b
    times = []
    for _ in range(5):
      t = time.perf_counter()
      b @ b
      times.append(time.perf_counter() - t)
    out["torch"] = flops / statistics.median(times) / 1e9
  return out


def _torch_side(torch, model_name: str, side: int, batch: int):
  from benchmarks import torch_reference

  model = torch_reference.MODELS[model_name]().to(memory_format=torch.channels_last)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  x = torch.randn(batch, 1, side, side).to(memory_format=torch.channels_last)
  y = torch.randint(0, 2, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def train(steps):
    model.train()
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      loss_fn(model(x), y).backward()
      opt.step()

  def evaluate(steps):
    model.eval()
    with torch.inference_mode():
      for _ in range(steps):
        model(x)

  return train, evaluate, torch_reference.count_params(model)


def _row(model_name: str, side: int, batch: int, torch) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, side, side, 1), dtype=np.uint8)
  labels = rng.integers(0, 2, (batch,)).astype(np.int32)
  step, state, apply, mesh, params = _busjax_step(model_name, batch)
  global_batch = sharding.host_to_global({"image": images, "label": labels}, mesh)
  key = jax.random.key(0)
  t = time.perf_counter()
  lowered = step.lower(state, global_batch, key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops_per_image = float(cost.get("flops", float("nan"))) / batch
  memory = compiled.memory_analysis()
  temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else None
  holder = {"state": state}

  def jax_train(steps):
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], global_batch, key)
    jax.block_until_ready(metrics)

  eval_images = jnp.asarray(images)

  def jax_eval(steps):
    variables = (holder["state"]["params"], holder["state"]["rest"])
    for _ in range(steps):
      out = apply(variables, {"image": eval_images})
    jax.block_until_ready(out)

  sides = {"busjax": (jax_train, jax_eval)}
  torch_params = None
  if torch is not None:
    torch_train, torch_eval, torch_params = _torch_side(torch, model_name, side, batch)
    if torch_params != params:
      raise RuntimeError(f"{model_name}: busjax {params} vs torch {torch_params} parameters")
    sides["torch"] = (torch_train, torch_eval)
  for train, evaluate in sides.values():  # Warm-up (and busjax's eval compile).
    train(_WARMUP.value)
    evaluate(1)
  times = {f"{name}_{kind}": [] for name in sides for kind in ("train", "eval")}
  for _ in range(_REPEATS.value):  # Alternate, so machine noise hits both sides alike.
    for name, (train, evaluate) in sides.items():
      for kind, fn in (("train", train), ("eval", evaluate)):
        t = time.perf_counter()
        fn(_STEPS.value)
        times[f"{name}_{kind}"].append(time.perf_counter() - t)
  row = {
    "model": model_name,
    "side": side,
    "batch": batch,
    "params": params,
    "busjax_compile_s": compile_s,
    "busjax_step_temp_mb": temp_mb,
    "gflop_per_image_train": flops_per_image / 1e9,
  }
  for key_name, values in times.items():
    row[f"{key_name}_img_s"] = batch * _STEPS.value / statistics.median(values)
  row["busjax_train_gflop_s"] = row["busjax_train_img_s"] * flops_per_image / 1e9
  if torch is not None:
    row["train_ratio"] = row["busjax_train_img_s"] / row["torch_train_img_s"]
    row["eval_ratio"] = row["busjax_eval_img_s"] / row["torch_eval_img_s"]
  return row


def _markdown(result: dict) -> str:
  peak = result["matmul_gflop_s"]
  lines = [
    f"Machine: {result['machine']['platform']}, {result['threads']} threads; float32 matmul "
    + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()),
    "",
    "| model, side, batch | train img/s busjax / torch | ratio | eval img/s busjax / torch | "
    "ratio | compile s | GFLOP/img (train) | busjax GFLOP/s (% of matmul) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    torch_train = f"{r['torch_train_img_s']:.1f}" if "torch_train_img_s" in r else "–"
    torch_eval = f"{r['torch_eval_img_s']:.1f}" if "torch_eval_img_s" in r else "–"
    lines.append(
      f"| {r['model']}, {r['side']}, {r['batch']} | "
      f"{r['busjax_train_img_s']:.1f} / {torch_train} | "
      f"{r.get('train_ratio', float('nan')):.2f}× | {r['busjax_eval_img_s']:.1f} / {torch_eval} | "
      f"{r.get('eval_ratio', float('nan')):.2f}× | {r['busjax_compile_s']:.1f} | "
      f"{r['gflop_per_image_train']:.2f} | {r['busjax_train_gflop_s']:.1f} "
      f"({100 * r['busjax_train_gflop_s'] / peak['jax']:.0f}%) |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  torch = None
  if _TORCH.value:
    try:
      import torch
    except ImportError:
      raise app.UsageError("--torch needs PyTorch: pip install -e '.[speed]'") from None
    torch.set_num_threads(os.cpu_count() or 1)
  result = {
    "benchmark": "speed",
    "machine": common.machine(),
    "threads": os.cpu_count(),
    "jax": jax.__version__,
    "torch": None if torch is None else torch.__version__,
    "matmul_gflop_s": _matmul_gflops(torch),
    "rows": [],
  }
  for spec in _ROWS.value:
    name, side, batch = spec.split(":")
    if name not in MODELS:
      raise app.UsageError(f"--rows: unknown model {name!r}; expected one of {list(MODELS)}")
    result["rows"].append(_row(name, int(side), int(batch), torch))
    common.write_json_atomic(_OUTPUT.value, result)
    print(json.dumps(result["rows"][-1]), flush=True)
  print(_markdown(result))


if __name__ == "__main__":
  app.run(main)
