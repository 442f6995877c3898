"""A short toy run end to end: loss falls, the run writes its files, eval_llava.py loads the
checkpoint in one-shot mode."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def short_run(toy, tmp_path_factory):
    import train_stage1

    out = tmp_path_factory.mktemp("run")
    argv = ["--vision_tower", toy.vision, "--llm", toy.llm, "--data_root", toy.train, "--eval_data_root", toy.eval,
            "--max_steps", "40", "--batch_size", "16", "--num_workers", "0", "--instructions", "zh",
            "--eval_interval", "20", "--eval_samples", "32", "--save_interval", "20", "--sample_replies", "2",
            "--run_name", "t", "--runs_dir", str(out / "runs"), "--checkpoints_dir", str(out / "checkpoints")]
    return train_stage1.main(argv), out


def test_short_run_lowers_the_loss_and_writes_its_files(short_run):
    summary, out = short_run
    on_disk = json.loads((out / "runs" / "t" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("steps", "train_loss_first", "train_loss_last", "eval_loss", "eval_ppl", "skipped", "checkpoint"):
        assert key in on_disk, key
    assert on_disk["steps"] == 40
    assert on_disk["train_loss_last"] < 0.7 * on_disk["train_loss_first"]
    assert glob.glob(str(out / "runs" / "t" / "events.out.tfevents*"))
    rows = [json.loads(l) for l in (out / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "train/loss" in r} == set(range(1, 41))
    assert any("eval/loss" in r for r in rows)
    assert os.path.isfile(os.path.join(on_disk["checkpoint"], "projector.safetensors"))
    assert os.path.isfile(out / "checkpoints" / "t" / "step_000020" / "projector.safetensors")
    assert json.loads((out / "runs" / "t" / "config.json").read_text())["max_steps"] == 40


def test_tensorboard_events_hold_the_scalars(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = short_run
    acc = EventAccumulator(str(out / "runs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/samples_per_s", "eval/loss"} <= tags
    assert len(acc.Scalars("train/loss")) == 40


def test_eval_one_shot_loads_the_checkpoint_and_prints_only_the_reply(short_run, toy):
    summary, _ = short_run
    image = os.path.join(toy.eval, "images", "000000.png")
    res = subprocess.run([sys.executable, "eval_llava.py", "--checkpoint", summary["checkpoint"], "--image", image,
                          "--prompt", "描述这张图片", "--max_new_tokens", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0]          # the reply alone; logs went to stderr
    assert "loading" in res.stderr


def test_eval_interactive_loop_through_stdin(short_run, toy):
    summary, _ = short_run
    image = os.path.join(toy.eval, "images", "000001.png")
    script = f"描述这张图片\n{image}\n描述这张图片\nclear\nexit\n"
    res = subprocess.run([sys.executable, "eval_llava.py", "--checkpoint", summary["checkpoint"], "--max_new_tokens", "12"],
                         cwd=ROOT, input=script, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "load an image first" in out           # a question before any image is refused
    assert "image loaded" in out and "history cleared" in out
    assert out.count("助手:") == 1                 # exactly one answered question
