"""Running `quantize_pipeline` on N processes of an initialised torch.distributed group.

The group is the caller's (`torchrun`, `accelerate launch`, or `torch.distributed.init_process_group`);
nothing here initialises one. Every collective of a run goes through `exchange`, an all-gather of a tagged
Python object, so that a rank that failed tells the others at their next exchange and every rank raises the
same error instead of waiting forever. A rank that dies without raising (killed, out of memory) is caught
only by the group's own timeout (the `timeout=` of `init_process_group`; torch's default is 10 minutes for
NCCL and 30 for Gloo): set one that fits the longest stage between two exchanges.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

__all__ = [
    "RankFailure",
    "all_reduce_sum",
    "broadcast_module",
    "check_same",
    "collective",
    "exchange",
    "gather_rows",
    "guard",
    "hold_failure",
    "init_from_environment",
    "is_initialized",
    "is_main_process",
    "launched",
    "module_checksum",
    "own_share",
    "rank",
    "split_evenly",
    "world_size",
]


logger = logging.getLogger("diffusers_ptq")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Whether this process was started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Initialise the default process group from the variables torchrun / accelerate launch set.

    NCCL when CUDA is available (each rank on the GPU `LOCAL_RANK`), else Gloo. `timeout` bounds every
    collective, so a rank that died unannounced stops the others after it. No-op when a group exists.
    """
    if is_initialized():
        return
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=True needs a launcher's environment ({', '.join(LAUNCH_VARIABLES)}); "
            f"{', '.join(missing)} not set: start with `torchrun --nproc-per-node N ...` or "
            "`accelerate launch ...`, or initialise a process group yourself"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=timeout)
    logger.info("torch.distributed: rank %d of %d (%s)", rank(), world_size(), backend)


class RankFailure(RuntimeError):
    """A rank failed (or ranks fell out of step); raised with the same message on every rank."""


