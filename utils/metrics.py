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

    def __init__(self, run_dir: str, trackers: tuple[str, ...] = ("jsonl", "tensorboard")):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") if "jsonl" in trackers else None
        self._tb = None
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(run_dir)

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
