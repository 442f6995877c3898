"""One run, one directory: metrics.jsonl and TensorBoard events under runs/<run>/."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class RunLogger:
    """Writes scalars to `metrics.jsonl` (one JSON object per line) and TensorBoard.

    `trackers` picks the sinks: "jsonl", "tensorboard" (the align plan's `--trackers`).
    Only rank 0 should construct one.
    """

    def __init__(self, run_dir: str, trackers: tuple[str, ...] = ("jsonl", "tensorboard"), purge_after: int | None = None):
        """purge_after: a resumed run drops what the interrupted one logged after this step
        (it will be logged again), so every step appears once in both sinks."""
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

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self._jsonl is not None:
            row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and v == v:  # skip NaN
                    self._tb.add_scalar(k, v, step)

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


def _plain(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if v == v else None
    return v
