"""What the scripts that train the shipped DDPMs and their classifiers share.

The training loops consume their seeded generator in a fixed order (data order, horizontal flips, noise,
timesteps), so a model's weights depend only on the arguments; the shipped assets were trained by these loops.
Imported by the `train_*.py` scripts next to it (run as `python benchmarks/train_....py`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from tqdm.auto import tqdm

# (x0, noise, alpha_bar) -> what the UNet learns to predict.
Target = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def epsilon_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a) * noise - sqrt(1 - a) * x0 (what diffusers' schedulers expect)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def ddpm_parser(
    description: str, steps: int, lr: float, save_every: int, output: Path, log: Path, threads: int = 2
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps (schedule length)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall time")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--save-every", type=int, default=save_every)
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--log", type=Path, default=log)
    parser.add_argument("--data-root", type=Path, default=None, help="folder with the IDX .gz files")
    return parser


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_atomically(unet: torch.nn.Module, scheduler: DDPMScheduler, output: Path) -> None:
    """Save a DDPMPipeline to `output` so that a reader sees the old folder or the new one, never a mix."""
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


def train_ddpm(
    args: argparse.Namespace,
    images: torch.Tensor,
    new_unet: Callable[[], torch.nn.Module],
    scheduler: DDPMScheduler,
    target: Target,
    bf16_autocast: bool = False,
) -> None:
    """AdamW with warm-up + cosine decay, gradient clipping at 1, EMA weights saved every `--save-every`
    steps and at the end (`--steps`, `--stop-at-step` or `--max-minutes`), with a JSON log."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    unet = new_unet().to(memory_format=torch.channels_last)
    ema = new_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor, losses, start = 0, [], time.perf_counter()
    deadline = start + 60 * args.max_minutes if args.max_minutes else math.inf
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            prediction = unet(xt, t).sample
        loss = F.mse_loss(prediction.float(), target(x0, noise, a))
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


def classifier_parser(description: str, threads: int, log: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=log)
    return parser


def train_classifier(
    model: torch.nn.Module,
    train_x: torch.Tensor,
    args: argparse.Namespace,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.nn.Module:
    """AdamW + one-cycle schedule over `--epochs` of seeded shuffles with random horizontal flips;
    `loss_fn(model, x, idx)` scores a batch (idx: its rows of the training set). Returns the model in eval."""
    steps = args.epochs * (len(train_x) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=steps, desc="classifier", mininterval=5.0)
    for _ in range(args.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(len(train_x) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = train_x[idx]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(model, x, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()
