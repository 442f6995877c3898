"""The one way files are written: to a temporary name beside the target, then renamed over it.

A crash, a full disk or `kill -9` leaves either the old file or the new one, never half of
one. Folders (checkpoints, downloads, exports) follow the same rule with their own rename.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write `path` through: renamed over `path` when the block succeeds,
    removed when it fails.

        with atomic_path("x.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"   # the extension stays last: np.save, PIL and friends key on it
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):   # lexists: a symlink being placed may point nowhere yet
            os.remove(tmp)
        raise


class CheckFailed(ValueError):
    """atomic_write's `check` found problems; the previous file is untouched."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__(f"{path} not written: " + "; ".join(problems[:5]))
        self.problems = problems


def atomic_write(path: str, data: str | bytes, check: Callable[[str], list[str]] | None = None) -> None:
    """Write text (UTF-8) or bytes to `path` atomically and durably (fsync before the rename).
    `check(tmp)` may inspect the finished temporary file first: problems it returns raise
    CheckFailed and leave the previous `path` as it was."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        problems = check(tmp) if check else []
        if problems:
            raise CheckFailed(path, problems)
