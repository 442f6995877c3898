"""A run that cannot make progress stops and says why; a failing run says so while it runs;
Ctrl-C never ends in a traceback; a redirected log holds lines, not progress-bar redraws."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import train_stage1
from tests.conftest import ROOT, train_argv


def base_args(tiny, out, name="h", steps=30, *extra):
    return train_argv(tiny, out, name, steps, "--eval_interval", "200", *extra, batch_size=8, eval_samples=16)


def run_cli(argv, timeout=300, **kw):
    """train_stage1.py in a subprocess: a regression to an endless loop fails by timeout, not a hang."""
    return subprocess.run([sys.executable, "train_stage1.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def chat_args(tiny, out, image_root, *extra):
    argv = train_argv(tiny, out, "e", 20, "--eval_interval", "200", "--data_root", "", *extra, batch_size=8,
                      data_format="chat", chat_json=os.path.join(tiny.train, "chat.json"), image_root=image_root,
                      eval_chat_json=os.path.join(tiny.eval, "chat.json"))
    return argv


# --------------------------------------------------------------------------- no progress possible

@pytest.mark.slow
def test_no_usable_sample_in_a_whole_pass_stops_with_the_reasons(tiny, tmp_path):
    (tmp_path / "wrong_root").mkdir()        # a folder that exists but holds none of the images
    res = run_cli(chat_args(tiny, tmp_path, str(tmp_path / "wrong_root")))
    assert res.returncode == 1, res.stdout[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    n = len(json.load(open(os.path.join(tiny.train, "chat.json"))))
    assert err.startswith(f"no usable samples in a whole pass over the {n:,} training records: missing_image {n}, "
                          f"e.g. {tmp_path / 'wrong_root' / 'images'}")
    # The first-sample preview says why it shows nothing.
    assert "first sample: none of the first 50 records can be used: missing_image 50" in res.stdout
    assert not os.path.exists(tmp_path / "ck" / "e")                  # no checkpoint of a run that never trained


def test_a_long_run_of_empty_batches_stops_early(tiny, tmp_path):
    (tmp_path / "wrong_root").mkdir()
    with pytest.raises(SystemExit, match="no usable samples in 3 batches in a row of the"):
        train_stage1.main(chat_args(tiny, tmp_path, str(tmp_path / "wrong_root"), "--max_empty_batches", "3"))


def test_fewer_records_than_one_batch_stop_with_advice(tiny, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    records = json.load(open(os.path.join(tiny.train, "chat.json")))[:3]
    (few / "chat.json").write_text(json.dumps(records, ensure_ascii=False))
    with pytest.raises(SystemExit, match="3 training records make no full batch of 8: lower --batch_size"):
        train_stage1.main(chat_args(tiny, tmp_path, tiny.train, "--chat_json", str(few / "chat.json")))


# --------------------------------------------------------------------------- Ctrl-C

class _Gate(BaseHTTPRequestHandler):
    """Serves the tiny images; after the first request every request waits for `open`."""

    root = ""
    served = 0
    open = threading.Event()
    asked = threading.Event()

    def do_GET(self):
        cls = type(self)
        cls.served += 1
        if cls.served > 1:
            cls.asked.set()
            cls.open.wait(60)
        try:
            body = open(os.path.join(cls.root, self.path.lstrip("/")), "rb").read()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (OSError, ConnectionError):
            pass

    def log_message(self, *a):
        pass


@pytest.mark.slow
def test_second_ctrl_c_while_waiting_for_data_quits_without_a_traceback(tiny, tmp_path):
    """The data stalls (a slow image server) while the loop waits: the first Ctrl-C promises a
    save after the step, the second quits at once, in words, without a traceback."""
    _Gate.root, _Gate.served = tiny.train, 0
    _Gate.open.clear()
    _Gate.asked.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gate)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    records = json.load(open(os.path.join(tiny.train, "chat.json")))[:64]
    for r in records:
        r["image"] = f"http://127.0.0.1:{server.server_port}/{r['image']}"
    (tmp_path / "chat.json").write_text(json.dumps(records, ensure_ascii=False))
    argv = chat_args(tiny, tmp_path, str(tmp_path), "--chat_json", str(tmp_path / "chat.json"), "--num_workers", "2",
                     "--eval_interval", "0")
    proc = subprocess.Popen([sys.executable, "train_stage1.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert _Gate.asked.wait(120), "the loader never asked for a training image"   # workers are waiting
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:
            if "finishing this step" in line:
                break
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        _Gate.open.set()
        proc.kill()
        server.shutdown()
    assert proc.returncode == 130, out[-3000:]
    assert "quit at once: the steps since the last checkpoint are not saved" in out
    assert "Traceback" not in out


def test_ctrl_c_while_the_toy_world_builds_keeps_its_finished_parts_and_says_so(tmp_path, monkeypatch, capsys):
    """No checkpoint exists yet: the message says what was interrupted and what is kept, and the
    next build makes only the parts that were not finished (the LM prior is not trained again)."""
    import toy_demo
    import toy_world

    built = []
    real_llm, real_vision = toy_world.build_llm, toy_world.build_vision
    monkeypatch.setattr(toy_world, "recipe_hash", lambda size: "same")   # the stand-ins below change the code
    monkeypatch.setattr(toy_world, "build_llm", lambda *a, **kw: built.append("llm") or real_llm(*a, **kw))

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_world, "build_vision", ctrl_c)
    where = dict(models_root=str(tmp_path / "models" / "toy"), data_root=str(tmp_path / "data" / "toy"))
    monkeypatch.setattr(toy_demo, "ensure_toy_world", lambda size, log: toy_world.ensure_toy_world("tiny", **where,
                                                                                                  log=log))
    with pytest.raises(SystemExit) as stop:
        train_stage1.main(["--demo", "--checkpoints_dir", str(tmp_path / "ck"), "--runs_dir", str(tmp_path / "runs")])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted while building the toy world: the parts it finished are kept" in err
    assert "nothing saved since the last checkpoint" not in err
    monkeypatch.setattr(toy_world, "build_vision", real_vision)
    logged = []
    paths = toy_world.ensure_toy_world("tiny", **where, log=logged.append)
    assert built == ["llm"] and any(line.endswith(": kept, finished by an earlier build") for line in logged)
    assert os.path.isfile(os.path.join(paths.vision, "model.safetensors"))
    assert sorted(os.listdir(tmp_path / "models" / "toy-tiny")) == ["llm", "toy_world.json", "vision"]   # no .partial


# --------------------------------------------------------------------------- logs in a file

@pytest.mark.slow
def test_a_redirected_log_has_lines_not_bar_redraws(tiny, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "train_stage1.py", *base_args(tiny, tmp_path, "f", 20, "--log_interval",
                                                                            "5", "--eval_interval", "10")],
                             cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert res.returncode == 0, text[-2000:]
    assert "\r" not in text                                           # no redraws at all
    steps = [line for line in text.splitlines() if "step " in line and "/20 |" in line]
    assert [line.split()[1] for line in steps] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(line.startswith("step ") for line in steps)           # nothing glued in front
    assert all("| mem " in line for line in steps)                   # memory in every periodic line
    assert len(text) < 12_000


def run_in_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """A script run on a pseudo-terminal, as a user at a terminal sees it: (exit code, output)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # a terminal has a size
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "TERM": "xterm"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:                       # EIO: the terminal's other end closed (the process ended)
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_in_a_terminal_the_bar_and_the_sample_lines_do_not_tangle(tiny, tmp_path):
    code, out = run_in_a_terminal(["train_stage1.py", *base_args(tiny, tmp_path, "tty", 8, "--eval_interval", "4",
                                                                 "--sample_replies", "2", "--log_interval", "4")])
    assert code == 0, out[-3000:]
    assert "Loading weights" not in out                              # transformers' bar on every model load
    shown = [line.split("\r")[-1] for line in out.replace("\r\n", "\n").split("\n")]  # what stays on screen
    samples = [line for line in shown if "[sample " in line]
    assert len(samples) == 4, samples                                 # 2 replies at each of 2 evaluations
    assert all(line.startswith("  [sample ") for line in samples), samples   # nothing glued in front
    # Every line the loop prints (log lines, evaluations, notes, replies) starts its own line.
    printed = [line for line in shown if any(m in line for m in ("[sample ", "eval @", "note:", "ALARM", "step 4/8 |"))]
    assert len(printed) >= 8 and not [line for line in printed if "stage 1:" in line], printed
    assert any("stage 1" in line and "/8" in line for line in out.split("\r")), "no progress bar was drawn"


