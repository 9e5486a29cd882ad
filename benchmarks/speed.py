"""Train-step and eval speed of busjax's models beside the same models in plain PyTorch.

For each row (model, input side, batch): busjax's own supervised train step (forward, backward,
AdamW, donated state: `trainers.supervised.make_train_step` jitted by `sharding.jit_train_step`,
exactly what a run executes) and the eval forward, beside PyTorch's
(`benchmarks/torch_reference.py`, parameter counts checked equal; channels-last,
`torch.set_num_threads` = the machine's cores, in a child process of its own with glibc's
default malloc, as a plain script runs; busjax's step as `busjax.main` runs it, with
`--[no]reuse_step_memory` as busjax.main's flag of that name). busjax's timed runs come before and
after PyTorch's (warm-up excluded, median of `--repeats`), so a noisy shared machine slows both
alike: the ratio is the figure, absolute images/s drift between days. Also the
busjax step's compile time, its FLOPs per image (XLA:CPU's cost analysis; XLA:GPU's leaves out
cuDNN's convolutions, so none is recorded there) and achieved FLOP/s against a matmul measured in
the same run, the compiled step's temporaries, and each side's peak training memory, measured in a
child process of its own (`--memory`; on a CPU the process's peak resident memory above its
size after the imports, on a GPU the device's peak allocation). On a GPU both sides move there by
themselves (JAX's default backend; torch follows when it sees CUDA); `benchmarks/accelerator.sh`
is the whole accelerator run.

  pip install -e '.[speed]'   # torch, CPU build (benchmark only)
  python -m benchmarks.speed --output=speed.json
  python -m benchmarks.speed --rows=resnet18:128:32 --repeats=7
  python -m benchmarks.speed --rows=resnet18:128:32:float32:cpu,resnet18:128:32:float32:xla

Prints a markdown table and writes JSON after every row (``--output``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from benchmarks import common
from busjax import configlib, host_memory, sharding
from busjax.models import common as model_common
from busjax.models import layers
from busjax.trainers import state_utils, supervised

# name -> busjax model config (width 1.0 unless named, one grey channel, the configs' heads).
MODELS = {
  "resnet18": dict(name="resnet", variant="resnet18", width=1.0),
  # configs/supervised.py's model (the e2e row's): ResNet-18 at half width.
  "resnet18_w05": dict(name="resnet", variant="resnet18", width=0.5),
  "mobilenet_v2": dict(name="mobilenet_v2", variant="mobilenet_v2", width=1.0, dropout=0.2),
  "densenet121": dict(name="densenet", variant="densenet121", width=1.0),
  # configs/fusion.py's model: both backbones, 256-channel projections, concat, CBAM.
  "fusion": dict(
    name="fusion",
    backbones=("mobilenet_v2", "densenet121"),
    width=1.0,
    projection_channels=256,
    fusion="concat",
    attention="cbam",
    attention_reduction=16,
    dropout=0.2,
  ),
}
DEFAULT_ROWS = ["resnet18:128:32", "mobilenet_v2:224:32", "densenet121:224:16", "fusion:224:16"]

_ROWS = flags.DEFINE_list(
  "rows",
  DEFAULT_ROWS,
  f"model:side:batch[:dtype[:conv]], models of {list(MODELS)}, dtype float32 (default) or "
  "bfloat16 (busjax computes in bfloat16 with float32 parameters; torch under autocast), conv "
  "auto (default), cpu or xla: the convolution formulation busjax traces (layers.conv_formulation; "
  "'xla' on the CPU is the 'before' of the CPU rewrites). A batch sweep is several rows: "
  "fusion:224:16,fusion:224:64,fusion:224:256:bfloat16.",
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per side (median reported).")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps (or eval batches) per timed repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling, per side.")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch reference too.")
_MEMORY = flags.DEFINE_bool(
  "memory", True, "Also measure each side's peak training memory, one child process per side."
)
_REUSE_STEP_MEMORY = flags.DEFINE_bool(
  "reuse_step_memory",
  True,
  "busjax's steps reuse their temporaries' host pages, as busjax.main runs them by default "
  "(busjax/host_memory.py); --noreuse_step_memory as `busjax.main --noreuse_step_memory`.",
)
_CHILD = flags.DEFINE_enum(
  "child",
  None,
  ["busjax_memory", "torch_memory", "torch_times"],
  "Internal: be the child process that measures one side of one row.",
)
_OUTPUT = common.output_flag("JSON results (rewritten after every row).")
_E2E_DATA = flags.DEFINE_string(
  "e2e_data", None, "Dataset_BUSI_with_GT folder: adds the end-to-end row (else skipped)."
)
_E2E_SPLIT = flags.DEFINE_string("e2e_split", None, "busi_breastmnist_split.tsv for --e2e_data.")
_E2E_EPOCHS = flags.DEFINE_integer("e2e_epochs", 3, "Epochs of each side's end-to-end run.")
_E2E_WORKDIR = flags.DEFINE_string(
  "e2e_workdir", None, "Scratch folder for the end-to-end runs (default: a temporary one)."
)


def parse_row(spec: str) -> tuple[str, int, int, str, str]:
  """'model:side:batch[:dtype[:conv]]' -> (model, side, batch, dtype, conv); UsageError if bad."""
  name, *fields = spec.split(":")
  defaults = ["float32", "auto"]
  try:
    side, batch, dtype, conv = fields[:2] + (fields[2:] + defaults[len(fields) - 2 :])
    side, batch = int(side), int(batch)
  except ValueError:
    side = None
  if (
    side is None
    or len(fields) > 4
    or name not in MODELS
    or dtype not in ("float32", "bfloat16")
    or conv not in layers.CONV_FORMULATIONS
  ):
    raise app.UsageError(
      f"--rows: {spec!r}: expected model:side:batch[:float32|bfloat16[:auto|cpu|xla]], "
      f"models {list(MODELS)}"
    )
  return name, side, batch, dtype, conv


def busjax_step(model_name: str, batch: int, dtype: str = "float32"):
  """(jitted step, state, eval fn, mesh, parameter count) of busjax's supervised regime for one
  model: the step `busjax.main` runs (also what `profile_step` traces)."""
  config = configlib.base_config()
  config.model = ml_collections.ConfigDict({**config.model.to_dict(), **MODELS[model_name]})
  config.model.in_channels = 1
  config.model.dtype = dtype
  config.train.ema_decay = 0.0  # Plain AdamW, as the reference.
  model = supervised.create_model(config.model, 2, seed=0)
  tx = supervised.create_optimizer(config.optim, total_steps=1000)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  mesh = sharding.make_mesh({"data": 1}) if jax.device_count() == 1 else sharding.make_mesh(None)
  step = sharding.jit_train_step(
    supervised.make_train_step(defs, tx, config), mesh, state, constants=(np.ones(2, np.float32),)
  )
  apply = sharding.jit(supervised.make_apply(defs, config))  # As busjax predicts: its XLA options.
  return step, state, apply, mesh, model_common.count_params(model)


def _matmul_gflops(torch_module=None) -> dict:
  """Matmul GFLOP/s of jnp (and torch), the machine's dense peak this run: float32 2048² on a
  CPU; on an accelerator 8192², float32 (the backends' default precision) and bfloat16."""
  on_cpu = jax.default_backend() == "cpu"
  n = 2048 if on_cpu else 8192
  flops = 2 * n**3
  dtypes = ("float32",) if on_cpu else ("float32", "bfloat16")

  def median_seconds(run) -> float:  # `run` blocks until its product is done.
    run()
    times = []
    for _ in range(5):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  out = {}
  for dtype in dtypes:
    suffix = "" if dtype == "float32" else f"_{dtype}"
    a = jnp.ones((n, n), dtype)
    out[f"jax{suffix}"] = flops / median_seconds(lambda a=a: jax.block_until_ready(a @ a)) / 1e9
    if torch_module is not None:
      device = _torch_device(torch_module)
      sync = torch_module.cuda.synchronize if device == "cuda" else (lambda: None)
      b = torch_module.ones(n, n, device=device, dtype=getattr(torch_module, dtype))
      out[f"torch{suffix}"] = flops / median_seconds(lambda b=b, sync=sync: (b @ b, sync())) / 1e9
  return out


def _torch_device(torch) -> str:
  """Where the reference runs: the GPU when JAX runs on one and torch can see it, else CPU."""
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def _torch_side(torch, model_name: str, side: int, batch: int, dtype: str = "float32"):
  from benchmarks import torch_reference

  device = _torch_device(torch)
  # What a tuned PyTorch GPU script sets: cuDNN picks each convolution's fastest algorithm
  # (XLA autotunes its own on a GPU).
  torch.backends.cudnn.benchmark = device == "cuda"
  model = torch_reference.MODELS[model_name]().to(device, memory_format=torch.channels_last)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  x = torch.randn(batch, 1, side, side, device=device).to(memory_format=torch.channels_last)
  y = torch.randint(0, 2, (batch,), device=device)
  loss_fn = torch.nn.CrossEntropyLoss()
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def train(steps):
    model.train()
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn(model(x), y)
      loss.backward()
      opt.step()
    sync()

  def evaluate(steps):
    model.eval()
    with torch.inference_mode(), autocast:
      for _ in range(steps):
        model(x)
    sync()

  return train, evaluate, torch_reference.count_params(model)


def _counted_flops(cost: dict) -> float:
  """XLA's FLOP count of a program, NaN off the CPU: XLA:GPU's cost analysis leaves out the
  convolutions it hands to cuDNN (an H200 run counted 0.035 GFLOP for a ResNet-18 train step
  XLA:CPU counts at 2.99), so FLOPs per image come from a CPU run of the same row."""
  if jax.default_backend() != "cpu":
    return float("nan")
  return float(cost.get("flops", float("nan")))


def torch_times(model_name: str, side: int, batch: int, dtype: str) -> dict:
  """The PyTorch side of a row, in a process of its own (`--child=torch_times`): warm-up, then
  `--repeats` timed runs of `--steps` train steps and as many eval batches, in seconds."""
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  train, evaluate, params = _torch_side(torch, model_name, side, batch, dtype)
  train(_WARMUP.value)
  evaluate(1)
  times = {"train_s": [], "eval_s": []}
  _time_repeats(_REPEATS.value, {"train_s": train, "eval_s": evaluate}, times)
  return {"params": params, **times}


def _time_repeats(repeats: int, runs: dict, times: dict) -> None:
  """`repeats` rounds of each of `runs` (name -> fn(steps)) for `--steps` steps, alternating;
  each round's seconds appended to `times[name]`."""
  for _ in range(repeats):
    for name, fn in runs.items():
      t = time.perf_counter()
      fn(_STEPS.value)
      times[name].append(time.perf_counter() - t)


def _child(kind: str, spec: str) -> dict:
  """One side of row `spec` measured by a fresh interpreter (`--child=kind`): its own process,
  so neither side's allocator state, threads or freed memory meets the other's."""
  argv = [sys.executable, "-m", "benchmarks.speed", f"--rows={spec}", f"--child={kind}"]
  argv += [f"--{f.name}={f.value}" for f in (_REPEATS, _STEPS, _WARMUP, _REUSE_STEP_MEMORY)]
  done = subprocess.run(argv, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{kind} of {spec} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _compiled_train(model_name: str, side: int, batch: int, dtype: str) -> types.SimpleNamespace:
  """busjax's train step for one row, compiled for a random batch. `train(steps)` runs `steps`
  steps as busjax.main's loops do (state rebound, metrics through `state_utils.StepPacer`) and
  waits for the last; `state()` is the trained state. Also the compiled step, the eval function,
  the batch's images, the parameter count and the compile's seconds."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, side, side, 1), dtype=np.uint8)
  labels = rng.integers(0, 2, (batch,)).astype(np.int32)
  step, state, apply, mesh, params = busjax_step(model_name, batch, dtype)
  global_batch = sharding.host_to_global({"image": images, "label": labels}, mesh)
  key = jax.random.key(0)
  t = time.perf_counter()
  compiled = step.lower(state, global_batch, key).compile()
  compile_s = time.perf_counter() - t
  holder = {"state": state}
  del state  # Donated by the first step: only the holder's state is live.

  pace = state_utils.StepPacer()  # One for the run, as a training loop has.

  def train(steps):
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], global_batch, key)
      metrics = pace(metrics)
    jax.block_until_ready(metrics)

  return types.SimpleNamespace(
    train=train,
    state=lambda: holder["state"],
    compiled=compiled,
    apply=apply,
    images=images,
    params=params,
    compile_s=compile_s,
  )


def _row(model_name: str, side: int, batch: int, with_torch: bool, dtype: str = "float32") -> dict:
  run = _compiled_train(model_name, side, batch, dtype)
  cost = run.compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops_per_image = _counted_flops(cost) / batch
  memory = run.compiled.memory_analysis()
  temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else None
  apply, images, params, jax_train = run.apply, run.images, run.params, run.train

  eval_images = jnp.asarray(images)
  eval_stage = {}

  def jax_eval(steps):
    variables = (run.state()["params"], run.state()["rest"])
    if not eval_stage:  # Compiled once, for the trained state's placement (the mesh's).
      lowered = apply.lower(variables, {"image": eval_images})
      eval_stage["compiled"] = lowered.compile()
      # XLA:CPU counts the lowered program (a GPU gives none; `_counted_flops` skips it there).
      cost = lowered.cost_analysis() or {}
      eval_stage["cost"] = cost[0] if isinstance(cost, list | tuple) else cost
    for _ in range(steps):
      out = eval_stage["compiled"](variables, {"image": eval_images})
    jax.block_until_ready(out)

  jax_train(_WARMUP.value)
  jax_eval(1)  # Warm-up (and the eval's compile).
  times = {"busjax_train": [], "busjax_eval": []}
  busjax_runs = {"busjax_train": jax_train, "busjax_eval": jax_eval}

  # busjax's repeats on both sides of PyTorch's (in a child process: alternating the two in one
  # process slowed busjax's fusion step 1.7x, each side's freed memory reclaimed under the other;
  # docs/performance.md), so that both meet the same minutes of this shared machine.
  _time_repeats((_REPEATS.value + 1) // 2, busjax_runs, times)
  if with_torch:
    reference = _child("torch_times", f"{model_name}:{side}:{batch}:{dtype}")
    if reference["params"] != params:
      raise RuntimeError(f"{model_name}: busjax {params} vs torch {reference['params']} parameters")
    times["torch_train"], times["torch_eval"] = reference["train_s"], reference["eval_s"]
  _time_repeats(_REPEATS.value // 2, busjax_runs, times)
  row = {
    "model": model_name,
    "side": side,
    "batch": batch,
    "dtype": dtype,
    "conv": layers.resolved_formulation(),
    "params": params,
    "busjax_compile_s": run.compile_s,
    "busjax_step_temp_mb": temp_mb,
    "gflop_per_image_train": flops_per_image / 1e9,
    # Multiply-accumulates of one image's eval forward (XLA's count / 2): the roofline's work.
    "gmac_per_image_forward": _counted_flops(eval_stage["cost"]) / 2 / batch / 1e9,
  }
  for key_name, values in times.items():
    row[f"{key_name}_img_s"] = batch * _STEPS.value / statistics.median(values)
  row["busjax_train_gflop_s"] = row["busjax_train_img_s"] * flops_per_image / 1e9
  if with_torch:
    row["train_ratio"] = row["busjax_train_img_s"] / row["torch_train_img_s"]
    row["eval_ratio"] = row["busjax_eval_img_s"] / row["torch_eval_img_s"]
  return row


PROBE_STEPS = 3  # Train steps of a memory probe (AdamW's state exists from the first one).


def _resident_kib(field: str) -> int | None:
  """VmRSS / VmHWM of this process in KiB (Linux), None where /proc is not there."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _settle_host_memory() -> None:
  """Returns freed heap to the OS (glibc's malloc_trim), so that memory a compile or an
  initialisation freed is not read as the training's, and restarts the peak (VmHWM) from now."""
  host_memory.release_free_heap()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def memory_probe(framework: str, model_name: str, side: int, batch: int, dtype: str) -> dict:
  """Peak memory of `PROBE_STEPS` train steps of one side, alone in this process.

  On a CPU: the process's peak resident memory while it builds the model and optimizer,
  compiles (busjax) and trains, minus its resident memory after the imports and the backend's
  start; freed heap is handed back before training and the peak restarted then, so the compile's
  own transient peak is not counted (its retained code is). Parameters, optimizer state,
  activations, gradients and temporaries count alike for both frameworks. On an accelerator: the
  device's peak allocation (JAX's `peak_bytes_in_use`, torch's `max_memory_allocated`).
  """
  on_cpu = jax.default_backend() == "cpu"
  if framework == "torch":
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.ones(1).sum()  # The runtime's own start-up is not the model's.
  else:
    jax.block_until_ready(jnp.ones(1) + 1)
  _settle_host_memory()
  base = _resident_kib("VmRSS")
  if on_cpu and base is None:
    return {}
  if framework == "torch":
    train, _, _ = _torch_side(torch, model_name, side, batch, dtype)
  else:
    train = _compiled_train(model_name, side, batch, dtype).train

  if not on_cpu:
    train(PROBE_STEPS)
    if framework == "torch":
      return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "kind": "device"}
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {} if peak is None else {"peak_mb": peak / 2**20, "kind": "device"}
  _settle_host_memory()
  train(PROBE_STEPS)
  return {"peak_mb": (_resident_kib("VmHWM") - base) / 1024, "kind": "host RSS above imports"}


def _timed_command(argv: list[str]) -> tuple[float, str]:
  t = time.perf_counter()
  done = subprocess.run(argv, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
  return wall, done.stdout


def _e2e_row(root: str, split_file: str, epochs: int, workdir: str) -> dict:
  """The README's supervised BUSI command vs `benchmarks/torch_peer.py`, `epochs` each, as
  subprocesses timed from launch to exit (imports, decoding, compiling, training, evaluation,
  checkpoints, busjax's report). busjax runs twice: cold, then again in a fresh workdir with the
  persistent compile cache the first run filled (what a user's second run sees)."""
  python = sys.executable
  peer_wall, peer_out = _timed_command(
    [python, "-m", "benchmarks.torch_peer", f"--root={root}", f"--split_file={split_file}",
     f"--epochs={epochs}", f"--workdir={os.path.join(workdir, 'torch')}"]
  )  # fmt: skip
  peer = json.loads(peer_out.strip().splitlines()[-1])
  row = {"model": "e2e: supervised BUSI (resnet18 w0.5, 128 px)", "epochs": epochs,
         "torch_wall_s": peer_wall, "torch": peer}  # fmt: skip
  for attempt in ("cold", "warm"):
    run_dir = os.path.join(workdir, f"busjax_{attempt}")
    wall, _ = _timed_command(
      [python, "-m", "busjax.main", "--config=configs/supervised.py:busi", f"--workdir={run_dir}",
       f"--config.data.root={root}", f"--config.data.split_file={split_file}",
       f"--config.train.epochs={epochs}",
       f"--compilation_cache={os.path.join(workdir, 'jax_cache')}"]
    )  # fmt: skip
    with open(os.path.join(run_dir, "summary.json")) as f:
      summary = json.load(f)
    row[f"busjax_{attempt}_wall_s"] = wall
    row[f"busjax_{attempt}_train_s"] = summary["train_seconds"]
    row[f"busjax_{attempt}_steps"] = summary["steps"]
    row[f"busjax_{attempt}_ratio"] = peer_wall / wall  # > 1: busjax finishes first.
  with open(os.path.join(run_dir, "reports", "test", "report.json")) as f:
    row["busjax_test_auc"] = json.load(f)["auc"]["value"]
  return row


def _number(value, spec: str) -> str:
  """A table cell: the number, or '–' where it was not measured (None or NaN)."""
  return "–" if value is None or math.isnan(value) else format(value, spec)


def _markdown(result: dict) -> str:
  peak = result["matmul_gflop_s"]
  lines = [
    f"Machine: {result['machine']['platform']}, {result['threads']} threads, JAX backend "
    f"{result['backend']}, torch on {result['torch_device']}; matmul (float32 unless named) "
    + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()),
    "",
    "| model, side, batch | train img/s busjax / torch | ratio (×) | eval img/s busjax / torch | "
    "ratio (×) | compile s | GMAC/img (fwd) | GFLOP/img (train) | busjax GFLOP/s (% of matmul) | "
    "train peak MB busjax / torch |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    row_peak = peak.get(f"jax_{r.get('dtype')}", peak["jax"])  # bfloat16 rows: its own peak.
    torch_train = f"{r['torch_train_img_s']:.1f}" if "torch_train_img_s" in r else "–"
    torch_eval = f"{r['torch_eval_img_s']:.1f}" if "torch_eval_img_s" in r else "–"
    lines.append(
      f"| {r['model']}, {r['side']}, {r['batch']}"
      f"{'' if r.get('dtype', 'float32') == 'float32' else ', ' + r['dtype']}"
      f"{', conv ' + r['conv'] if 'conv' in r else ''} | "
      f"{r['busjax_train_img_s']:.1f} / {torch_train} | "
      f"{_number(r.get('train_ratio'), '.2f')} | {r['busjax_eval_img_s']:.1f} / {torch_eval} | "
      f"{_number(r.get('eval_ratio'), '.2f')} | {r['busjax_compile_s']:.1f} | "
      f"{_number(r.get('gmac_per_image_forward'), '.2f')} | "
      f"{_number(r['gflop_per_image_train'], '.2f')} | {_number(r['busjax_train_gflop_s'], '.1f')} "
      f"({_number(100 * r['busjax_train_gflop_s'] / row_peak, '.0f')}%) | "
      f"{_number(r.get('busjax_train_peak_mb'), '.0f')} / "
      f"{_number(r.get('torch_train_peak_mb'), '.0f')} |"
    )
  kinds = {r["peak_memory"] for r in result["rows"] if r.get("peak_memory")}
  if kinds:
    lines += ["", f"Train peak memory: {', '.join(sorted(kinds))}, {PROBE_STEPS} steps, one child "
              "process per side (`memory_probe` in benchmarks/speed.py)."]  # fmt: skip
  e2e = result.get("e2e")
  if e2e:
    lines += [
      "",
      f"End to end, {e2e['epochs']} epochs of {e2e['model']} (launch to exit, both as "
      "subprocesses):",
      "",
      "| side | wall s | train(+val) s | ratio (torch wall / busjax wall) |",
      "|---|---|---|---|",
      f"| PyTorch peer script | {e2e['torch_wall_s']:.1f} | "
      f"{e2e['torch']['train_and_val_s']:.1f} | – |",
    ]
    for attempt in ("cold", "warm"):
      lines.append(
        f"| busjax, {attempt} compile cache | {e2e[f'busjax_{attempt}_wall_s']:.1f} | "
        f"{e2e[f'busjax_{attempt}_train_s']} | {e2e[f'busjax_{attempt}_ratio']:.2f}× |"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  # Before JAX starts (the parent's busjax side and a busjax child alike); a torch child's
  # process keeps glibc's defaults, as a plain PyTorch script does.
  reuse = _REUSE_STEP_MEMORY.value and _CHILD.value in (None, "busjax_memory")
  reuse = reuse and host_memory.reuse_step_memory()
  if _CHILD.value:  # One row, one side, one JSON line (`_child`).
    (spec,) = _ROWS.value
    name, side, batch, dtype, conv = parse_row(spec)
    framework, _, measure = _CHILD.value.partition("_")
    with layers.conv_formulation(conv):
      if measure == "memory":
        out = memory_probe(framework, name, side, batch, dtype)
      else:
        out = torch_times(name, side, batch, dtype)
    print(json.dumps(out))
    return
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
    "backend": jax.default_backend(),
    "busjax_reuses_step_memory": reuse,
    "torch_device": None if torch is None else _torch_device(torch),
    # Float32 convolutions at the backends' defaults: TF32 on an NVIDIA GPU for XLA (default
    # precision) and for cuDNN (torch.backends.cudnn.allow_tf32); torch's matmuls are full fp32.
    "torch_tf32": None
    if torch is None
    else {
      "cudnn": torch.backends.cudnn.allow_tf32,
      "matmul": torch.backends.cuda.matmul.allow_tf32,
    },
    "matmul_gflop_s": _matmul_gflops(torch),
    "rows": [],
  }
  for spec in _ROWS.value:
    name, side, batch, dtype, conv = parse_row(spec)
    with layers.conv_formulation(conv):  # Read when the step and eval are traced, in _row.
      row = _row(name, side, batch, torch is not None, dtype)
    if _MEMORY.value:
      for framework in ("busjax", "torch") if torch is not None else ("busjax",):
        probe = _child(f"{framework}_memory", spec)
        if probe:
          row[f"{framework}_train_peak_mb"] = probe["peak_mb"]
          row["peak_memory"] = probe["kind"]
    result["rows"].append(row)
    common.write_json_atomic(_OUTPUT.value, result)
    print(json.dumps(result["rows"][-1]), flush=True)
  if _E2E_DATA.value:
    if not (_E2E_SPLIT.value and torch is not None):
      raise app.UsageError("--e2e_data needs --e2e_split and --torch")
    with tempfile.TemporaryDirectory() as scratch:
      result["e2e"] = _e2e_row(
        _E2E_DATA.value, _E2E_SPLIT.value, _E2E_EPOCHS.value, _E2E_WORKDIR.value or scratch
      )
    common.write_json_atomic(_OUTPUT.value, result)
    print(json.dumps(result["e2e"]), flush=True)
  print(_markdown(result))


if __name__ == "__main__":
  app.run(main)
