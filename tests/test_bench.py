"""Benchmarks: VLMEvalKit's exact-matching rules on crafted cases (written from
vlmeval/utils/matching_util.py and vlmeval/dataset/utils/yorn.py), its TSV layout (base64 images,
image-index references, image_path), and `eval_llava.py --bench` against a fake OpenAI-compatible
server: scores computed from the replies, a run killed midway resumed without asking twice."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

import bench
import eval_llava
from tests.conftest import ROOT
from tests.test_api import FakeApi, KEY
from utils import bench_scoring as S
from utils import console

OPTS = {"A": "红色", "B": "蓝色", "C": "绿色", "D": "黄色"}


@pytest.mark.parametrize("reply,exact,lenient", [
    ("A", "A", "A"), ("B.", "B", "B"), ("(C)", "C", "C"), ("The answer is D", "D", "D"),
    ("答案是 B", "B", "B"),          # a space makes B a word of its own: VLMEvalKit parses it
    ("选A", None, "A"), ("c", None, "C"), ("答案是B", None, "B"),
    ("蓝色", "B", "B"),              # the text of exactly one option
    ("红色还是蓝色", None, None),     # two options' texts: ambiguous
    ("A and B", None, None), ("", None, None),
    ("the answer is c", "C", "C"),   # VLMEvalKit's verbose-answer pattern ignores case
    ("A B C D E F G H I J", None, None),   # the one letter must be among the last five words
    ("Cannot determine the answer", "Z", "Z"),
])
def test_choice_extraction_follows_vlmevalkit(reply, exact, lenient):
    assert S.extract_choice(reply, OPTS) == exact
    assert S.extract_choice(reply, OPTS, lenient=True) == lenient


@pytest.mark.parametrize("reply,exact,lenient", [
    ("Yes", "Yes", "Yes"), ("no.", "No", "No"), ("Yes, it is.", "Yes", "Yes"), ("yes or no", "Unknown", "Unknown"),
    ("是的", "Unknown", "Yes"), ("不是", "Unknown", "No"), ("Yes。", "Unknown", "Yes"), ("maybe", "Unknown", "Unknown"),
])
def test_yes_no_extraction_follows_vlmevalkit(reply, exact, lenient):
    assert S.extract_yes_no(reply) == exact
    assert S.extract_yes_no(reply, lenient=True) == lenient


def item(index, answer, category="c", **kw):
    return bench.BenchItem(index=index, question="q", answer=answer, category=category, **kw)


def test_circular_counts_a_question_only_when_every_rotation_is_right():
    M = S.CIRCULAR_STRIDE
    items = [item(1, "A", "color"), item(1 + M, "B", "color"), item(2, "C", "shape"), item(2 + M, "D", "shape")]
    got = S.score_choices(items, {1: "A", 1 + M: "B", 2: "C", 2 + M: None}, circular=True)
    assert got["circular"] == 50.0 and got["vanilla"] == 100.0 and got["vanilla_all"] == 75.0
    assert got["unparsed"] == 1 and got["categories"]["shape"]["circular"] == 0.0
    assert got["categories"]["color"] == {"circular": 100.0, "vanilla": 100.0, "n": 1}


def test_mme_acc_plus_and_the_categories_present():
    items = [item(0, "Yes", "color", image_path="a.jpg"), item(1, "No", "color", image_path="a.jpg"),
             item(2, "Yes", "color", image_path="b.jpg"), item(3, "No", "color", image_path="b.jpg"),
             item(4, "Yes", "code_reasoning", image_path="c.jpg"), item(5, "No", "code_reasoning", image_path="c.jpg")]
    got = S.score_yes_no(items, {0: "Yes", 1: "No", 2: "Yes", 3: "Yes", 4: "Unknown", 5: "No"}, "mme")
    assert got["categories"]["color"]["acc"] == 75.0 and got["categories"]["color"]["acc_plus"] == 50.0
    assert got["perception"] == 125.0 and got["cognition"] == 50.0 + 0.0
    assert got["categories_present"]["perception"] == ["color"]


def test_mme_pairs_by_the_whole_image_without_image_path():
    """Two JPEGs whose base64 starts the same (the header): still two images, two pairs."""
    def jpeg(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
        return base64.b64encode(buf.getvalue()).decode()
    red, blue = jpeg((255, 0, 0)), jpeg((0, 0, 255))
    assert red[:64] == blue[:64] and red != blue
    items = [item(0, "Yes", "color", image=red), item(1, "No", "color", image=red),
             item(2, "Yes", "color", image=blue), item(3, "No", "color", image=blue)]
    got = S.score_yes_no(items, {0: "Yes", 1: "No", 2: "Yes", 3: "Yes"}, "mme")
    assert got["categories"]["color"]["acc_plus"] == 50.0 and got["categories"]["color"]["acc"] == 75.0


def test_pope_f1_with_a_split_without_yes_and_rows_in_two_splits():
    items = [item(0, "Yes", split="random"), item(1, "No", split="random"), item(2, "No", split="adversarial"),
             item(3, "Yes", split="random,popular")]
    got = S.score_yes_no(items, {0: "Yes", 1: "Yes", 2: "No", 3: "Unknown"}, "pope")
    r = got["splits"]["random"]
    assert (r["precision"], r["recall"], r["accuracy"]) == (50.0, 50.0, 100 / 3)
    assert got["splits"]["adversarial"]["precision"] == 0.0 and got["splits"]["adversarial"]["f1"] == 0.0
    assert got["splits"]["popular"]["n"] == 1 and got["all_n"] == 5   # row 3 counts in both of its splits
    assert got["splits"]["random"]["yes_ratio"] == pytest.approx(200 / 3)


def png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, columns):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, columns, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def mmbench_tsv(tmp_path):
    """Two questions with two rotations each; rotations share the image through its index; one
    row's image is corrupt."""
    M = S.CIRCULAR_STRIDE
    rows = []
    for q, (color, answer) in enumerate([("red", "红色"), ("blue", "蓝色")]):
        opts = ["红色", "蓝色"]
        for k in range(2):
            o = opts[k:] + opts[:k]
            rows.append({"index": q + k * M, "question": "什么颜色？", "hint": "", "A": o[0], "B": o[1],
                         "answer": "AB"[o.index(answer)], "category": "color",
                         "image": png_b64(color) if k == 0 else str(q)})
    rows.append({"index": 5, "question": "什么颜色？", "hint": "看图", "A": "红色", "B": "蓝色", "answer": "A",
                 "category": "broken", "image": base64.b64encode(b"x" * 100).decode()})
    path = tmp_path / "MMBench_TOY_CN.tsv"
    write_tsv(path, rows, ["index", "question", "hint", "A", "B", "answer", "category", "image"])
    return path


