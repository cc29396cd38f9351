"""Speed benchmark: per-step UNet latency and peak memory, float vs diffusers-ptq int8 vs torchao / quanto.

    OMP_NUM_THREADS=2 python benchmarks/speed.py --model both --output bench-speed/         # CPU, fp32
    python benchmarks/speed.py --model both --device cuda --output bench-speed-gpu/           # GPU, fp16
    python benchmarks/speed.py --model fashion --rows float,int8 --repeats 3 --output out/    # quick look

Rows: float (fp32 on CPU, fp16 on GPU), float compiled, diffusers-ptq fake-quant W8A8, its int8 path eager
and compiled, torchao Int8DynamicActivationInt8WeightConfig compiled, optimum-quanto W8A8 (install both
with `pip install 'diffusers-ptq[compare]'`; a missing library's row is reported as skipped). Models:
Stable Diffusion 1.5's UNet with random weights (64x64 latents, batch 2) and the shipped Fashion-MNIST
DDPM (--batch-size). Writes table.md, results.json and speed.png into --output. `--help` lists every option.

SD 1.5 holds an 860 M-parameter UNet in float32 plus a quantized copy: plan on ~10 GB of RAM on a CPU
(peak RSS per row in benchmarks/results/speed_sd15_cpu/table.md).
"""

from __future__ import annotations

import sys

from diffusers_ptq.benchmark.speed.cli import main

if __name__ == "__main__":
    sys.exit(main())
