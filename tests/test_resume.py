"""Reliability: exact resume after kill -9, crash-safe checkpoint writes, clean stops,
loss normalisation, the non-finite guard, refusals, redaction."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from tests.conftest import ROOT, train_argv
from utils.checkpoint import find_latest


STEPS = 80  # 5 epochs of the tiny world at batch 4: the stops land early, the resumes cross epoch ends
LAST = f"step_{STEPS:06d}"


def args(tiny, out, name, steps, *extra):
    return train_argv(tiny, out, name, steps, "--feature_post_norm", *extra, save_interval=4, keep_last=0,
                      feature_layer=-1, feature_select="all", lr=3e-3)


def cli(argv, stdout=subprocess.PIPE, **kw):
    """train_stage1.py as a user runs it, on one thread: the reference run goes beside it on a 2-core
    machine, and the same thread count is what makes the runs bit-identical."""
    return subprocess.Popen([sys.executable, "train_stage1.py", *argv], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def wait_for_checkpoint(proc, ckpt_dir, timeout=300):
    """Poll for the `latest` pointer (the event we need), not for a fixed time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(os.path.join(ckpt_dir, "latest")):
            return
        assert proc.poll() is None, "training ended before its first checkpoint:\n" + proc.stdout.read()[-2000:]
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    by_step = {}
    for r in rows:
        if "train/loss" in r:
            assert r["step"] not in by_step, f"step {r['step']} logged twice"
            by_step[r["step"]] = r["train/loss"]
    return by_step


