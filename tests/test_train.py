"""A short toy run end to end: loss falls, the run writes its files, eval_llava.py loads the
checkpoint in one-shot mode."""

import glob
import io
import json
import os
import re
import sys

import pytest

from tests.conftest import DEVICE, train_argv


@pytest.fixture(scope="module")
def short_run(toy, tmp_path_factory):
    import train_stage1

    out = tmp_path_factory.mktemp("run")
    argv = train_argv(toy, out, "t", 100, batch_size=16, instructions="zh", eval_interval=50, eval_samples=48,
                      save_interval=50, sample_replies=2, checkpoints_dir=out / "checkpoints", device=DEVICE)
    return train_stage1.main(argv), out


@pytest.mark.device
def test_short_run_lowers_the_loss_and_writes_its_files(short_run):
    summary, out = short_run
    on_disk = json.loads((out / "runs" / "t" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("steps", "train_loss_first", "train_loss_last", "eval_loss", "eval_ppl", "skipped", "checkpoint"):
        assert key in on_disk, key
    assert on_disk["steps"] == 100
    assert on_disk["train_loss_last"] < 0.7 * on_disk["train_loss_first"]
    assert glob.glob(str(out / "runs" / "t" / "events.out.tfevents*"))
    rows = [json.loads(l) for l in (out / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "train/loss" in r} == set(range(1, 101))
    assert any("eval/loss" in r for r in rows)
    assert os.path.isfile(os.path.join(on_disk["checkpoint"], "projector.safetensors"))
    assert os.path.isfile(out / "checkpoints" / "t" / "step_000050" / "projector.safetensors")
    assert json.loads((out / "runs" / "t" / "config.json").read_text())["max_steps"] == 100
    assert on_disk["alarms"] == [] and on_disk["peak_mem_gib"] > 0     # a healthy run raises no alarm


def test_tensorboard_events_hold_the_scalars(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = short_run
    acc = EventAccumulator(str(out / "runs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/samples_per_s", "eval/loss"} <= tags
    assert len(acc.Scalars("train/loss")) == 100


@pytest.mark.device
def test_eval_one_shot_loads_the_checkpoint_and_prints_only_the_reply(short_run, toy, capsys):
    import eval_llava

    summary, _ = short_run
    image = os.path.join(toy.eval, "images", "000000.png")
    eval_llava.main(["--checkpoint", summary["checkpoint"], "--image", image, "--prompt", "描述这张图片",
                     "--max_new_tokens", "16", "--device", DEVICE])
    out = capsys.readouterr()
    # The reply alone on stdout (logs went to stderr): after 100 steps, a caption of the toy world's form.
    assert re.fullmatch(r"(左边|中间|右边)有一个..的...?。\n", out.out), out.out
    assert "loading" in out.err


def test_eval_interactive_loop_through_stdin(short_run, toy, monkeypatch, capsys):
    import eval_llava

    summary, _ = short_run
    image = os.path.join(toy.eval, "images", "000001.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"描述这张图片\n{image}\n描述这张图片\nclear\nexit\n"))
    eval_llava.main(["--checkpoint", summary["checkpoint"], "--max_new_tokens", "12"])
    out = "".join(capsys.readouterr())
    assert "load an image first" in out           # a question before any image is refused
    assert "image loaded" in out and "history cleared" in out
    assert out.count("助手:") == 1                 # exactly one answered question


# --------------------------------------------------------------------------- evidence that alignment worked

@pytest.mark.device
def test_image_ablation_gap_is_positive_after_training_and_near_zero_untrained(short_run, toy):
    import torch

    from dataset import ImageLoader, ImageTransform, LlavaDataset
    from readers import read_records
    from heldout import heldout_loss
    from checkpoint_io import load_checkpoint
    from model import Projector
    from prompts import PromptFormat

    summary, out = short_run
    trained_gap = summary["image_ablation_gap"]
    rows = [json.loads(l) for l in (out / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/image_ablation_gap" in r for r in rows)
    model, tok, _ = load_checkpoint(summary["checkpoint"], DEVICE)
    spec = model.spec
    fmt = PromptFormat.build(tok, spec.image_token, spec.num_image_tokens, spec.image_wrap, spec.chat_template_kwargs)
    records, _, root = read_records("sa1b", toy.eval)
    ds = LlavaDataset(records, tok, fmt, ImageTransform.from_dict(spec.image_transform), ImageLoader(root),
                       instructions="zh")
    untrained = []
    for seed in range(4):  # a random projector's gap is noise around zero: average a few draws
        torch.manual_seed(seed)
        model.projector = Projector(spec.projector, spec.vision_hidden_size, spec.llm_hidden_size).to(DEVICE)
        untrained.append(heldout_loss(model, ds)["eval/image_ablation_gap"])
    untrained_gap = sum(untrained) / len(untrained)
    assert trained_gap > 0.3
    assert abs(untrained_gap) < 0.5 * trained_gap


def test_tensorboard_gallery_holds_images_and_replies(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = short_run
    acc = EventAccumulator(str(out / "runs" / "t"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert {"samples/0", "samples/1"} <= set(acc.Tags()["images"])
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("samples/")]
    assert texts
    body = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "**Q:**" in body and "**A:**" in body and "**ref:**" in body


def test_batch_vqa_on_the_toy_vqa_set(short_run, toy, tmp_path, capsys):
    import convert_vqa
    from toy_world import VQA_TEMPLATE
    from utils.vqa_eval import evaluate

    summary, _ = short_run
    q = os.path.join(toy.vqa, "v2_OpenEnded_mscoco_val2014_questions.json")
    a = os.path.join(toy.vqa, "v2_mscoco_val2014_annotations.json")
    assert convert_vqa.main(["--questions-val", q, "--annotations-val", a, "--images-val-dir", os.path.join(toy.vqa, "val2014"),
                             "--output-chat-json", str(tmp_path / "vqa" / "chat.json"), "--template", VQA_TEMPLATE]) == 0
    val = tmp_path / "vqa" / "chat_val.json"
    import eval_llava
    from eval_llava import output_name

    capsys.readouterr()                                   # the converter's report: not ours
    eval_llava.main(["--checkpoint", summary["checkpoint"], "--vqa", str(val), "--out_dir", str(tmp_path / "eval"),
                     "--batch_size", "16"])
    stdout = capsys.readouterr().out

    name = output_name("vqa", str(val))
    assert name == "vqa_vqa_chat_val"
    predictions = json.loads((tmp_path / "eval" / f"{name}_predictions.json").read_text())
    questions = json.loads(open(q).read())["questions"]
    assert sorted(p["question_id"] for p in predictions) == sorted(x["question_id"] for x in questions)
    assert all(isinstance(p["answer"], str) for p in predictions)
    scores = json.loads((tmp_path / "eval" / f"{name}_scores.json").read_text())
    assert scores == json.loads(stdout)
    assert scores["n_scored"] == len(questions) and scores["n_missing_predictions"] == 0
    # The scores are the official metric on the official files, as --vqa_eval computes them alone.
    assert scores["overall"] == evaluate(json.loads(open(a).read()), predictions)["overall"]
    eval_llava.main(["--vqa_eval", "--questions", q, "--annotations", a,
                     "--predictions", str(tmp_path / "eval" / f"{name}_predictions.json")])
    assert json.loads(capsys.readouterr().out)["overall"] == scores["overall"]
    # A projector aligned on captions alone (100 steps) lets the frozen LM answer the toy questions;
    # with a fresh projector in its place the same LM does far worse.
    import torch

    from assistant import Assistant
    from toy_demo import official_vqa_accuracy
    from model import Projector
    from toy_world import VQA_TEMPLATE

    assistant = Assistant.from_checkpoint(summary["checkpoint"])
    spec = assistant.model.spec
    torch.manual_seed(0)
    assistant.model.projector = Projector(spec.projector, spec.vision_hidden_size, spec.llm_hidden_size)
    untrained = official_vqa_accuracy(assistant, q, a, os.path.join(toy.vqa, "val2014"), VQA_TEMPLATE)
    assert scores["overall"] > untrained + 15


def test_batch_captions_on_chat_json_and_on_an_image_folder(short_run, toy, tmp_path):
    import shutil

    summary, _ = short_run
    records = json.loads(open(os.path.join(toy.eval, "chat.json"), encoding="utf-8").read())[:12]
    folder = tmp_path / "examples"
    folder.mkdir()
    for i, r in enumerate(records):
        shutil.copy(os.path.join(toy.eval, r["image"]), folder / f"{i:05d}.png")
        if i % 2 == 0:  # references for half of them
            (folder / f"{i:05d}.txt").write_text(r["conversations"][1]["value"], encoding="utf-8")
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    import eval_llava
    from eval_llava import output_name
    from utils.caption_metrics import score_captions

    out = tmp_path / "eval"   # both inputs into one folder: each keeps its own files
    for source in (folder, chat):
        for img in records:
            if source == chat:
                os.makedirs(tmp_path / os.path.dirname(img["image"]), exist_ok=True)
                shutil.copy(os.path.join(toy.eval, img["image"]), tmp_path / img["image"])
        eval_llava.main(["--checkpoint", summary["checkpoint"], "--captions", str(source), "--out_dir", str(out),
                         "--max_new_tokens", "24"])
        name = output_name("captions", str(source))
        scores = json.loads((out / f"{name}_scores.json").read_text())
        predictions = json.loads((out / f"{name}_predictions.json").read_text())
        assert len(predictions) == 12 and scores["captioned"] == 12
        assert scores["n"] == (6 if source == folder else 12)
        # The scores are the metric on the written predictions (recomputed here), and a model that
        # learnt the toy captions scores high on them.
        scored = [p for p in predictions if p["reference"]]
        assert scores["bleu4"] == score_captions({str(i): [p["reference"]] for i, p in enumerate(scored)},
                                                 {str(i): p["caption"] for i, p in enumerate(scored)})["bleu4"]
        assert scores["bleu4"] > 0.3
    assert sorted(os.listdir(out)) == sorted(f"{output_name('captions', str(s))}_{kind}.json"
                                             for s in (folder, chat) for kind in ("predictions", "scores"))
