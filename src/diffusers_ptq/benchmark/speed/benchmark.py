"""The speed benchmark: per-step UNet latency and peak memory of float, fake-quant, int8 and other libraries.

For each model every selected row is built (`rows.py`), called once (torch.compile compiles here; not
timed), `warmup` more times, then `repeats` timed times, cycling through timesteps spread over [0, 1000)
so a timestep-dependent path that recompiled or fell off its fast path would show. The first call's output
is checked against the float model's (`check.py`): a row with a wrong output is an error, not a fast row.
A row whose optional library is missing is skipped with the reason and its install command; a row that
raises (compile unsupported, out of memory, a library bug...) or fails the output check is recorded as an
error and the run goes on; with `strict` (`--strict`, for CI) any error then fails the run
(`SpeedRowError`). Ratios are to the model's float row.
"""

from __future__ import annotations

import gc
import importlib.metadata
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffusers_ptq.benchmark.speed.check import RowOutputError, check_output, reference_output
from diffusers_ptq.benchmark.speed.measure import (
    device_name,
    peak_memory,
    time_call,
    time_calls,
)
from diffusers_ptq.benchmark.speed.models import SpeedModel, speed_models, spread_timesteps
from diffusers_ptq.benchmark.speed.rows import COMPILED, LABELS, PREPARE, RowContext, RowSkipped
from diffusers_ptq.benchmark.speed.settings import SpeedSettings

TIMESTEPS = 10  # distinct timesteps the calls cycle through
LIBRARIES = ("torch", "diffusers", "torchao", "optimum-quanto")


@dataclass
class SpeedRow:
    id: str
    label: str
    status: str = "skipped"  # "ok" | "skipped" (optional library missing) | "error" (raised, wrong output)
    reason: str | None = None
    output_sqnr_db: float | None = None  # first call's output against the float model's (check.py)
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # includes torch.compile's compilation for compiled rows
    setup_s: float | None = None  # building the row (the first row needing calibration also calibrates)
    weight_bytes: int | None = None
    peak_bytes: int | None = None
    peak_kind: str = ""
    speedup: float | None = None  # float median / this median
    memory_ratio: float | None = None  # this peak / float peak
    weight_ratio: float | None = None  # this weight bytes / float weight bytes
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error(self) -> bool:
        return self.status == "error"


@dataclass
class ModelResult:
    name: str
    description: str
    parameters: int | None
    inputs: dict[str, list[int]]
    rows: list[SpeedRow]
    notes: list[str] = field(default_factory=list)


@dataclass
class SpeedResult:
    settings: SpeedSettings
    device: str
    device_type: str
    dtype: str
    libraries: dict[str, str | None]
    models: list[ModelResult]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["settings"] = self.settings.to_dict()
        return out

    def errors(self) -> list[str]:
        """'model: row label: reason' for every row recorded as an error."""
        return [f"{m.name}: {r.label}: {r.reason}" for m in self.models for r in m.rows if r.error]