def is_initialized() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, or without a process group: the rank that logs and writes files."""
    return rank() == 0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def exchange(stage: str, payload: Any = None, error: BaseException | None = None) -> list[Any]:
    """Every rank's `payload` in rank order; raise on every rank when any rank reports an `error`.

    All ranks must call it the same number of times; `stage` names the call so ranks that fell out of
    step are reported instead of mixing their payloads. Without a process group: `[payload]`.
    """
    if not is_initialized():
        if error is not None:
            raise error
        return [payload]
    mine = (stage, None if error is None else _describe(error), payload)
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, mine)
    failed = [(r, s, e) for r, (s, e, _) in enumerate(gathered) if e is not None]
    if failed:
        messages = {e for _, _, e in failed}
        if error is not None and len(failed) == len(gathered) and messages == {_describe(error)}:
            raise error  # every rank failed alike (a bad argument): the error itself, on every rank
        r, s, e = failed[0]
        raise RankFailure(f"rank {r} of {len(gathered)} failed during {s}: {e}") from error
    stages = [s for s, _, _ in gathered]
    if len(set(stages)) != 1:
        raise RankFailure(f"ranks are out of step (stage per rank: {stages})")
    return [p for _, _, p in gathered]


@contextlib.contextmanager
def guard(stage: str) -> Iterator[None]:
    """Run the body on every rank; a failure on any rank raises on all of them (see `exchange`).

    A local exception is reported at one final exchange; a `RankFailure` (already agreed on) is re-raised
    as it is. On success the ranks exchange once more, so a rank never leaves while another has failed.
    """
    if not is_initialized():
        yield
        return
    try:
        yield
    except RankFailure:
        raise
    except Exception as error:
        exchange(stage, error=error)
        raise  # unreachable: exchange raised
    exchange(stage)


def collective(stage: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the whole call runs under `guard(stage)`, its argument checks and planning included."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with guard(stage):
                return fn(*args, **kwargs)

        return wrapper

    return decorator


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value (sorted keys; other objects by their repr)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def module_checksum(module: nn.Module) -> list[Any]:
    """Per parameter and buffer: name, shape, dtype, and float64 sum and absolute sum (on its device).

    Not a cryptographic hash: enough to tell ranks that loaded different weights apart, without copying a
    multi-gigabyte UNet to the CPU.
    """
    out = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        entry: list[Any] = [name, list(t.shape), str(t.dtype)]
        if t.device.type != "meta":  # offloaded weights have no values here
            values = t.detach().double()
            entry += [float(values.sum()), float(values.abs().sum())]
        out.append(entry)
    return out


def check_same(what: str, value: Any) -> None:
    """ValueError on every rank when ranks hold different `value`s (compared by `fingerprint`)."""
    hashes = exchange(f"check {what}", fingerprint(value))
    if len(set(hashes)) != 1:
        raise ValueError(
            f"ranks disagree on {what} (hash per rank: {hashes}); every rank must make the same call"
        )


def split_evenly(count: int, parts: int, what: str = "items", allow_empty: bool = False) -> list[range]:
    """`count` items as `parts` contiguous ranges, the first `count % parts` one longer.

    ValueError when `count < parts` (a rank would get none) unless `allow_empty`.
    """
    if count < parts and not allow_empty:
        raise ValueError(f"{count} {what} cannot be split among {parts} ranks: each rank needs at least one")
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for p in range(parts):
        stop = start + base + (p < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def own_share(count: int, what: str = "items", allow_empty: bool = False) -> range:
    """This rank's contiguous range of `split_evenly(count, world_size())` (all of it in one process)."""
    return split_evenly(count, world_size(), what, allow_empty)[rank()]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy `module`'s parameters and buffers from rank `src` to every rank, in place.

    Ranks first compare the names, shapes and dtypes (a mismatch raises RankFailure on every rank rather
    than hanging in a broadcast of the wrong size).
    """
    if not is_initialized():
        return
    tensors = [*module.named_parameters(), *module.named_buffers()]
    layout = [(name, list(t.shape), str(t.dtype)) for name, t in tensors]
    if len(set(exchange("broadcast layout", fingerprint(layout)))) != 1:
        raise RankFailure("ranks hold modules of different layouts; cannot broadcast the parameters")
    for _, tensor in tensors:
        buffer = tensor.data if tensor.data.is_contiguous() else tensor.data.contiguous()
        torch.distributed.broadcast(buffer, src)
        if buffer is not tensor.data:
            tensor.data.copy_(buffer)


def _collective_device(tensors: list[torch.Tensor]) -> torch.device:
    if tensors:
        return tensors[0].device
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_reduce_sum(
    tensors: list[torch.Tensor],
    stage: str,
    error: BaseException | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Sum `tensors` over ranks in place (one flat buffer of `dtype`, one collective), carrying a failure
    flag.

    A rank whose local work raised passes its `error` (its tensors are then ignored): every rank sees the
    flag and raises the same error through `exchange`, instead of the others waiting for a rank that left.
    Without a process group: raises `error` if given, else nothing changes.
    """
    if not is_initialized():
        if error is not None:
            raise error
        return
    device = _collective_device(tensors)
    flag = torch.tensor([0.0 if error is None else 1.0], device=device, dtype=dtype)
    # Gradients and loss sums are float32 (float64 for sums that need it); every rank receives the one
    # reduced buffer, so the ranks agree bit for bit.
    if error is None:
        parts = [t.reshape(-1).to(device=device, dtype=dtype) for t in tensors]
    else:
        parts = [torch.zeros(t.numel(), device=device, dtype=dtype) for t in tensors]
    flat = torch.cat([*parts, flag])
    torch.distributed.all_reduce(flat)
    if float(flat[-1]) > 0:
        exchange(stage, error=error)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(local: torch.Tensor | None, stage: str, error: BaseException | None = None) -> torch.Tensor:
    """Every rank's `local` rows (dim 0, on the CPU) concatenated in rank order; a rank may hold none (None).
    `error`: this rank's failure, raised on every rank. Without a group: `local` (or raises `error`)."""
    if not is_initialized():
        if error is not None:
            raise error
        return local
    shares = exchange(stage, None if local is None else local.cpu(), error)
    return torch.cat([t for t in shares if t is not None])


class LocalFailure:
    """The exception a rank's local work raised, held for the next collective to raise on every rank."""

    error: BaseException | None = None


@contextlib.contextmanager
def hold_failure() -> Iterator[LocalFailure]:
    """Run the body. Without a process group its exception propagates; with one it is kept in the yielded
    holder, whose `.error` the caller hands to the next collective (`all_reduce_sum`, `exchange`,
    `gather_rows`), so no rank is left waiting for one that left."""
    held = LocalFailure()
    try:
        yield held
    except Exception as err:
        if not is_initialized():
            raise
        held.error = err