def projector(ckpt):
    return load_file(os.path.join(ckpt, "projector.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted reference, STEPS steps in one process. It starts at once and runs while
    the test runs its own (most of either is an interpreter starting); `straight()` waits for it
    and gives its folder."""
    out = tmp_path_factory.mktemp("straight")
    with open(out / "train.log", "w") as log:
        proc = cli(args(tiny, out, "ref", STEPS), stdout=log)

    def finished():
        assert proc.wait(timeout=600) == 0, (out / "train.log").read_text()[-3000:]
        return out

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_kill_9_then_resume_auto_is_bit_identical(tiny, tmp_path, straight):
    proc = cli(args(tiny, tmp_path, "r", STEPS))
    wait_for_checkpoint(proc, tmp_path / "ck" / "r")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_at = int(os.path.basename(find_latest(str(tmp_path / "ck" / "r")))[5:])
    assert resumed_at < STEPS
    proc = cli(args(tiny, tmp_path, "r", STEPS, "--resume", "auto"))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log and f"at step {resumed_at}" in log
    a, b = projector(straight() / "ck" / "ref" / LAST), projector(tmp_path / "ck" / "r" / LAST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "runs" / "r") == losses(straight() / "runs" / "ref")  # every step once, identical


@pytest.mark.slow
def test_sigterm_to_the_process_group_finishes_the_step_saves_and_says_how_to_resume(tiny, tmp_path, straight):
    """What `timeout`, Slurm and `kill -TERM -- -PGID` do: every process of the group gets SIGTERM,
    the DataLoader workers too. The step finishes, a checkpoint is written, the resume is exact."""
    proc = cli(args(tiny, tmp_path, "t", STEPS, "--save_interval", "1000", "--num_workers", "2"),  # only the stop saves
               start_new_session=True)                                # setsid: a process group of its own
    # Wait until training has started (the metrics file grows), then signal the whole group.
    deadline = time.time() + 300
    while not (tmp_path / "runs" / "t" / "metrics.jsonl").exists() or not (tmp_path / "runs" / "t" / "metrics.jsonl").stat().st_size:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    workers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 3, workers                                  # the main process and its 2 workers
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert "SIGTERM: finishing this step, then saving a checkpoint" in log
    assert "Ctrl-C" not in log and "killed by signal" not in log and "Traceback" not in log
    assert "--resume auto" in log and "stopped at step" in log
    stopped = find_latest(str(tmp_path / "ck" / "t"))
    assert stopped is not None and not stopped.endswith(LAST)
    proc = cli(args(tiny, tmp_path, "t", STEPS, "--save_interval", "1000", "--resume", "auto"))
    assert proc.communicate(timeout=600)[0] and proc.returncode == 0
    a, b = projector(straight() / "ck" / "ref" / LAST), projector(tmp_path / "ck" / "t" / LAST)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_says_so_names_its_checkpoint_and_leaves_it_alone(tiny, tmp_path, capsys):
    done = train_stage1.main(args(tiny, tmp_path, "f", 4))
    run = tmp_path / "runs" / "f"
    files = {name: (run / name).read_bytes() for name in ("summary.json", "config.json", "metrics.jsonl")}
    capsys.readouterr()
    again = train_stage1.main(args(tiny, tmp_path, "f", 4, "--resume", "auto"))   # the printed hint, typed again
    out = capsys.readouterr().out
    assert again["already_finished"] and again["checkpoint"] == done["checkpoint"]
    assert "run 'f' finished at step 4 already" in out
    assert f"chat with it:  python eval_llava.py --checkpoint {done['checkpoint']}\n" in out
    assert {name: (run / name).read_bytes() for name in files} == files          # summary.json not blanked
    assert json.loads(files["summary.json"])["checkpoint"] == done["checkpoint"]
    longer = train_stage1.main(args(tiny, tmp_path, "f", 6, "--resume", "auto"))  # more steps: it continues
    assert longer["steps"] == 6 and longer["checkpoint"].endswith("step_000006")


def test_resume_auto_without_a_run_name_continues_the_newest_unfinished_run(tiny, tmp_path, capsys):
    def unnamed(steps, *extra):
        argv = args(tiny, tmp_path, "x", steps, *extra)
        i = argv.index("--run_name")
        return argv[:i] + argv[i + 2:]

    with pytest.raises(SystemExit, match="no unfinished stage-1 run in .* to continue"):
        train_stage1.main(unnamed(8, "--resume", "auto"))                 # nothing to resume: no new run
    assert not (tmp_path / "runs").exists()
    train_stage1.main(args(tiny, tmp_path, "done", 4))
    train_stage1.main(args(tiny, tmp_path, "cut", 8))
    cut = tmp_path / "ck" / "cut"
    shutil.rmtree(cut / "step_000008")                                 # as kill -9 after step 4's save leaves it
    (cut / "latest").write_text("step_000004\n")
    capsys.readouterr()
    summary = train_stage1.main(unnamed(8, "--resume", "auto"))
    out = capsys.readouterr().out
    assert summary["run"] == "cut" and summary["steps"] == 8
    assert "--resume auto: continuing run 'cut'" in out and f"resumed from {cut / 'step_000004'} at step 4" in out
    with pytest.raises(SystemExit, match=r"finished: cut \(step 8\), done \(step 4\)\. Name one with --run_name"):
        train_stage1.main(unnamed(8, "--resume", "auto"))


def test_a_crash_between_write_and_rename_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    import utils.checkpoint as ck

    real = os.replace

    def crash_on_second_step_dir(src, dst):
        if os.path.basename(dst) == "step_000008":
            raise OSError("simulated crash before the rename")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_second_step_dir)
    with pytest.raises(OSError, match="simulated"):
        train_stage1.main(args(tiny, tmp_path, "c", 12))
    monkeypatch.setattr(ck.os, "replace", real)
    latest = find_latest(str(tmp_path / "ck" / "c"))
    assert latest.endswith("step_000004")
    assert not os.path.exists(tmp_path / "ck" / "c" / "step_000008")
    summary = train_stage1.main(args(tiny, tmp_path, "c", 12, "--resume", "auto"))
    assert summary["steps"] == 12 and summary["checkpoint"].endswith("step_000012")


@pytest.fixture
def uneven_chat(tiny, tmp_path):
    """Answers of 1 to 4 captions: micro-batches with unequal supervised-token counts."""
    data = json.load(open(os.path.join(tiny.train, "chat.json"), encoding="utf-8"))[:64]
    for i, rec in enumerate(data):
        rec["conversations"][1]["value"] = rec["conversations"][1]["value"] * (1 + i % 4)
        rec["image"] = os.path.join(tiny.train, rec["image"])
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return str(path)


def test_accumulated_loss_is_the_mean_over_all_tokens(tiny, tmp_path, uneven_chat):
    def run(name, batch, accum):
        return train_stage1.main(args(tiny, tmp_path, name, 3, "--data_format", "chat", "--chat_json", uneven_chat,
                                      "--eval_chat_json", uneven_chat, "--batch_size", str(batch),
                                      "--grad_accum", str(accum), "--max_grad_norm", "0"))

    whole, split = run("whole", 8, 1), run("split", 4, 2)
    a, b = projector(whole["checkpoint"]), projector(split["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la, lb = losses(tmp_path / "runs" / "whole"), losses(tmp_path / "runs" / "split")
    # Equal up to float rounding (padding to 4 vs 8 rows changes matmul shapes); a mean of
    # per-micro-batch means would not match on this uneven data.
    assert la.keys() == lb.keys() == {1, 2, 3}                       # every step logged: nothing vacuous below
    assert all(abs(la[s] - lb[s]) < 1e-5 * abs(la[s]) for s in la)


def test_non_finite_steps_are_skipped_counted_and_abort_when_persistent(tiny, tmp_path, monkeypatch):
    from model import LlavaModel

    real = LlavaModel.forward
    calls = {"n": 0, "bad": {3}}

    def flaky(self, *a, **k):
        calls["n"] += 1
        ls, n = real(self, *a, **k)
        return (ls * float("nan"), n) if self.training and calls["n"] in calls["bad"] else (ls, n)

    monkeypatch.setattr(LlavaModel, "forward", flaky)
    summary = train_stage1.main(args(tiny, tmp_path, "nan", 6))
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 6
    p = projector(summary["checkpoint"])
    assert p and all(torch.isfinite(v).all() for v in p.values())
    calls.update(n=0, bad=set(range(1, 100)))
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        train_stage1.main(args(tiny, tmp_path, "nan2", 6, "--max_nonfinite", "3"))


def test_refuses_to_mix_runs_unless_told(tiny, tmp_path):
    train_stage1.main(args(tiny, tmp_path, "same", 4))
    with pytest.raises(SystemExit, match="--resume auto.*--overwrite"):
        train_stage1.main(args(tiny, tmp_path, "same", 4))
    summary = train_stage1.main(args(tiny, tmp_path, "same", 4, "--overwrite"))
    assert summary["steps"] == 4 and len(losses(tmp_path / "runs" / "same")) == 4


def test_the_hf_token_reaches_no_file_and_no_log(tiny, tmp_path, capsys):
    secret = "hf_SECRETtoken0123456789"
    train_stage1.main(args(tiny, tmp_path, "tok", 4, "--hf_token", secret, "--eval_interval", "2", "--sample_replies", "1"))
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert secret.encode() not in fh.read(), os.path.join(root, f)


def test_trainer_state_is_loaded_without_running_pickled_code(tmp_path):
    import utils.checkpoint as ck

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 1, "payload": Evil()}, tmp_path / ck.STATE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only"):
        ck.load_state(str(tmp_path))


def test_resume_state_holds_every_trained_parameter_even_one_without_a_gradient_yet(tmp_path):
    """DCP saves the optimizer state that exists (pytorch #192202): a trained parameter that had no
    gradient before a save would be missing, and the resumed optimizer would ask for it. Every
    parameter gets AdamW's own initial state at once, which changes no step."""
    from utils.checkpoint import RESUME_DIR, complete_optimizer_state, load_resume, save_resume

    def build(seed, complete=True):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        model[0].bias.requires_grad_(False)                           # frozen: in no resume state
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
        if complete:
            complete_optimizer_state(opt)
        return model, opt

    def step(model, opt, x):
        model[0](x).sum().backward()                                   # model[1] gets no gradient
        opt.step()
        opt.zero_grad()

    (model, opt), (lazy, lazy_opt) = build(0), build(0, complete=False)
    for k in range(3):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(k))
        step(model, opt, x), step(lazy, lazy_opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), lazy.parameters()))   # inert
    assert len(lazy_opt.state) == 1 and len(opt.state) == 3
    save_resume(str(tmp_path), model, opt)
    assert os.path.isfile(tmp_path / RESUME_DIR / ".metadata")
    again, again_opt = build(1)                                        # another init: all of it is loaded
    load_resume(str(tmp_path), again, again_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()) if a.requires_grad)
    assert not torch.equal(model[0].bias, again[0].bias)               # the frozen one is the files' business
    for p, q in zip(opt.param_groups[0]["params"], again_opt.param_groups[0]["params"]):
        assert opt.state[p].keys() == again_opt.state[q].keys()
        assert all(torch.equal(opt.state[p][k], again_opt.state[q][k]) for k in opt.state[p])


