"""The weight and activation quantizer sections of PTQConfig: `WeightQuantConfig`, `ActivationQuantConfig`.

Imported through `diffusers_ptq.config`, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_ptq.config_fields import _check_bool, _check_choice, _check_float, _check_int, _fail, _field

SCALE_SEARCHES = ("minmax", "mse", "percentile")
GRANULARITIES = ("auto", "per_channel", "per_tensor", "per_group")
GROUP_SIZES = (32, 64, 128, 256, 512)
# 'auto' weight scales: groups of `group_size` inputs at this many bits or fewer, per channel above. Groups
# of 64 measured better than per-channel scales at W4A8 on the colour model and tied on the shipped one, and
# tied at W6A6 (shipped model) and W8A8 (colour model) (BENCHMARKS.md §8), where they would cost checkpoint
# size and the CPU's int8 GEMM for nothing.
AUTO_GROUP_MAX_BITS = 4
WEIGHT_ROUNDINGS = ("nearest", "gptq")


def _check_search(path: str, cfg: WeightQuantConfig | ActivationQuantConfig) -> None:
    _check_choice(f"{path}.scale_search", cfg.scale_search, SCALE_SEARCHES)
    _check_float(f"{path}.lp_norm", cfg.lp_norm, 0.0, 10.0, open_lo=True)
    _check_int(f"{path}.num_candidates", cfg.num_candidates, 1, 1000)
    _check_float(f"{path}.percentile", cfg.percentile, 50.0, 100.0, open_lo=True)


@dataclass
class WeightQuantConfig:
    """How weights are quantized."""

    bits: int = _field(8, "weight bit width, 2-8")
    granularity: str = _field(
        "auto",
        "one scale per output channel, one per tensor, or one per group of `group_size` inputs of each "
        "output channel; 'auto' (default): per group for layers at 4 bits or fewer, per channel above",
        GRANULARITIES,
    )
    group_size: int = _field(
        64,
        "'per_group' (and 'auto' at <= 4 bits): inputs per scale, contiguous along K in the integer "
        "kernels' order ((kh, kw, C_in) for a conv); under 'auto' a layer whose K it does not divide gets "
        "the largest divisor of K in [group_size / 2, group_size], or per-channel scales",
        GROUP_SIZES,
    )
    strict_groups: bool = _field(
        False,
        "'per_group': raise instead of falling back to per-channel scales (with one warning listing them) "
        "for layers whose input size K is not a multiple of group_size ('auto' picks a size near it)",
    )
    symmetric: bool = _field(True, "signed range with zero-point 0 (True) or an affine range (False)")
    scale_search: str = _field("mse", "how the clipping range is chosen", SCALE_SEARCHES)
    lp_norm: float = _field(2.4, "p of the |x - Q(x)|^p error minimised by the 'mse' search")
    num_candidates: int = _field(100, "'mse' search: candidate ranges min/max * (1 - 0.01 i), i < this")
    percentile: float = _field(99.99, "'percentile' search: clip at this percentile of the values")
    rounding: str = _field(
        "gptq",
        "'gptq' (default): second-order rounding (GPTQ) on the calibration inputs, layer by layer; "
        "'nearest': round each weight to its nearest code (the published presets; no calibration data)",
        WEIGHT_ROUNDINGS,
    )
    gptq_damp: float = _field(0.01, "gptq: added to H's diagonal, as a fraction of its mean diagonal")
    gptq_act_order: bool = _field(False, "gptq: quantize columns in order of decreasing H diagonal")
    gptq_block_size: int = _field(128, "gptq: columns per lazy-batch block update")

    def granularity_in_effect(self, bits: int | None = None) -> str:
        """`granularity` with 'auto' resolved for `bits` (default: this section's; a layer's own bit width
        may differ, e.g. 8-bit special layers)."""
        if self.granularity != "auto":
            return self.granularity
        bits = self.bits if bits is None else bits
        return "per_group" if bits <= AUTO_GROUP_MAX_BITS else "per_channel"

    def describe_scales(self) -> str:
        """'per_channel', 'per_tensor' or 'group 64', with '(auto)' when 'auto' chose it."""
        kind = self.granularity_in_effect()
        text = f"group {self.group_size}" if kind == "per_group" else kind
        return f"{text} (auto)" if self.granularity == "auto" else text

    def validate(self, path: str = "weights") -> None:
        _check_int(f"{path}.bits", self.bits, 2, 8)
        _check_choice(f"{path}.granularity", self.granularity, GRANULARITIES)
        size = self.group_size
        if not isinstance(size, int) or isinstance(size, bool) or size not in GROUP_SIZES:
            _fail(f"{path}.group_size", size, "one of " + ", ".join(map(str, GROUP_SIZES)))
        _check_bool(f"{path}.strict_groups", self.strict_groups)
        _check_bool(f"{path}.symmetric", self.symmetric)
        _check_search(path, self)
        _check_choice(f"{path}.rounding", self.rounding, WEIGHT_ROUNDINGS)
        _check_float(f"{path}.gptq_damp", self.gptq_damp, 0.0, 1.0)
        _check_bool(f"{path}.gptq_act_order", self.gptq_act_order)
        _check_int(f"{path}.gptq_block_size", self.gptq_block_size, 1)


@dataclass
class ActivationQuantConfig:
    """How layer inputs (and attention matmul operands) are quantized."""

    bits: int | None = _field(8, "activation bit width, 2-16, or None for weight-only quantization")
    symmetric: bool = _field(False, "signed range with zero-point 0 (True) or an affine range (False)")
    scale_search: str = _field("mse", "how each clipping range is chosen", SCALE_SEARCHES)
    lp_norm: float = _field(2.4, "p of the |x - Q(x)|^p error minimised by the 'mse' search")
    num_candidates: int = _field(100, "'mse' search: candidate ranges min/max * (1 - 0.01 i), i < this")
    percentile: float = _field(99.99, "'percentile' search: clip at this percentile of the values")
    timestep_groups: int | str = _field(
        1,
        "1: one scale for all timesteps; G > 1: G contiguous groups over the training timesteps; "
        "'per_step': one group per sampling step of the calibration schedule",
    )
    quantize_attention: bool = _field(True, "quantize q, k, v and the softmax output of attention matmuls")
    softmax_bits: int = _field(8, "bits of the (unsigned) softmax output; 16 leaves it effectively float")
    observer_samples: int = _field(
        8192, "values kept per quantizer and timestep group (random subsample) for the scale search"
    )

    def validate(self, path: str = "activations") -> None:
        if self.bits is not None:
            _check_int(f"{path}.bits", self.bits, 2, 16)
        _check_bool(f"{path}.symmetric", self.symmetric)
        _check_search(path, self)
        groups = self.timestep_groups
        if groups != "per_step":
            ok = isinstance(groups, int) and not isinstance(groups, bool) and 1 <= groups <= 1000
            if not ok:
                _fail(f"{path}.timestep_groups", groups, "an integer in [1, 1000] or 'per_step'")
        _check_bool(f"{path}.quantize_attention", self.quantize_attention)
        _check_int(f"{path}.softmax_bits", self.softmax_bits, 2, 16)
        _check_int(f"{path}.observer_samples", self.observer_samples, 16)

    @property
    def enabled(self) -> bool:
        return self.bits is not None
