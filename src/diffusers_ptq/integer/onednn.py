"""oneDNN's u8 x s8 GEMM with fused dequantisation, as a torch custom op (one opaque call per layer).

oneDNN takes one activation (scale, zero point) per call, while a batch may mix timestep groups. The op
therefore splits the batch into runs of consecutive samples that share theirs (one run in ordinary
sampling, where the whole batch is at one timestep) and makes one call per run; the branch lives inside
the op, so `torch.compile` sees no data-dependent control flow. oneDNN subtracts the zero point exactly in
int32 (sum u w - z sum w), then computes float(acc) * s_a * s_w[n] + bias[n] in fp32: the fake-quant
layer's result up to float rounding.

The op finds the layer's `IntegerWeight` by an integer handle (a registry of weak references, so the op
never keeps a layer alive) and asks it for oneDNN's prepacked weight.
"""

import itertools
import weakref
from typing import Optional, Protocol

import torch


class OneDNNOperand(Protocol):
    def onednn_weight(self, rows: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(prepacked weights whose GEMMs add up, per-channel weight scales, zero weight zero points)."""
        ...


_LIVE: "weakref.WeakValueDictionary[int, OneDNNOperand]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(weight: OneDNNOperand) -> int:
    """Handle under which the custom op finds `weight` while it lives."""
    handle = next(_NEXT)
    _LIVE[handle] = weight
    return handle


def prepack(codes: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """oneDNN's prepacked layout of (N, K) int8 weight codes, tuned for GEMMs of `rows` rows if given
    (a weight prepacked for the GEMM's row count is the faster layout; no committed timing)."""
    shape = None if rows is None else [max(rows, 1), codes.shape[1]]
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), shape)


def _runs(scale: torch.Tensor, zero_point: torch.Tensor) -> list[tuple[int, int, float, int]]:
    """(first sample, end sample, scale, zero point) of each run of samples sharing their qparams."""
    pairs = list(zip(scale.tolist(), zero_point.tolist()))
    runs, start = [], 0
    for j in range(1, len(pairs) + 1):
        if j == len(pairs) or pairs[j] != pairs[start]:
            runs.append((start, j, pairs[start][0], int(pairs[start][1])))
            start = j
    return runs


def int8_linear(
    a: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    handle: int,
    out_features: int,
) -> torch.Tensor:
    """The custom op under `torch.compile`; in eager its body directly (skipping the op dispatch)."""
    if torch.compiler.is_compiling():
        return onednn_int8_linear(a, scale, zero_point, bias, handle, out_features)
    return _int8_linear_impl(a, scale, zero_point, bias, handle, out_features)


def _int8_linear_impl(
    a: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    handle: int,
    out_features: int,
) -> torch.Tensor:
    weight = _LIVE.get(handle)
    if weight is None:
        raise RuntimeError(f"integer weight {handle} no longer exists (its layer was freed)")
    packed, w_scale, w_zero = weight.onednn_weight(a.shape[0])
    a = a.contiguous()
    rows = a.shape[0] // max(scale.shape[0], 1)
    outs = []
    for start, end, s, z in _runs(scale, zero_point):
        run = a[start * rows : end * rows]
        y = _gemm(run, s, z, packed[0], w_scale, w_zero, bias)
        for half in packed[1:]:  # the second half of a split weight (exact: no int16 saturation)
            y.add_(_gemm(run, s, z, half, w_scale, w_zero, None))
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gemm(
    a: torch.Tensor,
    scale: float,
    zero_point: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 s_a s_w (a - z).w [+ bias] from oneDNN."""
    return torch.ops.onednn.qlinear_pointwise(
        a, scale, zero_point, packed, w_scale, w_zero, bias, 1.0, 0, torch.float32, "none", [None], ""
    )


@torch.library.custom_op("diffusers_ptq::onednn_int8_linear", mutates_args=())
def onednn_int8_linear(
    a: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (custom_op's schema inference reads this annotation)
    handle: int,
    out_features: int,
) -> torch.Tensor:
    """uint8 codes (M, K), M = B x rows, with per-sample `scale`/`zero_point` (B,) -> fp32 (M, N)."""
    return _int8_linear_impl(a, scale, zero_point, bias, handle, out_features)


@onednn_int8_linear.register_fake
def _(
    a: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    handle: int,
    out_features: int,
) -> torch.Tensor:
    return a.new_empty((a.shape[0], out_features), dtype=torch.float32)
