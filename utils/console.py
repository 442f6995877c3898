"""Console output that only rank 0 prints, with optional colour.

Scripts whose stdout is data (eval_llava.py one-shot mode prints the reply alone) send
their logs to stderr with `set_stream(sys.stderr)`.
"""

from __future__ import annotations

import os
import sys
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


def info(msg: str) -> None:
    if _is_main():
        print(msg, file=_out(), flush=True)


def success(msg: str) -> None:
    if _is_main():
        print(_color("32", "✓ " + msg), file=_out(), flush=True)


def warn(msg: str) -> None:
    # Warnings print on every rank: a problem on rank 3 must not be invisible.
    prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ and not _is_main() else ""
    print(_color("33", f"! {prefix}{msg}"), file=_out(), flush=True)


def error(msg: str) -> None:
    print(_color("31", f"✗ {msg}"), file=sys.stderr, flush=True)


def header(title: str, width: int = 72) -> None:
    if _is_main():
        print(_color("1;36", f"\n{'=' * width}\n{title}\n{'=' * width}"), file=_out(), flush=True)


def rule(width: int = 72) -> None:
    if _is_main():
        print("-" * width, file=_out(), flush=True)


def kv(key: str, value: Any, width: int = 24) -> None:
    if _is_main():
        print(f"  {key:<{width}} {value}", file=_out(), flush=True)


def human(n: float) -> str:
    """1234567 -> '1.23M' (parameter and token counts)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
