"""Files and ports of the benchmark scripts: a result file written whole or not at all, a temporary file a
child process hands its result back through, a free loopback port for a process group, and how a spawned
CPU rank sets itself up."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path` (parents created); an interrupted write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a result file is not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def handoff_file() -> Iterator[Path]:
    """A fresh temporary file for a child process to write its result into; removed afterwards."""
    handle, name = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def free_port() -> int:
    """A TCP port free on the loopback address now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_rank(rank: int, world: int, port: int, timeout: timedelta = timedelta(minutes=30)) -> None:
    """Set up a spawned benchmark process: one torch thread, denormals flushed, and for `world` > 1 its
    place in a Gloo group on the loopback address (rendezvous at `port`)."""
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
        )


def spawn_ranks(target, world: int, *args: Any) -> None:
    """Run `target(rank, world, port, *args)` in `world` spawned processes sharing a fresh loopback port;
    raises if any exits non-zero."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
