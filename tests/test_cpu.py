"""How a run uses a CPU (utils/cpu.py): the thread policy and where OMP_NUM_THREADS and --threads
win, bf16 autocast on a CPU, and what a run says about bf16 on the CPU it runs on."""

import json
import os

import pytest
import torch

import train_stage1
from tests.conftest import train_argv
from utils import cpu


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def threads_line(out: str) -> str:
    """The model section's line (the config's `threads 0` comes first)."""
    return [line for line in out.splitlines() if line.strip().startswith("threads ")][-1]


def test_omp_num_threads_and_threads_win_and_a_small_model_trains_on_one_thread(tiny, tmp_path, monkeypatch, capsys,
                                                                                 threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    train_stage1.main(train_argv(tiny, tmp_path, "policy", 2))
    assert "1 (a small model" in threads_line(capsys.readouterr().out) and torch.get_num_threads() == 1

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    train_stage1.main(train_argv(tiny, tmp_path, "omp", 2))
    assert "2 (OMP_NUM_THREADS)" in threads_line(capsys.readouterr().out) and torch.get_num_threads() == 2

    torch.set_num_threads(1)
    train_stage1.main(train_argv(tiny, tmp_path, "flag", 2, "--threads", "3"))
    assert "3 (--threads)" in threads_line(capsys.readouterr().out) and torch.get_num_threads() == 3


def test_a_large_model_takes_the_cores_no_other_process_uses(monkeypatch):
    """Two cores, one of them busy with another process over the look: one thread."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    looks = iter([{0: (1000, 900), 1: (1000, 900)}, {0: (1100, 1000), 1: (1100, 900)}])   # core 1: 100% busy
    monkeypatch.setattr(cpu, "_cpu_times", lambda cores: next(looks))
    monkeypatch.setattr(cpu.time, "sleep", lambda s: None)
    n, why = cpu.pick_threads(0, 600_000_000)
    assert n == 1 and "the 1 of 2 cores no other process was using" in why
    assert cpu.pick_threads(0, 3_000_000)[0] == 1                      # a small model: one, whatever the load
    assert cpu.pick_threads(4, 600_000_000) == (4, "--threads")


def test_bf16_autocast_trains_on_a_cpu(tiny, tmp_path, monkeypatch, threads_restored):
    """--precision bf16 on a CPU: frozen weights stored in bf16, the projector's master weights in
    fp32, forward passes under bf16 autocast (the first loss differs from fp32's by bf16 rounding,
    not more), and the projector trains."""
    built = {}
    real = train_stage1.build_training_model

    def keep(*a, **kw):
        built["model"], tok = real(*a, **kw)
        built["start"] = [p.detach().clone() for p in built["model"].projector.parameters()]
        return built["model"], tok

    monkeypatch.setattr(train_stage1, "build_training_model", keep)
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train_stage1.main(train_argv(tiny, tmp_path, precision, 4, "--precision", precision,
                                                       "--seed", "1", "--lr", "1e-2"))
        model = built["model"]
        frozen = {p.dtype for n, p in model.named_parameters() if not n.startswith("projector.")}
        assert frozen == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
        assert model.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        assert all(not torch.equal(a, p) for a, p in zip(built["start"], model.projector.parameters()))   # it trained
    first = {k: json.loads(open(os.path.join(r["run_dir"], "metrics.jsonl")).readline())["train/loss"]
             for k, r in runs.items()}
    assert first["bf16"] != first["fp32"] and abs(first["bf16"] - first["fp32"]) < 0.02 * first["fp32"]
    assert all(torch.isfinite(torch.tensor(r["train_loss_last"])) for r in runs.values())


@pytest.mark.parametrize("native, precision, params, says", [
    ("AMX", "auto", 600_000_000, "this CPU computes bf16 natively (AMX): its bf16 matmuls ran 5.0x faster"),
    ("", "bf16", 600_000_000, "ran 50x slower than fp32 here just now; --precision fp32 trains faster"),
    ("AMX", "auto", 3_000_000, ""),          # a toy model: nothing to gain worth a line
    ("", "auto", 600_000_000, ""),           # fp32 on a CPU that emulates bf16: nothing to say
    ("AMX", "fp32", 600_000_000, ""),        # asked for fp32 on purpose
])
def test_what_a_cpu_run_says_about_bf16(monkeypatch, native, precision, params, says):
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu, "bf16_speedup", lambda *a: 5.0 if native else 0.02)
    note = cpu.precision_note(precision, cpu.resolve_precision(precision, torch.device("cpu")), params)
    assert (says in note) if says else note == ""
