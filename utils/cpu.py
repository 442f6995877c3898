"""How a run uses a CPU: how many intra-op threads, and whether bf16 pays off.

Threads. PyTorch's intra-op pool is OpenMP, whose threads spin while they wait for each other.
On a busy machine (a browser, a neighbour on a CI runner, a second run started beside the first)
a spinning thread holds a core another process needs, and small operations, whose work is
shorter than the wait, slow down far more than twice: two threads on two busy cores ran a toy
model's step 24x slower than one thread on an Intel Xeon (issue 31), 3.5x on an AMD EPYC. Large
matrices keep every thread busy, so a course-size model gains from all cores. The policy:
--threads N, else OMP_NUM_THREADS, else one thread for a small model, all cores for a large one
(docs/performance.md, "CPU：线程、bf16 与分块 loss", for the measurements behind it).

bf16. CPUs with AMX or AVX512-BF16 multiply bf16 matrices several times faster than fp32; others
emulate it, slower than fp32. `--precision auto` stays fp32 on a CPU (a demo's figures must not
move with the CPU type), and says once how much bf16 would gain where it is native, measured.
"""

from __future__ import annotations

import os
import time

import torch

from utils.dist import available_cpus

SMALL_MODEL = 50_000_000   # parameters: below, one thread (the toy world is ~4M, Qwen3-0.6B ~600M)


def pick_threads(flag: int, params: int) -> tuple[int, str]:
    """(intra-op threads for a CPU run, why)."""
    if flag or os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return shared_threads(flag), "--threads" if flag else "OMP_NUM_THREADS"
    if params < SMALL_MODEL:
        return 1, (f"a small model ({params / 1e6:.1f}M parameters): one thread is as fast, and does not slow down "
                   "when another process uses the CPU; --threads N to choose")
    free = free_cores()
    return free, (f"{params / 1e6:.0f}M parameters: the {free} of {available_cpus()} cores no other process was using "
                  "at the start; --threads N to choose")


def shared_threads(flag: int = 0) -> int:
    """--threads, else OMP_NUM_THREADS, else the free cores: for work whose operations are large
    enough to share among threads (a large model; the toy world's 64-sample pretraining batches)."""
    if flag:
        return flag
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return free_cores()


def use_threads(flag: int, params: int) -> str:
    """Set the intra-op threads by pick_threads; returns the line that says how many and why."""
    n, why = pick_threads(flag, params)
    torch.set_num_threads(n)
    return f"{n} ({why})"


def free_cores(seconds: float = 0.2) -> int:
    """How many of this process's cores no other process is using: its cores less the CPU time
    the others took on them over `seconds` (Linux's /proc/stat; elsewhere, all of them), at
    least one. A one-off look: a process that starts later is not seen."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores or not os.path.isfile("/proc/stat"):
        return available_cpus()
    before = _cpu_times(cores)
    time.sleep(seconds)     # the interval the others' CPU time is measured over
    after = _cpu_times(cores)
    busy = sum(1 - (after[c][1] - before[c][1]) / max(after[c][0] - before[c][0], 1) for c in cores if c in after)
    return max(1, min(len(cores), round(len(cores) - busy)))


def _cpu_times(cores: list[int]) -> dict[int, tuple[int, int]]:
    """{core: (all jiffies, idle + iowait jiffies)} from /proc/stat."""
    out = {}
    with open("/proc/stat", encoding="utf-8") as fh:
        for line in fh:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                values = [int(v) for v in fields[:8]]       # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = (sum(values), values[3] + values[4])
    return out


def native_bf16() -> str:
    """'AMX' or 'AVX512-BF16' when this CPU multiplies bf16 in hardware, '' when it emulates it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return ""
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else ""


def bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a [2s, s] @ [s, 3s] matmul on this CPU, now (~0.2 s): how much
    faster bf16 computes here, as a course-size layer's matmuls see it."""
    a, b = torch.randn(2 * size, size), torch.randn(size, 3 * size)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y                                              # warm-up: the kernel's first call
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def precision_note(flag: str, compute: torch.dtype | None, params: int) -> str:
    """What a CPU run should hear about bf16, measured on this CPU now ('' when nothing): that it
    would pay off (native, a large model, auto kept fp32), or that the bf16 asked for is emulated."""
    native = native_bf16()
    if compute == torch.bfloat16 and not native:
        slower = 1 / bf16_speedup(256, 2)
        return (f"--precision bf16 on a CPU without native bf16 (neither AMX nor AVX512-BF16): bf16 matmuls ran "
                f"{slower:.0f}x slower than fp32 here just now; --precision fp32 trains faster on this CPU")
    if compute is None and flag == "auto" and native and params >= SMALL_MODEL:
        return (f"this CPU computes bf16 natively ({native}): its bf16 matmuls ran {bf16_speedup():.1f}x faster than "
                "fp32 here just now; --precision bf16 trains faster (fp32 master weights, loss in fp32)")
    return ""


def resolve_precision(flag: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: bf16 (fp32 master weights, loss in fp32) or None (fp32).
    auto: bf16 on CUDA; fp32 on a CPU (see the module docstring)."""
    if flag == "bf16":
        return torch.bfloat16
    if flag == "fp32":
        return None
    return torch.bfloat16 if device.type == "cuda" else None
