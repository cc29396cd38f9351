"""How much quantizing one unit (a layer or a group) on top of the float UNet moves its noise prediction.

Scales come from the real recipe's calibration (`install` + `initialise_*`, as `quantize_pipeline` does before
any search or reconstruction), computed once on a shared calibration set; every unit is then switched on
alone and its error against the float prediction accumulated per sampling step. In the other context
(`kept_float`), everything is quantized and each unit is switched *off* on top of the layers kept float:
the error that remains once the unit is float.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusers_ptq import distributed
from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.initialise import initialise_activations, initialise_weights, set_quant_state
from diffusers_ptq.nn import QuantAttnProcessor
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.prepare import QuantPlan, install
from diffusers_ptq.sensitivity.units import Unit
from diffusers_ptq.timestep import TimestepContext


@dataclass
class StepErrors:
    """Per sampling step (index into the calibration schedule) error statistics of one unit.

    `sse`: sum of squared errors; `signal`: sum of squared float predictions; `count`: rows; `bias`: RMS over
    elements of the per-element mean error over the step's rows, ||E_samples[eps_q - eps]||.
    """

    steps: list[int]
    sse: torch.Tensor
    signal: torch.Tensor
    count: torch.Tensor
    elements: int  # elements of one row's prediction
    bias: torch.Tensor

    @property
    def mse(self) -> torch.Tensor:
        return self.sse / (self.count * self.elements)

    @property
    def sqnr_db(self) -> torch.Tensor:
        return 10.0 * torch.log10(self.signal / self.sse)

    @property
    def total_mse(self) -> float:
        return float(self.sse.sum() / (self.count.sum() * self.elements))

    @property
    def total_sqnr_db(self) -> float:
        return float(10.0 * torch.log10(self.signal.sum() / self.sse.sum()))

    @property
    def mean_bias(self) -> float:
        return float(self.bias.mean())


@contextlib.contextmanager
def calibrated_probe(
    unet: nn.Module,
    plan: QuantPlan,
    config: PTQConfig,
    group_map: torch.Tensor,
    data: CalibrationSet,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[None]:
    """Install `plan` with calibrated scales for the body, then put the float UNet back exactly."""
    context = TimestepContext(data.num_train_timesteps)
    device = next(unet.parameters()).device
    patch = install(unet, plan, config, context, group_map.to(device))
    try:
        initialise_weights(unet, progress)
        initialise_activations(unet, data, batch_size, seed, progress)
        yield
    finally:
        patch.restore()


def _switches(unet: nn.Module, unit: Unit) -> list[QuantLayerMixin | QuantAttnProcessor]:
    """The quantized layers and attention processors of `unit` (ValueError for a name that has none)."""
    found: list[QuantLayerMixin | QuantAttnProcessor] = []
    for name in unit.layers:
        module = unet.get_submodule(name)
        if not isinstance(module, QuantLayerMixin):
            raise ValueError(f"unit {unit.name!r}: {name!r} is not a quantized layer")
        found.append(module)
    for name in unit.attentions:
        processor = getattr(unet.get_submodule(name), "processor", None)
        if not isinstance(processor, QuantAttnProcessor):
            raise ValueError(f"unit {unit.name!r}: attention {name!r} has no quantized processor")
        found.append(processor)
    return found


def enable_only(unet: nn.Module, unit: Unit | None, acts: bool) -> None:
    """Fake quantization off everywhere but in `unit` (None: off everywhere)."""
    set_quant_state(unet, weights=False, acts=False)
    if unit is not None:
        for module in _switches(unet, unit):
            module.set_quant_state(True, acts)


def enable_all_but(unet: nn.Module, units: list[Unit], acts: bool) -> None:
    """Fake quantization on everywhere but in `units`, which run float."""
    set_quant_state(unet, weights=True, acts=acts)
    for unit in units:
        for module in _switches(unet, unit):
            module.set_quant_state(False, False)


def even_rows(num_rows: int, count: int | None) -> torch.Tensor:
    """`count` row indices spread evenly over `num_rows` (all rows when count is None or larger)."""
    if count is None or count >= num_rows:
        return torch.arange(num_rows)
    return torch.linspace(0, num_rows - 1, count).round().long().unique()


def warn_if_bias_is_rms(data: CalibrationSet, rows: torch.Tensor, metric: str, rows_field: str) -> None:
    """Warn when most measured steps hold one row: a one-row step's 'bias' is that row's RMS error."""
    counts = torch.bincount(data.step_index[rows])
    counts = counts[counts > 0]
    single = int((counts == 1).sum())
    if 2 * single <= len(counts):
        return
    warnings.warn(
        f"{metric}='bias' is measured on {len(rows)} calibration rows over {len(counts)} sampling steps, "
        f"{single} of them with a single row: for such a step the bias (the norm of the mean error over "
        "the step's rows) is that row's RMS error, so the ranking is an error ranking with every step "
        f"weighted alike. For a bias, let each step hold several rows: raise {rows_field} (up to the "
        f"{len(data)} calibration rows) or record more trajectories per step (calibration.num_samples).",
        stacklevel=3,
    )


@torch.no_grad()
def measure_units(
    unet: nn.Module,
    data: CalibrationSet,
    units: list[Unit],
    *,
    acts: bool,
    rows: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    kept_float: list[Unit] | None = None,
) -> list[StepErrors]:
    """StepErrors of each unit, switched on alone, against the float prediction on `rows` of `data`.

    With `kept_float` (a list, possibly empty) the context is the quantized UNet instead: each unit's error
    is that of the UNet with every quantizer on but those of `kept_float` and of the unit itself.
    The UNet must carry calibrated quantizers (see `calibrated_probe`); quantization is left off afterwards.
    """
    rows = torch.arange(len(data)) if rows is None else rows
    if len(rows) == 0:
        raise ValueError("sensitivity needs at least one calibration row")
    param = next(unet.parameters())
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    present = data.step_index[rows].unique()
    slot = torch.full((data.num_steps,), -1, dtype=torch.long)
    slot[present] = torch.arange(len(present))
    # Under a process group each rank predicts a contiguous share of the batches and the sums are added
    # up (float64); with fewer batches than ranks every rank runs them all.
    world = distributed.world_size()
    split = 1 < world <= len(batches)
    if split:
        batches = [batches[i] for i in distributed.own_share(len(batches))]

    def predict() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in batches:
            out = unet(**data.unet_kwargs(index, param.device, param.dtype)).sample
            yield index, out.detach().double().cpu()

    def add_up(tensors: list[torch.Tensor], what: str, error: BaseException | None) -> None:
        if split:
            distributed.all_reduce_sum(tensors, f"sensitivity: {what}", error, torch.float64)
        elif error is not None:
            raise error

    enable_only(unet, None, acts)
    reference, error = [], None
    try:
        reference = [out for _, out in predict()]
    except Exception as err:
        error = err
    signal = torch.zeros(len(present), dtype=torch.float64)
    count = torch.zeros(len(present), dtype=torch.float64)
    for index, ref in zip(batches, reference):
        s = slot[data.step_index[index]]
        signal.index_add_(0, s, ref.pow(2).flatten(1).sum(1))
        count.index_add_(0, s, torch.ones(len(index), dtype=torch.float64))
    add_up([signal, count], "float predictions", error)
    elements = reference[0][0].numel()  # every rank has a batch (a split needs one per rank)

    results = []
    try:
        for unit in tqdm(units, desc="sensitivity", unit="unit", disable=not progress):
            if kept_float is None:
                enable_only(unet, unit, acts)
            else:
                enable_all_but(unet, [*kept_float, unit], acts)
            sse = torch.zeros(len(present), dtype=torch.float64)
            mean_error = torch.zeros(len(present), elements, dtype=torch.float64)
            error = None
            try:
                for (index, out), ref in zip(predict(), reference):
                    s = slot[data.step_index[index]]
                    err = (out - ref).flatten(1)
                    sse.index_add_(0, s, err.pow(2).sum(1))
                    mean_error.index_add_(0, s, err)
            except Exception as err:
                error = err
            add_up([sse, mean_error], unit.name, error)
            mean_error /= count[:, None]
            bias = mean_error.pow(2).mean(1).sqrt()
            results.append(StepErrors(present.tolist(), sse, signal, count, elements, bias))
    finally:
        enable_only(unet, None, acts)
    return results
