"""Cases run on every rank of a Gloo group spawned by tests/test_distributed.py (and once without a group).

Each case builds its tiny pipeline from a fixed seed, runs `quantize_pipeline` with the calibration set it
captured saved on the side, and returns what the test compares: that set, the UNet's tensors, the error.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta
from typing import Any

import torch

from diffusers_ptq import api, cli, quantize_pipeline
from diffusers_ptq.calibration.driver import CalibrationDriver
from diffusers_ptq.calibration.pipelines import spec_for_class
from diffusers_ptq.cli import quantize as cli_quantize
from diffusers_ptq.correction import layer as bias_layer
from diffusers_ptq.distributed import broadcast_module
from diffusers_ptq.job import QuantizationJob
from diffusers_ptq.prepare import is_quantized
from diffusers_ptq.reconstruction import checkpoint as recon_checkpoint
from diffusers_ptq.reconstruction import trainer as recon_trainer
from diffusers_ptq.reconstruction.sampling import SamplingCheck
from diffusers_ptq.tiny import tiny_ddim_pipeline, tiny_sd_pipeline
from recipe_helpers import plain

PROMPTS = ["a photo of a cat", "a red car", "a watercolor of a tree"]


def _calib(**fields: Any) -> dict[str, Any]:
    # 4 steps, every step recorded, 1 trajectory a call: num_samples / 4 pipeline runs to split.
    return {"sampler": "uniform", "num_inference_steps": 4, "batch_size": 1, **fields}


# 12 rows: 2 held out, 10 trained on in batches of 4 (stratified: strata of 3, 3, 2, 2 rows; rank 0 caches
# the first two, rank 1 the last two).
RECON: dict[str, Any] = {
    "enabled": True,
    "iterations": 24,
    "act_iterations": 8,
    "batch_size": 4,
    "batch_sampling": "stratified",
    "cache_dtype": "float32",
    "cache_batch_size": 4,
}


def _recon(**fields: Any) -> Any:
    return lambda r: plain(
        weight_bits=4,
        weights={"symmetric": False},
        calibration=_calib(num_samples=12),
        reconstruction={**RECON, **fields},
    )


def _search(target: str) -> Any:
    # 12 rows in batches of 5 (the last batch of each epoch 2 rows): parts of 3 + 2 and 1 + 1.
    return lambda r: plain(
        activations={"timestep_groups": 2},
        calibration=_calib(num_samples=12),
        group_search={"enabled": True, "target": target, "num_images": 4, "epochs": 3, "batch_size": 5},
    )


def _bias(mode: str) -> Any:
    # 12 rows, 6 a rank, in two timestep groups; 4-bit weights so the tables are far from zero.
    return plain(
        weight_bits=4,
        activations={"timestep_groups": 2},
        bias_correction=mode,
        calibration=_calib(num_samples=12),
    )


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
    # Data-parallel stages: GPTQ's Hessians summed across ranks; block reconstruction (stratified and
    # random batches, a disk-spilled cache, a resume checkpoint written by rank 0, a failure mid-training).
    "gptq": (
        "ddim",
        lambda r: plain(weight_bits=4, weights={"rounding": "gptq"}, calibration=_calib(num_samples=12)),
        {},
        False,
    ),
    "recon": ("ddim", _recon(), {}, False),
    "recon_random": ("ddim", _recon(batch_sampling="random"), {}, False),
    "recon_spill": ("ddim", _recon(cache_max_gb=0.0), {}, False),
    "fail_recon": ("ddim", _recon(), {}, False),
    # The group search, data-parallel: each global batch split between the ranks, gradients summed.
    "search_noise": ("ddim", _search("noise"), {}, False),
    "search_float": ("ddim", _search("float"), {}, False),
    # Sensitivity-driven mixed precision: each rank predicts its share of the batches, the sums are added.
    "mixed": (
        "ddim",
        lambda r: plain(
            weight_bits=4,
            layers={"mixed_precision": {"mode": "max_layers", "max_layers": 2}},
            calibration=_calib(num_samples=12, batch_size=1),
        ),
        {},
        False,
    ),
    # Bias correction: each rank runs its share of the rows, the float64 sums are added.
    "bias_layer": ("ddim", lambda r: _bias("layer"), {}, False),
    "bias_output": ("ddim", lambda r: _bias("output"), {}, False),
    "fail_bias": ("ddim", lambda r: _bias("layer"), {}, False),  # rank 1 fails in its third pass
}
# Cases whose reconstruction_checkpoint is a folder under the run's output (same path on every rank).
CHECKPOINTED = ("recon",)


def build_pipe(kind: str) -> Any:
    pipe = tiny_ddim_pipeline() if kind == "ddim" else tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(name: str, rank: int, workdir: str | None = None) -> dict[str, Any]:
    """Run case `name` as `rank` (0 without a group); its calibration set, UNet tensors and error.
    `workdir`: where a checkpointed case keeps its reconstruction checkpoint."""
    kind, config, kwargs, inject = CASES[name]
    kwargs = dict(kwargs)
    if name in CHECKPOINTED:
        kwargs["reconstruction_checkpoint"] = os.path.join(workdir or tempfile.mkdtemp(), f"{name}-ckpt")
    pipe = build_pipe(kind)
    if name == "weights_disagree" and rank == 1:
        with torch.no_grad():
            next(pipe.unet.parameters()).view(-1)[0] += 1e-3
    seen: dict[str, Any] = {}
    original, original_run = QuantizationJob.finish, CalibrationDriver.run

    def finish(job: QuantizationJob, data: Any) -> None:
        seen["data"] = data
        original(job, data)
        # Before quantize_pipeline's final broadcast from rank 0: what each rank computed itself.
        seen["own"] = {k: v.clone() for k, v in [*job.unet.named_parameters(), *job.unet.named_buffers()]}
        if inject and rank == 1:
            raise RuntimeError("injected failure")

    calls = []

    def fail_run(*args: Any) -> None:
        calls.append(1)
        if len(calls) == (1 if name == "fail_plan" else 2):
            raise RuntimeError(f"injected failure in pipeline call {len(calls)}")
        original_run(*args)

    writes: list[str] = []
    original_write, original_losses = recon_checkpoint._atomic_write, recon_trainer._Step.losses

    def write(path: Any, fn: Any) -> None:
        writes.append(os.path.basename(str(path)))
        original_write(path, fn)

    def failing_losses(step: Any, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure in a reconstruction step")
        return original_losses(step, *args, **kw)

    original_sweep = bias_layer._sweep

    def failing_sweep(*args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in a bias-correction pass")
        original_sweep(*args, **kw)

    original_images = api.sample_clean_images

    def clean_images(*args: Any, **kw: Any) -> torch.Tensor:
        seen["clean_images"] = original_images(*args, **kw)
        return seen["clean_images"]

    QuantizationJob.finish = finish
    api.sample_clean_images = clean_images
    if name == "fail_bias" and rank == 1:
        bias_layer._sweep = failing_sweep
    recon_checkpoint._atomic_write = write
    if name in ("fail_plan", "fail_capture") and rank == 1:
        CalibrationDriver.run = fail_run
    if name == "fail_recon" and rank == 1:
        recon_trainer._Step.losses = failing_losses
    error = None
    try:
        quantize_pipeline(pipe, config(rank), progress=False, **kwargs)
    except Exception as exc:  # the test compares the errors of the ranks
        error = f"{type(exc).__name__}: {exc}"
    finally:
        QuantizationJob.finish = original
        CalibrationDriver.run = original_run
        recon_checkpoint._atomic_write = original_write
        recon_trainer._Step.losses = original_losses
        bias_layer._sweep = original_sweep
        api.sample_clean_images = original_images
    unet = pipe.unet
    report = getattr(getattr(unet, "ptq_state", None), "report", None)
    return {
        "data": seen.get("data").__dict__ if "data" in seen else None,
        "tensors": {k: v.clone() for k, v in [*unet.named_parameters(), *unet.named_buffers()]},
        "quantized": is_quantized(unet),
        "error": error,
        "distributed": None if report is None else report.distributed,
        "reconstruction": getattr(getattr(unet, "ptq_state", None), "reconstruction", None),
        "group_search": getattr(getattr(unet, "ptq_state", None), "group_search", None),
        "mixed_precision": None if report is None else report.mixed_precision,
        "bias_correction": getattr(getattr(unet, "ptq_state", None), "bias_correction", None),
        "checkpoint_writes": writes,
        "own_tensors": seen.get("own"),
        "clean_images": seen.get("clean_images"),
        "output": unet_output(unet) if kind == "ddim" else None,
    }


@torch.no_grad()
def unet_output(unet: Any) -> torch.Tensor:
    """The UNet's noise prediction on fixed inputs (quantized or float, as it is)."""
    gen = torch.Generator().manual_seed(5)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    return unet(x, torch.tensor([700, 40])).sample


