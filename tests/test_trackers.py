"""--trackers wandb,swanlab with the real packages, offline (nothing here touches the network): a
short demo run and its resume write one tracker run each, in the run folder, holding the scalars
TensorBoard gets (the demo's before/after figures included), the config and the run name; only
rank 0 logs under torchrun; a missing package is one line naming the pip command."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

import toy_demo
import train_config
import train_stage1
from tests.conftest import ROOT, train_argv
from utils import trackers

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_DISABLE_CODE": "true", "SWANLAB_MODE": "offline"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Both packages offline, their settings and caches under tmp_path (never ~/), and no login."""
    for key, value in {**OFFLINE, "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
                       "SWANLAB_SAVE_DIR": str(tmp_path / "swanlab_home")}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_API_KEY", "SWANLAB_API_KEY", "WANDB_PROJECT", "SWANLAB_PROJECT"):
        monkeypatch.delenv(key, raising=False)


# --------------------------------------------------------------------------- reading the local run files

def wandb_segments(run_dir: str) -> list[dict]:
    """Each offline-run folder of W&B under run_dir: its run id, name, config and the history rows."""
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader   # a reader of W&B's log format
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        seg = {"id": None, "name": None, "config": {}, "rows": []}
        with WBDataStoreReader() as reader:
            reader.open(path)
            while (data := reader.scan()) is not None:
                record = pb.Record()
                record.ParseFromString(data)
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    seg["id"], seg["name"] = record.run.run_id, record.run.display_name
                    seg["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
                elif kind == "config":
                    seg["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
                elif kind == "history":
                    seg["rows"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in record.history.item})
        out.append(seg)
    return out


def swanlab_segments(run_dir: str) -> list[dict]:
    """Each SwanLab run folder under run_dir/swanlog: id, name, resume mode, config and scalars."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    out = []
    for folder in sorted(glob.glob(os.path.join(run_dir, "swanlog", "run-*"))):
        seg = {"id": None, "name": None, "resume": 0, "scalars": []}
        reader = DataStoreReader()
        reader.open(glob.glob(os.path.join(folder, "run-*.swanlab"))[0])
        while (data := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("start"):
                seg["id"], seg["name"], seg["resume"] = record.start.id, record.start.name, record.start.resume
            elif record.HasField("scalar"):
                seg["scalars"].append((record.scalar.key, record.scalar.step, record.scalar.value.number))
        reader.close()
        with open(os.path.join(folder, "files", "config.yaml"), encoding="utf-8") as fh:
            seg["config"] = {k: v["value"] for k, v in yaml.safe_load(fh).items()}
        out.append(seg)
    return out


def tensorboard_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """What metrics.jsonl holds that TensorBoard gets too: {key: {step: value}} (numbers only)."""
    out: dict[str, dict[int, float]] = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                out.setdefault(k, {})[row["step"]] = v
    return out


def assert_same_scalars(logged: list[tuple[str, int, float]], tb: dict[str, dict[int, float]]) -> None:
    """(key, step, value) as a tracker holds them == TensorBoard's scalars (metrics.jsonl rounds to
    6 decimals): every key at every step, and nothing else."""
    got: dict[str, dict[int, float]] = {}
    for key, step, value in logged:
        got.setdefault(key, {})[step] = value
    assert got.keys() == tb.keys()
    for key in tb:
        assert got[key].keys() == tb[key].keys(), key
        for step, value in tb[key].items():
            assert got[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)


# --------------------------------------------------------------------------- the flag

def test_trackers_are_checked_when_parsing(monkeypatch, capsys):
    cfg = train_config.parse_args(["--trackers", "jsonl,tensorboard,wandb,swanlab"])
    assert trackers.parse_trackers(cfg.trackers) == ("jsonl", "tensorboard", "wandb", "swanlab")
    with pytest.raises(SystemExit, match=r"\['mlflow'\] not supported \(jsonl, tensorboard, wandb, swanlab\)"):
        train_config.parse_args(["--trackers", "jsonl,mlflow"])
    with pytest.raises(ValueError, match="unknown mlflow"):
        trackers.parse_trackers("wandb,mlflow")
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "swanlab" else real(name))
    with pytest.raises(SystemExit):
        train_config.parse_args(["--trackers", "tensorboard,swanlab"])
    err = capsys.readouterr().err
    assert "--trackers swanlab needs the swanlab package: pip install swanlab" in err and len(err.splitlines()) == 1


def test_a_tracker_that_cannot_start_is_one_line(offline, monkeypatch, tmp_path):
    """Online without an account (here: an unknown mode) stops with what to do, not a traceback."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    try:
        with pytest.raises(SystemExit) as e:
            trackers.open_trackers(str(tmp_path), ("wandb",), "r", {})
    finally:
        wandb.teardown()     # wandb reads its settings once per process: the next test's offline mode must count
    assert str(e.value).startswith("wandb could not start a run: ") and "WANDB_MODE=offline" in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "trackers.json")


