"""Train the Fashion-MNIST DDPM that ships in `diffusers_ptq/zoo/assets/fashion_ddpm`.

Reproducible: seeded data order, noise and initialisation; fp32 (bf16 autocast is emulated, and slower,
on CPUs without AVX512-BF16). Needs Debian's `dataset-fashion-mnist` package. On 2 CPU cores:

    python benchmarks/train_fashion_ddpm.py --threads 1   # 3,000 steps of batch 64

The shipped weights took 3,424.5 s on one core (`seconds` in benchmarks/results/train_fashion_ddpm.json).

The EMA weights are saved as a diffusers DDPMPipeline (safetensors) atomically, every `--save-every` steps.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler
from training_common import ddpm_parser, epsilon_target, train_ddpm

from diffusers_ptq.zoo.data import load_fashion_mnist
from diffusers_ptq.zoo.models import FASHION_DDPM_DIR, FASHION_SCHEDULER_CONFIG, new_fashion_unet


def main(argv: list[str] | None = None) -> None:
    log = Path("benchmarks/results/train_fashion_ddpm.json")
    parser = ddpm_parser(__doc__, steps=3000, lr=6e-4, save_every=500, output=FASHION_DDPM_DIR, log=log)
    args = parser.parse_args(argv)
    images, _ = load_fashion_mnist("train", size=32, root=args.data_root)
    train_ddpm(args, images, new_fashion_unet, DDPMScheduler(**FASHION_SCHEDULER_CONFIG), epsilon_target)


if __name__ == "__main__":
    main()
