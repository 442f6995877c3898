"""Benchmarks in VLMEvalKit's TSV layout (MMBench-EN/CN, CCBench, MMStar, SEED-Bench, AI2D, MME,
POPE, HallusionBench), asked of our model or of an API model, and scored by VLMEvalKit's rules
without a judge (utils/bench_scoring.py), so that the figures compare with published ones.

    python eval_llava.py --checkpoint checkpoints/<run> --bench data/toy/bench/toy_MMBench_EN.tsv

A TSV row: `index`, `question`, optional `hint`, options `A`, `B`, ... (multiple choice), `answer`,
`category` (`l2-category` when present), and `image` (base64, or, when 64 characters or fewer, the
index of the row whose image it shares) or `image_path`. The family comes from the columns
(lettered options: multiple choice; Yes/No answers: yes/no) and the kind (MME, POPE, ...) from the
file name. Predictions go to a jsonl file as they come, so a stopped run continues where it left
off (Ctrl-C or SIGTERM: the batch in flight is finished, then the run says what it kept); an image
that cannot be read or a prompt that does not fit is counted, and scored wrong.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import csv
import json
import os
import signal
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from assistant import ApiAssistant, Assistant
from dataset import decode_image
from utils import bench_scoring as scoring
from utils import console
from utils.atomic import atomic_write
from utils.dist import StopRequest
from utils.fetch import file_md5
from utils.metrics import RunLogger
from utils.openai_api import ApiError, ChatApi
from utils.skips import SampleError, describe_skips

# A reply to a multiple-choice question is a letter or an option; a yes/no one, a word or a sentence.
DEFAULT_TOKENS = {"mcq": 16, "yorn": 32}
PROMPT_STYLES = scoring.PROMPT_STYLES
KINDS = ("mmbench", "ccbench", "mmstar", "seedbench", "ai2d", "mme", "pope", "hallusionbench")


class BenchError(ValueError):
    """A benchmark file that cannot be used, or a prediction file of another run: one line."""


class BenchStopped(Exception):
    """A run stopped by Ctrl-C or SIGTERM: what it kept and how to continue, in one line;
    `signum` is the first signal (a CLI exits 128 + it, as a process killed by it would)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@dataclass
class BenchItem:
    index: int | str
    question: str
    answer: str
    category: str
    options: dict[str, str] = field(default_factory=dict)   # letter -> text, in letter order
    hint: str | None = None
    l2_category: str | None = None
    split: str | None = None        # POPE: random | popular | adversarial (a row may be in several)
    image: str | None = None        # base64, a row's index already resolved to that row's image
    image_path: str | None = None


@dataclass
class Bench:
    path: str
    name: str                       # the file's stem: the figures' name
    md5: str
    family: str                     # mcq | yorn
    kind: str                       # one of KINDS, or "" (scored by the family's generic rules)
    items: list[BenchItem]

    @property
    def circular(self) -> bool:
        """MMBench's CircularEval, chosen by name as VLMEvalKit does (mmbench, ccbench, circular);
        rotations of question i are the rows i + k * 1e6."""
        return self.family == "mcq" and (self.kind in ("mmbench", "ccbench") or "circular" in self.name.lower()) \
            and all(isinstance(it.index, int) for it in self.items)


def _cell(row: dict, key: str) -> str | None:
    """A cell's text; None for a missing column or an empty cell (pandas' NaN)."""
    value = row.get(key)
    if value is None or value.strip() in ("", "nan", "NaN"):
        return None
    return value


def kind_of(name: str) -> str:
    low = name.lower().replace("-", "").replace("_", "")
    return next((k for k in KINDS if k in low), "")


