"""Tests of the helper scripts in benchmarks/ (tiny shapes and stand-in results)."""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from diffusers_ptq.integer.features import onednn_available
from script_helpers import load_script


def _load(name: str) -> ModuleType:
    return load_script("benchmarks", name)


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN int8 ops")
def test_gemm_split_rows_are_exact_and_written(tmp_path: Path) -> None:
    script = _load("gemm_split")
    out = tmp_path / "gemm.json"
    argv = ["--shape", "96", "72", "24", "--repeats", "2", "--warmup", "0", "--output", str(out)]
    assert script.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["shape"] == {"M": 96, "K": 72, "N": 24}
    assert set(result["median_ms"]) == {
        "fp32",
        "int8 (one GEMM, no split)",
        "int8 split pair (W8A8)",
        "int8 split concat [a | a]",
    }
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN int8 ops")
def test_gemm_split_check_catches_a_wrong_row() -> None:
    script = _load("gemm_split")
    rows, operands = script.gemm_rows(32, 16, 8)
    rows["int8 split pair (W8A8)"] = rows["int8 (one GEMM, no split)"]  # W4 codes where W8 is expected
    with pytest.raises(RuntimeError, match="split pair"):
        script.check(rows, operands)


def test_gemm_split_rejects_bad_shape(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _load("gemm_split").main(["--shape", "0", "8", "8"])
    assert "--shape must be positive" in capsys.readouterr().err


def _selector_run(directory: Path, size: int, study: str = "selectors") -> Path:
    rows = [
        {"selector": None, "size": None, "metrics": {"FD": [50.0]}, "sqnr_db": None},
        {"selector": "random", "size": size, "metrics": {"FD": [60.0, 62.0]}, "sqnr_db": 20.0},
        {"selector": "density_diversity", "size": size, "metrics": {"FD": [55.0]}, "sqnr_db": 19.0},
    ]
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps({"study": study, "rows": rows}))
    return directory


def test_plot_selector_sizes_merges_runs(tmp_path: Path) -> None:
    script = _load("plot_selector_sizes")
    runs = [_selector_run(tmp_path / f"n{n}", n) for n in (128, 512)]
    series, float_fd = script.load_rows(runs)
    assert float_fd == 50.0
    assert series["random"] == {128: (61.0, 20.0), 512: (61.0, 20.0)}
    out = tmp_path / "plot.png"
    assert script.main([*map(str, runs), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_selector_sizes_refuses_another_study(tmp_path: Path) -> None:
    run = _selector_run(tmp_path / "groups", 128, study="groups")
    with pytest.raises(ValueError, match="'groups' study, not 'selectors'"):
        _load("plot_selector_sizes").load_rows([run])


def test_group_conv_speed_rows_agree_with_fake_quant(tmp_path: Path) -> None:
    script = _load("group_conv_speed")
    out = tmp_path / "speed.json"
    argv = ["--channels", "64", "--size", "6", "--group-sizes", "32", "--repeats", "1", "--output", str(out)]
    result = script.main(argv)
    assert json.loads(out.read_text()) == result
    rows = {row["row"]: row for row in result["rows"]}
    assert "fake quant" in rows and "per_group 32 int_mm" in rows and "per_channel int_mm" in rows
    assert rows["per_group 32 int_mm"]["group_size_in_effect"] == 32
    assert rows["per_channel int_mm"]["group_size_in_effect"] is None
    assert all(row.get("max_abs_error", 0.0) < 1e-4 for row in result["rows"])


def test_committed_group_conv_speed_result_has_group_rows() -> None:
    result = json.loads((Path(__file__).parents[1] / "benchmarks/results/group_conv_speed.json").read_text())
    groups = [row for row in result["rows"] if row["row"].startswith("per_group")]
    assert groups and all(row["group_size_in_effect"] == int(row["row"].split()[1]) for row in groups)


def test_write_json_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    bench_io = load_script("benchmarks", "bench_io")
    out = tmp_path / "results" / "r.json"
    umask = os.umask(0o022)
    try:
        bench_io.write_json(out, {"a": 1})
    finally:
        os.umask(umask)
    assert json.loads(out.read_text()) == {"a": 1}
    assert out.stat().st_mode & 0o777 == 0o644  # as a plain write leaves it, not mkstemp's 0600
    with pytest.raises(TypeError):
        bench_io.write_json(out, {"a": object()})  # not JSON: fails mid-way
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]


def test_gloo_latency_times_all_reduce_and_tcp(tmp_path):
    load_script("benchmarks", "bench_io")  # puts benchmarks/ on sys.path
    # Spawned ranks unpickle the script's functions by module name: import it under its own.
    script = importlib.import_module("gloo_latency")
    out = tmp_path / "gloo.json"
    assert script.main(["--repeats", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["all_reduce_us_by_float32_values"]) == {str(n) for n in script.SIZES}
    assert all(v > 0 for v in result["all_reduce_us_by_float32_values"].values())
    assert result["tcp_round_trip_us"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gloo.json"]  # the ranks' side file is gone


def test_cache_spill_memory_samples_the_resident_set_peak():
    script = load_script("benchmarks", "cache_spill_memory")
    sampler = script.Sampler(interval=0.001)
    sampler.start()
    before = sampler.mark()
    block = bytearray(64 * 1024**2)  # 64 MiB of anonymous memory, touched
    block[::4096] = b"x" * len(block[::4096])

    time.sleep(0.05)
    sampler.running = False
    sampler.join()
    grew = sampler.peak["RssAnon"] - before["RssAnon"]
    del block
    assert grew >= 60 * 1024**2


def test_distributed_steps_splits_each_wait_into_collective_and_imbalance(capsys):
    script = load_script("benchmarks", "distributed_steps")
    # (own work s, wait in the gradient sum s, gradient size); the first step of a unit (own work over
    # 0.2 s: caching before it) is left out.
    rank0 = [(0.010, 0.001, 10), (0.012, 0.004, 200_000), (0.5, 0.001, 10)]
    rank1 = [(0.011, 0.002, 10), (0.010, 0.006, 200_000), (0.5, 0.001, 10)]
    parts = script._decompose([{"steps": rank0}, {"steps": rank1}])
    assert parts["under 100"] == {
        "steps": 1,
        "own_work_ms": 10.0,
        "collective_ms_mean": 1.0,
        "collective_ms_median": 1.0,
        "imbalance_ms_mean": 1.0,
    }
    assert parts["over 100k"]["collective_ms_mean"] == 4.0
    assert parts["over 100k"]["imbalance_ms_mean"] == 2.0
    assert "100 to 100k" not in parts
    with pytest.raises(SystemExit):
        script.main(["--world", "1", "--output", "unused.json"])
    assert "--world 1 is invalid" in capsys.readouterr().err
