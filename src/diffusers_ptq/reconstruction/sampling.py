"""Reconstruction judged by what the sampler makes of it, not only by one step's error.

The held-out check (`safeguard.py`) compares noise predictions one step at a time, on inputs taken from
float trajectories. A run can pass it and still sample worse images (BENCHMARKS.md §8: a one-minute run
whose every held-out check improved sampled FD +96.5 % against +85.6 % for calibration alone): along a
quantized trajectory each step's error changes the next step's input, and the sampler adds up the error's
systematic part over all its steps. So when `quantize_pipeline` has the pipeline at hand, the whole run is
also judged end to end: trajectories that calibration never drew (a generator of their own) are run
through the pipeline's own loop from the same noise by the float UNet (once), by the UNet as calibrated
(before the run) and as reconstructed (after). The run is undone if the reconstructed UNet's final outputs
(latents for pipelines with a VAE, else images) are further from the float ones, in mean squared error or
in the mean of the error over the samples (the drift, e.g. a brightness shift, that FD punishes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration.driver import CalibrationDriver, quiet_pipeline
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.memory import offloaded
from diffusers_ptq.reconstruction.report import ReconstructionReport
from diffusers_ptq.reconstruction.safeguard import float_mode, output_errors
from diffusers_ptq.reconstruction.state import SavedState

logger = logging.getLogger("diffusers_ptq")


def final_output(out: Any) -> torch.Tensor:
    """A pipeline call's result as a float32 CPU tensor, one row per sample (latents or np images)."""
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"reconstruction.sampling_check: the pipeline returned {type(images).__name__}, expected latents "
            "or an np array (it is called with output_type='latent' or 'np')"
        )
    return images.detach().float().cpu()


class SamplingCheck:
    """Errors of the pipeline's final outputs against the float UNet's, on `num_samples` fresh samples.

    Calling it samples with the UNet as it is now (the same noise every time) and returns `output_errors`:
    (mean squared error, mean square of the error's mean over the samples). The float reference is sampled
    on the first call. Under torch.distributed every rank samples all of them (the UNets are identical).
    """

    def __init__(
        self, pipe: Any, driver: CalibrationDriver, num_samples: int, seed: int, progress: bool = False
    ) -> None:
        if driver.calibration_fn is not None:
            raise ValueError("a sampling check needs the pipeline's own call, not a calibration_fn")
        self.pipe, self.driver, self.num_samples = pipe, driver, num_samples
        self.seed, self.progress = seed, progress
        self.reference: torch.Tensor | None = None
        self.seconds = 0.0

    @torch.no_grad()
    def sample(self, what: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        chunk = self.driver.chunk
        outs = []
        with quiet_pipeline(self.pipe):
            for start in tqdm(
                range(0, self.num_samples, chunk),
                desc=f"reconstruction: sampling check ({what})",
                unit="call",
                disable=not self.progress,
            ):
                count = min(chunk, self.num_samples - start)
                outs.append(final_output(self.driver.run(self.pipe, start, count, generator)))
        return torch.cat(outs)

    def __call__(self, what: str = "quantized") -> tuple[float, float]:
        start = time.perf_counter()
        if self.reference is None:
            with float_mode(self.pipe.unet):
                self.reference = self.sample("float")
        errors = output_errors(self.sample(what), self.reference)
        self.seconds += time.perf_counter() - start
        return errors


def worse(before: tuple[float, float], after: tuple[float, float]) -> bool:
    """Whether `after` is further from float than `before` in either term; rank 0 decides for all ranks."""
    verdict = after[0] > before[0] or after[1] > before[1]
    if distributed.is_initialized():
        verdict = bool(distributed.exchange("reconstruction: sampling check", verdict)[0])
    return verdict


def judge_samples(
    unet: nn.Module,
    config: ReconstructionConfig,
    check: SamplingCheck,
    before: tuple[float, float],
    saved: SavedState,
    report: ReconstructionReport,
) -> None:
    """Sample after the run, record both checks in `report`, and undo the run if it made them worse."""
    after = check("after reconstruction")
    report.sampling_error_before, report.sampling_bias_before = before
    report.sampling_error_after, report.sampling_bias_after = after
    report.sampling_samples, report.sampling_seconds = check.num_samples, check.seconds
    if worse(before, after):
        logger.warning(
            "reconstruction: the final outputs of %d fresh samples moved further from the float UNet's "
            "(mean square %.4g -> %.4g, its mean over the samples %.4g -> %.4g); every unit is put back to "
            "where the run started",
            check.num_samples,
            before[0],
            after[0],
            before[1],
            after[1],
        )
        with offloaded(unet, config.offload, config.offload_device):  # undone where the run was done
            saved.undo()
            saved.restore_switches()
        report.model_reverted, report.reverted_by = True, "samples"
