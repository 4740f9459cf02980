"""Adaptation on several processes (``torchrun``), on torch.distributed and nothing home-made.

Launched by torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment, WORLD_SIZE > 1),
every rank validates the same inputs, builds the same model and, at every adaptation
step, draws the whole step's batches from the same seeded generator but computes only
its share of them (:func:`share`). The gradients of the adapted parameters and the loss
are then summed over the ranks with one explicit all-reduce (:func:`sum_gradients`), so
every rank takes the same optimiser step; rank 0 alone prints and writes the output.

Why an explicit all-reduce and not DistributedDataParallel: each task's loss is
back-propagated on its own (one task's activations in memory at a time), so a rank runs
as many backward passes as it holds pieces of tasks, and ranks hold different numbers.
DDP reduces inside every backward and needs every rank to run the same number of them
(or ``no_sync`` bookkeeping around all but the last); it would also broadcast the whole
frozen model from rank 0 at start. Only a few small parameters train, so one collective
per step on their flattened gradients is all the communication there is.

Failures end every rank within a bounded time: validation errors are gathered so that
rank 0 prints one line and the others stop quietly (:meth:`World.agree`); a rank that
dies breaks its peers' next collective (connection closed) or, if it hangs, the process
group's timeout (``WEMOE_DIST_TIMEOUT`` seconds, 600 by default) ends the wait; torchrun's
SIGTERM to the survivors becomes a one-line error too. A single process never touches
torch.distributed: its path is the one that existed before.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from wemoe.data import TaskData
from wemoe.errors import ReportedElsewhere, UsageError, WemoeError

TIMEOUT_ENV = "WEMOE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week
T = TypeVar("T")


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise WemoeError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def timeout_seconds() -> float:
    """How long a rank waits for the others in one collective before giving up."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:  # inf and nan too: a timedelta cannot hold them
        raise WemoeError(f"{TIMEOUT_ENV} must be a positive number of seconds up to {MAX_TIMEOUT_S:g}, got {text[:40]!r}")
    return value


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that prints progress and writes the output."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it fails on any, every rank stops (none waits forever).

        Rank 0 raises its own error, or the first other rank's, as one line; the other
        ranks raise :class:`ReportedElsewhere`, which the CLI does not print again.
        """
        if self.size == 1:
            return fn()
        failure: BaseException | None = None
        try:
            value = fn()
        except Exception as exc:
            failure = exc
        reports: list[tuple[str, str] | None] = [None] * self.size
        _collective(lambda: torch.distributed.all_gather_object(reports, _describe(failure)), self, "checking the inputs")
        verdict = first_failure(reports)
        if verdict is None:
            return value
        rank, kind, message = verdict
        if self.main:
            if failure is not None:
                raise failure  # rank 0's own error, exactly as in a single process
            raise (UsageError if kind == "usage" else WemoeError)(f"rank {rank} of {self.size}: {message}")
        raise ReportedElsewhere(f"stopped: rank {rank} failed ({message}); rank 0 reports it", exit_code=2 if kind == "usage" else 1)

    def device(self, resolved: str) -> str:
        """``cuda`` means the rank's own GPU (LOCAL_RANK), so the ranks of one machine do not share one."""
        if self.size == 1 or resolved != "cuda":
            return resolved
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise WemoeError(f"LOCAL_RANK {self.local_rank} has no GPU of its own: this machine has {count}; start at most {count} processes per node")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"


def _describe(failure: BaseException | None) -> tuple[str, str] | None:
    """What one rank tells the others about its failure: (kind, one line)."""
    if failure is None:
        return None
    if isinstance(failure, UsageError):
        return "usage", str(failure)
    if isinstance(failure, WemoeError):
        return "error", str(failure)
    first = str(failure).splitlines()[0] if str(failure) else ""
    return "internal", f"internal error: {type(failure).__name__}: {first}"


def first_failure(reports: list[tuple[str, str] | None]) -> tuple[int, str, str] | None:
    """The lowest rank that failed, with its (kind, message); None when every rank succeeded."""
    for rank, report in enumerate(reports):
        if report is not None:
            return rank, report[0], report[1]
    return None


