"""Several processes on PyTorch's engines (parallel.py), on CPU with gloo: every stage under every
--train_strategy equals one process at the same global batch, with gradient accumulation; a rank
whose batches are all text-only does not hang the other; the DCP resume state survives kill -9
bit-exactly and reshards 2 -> 1 and 1 -> 2 processes; only rank 0 writes the run's files.

Most runs share two torchrun launches (tests/torchrun_runs.py runs a list of them in the same
processes): starting torch twice per run would cost more than the runs themselves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_stage1
import train_stage2
import train_stage3_lora
from dataset import EpochSampler
from parallel import STRATEGIES
from tests.conftest import ROOT, common, train_argv
from tests.test_resume import losses, wait_for_checkpoint
from tests.test_stages import trained_weights
from utils.checkpoint import RESUME_DIR, find_latest

pytestmark = pytest.mark.slow
STRATEGY_FLAGS = {"ddp": [], "fsdp-shard-grad-op": [], "fsdp-full-shard": [], "hsdp": ["--hsdp_shard_size", "1"]}
RESUME_STEPS = 8
MID_RUN = (3, "fsdp-full-shard")


def torchrun(argv: list[str], procs: int = 2, **kw) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node procs ARGV` in a process group of its own (one
    signal reaches the agent and its workers), one thread per process."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(procs), *argv], cwd=ROOT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RUN_TIMEOUT": "240"}, **kw)


def launch(plan: list[list[str]], tmp_path, name: str, procs: int = 2) -> None:
    """The runs of `plan` ([script, argv...] each) in one torchrun launch (tests/torchrun_runs.py:
    a run that hangs prints its stacks and fails after 240 s)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(plan))
    with open(tmp_path / f"{name}.log", "w+") as log:
        proc = torchrun([os.path.join("tests", "torchrun_runs.py"), str(path)], procs, stdout=log,
                        stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        assert code == 0, log.read()[-6000:]


def summary(out, name) -> dict:
    return json.loads((out / "runs" / name / "summary.json").read_text())


def assert_same_weights(a_dir, b_dir, tol: float = 1e-5) -> None:
    """Equal within `tol`, but for a few outliers: two processes add a gradient in another order
    than one, and where an element's gradient is near zero Adam's g/sqrt(v) turns that rounding
    into a visible step (one element of stage 1's 1024 moved 1.2e-5, the rest at most 4.5e-8,
    on an AMD EPYC). A real fault (a rank on the wrong samples, a step missed) moves most
    elements, by about the learning rate."""
    a, b = trained_weights(a_dir), trained_weights(b_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        off = (a[k] - b[k]).abs() > tol * (1 + b[k].abs())
        assert off.sum() <= max(1, off.numel() // 200), f"{k}: {off.sum()} of {off.numel()} elements differ by > {tol}"


def stage_argv(stage: int, chain, tiny, out, name: str, batch: int, *extra: str) -> list[str]:
    """Stage 1, 2 (full) or 3 (LoRA, no dropout: its masks are drawn per process) on the tiny
    world, global batch 8 with accumulation whatever the batch per process."""
    _, data, s1, s2, _ = chain
    checkpointing = "--gradient_checkpointing" if stage == 2 else "--no-gradient_checkpointing"  # under FSDP too
    argv = [*common(out, name, 2, "--batch_size", str(batch), "--global_batch_size", "8", "--save_interval", "0",
                    checkpointing), *extra]
    if stage == 1:
        return ["train_stage1.py", *train_argv(tiny, out, name, 2, *argv, feature_layer=-1, feature_select="all",
                                               lr=3e-3)]
    if stage == 2:
        return ["train_stage2.py", "--stage1", s1, "--data_root", data.sft_train, "--eval_ratio", "0.1",
                "--lr", "1e-3", *argv]
    return ["train_stage3_lora.py", "--init", s2, "--data_format", "chat", "--chat_json", data.style_train,
            "--image_root", data.style_images, "--eval_chat_json", data.style_eval, "--lr", "1e-2",
            "--lora_dropout", "0", *argv]


def run_here(script_argv: list[str]) -> dict:
    script, *argv = script_argv
    return {"train_stage1.py": train_stage1, "train_stage2.py": train_stage2,
            "train_stage3_lora.py": train_stage3_lora}[script].main(argv)


@pytest.fixture(scope="module")
def mixed_chat(tiny, tmp_path_factory):
    """The tiny world's chat.json where every record rank 0 of 2 reads in the first epoch (batch 1)
    is text-only and every record rank 1 reads has an image."""
    data = json.load(open(os.path.join(tiny.train, "chat.json"), encoding="utf-8"))
    rank0 = set(EpochSampler(len(data), seed=0, epoch=0, rank=0, world_size=2, batch_size=1).indices())
    for i, rec in enumerate(data):
        rec["image"] = os.path.join(tiny.train, rec["image"])
        if i in rank0:
            del rec["image"]
            rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace("<image>\n", "")
    path = tmp_path_factory.mktemp("mixed") / "chat.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return str(path)


@pytest.fixture(scope="module")
def launched(tiny, chain, mixed_chat, tmp_path_factory):
    """One process per stage at batch 4 (here), then one torchrun launch of 2 processes at batch 2:
    every stage under every strategy, the mixed text-only/image run, and the uninterrupted
    reference of the resume tests (stage 2 under fsdp-full-shard)."""
    out = tmp_path_factory.mktemp("parallel")
    refs = {stage: run_here(stage_argv(stage, chain, tiny, out, f"one{stage}", 4)) for stage in (1, 2, 3)}
    # Stage 3 under fsdp-full-shard also evaluates and answers sample questions mid-run (sharded
    # generation: every rank answers its share, in step).
    plan = [stage_argv(stage, chain, tiny, out, f"two{stage}_{strategy}", 2, "--train_strategy", strategy,
                       *STRATEGY_FLAGS[strategy],
                       *(["--eval_interval", "1", "--sample_replies", "3"] if (stage, strategy) == MID_RUN else []))
            for stage in (1, 2, 3) for strategy in STRATEGIES]
    plan.append(stage_argv(2, chain, tiny, out, "two2_offload", 2, "--train_strategy", "fsdp-full-shard",
                           "--fsdp_offload"))
    plan.append(stage_argv(3, chain, tiny, out, "two3_frozen_projector", 2, "--train_strategy", "fsdp-full-shard",
                           "--no-tune_projector"))
    plan.append(["train_stage1.py", *train_argv(tiny, out, "mixed", 4, "--no-feature_post_norm", data_format="chat",
                                                chat_json=mixed_chat, eval_chat_json=mixed_chat, batch_size=1,
                                                train_strategy="fsdp-full-shard")])
    plan.append(resume_argv(chain, out, "straight", 2))
    launch(plan, out, "plan")
    return out, refs


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_equal_one_under_every_strategy(launched, stage, strategy):
    out, refs = launched
    name = f"two{stage}_{strategy}"
    two = summary(out, name)
    assert two["world_size"] == 2 and two["global_batch"] == 8 and two["steps"] == 2
    assert two["train_strategy"] == strategy and refs[stage]["train_strategy"] == "none"
    assert_same_weights(refs[stage]["checkpoint"], out / "ck" / name / "step_000002")
    la, lb = losses(out / "runs" / f"one{stage}"), losses(out / "runs" / name)     # each step logged once
    assert la.keys() == lb.keys() == {1, 2} and all(abs(la[s] - lb[s]) < 1e-5 for s in la)
    # Held-out loss: each rank evaluated its share, the sums were added.
    assert abs(two["eval_loss"] - refs[stage]["eval_loss"]) < 1e-5
    run_files = os.listdir(out / "runs" / name)
    assert sum(f.startswith("events.out") for f in run_files) == 1                  # rank 0 alone logs
    assert os.path.isdir(out / "ck" / name / "step_000002" / RESUME_DIR)


def test_offloaded_shards_train_the_same(launched):
    """--fsdp_offload (CPUOffloadPolicy: the shards and the optimizer step on the CPU) changes where
    the state lives, not the result."""
    out, refs = launched
    assert summary(out, "two2_offload")["train_strategy"] == "fsdp-full-shard"
    assert_same_weights(refs[2]["checkpoint"], out / "ck" / "two2_offload" / "step_000002")


def test_a_frozen_projector_is_gathered_whole_into_the_checkpoint(launched, chain):
    """--no-tune_projector under FSDP: the projector is a shard of the root like every parameter;
    projector.safetensors still holds it whole, as the start point had it."""
    from safetensors.torch import load_file

    out, _ = launched
    start = load_file(os.path.join(chain[3], "projector.safetensors"))
    saved = load_file(out / "ck" / "two3_frozen_projector" / "step_000002" / "projector.safetensors")
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)


def test_sample_replies_of_every_rank_reach_the_log(launched):
    out, _ = launched
    rows = [json.loads(line) for line in open(out / "runs" / "two3_fsdp-full-shard" / "metrics.jsonl",
                                              encoding="utf-8")]
    assert any("eval/loss" in r and r["step"] == 1 for r in rows)      # evaluated mid-run, sharded
    events = [f for f in os.listdir(out / "runs" / "two3_fsdp-full-shard") if f.startswith("events.out")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / "two3_fsdp-full-shard" / events[0]), size_guidance={"tensors": 0})
    acc.Reload()
    tags = {t for t in acc.Tags()["tensors"] if t.startswith("samples/")}
    assert {"samples/0/text_summary", "samples/1/text_summary", "samples/2/text_summary"} <= tags  # ranks 0, 1, 0


def test_a_text_only_rank_beside_an_image_rank_does_not_hang(launched):
    """Rank 0 read only text-only records, rank 1 only images (the launch's timeout would fail a
    hang); the projector still trained, from rank 1's images alone."""
    out, _ = launched
    two = summary(out, "mixed")
    assert two["steps"] == 4 and two["world_size"] == 2
    assert all(map(lambda x: x == x, losses(out / "runs" / "mixed").values()))    # finite
    from safetensors.torch import load_file

    assert "eval_loss" in two and load_file(os.path.join(two["checkpoint"], "projector.safetensors"))


# --------------------------------------------------------------------------- resume

def resume_argv(chain, out, name: str, batch: int, steps: int = RESUME_STEPS, *extra: str) -> list[str]:
    """Stage 2 in full under fsdp-full-shard (sharded parameters and optimizer), global batch 8, a
    schedule that does not depend on the step count (so a run stopped at step k by --max_steps
    is the run stopped there), a checkpoint every 2 steps."""
    _, data, s1, _, _ = chain
    return ["train_stage2.py", "--stage1", s1, "--data_root", data.sft_train, "--eval_ratio", "0.1", "--lr", "1e-3",
            "--lr_scheduler", "constant", "--warmup_ratio", "0", "--seed", "3",
            *common(out, name, steps, "--batch_size", str(batch), "--global_batch_size", "8", "--save_interval", "2",
                    "--train_strategy", "fsdp-full-shard"), *extra]


def test_kill_9_resume_is_exact_and_the_resume_state_reshards_onto_other_process_counts(launched, chain, tmp_path):
    out, _ = launched
    straight = out / "ck" / "straight" / f"step_{RESUME_STEPS:06d}"
    # kill -9 of the whole launch (agent and workers) after its first checkpoint.
    proc = torchrun(resume_argv(chain, tmp_path, "cut", 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_checkpoint(proc, tmp_path / "ck" / "cut")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cut_at = int(os.path.basename(find_latest(str(tmp_path / "ck" / "cut")))[5:])
    assert cut_at < RESUME_STEPS
    shutil.copytree(tmp_path / "ck" / "cut", tmp_path / "ck" / "cut_to_one")    # the same checkpoint, for 2 -> 1
    # 1 -> 2: one process stops at step 4 (its last), two continue it to the end.
    run_here(resume_argv(chain, tmp_path, "one_to_two", 4, 4))
    launch([resume_argv(chain, tmp_path, "cut", 2, RESUME_STEPS, "--resume", "auto"),
            resume_argv(chain, tmp_path, "one_to_two", 2, RESUME_STEPS, "--resume", "auto")], tmp_path, "resumes")
    # kill -9, then --resume auto on the same process count: bit-identical, every step logged once.
    a, b = trained_weights(straight), trained_weights(tmp_path / "ck" / "cut" / f"step_{RESUME_STEPS:06d}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "runs" / "cut") == losses(out / "runs" / "straight")
    # 2 -> 1: the 2-process checkpoint continued by one process at batch 4 x 2 accumulated.
    two_to_one = run_here(resume_argv(chain, tmp_path, "cut_to_one", 4, RESUME_STEPS, "--resume", "auto"))
    assert two_to_one["steps"] == RESUME_STEPS
    assert_same_weights(straight, two_to_one["checkpoint"])
    assert_same_weights(straight, tmp_path / "ck" / "one_to_two" / f"step_{RESUME_STEPS:06d}")
    # The data position carried over: after each resume, the same samples in the same steps (losses).
    ref = losses(out / "runs" / "straight")
    for run, first in (("one_to_two", 1), ("cut_to_one", cut_at + 1)):
        got = losses(tmp_path / "runs" / run)
        assert set(got) == set(range(first, RESUME_STEPS + 1))
        assert all(abs(ref[s] - got[s]) < 1e-5 for s in got), (run, ref, got)


def test_benchmark_shows_what_each_process_holds_under_a_strategy(tmp_path):
    """scripts/benchmark.py --train_strategy: under fsdp-full-shard each of 2 processes holds half
    of the parameters, gradients and optimizer state one process holds (counted from the tensors;
    a shard is padded to equal size, hence the margin)."""
    from scripts.benchmark import main

    common_flags = ["--arch", "tiny", "--tune_llm", "full", "--batch_size", "2", "--steps", "1", "--warmup", "1"]
    one = main([*common_flags, "--train_strategy", "fsdp-full-shard"])["per_process"][0]
    proc = torchrun(["scripts/benchmark.py", *common_flags, "--train_strategy", "fsdp-full-shard",
                     "--json", str(tmp_path / "two.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["train_strategy"] == "fsdp-full-shard" and two["processes"] == 2 and len(two["per_process"]) == 2
    for rank in two["per_process"]:
        for key in ("trained_params_bytes", "grads_bytes", "optimizer_bytes"):
            assert 0.45 * one[key] < rank[key] < 0.6 * one[key], (key, rank[key], one[key])


def test_under_torchrun_a_refusal_and_a_stop_are_said_once_and_reach_the_launchers_report(tiny, tmp_path):
    """Every rank meets the same missing models, the same held-out notice and the same signal
    (torchrun forwards it to each worker): each is printed once, by rank 0, and the launcher's
    failure report names the reason instead of "To enable traceback see". DDP builds without
    torch's per-rank FutureWarning."""
    missing = torchrun(["train_stage1.py", "--model", "clip-zh-qwen3-0.6b", "--models_dir", str(tmp_path / "none"),
                        "--data_root", tiny.train], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = missing.communicate(timeout=300)
    assert missing.returncode != 0
    ours = [line for line in out.splitlines() if line.startswith("not downloaded yet: clip-vit-b16-zh, qwen3-0.6b")]
    assert len(ours) == 1, out
    assert "traceback : not downloaded yet" in out and "To enable traceback see" not in out, out

    argv = train_argv(tiny, tmp_path, "stop", 100000, "--train_strategy", "ddp", "--log_interval", "1",
                      "--eval_data_root", "")
    proc = torchrun(["train_stage1.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            os.killpg(proc.pid, signal.SIGTERM)   # the launcher and its workers, as `timeout` and clusters do
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=300)
    out = "".join(lines)
    assert out.count("SIGTERM: finishing this step, then saving a checkpoint") == 1, out
    assert out.count("no --eval_data_root: holding out the last") == 1, out
    assert out.count("! stopped at step") == 1 and "[rank 1]" not in out, out
    assert "broadcast_buffers" not in out, out
    assert find_latest(str(tmp_path / "ck" / "stop"))


def test_a_damaged_shard_of_rank_1_makes_every_rank_skip_the_step_alike(tiny, tmp_path):
    """Step 12's resume shard of rank 1 changed after the save (one byte: same size), so only the
    rank that hashes that file can see it. The verdicts are gathered: both ranks skip step 12 and
    continue from step 8 together (ranks that decided apart would load different steps and hang in
    the first collective: the launch's timeout fails the test), to the uninterrupted run's weights."""
    def run(*extra: str) -> list[str]:
        return ["train_stage1.py", *train_argv(tiny, tmp_path, "d", 12, "--feature_post_norm", *extra, save_interval=4,
                                               keep_last=0, feature_layer=-1, feature_select="all", lr=3e-3,
                                               train_strategy="fsdp-full-shard")]

    launch([run()], tmp_path, "straight")
    step = tmp_path / "ck" / "d" / "step_000012"
    straight = trained_weights(step)
    shard = step / RESUME_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    launch([run("--resume", "auto")], tmp_path, "resumed")
    log = (tmp_path / "resumed.log").read_text()
    assert log.count(f"! damaged: {shard}: changed since the save (same size, CRC-32 ") == 1, log[-3000:]
    assert log.count("! continuing from step_000008, the newest intact checkpoint") == 1, log[-3000:]
    assert f"resumed from {step.parent / 'step_000008'} at step 8" in log
    resumed = trained_weights(step)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