class SpeedRowError(RuntimeError):
    """A strict run with rows in error; `result` holds the whole run (the errors included)."""

    def __init__(self, result: SpeedResult) -> None:
        self.result = result
        errors = result.errors()
        super().__init__(f"{len(errors)} row(s) in error: " + "; ".join(errors))


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _free(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratios(rows: list[SpeedRow]) -> None:
    base = next((r for r in rows if r.id == "float" and r.ok), None)
    if base is None:
        return
    for row in rows:
        if not row.ok:
            continue
        row.speedup = base.median_ms / row.median_ms if row.median_ms else None
        if base.peak_bytes and row.peak_bytes is not None:
            row.memory_ratio = row.peak_bytes / base.peak_bytes
        if base.weight_bytes and row.weight_bytes is not None:
            row.weight_ratio = row.weight_bytes / base.weight_bytes


def _run_row(
    row: SpeedRow,
    ctx: RowContext,
    inputs: list[dict[str, torch.Tensor]],
    settings: SpeedSettings,
    reference: torch.Tensor,
) -> None:
    start = time.perf_counter()
    prepared = PREPARE[row.id](ctx)
    row.setup_s = round(time.perf_counter() - start, 2)
    row.weight_bytes, row.notes = prepared.weight_bytes, prepared.notes
    module = prepared.module

    def step(kwargs: dict[str, torch.Tensor]) -> Any:
        return module(**kwargs)

    first: list[Any] = []
    with torch.no_grad():
        row.first_call_s = round(
            time_call(lambda kwargs: first.append(step(kwargs)), inputs[0], ctx.device), 3
        )
    row.output_sqnr_db = check_output(row.id, settings, first.pop(), reference)
    with peak_memory(ctx.device) as peak:
        timing = time_calls(step, inputs[1:] or inputs, ctx.device, settings.warmup, settings.repeats)
    for name, value in timing.summary_ms().items():
        setattr(row, name, round(value, 3))
    row.times_ms = [round(t * 1000, 3) for t in timing.times_s]
    row.peak_bytes, row.peak_kind = peak.bytes, peak.kind
    row.status = "ok"


def run_model(
    model: SpeedModel,
    settings: SpeedSettings,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> ModelResult:
    """Every selected row on one model; never raises for a row that fails (it is recorded with the reason)."""
    order = settings.ordered_rows()
    dtype_name = str(dtype).removeprefix("torch.")
    bits = f"W{settings.weight_bits}A8"
    rows = [SpeedRow(r, LABELS[r].format(dtype=dtype_name, bits=bits)) for r in order]
    try:
        float_unet = model.build()
    except Exception as err:  # e.g. the shipped weights missing: every row of this model is skipped
        for row in rows:
            row.reason = f"model could not be built: {_short(err)}"
        log(f"[{model.name}] skipped: {rows[0].reason}")
        return ModelResult(model.name, model.description, None, {}, rows)
    result = ModelResult(
        model.name,
        model.description,
        sum(p.numel() for p in float_unet.parameters()),
        model.input_shapes(float_unet),
        rows,
    )
    timesteps = spread_timesteps(TIMESTEPS).tolist()
    inputs = model.step_inputs(float_unet, timesteps, device, dtype)
    ctx = RowContext(model, float_unet, settings, device, dtype)
    try:
        with torch.no_grad():
            reference = reference_output(ctx.float_model()(**inputs[0]))
    except Exception as err:  # no reference: no row's output can be checked, so none is timed
        for row in rows:
            row.status, row.reason = "error", f"float reference output failed: {_short(err)}"
        log(f"[{model.name}] error: {rows[0].reason}")
        return result
    for i, row in enumerate(rows):
        try:
            _run_row(row, ctx, inputs, settings, reference)
        except RowSkipped as err:
            row.reason = str(err)
        except RowOutputError as err:  # fast but wrong: an error, never a result
            row.status, row.reason = "error", f"wrong output: {err}"
        except Exception as err:  # compile unsupported, out of memory, a library bug: keep going
            row.status, row.reason = "error", f"failed: {_short(err)}"
            if settings.verbose_errors:
                traceback.print_exc()
        finally:
            ctx.release(order[i + 1 :])
            _free(device, row.id in COMPILED)
        if row.ok:
            log(f"[{model.name}] {row.label}: median {row.median_ms:.2f} ms")
        else:
            log(f"[{model.name}] {row.label}: {row.status} ({row.reason})")
    _ratios(rows)
    return result


def run_speed_benchmark(
    settings: SpeedSettings,
    models: list[SpeedModel] | None = None,
    log: Callable[[str], None] = print,
) -> SpeedResult:
    """All models x rows; `models` overrides the ones `settings.models` names (e.g. for tests).

    Raises SpeedRowError after the run when `settings.strict` and a row is in error (raised or wrong output).
    """
    settings.validate()
    device, dtype = settings.torch_device(), settings.torch_dtype()
    if models is None:
        models = speed_models(settings.models, settings.batch_size)
    start = time.perf_counter()
    result = SpeedResult(
        settings=settings,
        device=device_name(device),
        device_type=device.type,
        dtype=str(dtype).removeprefix("torch."),
        libraries=library_versions(),
        models=[],
    )
    for model in models:
        result.models.append(run_model(model, settings, device, dtype, log))
    result.seconds = round(time.perf_counter() - start, 1)
    if settings.strict and result.errors():
        raise SpeedRowError(result)
    return result
