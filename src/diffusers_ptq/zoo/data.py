"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzip), as tensors in [-1, 1]."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_TYPES:
        raise ValueError(f"{path}: IDX element type 0x{dtype:02x} is not supported (only unsigned bytes)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=_IDX_TYPES[dtype], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def load_fashion_mnist(
    split: str = "train", size: int = 32, root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, size, size) in [-1, 1] (bilinear resize from 28x28) and int64 labels.

    Raises FileNotFoundError naming the Debian package when the files are not installed.
    """
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not valid; choose one of {sorted(_FILES)}")
    root = Path(root) if root is not None else DATASET_DIR
    image_file, label_file = (root / name for name in _FILES[split])
    missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install it with "
            f"`sudo apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu), or pass root= to a folder holding "
            "the four IDX .gz files."
        )
    images = torch.from_numpy(read_idx(image_file).copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(-1.0, 1.0), labels


# Colour Fashion-MNIST: no colour image dataset was found packaged for offline use (Debian's only image
# dataset package is Fashion-MNIST), so the second benchmark model's data is made deterministically from the
# real Fashion-MNIST items: each image gets its own foreground and background RGB colour (uniform, redrawn
# until they are at least `_MIN_CONTRAST` apart), intensity i in [0, 1] maps to bg + (fg - bg) * i. Train and
# test differ in seed.
_COLOUR_SEEDS = {"train": 1, "test": 2}
_MIN_CONTRAST = 0.5


def item_colours(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image foreground and background RGB colours in [0, 1], each (count, 3), deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    fg, bg = torch.rand(count, 3, generator=generator), torch.rand(count, 3, generator=generator)
    while True:
        low = (fg - bg).norm(dim=1) < _MIN_CONTRAST
        if not low.any():
            return fg, bg
        n = int(low.sum())
        fg[low], bg[low] = torch.rand(n, 3, generator=generator), torch.rand(n, 3, generator=generator)


def load_colour_fashion(
    split: str = "train", size: int = 16, root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colourised Fashion-MNIST: float32 images (N, 3, size, size) in [-1, 1], int64 labels, and the
    (N, 6) foreground and background colours in [0, 1] each image was painted with.

    Items are resized from 28x28 with antialiased bilinear interpolation before colouring.
    """
    if split not in _COLOUR_SEEDS:
        raise ValueError(f"split={split!r} is not valid; choose one of {sorted(_COLOUR_SEEDS)}")
    gray, labels = load_fashion_mnist(split, size=28, root=root)
    if size != 28:
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    intensity = gray.add(1.0).mul_(0.5).clamp_(0.0, 1.0)
    fg, bg = item_colours(len(gray), _COLOUR_SEEDS[split])
    rgb = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * intensity
    return rgb.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0), labels, torch.cat([fg, bg], dim=1)
