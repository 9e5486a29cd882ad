#!/usr/bin/env bash
# The accelerator checks in one call (a GPU or TPU host; JAX and torch pick it up by themselves):
#   1. benchmarks/speed.py, busjax beside PyTorch on the device: every model at the configs'
#      sizes with the "auto" convolution formulation (XLA's own on an accelerator) and a
#      bfloat16 / batch sweep (speed.json);
#   2. the CPU rewrites ("cpu") beside "xla" on the same device, busjax only
#      (speed_formulations.json). jaxlib 0.11.2's GPU compiler aborts on the rewrites' strided
#      1x1 matmuls (a Triton GEMM fusion check, docs/performance.md), so this stage alone runs
#      with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false, for both rows alike;
#   3. the README's main job (configs/gan_rebalance.py on the synthetic phantoms), end to end;
#      MAIN_CONFIG=configs/gan_rebalance.py:gpu runs its accelerator-sized variant instead.
# Each stage has its own time limit, and speed.py rewrites its JSON after every row, so a stage
# that runs out of time still leaves what it finished. The default limits add up to 9.5 minutes
# (one 10-minute device call). On an H200 (2026-12-04) stage 1 needed ~40 s per
# ResNet-18/MobileNetV2 row and over 100 s for DenseNet121's compile; stage 3 took 150 s.
#
#   bash benchmarks/accelerator.sh OUTDIR [SPEED_S] [FORMULATIONS_S] [MAIN_S]
set -u
out=${1:?usage: bash benchmarks/accelerator.sh OUTDIR [SPEED_S] [FORMULATIONS_S] [MAIN_S]}
speed_s=${2:-300}
formulations_s=${3:-90}
main_s=${4:-170}
main_config=${MAIN_CONFIG:-configs/gan_rebalance.py}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and torch share the device in speed.py: JAX takes half of its memory, not 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}

{
  date -u
  nvidia-smi -L 2>/dev/null
  "$python" -c 'import jax, flax, optax, numpy, sys; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__); print(jax.devices())'
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# ROWS / FORMULATION_ROWS (comma-separated speed.py rows) replace these, e.g. for a dry run.
rows=(
  resnet18:128:32 mobilenet_v2:224:32 resnet18:128:256:bfloat16 mobilenet_v2:224:128:bfloat16
  densenet121:224:16 fusion:224:16 fusion:224:64:bfloat16 fusion:224:256:bfloat16
)
formulation_rows=(
  resnet18:128:32:float32:cpu resnet18:128:32:float32:xla
  mobilenet_v2:224:32:float32:cpu mobilenet_v2:224:32:float32:xla
)
start=$(date +%s)
timeout "$speed_s" "$python" -m benchmarks.speed --rows="${ROWS:-$(IFS=,; echo "${rows[*]}")}" \
  --steps=10 --repeats=5 --warmup=3 --output="$out/speed.json" >"$out/speed.log" 2>&1
echo "speed: exit $? after $(($(date +%s) - start)) s" | tee -a "$out/speed.log"

start=$(date +%s)
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout "$formulations_s" \
  "$python" -m benchmarks.speed --notorch --steps=10 --repeats=5 --warmup=3 \
  --rows="${FORMULATION_ROWS:-$(IFS=,; echo "${formulation_rows[*]}")}" \
  --output="$out/speed_formulations.json" >"$out/speed_formulations.log" 2>&1
echo "formulations: exit $? after $(($(date +%s) - start)) s" | tee -a "$out/speed_formulations.log"

start=$(date +%s)
rm -rf /tmp/busjax_accelerator_run
timeout "$main_s" "$python" -m busjax.main --config="$main_config" \
  --workdir=/tmp/busjax_accelerator_run >"$out/main.log" 2>&1
echo "main ($main_config): exit $? after $(($(date +%s) - start)) s" | tee -a "$out/main.log"
for f in summary.json reports/test/report.json; do
  [ -f "/tmp/busjax_accelerator_run/$f" ] && cp "/tmp/busjax_accelerator_run/$f" "$out/main_${f//\//_}"
done
tail -n 5 "$out/speed.log" "$out/speed_formulations.log" "$out/main.log"
