"""Int8 implicit-GEMM convolution in Triton (CUDA), its dequantisation fused into the epilogue.

The im2col + `torch._int_mm` path writes the (B * OH * OW, kh * kw * C) column matrix to memory: for a
3x3 conv that is 9x the input, read back once by the GEMM, and a float (M, N) product read again by the
dequantisation. Here each program computes one (BLOCK_M, BLOCK_N) output tile and gathers its input
rows straight from the padded NHWC codes, one (kh, kw) tap and BLOCK_K channels at a time, so the columns
never exist; the int32 tile is dequantised in registers,

    y = s_a s_w acc - s_a s_w z_a c + bias  [- s_a s_w z_w sum_k a_k]

(per-sample s_a, z_a of the row's sample; `bias` per channel, or per sample and channel when a timestep
bias table is folded in; the same formula as `IntegerLayer.part_output`), and written
once in the output dtype. W4 weights are read two per byte and sign-extended in the kernel. Per-group
weight scales (`quantizers.groups`) are applied inside the reduction: at the end of each group the int32
tile is scaled by that group's weight scales into an fp32 sum and restarted.

The kernel runs on CUDA. Triton's interpreter (`TRITON_INTERPRET=1`) runs the same kernel on CPU tensors;
the tests use it to check the kernel where no GPU is lent. Block sizes are a fixed heuristic, not tuned
on a GPU yet.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from diffusers_ptq.integer.features import interpreting
from diffusers_ptq.integer.gemm import conv_output_size

INT32_MAX = 2**31 - 1


@functools.cache
def _build(interpret: bool):
    """Compile-on-first-use: triton is imported only when a conv actually runs on this kernel."""
    import triton
    import triton.language as tl

    del interpret  # part of the cache key: triton.jit reads TRITON_INTERPRET when it decorates

    @triton.jit
    def conv_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        sa_ptr,
        za_ptr,
        sw_ptr,
        corr_ptr,
        zw_ptr,
        bias_ptr,
        M,
        N,
        C,
        OHW,
        OW,
        HP,
        WP,
        W_ROW,
        NUM_GROUPS,
        SH: tl.constexpr,
        SW: tl.constexpr,
        DH: tl.constexpr,
        DW: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        PACKED: tl.constexpr,
        ASYM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BIAS_ROWS: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        GROUP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row tiles share their weight tiles while they are in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        sample = rm // OHW
        oh = (rm % OHW) // OW
        ow = rm % OW
        row_base = ((sample.to(tl.int64) * HP + oh * SH) * WP + ow * SW) * C
        w_rows = rn.to(tl.int64) * W_ROW

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        row_sums = tl.zeros((BLOCK_M,), dtype=tl.int32)
        accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # per-group weights: the scaled group sums
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                tap = (kh * DH * WP + kw * DW) * C
                k_tap = (kh * KW + kw) * C
                for c0 in range(0, C, BLOCK_K):
                    c = c0 + rk
                    c_ok = c < C
                    a_mask = m_ok[:, None] & c_ok[None, :]
                    a = tl.load(x_ptr + (row_base[:, None] + tap + c[None, :]), mask=a_mask, other=0)
                    k = k_tap + c
                    w_mask = c_ok[:, None] & n_ok[None, :]
                    if PACKED:
                        byte = tl.load(w_ptr + (w_rows[None, :] + k[:, None] // 2), mask=w_mask, other=0)
                        nibble = (byte.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 15
                        w = (nibble - 8).to(tl.int8)  # offset code + 8 (serialization/packing.py)
                    else:
                        w = tl.load(w_ptr + (w_rows[None, :] + k[:, None]), mask=w_mask, other=0)
                    acc = tl.dot(a, w, acc, out_dtype=tl.int32)
                    if ASYM:
                        row_sums += tl.sum(a.to(tl.int32), axis=1)
                    if GROUP_K > 0:  # noqa: SIM102 (constexpr switch first: GROUP_K = 0 must not reach %)
                        # A group is GROUP_K channels of one tap (C % GROUP_K == 0, GROUP_K % BLOCK_K == 0):
                        # at its last block, its exact integer sums get its own weight scale.
                        if (c0 + BLOCK_K) % GROUP_K == 0:
                            g = (k_tap + c0) // GROUP_K
                            sw_g = tl.load(sw_ptr + rn * NUM_GROUPS + g, mask=n_ok, other=0.0)
                            accf += acc.to(tl.float32) * sw_g[None, :]
                            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                            if ASYM:
                                zw_g = tl.load(zw_ptr + rn * NUM_GROUPS + g, mask=n_ok, other=0.0)
                                accf -= row_sums.to(tl.float32)[:, None] * (sw_g * zw_g)[None, :]
                                row_sums = tl.zeros((BLOCK_M,), dtype=tl.int32)

        sa = tl.load(sa_ptr + sample, mask=m_ok, other=0.0)
        za = tl.load(za_ptr + sample, mask=m_ok, other=0.0)
        corr = tl.load(corr_ptr + rn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            if BIAS_ROWS:  # (B, N): each row's sample picks its own bias (a timestep group's table row)
                b_ptrs = bias_ptr + (sample.to(tl.int64)[:, None] * N + rn[None, :])
                bias_tile = tl.load(b_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            else:
                bias_tile = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if GROUP_K > 0:
            # corr = sum_g s_wg c_g already carries the weight scales (IntegerWeight).
            y = sa[:, None] * (accf - za[:, None] * corr[None, :])
            if HAS_BIAS:
                y += bias_tile
        else:
            sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
            mult = sa[:, None] * sw[None, :]
            const = -(mult * za[:, None]) * corr[None, :]
            if HAS_BIAS:
                const += bias_tile
            y = acc.to(tl.float32) * mult + const
            if ASYM:
                zw = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
                y -= (mult * zw[None, :]) * row_sums.to(tl.float32)[:, None]
        out_ptrs = out_ptr + (rm.to(tl.int64)[:, None] * N + rn[None, :])
        out_mask = m_ok[:, None] & n_ok[None, :]
        if ACCUMULATE:
            y += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)

    return conv_kernel


def _blocks(m: int, n: int, group_k: int = 0) -> dict:
    """Tile sizes and launch options: a fixed heuristic (int8 tensor-core dots need BLOCK_K >= 32).

    With per-group weight scales BLOCK_K divides the group size, so a K block never spans two groups.
    """
    if interpreting():  # fewer, larger programs: the interpreter's cost is per program and op
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
    block_n = 128 if n >= 128 else 64
    block_m = 128 if m >= 128 else 64
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": min(64, group_k) if group_k else 64,
        "GROUP_M": 8,
        "num_warps": warps,
        "num_stages": 3,
    }


MIN_GROUP_K = 32  # the smallest K block of an int8 tensor-core dot


def supports_groups(group_size: int | None, channels: int) -> bool:
    """Whether the kernel can apply per-group weight scales of `group_size` to a conv over `channels`.

    Its K loop walks one tap's channels in blocks, so a group must be whole channel blocks of one tap.
    """
    return group_size is None or (group_size >= MIN_GROUP_K and channels % group_size == 0)


def conv2d_int8(
    codes: torch.Tensor,
    weight,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantised (B * OH * OW, N) conv output of padded NHWC int8 `codes` (B, HP, WP, C).

    `weight` is an `IntegerWeight` (codes ordered (kh, kw, C) along K, int8 or packed int4; per-channel
    scales, or per-group scales applied in the K loop when `supports_groups`); `scale`, `zero_point` are
    per sample (B,); `bias` is (N,) or per sample (B, N) fp32. With `out` given, the result is added into
    it (a shortcut-split conv's second part) and `out` is returned. Under `torch.compile` the launch is one
    opaque custom op.
    """
    b, hp, wp, c = codes.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    m = b * conv_output_size(hp, kh, sh, dh) * conv_output_size(wp, kw, sw, dw)
    n = weight.out_features
    if weight.in_features != kh * kw * c:
        raise ValueError(f"weight has K = {weight.in_features}, the conv needs {kh} x {kw} x {c}")
    if not supports_groups(weight.group_size, c):
        raise ValueError(f"per-group weight scales of {weight.group_size} channels do not tile {c} channels")
    if max(m, n, hp * wp * c) > INT32_MAX:
        raise ValueError(f"conv too large for 32-bit tile indices (M = {m}, N = {n})")
    if bias is not None and bias.shape not in ((n,), (b, n)):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},) or ({b}, {n})")
    accumulate = out is not None
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    w = weight.packed if weight.packed is not None else weight.codes
    args = (
        out,
        codes.contiguous(),
        w,
        weight.scale,
        weight.correction,
        weight.zero_point if weight.asymmetric else None,
        bias,
        scale.float().contiguous(),
        zero_point.float().contiguous(),
        list(kernel_size),
        list(stride),
        list(dilation),
        accumulate,
    )
    launch = triton_conv2d_int8 if torch.compiler.is_compiling() else _launch
    launch(*args)
    return out