def test_reading_base64_references_and_image_path(tmp_path):
    b = bench.read_bench(str(mmbench_tsv(tmp_path)))
    assert b.family == "mcq" and b.circular and len(b.items) == 5
    assert b.items[1].image == b.items[0].image and len(b.items[0].image) > 64
    assert bench.item_image(b.items[1], str(tmp_path), None).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(bench.SampleError):
        bench.item_image(b.items[4], str(tmp_path), None)
    prompt = bench.build_prompt(b.items[4], b, "vlmeval")
    assert prompt == ("Hint: 看图\nQuestion: 什么颜色？\nOptions:\nA. 红色\nB. 蓝色\n"
                      "Please select the correct answer from the options above. \n")
    assert bench.build_prompt(b.items[4], b, "llava") == "看图\n什么颜色？\nA. 红色\nB. 蓝色\n请直接回答选项字母。"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "x.png")
    write_tsv(tmp_path / "MME.tsv", [{"index": 0, "question": "Is it blue? Please answer yes or no.", "answer": "Yes",
                                      "category": "color", "image_path": "x.png"}],
              ["index", "question", "answer", "category", "image_path"])
    mme = bench.read_bench(str(tmp_path / "MME.tsv"))
    assert (mme.family, mme.kind) == ("yorn", "mme")
    assert bench.item_image(mme.items[0], str(tmp_path), None).getpixel((0, 0)) == (0, 0, 255)


def test_a_tsv_missing_columns_is_refused_in_one_line(tmp_path, capsys):
    write_tsv(tmp_path / "bad.tsv", [{"index": 0, "question": "q"}], ["index", "question"])
    with pytest.raises(bench.BenchError, match="missing column"):
        bench.read_bench(str(tmp_path / "bad.tsv"))


