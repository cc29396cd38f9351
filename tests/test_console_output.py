"""The README's first command prints only what diffusers-ptq says: no notices from other libraries."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# What the quantize command itself prints: its own messages, the report (indented), and progress bars
# that carry one of its labels.
# This project's own progress bars: calibration, the default recipe's GPTQ / sensitivity / correction passes.
_BARS = r"(calibration: [^:]+|comparison: [^:]+|gptq|sensitivity|bias correction: [^:]+)"
OWN_LINE = re.compile(rf"^(diffusers-ptq[: ]|  \S|{_BARS}:\s*\d+%)")


@pytest.mark.slow  # ~33 s on 2 CPU cores
def test_quantize_prints_nothing_from_other_libraries(tmp_path: Path) -> None:
    # The README's first command on the shipped model, in a fresh interpreter (import-time notices count),
    # made cheaper by fewer samples and steps; the imports and code paths are the same.
    argv = ["quantize", "--output", str(tmp_path / "out"), "--num-samples", "16"]
    argv += ["--num-inference-steps", "8", "--samples", "2"]
    code = "import sys; from diffusers_ptq.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip("\n") for line in re.split(r"[\r\n]+", proc.stdout + proc.stderr) if line.strip()]
    foreign = [line for line in lines if not OWN_LINE.match(line)]
    assert foreign == [], "\n".join(foreign)
    assert any(line.startswith("diffusers-ptq: wrote") for line in lines)
