"""The 'w4' study: each 4-bit-weight part switched on over one base, on paired noise.

Base: nearest rounding, per-channel weight scales, one activation scale (G = 1), special layers at 8 bits,
no bias correction and no mixed precision (pinned in `BASE`; everything else as `PTQConfig` has it), block
reconstruction off, calibrated on the run's DDIM steps. Rows switch on, one at a time or in the pairs the
question needs: second-order rounding (GPTQ), group-wise weight scales (128, 64 inputs per scale, on GPTQ),
timestep-aware bias correction (`layer` tables, PTQD-style `output`), and timestep groups (G = 8 contiguous
groups without search, per-step scales) with and without `layer` or `output` correction: whether timestep
groups pay once the bias is corrected. Two rows keep layers off the 4-bit grid on top of GPTQ + `layer`
correction: the special layers (conv_in, conv_out, time embeddings) float, or the two layers the sensitivity
pass ranks worst (`layers.mixed_precision`, float), the model-agnostic form of the same idea; more rows
combine that with `output` correction, groups of 64 (two and four float layers) and a short reconstruction;
more take the default's near group sizes (`auto`) with four float layers at every bit width (the default
before `max_layers="auto"`), chosen greedily on the quantized UNet, with five (the default at 4-bit
weights), ranked by the noise bias instead of the noise MSE, with the short reconstruction, or with every
activation range at its observed min / max instead of the 'mse' search.
The last rows are the default recipe itself, whatever it is when the study runs: once calibrated on
'staggered' steps (the same samples from ten times as many trajectories), then as shipped.
"""

from __future__ import annotations

from typing import Any

from diffusers_ptq.config import PTQConfig

