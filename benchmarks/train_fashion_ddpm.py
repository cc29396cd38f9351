"""Train the Fashion-MNIST DDPM that ships in `diffusers_ptq/zoo/assets/fashion_ddpm`.

Reproducible: seeded data order, noise and initialisation; fp32 (bf16 autocast is emulated, and slower,
on CPUs without AVX512-BF16). Needs Debian's `dataset-fashion-mnist` package. On 2 CPU cores:

    python benchmarks/train_fashion_ddpm.py --threads 1   # 3,000 steps of batch 64

The shipped weights took 3,424.5 s on one core (`seconds` in benchmarks/results/train_fashion_ddpm.json).

The EMA weights are saved as a diffusers DDPMPipeline (safetensors) atomically, every `--save-every` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from tqdm.auto import tqdm

from diffusers_ptq.zoo.data import load_fashion_mnist
from diffusers_ptq.zoo.models import FASHION_DDPM_DIR, FASHION_SCHEDULER_CONFIG, new_fashion_unet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--output", type=Path, default=FASHION_DDPM_DIR)
    parser.add_argument("--log", type=Path, default=Path("benchmarks/results/train_fashion_ddpm.json"))
    parser.add_argument("--data-root", type=Path, default=None, help="folder with the IDX .gz files")
    return parser.parse_args(argv)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_atomically(unet: torch.nn.Module, scheduler: DDPMScheduler, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        old = output.with_name(f".{output.name}-old")
        if output.exists():
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", size=32, root=args.data_root)

    unet = new_fashion_unet().to(memory_format=torch.channels_last)
    ema = new_fashion_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = DDPMScheduler(**FASHION_SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor, losses, start = 0, [], time.perf_counter()

    bar = tqdm(range(args.steps), desc="train", mininterval=5.0)
    for step in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        x0 = images[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        flip = torch.rand(len(x0), generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_atomically(ema, scheduler, args.output)
            args.log.parent.mkdir(parents=True, exist_ok=True)
            log = {
                "args": {k: str(v) for k, v in vars(args).items()},
                "steps_done": step + 1,
                "seconds": round(time.perf_counter() - start, 1),
                "loss_per_50_steps": [
                    round(sum(losses[i : i + 50]) / 50, 5) for i in range(0, len(losses) - 49, 50)
                ],
                "parameters": sum(p.numel() for p in unet.parameters()),
            }
            args.log.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
