"""The demos: `python train_stage1.py --demo`, `python train_stage2.py --demo` and
`python train_stage3_lora.py --demo`. Each is an ordinary train() on the offline toy world
(toy_world.py), measured before and after on held-out images; train() has no demo branch.

    stage 1  the projector aligns a frozen toy LM:       caption exact match, toy VQA accuracy
    stage 2  full instruction tuning from stage 1:        toy VQA accuracy, answers that stop,
                                                          second-turn accuracy, captions kept
    stage 3  LoRA teaches the stage-2 model a new style:  the style's exact match, adapter size

A later stage continues from the newest finished demo run of the stage before it (in
--checkpoints_dir), and runs that demo first when there is none. The demos' settings (batch,
steps, lr, ...) live beside the defaults they override: train_config.DEMO_DEFAULTS.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from assistant import Assistant, answer_all
from bench import run_bench
from checkpoint_io import build_model, checkpoint_file, export_verdict, read_checkpoint_meta
from dataset import ImageLoader, LlavaDataset
from heldout import caption_exact_match
from model import ModelSpec
from prompts import CAPTION_PROMPT
from readers import read_chat_json, read_records
from toy_instructions import BENCH_NAMES, MME_MAX, QUESTIONS, STYLE_NOTE, ensure_instruction_data
from toy_world import VQA_TEMPLATE, ToyPaths, ensure_toy_world
from tuning import ADAPTER_DIR
from utils import console
from utils.checkpoint import STAGE_SCRIPTS, find_latest
from utils.config import dump_json
from utils.cpu import shared_threads
from utils.dist import available_cpus, pick_device
from utils.metrics import RunLogger, readable
from utils.seeds import seed_everything
from utils.vqa_eval import evaluate

ROOT = os.path.dirname(os.path.abspath(__file__))

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE")


def prepare_demo(cfg: Any) -> Any:
    """--demo, before training: build (or reuse) the toy world, and return the config pointed at
    it wherever the user named no model, data or start point. Stages 2 and 3 also write their
    toy instruction data and start from the previous stage's demo checkpoint (running that demo
    first when there is none). Under torchrun the processes take turns (a file lock): the first
    builds and runs what is missing, the others find it done. (The earlier stage's demo runs as
    a plain process, without torchrun's variables, so it never waits for the lock its parent holds.)"""
    if "WORLD_SIZE" not in os.environ:
        return _prepare_demo(cfg)
    os.makedirs(cfg.checkpoints_dir, exist_ok=True)
    with open(os.path.join(cfg.checkpoints_dir, ".demo.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_demo(cfg)


def _prepare_demo(cfg: Any) -> Any:
    # The toy world's pretraining batches gain from every core no other process uses (measured:
    # 95 s on 2 threads, 106 s on one, on a quiet 2-core AMD EPYC); its training later runs on one.
    torch.set_num_threads(shared_threads(cfg.threads))
    try:
        paths = ensure_toy_world("demo", log=console.info)
    except KeyboardInterrupt:   # before any training: no checkpoint to speak of, but finished parts stay
        console.error("interrupted while building the toy world: the parts it finished are kept; the same command "
                      "builds the rest")
        raise SystemExit(130) from None
    where: dict[str, str] = {}
    if cfg.stage == 1:
        where.update(vision_tower=paths.vision, llm=paths.llm, data_root=paths.train, eval_data_root=paths.eval)
    else:
        data = ensure_instruction_data(paths, "demo", log=console.info)
        if cfg.stage == 2:
            where.update(data_root=data.sft_train, eval_data_root=data.sft_eval)
        else:
            where.update(chat_json=data.style_train, image_root=data.style_images, eval_chat_json=data.style_eval)
        start = "stage1" if cfg.stage == 2 else "init"
        if not getattr(cfg, start):
            where[start] = previous_demo(cfg, paths)
    # An empty field is one nobody typed: a path or a start point cannot be meaningfully empty.
    return replace(cfg, **{key: value for key, value in where.items() if not getattr(cfg, key)})


def demo_checkpoint(checkpoints_dir: str, stage: int, paths: ToyPaths) -> str | None:
    """The newest finished demo run of `stage` on the current toy world (newer than its build)."""
    stamp = os.path.join(os.path.dirname(paths.llm), "toy_world.json")
    built = os.path.getmtime(stamp) if os.path.isfile(stamp) else 0.0
    found = []
    for run in sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []:
        latest = find_latest(os.path.join(checkpoints_dir, run))
        if not latest:
            continue
        try:
            meta = read_checkpoint_meta(latest)
        except (OSError, ValueError):
            continue
        cfg = meta.get("train_config", {})
        finished = meta.get("step") == cfg.get("max_steps")
        same_world = os.path.abspath(meta["spec"].get("vision_path", "")) == os.path.abspath(paths.vision)
        mtime = os.path.getmtime(checkpoint_file(latest))
        if meta.get("stage", 1) == stage and cfg.get("demo") and finished and same_world and mtime > built:
            found.append((mtime, latest))
    return max(found)[1] if found else None


def previous_demo(cfg: Any, paths: ToyPaths) -> str:
    """The previous stage's demo checkpoint; when there is none, that demo runs first (as its own
    process, exactly as a user would start it)."""
    stage = cfg.stage - 1
    found = demo_checkpoint(cfg.checkpoints_dir, stage, paths)
    if not found:
        script = STAGE_SCRIPTS[stage]
        console.info(f"no finished stage-{stage} demo in {cfg.checkpoints_dir}/: running `python {script} --demo` first")
        cmd = [sys.executable, os.path.join(ROOT, script), "--demo", "--checkpoints_dir", cfg.checkpoints_dir,
               "--runs_dir", cfg.runs_dir, "--device", cfg.device]
        # A plain one-process run, even from a torchrun launch (whose variables would make it wait for peers).
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
        child = subprocess.Popen(cmd, env=env)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached the child as well: it finishes its step and saves (as
            # subprocess.run would not let it: it kills the child a quarter second later).
            code = child.wait()
        if code in (130, 143):
            console.error(f"the stage-{stage} demo was stopped; its checkpoint is kept. Continue it with "
                          f"`python {script} --demo --resume auto`, then run this command again")
            raise SystemExit(code)
        if code != 0:
            raise SystemExit(f"the stage-{stage} demo failed; run `python {script} --demo` to see why")
        found = demo_checkpoint(cfg.checkpoints_dir, stage, paths)
        if not found:
            raise SystemExit(f"the stage-{stage} demo left no finished checkpoint in {cfg.checkpoints_dir}/")
    console.info(f"stage-{cfg.stage} demo starts from the stage-{stage} demo's checkpoint {found}")
    return found


def run_demo(cfg: Any, train: Callable[[Any], dict], started: float) -> dict:
    """An ordinary run (`train(cfg)`) measured before and after on held-out data; the figures join
    the run's summary.json and TensorBoard (demo/...). `cfg` is prepare_demo's."""
    if int(os.environ.get("RANK", "0")):   # under torchrun: every process trains, the first one measures
        return train(cfg)
    paths = ensure_toy_world("demo", log=console.info)   # built by prepare_demo: found at once
    measure = {1: stage1_figures, 2: stage2_figures, 3: stage3_figures}[cfg.stage]
    device = str(pick_device(cfg.device))
    start = untrained_assistant(cfg) if cfg.stage == 1 else Assistant.from_checkpoint(cfg.stage1 or cfg.init, device)
    before = measure(start, cfg, paths)
    del start
    for key, value in before.items():
        console.kv(f"{key} (before)", f"{value:g}")
    summary = train(cfg)
    if summary.get("interrupted") or summary.get("already_finished"):
        return summary
    trained = Assistant.from_checkpoint(summary["checkpoint"], device)
    after = measure(trained, cfg, paths)
    for key in before:
        summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    summary["export"] = export_verdict(trained.model.spec)   # the demo's recipe (ln_post) is the course's: no
    if cfg.stage == 3:
        adapter = os.path.join(summary["checkpoint"], ADAPTER_DIR, "adapter_model.safetensors")
        summary["adapter_bytes"] = os.path.getsize(adapter)
    summary["verdicts"] = verdicts(summary, cfg.stage)
    dump_json(summary, os.path.join(summary["run_dir"], "summary.json"))
    logger = RunLogger(summary["run_dir"], tuple(cfg.trackers.split(",")))
    logger.log(0, {f"demo/{k}": v for k, v in before.items()})
    logger.log(summary["steps"], {f"demo/{k}": v for k, v in after.items()})
    logger.close()
    console.header(f"demo: before -> after stage {cfg.stage}")
    for key in before:
        falls = f"  (falls: {FALLS.get(key, 'not expected: see the verdicts below')})" if after[key] < before[key] else ""
        console.kv(key, f"{before[key]:g} -> {after[key]:g}{falls}")
    console.kv("image_ablation_gap", readable(summary.get("image_ablation_gap")))
    if cfg.stage == 3:
        console.kv("adapter size", f"{summary['adapter_bytes'] / 2**10:.0f} KiB ({STYLE_NOTE})")
    console.kv("export", summary["export"])
    # Toy-world build included: what a new user waits for, measured on this machine.
    console.kv("demo wall time", f"{console.duration(time.time() - started)} on {machine_name(cfg.device)}")
    print_verdicts(summary["verdicts"], cfg.stage)
    return summary


# --------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Bar:
    """A headline figure of a demo, its bar, and what meeting it or not means."""

    figure: str          # a summary.json key
    bar: float
    passed: str          # what the figure shows when it meets the bar
    failed: str          # what it means when it does not, and what to try
    ceiling: bool = False   # the figure must stay at or under the bar (a starting point, a count)


BARS = {
    1: [Bar("heldout_exact_match_before", 0.1, "the untrained projector gives the LM nothing to caption from",
            "the LM captions without the image: alignment would prove nothing here", ceiling=True),
        Bar("heldout_exact_match_after", 0.95, "the projector aligned: the frozen LM captions what it sees",
            "alignment fell short: see the alarms above; try --max_steps 1200, or report summary.json")],
    2: [Bar("toy_mmbench_circular_before", 30, "the stage-1 model does not follow VLMEvalKit's multiple-choice prompt",
            "the stage-1 model answers the benchmark already: stage 2 has nothing to show", ceiling=True),
        Bar("toy_mmbench_circular_after", 80, "instruction tuning taught the multiple-choice format, in every rotation",
            "stage 2 did not teach the English option names in every rotation"),
        Bar("toy_mmbench_vanilla_after", 90, "the right option, asked once",
            "stage 2 did not teach the English option names"),
        Bar("toy_mme_perception_after", 0.8 * MME_MAX, f"yes/no about colour and position (max {MME_MAX:g})",
            "the yes/no comparison is learnt late, after the formats: it needs the demo's 800 steps (at 400 "
            "it stayed under this bar); docs/toy-world.md has every setting tried"),
        Bar("toy_pope_f1_after", 90, "object existence, yes or no, without a bias to yes",
            "existence questions are learnt late, as the yes/no ones: docs/toy-world.md has every setting tried"),
        Bar("toy_vqa_accuracy_after", 95, "one-word answers about what the image shows",
            "the answers drifted: see the sample replies in the log"),
        Bar("second_turn_accuracy_after", 0.95, "a second question answered after the model's own first answer",
            "the dialogue history confuses the model: check the multi-turn data")],
    3: [Bar("style_exact_match_after", 0.95, "LoRA taught the new answer style on held-out images",
            "the adapter did not learn the style: try --max_steps 400 or --lora_r 16")],
}
# Every demo's own data fits its --max_text_len: a turn skipped as too long is a fault of the demo.
SKIP_BAR = Bar("turns_skipped_as_too_long", 0, "every turn of the demo's data fits its --max_text_len",
               "the demo's data outgrew its --max_text_len: raise it in train_config.DEMO_DEFAULTS", ceiling=True)
# Where a figure may fall from before to after, and why (said on the line that prints it).
FALLS = {"heldout_exact_match": "stage 2 trains answers, not captions: a little forgetting, watched by its own bar",
         "answers_that_stop": "a longer answer style; not a bar"}


def verdicts(summary: dict, stage: int) -> dict[str, dict]:
    """{figure: {"value", "bar", "ok"}} for a finished demo's summary (summary.json carries them)."""
    skipped = sum(n for reason, n in summary.get("skipped", {}).items() if "over_max_text_len" in reason)
    values = {**summary, SKIP_BAR.figure: skipped}
    out = {}
    for b in [*BARS[stage], SKIP_BAR]:
        value = float(values[b.figure])
        out[b.figure] = {"value": value, "bar": b.bar, "ok": value <= b.bar if b.ceiling else value >= b.bar}
    return out


def print_verdicts(found: dict[str, dict], stage: int) -> None:
    """One line per headline figure: ✓ or ✗, the value against its bar, what it means."""
    console.header(f"verdict of the stage-{stage} demo (exit status 0 when every line holds, 3 when one does not)")
    for b in [*BARS[stage], SKIP_BAR]:
        v = found[b.figure]
        sign = ("≤" if v["ok"] else ">") if b.ceiling else ("≥" if v["ok"] else "<")
        name = b.figure.removesuffix("_after").replace("_before", " before").replace("_", " ")
        line = f"{name} {v['value']:g} {sign} {b.bar:g}: {b.passed if v['ok'] else b.failed}"
        (console.success if v["ok"] else console.error)(line)


def untrained_assistant(cfg: Any) -> Assistant:
    """The model stage 1 starts from: the same seeds before the same build give the same fresh
    projector, so "before" measures exactly the run's starting point."""
    seed_everything(cfg.seed)
    spec = ModelSpec(vision_tower=cfg.vision_tower, llm=cfg.llm, projector=cfg.projector,
                     feature_layer=cfg.feature_layer, feature_select=cfg.feature_select,
                     feature_post_norm=cfg.feature_post_norm, image_wrap=cfg.image_wrap)
    model, tokenizer = build_model(spec, pick_device(cfg.device), attn_implementation=cfg.attn,
                                   models_dir=cfg.models_dir)
    return Assistant.from_model(model.eval(), tokenizer)


def caption_figure(assistant: Assistant, data_format: str, eval_root: str, cfg: Any) -> float:
    records, _, root = read_records(data_format, eval_root)
    ds = LlavaDataset(records, assistant.tokenizer, assistant.fmt, assistant.transform, ImageLoader(root),
                       instructions="zh", seed=cfg.seed)
    return caption_exact_match(assistant, ds, CAPTION_PROMPT)


def toy_vqa(assistant: Assistant, paths: ToyPaths, replies: list | None = None) -> float:
    return official_vqa_accuracy(assistant, os.path.join(paths.vqa, "v2_OpenEnded_mscoco_val2014_questions.json"),
                                 os.path.join(paths.vqa, "v2_mscoco_val2014_annotations.json"),
                                 os.path.join(paths.vqa, "val2014"), VQA_TEMPLATE, replies_out=replies)


def official_vqa_accuracy(assistant: Assistant, questions_json: str, annotations_json: str, image_dir: str,
                          template: str, split: str = "val2014", replies_out: list | None = None) -> float:
    """Official-metric accuracy on VQA v2 files as they come (no conversion step): the demo's
    check that a projector aligned on captions lets the frozen LM answer questions.
    `replies_out` receives (question, reply) pairs for a caller that looks further."""
    with open(questions_json, encoding="utf-8") as fh:
        questions = json.load(fh)["questions"]
    with open(annotations_json, encoding="utf-8") as fh:
        annotations = json.load(fh)
    items = [(os.path.join(image_dir, f"COCO_{split}_{q['image_id']:012d}.jpg"),
              [{"role": "user", "content": template.replace("{question}", q["question"])}]) for q in questions]
    replies, _ = answer_all(assistant, items, "", 64, 8, "toy vqa")
    predictions = [{"question_id": q["question_id"], "answer": r} for q, r in zip(questions, replies) if r is not None]
    if replies_out is not None:
        replies_out += list(zip(questions, replies))
    return evaluate(annotations, predictions)["overall"]


def stage1_figures(assistant: Assistant, cfg: Any, paths: ToyPaths) -> dict[str, float]:
    """Held-out caption exact match (greedy reply == reference) and toy VQA accuracy."""
    return {"heldout_exact_match": caption_figure(assistant, cfg.data_format, cfg.eval_data_root, cfg),
            "toy_vqa_accuracy": toy_vqa(assistant, paths)}


def stage2_figures(assistant: Assistant, cfg: Any, paths: ToyPaths) -> dict[str, float]:
    """Toy VQA accuracy (official metric, held-out images); the share of those answers that end
    (an end-of-turn token within the 8-token budget, not a run-on); second-turn accuracy: a shape
    question after the model's own reply to a colour question, as a live chat feeds it; and
    caption exact match on stage 1's held-out images (what stage 2 must not forget)."""
    replies: list = []
    vqa = toy_vqa(assistant, paths, replies)
    stopped = sum(r is not None and len(assistant.tokenizer.encode(r, add_special_tokens=False)) < 8
                  for _, r in replies) / max(len(replies), 1)
    # The toy VQA set asks colour, shape and position of each image: the colour replies become
    # the history, the shape answers the truth.
    with open(os.path.join(paths.vqa, "v2_mscoco_val2014_annotations.json"), encoding="utf-8") as fh:
        truth = {a["question_id"]: a["multiple_choice_answer"] for a in json.load(fh)["annotations"]}
    shape = {q["image_id"]: truth[q["question_id"]] for q, _ in replies if q["question"] == QUESTIONS["shape"][0]}
    answers = {(q["image_id"], q["question"]): r for q, r in replies}
    images = sorted(shape)
    items = [(os.path.join(paths.vqa, "val2014", f"COCO_val2014_{i:012d}.jpg"),
              [{"role": "user", "content": VQA_TEMPLATE.replace("{question}", QUESTIONS["color"][0])},
               {"role": "assistant", "content": answers.get((i, QUESTIONS["color"][0])) or ""},
               {"role": "user", "content": QUESTIONS["shape"][0]}]) for i in images]
    second = assistant.reply_batch([(assistant.loader(img), m) for img, m in items], max_new_tokens=8)
    turn2 = sum(r == shape[i] for i, r in zip(images, second)) / max(len(images), 1)
    return {"toy_vqa_accuracy": vqa, "answers_that_stop": stopped, "second_turn_accuracy": turn2,
            "heldout_exact_match": caption_figure(assistant, "sa1b", paths.eval, cfg),
            **toy_bench_figures(assistant, os.path.join(os.path.dirname(paths.train), "bench"),
                                os.path.join(cfg.runs_dir, cfg.run_name, "bench"))}


def toy_bench_figures(assistant: Assistant, bench_dir: str, out_root: str) -> dict[str, float]:
    """The toy benchmarks (VLMEvalKit layout and exact matching, its default prompt): MMBench-style
    circular and vanilla accuracy, MME-style perception score, POPE-style F1. Predictions and
    scores go to runs/<run>/bench/<the model's stage and step>/ (toy_instructions.py writes the files)."""
    who = f"stage{assistant.meta.get('stage', 1)}_step{assistant.meta.get('step', 0)}"
    out = os.path.join(out_root, who)
    got = {key: run_bench(assistant, os.path.join(bench_dir, f"{name}.tsv"), out, batch_size=64, quiet=True)["exact"]
           for key, name in BENCH_NAMES.items()}
    return {"toy_mmbench_circular": got["mcq"]["circular"], "toy_mmbench_vanilla": got["mcq"]["vanilla"],
            "toy_mme_perception": got["mme"]["perception"], "toy_pope_f1": got["pope"]["overall"]}


def stage3_figures(assistant: Assistant, cfg: Any, paths: ToyPaths) -> dict[str, float]:
    """Exact match of the new style (full-sentence answers) on held-out images."""
    records, _ = read_chat_json(cfg.eval_chat_json)
    loader = ImageLoader(cfg.image_root)
    items = [(loader(r.image), r.conversations[:1]) for r in records]
    replies = assistant.reply_batch(items, max_new_tokens=32)
    hits = sum(reply == r.conversations[1]["content"] for reply, r in zip(replies, records))
    return {"style_exact_match": hits / max(len(records), 1)}


def machine_name(device: str = "auto") -> str:
    """'2 x AMD EPYC (CPU)' or 'NVIDIA H200': where the demo's figures were measured."""
    if pick_device(device).type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{available_cpus()} x {model} (CPU)"
