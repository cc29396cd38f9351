"""Compile the Triton int8 conv kernel for a GPU architecture without a GPU, and report what it became.

Triton compiles ahead of time with `triton.compile` and its own ptxas; no device is needed. Per variant
(int8 or packed W4 weights, symmetric or affine weights, per-channel or per-group scales, a per-sample
bias table, fp16 output) this prints the shared memory the kernel asks for and how many Hopper
`wgmma.mma_async` and older `mma.sync` instructions its PTX holds. It checks that the kernel builds with
a given Triton for a given chip; whether it computes the right thing, and how fast, needs the GPU
(`benchmarks/gpu_checks.sh`).

    python benchmarks/triton_compile_check.py --arch 90 --json out.json     # H100 / H200 (sm_90a)
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

POINTERS = {"x_ptr": "*i8", "out_ptr": "*fp16"}  # w_ptr: per variant; the rest are fp32 tensors
SCALARS = ("M", "N", "C", "OHW", "OW", "HP", "WP", "W_ROW", "NUM_GROUPS")


def variants(args: argparse.Namespace):
    for packed, asym, group_k in itertools.product((False, True), (False, True), (0, args.group)):
        yield {"PACKED": packed, "ASYM": asym, "GROUP_K": group_k}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    parser.add_argument("--group", type=int, default=64, help="group size of the per-group variants")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffusers_ptq.integer.triton_conv import _build

    kernel = _build(False)
    names = kernel.arg_names
    rows = []
    for flags in variants(args):
        signature = {}
        for name in names:
            if name in SCALARS:
                signature[name] = "i32"
            elif name.endswith("_ptr"):
                weight = "*u8" if flags["PACKED"] else "*i8"
                signature[name] = weight if name == "w_ptr" else POINTERS.get(name, "*fp32")
            else:
                signature[name] = "constexpr"
        constants = {
            **dict(SH=1, SW=1, DH=1, DW=1, KH=3, KW=3, HAS_BIAS=True, BIAS_ROWS=True, ACCUMULATE=False),
            **flags,
            **dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        }
        source = ASTSource(
            kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": 8, "num_stages": 3}
        )
        ptx = compiled.asm["ptx"]
        row = {
            **flags,
            "shared_bytes": compiled.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync"),
        }
        rows.append(row)
        print(row, flush=True)
    result = {"triton": triton.__version__, "arch": args.arch, "tile": [128, 128, 64], "variants": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return rows


if __name__ == "__main__":
    main()