# --------------------------------------------------------------------------- alarms

def test_healthy_short_run_is_silent_and_logs_memory_and_a_step_0_eval(toy, tmp_path):
    summary = train_stage1.main(base_args(toy, tmp_path, "ok", 60, "--eval_interval", "30", "--lr", "3e-3"))
    assert summary["alarms"] == []
    assert summary["peak_mem_gib"] > 0.05
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "ok" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 30, 60]          # the curve has a "before"
    assert all("train/mem_gib" in r and "data/skip_rate" in r for r in rows if r["step"] % 10 == 0 and "train/loss" in r)
    assert summary["eval_loss_before"] > summary["eval_loss"]


@pytest.mark.slow   # an in-process training run: the slow tier
def test_a_smoke_run_too_short_to_judge_says_so_instead_of_raising_alarms(tiny, tmp_path, capsys):
    """20 steps that barely move the loss (a tiny lr): the soft checks have nothing to judge yet."""
    summary = train_stage1.main(base_args(tiny, tmp_path, "smoke", 20, "--lr", "1e-6", "--eval_interval", "10"))
    out = capsys.readouterr().out
    assert summary["alarms"] == [] and "ALARM" not in out
    kinds = {a["kind"] for a in summary["alarms_too_short_to_judge"]}
    assert kinds and kinds <= {"flat_loss", "image_gap"}
    assert "too short to judge before step 100 (not an alarm)" in out
    saved = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert saved["alarms"] == [] and saved["alarms_too_short_to_judge"] == summary["alarms_too_short_to_judge"]


