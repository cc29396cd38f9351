"""Train the colour Fashion-MNIST DDPM (v-prediction, cosine schedule, 16x16 RGB) shipped in
`diffusers_ptq/zoo/assets/colour_ddpm`.

Reproducible: seeded data order, noise and initialisation; bf16 autocast (native on CPUs with
AVX512-BF16/AMX), fp32 master weights and EMA. Needs Debian's `dataset-fashion-mnist` package (the colours are
made deterministically by `diffusers_ptq.zoo.data.load_colour_fashion`). The shipped weights:

    python benchmarks/train_colour_ddpm.py --threads 1 --max-minutes 38

(One thread: with other jobs on the 2 cores, two threads ran 8x slower per step here.) `--max-minutes` stops
early (the log's `steps_done` says where); the learning-rate schedule is laid over `--steps` either way, so a
capped run is the same recipe cut short, and `--stop-at-step <steps_done>` repeats it on any machine. The EMA
weights are saved as a diffusers DDPMPipeline (safetensors) atomically every `--save-every` steps, so a
partial run is usable.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler
from training_common import ddpm_parser, train_ddpm, v_target

from diffusers_ptq.zoo.data import load_colour_fashion
from diffusers_ptq.zoo.models import COLOUR_DDPM_DIR, COLOUR_SCHEDULER_CONFIG, new_colour_unet


def main(argv: list[str] | None = None) -> None:
    log = Path("benchmarks/results/train_colour_ddpm.json")
    parser = ddpm_parser(__doc__, steps=5000, lr=1e-3, save_every=250, output=COLOUR_DDPM_DIR, log=log)
    args = parser.parse_args(argv)
    images, _, _ = load_colour_fashion("train", size=16, root=args.data_root)
    scheduler = DDPMScheduler(**COLOUR_SCHEDULER_CONFIG)
    train_ddpm(args, images, new_colour_unet, scheduler, v_target, bf16_autocast=True)


if __name__ == "__main__":
    main()