def read_bench(path: str) -> Bench:
    """A VLMEvalKit TSV -> Bench; BenchError (one line) for a file that is not one."""
    if os.path.isdir(path):
        raise BenchError(f"--bench {path} is a folder: give one of its .tsv files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--bench {path}: no such file (scripts/download_data.py bench NAME fetches one)")
    csv.field_size_limit(sys.maxsize)   # a cell holds a whole base64 image
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in ("index", "question", "answer") if c not in columns]
    if "image" not in columns and "image_path" not in columns:
        missing.append("image or image_path")
    if missing:
        raise BenchError(f"{path}: not a VLMEvalKit benchmark TSV, missing column(s) {', '.join(missing)} "
                         f"(it has: {', '.join(columns[:12]) or 'nothing'})")
    letters = [c for c in string.ascii_uppercase if c in columns]
    name = os.path.splitext(os.path.basename(path))[0]
    answers = {(_cell(r, "answer") or "").strip() for r in rows}
    if letters[:2] == ["A", "B"]:
        family = "mcq"
    elif answers <= {"Yes", "No", "yes", "no"}:
        family = "yorn"
    else:
        raise BenchError(f"{path}: neither multiple choice (no option columns A, B) nor yes/no (answers "
                         f"{sorted(answers)[:5]}): not a benchmark this scorer knows")
    images = {r["index"]: _cell(r, "image") for r in rows} if "image" in columns else {}
    items = []
    for n, r in enumerate(rows, start=2):     # line 1 is the header
        raw = (r.get("index") or "").strip()
        if not raw:
            raise BenchError(f"{path}, line {n}: no index")
        index: int | str = int(raw) if raw.lstrip("-").isdigit() else raw   # HallusionBench's are text
        image = images.get(r["index"])
        if image is not None and len(image) <= 64:     # another row's index: one image, shared
            image = images.get(image.strip()) or f"missing:{image.strip()}"
        items.append(BenchItem(
            index=index, question=_cell(r, "question") or "", answer=(_cell(r, "answer") or "").strip(),
            category=_cell(r, "category") or "overall", l2_category=_cell(r, "l2-category"),
            options={c: r[c] for c in letters if _cell(r, c) is not None}, hint=_cell(r, "hint"),
            split=_cell(r, "split") or (_cell(r, "category") if kind_of(name) == "pope" else None),
            image=image, image_path=_cell(r, "image_path")))
    return Bench(path, name, file_md5(path), family, kind_of(name), items)


def build_prompt(item: BenchItem, bench: Bench, style: str) -> str:
    """The question as the model reads it (the `<image>` slot is added by the assistant).

    vlmeval: VLMEvalKit's default (ImageMCQDataset.build_prompt): "Hint: ...", "Question: ...",
    "Options:" with "A. text" lines, then its instruction; a yes/no question as it stands (MME's
    already ends in "Please answer yes or no."). llava: LLaVA-1.5's evaluation prompts."""
    if bench.family == "yorn":
        return scoring.yes_no_prompt(item.question, style)
    return scoring.mcq_prompt(item.question, item.options, item.hint, style)


def item_image(item: BenchItem, root: str, draft: int | None) -> Image.Image:
    """The row's image, or SampleError (counted): several images, a broken reference, bad base64."""
    data = item.image
    if data is None:
        if not item.image_path:
            raise SampleError("no_image", str(item.index))
        path = item.image_path
        if path.startswith("["):
            raise SampleError("several_images", str(item.index))
        return decode_image(path if os.path.isabs(path) else os.path.join(root, path), draft)
    if data.startswith("missing:"):
        raise SampleError("missing_image", f"row {item.index} refers to row {data[8:]}, which has no image")
    if data.startswith("["):
        try:
            parts = ast.literal_eval(data)
        except (ValueError, SyntaxError):
            parts = [None, None]
        if len(parts) != 1:
            raise SampleError("several_images", str(item.index))   # our model answers about one image
        data = parts[0]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise SampleError("corrupt_image", f"row {item.index}: not base64") from None
    return decode_image(raw, draft)


# --------------------------------------------------------------------------- predictions (resumable)

