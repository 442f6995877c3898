"""Console output that only rank 0 prints, with optional colour.

Scripts whose stdout is data (eval_llava.py one-shot mode prints the reply alone) send
their logs to stderr with `set_stream(sys.stderr)`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

_stream: TextIO | None = None  # None: sys.stdout at call time (pytest's capsys swaps it)


def set_stream(stream: TextIO) -> None:
    global _stream
    _stream = stream


def _out() -> TextIO:
    return _stream or sys.stdout


def _is_main() -> bool:
    # torchrun sets RANK; a plain `python` run has none and is rank 0.
    return int(os.environ.get("RANK", "0")) == 0


def _color(code: str, text: str) -> str:
    if _out().isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[{code}m{text}\033[0m"
    return text


def _emit(text: str, stream: TextIO) -> None:
    """Print a line. While a progress bar is on the terminal, tqdm lifts it, prints the line and
    redraws it below: a line printed past a bar would otherwise glue itself onto the bar's."""
    bars = sys.modules.get("tqdm")
    if bars is not None and bars.tqdm._instances and stream.isatty():
        bars.tqdm.write(text, file=stream)
        stream.flush()
    else:
        print(text, file=stream, flush=True)


def info(msg: str) -> None:
    if _is_main():
        _emit(msg, _out())


def success(msg: str) -> None:
    if _is_main():
        _emit(_color("32", "✓ " + msg), _out())


def notice(msg: str) -> None:
    """A warning about what every rank sees alike (the config, the data, a signal torchrun
    forwards to all): printed once, by rank 0."""
    if _is_main():
        _emit(_color("33", f"! {msg}"), _out())


def warn(msg: str) -> None:
    # Warnings print on every rank: a problem on rank 3 must not be invisible. (What every rank
    # sees alike is a notice.)
    prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ and not _is_main() else ""
    _emit(_color("33", f"! {prefix}{msg}"), _out())


def error(msg: str) -> None:
    _emit(_color("31", f"✗ {msg}"), sys.stderr)


def header(title: str, width: int = 72) -> None:
    if _is_main():
        print(_color("1;36", f"\n{'=' * width}\n{title}\n{'=' * width}"), file=_out(), flush=True)


def kv(key: str, value: Any, width: int = 24) -> None:
    if _is_main():
        print(f"  {key:<{width}} {value}", file=_out(), flush=True)



def duration(seconds: float) -> str:
    """75.2 -> '1m15s'."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class _Lines:
    """Progress for a log file: a plain line every `every` seconds (0: silent) and one at the
    end, never a bar redraw. Same calls as the tqdm bar it stands in for."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, every: float, show: bool):
        self.n, self.total, self.desc, self.unit, self.every, self.show = initial, total, desc, unit, every, show
        self._t0 = self._last = time.time()
        self._start = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if self.every and now - self._last >= self.every:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        if self.show:
            rate = (self.n - self._start) / max(now - self._t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s)", file=sys.stderr, flush=True)

    def set_postfix(self, **_kw) -> None:
        pass

    def write(self, msg: str) -> None:
        info(msg)

    def close(self) -> None:
        if self.every and self.n > self._start:
            self._line(time.time())
        self.every = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def quiet_library_bars() -> None:
    """transformers' "Loading weights: 100%" bar on every model load says nothing a person needs
    (a load takes seconds), and in a log file it is redraw noise: off. Our own bars (training,
    batch evaluation) and the hub's download bars stay."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, show: bool = True, every: float = 30.0):
    """A tqdm bar on stderr when it is a terminal. In a log file a bar's redraws would be most
    of the file and glue themselves onto other lines, so there it is a plain line every `every`
    seconds instead (every=0: none, for loops that print their own periodic lines).
    `write(msg)` prints a line without breaking the bar."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not (show and _is_main()),
                   dynamic_ncols=True, file=sys.stderr)
        bar.write = lambda msg: tqdm.write(msg, file=_out()) if _is_main() else None
        return bar
    return _Lines(total, desc, unit, initial, every, show and _is_main())
