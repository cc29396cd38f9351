"""benchmarks/reconstruction_memory.py: meta-device shapes against real block caches; its committed result."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusers_ptq.reconstruction import ReconstructionConfig, reconstruction_units
from diffusers_ptq.tiny import tiny_sd_pipeline
from reconstruction_helpers import full_cache, quantized
from script_helpers import ROOT, load_script

RESULT = ROOT / "benchmarks" / "results" / "reconstruction_memory.json"


def test_meta_measurement_equals_the_real_cache_and_main_writes_json(tmp_path: Path) -> None:
    script = load_script("benchmarks", "reconstruction_memory")
    float_unet = tiny_sd_pipeline().unet
    config = {k: v for k, v in dict(float_unet.config).items() if not k.startswith("_")}
    unet, data = quantized("sd", rows=5)
    measured = script.measure(config, latent=8, cache_dtype="float32", tokens=5)
    per_row = {u["unit"]: u["cache_bytes_per_row"] for u in measured["units"]}
    units = reconstruction_units(unet, ReconstructionConfig(), data)
    assert {u.name for u in units} == set(per_row)  # the same units as block_map forms
    for unit in units:
        assert full_cache(unet, unit, data, rows=2, acts_on=False).nbytes == 2 * per_row[unit.name], unit.name
    assert measured["params"] == sum(p.numel() for p in float_unet.parameters())

    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "memory.json"
    result = script.main(["--config", str(tmp_path / "config.json"), "--latent", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    entry = next(iter(result["models"].values()))
    none_ram, none_spill, cpu_ram, _ = entry["settings"]
    assert cpu_ram["device_gib"] <= none_ram["device_gib"] and none_spill["ram_gib"] <= none_ram["ram_gib"]


def test_committed_result_covers_sd15_and_sdxl() -> None:
    result = json.loads(RESULT.read_text())
    assert set(result["models"]) == {"sd15", "sdxl"} and result["cache_dtype"] == "float16"
    assert result["models"]["sd15"]["latent"] == 64 and result["models"]["sdxl"]["latent"] == 128
    assert result["models"]["sd15"]["params"] == 859_520_964
    assert torch.tensor([len(m["settings"]) for m in result["models"].values()]).eq(4).all()
