"""One run, one directory: metrics.jsonl and TensorBoard events under runs/<run>/, and the same
scalars to wandb or SwanLab when --trackers names them (utils/trackers.py)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from utils import console
from utils.dist import gather_objects, memory_gib
from utils.skips import SkipTally
from utils.trackers import open_trackers


class RunLogger:
    """Writes scalars to `metrics.jsonl` (one JSON object per line), TensorBoard, wandb and SwanLab.

    `trackers` picks the sinks: "jsonl", "tensorboard", "wandb", "swanlab" (the align plan's
    `--trackers`). Only rank 0 should construct one.
    """

    def __init__(self, run_dir: str, trackers: tuple[str, ...] = ("jsonl", "tensorboard"), purge_after: int | None = None,
                 name: str = "", config: dict | None = None):
        """purge_after: a resumed run drops what the interrupted one logged after this step
        (it will be logged again), so every step appears once in jsonl and TensorBoard.
        name, config: the run's, for wandb and SwanLab (which continue the tracker run whose id
        the run folder keeps: a resume, or the demo's figures after training)."""
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        path = os.path.join(run_dir, "metrics.jsonl")
        if purge_after is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= purge_after]
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(keep)
        self._jsonl = open(path, "a", encoding="utf-8") if "jsonl" in trackers else None
        self._tb = None
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(run_dir, purge_step=None if purge_after is None else purge_after + 1)
        self._remote = open_trackers(run_dir, trackers, name or os.path.basename(os.path.normpath(run_dir)), config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self._jsonl is not None:
            row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._jsonl.flush()
        numbers = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and v == v}   # NaN skipped
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        for tracker in self._remote:
            if numbers:
                tracker.log(step, numbers)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: [H, W, 3] uint8."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._remote:
            tracker.close()
        self._remote = []


def _plain(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if v == v else None
    return v


# --------------------------------------------------------------------------- what a run prints

def periodic_scalars(device: torch.device, tally: SkipTally) -> dict[str, float]:
    """Memory and data health, logged at each log interval (not worth a syscall every step)."""
    mem, peak_mem = memory_gib(device)
    out = {"train/mem_gib": mem, "train/peak_mem_gib": peak_mem, "data/skipped": tally.unusable,
           "data/skip_rate": tally.unusable / max(tally.unusable + tally.used, 1)}
    out.update({f"data/skipped/{reason}": n for reason, n in tally.skipped.items()})
    return out


def log_line(step: int, total: int, window: list[float], s: dict, tally: SkipTally, alarms: list[str]) -> str:
    line = (f"step {step}/{total} | loss {sum(window) / len(window):.4f} | lr {s['train/lr']:.2e} "
            f"| grad {s['train/grad_norm']:.3f} | {s['train/samples_per_s']:.1f} samples/s "
            f"| mem {s['train/mem_gib']:.2f} GiB (peak {s['train/peak_mem_gib']:.2f})")
    if tally.unusable:
        line += f" | skipped {tally.unusable} ({s['data/skip_rate']:.1%})"
    if alarms:
        line += f" | ALARM: {', '.join(alarms)}"
    return line


def print_summary(summary: dict, alarms, checkpoint: str, runs_dir: str) -> None:
    """The end of a run on the console: its figures (rounded for reading; summary.json keeps
    them whole), its alarms and what was too short to judge, what to do next."""
    console.header("done")
    for k in ("steps", "train_loss_first", "train_loss_last", "eval_loss", "eval_ppl", "image_ablation_gap",
              "skipped", "peak_mem_gib", "checkpoint"):
        if k in summary:
            console.kv(k, readable(summary[k]))
    for a in alarms.fired:
        console.warn(f"ALARM ({a['kind']}, step {a['step']}): {a['message']}")
    for a in alarms.too_short:
        console.info(f"  too short to judge ({a['kind']}): {a['detail']}")
    console.info(f"\nchat with it:  python eval_llava.py --checkpoint {checkpoint}")
    console.info(f"curves:        tensorboard --logdir {runs_dir}")


def readable(value: Any) -> Any:
    """A figure as a person reads it: 2.0457730293273926 -> 2.0458 (four decimals, or four
    significant digits below 1e-3)."""
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.4g}"
    return value


def run_totals(tally: SkipTally, info, losses: list[float], nonfinite: int, window: int, total_steps: int,
               global_batch: int, elapsed: float) -> dict:
    """summary.json's training figures; skip counts summed over ranks (each skipped its own)."""
    parts = gather_objects((dict(tally.skipped), tally.truncated))
    last = losses[-min(window, len(losses)):]
    return {"steps": total_steps, "train_loss_first": losses[0], "train_loss_last": sum(last) / len(last),
            "skipped": dict(sum((Counter(p[0]) for p in parts), Counter())), "truncated_answers": sum(p[1] for p in parts),
            "nonfinite_steps": nonfinite, "train_seconds": round(elapsed, 1),
            "samples_per_s": round(total_steps * global_batch / elapsed, 2), "world_size": info.world_size,
            "global_batch": global_batch, "peak_mem_gib": round(memory_gib(info.device)[1], 3)}