def test_api_bench_scores_from_the_replies_and_resumes_without_asking_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REF_KEY", KEY)
    fake = FakeApi()
    asked = []
    # The fake cannot see the image: it always picks the red option, right for the red question only.
    fake.answer = lambda q: (asked.append(q), "A" if "A. 红色" in q else "B")[1]
    real_add, calls = bench.Predictions.add, []

    def killed_after_two(self, records):
        real_add(self, records)
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt    # Ctrl-C after the second batch was written

    path = mmbench_tsv(tmp_path)
    argv = ["--api_base", fake.base, "--api_model", "ref-vl", "--api_key_env", "REF_KEY", "--api_timeout", "5",
            "--bench", str(path), "--out_dir", str(tmp_path / "out"), "--batch_size", "1"]
    try:
        monkeypatch.setattr(bench.Predictions, "add", killed_after_two)
        with pytest.raises(SystemExit) as stopped:
            eval_llava.main(argv)
        assert stopped.value.code == 130 and len(asked) == 2
        assert "stopped: 2 of 5 answers are kept in" in capsys.readouterr().err
        monkeypatch.setattr(bench.Predictions, "add", real_add)
        eval_llava.main(argv)
    finally:
        console.set_stream(None)
        fake.server.shutdown()
    assert len(asked) == 4                 # every readable row once in all; the corrupt one never
    lines = (tmp_path / "out" / "MMBench_TOY_CN_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 5 and json.loads(lines[0])["model"] == "ref-vl"
    scores = json.loads((tmp_path / "out" / "MMBench_TOY_CN_scores.json").read_text())
    assert scores["exact"]["circular"] == pytest.approx(100 / 3) and scores["skipped"] == {"corrupt_image": 1}
    assert scores["exact"]["vanilla_all"] == pytest.approx(40.0)
    assert "circular" in capsys.readouterr().err


def test_predictions_of_another_model_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    bench.Predictions(str(path), {"model": "a"}).close()
    with pytest.raises(bench.BenchError, match="another run"):
        bench.Predictions(str(path), {"model": "b"})


def test_our_checkpoint_answers_a_bench_and_logs_tensorboard(chain, tmp_path, capsys):
    """Our model's path: prompts measured in tokens, batched greedy replies, the table, TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, s2, _ = chain
    path = mmbench_tsv(tmp_path)
    try:
        eval_llava.main(["--checkpoint", s2, "--bench", str(path), "--out_dir", str(tmp_path / "out"),
                         "--run_dir", str(tmp_path / "run"), "--device", "cpu", "--extract", "lenient"])
    finally:
        console.set_stream(None)
    scores = json.loads((tmp_path / "out" / "MMBench_TOY_CN_scores.json").read_text())
    assert scores["answered"] == 4 and scores["skipped"] == {"corrupt_image": 1} and "lenient" in scores
    assert scores["model"].endswith(s2.rstrip("/").split("/")[-1]) and len(scores["md5"]) == 32
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert "bench/MMBench_TOY_CN/circular" in acc.Tags()["scalars"]
    assert "VLMEvalKit exact matching" in capsys.readouterr().err


def test_the_toy_benches_are_real_vlmevalkit_files_and_the_demo_scores_them(chain, tmp_path):
    """toy_instructions writes the three toy benchmarks beside the world; the stage-2 demo's
    figures (toy_demo.toy_bench_figures, which its summary.json carries) come from them."""
    import toy_demo
    from assistant import Assistant

    _, data, _, s2, _ = chain
    kinds = {n: bench.read_bench(f"{data.bench}/{n}.tsv") for n in ("toy_MMBench_EN", "toy_MME", "toy_POPE")}
    assert [(b.family, b.kind, b.circular) for b in kinds.values()] == [
        ("mcq", "mmbench", True), ("yorn", "mme", False), ("yorn", "pope", False)]
    mcq = kinds["toy_MMBench_EN"]
    assert {it.category for it in mcq.items} == {"color", "shape", "position"}
    assert len(mcq.items) > len({int(it.index) % S.CIRCULAR_STRIDE for it in mcq.items})   # rotations present
    figures = toy_demo.toy_bench_figures(Assistant.from_checkpoint(s2), data.bench, str(tmp_path))
    assert set(figures) == {"toy_mmbench_circular", "toy_mmbench_vanilla", "toy_mme_perception", "toy_pope_f1"}
    assert 0 <= figures["toy_mmbench_circular"] <= figures["toy_mmbench_vanilla"] <= 100
    assert (tmp_path / "stage2_step4" / "toy_POPE_scores.json").is_file()


def test_hallusionbench_figure_and_question_accuracy_per_split():
    """aAcc per question; fAcc: every question on one figure right; qAcc: one question right on
    every figure of its set. The ids are the 4th-6th fields of the index (category_..._SET_FIG_Q)."""
    rows = [("VD_x_y_0_0_0", "Yes", "Yes"), ("VD_x_y_0_0_1", "No", "No"),    # figure 0: both right
            ("VD_x_y_0_1_0", "Yes", "No"), ("VD_x_y_0_1_1", "No", "No"),     # figure 1: one wrong
            ("VS_x_y_1_0_0", "Yes", "Unknown")]
    items = [bench.BenchItem(index=i, question="q", answer=a, category=i[:2], l2_category="chart") for i, a, _ in rows]
    got = S.score_yes_no(items, {i: p for i, _, p in rows}, "hallusionbench")
    assert got["aAcc"] == 60.0 and got["overall"] == 60.0
    assert got["fAcc"] == pytest.approx(100 / 3)    # chart_0_0 right; chart_0_1 and chart_1_0 not
    assert got["qAcc"] == pytest.approx(100 / 3)    # chart_0_1 right on both figures; chart_0_0 and chart_1_0 not
    assert got["categories"]["VD"] == {"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0, "n": 4}
    assert got["categories"]["VS"]["aAcc"] == 0.0 and got["categories"]["chart"]["n"] == 5


def test_a_judge_reads_the_replies_exact_matching_cannot_and_is_asked_once(tmp_path, monkeypatch):
    """A model that answers in words: exact matching leaves every reply unparsed; the judge's
    figure (its own, never the exact one) comes from its verdicts, kept for the next scoring."""
    monkeypatch.setenv("REF_KEY", KEY)
    fake = FakeApi()
    fake.answer = lambda q: "A" if "匹配答案" in q else "我选第一个"     # the judge maps "the first one" to A
    path = mmbench_tsv(tmp_path)
    argv = ["--api_base", fake.base, "--api_model", "ref-vl", "--api_key_env", "REF_KEY", "--api_timeout", "5",
            "--bench", str(path), "--out_dir", str(tmp_path / "out"), "--judge_api_base", fake.base,
            "--judge_model", "judge-llm", "--judge_key_env", "REF_KEY"]
    try:
        eval_llava.main(argv)
        judged = [r for r in fake.requests if r["body"]["model"] == "judge-llm"]
        eval_llava.main(argv)                     # scoring again: nothing is asked again
    finally:
        console.set_stream(None)
        fake.server.shutdown()
    assert len(judged) == 4 and len([r for r in fake.requests if r["body"]["model"] == "judge-llm"]) == 4
    assert len([r for r in fake.requests if r["body"]["model"] == "ref-vl"]) == 4
    assert "选项: There are several options: \nA. 红色\nB. 蓝色\n" in judged[0]["body"]["messages"][0]["content"]
    scores = json.loads((tmp_path / "out" / "MMBench_TOY_CN_scores.json").read_text())
    # The corrupt-image row has no reply: unparsed under both, and scored wrong.
    assert scores["exact"]["unparsed"] == 5 and scores["exact"]["vanilla"] == 0.0
    # Always A: the red question is right in its original order only, the blue one never.
    judge = scores["judge"]
    assert (judge["vanilla"], judge["circular"], judge["unparsed"]) == (pytest.approx(100 / 3), 0.0, 1)
    assert judge["categories"]["color"]["vanilla"] == 50.0
    verdicts = [json.loads(ln) for ln in open(tmp_path / "out" / "MMBench_TOY_CN_judge.jsonl")]
    assert {v["verdict"] for v in verdicts} == {"A"} and len(verdicts) == 4


def test_an_api_model_on_the_toy_benches_is_scored_from_its_replies(chain, tmp_path, monkeypatch):
    """The three toy files through an API model that cannot see: its replies, scored here from
    the files' own answer column, give the figures eval_llava.py writes."""
    _, data, _, _, _ = chain
    monkeypatch.setenv("REF_KEY", KEY)
    fake = FakeApi()
    # MCQ: always the letter of the option that comes first in the alphabet of its text; yes/no:
    # "Yes" when the question names a colour, "No" otherwise (and for existence questions).
    from toy_world import COLORS as colors

    def answer(q):
        if "Options:" in q:
            options = dict(ln.split(". ", 1) for ln in q.splitlines() if len(ln) > 2 and ln[1:3] == ". ")
            return min(options, key=lambda k: options[k])
        return "Yes" if any(c in q for c in colors) else "No"
    fake.answer = answer
    got = {}
    try:
        for name in ("toy_MMBench_EN", "toy_MME", "toy_POPE"):
            eval_llava.main(["--api_base", fake.base, "--api_model", "ref-vl", "--api_key_env", "REF_KEY",
                             "--bench", f"{data.bench}/{name}.tsv", "--out_dir", str(tmp_path)])
            got[name] = json.loads((tmp_path / f"{name}_scores.json").read_text())["exact"]
    finally:
        console.set_stream(None)
        fake.server.shutdown()
    rows = {n: list(csv.DictReader(open(f"{data.bench}/{n}.tsv", encoding="utf-8"), delimiter="\t"))
            for n in ("toy_MMBench_EN", "toy_MME", "toy_POPE")}
    mcq = rows["toy_MMBench_EN"]
    right = {int(r["index"]): min("ABCD", key=lambda k: r[k] or "\uffff") == r["answer"] for r in mcq}
    groups: dict = {}
    for i, ok in right.items():
        groups.setdefault(i % S.CIRCULAR_STRIDE, []).append(ok)
    assert got["toy_MMBench_EN"]["vanilla"] == pytest.approx(100 * sum(right[i] for i in groups) / len(groups))
    assert got["toy_MMBench_EN"]["circular"] == pytest.approx(100 * sum(all(g) for g in groups.values()) / len(groups))
    assert got["toy_MMBench_EN"]["unparsed"] == 0
    pope = rows["toy_POPE"]         # existence questions name a shape: always "No"
    assert got["toy_POPE"]["all_f1"] == 0.0 and got["toy_POPE"]["all_yes_ratio"] == 0.0
    assert got["toy_POPE"]["all_accuracy"] == pytest.approx(100 * sum(r["answer"] == "No" for r in pope) / len(pope))
    mme = rows["toy_MME"]           # colour questions: always "Yes"; position questions: always "No"
    pred = {int(r["index"]): "Yes" if any(c in r["question"] for c in colors) else "No" for r in mme}
    cats = {}
    for r in mme:
        cats.setdefault(r["category"], {}).setdefault(r["image_path"], []).append(pred[int(r["index"])] == r["answer"])
    want = sum(100 * sum(sum(v) for v in c.values()) / sum(len(v) for v in c.values())
               + 100 * sum(all(v) for v in c.values()) / len(c) for c in cats.values())
    assert got["toy_MME"]["perception"] == pytest.approx(want) and set(cats) == {"color", "position"}


class Stderr:
    """A process's stderr, line by line, read in a thread: a blocking read must not hang a test."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.decode())

    def text(self) -> str:
        """All of it, once the process has ended (the reader reaches the end of the pipe)."""
        self._reader.join(timeout=60)
        return "".join(self.lines)

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}:\n" + "".join(self.lines)[-2000:]
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.02)


@pytest.mark.slow
def test_a_stopped_bench_says_what_it_kept_and_the_same_command_continues(chain, tmp_path):
    """SIGTERM, then Ctrl-C on the run it continues: each finishes its batch, says in one line how
    many answers the predictions file keeps and that the same command continues, exits 128 + the
    signal without a traceback; nothing is asked twice."""
    _, data, s1, _, _ = chain
    with open(os.path.join(data.bench, "toy_POPE.tsv"), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    # The toy POPE questions 50 times (copies share the first's image by its index): enough
    # batches of two that a stop lands mid-run.
    copies = [{**r, "index": str(k * len(rows) + i), "image": r["image"] if k == 0 else r["index"]}
              for k in range(50) for i, r in enumerate(rows)]
    tsv = tmp_path / "toy_POPE_long.tsv"
    write_tsv(tsv, copies, list(rows[0]))
    preds = tmp_path / "out" / "toy_POPE_long_predictions.jsonl"
    cmd = [sys.executable, "eval_llava.py", "--checkpoint", s1, "--bench", str(tsv), "--out_dir", str(tmp_path / "out"),
           "--batch_size", "2", "--bench_tokens", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def answers() -> list[int]:
        lines = preds.read_text(encoding="utf-8").splitlines()[1:] if preds.exists() else []
        return [json.loads(ln)["index"] for ln in lines if ln.endswith("}")]

    kept = 0
    for signum, hint in ((signal.SIGTERM, ""), (signal.SIGINT, " (Ctrl-C again to quit at once)")):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = Stderr(proc)
        err.wait_until(lambda: any(f"{kept} answered before" in ln for ln in err.lines), "the resume line")
        err.wait_until(lambda: len(answers()) > kept, "a new batch")
        proc.send_signal(signum)
        assert proc.wait(timeout=300) == 128 + signum
        text = err.text()
        done = answers()
        assert len(done) == len(set(done)) and len(done) > kept              # nothing asked twice
        kept = len(done)
        assert f"{signal.Signals(signum).name}: finishing this batch, then stopping{hint}" in text
        assert f"stopped: {kept} of {len(copies)} answers are kept in {preds}; the same command continues " \
               f"from there" in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert kept < len(copies)