# The parts the rows vary, pinned so that the base stays the same when the default recipe changes.
BASE: dict[str, dict[str, Any]] = {
    "weights": {"rounding": "nearest", "granularity": "per_channel"},
    "activations": {"timestep_groups": 1},
    "layers": {"special_layers": "8bit", "mixed_precision": {"mode": "off"}},
}
GPTQ: dict[str, Any] = {"rounding": "gptq"}
# The default's weights: GPTQ, groups of 64, near group sizes where 64 does not divide a layer's input size.
GPTQ_AUTO_64: dict[str, Any] = {**GPTQ, "granularity": "auto", "group_size": 64}
G8: dict[str, Any] = {"timestep_groups": 8}
# The two layers whose quantization alone hurts the noise prediction most stay float.
MIXED_2: dict[str, Any] = {"mode": "max_layers", "max_layers": 2, "high_bits": None}
MIXED_4: dict[str, Any] = {"mode": "max_layers", "max_layers": 4, "high_bits": None}
MIXED_4_GREEDY: dict[str, Any] = {**MIXED_4, "selection": "greedy"}
MIXED_5: dict[str, Any] = {**MIXED_4, "max_layers": 5}
MIXED_4_BY_BIAS: dict[str, Any] = {**MIXED_4, "metric": "bias"}
RECON_5MIN: dict[str, Any] = {"enabled": True, "max_minutes": 5.0}
DEFAULT_LABEL = "default recipe"
# Row label -> overrides of the base recipe (weights / activations sections and bias_correction).
VARIANTS: dict[str, dict[str, Any]] = {
    "nearest": {},
    "gptq": {"weights": GPTQ},
    "gptq group 128": {"weights": {**GPTQ, "granularity": "per_group", "group_size": 128}},
    "gptq group 64": {"weights": {**GPTQ, "granularity": "per_group", "group_size": 64}},
    "gptq bias=layer": {"weights": GPTQ, "bias_correction": "layer"},
    "gptq bias=output": {"weights": GPTQ, "bias_correction": "output"},
    "gptq G=8": {"weights": GPTQ, "activations": G8},
    "gptq G=8 bias=layer": {"weights": GPTQ, "activations": G8, "bias_correction": "layer"},
    "gptq per-step": {"weights": GPTQ, "activations": {"timestep_groups": "per_step"}},
    "gptq per-step bias=layer": {
        "weights": GPTQ,
        "activations": {"timestep_groups": "per_step"},
        "bias_correction": "layer",
    },
    "gptq G=8 bias=output": {"weights": GPTQ, "activations": G8, "bias_correction": "output"},
    "gptq per-step bias=output": {
        "weights": GPTQ,
        "activations": {"timestep_groups": "per_step"},
        "bias_correction": "output",
    },
    "gptq bias=layer special=float": {
        "weights": GPTQ,
        "bias_correction": "layer",
        "layers": {"special_layers": "float"},
    },
    "gptq bias=layer mixed=2": {
        "weights": GPTQ,
        "bias_correction": "layer",
        "layers": {"mixed_precision": MIXED_2},
    },
    "gptq bias=output mixed=2": {
        "weights": GPTQ,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_2},
    },
    "gptq bias=output mixed=4": {
        "weights": GPTQ,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4},
    },
    # The combined recipe plus a block reconstruction capped at 5 minutes that starts from the GPTQ codes
    # (its AdaRound schedule is laid over the iterations the cap leaves, so it ends with binary rounding).
    "gptq bias=output mixed=2 recon=5min": {
        "weights": GPTQ,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_2},
        "reconstruction": RECON_5MIN,
    },
    "gptq group 64 bias=output mixed=2": {
        "weights": {**GPTQ, "granularity": "per_group", "group_size": 64},
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_2},
    },
    "gptq group 64 bias=output mixed=4": {
        "weights": {**GPTQ, "granularity": "per_group", "group_size": 64},
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4},
    },
    # The default recipe before `max_layers="auto"`: near group sizes (`auto`), four float layers at every
    # bit width (since, the default keeps five at 4-bit weights: the `mixed=5` row).
    "gptq auto bias=output mixed=4": {
        "weights": GPTQ_AUTO_64,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4},
    },
    # Near group sizes (`auto`) and the four float layers chosen greedily on the quantized UNet.
    "gptq auto bias=output mixed=4 greedy": {
        "weights": GPTQ_AUTO_64,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4_GREEDY},
    },
    # Five float layers at every bit width (the default at 4-bit weights).
    "gptq auto bias=output mixed=5": {
        "weights": GPTQ_AUTO_64,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_5},
    },
    # The four-float-layer default with its layers ranked by the noise bias instead of the noise MSE.
    "gptq auto bias=output mixed=4 metric=bias": {
        "weights": GPTQ_AUTO_64,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4_BY_BIAS},
    },
    # The four-float-layer default with every activation range at its observed min / max (no clipping search).
    "gptq auto bias=output mixed=4 acts=minmax": {
        "weights": GPTQ_AUTO_64,
        "activations": {"scale_search": "minmax"},
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4},
    },
    # The four-float-layer default plus the capped reconstruction, from its GPTQ codes.
    "gptq auto bias=output mixed=4 recon=5min": {
        "weights": GPTQ_AUTO_64,
        "bias_correction": "output",
        "layers": {"mixed_precision": MIXED_4},
        "reconstruction": RECON_5MIN,
    },
}
# The default recipe with another calibration layout: row label -> calibration overrides. 'staggered' with
# interval 10 records the same number of samples, every step about as often, from ~10x the trajectories
# (256 samples at DDIM 100: 26 noise draws instead of the 3 of the default's 'uniform' every step).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    f"{DEFAULT_LABEL} staggered=10": {"sampler": "staggered", "step_interval": 10},
}
W4_ROWS = (*VARIANTS, *DEFAULT_VARIANTS, DEFAULT_LABEL)


