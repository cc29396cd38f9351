"""Atomic directory writes: build the new directory beside the target, then rename it into place.

An interrupted save (exception, SIGKILL, power loss after the files were synced) therefore leaves either the
previous directory or nothing at the target path, never a half-written checkpoint that looks valid. What an
interrupted save leaves behind is a hidden `.<name>.<random>.partial` sibling, which no loader looks at.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

# Top-level files of a replaced directory that a new save does not write are carried over (a README.md,
# a LICENSE), except stale checkpoint files and configs, which belong to the previous save.
CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.json", "*.partial")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], carry_over: bool = True) -> Iterator[Path]:
    """Yield an empty directory to write into; on success it replaces `target` by rename.

    On an exception the partial directory is removed and `target` is left as it was. `carry_over` keeps the
    old directory's non-checkpoint top-level files (README.md, LICENSE) that the new one does not write.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            f"{target} exists and is not a directory; choose a directory path to save to"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _fresh_sibling(target, "partial")
    try:
        yield partial
        if carry_over:
            _carry_over(target, partial)
        _sync_tree(partial)
        _replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _fresh_sibling(target: Path, suffix: str) -> Path:
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.{suffix}")
        try:
            path.mkdir()  # os.mkdir honours the umask, unlike tempfile.mkdtemp (always 0o700)
        except FileExistsError:
            continue
        return path


def _carry_over(old: Path, new: Path) -> None:
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if not entry.is_file() or (new / entry.name).exists():
            continue
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in CHECKPOINT_PATTERNS):
            continue
        shutil.copy2(entry, new / entry.name)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so the rename never publishes unwritten data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(dirpath))


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
    else:
        # rename() cannot replace a non-empty directory: move the old one aside first. Between the two renames
        # the target path is briefly absent, never half-written.
        old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _sync_dir(target.parent)
