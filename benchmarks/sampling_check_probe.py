"""Does the sampling check alone catch a reconstruction that samples worse? `diffusers-ptq bench` with the
held-out whole-UNet check switched off, so that only the per-unit checks and the sampling check judge the run.

The held-out check (reconstruction/safeguard.py) compares one-step outputs on held-out calibration rows; the
sampling check (reconstruction/sampling.py) compares the pipeline's final outputs on fresh samples. In the
runs of BENCHMARKS.md §8 the held-out check undid the short runs itself, so the sampling check never had to
decide. Here it must: the held-out check's verdict is forced to "better" (the report's held-out numbers are
then the forced ones, marked so), and the bench's FD shows whether the sampling check's decision was right.
With `--keep` (the probe's own flag) the sampling check's verdict is forced to "keep" as well, so the FD of
the run it would have undone can be measured. Every other argument is passed to `diffusers-ptq bench`:

    python benchmarks/sampling_check_probe.py --presets q-diffusion --bits W4A8 --reconstruction-minutes 1 \
        --num-samples 250 --seeds 0 --calibration-samples 256 --output OUT --no-progress
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from diffusers_ptq.cli import main as cli_main
    from diffusers_ptq.reconstruction import runner, sampling

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--keep" in argv:
        argv.remove("--keep")
        sampling.worse = lambda before, after: False

    real = runner.holdout_error

    def forced(unet, data, rows, config, reference=None):
        ref, errors = real(unet, data, rows, config, reference)
        if reference is None:  # before the run: the real errors
            forced.before = errors
            return ref, errors
        # After the run: forced below the starting point, so the held-out check never undoes it.
        return ref, (0.5 * forced.before[0], 0.5 * forced.before[1])

    runner.holdout_error = forced
    torch.set_flush_denormal(True)
    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
