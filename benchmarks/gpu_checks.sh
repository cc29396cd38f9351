#!/usr/bin/env bash
# Everything this project still has to check and time on a CUDA GPU, in one call (device time is scarce).
# Usage, from the repository root on a machine with a GPU:
#   bash benchmarks/gpu_checks.sh OUT_DIR [SECONDS]
# SECONDS (default 540) is the whole run's budget: each part below has its own limit, cut to what is left,
# and a part that no longer fits is skipped (OUT_DIR/summary.txt lists every part's exit code and seconds;
# 124 = stopped at its limit). Parts, most important first:
#   tests          the CUDA tests (-m gpu: integer layers, GPTQ, bias tables, offload/compile) and the
#                  Triton conv kernel's tests compiled for the GPU (per-channel and group-wise weight scales,
#                  bias tables in the epilogue, W4 nibbles)
#   speed-sd15     benchmarks/speed.py on SD 1.5's UNet (random weights), fp16: float, fake quant, the
#                  integer UNet on the Triton kernel, eager and compiled, and the float UNet compiled
#   schedule       benchmarks/reconstruction_schedule.py: SD 1.5's per-step reconstruction costs, extrapolated
#                  to the published schedule on 1 and 8 GPUs (issue 17)
#   speed-fashion  every row of the speed benchmark on the shipped model at batch 256
#   group-conv     benchmarks/group_conv_speed.py: per-group weight scales in the Triton kernel vs int_mm
#   speed-sd15-int-mm, speed-sd15-compare   the integer rows with im2col + torch._int_mm, and torchao / quanto
# Python packages the machine lacks (diffusers, optimum-quanto, torchao) are installed from .whl/ when that
# folder exists (wheels downloaded beforehand; see the device tool's README). Record every figure in
# BENCHMARKS.md with the device named.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [SECONDS]}"
budget="${2:-540}"
mkdir -p "$out"
start=$(date +%s)
summary="$out/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torchao goes into its own folder, on the path of its comparison row only: a torchao built for another
# torch must not break the imports of every other part.
wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
if ls .whl/*.whl > /dev/null 2>&1; then
    wheels /tmp/site $(ls .whl/*.whl | grep -v /torchao-) >> "$out/pip.log" 2>&1 || echo "pip: .whl failed" >> "$summary"
    if ls .whl/torchao-*.whl > /dev/null 2>&1; then
        wheels /tmp/site-ao .whl/torchao-*.whl >> "$out/pip.log" 2>&1 || echo "pip: torchao failed" >> "$summary"
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# part NAME LIMIT CMD...: CMD's output goes to OUT/NAME.log; it is stopped at LIMIT seconds or at the
# budget's end, whichever comes first.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start) - 10))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "$name skipped: out of time" >> "$summary"
        return
    fi
    local t0
    t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$? $(($(date +%s) - t0))s (limit ${limit}s)" >> "$summary"
}

part env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
    python3 -c "import torch, triton, diffusers, transformers; print(torch.__version__, torch.version.cuda,
    triton.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())"'
# -k: the gpu-marked tests (markers are keywords) and every Triton kernel test, which runs compiled on CUDA.
part tests 170 python3 -m pytest -q -rfEs -p no:cacheprovider -m "gpu or not slow" -k "triton or Triton or gpu" tests/
part speed-sd15 180 python3 benchmarks/speed.py --model sd15 --device cuda --repeats 20 --warmup 5 \
    --rows float,fake-quant,int8,float-compiled,int8-compiled --traceback --output "$out/speed-sd15" --overwrite
part schedule 150 python3 benchmarks/reconstruction_schedule.py --device cuda --rows 64 --iterations 10 \
    --devices 8 --no-progress --json "$out/reconstruction_schedule.json"
part speed-fashion 90 env PYTHONPATH="$PYTHONPATH:/tmp/site-ao" python3 benchmarks/speed.py --model fashion --device cuda --repeats 20 --warmup 5 \
    --batch-size 256 --traceback --output "$out/speed-fashion" --overwrite
part group-conv 40 python3 benchmarks/group_conv_speed.py --device cuda --batch 8 --size 64 --repeats 50 \
    --label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --output "$out/group_conv_gpu.json"
part speed-sd15-int-mm 60 python3 benchmarks/speed.py --model sd15 --device cuda --repeats 20 --warmup 5 \
    --kernel int_mm --rows float,int8 --output "$out/speed-sd15-int-mm" --overwrite
part speed-sd15-compare 120 env PYTHONPATH="$PYTHONPATH:/tmp/site-ao" python3 benchmarks/speed.py --model sd15 --device cuda --repeats 20 --warmup 5 \
    --rows float,torchao,quanto --traceback --output "$out/speed-sd15-compare" --overwrite
# The device tool returns at most 8 files: everything also goes into one archive.
tar -czf "$out/../gpu_checks.tar.gz" -C "$out" . 2> /dev/null && mv "$out/../gpu_checks.tar.gz" "$out/"
cat "$summary"
echo "done: $out ($(($(date +%s) - start)) s)"