def launched() -> World | None:
    """The World torchrun describes in the environment; None for a single process (no torchrun, or one rank)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    size = _env_int("WORLD_SIZE")
    if size < 1:
        raise WemoeError(f"WORLD_SIZE={size} is not a number of processes (torchrun sets it to at least 1)")
    if size == 1:
        return None
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < size:
        raise WemoeError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size, local)


def current() -> World:
    """The process group this process has joined (torchrun's, or one the caller set up); else a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World()


def backend(device_spec: str) -> str:
    """gloo for CPU tensors, nccl for CUDA ones: the pair when the run may compute on a GPU."""
    if device_spec != "cpu" and torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _on_sigterm(world: World) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        raise WemoeError(f"{world.label()} was stopped by SIGTERM: torchrun ends every rank when one fails (that rank's error or torchrun's report says why)")

    return handler


@contextmanager
def session(device_spec: str = "auto") -> Iterator[World]:
    """Join the other ranks when launched by torchrun, leave on exit; a single process gets ``World()`` and nothing else.

    A process group that already exists (an enclosing session, or the caller's own) is
    used as it is and left in place.
    """
    joined = current()
    world = launched() if joined.size == 1 else None
    if world is None:
        yield joined
        return
    dist = torch.distributed
    if not dist.is_available():
        raise WemoeError("launched by torchrun, but this torch build has no torch.distributed")
    name = backend(device_spec)
    if "nccl" in name and world.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(world.local_rank)
    seconds = timeout_seconds()
    try:
        dist.init_process_group(name, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        raise WemoeError(f"{world.label()} could not join the other ranks within {seconds:g} s ({_first_line(exc)})") from None
    previous = signal.signal(signal.SIGTERM, _on_sigterm(world)) if _main_thread() else None
    try:
        yield world
        # every rank reaches here before any tears down: a rank whose peer has already
        # destroyed the group can abort at exit ("terminate called without an active exception")
        _collective(dist.barrier, world, "finishing")
    except BaseException:
        global _SESSION_FAILED
        _SESSION_FAILED = True
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


_SESSION_FAILED = False


def session_failed() -> bool:
    """Whether a multi-rank :func:`session` of this process ended by an error (the CLI then exits without C++ teardown)."""
    return _SESSION_FAILED


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _collective(fn: Callable[[], object], world: World, doing: str) -> None:
    """Run one collective; a peer that exited or hung becomes a one-line error on this rank."""
    try:
        fn()
    except RuntimeError as exc:
        text = str(exc).lower()
        why = f"no answer within {timeout_seconds():g} s" if "timed out" in text or "timeout" in text else "its connection closed"
        raise WemoeError(
            f"{world.label()} lost contact with another rank while {doing} ({why}): "
            "that rank exited, crashed or hung; its own error or torchrun's report says why"
        ) from None


def share(sizes: list[int], rank: int, ranks: int) -> list[tuple[int, int, int]]:
    """This rank's pieces ``(task index, start, stop)`` of one step's batches (``sizes[t]`` images of task t).

    The batches, concatenated in task order, are cut into ``ranks`` contiguous parts of
    near-equal size: with as many tasks as ranks (or a multiple) every rank gets whole
    tasks; with fewer tasks than ranks, every rank gets a slice of a task's batch.
    """
    total = sum(sizes)
    lo, hi = total * rank // ranks, total * (rank + 1) // ranks
    pieces, offset = [], 0
    for task, n in enumerate(sizes):
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            pieces.append((task, start - offset, stop - offset))
        offset += n
    return pieces


class StepSchedule:
    """Which images of every adaptation step this rank computes, and how the ranks' results combine.

    Every rank draws the whole step's batches, task after task from the one seeded
    generator, so the draws are those of a single process whatever the number of ranks;
    each rank then computes only its pieces (:func:`share`). A piece of n of a task's B
    images weighs n/B: the objectives are means over a batch's images, so a task's
    weighted pieces sum to its loss and the summed gradients are the single-process ones.
    """

    def __init__(self, data: Mapping[str, TaskData], samplers: Mapping[str, Iterator[np.ndarray]], world: World):
        self.data, self.samplers, self.world = data, samplers, world

    @classmethod
    def start(cls, data: Mapping[str, TaskData], samplers: Mapping[str, Iterator[np.ndarray]], params: list[torch.nn.Parameter]) -> StepSchedule:
        """The schedule of this process; with several ranks, every rank first takes rank 0's starting ``params``."""
        world = current()
        if world.size > 1 and params:
            broadcast_parameters(params, world)
        return cls(data, samplers, world)

    def pieces(self) -> Iterator[tuple[str, TaskData, np.ndarray, float]]:
        """``(task, data, image indices, weight)`` for this rank in one step; a single process gets every task whole."""
        if self.world.size == 1:
            for task, d in self.data.items():
                yield task, d, next(self.samplers[task]), 1.0
            return
        tasks = list(self.data)
        drawn = [next(self.samplers[t]) for t in tasks]
        for i, start, stop in share([len(idx) for idx in drawn], self.world.rank, self.world.size):
            yield tasks[i], self.data[tasks[i]], drawn[i][start:stop], (stop - start) / len(drawn[i])

    def combine(self, params: list[torch.nn.Parameter], local_loss: float) -> float:
        """The step's loss over all ranks, with ``params``' gradients summed likewise (nothing to do in one process)."""
        return local_loss if self.world.size == 1 else sum_gradients(params, local_loss, self.world)


def broadcast_parameters(params: list[torch.nn.Parameter], world: World) -> None:
    """Start every rank from rank 0's values (they are built identically; this makes it certain)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    _collective(lambda: torch.distributed.broadcast(flat, 0), world, "starting the adaptation")
    with torch.no_grad():
        _scatter(flat, params, lambda p, v: p.copy_(v))


def sum_gradients(params: list[torch.nn.Parameter], local_loss: float, world: World) -> float:
    """Sum the gradients of ``params`` and the loss over the ranks (one all-reduce, float64); returns the total loss."""
    device = params[0].device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
    flat = torch.cat([*parts, torch.tensor([local_loss], dtype=torch.float64, device=device)])
    _collective(lambda: torch.distributed.all_reduce(flat), world, "adapting")

    def assign(p: torch.nn.Parameter, value: torch.Tensor) -> None:
        p.grad = value.to(p.dtype).clone()

    _scatter(flat, params, assign)
    return float(flat[-1].item())


def _scatter(flat: torch.Tensor, params: list[torch.nn.Parameter], put: Callable[[torch.nn.Parameter, torch.Tensor], object]) -> None:
    offset = 0
    for p in params:
        put(p, flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "StepSchedule",
    "World",
    "backend",
    "broadcast_parameters",
    "current",
    "first_failure",
    "launched",
    "session",
    "share",
    "sum_gradients",
    "timeout_seconds",
]