def _launch(
    out: torch.Tensor,
    codes: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_correction: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    accumulate: bool,
) -> None:
    """One kernel launch; `w` is (N, K) int8 codes or (N, ceil(K / 2)) uint8 nibble pairs."""
    _, hp, wp, c = codes.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    oh, ow = conv_output_size(hp, kh, sh, dh), conv_output_size(wp, kw, sw, dw)
    m, n = out.shape
    groups = w_scale.shape[1] if w_scale.ndim == 2 else 0  # (N, G): per-group weight scales
    group_k = kh * kw * c // groups if groups else 0
    blocks = _blocks(m, n, group_k)
    grid = (-(-m // blocks["BLOCK_M"]) * -(-n // blocks["BLOCK_N"]),)
    # Pointer arguments that a constexpr flag switches off are never read: any tensor will do.
    _build(interpreting())[grid](
        codes,
        w,
        out,
        scale,
        zero_point,
        w_scale,
        w_correction,
        w_scale if w_zero_point is None else w_zero_point,
        w_scale if bias is None else bias,
        m,
        n,
        c,
        oh * ow,
        ow,
        hp,
        wp,
        w.shape[1],
        max(groups, 1),
        SH=sh,
        SW=sw,
        DH=dh,
        DW=dw,
        KH=kh,
        KW=kw,
        PACKED=w.dtype == torch.uint8,
        ASYM=w_zero_point is not None,
        HAS_BIAS=bias is not None,
        BIAS_ROWS=bias is not None and bias.ndim == 2,
        ACCUMULATE=accumulate,
        GROUP_K=group_k,
        **blocks,
    )


@torch.library.custom_op("diffusers_ptq::triton_conv2d_int8", mutates_args=("out",))
def triton_conv2d_int8(
    out: torch.Tensor,
    codes: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_correction: torch.Tensor,
    w_zero_point: Optional[torch.Tensor],  # noqa: UP045 (custom_op's schema inference reads this annotation)
    bias: Optional[torch.Tensor],  # noqa: UP045
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    accumulate: bool,
) -> None:
    """The kernel launch as an opaque op for `torch.compile` (writes, or adds into, `out`)."""
    _launch(
        out,
        codes,
        w,
        w_scale,
        w_correction,
        w_zero_point,
        bias,
        scale,
        zero_point,
        kernel_size,
        stride,
        dilation,
        accumulate,
    )
