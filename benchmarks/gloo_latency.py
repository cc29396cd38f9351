"""What one gradient exchange costs on this machine: a Gloo all-reduce between two processes on the
loopback address (one torch thread each) by buffer size, next to a raw TCP round trip of 8 bytes.

    python benchmarks/gloo_latency.py --output benchmarks/results/gloo_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from bench_io import free_port, handoff_file, write_json

SIZES = (10, 1_000, 30_000, 300_000)  # float32 values: a flag, a small unit's gradients, ..., a large one's


def _all_reduce(rank: int, port: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(minutes=5)
    )
    micros = {}
    for n in SIZES:
        t = torch.ones(n)
        for _ in range(20):
            torch.distributed.all_reduce(t)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.distributed.all_reduce(t)
        micros[n] = round((time.perf_counter() - started) / repeats * 1e6, 1)
    torch.distributed.destroy_process_group()
    if rank == 0:
        write_json(Path(out), micros)


def _echo(port: int, repeats: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats):
            c.sendall(c.recv(8))


def tcp_round_trip_us(repeats: int) -> float:
    """Mean time of an 8-byte ping-pong between two processes over loopback TCP."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        peer = mp.get_context("spawn").Process(target=_echo, args=(server.getsockname()[1], repeats))
        peer.start()
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            for _ in range(repeats):
                conn.sendall(b"x" * 8)
                conn.recv(8)
            seconds = time.perf_counter() - started
        peer.join()
    return round(seconds / repeats * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    with handoff_file() as side:  # rank 0 writes its timings here
        mp.spawn(_all_reduce, args=(free_port(), args.repeats, str(side)), nprocs=2)
        all_reduce = json.loads(side.read_text())
    result = {
        "command": " ".join(["python", "benchmarks/gloo_latency.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process",
        "torch": torch.__version__,
        "all_reduce_us_by_float32_values": all_reduce,
        "tcp_round_trip_us": tcp_round_trip_us(args.repeats),
    }
    print(result)
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