def sampling_outputs(kind: str) -> dict[str, Any]:
    """The sampling check's float outputs for 3 calls of a tiny pipeline (5 samples, 2 a call; the SD
    pipeline with prompts and guidance), and how many UNet calls this rank really made (not stubbed)."""
    pipe = build_pipe(kind)
    spec = spec_for_class(type(pipe))
    prompts = dict(prompts=PROMPTS, guidance_scale=3.0) if kind == "sd" else {}
    driver = CalibrationDriver(spec, 3, batch_size=2, **prompts)
    real = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda *args: real.append(1))
    try:
        outputs = SamplingCheck(pipe, driver, num_samples=5, seed=11).sample("float")
    finally:
        handle.remove()
    return {"outputs": outputs, "unet_calls": len(real)}


def hessian_shares(rank: int, world: int) -> dict[str, torch.Tensor]:
    """X Xᵀ of a fixed input accumulated over this rank's rows and summed over the ranks, and the whole."""
    from diffusers_ptq.distributed import all_reduce_sum, split_evenly
    from diffusers_ptq.gptq.hessian import HessianAccumulator

    layer = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    share = split_evenly(10, world)[rank]
    acc = HessianAccumulator(27, torch.device("cpu"))
    acc.add(layer, x[share.start : share.stop])
    all_reduce_sum([acc.sum], "test hessian")
    whole = HessianAccumulator(27, torch.device("cpu"))
    whole.add(layer, x)
    return {"summed": acc.sum, "whole": whole.sum}


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
        results: dict[str, Any] = {name: run_case(name, rank, out_dir) for name in names}
        # Different tensors on each rank (a parameter, a buffer), then rank 0's broadcast to all.
        module = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            module.weight.fill_(rank + 1.0)
            module.running_mean.fill_(rank - 5.0)
        broadcast_module(module)
        results["broadcast"] = {k: v.clone() for k, v in module.state_dict().items()}
        results["hessian"] = hessian_shares(rank, world)
        results["sampling"] = {kind: sampling_outputs(kind) for kind in ("ddim", "sd")}
        results["cli"] = run_cli(rank, os.path.join(out_dir, "cli"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
