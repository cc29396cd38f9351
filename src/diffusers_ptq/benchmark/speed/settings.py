"""What the speed benchmark runs: models, rows, device, dtype, repeats; checked before a model is built."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from diffusers_ptq.integer import KERNELS

# Row ids in the order they run (a row reuses what an earlier one built: the float model, the quantized one).
ROWS = ("float", "float-compiled", "fake-quant", "int8", "int8-compiled", "torchao", "quanto")
DEFAULT_ROWS = ROWS
ROW_HELP = {
    "float": "the float UNet, eager (fp32 on CPU, fp16 on GPU unless --dtype says otherwise)",
    "float-compiled": "the float UNet under torch.compile",
    "fake-quant": "diffusers-ptq fake quantization, W8A8 or --weight-bits 4 (simulated)",
    "int8": "diffusers-ptq on integer kernels (diffusers_ptq.convert), eager",
    "int8-compiled": "the same integer UNet under torch.compile",
    "torchao": "torchao Int8DynamicActivationInt8WeightConfig (its default filter: Linear layers) + compile",
    "quanto": "optimum-quanto W8A8: qint8 weights and activations, calibrated, frozen; eager",
}
# 'tiny' is two random-weight toy UNets for plumbing tests, not a measurement.
MODELS = ("sd15", "fashion", "tiny")
MODEL_CHOICES = (*MODELS, "both")
WEIGHT_BITS = (8, 4)  # W8A8 (the target) or W4A8 (packed weights; no oneDNN split on any CPU)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_models(text: str) -> list[str]:
    """'both' -> ['sd15', 'fashion']; otherwise a comma-separated list of MODELS."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    out: list[str] = []
    for name in names:
        if name not in MODEL_CHOICES:
            raise ValueError(f"--model {name!r} is not valid; choose from {', '.join(MODEL_CHOICES)}")
        for model in ("sd15", "fashion") if name == "both" else (name,):
            if model not in out:
                out.append(model)
    if not out:
        raise ValueError(f"--model is empty; choose from {', '.join(MODEL_CHOICES)}")
    return out


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {low}")


@dataclass
class SpeedSettings:
    """Settings of `benchmarks/speed.py`; `validate()` raises ValueError naming the bad field."""

    models: list[str] = field(default_factory=lambda: ["sd15", "fashion"])
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    repeats: int = 10  # timed UNet calls per row (median and spread over these)
    warmup: int = 2  # untimed calls after the first one (the first call, which compiles, is never timed)
    batch_size: int = 64  # the Fashion model's batch (SD 1.5 runs batch 2: classifier-free guidance)
    kernel: str = "auto"  # diffusers_ptq.convert's GEMM kernel
    compile_mode: str = "default"  # torch.compile mode of the compiled rows
    calibration_rows: int = 4  # synthetic calibration inputs (one per timestep group) for fake-quant/quanto
    weight_bits: int = 8  # of the diffusers-ptq rows (activations 8-bit); torchao and quanto stay W8A8
    verbose_errors: bool = False  # print the traceback of a row that fails (it is an error either way)
    strict: bool = False  # CI: a row in error (raised, or output unlike the float model's) fails the run

    def validate(self) -> None:
        if not self.models or any(m not in MODELS for m in self.models):
            raise ValueError(f"models={self.models!r} is invalid; choose from {', '.join(MODELS)}")
        if not self.rows:
            raise ValueError(f"rows is empty; choose from {', '.join(ROWS)}")
        for row in self.rows:
            if row not in ROWS:
                raise ValueError(f"row {row!r} is not valid; choose from {', '.join(ROWS)}")
        _check_int("repeats", self.repeats, 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("calibration_rows", self.calibration_rows, 1)
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(
                f"weight_bits={self.weight_bits!r} is invalid; choose from {', '.join(map(str, WEIGHT_BITS))}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is invalid; choose from {', '.join(KERNELS)}")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ValueError(f"compile_mode={self.compile_mode!r} is invalid; choose from {', '.join(modes)}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict={self.strict!r} is invalid; expected True or False")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid; choose from {', '.join(DTYPES)}")
        self.torch_device()

    def torch_device(self) -> torch.device:
        """The device to run on; asking for CUDA without one is an error (no CUDA call on CPU runs)."""
        try:
            device = torch.device(self.device) if self.device else None
        except RuntimeError as err:
            raise ValueError(f"device={self.device!r} is not a torch device ({err})") from None
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not supported; use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} requested but CUDA is not available")
        return device

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.float16 if self.torch_device().type == "cuda" else torch.float32

    def ordered_rows(self) -> list[str]:
        """The selected rows in run order (duplicates dropped)."""
        return [row for row in ROWS if row in self.rows]

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
