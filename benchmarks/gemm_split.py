"""Per-GEMM CPU timings behind BENCHMARKS.md §7: fp32 vs oneDNN's u8 x s8 GEMM, and the two ways to keep a
W8A8 GEMM exact on a CPU without VNNI.

Without VNNI, oneDNN sums pairs of u8 x s8 products in a saturating int16, exact only for |w| <= 64. A full
8-bit weight is therefore split into two halves (|low| <= 64, high = w - low). Rows:
- fp32: `torch.nn.functional.linear` on float activations and weights.
- int8 (one GEMM): a weight that needs no split (e.g. W4A8 or W8A7), one oneDNN GEMM with fused dequant.
- int8 split pair: the W8A8 form the library runs, two GEMMs on the same codes whose outputs are added.
- int8 split concat: the earlier form, one GEMM on [a | a] against [low | high] (twice the depth), which
  pays for the concatenated copy of the activation codes.

The default shape is the im2col GEMM of a 3x3, 64-channel conv of the Fashion model at batch 64
(M = 64 x 32 x 32 positions, K = 64 x 9, N = 64). Every row is checked against exact integer products.

    OMP_NUM_THREADS=1 python benchmarks/gemm_split.py --output benchmarks/results/gemm_split.json   # CPU-2
    OMP_NUM_THREADS=1 python benchmarks/gemm_split.py --label CPU-3 \
        --output benchmarks/results/gemm_split_cpu3.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_io import write_json

from diffusers_ptq.integer import onednn
from diffusers_ptq.integer.features import cpu_has_vnni
from diffusers_ptq.integer.weight import SAFE_HALF


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


NO_SPLIT = "int8 (one GEMM, no split)"  # the only row on the 4-bit weight: it needs no split


@dataclass
class GemmProblem:
    """One (M, K) x (K, N) problem: uint8 activation codes, 8- and 4-bit weight codes and their scales."""

    codes: torch.Tensor
    w8: torch.Tensor
    w4: torch.Tensor
    s_a: float
    z_a: int
    s_w: torch.Tensor

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        """s_a s_w (a - z).w in float64, rounded once to fp32."""
        centered = self.codes.double() - self.z_a
        return (centered @ w.double().T * self.s_a * self.s_w.double()).float()


Rows = dict[str, Callable[[], torch.Tensor]]


def gemm_rows(m: int, k: int, n: int, seed: int = 0) -> tuple[Rows, GemmProblem]:
    """(row name -> a call computing s_a s_w (a - z).w in fp32, the problem every row computes)."""
    gen = torch.Generator().manual_seed(seed)
    problem = GemmProblem(
        codes=torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8),
        w8=torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8),
        w4=torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8),
        s_a=0.02,
        z_a=128,
        s_w=torch.full((n,), 0.01),
    )
    codes, s_a, z_a, s_w = problem.codes, problem.s_a, problem.z_a, problem.s_w
    zeros = torch.zeros(n, dtype=torch.long)
    low = problem.w8.clamp(-SAFE_HALF, SAFE_HALF)
    high = problem.w8 - low
    packed_w4 = onednn.prepack(problem.w4, m)
    packed_low, packed_high = onednn.prepack(low, m), onednn.prepack(high, m)
    packed_cat = onednn.prepack(torch.cat([low, high], dim=1), m)
    a_float = (codes.float() - z_a) * s_a
    w_float = problem.w8.float() * s_w[:, None]

    def gemm(a: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return onednn._gemm(a, s_a, z_a, packed, s_w, zeros, None)

    return {
        "fp32": lambda: torch.nn.functional.linear(a_float, w_float),
        NO_SPLIT: lambda: gemm(codes, packed_w4),
        "int8 split pair (W8A8)": lambda: gemm(codes, packed_low).add_(gemm(codes, packed_high)),
        "int8 split concat [a | a]": lambda: gemm(torch.cat([codes, codes], dim=1), packed_cat),
    }, problem


def check(rows: Rows, problem: GemmProblem) -> None:
    """Each int8 row equals the exact integer product (fp32 rounding aside); fp32 matches the W8 one."""
    want8, want4 = problem.exact(problem.w8), problem.exact(problem.w4)
    for name, fn in rows.items():
        want = want4 if name == NO_SPLIT else want8
        err = (fn() - want).abs().max().item() / want.abs().max().item()
        if err > 1e-5:
            raise RuntimeError(f"{name}: relative error {err:.2e} against the exact product")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[65536, 576, 64], metavar=("M", "K", "N"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write the timings as JSON here")
    parser.add_argument("--label", default=None, help="a name for the machine, stored in the JSON")
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error(f"--shape must be positive, --repeats >= 1, --warmup >= 0; got {vars(args)}")
    m, k, n = args.shape
    rows, problem = gemm_rows(m, k, n)
    check(rows, problem)
    timings = {name: round(_median_ms(fn, args.repeats, args.warmup), 2) for name, fn in rows.items()}
    result = {
        "shape": {"M": m, "K": k, "N": n},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "median_ms": timings,
    }
    if args.label is not None:
        result["label"] = args.label
        result["cpu_has_vnni"] = cpu_has_vnni()
    fp32 = timings["fp32"]
    print(f"GEMM {m} x {k} x {n}, {result['machine']}, median of {args.repeats}:")
    for name, ms in timings.items():
        print(f"  {name:28s} {ms:8.2f} ms  ({fp32 / ms:.2f}x fp32)")
    if args.output is not None:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
