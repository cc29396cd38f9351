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
in the mean of the error over the samples (the drift, e.g. a brightness shift, that FD punishes) by more
than that mean's sampling noise: two jackknife standard errors of its change over the paired samples. On a
few samples the mean is noisy; without the margin the check undid a colour-model run that sampled FD
+61.6 % against +114.9 % for calibration alone because that term rose 3.7 % (BENCHMARKS.md §8).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusers_ptq import distributed
from diffusers_ptq.calibration.driver import CalibrationDriver, split_pipeline_calls
from diffusers_ptq.initialise import float_mode
from diffusers_ptq.reconstruction.config import ReconstructionConfig
from diffusers_ptq.reconstruction.memory import offloaded
from diffusers_ptq.reconstruction.report import ReconstructionReport
from diffusers_ptq.reconstruction.safeguard import output_errors
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
    on the first call. Under torch.distributed the ranks share the pipeline calls (see `sample`); every
    rank ends with all the outputs.
    """

    def __init__(
        self, pipe: Any, driver: CalibrationDriver, num_samples: int, seed: int, progress: bool = False
    ) -> None:
        if driver.calibration_fn is not None:
            raise ValueError("a sampling check needs the pipeline's own call, not a calibration_fn")
        self.pipe, self.driver, self.num_samples = pipe, driver, num_samples
        self.seed, self.progress = seed, progress
        self.reference: torch.Tensor | None = None
        self.errors: dict[str, torch.Tensor] = {}  # per sample, of each call: outputs - float outputs
        self.seconds = 0.0

    @torch.no_grad()
    def sample(self, what: str) -> torch.Tensor:
        """Final outputs of every sample; under a process group the ranks share the pipeline calls
        (`split_pipeline_calls`) and every rank returns them all."""
        generator = torch.Generator().manual_seed(self.seed)
        return split_pipeline_calls(
            self.pipe,
            self.num_samples,
            self.driver.chunk,
            lambda start, count: self.driver.run(self.pipe, start, count, generator),
            final_output,
            f"reconstruction: sampling check ({what})",
            self.progress,
        )

    def __call__(self, what: str = "quantized") -> tuple[float, float]:
        start = time.perf_counter()
        if self.reference is None:
            with float_mode(self.pipe.unet):
                self.reference = self.sample("float")
        outputs = self.sample(what)
        self.errors[what] = (outputs - self.reference).reshape(len(outputs), -1)
        self.seconds += time.perf_counter() - start
        return output_errors(outputs, self.reference)

    def bias_noise(self, before: str, after: str) -> float:
        """Two jackknife standard errors of the change in the error's mean square (`output_errors`' second
        term) between the calls `before` and `after`, over their paired samples; 0.0 for one sample."""
        return bias_noise(self.errors[before], self.errors[after])


def bias_noise(before: torch.Tensor, after: torch.Tensor) -> float:
    """Two jackknife standard errors of mean_d(mean_n(after)^2) - mean_d(mean_n(before)^2) for per-sample
    errors (n, d) paired by row."""
    n = len(before)
    if n < 2:
        return 0.0

    def left_out(errors: torch.Tensor) -> torch.Tensor:  # the term without each sample in turn, (n,)
        errors = errors.double()
        means = (errors.sum(dim=0, keepdim=True) - errors) / (n - 1)
        return means.pow(2).mean(dim=1)

    change = left_out(after) - left_out(before)
    return 2.0 * float(((n - 1) / n * (change - change.mean()).pow(2).sum()).sqrt())


def worse(before: tuple[float, float], after: tuple[float, float], noise: float = 0.0) -> bool:
    """Whether `after` is further from float than `before`: a higher mean squared error, or a mean square
    of the mean error higher by more than `noise`. Rank 0 decides for all ranks."""
    verdict = after[0] > before[0] or after[1] > before[1] + noise
    if distributed.is_initialized():
        verdict = bool(distributed.exchange("reconstruction: sampling check", verdict)[0])
    return verdict


def note_before(report: ReconstructionReport, check: SamplingCheck, before: tuple[float, float]) -> None:
    """Record the samples' errors before the run (also when the held-out check undid it, so no after)."""
    report.sampling_error_before, report.sampling_bias_before = before
    report.sampling_samples, report.sampling_seconds = check.num_samples, check.seconds


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
    noise = check.bias_noise("before reconstruction", "after reconstruction")
    note_before(report, check, before)
    report.sampling_error_after, report.sampling_bias_after = after
    report.sampling_bias_noise = noise
    if worse(before, after, noise):
        logger.warning(
            "reconstruction: the final outputs of %d fresh samples moved further from the float UNet's "
            "(mean square %.4g -> %.4g, its mean over the samples %.4g -> %.4g, noise %.2g); every unit is "
            "put back to where the run started",
            check.num_samples,
            before[0],
            after[0],
            before[1],
            after[1],
            noise,
        )
        with offloaded(unet, config.offload, config.offload_device):  # undone where the run was done
            saved.undo()
            saved.restore_switches()
        report.model_reverted, report.reverted_by = True, "samples"
