"""What `convert` did: which layers run on integer kernels, which kept fake quantization and why."""

from __future__ import annotations

from dataclasses import dataclass, field

FP16_BYTES = 2


@dataclass
class IntegerLayerInfo:
    """One layer that now runs on int8 kernels."""

    name: str
    kind: str  # "linear" | "conv1x1" | "conv3x3" ... (kernel size)
    weight_bits: int
    act_bits: int
    parts: int  # 2 for a shortcut-split conv
    split_for_saturation: bool  # W8 on a CPU without VNNI: two exact half-GEMMs
    code_bytes: int  # stored weight codes
    constant_bytes: int  # per-channel scale, correction (and zero point for affine weights)
    cache_bytes: int  # oneDNN's prepacked copy kept between calls (0 with low_memory or on int_mm)
    fp16_bytes: int  # the same weight in float16

    @property
    def ratio(self) -> float:
        """(codes + per-channel constants) / float16 weight bytes."""
        return (self.code_bytes + self.constant_bytes) / max(self.fp16_bytes, 1)


@dataclass
class ConversionReport:
    """Returned by `convert`; `str(report)` is a readable summary."""

    backend: str
    kernel: str
    integer: list[IntegerLayerInfo] = field(default_factory=list)
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason): fake quant kept
    attention: list[tuple[str, str]] = field(default_factory=list)  # (attention block, what runs)

    @property
    def code_bytes(self) -> int:
        return sum(i.code_bytes for i in self.integer)

    @property
    def constant_bytes(self) -> int:
        return sum(i.constant_bytes for i in self.integer)

    @property
    def cache_bytes(self) -> int:
        return sum(i.cache_bytes for i in self.integer)

    @property
    def fp16_bytes(self) -> int:
        return sum(i.fp16_bytes for i in self.integer)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "kernel": self.kernel,
            "integer": [dict(vars(i), ratio=i.ratio) for i in self.integer],
            "fallback": [{"layer": n, "reason": r} for n, r in self.fallback],
            "attention": [{"block": n, "path": p} for n, p in self.attention],
            "code_bytes": self.code_bytes,
            "constant_bytes": self.constant_bytes,
            "cache_bytes": self.cache_bytes,
            "fp16_bytes": self.fp16_bytes,
        }

    def __str__(self) -> str:
        lines = [
            f"integer backend {self.backend!r} (kernel {self.kernel}): {len(self.integer)} layers on int8 "
            f"kernels, {len(self.fallback)} kept fake quantization"
        ]
        if self.integer:
            fp16 = max(self.fp16_bytes, 1)
            lines.append(
                f"  weights: codes {self.code_bytes / fp16:.3f}x float16, with per-channel constants "
                f"{(self.code_bytes + self.constant_bytes) / fp16:.3f}x; oneDNN prepacked copies kept "
                f"between calls {self.cache_bytes / fp16:.3f}x (convert(..., low_memory=True): 0)"
            )
            split = sum(i.split_for_saturation for i in self.integer)
            if split:
                lines.append(
                    f"  {split} layers run W8A8 as two exact half-GEMMs (CPU without VNNI: oneDNN's int16 "
                    "pair sums would saturate)"
                )
        lines += [f"  fake quant: {name}: {reason}" for name, reason in self.fallback]
        lines += [f"  attention: {name}: {path}" for name, path in self.attention]
        return "\n".join(lines)
