"""Benchmarks, one subpackage each: `quality/` (float vs presets on paired noise, `diffusers-ptq bench`),
`ablation/` (the papers' ablations as quality rows, `bench --ablation`), `speed/` (per-step latency and
memory, `benchmarks/speed.py`) and `metrics/` (FD/IS, Inception FID/sFID/IS, CLIP score). `plotting.py` and
`quanto_row.py` are shared by them. Nothing is imported here: import the subpackage you need.
"""

__all__ = ["ablation", "metrics", "quality", "speed"]
