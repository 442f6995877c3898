"""The experiment trackers the field logs to beside TensorBoard: Weights & Biases (LLaVA, Prismatic,
nanoVLM) and SwanLab (MiniMind-V, much of the Chinese community). Both packages are optional: a
run that asks for one that is missing stops with the pip command, before any model loads.

RunLogger (utils/metrics.py) sends them the scalars it sends TensorBoard, with the run's config and
name. Their local files live in the run folder (runs/<run>/wandb/, runs/<run>/swanlog/), and the
tracker run's id is kept there too (runs/<run>/trackers.json): a resumed training run, and the
demo's before/after figures logged after training, continue that tracker run; no second one is made.

No network is needed: with WANDB_MODE=offline and SWANLAB_MODE=offline (or local) everything stays
on disk, and uploads later:
    wandb sync runs/<run>/wandb/offline-run-*                       (a resume adds a folder: same run id)
    swanlab sync runs/<run>/swanlog/run-* --id <id in trackers.json>
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Protocol

from utils.atomic import atomic_write

TRACKERS = ("jsonl", "tensorboard", "wandb", "swanlab")
REMOTE = ("wandb", "swanlab")
PROJECT = "llava"                # the tracker project unless WANDB_PROJECT / SWANLAB_PROJECT name another
STATE_FILE = "trackers.json"     # {tracker: run id}, in the run folder


def parse_trackers(text: str) -> tuple[str, ...]:
    """"jsonl,tensorboard,wandb" -> the names, checked: an unknown one, or one whose package is not
    installed, is a ValueError of one line that says what to type."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"--trackers {text}: unknown {', '.join(unknown)} (any of {', '.join(TRACKERS)}, "
                         "comma-separated)")
    for name in names:
        if name in REMOTE and importlib.util.find_spec(name) is None:
            raise ValueError(f"--trackers {name} needs the {name} package: pip install {name}")
    return names


class Tracker(Protocol):
    id: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class WandbTracker:
    """One W&B run. Every metric is plotted against our `step`, not W&B's own counter: W&B drops a
    `step=` lower than one it has seen, and the demo logs its "before" figure (step 0) after training."""

    def __init__(self, run_dir: str, name: str, config: dict | None, run_id: str | None):
        import wandb

        try:
            # console="off": our console redraws progress bars in place; the terminal and
            # metrics.jsonl keep the lines already.
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=name, config=config,
                                  dir=run_dir, id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(console="off"))
        except Exception as e:  # noqa: BLE001 - wandb raises several kinds (not logged in, bad setting)
            raise SystemExit(f"wandb could not start a run: {one_line(e)} (no network or account: export "
                               "WANDB_MODE=offline, then `wandb sync` later)") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


class SwanlabTracker:
    """One SwanLab experiment (its steps may arrive in any order: each metric has its own)."""

    def __init__(self, run_dir: str, name: str, config: dict | None, run_id: str | None):
        import swanlab

        try:
            self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT") or PROJECT, name=name, config=config,
                                    log_dir=os.path.join(run_dir, "swanlog"), id=run_id,
                                    resume="allow" if run_id else None, reinit=True,
                                    settings=swanlab.Settings(terminal={"proxy_type": "none"}))   # as wandb's console
        except Exception as e:  # noqa: BLE001 - as above
            raise SystemExit(f"swanlab could not start a run: {one_line(e)} (no network or account: export "
                               "SWANLAB_MODE=offline, then `swanlab sync` later)") from None
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def one_line(e: Exception) -> str:
    """A package's error (pydantic's run over several lines) as one line."""
    return " ".join(str(e).split())[:300]


OPENERS = {"wandb": WandbTracker, "swanlab": SwanlabTracker}


def open_trackers(run_dir: str, names: tuple[str, ...], name: str, config: dict | None) -> list[Tracker]:
    """The remote trackers among `names`, each continuing the run whose id the run folder keeps
    (or starting one and keeping its id)."""
    wanted = [n for n in names if n in REMOTE]
    if not wanted:
        return []
    path = os.path.join(run_dir, STATE_FILE)
    ids: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            ids = json.load(fh)
    opened: list[Tracker] = []
    try:
        for tracker in wanted:
            opened.append(OPENERS[tracker](run_dir, name, config, ids.get(tracker)))
            if ids.get(tracker) != opened[-1].id:
                ids[tracker] = opened[-1].id
                atomic_write(path, json.dumps(ids, indent=1) + "\n")
    except SystemExit:      # the other one could not start: the first is closed, not left running
        for t in opened:
            t.close()
        raise
    return opened