class Predictions:
    """`<name>_predictions.jsonl`: a header naming what answered, then one line per item, written
    (and flushed) as answers come. Opening it again continues: the items it holds are not asked
    again; a half-written last line (a killed run) is dropped; a header of another model, file or
    prompt is refused rather than mixed in."""

    def __init__(self, path: str, header: dict):
        self.path, self.done = path, {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().split("\n")
            complete = [ln for ln in lines[:-1] if ln.strip()]   # the text after the last newline is cut
            if complete:
                old = json.loads(complete[0])
                differ = {k: (old.get(k), v) for k, v in header.items() if old.get(k) != v}
                if differ:
                    raise BenchError(f"{path} holds predictions of another run ({'; '.join(f'{k}: {a} vs now {b}' for k, (a, b) in differ.items())}): "
                                     f"delete it to start again, or give another --out_dir")
                for ln in complete[1:]:
                    rec = json.loads(ln)
                    self.done[rec["index"]] = rec
            with open(path, "w", encoding="utf-8") as fh:   # rewrite without a cut tail
                fh.writelines(ln + "\n" for ln in complete or [json.dumps(header, ensure_ascii=False)])
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(header, ensure_ascii=False) + "\n")
        self._fh = open(path, "a", encoding="utf-8")

    def add(self, records: list[dict]) -> None:
        for rec in records:
            self.done[rec["index"]] = rec
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def answer_bench(assistant: Assistant | ApiAssistant, bench: Bench, preds: Predictions, style: str,
                 batch_size: int, max_new_tokens: int, stop: StopRequest | None = None) -> Counter:
    """Ask every item `preds` does not hold yet, shortest prompts first (batches of similar
    length pad little), writing each batch as it comes. Returns this run's API failures (those
    items are asked again by the next run). With `stop`, a Ctrl-C or SIGTERM ends the run after
    the batch in flight (a second Ctrl-C: at once) with BenchStopped."""
    todo = [it for it in bench.items if it.index not in preds.done]
    prompts = {it.index: build_prompt(it, bench, style) for it in todo}
    budget = assistant.question_budget(max_new_tokens)[0]      # tokens for our model, characters for an API
    if isinstance(assistant, Assistant):
        length = {i: len(assistant.tokenizer.encode(p, add_special_tokens=False)) for i, p in prompts.items()}
    else:
        length = {i: len(p) for i, p in prompts.items()}
    todo.sort(key=lambda it: length[it.index])
    root = os.path.dirname(os.path.abspath(bench.path))
    failed_before = Counter(assistant.failures)
    done_before = len(bench.items) - len(todo)
    stopped = False
    try:
        with console.progress(len(bench.items), bench.name, unit="q", initial=done_before) as bar:
            for start in range(0, len(todo), batch_size):
                if stop is not None and stop.signum:   # asked while the last batch was answered
                    stopped = True
                    break
                batch, chunk, records = todo[start:start + batch_size], [], []
                for it in batch:
                    if length[it.index] > budget:
                        records.append({"index": it.index, "skipped": "prompt_too_long"})
                        continue
                    try:
                        chunk.append((it, item_image(it, root, assistant.draft)))
                    except SampleError as e:
                        records.append({"index": it.index, "skipped": e.reason})
                replies = assistant.reply_batch([(img, [{"role": "user", "content": prompts[it.index]}])
                                                 for it, img in chunk],
                                                max_new_tokens=max_new_tokens, batch_size=batch_size) if chunk else []
                records += [{"index": it.index, "prediction": r} for (it, _), r in zip(chunk, replies) if r is not None]
                preds.add(records)
                bar.update(len(batch))
    except KeyboardInterrupt:   # a second Ctrl-C: the batch in flight is dropped; the ones written stay
        if stop is None:
            raise
        stopped = True
    if stopped:
        raise BenchStopped(stop.signum or signal.SIGINT, f"stopped: {len(preds.done)} of {len(bench.items)} answers "
                                                         f"are kept in {preds.path}; the same command continues from there")
    return Counter(assistant.failures) - failed_before


# --------------------------------------------------------------------------- the judge

@dataclass
class Judge:
    """An OpenAI-compatible model that names the option a free-form reply chose, where exact
    matching could not (VLMEvalKit's GPT judge, for multiple choice). Its verdicts are kept in
    `<name>_judge.jsonl`, so a second scoring asks nothing again."""

    api: ChatApi
    path: str
    verdicts: dict[int, str] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as fh:
                for ln in fh:
                    if ln.strip().endswith("}"):
                        rec = json.loads(ln)
                        if rec.get("model") == self.api.model:
                            self.verdicts[rec["index"]] = rec["verdict"]

    def choose(self, item: BenchItem, reply: str) -> str | None:
        """The option letter the judge reads in `reply`; 'Z' when it chose none; None when the
        API failed (counted: that item stays unparsed)."""
        if item.index in self.verdicts:
            return self.verdicts[item.index]
        question = scoring.judge_prompt(item.question, item.options, reply)
        try:
            text = self.api.complete([{"role": "user", "content": question}], max_tokens=16)
        except ApiError as e:
            self.failures[e.reason] += 1
            return None
        verdict = scoring.extract_choice(text, item.options) or "Z"
        self.verdicts[item.index] = verdict
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"index": item.index, "model": self.api.model, "verdict": verdict,
                                 "judge_reply": text}, ensure_ascii=False) + "\n")
        return verdict


# --------------------------------------------------------------------------- scoring and reports

def score_bench(bench: Bench, done: dict[int, dict], lenient: bool = False, judge: Judge | None = None) -> dict:
    """The figures of `bench` from its predictions: VLMEvalKit's exact matching always; the
    lenient extraction and the judge's as figures of their own, never mixed into it."""
    replies = {it.index: done.get(it.index, {}).get("prediction") for it in bench.items}
    skipped = Counter(done[i]["skipped"] for i in done if "skipped" in done[i])
    missing = sum(it.index not in done for it in bench.items)
    out: dict[str, Any] = {"benchmark": bench.name, "family": bench.family, "kind": bench.kind or "generic",
                           "items": len(bench.items), "answered": sum(r is not None for r in replies.values()),
                           "skipped": dict(skipped), "not_asked": missing}
    modes = ["exact"] + (["lenient"] if lenient else []) + (["judge"] if judge and bench.family == "mcq" else [])
    for mode in modes:
        if bench.family == "mcq":
            choices = {}
            for it in bench.items:
                reply = replies[it.index]
                choice = scoring.extract_choice(reply, it.options, lenient=mode == "lenient") if reply is not None else None
                if choice is None and mode == "judge" and reply is not None:
                    choice = judge.choose(it, reply)
                choices[it.index] = choice
            out[mode] = scoring.score_choices(bench.items, choices, circular=bench.circular)
        else:
            answers = {i: scoring.extract_yes_no(r, lenient=mode == "lenient") if r is not None else None
                       for i, r in replies.items()}
            out[mode] = scoring.score_yes_no(bench.items, answers, bench.kind)
    if judge is not None and judge.failures:
        out["judge_failures"] = dict(judge.failures)
    return out


