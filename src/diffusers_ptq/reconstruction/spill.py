"""Where a unit's block cache lives: in RAM, or spilled to memory-mapped safetensors files on disk.

`reconstruction.cache_max_gb` bounds the RAM a unit's cache may take. Before a unit's cache is built its
size is estimated (cached bytes of one row, measured on one probe row, times the rows); a larger cache is
written to one safetensors file per cached tensor in a temporary folder under `reconstruction.cache_dir`.
Each file is a standard safetensors file (8-byte header length, JSON header padded to 8 bytes, raw data)
whose data part is mapped shared into memory and filled batch by batch, so the cache is never held in RAM
at once; the trainer reads its mini-batches from the mapping. The values are the ones the RAM cache holds,
so training is bit-identical. The folder is removed when the unit is done and, with everything in it, when
the run ends, also on failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

GB = 1024**3
_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def cache_root(cache_dir: str | None) -> Path:
    """The folder spilled caches go under: `cache_dir`, or the system temporary folder when it is None."""
    return Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())


def check_cache_dir(cache_dir: str | None, needed_bytes: int = 0, path: str = "reconstruction") -> None:
    """ValueError unless the spill folder exists (or can be created), is writable and has `needed_bytes` free.

    Cheap: call it before any calibration or reconstruction work.
    """
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}.cache_dir={str(root)!r} is not a writable folder: {e}") from e
    try:  # a real write: permission bits alone do not say (root, read-only mounts)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise ValueError(f"{path}.cache_dir={str(root)!r} is not a writable folder: {e}") from e
    free = shutil.disk_usage(root).free
    if needed_bytes > free:
        raise ValueError(
            f"{path}.cache_dir={str(root)!r} has {free / GB:.2f} GB free but the largest block cache that "
            f"would spill there needs {needed_bytes / GB:.2f} GB; free space, choose another cache_dir or "
            "raise cache_max_gb"
        )


def mapped_safetensors(path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new safetensors file at `path` holding one tensor `name`, returned as a tensor mapped onto the
    file's data (shared: what is written to the tensor is written to the file)."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise TypeError(f"cannot spill a {dtype} tensor to safetensors")
    numel = math.prod(shape)
    element = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * element
    header = json.dumps(
        {name: {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)  # the data then starts 8-byte aligned, a multiple of any element
    start = 8 + len(header)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.flush()
        if nbytes and hasattr(os, "posix_fallocate"):
            # Reserve the blocks now: a full disk is an OSError here, not a crash while writing the mapping.
            os.posix_fallocate(f.fileno(), start, nbytes)
        else:
            f.truncate(start + nbytes)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=start + nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, start // element, shape)


class CacheStore:
    """Allocates the rows of the cache of the unit being built: `torch.empty` in RAM, or mapped files.

    Use as a context manager around the whole run: its temporary folder is created on the first spill and
    removed on exit, whatever happened.
    """

    def __init__(self, cache_dir: str | None, max_gb: float | None) -> None:
        self.root = cache_root(cache_dir)
        self.max_bytes = None if max_gb is None else int(max_gb * GB)
        self.folder: Path | None = None
        self.unit_folder: Path | None = None
        self.count = 0

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spills(self, estimated_bytes: int) -> bool:
        return self.max_bytes is not None and estimated_bytes > self.max_bytes

    def begin_unit(self, spill: bool) -> None:
        """Start a unit's cache: its tensors go to a fresh folder of files when `spill`, else to RAM."""
        self.end_unit()
        if spill:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="diffusers-ptq-cache-", dir=self.root))
            self.count += 1
            self.unit_folder = self.folder / f"unit{self.count}"
            self.unit_folder.mkdir()

    @property
    def spilling(self) -> bool:
        return self.unit_folder is not None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.unit_folder is None:
            return torch.empty(shape, dtype=dtype)
        index = len(list(self.unit_folder.iterdir()))
        return mapped_safetensors(self.unit_folder / f"{index}.safetensors", "rows", shape, dtype)

    def end_unit(self) -> None:
        """Delete the last unit's files (its cache must no longer be used)."""
        if self.unit_folder is not None:
            shutil.rmtree(self.unit_folder, ignore_errors=True)
            self.unit_folder = None

    def close(self) -> None:
        self.end_unit()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
