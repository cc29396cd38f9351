"""ReconstructionConfig: how block reconstruction optimises weight rounding and activation step sizes.

Every field carries `help` metadata and, where the value is one of a set, `choices`. `validate()` raises
ValueError naming the field, the bad value and what is allowed. Defaults are BRECQ / Q-Diffusion's
published values (docs/methods.md, "Block reconstruction"); the method presets override them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from typing import Any

from diffusers_ptq.config_fields import _check_bool, _check_choice, _check_float, _check_int, _field

OPTIMIZATIONS = ("sequential", "joint")
WEIGHT_ROUNDINGS = ("adaround", "nearest")
LR_SCHEDULES = ("constant", "cosine")
TRANSFORMER_UNITS = ("block", "model")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
OFFLOADS = ("none", "cpu")
BATCH_SAMPLINGS = ("random", "stratified")
_DEVICE = re.compile(r"^[a-z]+(:[0-9]+)?$")


@dataclass
class ReconstructionConfig:
    """Block reconstruction (BRECQ / AdaRound, EDA-DM fine-grained blocks, TFMQ-DM temporal block)."""

    enabled: bool = _field(
        False,
        "run block reconstruction after calibration inside quantize_pipeline / quantize_unet "
        "(reconstruct() called directly always runs)",
    )
    optimization: str = _field(
        "sequential",
        "'sequential': AdaRound over all blocks with activations float, then a second pass learning "
        "activation step sizes (BRECQ / Q-Diffusion code); 'joint': rounding and step sizes together in one "
        "pass (EDA-DM FBR, QDrop)",
        OPTIMIZATIONS,
    )
    weight_rounding: str = _field(
        "adaround",
        "'adaround': learn each weight's up/down rounding; 'nearest': keep round-to-nearest",
        WEIGHT_ROUNDINGS,
    )
    learn_act_scales: bool = _field(
        True, "learn activation step sizes LSQ-style (each timestep group's scale from its own samples)"
    )
    iterations: int = _field(
        20000, "optimiser steps per block: the AdaRound pass ('sequential') or the joint pass"
    )
    act_iterations: int = _field(5000, "'sequential': optimiser steps per block of the activation pass")
    batch_size: int = _field(32, "calibration rows per optimiser step")
    batch_sampling: str = _field(
        "random",
        "how a mini-batch is drawn: 'random' (batch_size rows without replacement, BRECQ) or 'stratified' "
        "(one row from each of batch_size contiguous slices of the recorded rows, so every batch spans the "
        "schedule); under torch.distributed 'stratified' gives every rank the same share of every batch",
        BATCH_SAMPLINGS,
    )
    weight_lr: float = _field(1e-3, "Adam learning rate of the AdaRound variables V")
    act_lr: float = _field(4e-4, "Adam learning rate of the activation step sizes")
    weight_lr_schedule: str = _field(
        "constant", "learning-rate schedule of V: 'constant' or 'cosine' decay to 0", LR_SCHEDULES
    )
    act_lr_schedule: str = _field(
        "cosine", "learning-rate schedule of the step sizes: 'constant' or 'cosine' decay to 0", LR_SCHEDULES
    )
    round_weight: float = _field(
        0.01, "lambda of the AdaRound regulariser sum(1 - |2h(V) - 1|^beta); 0 disables it"
    )
    beta_start: float = _field(
        20.0, "regulariser exponent beta at the end of the warm-up (annealed linearly)"
    )
    beta_end: float = _field(2.0, "regulariser exponent beta at the last iteration")
    warmup: float = _field(0.2, "fraction of the AdaRound iterations before the regulariser switches on")
    loss_p: float = _field(
        2.0,
        "p of the reconstruction error |B_q - B_fp|^p (summed over channels, averaged over batch and "
        "positions) of the AdaRound / joint pass; 2 = MSE",
    )
    act_loss_p: float = _field(
        2.0, "p of the reconstruction error in the 'sequential' activation pass (Q-Diffusion's code: 2.4)"
    )
    layer_loss_weight: float = _field(
        0.0, "EDA-DM FBR gamma: weight of the inner layers' output errors added to the block loss; 0 = BRECQ"
    )
    qdrop_prob: float = _field(
        0.0, "QDrop: probability that an activation element is left unquantized while training (EDA-DM: 0.5)"
    )
    temporal_block: bool = _field(
        False,
        "TFMQ-DM: reconstruct the time embedding and every ResNet time projection first, as one block "
        "whose loss is the error of all per-block time features",
    )
    transformer_unit: str = _field(
        "block",
        "reconstruction unit of transformers: each BasicTransformerBlock ('block', with proj_in/"
        "proj_out layer by layer, as Q-Diffusion) or the whole Transformer2DModel ('model')",
        TRANSFORMER_UNITS,
    )
    num_samples: int | None = _field(
        None, "calibration rows used for reconstruction (a seeded random subset); None: all of them"
    )
    cache_dtype: str = _field(
        "float16", "dtype of the block input/target cache held on the CPU", CACHE_DTYPES
    )
    cache_batch_size: int = _field(16, "rows per UNet forward while building a block's cache")
    cache_max_gb: float | None = _field(
        None,
        "RAM budget of one unit's block cache in GiB: a cache estimated larger (one probe row's bytes times "
        "the rows) is written to memory-mapped safetensors files in cache_dir and read back per mini-batch "
        "(identical results); 0 spills every cache; None: always in RAM",
    )
    cache_dir: str | None = _field(
        None,
        "folder for spilled caches (a temporary subfolder, deleted afterwards, also on failure); None with "
        "cache_max_gb set: the system temporary folder (tempfile.gettempdir())",
    )
    offload: str = _field(
        "none",
        "'cpu': the UNet stays in CPU memory (caches are built there) and only the unit being trained moves "
        "to offload_device, so peak device memory is one unit; 'none': everything where the UNet is",
        OFFLOADS,
    )
    offload_device: str | None = _field(
        None, "device units train on with offload='cpu'; None: 'cuda' when available, else the CPU"
    )
    max_minutes: float | None = _field(
        None,
        "time budget of the whole call: each block's iteration count is set before it trains so that the "
        "remaining blocks share the remaining time in proportion to their configured iterations, and its "
        "schedules are laid over that count; None: no budget",
    )
    holdout: float = _field(
        0.2,
        "share of each unit's cached rows held out of its training (at most 64): the unit keeps what it "
        "learned only if its block loss on them went down, else it reverts to its starting point",
    )
    sampling_check: int = _field(
        8,
        "quantize_pipeline only: samples the pipeline draws from fresh noise with the float UNet, the UNet "
        "before the run and after it; the whole run is undone if its final outputs are further from the "
        "float ones (mean squared error, or the error's mean over the samples). 0: off (also with a "
        "calibration_fn, and in quantize_unet, which has no pipeline)",
    )
    seed: int = _field(0, "seed of the row subset, the mini-batches and the QDrop masks")

    def validate(self, path: str = "reconstruction") -> None:
        _check_bool(f"{path}.enabled", self.enabled)
        _check_choice(f"{path}.optimization", self.optimization, OPTIMIZATIONS)
        _check_choice(f"{path}.weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        _check_bool(f"{path}.learn_act_scales", self.learn_act_scales)
        _check_int(f"{path}.iterations", self.iterations, 0)
        _check_int(f"{path}.act_iterations", self.act_iterations, 0)
        _check_int(f"{path}.batch_size", self.batch_size, 1)
        _check_choice(f"{path}.batch_sampling", self.batch_sampling, BATCH_SAMPLINGS)
        _check_float(f"{path}.weight_lr", self.weight_lr, 0.0, 1e3, open_lo=True)
        _check_float(f"{path}.act_lr", self.act_lr, 0.0, 1e3, open_lo=True)
        _check_choice(f"{path}.weight_lr_schedule", self.weight_lr_schedule, LR_SCHEDULES)
        _check_choice(f"{path}.act_lr_schedule", self.act_lr_schedule, LR_SCHEDULES)
        _check_float(f"{path}.round_weight", self.round_weight, 0.0, 1e6)
        _check_float(f"{path}.beta_start", self.beta_start, 0.0, 1e3, open_lo=True)
        _check_float(f"{path}.beta_end", self.beta_end, 0.0, 1e3, open_lo=True)
        _check_float(f"{path}.warmup", self.warmup, 0.0, 1.0)
        _check_float(f"{path}.loss_p", self.loss_p, 0.0, 10.0, open_lo=True)
        _check_float(f"{path}.act_loss_p", self.act_loss_p, 0.0, 10.0, open_lo=True)
        _check_float(f"{path}.layer_loss_weight", self.layer_loss_weight, 0.0, 1e6)
        _check_float(f"{path}.qdrop_prob", self.qdrop_prob, 0.0, 1.0)
        _check_bool(f"{path}.temporal_block", self.temporal_block)
        _check_choice(f"{path}.transformer_unit", self.transformer_unit, TRANSFORMER_UNITS)
        if self.num_samples is not None:
            _check_int(f"{path}.num_samples", self.num_samples, 1)
        _check_choice(f"{path}.cache_dtype", self.cache_dtype, CACHE_DTYPES)
        _check_int(f"{path}.cache_batch_size", self.cache_batch_size, 1)
        if self.cache_max_gb is not None:
            _check_float(f"{path}.cache_max_gb", self.cache_max_gb, 0.0, 1e6)
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, str) or not self.cache_dir:
                raise ValueError(
                    f"{path}.cache_dir={self.cache_dir!r} is invalid; expected a folder path or None."
                )
            if self.cache_max_gb is None:
                raise ValueError(
                    f"{path}.cache_dir={self.cache_dir!r} is set but {path}.cache_max_gb is None (every "
                    "cache stays in RAM); set cache_max_gb, the RAM budget above which a unit's cache "
                    "spills there"
                )
        _check_choice(f"{path}.offload", self.offload, OFFLOADS)
        if self.offload_device is not None and not (
            isinstance(self.offload_device, str) and _DEVICE.match(self.offload_device)
        ):
            raise ValueError(
                f"{path}.offload_device={self.offload_device!r} is invalid; expected None or a device "
                "such as 'cuda', 'cuda:1' or 'cpu'."
            )
        if self.max_minutes is not None:
            _check_float(f"{path}.max_minutes", self.max_minutes, 0.0, 1e7, open_lo=True)
        _check_float(f"{path}.holdout", self.holdout, 0.0, 0.5, open_lo=True)
        _check_int(f"{path}.sampling_check", self.sampling_check, 0)
        _check_int(f"{path}.seed", self.seed, 0)
        if self.weight_rounding == "nearest" and not self.learn_act_scales:
            raise ValueError(
                f"{path}: weight_rounding='nearest' with learn_act_scales=False leaves nothing to "
                "reconstruct; set weight_rounding='adaround' or learn_act_scales=True"
            )

    @property
    def learns_rounding(self) -> bool:
        return self.weight_rounding == "adaround"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionConfig:
        if not isinstance(data, dict):
            raise TypeError(f"ReconstructionConfig.from_dict expects a dict, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown ReconstructionConfig key(s) {unknown}; valid keys: {names}")
        config = cls(**data)
        config.validate()
        return config

    def replace(self, **overrides: Any) -> ReconstructionConfig:
        """A validated copy with `overrides` applied (unknown names are errors)."""
        return ReconstructionConfig.from_dict({**self.to_dict(), **overrides})