def headline(scores: dict) -> dict[str, float]:
    """The figures worth a TensorBoard scalar or a summary line: name -> value."""
    flat: dict[str, float] = {}
    for mode in ("exact", "lenient", "judge"):
        if mode not in scores:
            continue
        prefix = "" if mode == "exact" else f"{mode}/"
        for key, value in scores[mode].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[prefix + key] = value
            elif isinstance(value, dict) and key in ("categories", "splits"):
                for cat, figures in value.items():
                    for fig, v in figures.items():
                        if isinstance(v, (int, float)):
                            flat[f"{prefix}{key}/{cat}/{fig}"] = v
    return flat


def print_scores(scores: dict, who: str, md5: str) -> None:
    console.header(f"{scores['benchmark']} · {who} · md5 {md5}")
    for mode in ("exact", "lenient", "judge"):
        if mode in scores:
            title = {"exact": "VLMEvalKit exact matching (no judge)", "lenient": "--extract lenient (not comparable "
                     "with published figures)", "judge": "with the judge's extraction"}[mode]
            console.info(f"\n{title}")
            for line in scoring.table(scores[mode]):
                console.info(line)
    notes = []
    if scores["skipped"]:
        notes.append(f"skipped (scored wrong): {describe_skips(Counter(scores['skipped']))}")
    if scores["not_asked"]:
        notes.append(f"{scores['not_asked']} item(s) not answered (API failures: run the same command again)")
    for note in notes:
        console.warn(note)


def run_bench(assistant: Assistant | ApiAssistant, source: Bench | str, out_dir: str, *, style: str = "vlmeval",
              batch_size: int = 32, max_new_tokens: int = 0, lenient: bool = False, judge_api: ChatApi | None = None,
              run_dir: str | None = None, step: int = 0, quiet: bool = False, stop_on_signal: bool = False) -> dict:
    """Ask, score, write `<name>_scores.json` beside `<name>_predictions.jsonl`, print the table,
    and add the headline figures to `run_dir`'s TensorBoard (bench/<name>/...) when given.
    `source`: a TSV path, or a Bench already read (a CLI checks it before loading a model).
    `stop_on_signal`: Ctrl-C / SIGTERM while answering stop after the batch in flight, with
    BenchStopped (the main thread of a CLI only: signal handlers live there)."""
    bench = read_bench(source) if isinstance(source, str) else source
    who = assistant.api.model if isinstance(assistant, ApiAssistant) else \
        os.path.abspath(assistant.source or "untrained model")
    tokens = max_new_tokens or DEFAULT_TOKENS[bench.family]
    header = {"benchmark": bench.name, "md5": bench.md5, "model": who, "prompt": style, "max_new_tokens": tokens}
    preds = Predictions(os.path.join(out_dir, f"{bench.name}_predictions.jsonl"), header)
    try:
        if not quiet:
            console.info(f"{bench.name}: {len(bench.items)} items, {bench.family}{' ' + bench.kind if bench.kind else ''}"
                         f"{' (circular)' if bench.circular else ''}, {len(preds.done)} answered before")
        with StopRequest("this batch, then stopping") if stop_on_signal else contextlib.nullcontext() as stop:
            failures = answer_bench(assistant, bench, preds, style, batch_size, tokens, stop)
    finally:
        preds.close()
    judge = Judge(judge_api, os.path.join(out_dir, f"{bench.name}_judge.jsonl")) if judge_api else None
    scores = score_bench(bench, preds.done, lenient, judge)
    scores.update({"model": who, "md5": bench.md5, "file": os.path.abspath(bench.path), "prompt": style,
                   "max_new_tokens": tokens, **({"api_failures": dict(failures)} if failures else {})})
    if not quiet:
        print_scores(scores, who, bench.md5)
    score_path = os.path.join(out_dir, f"{bench.name}_scores.json")
    atomic_write(score_path, json.dumps(scores, ensure_ascii=False, indent=2))
    if not quiet:
        console.info(f"predictions: {preds.path}\nscores:      {score_path}")
    if run_dir:
        logger = RunLogger(run_dir, ("tensorboard",))
        logger.log(step, {f"bench/{bench.name}/{k}": v for k, v in headline(scores).items()})
        logger.close()
    return scores
