"""Typed configs: a dataclass with a default and a one-line reason per field becomes argparse
flags, is printed at start, and is saved with every run and checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from typing import Any, TypeVar

from utils import console
from utils.atomic import atomic_write

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """Optional[int] -> int; int | None -> int."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` for every script: each option's default shown once, the description's line
    breaks (and an option's own) kept. argparse appends "(default: X)" unless the help text already says what the
    default is (then a second one would contradict or repeat it) or there is none (None, "")."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # A help text written in lines (one per choice) keeps them; each is wrapped on its own.
        lines = []
        for line in text.splitlines():
            lines += super()._split_lines(line, width)
        return lines

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "") or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every script's argument parser: --help with HelpFormatter, and an error as one line. The
    usage of a script with sixty flags is a screenful that buries the message; a mistyped flag
    names the closest real one (Python 3.12's suggest_on_error does this for choices only)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")):   # under torchrun every rank parses the same line: rank 0 says it
            self.exit(2)
        if message.startswith("unrecognized arguments: "):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            unknown = [w for w in message.split(": ", 1)[1].split() if w.startswith("-")]
            message = "unrecognized argument" + ("s " if len(unknown) > 1 else " ") + ", ".join(
                w + "".join(f" (did you mean {c}?)" for c in
                            difflib.get_close_matches(w.split("=")[0], flags, n=1, cutoff=0.6))
                for w in unknown or [message.split(": ", 1)[1]])
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse formats help text with %: a literal one ("~30%") must be doubled.
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "").replace("%", "%%")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the flags a user typed, as argparse itself reads them: `--lr 1e-3`,
    `--lr=1e-3`, a unique prefix (`--feature_post`) and a negation (`--no-feature_post_norm`)
    all count. Presets and the demo fill in only what the user did not set.

    The argv is parsed once more with every default suppressed: what is left in the
    namespace is exactly what was typed."""
    actions = [a for a in parser._actions if a.dest != "help"]
    saved, saved_parser = [a.default for a in actions], parser._defaults
    for a in actions:
        a.default = argparse.SUPPRESS
    parser._defaults = {}  # set_defaults (a later stage's defaults) would fill the namespace too
    try:
        typed, _ = parser.parse_known_args(argv)
    finally:
        for a, default in zip(actions, saved):
            a.default = default
        parser._defaults = saved_parser
    return set(vars(typed))


def print_config(obj: Any, title: str = "config") -> None:
    console.header(title)
    for k, v in (to_dict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        console.kv(k, v)


def dump_json(obj: Any, path: str) -> None:
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


SECRET_FIELDS = ("hf_token",)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def redacted(obj: Any) -> dict[str, Any]:
    """The config as a dict, safe to print, save and log: a secret field keeps its value only
    when that is a file path or an environment-variable NAME (where the secret lives), never
    when it looks like the secret itself."""
    d = to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    for key in SECRET_FIELDS:
        value = d.get(key)
        if value and not (os.path.exists(value) or value == ".hf_token" or
                          (_ENV_NAME.match(value) and not value.startswith("hf_"))):
            d[key] = "<redacted>"
    return d
