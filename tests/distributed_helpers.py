"""Cases run on every rank of a Gloo group spawned by tests/test_distributed.py (and once without a group).

Each case builds its tiny pipeline from a fixed seed, runs `quantize_pipeline` with the calibration set it
captured saved on the side, and returns what the test compares: that set, the UNet's tensors, the error.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any

import torch

from diffusers_ptq import cli, quantize_pipeline
from diffusers_ptq.calibration.driver import CalibrationDriver
from diffusers_ptq.cli import quantize as cli_quantize
from diffusers_ptq.distributed import broadcast_module
from diffusers_ptq.job import QuantizationJob
from diffusers_ptq.prepare import is_quantized
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline
from recipe_helpers import plain

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree"]


def _calib(**fields: Any) -> dict[str, Any]:
    # 4 steps, every step recorded, 1 trajectory a call: num_samples / 4 pipeline runs to split.
    return {"sampler": "uniform", "num_inference_steps": 4, "batch_size": 1, **fields}


# name -> (pipeline, config per rank, quantize_pipeline kwargs, inject a failure on rank 1 after finish)
CASES: dict[str, tuple[str, Any, dict[str, Any], bool]] = {
    # 3 runs over 2 ranks: the uneven split (2 + 1).
    "ddim": ("ddim", lambda r: plain(calibration=_calib(num_samples=12)), {}, False),
    # Classifier-free guidance (2 rows a sample), prompts cycled, 2 trajectories a call: 2 runs.
    "sd": (
        "sd",
        lambda r: plain(calibration=_calib(num_samples=16, batch_size=2)),
        {"prompts": PROMPTS, "guidance_scale": 3.0},
        False,
    ),
    # Selectors that capture after a float feature pass, or in rounds steered by the group search.
    "density_diversity": (
        "ddim",
        lambda r: plain(
            calibration=_calib(selector="density_diversity", num_samples=8),
            selection={"feature_samples": 2},
        ),
        {},
        False,
    ),
    "active": (
        "ddim",
        lambda r: plain(
            calibration=_calib(selector="active", num_samples=16, num_inference_steps=6),
            selection={"active_round_size": 8},
            group_search={"enabled": True, "num_images": 2, "epochs": 1, "batch_size": 8},
        ),
        {},
        False,
    ),
    "fail": ("ddim", lambda r: plain(calibration=_calib(num_samples=8)), {}, True),
    # Rank 1's pipeline call fails: in the planning run (before any exchange), or in its first capture run
    # while rank 0 waits to gather (see run_case).
    "fail_plan": ("ddim", lambda r: plain(calibration=_calib(num_samples=8)), {}, False),
    "fail_capture": ("ddim", lambda r: plain(calibration=_calib(num_samples=8)), {}, False),
    "disagree": ("ddim", lambda r: plain(calibration=_calib(num_samples=8, seed=r)), {}, False),
    # Same call, but rank 1 holds different UNet weights (see run_case).
    "weights_disagree": ("ddim", lambda r: plain(calibration=_calib(num_samples=8)), {}, False),
    # One pipeline run (4 samples) for 2 ranks: one rank would get none.
    "too_few": ("ddim", lambda r: plain(calibration=_calib(num_samples=4)), {}, False),
}


def build_pipe(kind: str) -> Any:
    pipe = tiny_ddim_pipeline() if kind == "ddim" else tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(name: str, rank: int) -> dict[str, Any]:
    """Run case `name` as `rank` (0 without a group); its calibration set, UNet tensors and error."""
    kind, config, kwargs, inject = CASES[name]
    pipe = build_pipe(kind)
    if name == "weights_disagree" and rank == 1:
        with torch.no_grad():
            next(pipe.unet.parameters()).view(-1)[0] += 1e-3
    seen: dict[str, Any] = {}
    original, original_run = QuantizationJob.finish, CalibrationDriver.run

    def finish(job: QuantizationJob, data: Any) -> None:
        seen["data"] = data
        original(job, data)
        if inject and rank == 1:
            raise RuntimeError("injected failure")

    calls = []

    def fail_run(*args: Any) -> None:
        calls.append(1)
        if len(calls) == (1 if name == "fail_plan" else 2):
            raise RuntimeError(f"injected failure in pipeline call {len(calls)}")
        original_run(*args)

    QuantizationJob.finish = finish
    if name.startswith("fail_") and rank == 1:
        CalibrationDriver.run = fail_run
    error = None
    try:
        quantize_pipeline(pipe, config(rank), progress=False, **kwargs)
    except Exception as exc:  # the test compares the errors of the ranks
        error = f"{type(exc).__name__}: {exc}"
    finally:
        QuantizationJob.finish = original
        CalibrationDriver.run = original_run
    unet = pipe.unet
    report = getattr(getattr(unet, "ptq_state", None), "report", None)
    return {
        "data": seen.get("data").__dict__ if "data" in seen else None,
        "tensors": {k: v.clone() for k, v in [*unet.named_parameters(), *unet.named_buffers()]},
        "quantized": is_quantized(unet),
        "error": error,
        "distributed": None if report is None else report.distributed,
    }


CLI_ARGS = ["quantize", "--model", "tiny:ddim", "--weight-rounding", "nearest", "--bias-correction", "off"]
# 2 steps, both recorded, 1 trajectory a call: 2 pipeline runs, one a rank.
CLI_ARGS += ["--no-reconstruction", "--num-samples", "4", "--num-inference-steps", "2", "--batch-size", "1"]
CLI_ARGS += ["--samples", "1", "--no-progress"]


def run_cli(rank: int, out: str) -> dict[str, Any]:
    """`diffusers-ptq quantize` on this rank (the ranks that wrote outputs go to `out`.writers)."""
    original = cli_quantize._write_outputs

    def write(*args: Any) -> None:
        with open(out + ".writers", "a") as f:
            f.write(f"{rank}\n")
        original(*args)

    cli_quantize._write_outputs = write
    try:
        code = cli.main([*CLI_ARGS, "--output", out])
    finally:
        cli_quantize._write_outputs = original
    return {"code": code}


def worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    """One rank: join the loopback Gloo group, run every case in turn, save the results."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        results: dict[str, Any] = {name: run_case(name, rank) for name in names}
        # Different tensors on each rank (a parameter, a buffer), then rank 0's broadcast to all.
        module = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            module.weight.fill_(rank + 1.0)
            module.running_mean.fill_(rank - 5.0)
        broadcast_module(module)
        results["broadcast"] = {k: v.clone() for k, v in module.state_dict().items()}
        results["cli"] = run_cli(rank, os.path.join(out_dir, "cli"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
