"""Bounded memory of reconstruction: disk-spilled block caches, CPU offload, per-unit memory in the report."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusers_ptq import api as api_module
from diffusers_ptq import quantize_pipeline
from diffusers_ptq.reconstruction import ReconstructionReport, reconstruct
from diffusers_ptq.reconstruction import memory as memory_module
from diffusers_ptq.reconstruction import runner as runner_module
from diffusers_ptq.reconstruction import spill as spill_module
from diffusers_ptq.reconstruction.spill import mapped_safetensors
from recipe_helpers import plain
from reconstruction_helpers import fast_config, quantized

torch.set_flush_denormal(True)
FAST = {"iterations": 6, "act_iterations": 4}


@pytest.fixture(scope="module")
def model():
    return quantized("sd")


def _run(model, **overrides):
    unet = copy.deepcopy(model[0])
    report = reconstruct(unet, model[1], fast_config(**FAST, **overrides), progress=False)
    return unet, report


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")]


@pytest.fixture(scope="module")
def in_ram(model):
    return _run(model)


def test_mapped_file_is_safetensors(tmp_path):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int64):
        values = torch.arange(30).reshape(5, 3, 2).to(dtype)
        mapped = mapped_safetensors(tmp_path / "a.safetensors", "rows", (5, 3, 2), dtype)
        mapped[:2], mapped[2:] = values[:2], values[2:]  # filled batch by batch, as the cache does
        del mapped
        with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("rows"), values)


def test_spilled_cache_gives_bit_identical_result(model, in_ram, tmp_path):
    # cache_max_gb=0: every unit's cache goes to disk; the learned roundings and step sizes are the same bits.
    seen = []
    build = runner_module.build_cache

    def spy(*args, **kwargs):
        cache = build(*args, **kwargs)
        seen.append(sorted(p.name for p in _files(tmp_path)))
        return cache

    runner_module.build_cache, restore = spy, build
    try:
        unet, report = _run(model, cache_max_gb=0.0, cache_dir=str(tmp_path))
    finally:
        runner_module.build_cache = restore
    trained = [u for u in report.units if u.status in ("trained", "reverted")]
    assert trained and all(u.cache_spilled and u.cache_bytes > 0 for u in trained)
    assert all(any(n.endswith(".safetensors") for n in names) for names in seen)  # really on disk
    assert _same_state(unet, in_ram[0])
    assert [u.status for u in report.units] == [u.status for u in in_ram[1].units]
    assert _files(tmp_path) == []  # the temporary subfolder is gone


def test_only_caches_above_the_budget_spill(model, in_ram, tmp_path):
    sizes = [u.cache_bytes for u in in_ram[1].units if u.cache_bytes]
    limit = sorted(sizes)[len(sizes) // 2]
    unet, report = _run(model, cache_max_gb=limit / 2**30, cache_dir=str(tmp_path))
    spilled = {u.cache_spilled for u in report.units if u.cache_bytes}
    assert spilled == {True, False}
    assert all(u.cache_spilled == (u.cache_bytes > limit) for u in report.units if u.cache_bytes)
    assert _same_state(unet, in_ram[0])


def test_failure_removes_spilled_files_and_restores_the_unet(model, tmp_path, monkeypatch):
    unet = copy.deepcopy(model[0])
    before = copy.deepcopy(unet.state_dict())
    calls = []

    def fail(*args, **kwargs):
        calls.append(len([p for p in _files(tmp_path) if p.suffix == ".safetensors"]))
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return train(*args, **kwargs)

    train = runner_module.train_unit
    monkeypatch.setattr(runner_module, "train_unit", fail)
    config = fast_config(**FAST, cache_max_gb=0.0, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="injected failure"):
        reconstruct(unet, model[1], config, progress=False)
    assert calls[-1] > 0  # the failing unit's cache was on disk when it failed
    assert _files(tmp_path) == []
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unwritable_or_full_cache_dir_fails_before_any_work(model, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(runner_module, "holdout_error", no_work)
    monkeypatch.setattr(runner_module, "train_unit", no_work)
    unet, data = copy.deepcopy(model[0]), model[1]
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"reconstruction.cache_dir='.*file' is not a writable folder"):
        reconstruct(unet, data, fast_config(cache_max_gb=0.0, cache_dir=str(a_file)), progress=False)

    class Usage:
        free = 1000

    monkeypatch.setattr(spill_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"has 0.00 GB free but the largest block cache .* needs"):
        reconstruct(unet, data, fast_config(cache_max_gb=0.0, cache_dir=str(tmp_path)), progress=False)
    assert _files(tmp_path) == [a_file]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_dir_fails(model, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    config = fast_config(cache_max_gb=0.0, cache_dir=str(folder))
    with pytest.raises(ValueError, match="is not a writable folder"):
        reconstruct(copy.deepcopy(model[0]), model[1], config, progress=False)


def test_cpu_offload_moves_only_the_unit_and_gives_the_same_result(model, in_ram, monkeypatch, caplog):
    # The CPU plays the accelerator: every move is real bookkeeping, checked call by call.
    moves = []
    move = memory_module._move

    def record(modules, device):
        moves.append((list(modules), device))
        move(modules, device)

    monkeypatch.setattr(memory_module, "_move", record)
    with caplog.at_level(logging.INFO, logger="diffusers_ptq"):
        unet, report = _run(model, offload="cpu", offload_device="cpu")
    assert _same_state(unet, in_ram[0])
    assert all(p.device.type == "cpu" for p in unet.parameters())
    assert [m is unet for m in moves[0][0]] == [True] and [m is unet for m in moves[-1][0]] == [True]
    trained = [u for u in report.units if u.cache_bytes is not None]
    unit_moves = moves[1:-1]
    assert len(unit_moves) == 2 * len(trained)  # to the device and back, once per trained unit
    for (there, _), (back, device) in zip(unit_moves[::2], unit_moves[1::2]):
        assert there == back and device == torch.device("cpu")
        assert all(m is not unet for m in there)  # one unit, never the model
    assert "nothing to offload" in caplog.text


def test_report_records_memory_per_unit(in_ram):
    report = in_ram[1]
    unit = next(u for u in report.units if u.cache_bytes is not None)
    assert unit.peak_ram_bytes > 0 and unit.peak_device_bytes is None and unit.cache_spilled is False
    data = report.to_dict()
    assert {"peak_ram_bytes", "peak_device_bytes", "cache_bytes", "cache_spilled"} <= data["units"][0].keys()
    assert ReconstructionReport.from_dict(data).units == report.units


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_offload_trains_units_on_cuda(model):
    unet, report = _run(model, offload="cpu")
    assert all(p.device.type == "cpu" for p in unet.parameters())
    trained = [u for u in report.units if u.cache_bytes is not None]
    assert all(u.peak_device_bytes is not None for u in trained)
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert max(u.peak_device_bytes for u in trained) < model_bytes + max(u.cache_bytes for u in trained)


def test_quantize_pipeline_checks_cache_dir_before_calibration_and_records_memory(ddim_pipe, tmp_path):
    recon = {"enabled": True, "iterations": 4, "act_iterations": 2, "batch_size": 4, "cache_max_gb": 0.0}
    config = plain(
        weight_bits=4,
        act_bits=8,
        weights={"num_candidates": 10},
        activations={"num_candidates": 10},
        reconstruction=recon,
    )
    fast = {"num_samples": 8, "num_inference_steps": 4, "batch_size": 8, "progress": False}
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = config.replace(reconstruction={**recon, "cache_dir": str(a_file)})
    calls = []
    select = api_module.select_calibration
    api_module.select_calibration = lambda *a, **k: calls.append(1) or select(*a, **k)
    try:
        with pytest.raises(ValueError, match="is not a writable folder"):
            quantize_pipeline(ddim_pipe, bad, **fast)
        assert calls == [] and not hasattr(ddim_pipe.unet, "ptq_state")  # no capture ran, nothing installed
        good = config.replace(reconstruction={**recon, "cache_dir": str(tmp_path / "spill")})
        report = quantize_pipeline(ddim_pipe, good, **fast).unet.ptq_state.reconstruction
    finally:
        api_module.select_calibration = select
    units = [u for u in report["units"] if u["cache_bytes"] is not None]
    assert units and all(u["cache_spilled"] and u["peak_ram_bytes"] > 0 for u in units)
    assert all("peak_device_bytes" in u for u in units)
    assert list((tmp_path / "spill").iterdir()) == []