def test_the_end_of_run_summary_is_rounded_for_reading_and_summary_json_is_whole(tiny, tmp_path, capsys):
    summary = train_stage1.main(base_args(tiny, tmp_path, "round", 4, "--eval_interval", "4"))
    out = capsys.readouterr().out
    assert "[sample " not in out                                      # --sample_replies 0 (train_argv's): none
    done = out[out.index("\ndone\n"):]
    assert f"{summary['eval_loss']:.4f}" in done and repr(summary["eval_loss"]) not in done
    saved = json.loads((tmp_path / "runs" / "round" / "summary.json").read_text())
    assert saved["eval_loss"] == summary["eval_loss"] and len(repr(saved["eval_loss"])) > 8


@pytest.mark.slow   # an in-process training run: the slow tier
def test_zero_learning_rate_raises_the_flat_loss_alarm(tiny, tmp_path, capsys):
    summary = train_stage1.main(base_args(tiny, tmp_path, "lr0", 20, "--lr", "0", "--eval_interval", "10"))
    kinds = [a["kind"] for a in summary["alarms"]]
    assert "flat_loss" in kinds and "grad_zero" not in kinds
    assert "! ALARM at step 10: held-out loss" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "lr0" / "metrics.jsonl")]
    assert any(r.get("alarm/flat_loss") == 1.0 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "lr0"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "alarm/flat_loss" in acc.Tags()["scalars"] and any(t.startswith("alarms") for t in acc.Tags()["tensors"])


@pytest.mark.slow   # an in-process training run: the slow tier
def test_projector_output_scaled_to_zero_raises_grad_and_gap_alarms(tiny, tmp_path, monkeypatch):
    from model import Projector

    real = Projector.forward
    monkeypatch.setattr(Projector, "forward", lambda self, x: 0.0 * real(self, x))
    summary = train_stage1.main(base_args(tiny, tmp_path, "zero", 20, "--eval_interval", "10"))
    by_kind = {a["kind"]: a for a in summary["alarms"]}
    assert by_kind["grad_zero"]["step"] == 1
    assert by_kind["image_gap"]["step"] == 20 and "image slots" in by_kind["image_gap"]["message"]
    assert summary["image_ablation_gap"] == 0.0


@pytest.mark.slow   # an in-process training run: the slow tier
def test_a_high_skip_rate_raises_the_skip_alarm(tiny, tmp_path):
    records = json.load(open(os.path.join(tiny.train, "chat.json")))
    for r in records[::5]:                                           # every fifth image missing: 20%
        r["image"] = "images/missing.png"
    (tmp_path / "chat.json").write_text(json.dumps(records, ensure_ascii=False))
    summary = train_stage1.main(chat_args(tiny, tmp_path, tiny.train, "--chat_json", str(tmp_path / "chat.json"),
                                          "--log_interval", "5"))
    alarm = next(a for a in summary["alarms"] if a["kind"] == "skip_rate")
    assert "samples skipped" in alarm["message"] and summary["skipped"]["missing_image"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "e" / "metrics.jsonl")]
    logged = [r for r in rows if "data/skipped/missing_image" in r]
    assert logged and logged[0]["step"] == 5 and 0.1 < logged[-1]["data/skip_rate"] < 0.3
