"""How each speed-benchmark row is built from the float UNet, sharing what rows have in common.

The float row and the compiled float row run the same module; the fake-quant row runs the calibrated UNet,
which `convert` then turns into the integer one that the two int8 rows share (so fake-quant runs first).
torchao and quanto each quantize a fresh copy of the float UNet. A shared model is dropped as soon as no
later row needs it. A row that cannot run raises `RowSkipped` with the reason; the runner records it.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from diffusers_ptq.api import quantize_unet
from diffusers_ptq.benchmark.quanto_row import INSTALL_HINT, quanto_w8a8
from diffusers_ptq.benchmark.speed.measure import model_bytes
from diffusers_ptq.benchmark.speed.models import SpeedModel
from diffusers_ptq.benchmark.speed.settings import SpeedSettings
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.integer import ConversionReport, convert

LABELS = {  # {dtype} is the run's float dtype, {bits} the diffusers-ptq rows' W?A8
    "float": "float ({dtype})",
    "float-compiled": "float ({dtype}), compiled",
    "fake-quant": "fake-quant {bits} (diffusers-ptq)",
    "int8": "int8 {bits} eager (diffusers-ptq)",
    "int8-compiled": "int8 {bits} compiled (diffusers-ptq)",
    "torchao": "torchao int8 dynamic W8A8, compiled",
    "quanto": "optimum-quanto W8A8",
}
COMPILED = ("float-compiled", "int8-compiled", "torchao")
# Shared models each row runs on ('int8' is made from 'quantized', so it needs that until it exists).
_USES = {"float": "float", "float-compiled": "float", "fake-quant": "quantized", "int8": "int8"}
_USES["int8-compiled"] = "int8"


class RowSkipped(Exception):
    """A row that cannot run here; the message says why."""


@dataclass
class PreparedRow:
    module: nn.Module
    weight_bytes: int
    notes: list[str] = field(default_factory=list)


def benchmark_recipe(settings: SpeedSettings) -> PTQConfig:
    """W8A8 (or W4A8) with per-channel min/max ranges and one timestep group per calibration input (scales
    do not change the speed); q, k, v quantized, the softmax output float as in the q-diffusion preset.

    An 8-bit softmax output needs the attention probabilities materialised (no fused kernel takes them):
    at SD 1.5's 64x64 latents that is a 4096 x 4096 matrix per head, materialised and fake-quantized
    (BENCHMARKS.md §7). With a float softmax attention runs as fused SDPA.
    """
    minmax = {"scale_search": "minmax"}
    acts = {**minmax, "timestep_groups": settings.calibration_rows, "softmax_bits": 16}
    weights = {**minmax, "granularity": "per_channel"}  # the int8 GEMM path at W4 too (groups: float speed)
    return PTQConfig(weight_bits=settings.weight_bits, act_bits=8, weights=weights, activations=acts)


class RowContext:
    """The float UNet of one model (float32, on the CPU) and the models built from it on the run's device."""

    def __init__(
        self,
        model: SpeedModel,
        float_unet: nn.Module,
        settings: SpeedSettings,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model, self.float_unet, self.settings = model, float_unet, settings
        self.device, self.dtype = device, dtype
        self.calibration = model.calibration_set(float_unet, settings.calibration_rows)
        self._shared: dict[str, nn.Module] = {}
        self.int8_report: ConversionReport | None = None

    def float_model(self) -> nn.Module:
        """The float UNet on the device (the original itself on a float32 CPU run: nothing modifies it)."""
        if "float" not in self._shared:
            here = self.device.type == "cpu" and self.dtype == torch.float32
            self._shared["float"] = self.float_unet if here else self.float_copy()
        return self._shared["float"]

    def float_copy(self) -> nn.Module:
        """A fresh float copy on the device in the run's dtype, for a method that quantizes in place."""
        unet = copy.deepcopy(self.float_unet)
        # nn.Module.to: diffusers' own `to` warns on every dtype cast (a UNet keeps no fp32-only modules).
        return nn.Module.to(unet, device=self.device, dtype=self.dtype)

    def quantized_model(self) -> nn.Module:
        """diffusers-ptq W8A8, calibrated where it runs (device and dtype), as a user would."""
        if "quantized" not in self._shared:
            unet = self.float_copy()
            quantize_unet(unet, benchmark_recipe(self.settings), self.calibration, progress=False)
            self._shared["quantized"] = unet
        return self._shared["quantized"]

    def int8_model(self) -> nn.Module:
        if "int8" not in self._shared:
            unet = self.quantized_model()
            self.int8_report = convert(unet, "int8", kernel=self.settings.kernel)
            self._shared.pop("quantized")  # converted in place: the fake-quant model is gone
            self._shared["int8"] = unet
        return self._shared["int8"]

    def calibrate(self, module: nn.Module) -> None:
        """Run the calibration inputs through `module` (for quanto's Calibration)."""
        with torch.no_grad():
            for kwargs in self.calibration.batches(8, self.device, self.dtype):
                module(**kwargs)

    def compile(self, module: nn.Module) -> nn.Module:
        mode = None if self.settings.compile_mode == "default" else self.settings.compile_mode
        return torch.compile(module, mode=mode)

    def release(self, remaining: list[str]) -> None:
        """Drop every shared model that none of the `remaining` rows needs."""
        needed = {_USES[row] for row in remaining if row in _USES}
        if "int8" in needed and "int8" not in self._shared:
            needed.add("quantized")
        for name in [name for name in self._shared if name not in needed]:
            del self._shared[name]


def _float(ctx: RowContext) -> PreparedRow:
    module = ctx.float_model()
    return PreparedRow(module, model_bytes(module), [f"{str(ctx.dtype).removeprefix('torch.')} weights"])


def _float_compiled(ctx: RowContext) -> PreparedRow:
    row = _float(ctx)
    return PreparedRow(ctx.compile(row.module), row.weight_bytes, row.notes)


def _fake_quant(ctx: RowContext) -> PreparedRow:
    module = ctx.quantized_model()
    groups = ctx.settings.calibration_rows
    bits = f"W{ctx.settings.weight_bits}A8"
    notes = [f"simulated {bits} ({groups} timestep groups): float weights plus scale tables"]
    return PreparedRow(module, model_bytes(module), notes)


def _int8(ctx: RowContext) -> PreparedRow:
    module = ctx.int8_model()
    report = ctx.int8_report
    if report is None:  # int8_model() sets it; a missing report is a bug here, not bad input
        raise RuntimeError("the int8 row has no conversion report")
    fp16 = max(report.fp16_bytes, 1)
    notes = [
        f"{len(report.integer)} layers on int8 ({report.kernel}), {len(report.fallback)} kept fake quant; "
        "attention matmuls fake-quant",
        f"quantized layers' weights {(report.code_bytes + report.constant_bytes) / fp16:.3f}x their fp16 "
        f"bytes (+ {report.cache_bytes / fp16:.3f}x oneDNN prepacked copies)",
    ]
    return PreparedRow(module, model_bytes(module) + report.cache_bytes, notes)


def _int8_compiled(ctx: RowContext) -> PreparedRow:
    row = _int8(ctx)
    return PreparedRow(ctx.compile(row.module), row.weight_bytes, row.notes)


def _import(name: str, package: str) -> object:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise RowSkipped(f"{package} is not installed ({err}); {INSTALL_HINT}") from None
    except Exception as err:  # installed but broken, e.g. built for another torch
        raise RowSkipped(f"{package} cannot be imported: {type(err).__name__}: {err}") from None


def _torchao(ctx: RowContext) -> PreparedRow:
    quantization = _import("torchao.quantization", "torchao")
    module = ctx.float_copy()
    quantization.quantize_(module, quantization.Int8DynamicActivationInt8WeightConfig())
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    done = sum(type(m.weight) not in (torch.Tensor, nn.Parameter) for m in linears)
    notes = [f"{done} of {len(linears)} Linear layers int8 (torchao's default filter); convolutions float"]
    return PreparedRow(ctx.compile(module), model_bytes(module), notes)


def _quanto(ctx: RowContext) -> PreparedRow:
    _import("optimum.quanto", "optimum-quanto")
    module = ctx.float_copy()
    quanto_w8a8(module, lambda: ctx.calibrate(module))
    rows = len(ctx.calibration)
    notes = [f"calibrated on the same {rows} synthetic inputs as fake-quant; eager"]
    return PreparedRow(module, model_bytes(module), notes)


PREPARE: dict[str, Callable[[RowContext], PreparedRow]] = {
    "float": _float,
    "float-compiled": _float_compiled,
    "fake-quant": _fake_quant,
    "int8": _int8,
    "int8-compiled": _int8_compiled,
    "torchao": _torchao,
    "quanto": _quanto,
}