def test_a_resume_that_would_train_other_parameters_is_refused(tiny, tmp_path):
    train_stage1.main(args(tiny, tmp_path, "t", 2))
    with pytest.raises(SystemExit, match="that run trained other parameters.*--tune_llm none there, lora here"):
        train_stage1.main(args(tiny, tmp_path, "t", 4, "--resume", "auto", "--tune_llm", "lora"))


def test_a_resume_keeps_the_checkpoints_global_batch_or_refuses_naming_the_flags(tiny, tmp_path, monkeypatch, capsys):
    """A run of global batch 8 (4 x 2 accumulated here, as 4 x 1 x 2 processes would make it),
    resumed by a command that alone would make 4 (torchrun dropped from the resume hint): the
    accumulation is derived and said, and the steps equal the uninterrupted run's. A batch size
    that cannot make 8 is refused before any model loads, naming the flags that continue the run;
    --change_global_batch trains on with the new one."""
    base = ["--seed", "1", "--lr", "3e-3"]
    flags = dict(save_interval=2, keep_last=0)
    whole = train_stage1.main(train_argv(tiny, tmp_path, "whole", 6, "--grad_accum", "2", *base, **flags))
    for name in ("derived", "refused", "changed"):
        shutil.copytree(tmp_path / "ck" / "whole" / "step_000002", tmp_path / "ck" / name / "step_000002")
    capsys.readouterr()

    derived = train_stage1.main(train_argv(tiny, tmp_path, "derived", 6, *base, "--resume", "auto", **flags))
    out = capsys.readouterr().out
    assert "resuming with the checkpoint's global batch 8 (4 x 2 accumulated x 1 process(es))" in out
    assert "global batch             8 = 4 x 2 accum x 1 procs" in out
    assert losses(tmp_path / "runs" / "derived") == {s: v for s, v in losses(tmp_path / "runs" / "whole").items()
                                                     if s > 2}
    a, b = projector(whole["checkpoint"]), projector(derived["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)

    def no_model(*a, **kw):
        raise AssertionError("a model loaded before the refusal")

    monkeypatch.setattr(train_stage1, "build_training_model", no_model)
    with pytest.raises(SystemExit) as refused:
        train_stage1.main(train_argv(tiny, tmp_path, "refused", 6, "--batch_size", "3", *base, "--resume", "auto",
                                     **flags))
    message = str(refused.value.code)
    assert "global batch of 8 (4 x 2 accumulated x 1 process(es))" in message
    assert "--batch_size 2 on 1 process(es) (x 4 accumulated)" in message and "--change_global_batch" in message
    monkeypatch.undo()

    changed = train_stage1.main(train_argv(tiny, tmp_path, "changed", 4, *base, "--resume", "auto",
                                           "--change_global_batch", **flags))
    assert "the global batch goes from 8" in capsys.readouterr().out
    config = json.loads((tmp_path / "runs" / "changed" / "config.json").read_text())
    assert config["global_batch_size"] == 4 and changed["steps"] == 4
