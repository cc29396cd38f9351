"""The `diffusers-ptq` command line.

    diffusers-ptq quantize --output out/                      # the shipped Fashion-MNIST DDPM, offline
    diffusers-ptq quantize --model stable-diffusion-v1-5/stable-diffusion-v1-5 --preset q-diffusion \\
        --weight-bits 4 --num-samples 256 --output sd15-w4a8/
    diffusers-ptq bench --quick --output bench-quick/         # FD/IS/SQNR table: float vs every preset
    diffusers-ptq inspect --output ranges/                    # activation ranges across timesteps (PNG)
    diffusers-ptq presets
"""

from __future__ import annotations

import argparse
import sys

import torch

from diffusers_ptq import __version__
from diffusers_ptq.cli import bench, inspect_ranges, presets, quantize

__all__ = ["build_parser", "main"]

_COMMANDS = {"quantize": quantize, "bench": bench, "inspect": inspect_ranges, "presets": presets}


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="diffusers-ptq", description=__doc__, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # An application may set global torch state: denormals make CPU calibration many times slower.
    torch.set_flush_denormal(True)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in benchmark headers
    return _COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