# --------------------------------------------------------------------------- a demo run and its resume

@pytest.mark.slow   # the demo twice: two trainings and four measurements
def test_wandb_and_swanlab_hold_the_demo_run_and_its_resume_continues_them(tiny, tmp_path, offline, monkeypatch):
    monkeypatch.setattr(toy_demo, "ensure_toy_world", lambda *a, **kw: tiny)   # the test world stands in for the demo's
    argv = ["--demo", "--batch_size", "8", "--num_workers", "0", "--eval_interval", "2", "--eval_samples", "8",
            "--sample_replies", "0", "--save_interval", "2", "--run_name", "tracked", "--runs_dir",
            str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "ck"),
            "--trackers", "jsonl,tensorboard,wandb,swanlab"]
    first = train_stage1.main(argv + ["--max_steps", "4"])
    run_dir = first["run_dir"]
    ids = json.loads(open(os.path.join(run_dir, "trackers.json")).read())
    # The training and then the demo's figures (logged after it): one tracker run, opened twice.
    assert len(wandb_segments(run_dir)) == 2 and len(swanlab_segments(run_dir)) == 2
    second = train_stage1.main(argv + ["--max_steps", "6", "--resume", "auto"])
    assert second["run_dir"] == run_dir and second["steps"] == 6
    assert json.loads(open(os.path.join(run_dir, "trackers.json")).read()) == ids   # the same tracker runs

    tb = tensorboard_scalars(run_dir)
    assert {"train/loss", "eval/loss", "demo/heldout_exact_match", "demo/toy_vqa_accuracy"} <= tb.keys()

    # W&B: a resume adds an offline folder with the same run id (`wandb sync` joins them)
    segments = wandb_segments(run_dir)
    assert [s["id"] for s in segments] == [ids["wandb"]] * 4
    assert segments[0]["name"] == "tracked" and segments[0]["config"]["max_steps"] == 4
    assert segments[0]["config"]["trackers"] == "jsonl,tensorboard,wandb,swanlab"
    assert_same_scalars([(k, row["step"], v) for seg in segments for row in seg["rows"] for k, v in row.items()
                         if not k.startswith("_") and k != "step"], tb)

    # SwanLab: the same experiment id resumed
    segments = swanlab_segments(run_dir)
    assert [s["id"] for s in segments] == [ids["swanlab"]] * 4
    assert [s["resume"] != 0 for s in segments] == [False, True, True, True]
    assert segments[0]["name"] == "tracked" and segments[0]["config"]["max_steps"] == 4
    assert_same_scalars([sc for seg in segments for sc in seg["scalars"]], tb)


@pytest.mark.slow   # torchrun, two processes
def test_only_rank_0_logs_to_the_trackers(tiny, tmp_path, offline):
    argv = train_argv(tiny, tmp_path, "ranks", 2, "--trackers", "wandb,swanlab")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "train_stage1.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = str(tmp_path / "runs" / "ranks")
    assert len(wandb_segments(run_dir)) == 1 and len(swanlab_segments(run_dir)) == 1
    # and no tracker run anywhere else (rank 1 writing its own beside the run folder, say)
    assert len(glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True)) == 1
    assert len(glob.glob(str(tmp_path / "**" / "swanlog" / "run-*"), recursive=True)) == 1
