"""Device and torch.distributed setup. The same script runs under `python` and `torchrun`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import console


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by torchrun (a process group runs, even of one process): --train_strategy applies."""
        return dist.is_available() and dist.is_initialized()


def available_cpus() -> int:
    """Cores this process may use (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(now, peak) memory in GiB: the CUDA allocator's on a GPU, this process's resident set
    (RSS) on a CPU. What the periodic log line and summary.json report."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    with open("/proc/self/statm") as fh:
        now = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return now / 2**30, max(now, peak) / 2**30


def pick_device(flag: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU. Any torch device string is accepted."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def setup(device_flag: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (it sets WORLD_SIZE and the
    rendezvous), even for one process: `torchrun --nproc-per-node 1` runs the multi-process path
    on one GPU. Plain `python` starts no group.

    CUDA uses NCCL and one GPU per local rank; CPU uses gloo, which makes multi-process
    runs testable on a laptop.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # Rank 0 writes a checkpoint's files while the others wait in a barrier: allow an hour.
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))
    return DistInfo(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the process count) of the running group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def alike_on_every_rank():
    """Code that every rank runs on the same inputs (the config, the models on disk, the data
    files): a refusal there is the same on every rank, so under torchrun rank 0 alone prints it and
    the others leave with the same status, silently (eight copies of one message bury it)."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            tell_launcher(e.code)            # every rank's entry in torchrun's report names it
            if int(os.environ.get("RANK", "0")):
                raise SystemExit(1) from None
        raise


def tell_launcher(message: str) -> None:
    """Under torchrun: leave `message` where the launcher reads a worker's failure
    (TORCHELASTIC_ERROR_FILE), so the report it prints when a worker exits non-zero names our
    reason ("traceback : <message>") instead of "To enable traceback see ...". The launcher's
    own report cannot be silenced from a worker: torch.distributed.run raises ChildFailedError
    for any non-zero exit, and SignalException when it was signalled itself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:
        pass


class QuitNow(KeyboardInterrupt):
    """A second Ctrl-C during training: quit at once, without the checkpoint the first one asked for."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C and SIGTERM are the main process's to handle (finish the
    step, save). `timeout`, Slurm and `kill -TERM -PGID` signal every process of the job, the
    workers too; a worker that died of it would crash the loader before the checkpoint is
    written. So a worker ignores SIGINT, and SIGTERM from anyone but its main process. A
    SIGTERM from the main process (DataLoader shutting down a worker that will not stop, the
    second Ctrl-C) still ends it at once and cleanly, as torch's own worker handler does. A
    worker whose main process dies exits by itself (DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):   # macOS: no sender to tell apart; the main process SIGKILLs if it must
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # SIGTERM blocked here is left pending for one thread that reads who sent it (threads the
    # worker starts later inherit the block; a fresh fork has no other thread yet).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class StopRequest:
    """Ctrl-C / SIGTERM ask a loop to finish what it is doing (training: the step, then a save; a
    benchmark: the batch, whose answers are then written) and stop; a second Ctrl-C raises QuitNow
    at once (the CLIs turn it into a one-line exit). A second SIGTERM changes nothing: a scheduler
    repeats it while it waits, and the stop is already coming. `signum` is the first signal
    received (the exit status is 128 + it). Installed from creation until release() (or the end
    of a `with` block): outside the loop, Ctrl-C and SIGTERM act as they did before."""

    def __init__(self, finishing: str = "this step, then saving a checkpoint"):
        self.signum = 0
        self._finishing = finishing
        self._pid = os.getpid()
        self._before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def release(self) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, _frame):
        if os.getpid() != self._pid:
            # A DataLoader worker forked by this process, signalled before its worker_init_fn
            # (ignore_stop_signals) ran: the main process handles the stop.
            return
        if self.requested:
            if signum == signal.SIGINT:
                raise QuitNow
            return
        self.signum = signum
        hint = " (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""
        # torchrun forwards a signal to every worker: one line, from rank 0.
        console.notice(f"{signal.Signals(signum).name}: finishing {self._finishing}{hint}")