def w4_recipe(
    label: str,
    w: int,
    a: int,
    num_inference_steps: int,
    num_samples: int | None,
    reconstruction_minutes: float | None = None,
    calibration_seed: int = 0,
) -> PTQConfig:
    """The recipe of row `label` at W`w`A`a`; ValueError naming the valid labels for an unknown one.
    `reconstruction_minutes` replaces the cap of the rows that reconstruct; every row calibrates on the
    draw of `calibration_seed`."""
    if label not in W4_ROWS:
        raise ValueError(f"w4 row {label!r} is not valid; expected one of {', '.join(W4_ROWS)}")
    calibration: dict[str, Any] = {"num_inference_steps": num_inference_steps, "seed": calibration_seed}
    if num_samples is not None:
        calibration["num_samples"] = num_samples
    if label == DEFAULT_LABEL:
        return PTQConfig(weight_bits=w, act_bits=a, calibration=calibration)
    if label in DEFAULT_VARIANTS:
        return PTQConfig(weight_bits=w, act_bits=a, calibration={**calibration, **DEFAULT_VARIANTS[label]})
    variant = VARIANTS[label]
    return PTQConfig(
        weight_bits=w,
        act_bits=a,
        method="ablation-w4",
        weights={**BASE["weights"], **variant.get("weights", {})},
        activations={**BASE["activations"], **variant.get("activations", {})},
        layers={**BASE["layers"], **variant.get("layers", {})},
        calibration=calibration,
        reconstruction=_reconstruction(variant, reconstruction_minutes),
        bias_correction=variant.get("bias_correction", "off"),
    )


def _reconstruction(variant: dict[str, Any], minutes: float | None) -> dict[str, Any]:
    recon = variant.get("reconstruction")
    if recon is None:
        return {"enabled": False}
    return recon if minutes is None else {**recon, "max_minutes": float(minutes)}


def describe_recipe(config: PTQConfig) -> list[str]:
    """The table cells the study varies: rounding, weight scales, bias correction, timestep groups and
    the layers kept off the low-bit grid."""
    weights = config.weights
    scales = weights.describe_scales()
    groups = config.activations.timestep_groups
    return [
        weights.rounding,
        scales,
        config.bias_correction,
        "per-step" if groups == "per_step" else str(groups),
        _kept(config),
    ]


def _kept(config: PTQConfig) -> str:
    layers = config.layers
    special = f"special {layers.special_layers}"
    mixed = layers.mixed_precision
    return f"{special}; {mixed.describe(config.weights.bits)}" if mixed.enabled else special


def w4_notes(calibration_samples: int | None) -> list[str]:
    n = calibration_samples or PTQConfig().calibration.num_samples
    return [
        "Base recipe: nearest rounding, per-channel weight scales, G = 1, special layers at 8 bits, no bias "
        "correction or mixed precision, the rest as PTQConfig has it, block reconstruction off, "
        f"{n} calibration samples on the run's DDIM steps; each row switches on what its name says "
        "(GPTQ with damp 0.01, no act order; groups of 128 / 64 inputs per weight scale, layers whose input "
        "size is not a multiple keep per-channel scales; bias correction 'layer' = per-layer, per-group "
        "output-mean tables, 'output' = PTQD-style correction of the noise prediction; G = 8 contiguous "
        "timestep groups without search, per-step = one activation scale per sampling step; mixed=2 / 4 / "
        "5 = the two / four / five layers ranked most sensitive by noise MSE (each quantized alone) kept "
        "float, greedy = chosen greedily on the quantized UNet instead, metric=bias = ranked by the noise "
        "bias instead; recon=5min = block "
        "reconstruction (sequential AdaRound + activation step sizes, held-out safeguard) from the GPTQ "
        "codes, capped at 5 minutes; auto = the default's weight scales, groups of 64 or a near size at 4 "
        "bits; acts=minmax = every activation range at its observed min / max).",
        f"'{DEFAULT_LABEL}': PTQConfig(weight_bits, act_bits) as shipped, unchanged; "
        f"'{DEFAULT_LABEL} staggered=10': the same with calibration.sampler='staggered', step_interval 10 "
        "(every step about as often, the samples from ~10x as many trajectories).",
        "noise bias: per step, the RMS over (C, H, W) of the mean over samples of eps_q - eps, averaged over "
        "steps (the systematic error DDIM adds up; lower is better).",
    ]
