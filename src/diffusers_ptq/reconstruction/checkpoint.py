"""Resume checkpoints: what each finished unit learned, so an interrupted run continues where it stopped.

Layout of `checkpoint_dir`:
- `progress.json`: format version, the reconstruction config, the unit list, fingerprints of the
  calibration rows and of the quantized model, and the finished (pass, unit) entries with their reports;
- one `<pass>-<index>.safetensors` per finished entry: the unit's AdaRound round-up masks (bit-packed
  uint8) and/or its activation step-size tables (float32).
Each file is written beside its final name, synced, then renamed (atomic on POSIX): an interruption leaves
the previous state, and a unit file the manifest does not list yet is simply redone. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.quantizers import TimestepActQuantizer

FORMAT_VERSION = 1
MANIFEST = "progress.json"
# Fields that change how long a run takes, not what a finished unit learned.
RESUMABLE_FIELDS = ("max_minutes",)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 values per byte (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)


def _sha(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_fingerprint(data: CalibrationSet, rows: torch.Tensor) -> str:
    """Hash of the rows reconstruction uses (inputs and timesteps)."""
    kwargs = data.unet_kwargs(rows)
    tensors = [rows, data.train_timesteps[rows]]
    for name in sorted(kwargs):
        value = kwargs[name]
        values = [value[k] for k in sorted(value)] if isinstance(value, dict) else [value]
        tensors += [v for v in values if torch.is_tensor(v)]
    return _sha(tensors)


def model_fingerprint(unet: nn.Module) -> str:
    """Hash of every quantizer's grid as quantized (before reconstruction changes anything)."""
    tensors = []
    for _, m in sorted(unet.named_modules(), key=lambda item: item[0]):
        if isinstance(m, QuantLayerMixin):
            tensors += [t for q in m.weight_quantizers for t in (q.scale, q.zero_point)]
        elif isinstance(m, TimestepActQuantizer):
            tensors += [m.scale, m.zero_point, m.group_map]
    return _sha(tensors)


def _atomic_write(path: Path, write: Any) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        write(partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; some platforms cannot open directories
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ResumeCheckpoint:
    """The progress of one reconstruction run in `directory` (created on first use)."""

    def __init__(
        self, directory: str | os.PathLike[str], identity: dict[str, Any], writer: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.writer = writer  # False: record finished units in memory only (ranks other than 0)
        self.finished: list[dict[str, Any]] = []
        path = self.directory / MANIFEST
        if path.is_file():
            self._load(path)
        elif self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint_dir {self.directory} exists and is not a directory")

    def _load(self, path: Path) -> None:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the reconstruction checkpoint {path}: {err}") from err
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {version!r}; this diffusers-ptq reads version {FORMAT_VERSION}"
            )
        stored = manifest.get("identity", {})
        differs = _differences(stored, self.identity)
        if differs:
            raise ValueError(
                f"the reconstruction checkpoint in {self.directory} belongs to another run "
                f"({', '.join(differs)} differ); resume with the same quantized model, calibration rows and "
                "reconstruction config, or pass a new checkpoint_dir"
            )
        self.finished = list(manifest.get("finished", []))

    def entry(self, phase: str, unit: str) -> dict[str, Any] | None:
        return next((e for e in self.finished if e["phase"] == phase and e["unit"] == unit), None)

    def load(self, entry: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, shapes) of a finished entry; masks are still packed."""
        path = self.directory / entry["file"]
        try:
            tensors = safetensors.torch.load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for missing or corrupt files
            raise ValueError(f"cannot read {path} of the reconstruction checkpoint: {err}") from err
        return tensors, entry.get("shapes", {})

    def save(
        self, phase: str, index: int, unit: str, tensors: dict[str, torch.Tensor], shapes: dict, report: dict
    ) -> None:
        name = f"{phase}-{index:04d}.safetensors"
        entry = {"phase": phase, "unit": unit, "file": name, "shapes": shapes, "report": report}
        self.finished = [e for e in self.finished if not (e["phase"] == phase and e["unit"] == unit)]
        self.finished.append(entry)
        if not self.writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write(self.directory / name, lambda p: safetensors.torch.save_file(tensors, str(p)))
        manifest = {"format_version": FORMAT_VERSION, "identity": self.identity, "finished": self.finished}
        text = json.dumps(manifest, indent=1)
        _atomic_write(self.directory / MANIFEST, lambda p: p.write_text(text))


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out


def run_identity(config: dict[str, Any], units: list[str], data_hash: str, model_hash: str) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed."""
    return {
        "config": {k: v for k, v in config.items() if k not in RESUMABLE_FIELDS},
        "units": units,
        "calibration": data_hash,
        "model": model_hash,
    }
