"""The UNets the speed benchmark times, their per-step inputs, and a synthetic calibration set for each.

- `sd15`: Stable Diffusion 1.5's UNet (its public config) with random weights: 512x512 images are 64x64
  latents, batch 2 (classifier-free guidance), text states 2 x 77 x 768. Timing does not depend on the
  weight values.
- `fashion`: the trained Fashion-MNIST DDPM that ships with the package (32x32, one channel), batch chosen.
- `tiny`: two random-weight toy UNets (conditional and unconditional) for plumbing tests.

The quantized rows need calibrated scales; their values do not change the speed, so each model gets a few
random inputs at spread-out timesteps (one per timestep group) instead of a pipeline run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.zoo import sd15_unet_config

TOKENS = 77  # CLIP's text length, as every SD pipeline pads prompts to it
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class SpeedModel:
    """One UNet to time: `build()` gives it in float32 on the CPU; inputs come from its config."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: int
    calibration_size: int | None = None  # spatial size of the calibration inputs (None: the model's own)

    def input_shapes(self, unet: nn.Module) -> dict[str, list[int]]:
        cfg = unet.config
        size = _size(cfg.sample_size)
        shapes = {"sample": [self.batch, cfg.in_channels, *size]}
        if _conditional(unet):
            shapes["encoder_hidden_states"] = [self.batch, TOKENS, cfg.cross_attention_dim]
        return shapes

    def step_inputs(
        self, unet: nn.Module, timesteps: list[int], device: torch.device, dtype: torch.dtype
    ) -> list[dict[str, torch.Tensor]]:
        """One keyword set per timestep: the same latents and text states, the timestep changing."""
        gen = torch.Generator().manual_seed(0)
        fixed = {
            name: torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            for name, shape in self.input_shapes(unet).items()
        }
        return [
            {**fixed, "timestep": torch.full((self.batch,), t, dtype=torch.long, device=device)}
            for t in timesteps
        ]

    def calibration_set(self, unet: nn.Module, rows: int) -> CalibrationSet:
        """`rows` random inputs at timesteps spread evenly over training (one per timestep group)."""
        gen = torch.Generator().manual_seed(1)
        cfg = unet.config
        size = _size(cfg.sample_size) if self.calibration_size is None else [self.calibration_size] * 2
        inputs = {"sample": torch.randn(rows, cfg.in_channels, *size, generator=gen)}
        if _conditional(unet):
            inputs["encoder_hidden_states"] = torch.randn(
                rows, TOKENS, cfg.cross_attention_dim, generator=gen
            )
        t = spread_timesteps(rows)
        return CalibrationSet(
            inputs=inputs,
            timesteps=t,
            train_timesteps=t,
            step_index=torch.arange(rows),
            trajectory=torch.zeros(rows, dtype=torch.long),
            step_timesteps=t,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        )


def spread_timesteps(count: int) -> torch.Tensor:
    """`count` descending training timesteps at the centres of `count` equal bins of [0, 1000)."""
    centres = (torch.arange(count, 0, -1) - 0.5) * NUM_TRAIN_TIMESTEPS / count
    return centres.floor().long()


def _size(sample_size: int | tuple[int, int] | list[int]) -> list[int]:
    return [sample_size, sample_size] if isinstance(sample_size, int) else list(sample_size)


def _conditional(unet: nn.Module) -> bool:
    return getattr(unet.config, "cross_attention_dim", None) is not None


def _sd15_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(sd15_unet_config()).eval()


def _fashion_unet() -> nn.Module:
    from diffusers_ptq.zoo import fashion_ddpm_unet

    return fashion_ddpm_unet().eval()


def _tiny_sd_unet() -> nn.Module:
    from diffusers_ptq.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline().unet


def _tiny_unet2d() -> nn.Module:
    from diffusers_ptq.tiny import tiny_unet2d

    return tiny_unet2d()


def speed_models(names: list[str], batch_size: int) -> list[SpeedModel]:
    """The models named (MODELS), in the order given; `batch_size` is the Fashion / tiny UNet2D batch."""
    out: list[SpeedModel] = []
    for name in names:
        if name == "sd15":
            desc = "Stable Diffusion 1.5 UNet (random weights), 64x64 latents, batch 2, text 77x768"
            # Scales come from 16x16 latents: their values do not change the speed, and it is 16x cheaper.
            out.append(SpeedModel("sd15", desc, _sd15_unet, batch=2, calibration_size=16))
        elif name == "fashion":
            desc = f"Fashion-MNIST DDPM (shipped, 32x32x1), batch {batch_size}"
            out.append(SpeedModel("fashion", desc, _fashion_unet, batch=batch_size))
        elif name == "tiny":
            out.append(SpeedModel("tiny-sd", "tiny random UNet2DConditionModel, batch 2", _tiny_sd_unet, 2))
            desc = f"tiny random UNet2DModel, batch {batch_size}"
            out.append(SpeedModel("tiny-unet2d", desc, _tiny_unet2d, batch=batch_size))
        else:
            raise ValueError(f"unknown speed-benchmark model {name!r}")
    return out
