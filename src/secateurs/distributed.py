"""Data-parallel workers: one model copy per process, the work of each evaluation shared between them.

Where the sharing happens: `SubmodelEvaluator.losses` (the masks and windows of one call) and
`scoring.stats.collect_stats` (the calibration windows of a statistics pass). Every other step runs on
every rank with the same inputs (the repair; the policy gradient's repair bank, whose dense pass would
need every batch's Gram matrices gathered to be shared exactly), so every rank holds the same numbers
and the same (pruned) model, and
Bonsai and the policy gradient never know how many workers there are. Rank 0 alone writes files
(`on_main`: checkpoints, caches, the output) and logs; the other ranks stay quiet.

Bit-identical results whatever the number of workers. A call's work is cut into micro-batches by global
row index (rows `[j * max_rows, (j + 1) * max_rows)` of the masks x windows product), the same cut for
1, 2 or N workers; micro-batch j runs on rank `j % world` (`my_share`). Each rank writes its results
into a zero tensor of the full size and `gather_disjoint` sums them over ranks: every entry is one rank's
value plus zeros, which is exact in floating point (`x + 0 == x`), so every rank ends with the very
numbers one process would have computed, in the same order. Statistics passes gather per-batch partial
moments the same way and merge them in batch order on every rank (`collect_stats`).

Starting workers: `torchrun --nproc-per-node N -m secateurs prune ...` (the environment names the rank,
world and rendezvous), or `secateurs prune ... --workers N`, which starts N local copies of the same
command line itself (`launch`): gloo over 127.0.0.1 on CPU, NCCL on CUDA with one GPU per rank
(`cuda:LOCAL_RANK`); each rank gets `cores / N` threads.

Failure: `launch` watches its workers; when one dies (a signal, a non-zero exit), the others are stopped
and the error names it. Under torchrun, its agent does the same. Every collective also has a timeout
(`timeout_s`, `SECATEURS_DIST_TIMEOUT`, default 30 min): longer than the longest phase that only rank 0
works in (the first conversion of the default model, the save of a large output), so a rank that waits
for rank 0 is never stopped early, and a hung peer ends the run instead of hanging it forever. A lost
peer is a `WorkerError` (one line), never a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from secateurs.errors import ConfigError, SecateursError, WorkerError, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "SECATEURS_DIST_TIMEOUT"
# Seconds a rank waits in one collective. Longer than any rank-0-only phase: converting the default
# model on first use (~45 s on 2 quiet cores, minutes on a busy machine), reading a checkpoint, saving
# a 70B output (~10 min to a local disk).
DEFAULT_TIMEOUT_S = 1800.0
THREADS_ENV = "SECATEURS_THREADS"  # threads per rank, set by `launch` (cores / N)
LOOPBACK = "127.0.0.1"
POLL_S = 0.2  # how often `launch` looks at its workers
SETTLE_S = 3.0  # after a worker fails: time for the others to fail on their own (their reason is clearer)
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


# -- where this process stands -----------------------------------------------------------------------
def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def requested() -> bool:
    """Whether this process was started as one of several ranks (torchrun or `launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds") from None


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init(device: str = "auto") -> str:
    """Join the process group the environment describes; returns this rank's device (`cuda:LOCAL_RANK`
    on CUDA, `cpu` otherwise). Sets the threads per rank and quiets every rank but 0."""
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    name = (device or "auto").strip().lower()
    cuda = name in ("auto", "cuda") and torch.cuda.is_available()
    if name.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} with {world} workers: each rank uses its own GPU (cuda:LOCAL_RANK); give "
            "--device cuda or auto, and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if name == "cuda" and not cuda:
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {local} has no GPU: {torch.cuda.device_count()} visible for {local_world}"
            )
        torch.cuda.set_device(local)
    threads = int(os.environ.get(THREADS_ENV) or max(1, cores() // local_world))
    torch.set_num_threads(threads)
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except Exception as e:  # noqa: BLE001 - rendezvous failures come as many types
        raise WorkerError(f"rank {os.environ['RANK']}: cannot join the other workers: {one_line(e)}") from e
    if not is_main():
        _quiet()
    log.info(
        "distributed: %d ranks (%s), %d thread(s) per rank, timeout %.0f s",
        world, backend, threads, timeout_s(),
    )  # fmt: skip
    return f"cuda:{local}" if cuda else "cpu"


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def _quiet() -> None:
    """Ranks other than 0 log errors only, show no progress bars and no library warnings."""
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("secateurs").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


# -- sharing work -------------------------------------------------------------------------------------
def my_share(n: int) -> range:
    """The items of `0..n-1` this rank works on: every `world`-th, starting at its rank (round robin, so
    a call with few micro-batches still spreads them)."""
    return range(rank(), n, world_size())


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run one collective; a lost or timed-out peer becomes a `WorkerError` naming this rank."""
    try:
        return fn()
    except (RuntimeError, ValueError) as e:  # DistBackendError is a RuntimeError
        raise WorkerError(
            f"rank {rank()}: lost the other workers during {what} ({one_line(e)[:300]}); a worker died or "
            f"did not answer within {timeout_s():.0f} s"
        ) from e


def _backend_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def gather_disjoint(t: torch.Tensor, what: str = "an evaluation") -> torch.Tensor:
    """Every rank's `t` summed, where each entry is non-zero on one rank at most: the exact union of
    the ranks' shares (see the module docstring). Returns `t` itself with one process."""
    if not active():
        return t
    buf = t.to(_backend_device())
    _collective(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
    return buf.to(t.device)


def _reduce_scalar(x: float, op: Any, dtype: torch.dtype, what: str) -> float:
    if not active():
        return x
    buf = torch.tensor([x], dtype=dtype, device=_backend_device())
    _collective(what, lambda: dist.all_reduce(buf, op=op))
    return buf.item()


def all_max(x: float, what: str = "a figure") -> float:
    """The largest `x` over the ranks (peak memory of the busiest rank)."""
    return float(_reduce_scalar(float(x), dist.ReduceOp.MAX, torch.float64, what))


def all_min(x: int, what: str = "a setting") -> int:
    """The smallest `x` over the ranks (a batch size every rank can hold)."""
    return int(_reduce_scalar(int(x), dist.ReduceOp.MIN, torch.int64, what))


def on_main(fn: Callable[[], T], what: str = "rank 0's work") -> T:
    """Rank 0 runs `fn` (writing a file, filling a cache, reading a checkpoint); the others wait, then
    every rank returns its result or raises its error. With one process this is `fn()`.

    The result travels between this run's own processes (pickled by torch.distributed); it is never read
    from a user's file."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - every rank must learn of it, then it is re-raised
            box[0] = ("error", _portable(e))
            _collective(what, lambda: dist.broadcast_object_list(box, src=0))
            raise
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _portable(e: BaseException) -> BaseException:
    """An exception the other ranks can unpickle: ours as they are, anything else as a one-line error."""
    if isinstance(e, SecateursError | OSError | KeyboardInterrupt):
        return e
    return WorkerError(f"rank 0 failed: {one_line(e)}")


# -- starting local workers ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def worker_env(rank_: int, world: int, port: int, threads: int) -> dict[str, str]:
    """What torchrun would set for local rank `rank_` of `world` on one machine (plus the threads)."""
    return {
        "RANK": str(rank_),
        "LOCAL_RANK": str(rank_),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": LOOPBACK,
        "MASTER_PORT": str(port),
        THREADS_ENV: str(threads),
        "OMP_NUM_THREADS": str(threads),
    }


def _fate(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(
    argv: list[str],
    workers: int,
    on_exit: Callable[[], None] | None = None,
    command: list[str] | None = None,
) -> int:
    """Run `python -m secateurs argv` (or `command + argv`) as `workers` local ranks and wait for them;
    returns rank 0's status.

    When a worker fails, the others get `SETTLE_S` to fail on their own, then SIGTERM (SIGKILL after
    `STOP_GRACE_S`); a `WorkerError` names every failed worker and how. `on_exit` runs after every
    worker is gone, whatever happened (the CLI clears temporary output left by a killed rank 0)."""
    threads = max(1, cores() // workers)
    port = free_port()
    log.info("starting %d workers on %s:%d, %d thread(s) each", workers, LOOPBACK, port, threads)
    procs = []
    try:
        for r in range(workers):
            env = os.environ | worker_env(r, workers, port, threads)
            cmd = command or [sys.executable, "-m", "secateurs"]
            procs.append(subprocess.Popen([*cmd, *argv], env=env))
        return _watch(procs)
    finally:
        _stop(procs)
        if on_exit is not None:
            on_exit()


def _watch(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(POLL_S)
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    codes = [p.poll() for p in procs]
    failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
    killed = [(r, c) for r, c in failed if c < 0]
    stopped = [r for r, c in enumerate(codes) if c is None]
    if not killed and codes[0] not in (None, 0) and len(failed) == len(procs):
        return codes[0]  # every rank failed alike (a bad setting): each printed its own one-line error
    parts = [f"worker {r} {_fate(c)}" for r, c in (killed or failed)]
    if stopped:
        parts.append(f"stopped worker(s) {', '.join(map(str, stopped))}")
    raise WorkerError("; ".join(parts) + "; the run stopped")


def _stop(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
