"""benchmarks/fd_correlation.py: Spearman's rho of FD against the per-step metrics over bench rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_helpers import load_script

script = load_script("benchmarks", "fd_correlation")


def test_ranks_share_ties_and_spearman_is_exact_on_monotone_data():
    assert script.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert script.spearman([1, 2, 3, 4], [10, 20, 35, 90]) == pytest.approx(1.0)
    assert script.spearman([1, 2, 3, 4], [5, 4, 1, 0]) == pytest.approx(-1.0)
    assert script.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)  # 1 - 6*4/(4*15)
    with pytest.raises(ValueError, match="at least 3"):
        script.spearman([1, 2], [1, 2])


def _row(name, fd, sqnr, bias=None, bits=4):
    row = {"name": name, "weight_bits": bits, "metrics": {"FD": [fd]}, "sqnr_db": sqnr}
    if bias is not None:
        row["bias_per_step"] = [bias, bias]
    return row


def test_main_reads_rows_of_several_runs_once_each(tmp_path: Path, capsys):
    a = {
        "rows": [{"name": "float", "weight_bits": None, "metrics": {"FD": [7.0]}}, _row("x", 9.0, 20.0, 0.02)]
    }
    b = {"rows": [_row("x", 9.0, 20.0, 0.02), _row("y", 8.0, 22.0, 0.01), _row("z", 12.0, 18.0, 0.03)]}
    c = {"rows": [_row("old", 10.0, 19.0)]}  # a main-table row from before the bias metric
    paths = []
    for name, data in (("a", a), ("b", b), ("c", c)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "corr.json"
    script.main([*map(str, paths), "--model", "toy", "--output", str(out)])
    result = json.loads(out.read_text())
    assert (result["rows"], result["rows_with_bias"]) == (4, 3)
    assert result["spearman_fd_vs_sqnr"] == pytest.approx(-1.0)
    assert result["spearman_fd_vs_bias"] == pytest.approx(1.0)
    assert "toy: 4 rows" in capsys.readouterr().out
