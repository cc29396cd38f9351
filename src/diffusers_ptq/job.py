"""QuantizationJob: install, initialise, search and reconstruct one UNet (or undo it all); PTQState."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.correction import correct_bias
from diffusers_ptq.gptq import gptq_quantize, release_float_weights
from diffusers_ptq.initialise import initialise_activations, initialise_weights, set_quant_state
from diffusers_ptq.nn import QuantLayerMixin
from diffusers_ptq.prepare import QuantPlan, install
from diffusers_ptq.reconstruction import reconstruct
from diffusers_ptq.reconstruction.sampling import SamplingCheck
from diffusers_ptq.report import QuantizationReport
from diffusers_ptq.search import FloatTargets, GroupSearch, NoiseTargets
from diffusers_ptq.sensitivity.mixed import choose_mixed_precision
from diffusers_ptq.timestep import TimestepContext

# Instance attributes a job (or `attach_quantizer` after it) sets on the UNet; `restore()` puts back what was
# there. `_internal_dict` is the diffusers config: `register_to_config` replaces it with one holding the
# quantization_config.
UNET_ATTRIBUTES = ("ptq_state", "hf_quantizer", "is_quantized", "quantization_method", "_internal_dict")
_ABSENT = object()


@dataclass
class PTQState:
    """What a quantized UNet carries: its recipe, timestep context, plan and report.

    `metrics` (name -> number, e.g. measured FID or SQNR) and `base_model` (the float model's Hub id) are
    saved with the checkpoint and shown on the model card by `push_to_hub`.
    """

    config: PTQConfig
    context: TimestepContext
    plan: QuantPlan
    group_map: torch.Tensor
    report: QuantizationReport | None = None
    borrowed_groups: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    num_prompts: int | None = None  # calibration prompts (text-conditioned pipelines)
    # What the sample selector chose (samples per step; TDAC scores; active picks), for reports and ablations.
    selection: dict[str, Any] = field(default_factory=dict)
    # Group search summary (learning rate, loss per epoch, final entropies); None when it did not run.
    group_search: dict[str, Any] | None = None
    # GPTQReport.to_dict() (layers solved, layers kept at nearest, settings); None when it did not run.
    gptq: dict[str, Any] | None = None
    # ReconstructionReport.to_dict() (per unit and pass: iterations, losses); None when it did not run.
    reconstruction: dict[str, Any] | None = None
    # Summary of the bias correction (mode, per-group fits, seconds); None when it did not run.
    bias_correction: dict[str, Any] | None = None


class QuantizationJob:
    """Install, initialise and optionally group-search one UNet; `restore()` undoes all of it exactly.

    Run every step that changes the UNet, up to attaching the quantizer, inside `guarded()`, so a failure
    anywhere leaves the UNet as it was. Installation waits for the first data: with active selection that
    is the first round, and the search's entropies then steer the later rounds (`feedback`).
    """

    def __init__(
        self,
        unet: nn.Module,
        config: PTQConfig,
        plan: QuantPlan,
        group_map: torch.Tensor,
        step_timesteps: torch.Tensor,
        batch_size: int,
        seed: int,
        progress: bool,
        targets: NoiseTargets | None,
        reconstruction_checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        self.unet, self.config, self.plan, self.group_map = unet, config, plan, group_map
        self.step_timesteps, self.batch_size, self.seed, self.progress = (
            step_timesteps,
            batch_size,
            seed,
            progress,
        )
        self.targets: NoiseTargets | FloatTargets | None = targets
        self.patch = None
        self.search: GroupSearch | None = None
        # Wall time of the group search (target sampling, start, every fit, finish), for reports.
        self.search_seconds = 0.0
        # layers.mixed_precision: what the sensitivity pass promoted (None when it did not run).
        self.mixed_precision: dict[str, Any] | None = None
        self.reconstruction_checkpoint = reconstruction_checkpoint
        # Set by quantize_pipeline: judges reconstruction on the pipeline's samples (sampling.py).
        self.sampling_check: SamplingCheck | None = None
        self.saved_attributes = {name: unet.__dict__.get(name, _ABSENT) for name in UNET_ATTRIBUTES}
        # Quantized layers' weight Parameters before GPTQ rebinds them (the float layers' own; never written).
        self.saved_weights: list[tuple[nn.Module, nn.Parameter]] = []

    def install(self, data: CalibrationSet) -> None:
        data.check_finite()
        unet, config = self.unet, self.config
        context = TimestepContext(data.num_train_timesteps)
        device = next(unet.parameters()).device
        if config.layers.mixed_precision.enabled:
            # Measured on a calibrated probe that is removed again; the real install then uses the new plan.
            self.plan, self.mixed_precision = choose_mixed_precision(
                unet, self.plan, config, self.group_map, data, self.batch_size, self.seed, self.progress
            )
        self.patch = install(unet, self.plan, config, context, self.group_map.to(device))
        initialise_weights(unet, self.progress)
        borrowed: dict[int, int] = {}
        if config.group_search.enabled:
            self.search = GroupSearch(
                unet,
                config.group_search,
                self.step_timesteps,
                data.num_train_timesteps,
                act_bits=config.activations.bits,
                batch_size=self.batch_size,
                seed=self.seed,
                progress=self.progress,
            )
            with self._search_timer():
                self.search.start(data)
            if self.targets is None:
                self.targets = FloatTargets(unet, self.batch_size)
        else:
            borrowed = initialise_activations(unet, data, self.batch_size, self.seed, self.progress)
        set_quant_state(unet, weights=True, acts=config.activations.enabled)
        unet.ptq_state = PTQState(
            config=copy.deepcopy(config),
            context=context,
            plan=self.plan,
            group_map=self.group_map,
            borrowed_groups=sorted(borrowed),
        )

    def feedback(self, data: CalibrationSet) -> torch.Tensor:
        """Active selection: learn from the data so far; return H(sigma_t) per sampling step."""
        if self.patch is None:
            self.install(data)
        else:
            data.check_finite()
        with self._search_timer():
            self.search.fit(data, self.targets, self.config.selection.active_search_epochs, decay=False)
            return self.search.step_entropy()

    def finish(self, data: CalibrationSet) -> None:
        if self.patch is None:
            self.install(data)
        if self.search is not None:
            with self._search_timer():
                self.search.fit(data, self.targets, self.config.group_search.epochs, decay=True)
                summary = self.search.finish(data)
            self.unet.ptq_state.group_search = {**summary, "seconds": round(self.search_seconds, 3)}
            set_quant_state(self.unet, weights=True, acts=True)
        if self.config.weights.rounding == "gptq":
            layers = [m for m in self.unet.modules() if isinstance(m, QuantLayerMixin)]
            self.saved_weights = [(m, m.weight) for m in layers]
            gptq = gptq_quantize(
                self.unet,
                data,
                self.config.weights,
                acts=self.config.activations.enabled,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            self.unet.ptq_state.gptq = gptq.to_dict()
        if self.config.reconstruction.enabled:
            report = reconstruct(
                self.unet,
                data,
                self.config.reconstruction,
                checkpoint_dir=self.reconstruction_checkpoint,
                progress=self.progress,
                sampling_check=self.sampling_check,
            )
            self.unet.ptq_state.reconstruction = report.to_dict()
            if self.progress:
                print(report)
        if self.config.bias_correction != "off":  # last: it corrects the model as it will run
            self.unet.ptq_state.bias_correction = correct_bias(
                self.unet,
                data,
                self.config.bias_correction,
                self.batch_size,
                acts=self.config.activations.enabled,
                progress=self.progress,
            )
        release_float_weights(self.unet)

    @contextlib.contextmanager
    def _search_timer(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.search_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Run the body; if it raises (KeyboardInterrupt included), `restore()` and re-raise."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Undo everything: the group search, the installed modules and the UNet attributes set since."""
        if self.search is not None:
            self.search.abort()
        for layer, weight in self.saved_weights:
            layer.weight = weight
        release_float_weights(self.unet)
        if self.patch is not None:
            self.patch.restore()
        for name, value in self.saved_attributes.items():
            if value is _ABSENT:
                self.unet.__dict__.pop(name, None)
            else:
                self.unet.__dict__[name] = value
