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

from diffusers_ptq.zoo.data import load_colour_fashion
from diffusers_ptq.zoo.models import COLOUR_DDPM_DIR, COLOUR_SCHEDULER_CONFIG, new_colour_unet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps (schedule length)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall time")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--output", type=Path, default=COLOUR_DDPM_DIR)
    parser.add_argument("--log", type=Path, default=Path("benchmarks/results/train_colour_ddpm.json"))
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


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a) * noise - sqrt(1 - a) * x0 (what diffusers' schedulers expect)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, _, _ = load_colour_fashion("train", size=16, root=args.data_root)

    unet = new_colour_unet().to(memory_format=torch.channels_last)
    ema = new_colour_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = DDPMScheduler(**COLOUR_SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor, losses, start = 0, [], time.perf_counter()
    deadline = start + 60 * args.max_minutes if args.max_minutes else math.inf

    for step in range(args.steps):
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
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = unet(xt, t).sample
        loss = F.mse_loss(prediction.float(), v_target(x0, noise, a))
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
        if step % 50 == 49:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1} loss {sum(losses[-50:]) / 50:.4f} {elapsed:.0f}s", flush=True)
        last = step + 1 in (args.steps, args.stop_at_step) or time.perf_counter() > deadline
        if (step + 1) % args.save_every == 0 or last:
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
        if last:
            break


if __name__ == "__main__":
    main()
