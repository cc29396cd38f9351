"""benchmarks/reconstruction_schedule.py on a tiny SD UNet (the SD 1.5 run is in benchmarks/gpu_checks.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_ptq.tiny import tiny_unet2d
from script_helpers import load_script


@pytest.mark.slow  # three small reconstructions: about a minute
def test_measures_every_unit_and_extrapolates_the_published_schedule(tmp_path: Path) -> None:
    script = load_script("benchmarks", "reconstruction_schedule")
    config = {k: v for k, v in dict(tiny_unet2d(sample_size=8).config).items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "schedule.json"
    args = ["--config", str(tmp_path / "config.json"), "--device", "cpu", "--latent", "8", "--tokens", "5"]
    args += ["--rows", "8", "--iterations", "2", "--batch-size", "4", "--devices", "2", "--no-progress"]
    result = script.main([*args, "--json", str(out)])
    assert json.loads(out.read_text())["hours_1_device"] == result["hours_1_device"]
    full, per_rank = result["units_full_batch"], result["units_per_rank_batch"]
    assert {u["phase"] for u in full} == {"weights", "acts"}
    assert [(u["unit"], u["phase"]) for u in full] == [(u["unit"], u["phase"]) for u in per_rank]
    assert all(u["step_s"] > 0 and u["overhead_s_per_row"] > 0 for u in full)
    assert any(u["grad_bytes"] > 0 for u in full if u["phase"] == "weights")
    # By hand for the first unit: published steps x step time + rows x per-row overhead.
    u = full[0]
    steps = script.PUBLISHED[u["phase"]]
    assert steps * u["step_s"] + 1024 * u["overhead_s_per_row"] <= result["hours_1_device"] * 3600
    assert result["hours_1_device"] > 0 and result["hours_2_devices"] > 0
    assert result["speedup"] == pytest.approx(result["hours_1_device"] / result["hours_2_devices"], rel=1e-12)
    # Half the batch and half the caching per rank: a gain, but the timings of 2-step runs on a shared CPU
    # are too noisy to bound it above (CI measured 4.0 once): only "not a slowdown beyond noise" is checked.
    assert result["speedup"] > 0.5
