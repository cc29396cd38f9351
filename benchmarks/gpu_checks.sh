#!/usr/bin/env bash
# Everything this project still has to check and time on a CUDA GPU, in one call (device time is scarce).
# Usage, from the repository root on a machine with a GPU and the project installed:
#   bash benchmarks/gpu_checks.sh OUT_DIR
# Writes OUT_DIR/tests.txt (the CUDA tests: integer layers, the Triton conv kernel with per-channel and
# group-wise weight scales and bias tables in its epilogue, GPTQ on the GPU) and
# OUT_DIR/speed-gpu/ (benchmarks/speed.py on SD 1.5's UNet and the shipped model, every row, W8A8), then
# OUT_DIR/speed-gpu-int-mm/ (the same integer rows with im2col + torch._int_mm instead of Triton, to see
# what the implicit GEMM buys), then OUT_DIR/reconstruction_schedule.json (per-step costs of SD 1.5's units
# at batch 32 and 4, extrapolated to the published schedule on 1 and 8 GPUs: issue 17). Record every
# figure in BENCHMARKS.md with the device named.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -m pytest -q -m "gpu or not slow" tests/test_integer.py tests/test_triton_conv.py \
    tests/test_group_scales.py tests/test_bias_correction.py tests/test_gptq.py tests/test_offload_compile.py \
    > "$out/tests.txt" 2>&1
echo "tests exit $?" >> "$out/tests.txt"
python benchmarks/speed.py --model both --device cuda --repeats 20 --warmup 5 --batch-size 256 \
    --output "$out/speed-gpu" --overwrite > "$out/speed-gpu.log" 2>&1
python benchmarks/speed.py --model sd15 --device cuda --repeats 20 --warmup 5 --kernel int_mm \
    --rows float-compiled,int8,int8-compiled --output "$out/speed-gpu-int-mm" --overwrite \
    > "$out/speed-gpu-int-mm.log" 2>&1
python benchmarks/reconstruction_schedule.py --device cuda --rows 64 --iterations 10 --devices 8 \
    --no-progress --json "$out/reconstruction_schedule.json" > "$out/reconstruction_schedule.log" 2>&1
echo "done: $out"
