"""convert_vqa.py on a toy VQA v2 written here in the official schema (2 splits, real JPEGs).

The train split is built so that every filter reason fires exactly once; the last test
checks that training on the output keeps the question in the prompt and supervises only
the answer plus the end-of-turn token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import convert_vqa
from convert_vqa import DEFAULT_TEMPLATE, convert, main
from readers import validate_chat_json

# question_id -> (image_id, question, multiple_choice_answer); None: that half is absent.
TRAIN_Q = {
    22: (2, "is the square red", None),            # annotation with an empty answer
    10: (1, "what colour is the circle", None),
    11: (1, "how many shapes are there", None),
    20: (2, "is the square on the left", None),
    21: (2, "   \n ", None),                        # whitespace question
    30: (3, "what shape is it", None),              # image 3 has no file
    40: (1, "where is the circle", None),           # no annotation
}
TRAIN_A = {10: (1, "red"), 11: (1, "2"), 20: (2, "yes"), 21: (2, "no"), 22: (2, ""), 30: (3, "circle"),
           50: (1, "blue")}                          # 50: no question
VAL_Q = {101: (5, "what colour is the triangle"), 100: (5, "is there a triangle"), 110: (6, "how many circles")}
VAL_A = {100: (5, "yes"), 101: (5, "green"), 110: (6, "3")}
TRAIN_FILTERED = {"question_without_annotation": 1, "annotation_without_question": 1, "empty_question": 1,
                  "empty_answer": 1, "missing_image": 1}


def _answers(answer: str) -> list[dict]:
    # Ten answers as in VQA v2, not all equal (accuracy needs the spread).
    return [{"answer": answer if i < 8 else "other", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]


def write_split(root, split: str, questions: dict, annotations: dict, image_ids: list[int]) -> dict:
    qs = [{"image_id": img, "question": text, "question_id": qid} for qid, (img, text, *_) in questions.items()]
    anns = [{"question_id": qid, "image_id": img, "question_type": "what color", "answer_type": "other",
             "multiple_choice_answer": ans, "answers": _answers(ans)} for qid, (img, ans) in annotations.items()]
    qpath, apath = root / f"{split}_questions.json", root / f"{split}_annotations.json"
    qpath.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                 "data_subtype": f"{split}2014", "questions": qs}), encoding="utf-8")
    apath.write_text(json.dumps({"info": {}, "data_type": "mscoco", "data_subtype": f"{split}2014",
                                 "annotations": anns}), encoding="utf-8")
    img_dir = root / f"coco_{split}"
    img_dir.mkdir()
    for i in image_ids:
        Image.new("RGB", (16, 12), (40 * i % 256, 90, 160)).save(img_dir / f"COCO_{split}2014_{i:012d}.jpg")
    return {f"questions_{split}": str(qpath), f"annotations_{split}": str(apath), f"images_{split}_dir": str(img_dir)}


@pytest.fixture
def vqa(tmp_path) -> dict:
    src = tmp_path / "vqa"
    src.mkdir()
    return {**write_split(src, "train", TRAIN_Q, TRAIN_A, [1, 2]), **write_split(src, "val", VAL_Q, VAL_A, [5, 6])}


def flags(inputs: dict) -> list[str]:
    return [a for k, v in inputs.items() for a in (f"--{k.replace('_', '-')}", v)]


def load(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def test_mapping_and_relative_paths(vqa, tmp_path):
    out = tmp_path / "out" / "chat.json"
    report = convert(**vqa, output_chat_json=str(out))
    root = tmp_path / "out"  # the image root defaults to the chat.json's folder
    train = load(out)
    assert [r["id"] for r in train] == ["vqa_10", "vqa_11", "vqa_20"]  # sorted by question_id
    first = train[0]
    assert first["image"] == "train2014/COCO_train2014_000000000001.jpg"
    assert first["conversations"] == [
        {"from": "human", "value": DEFAULT_TEMPLATE.replace("{question}", "what colour is the circle")},
        {"from": "gpt", "value": "red"}]
    assert (first["question_id"], first["image_id"], first["split"]) == (10, 1, "train")
    assert (first["answer_type"], first["question_type"]) == ("other", "what color")
    assert first["answers"] == ["red"] * 8 + ["other"] * 2
    for rec in train:
        assert not os.path.isabs(rec["image"])
        copied = root / rec["image"]
        assert copied.is_file() and not copied.is_symlink()
        assert copied.read_bytes() == (tmp_path / "vqa" / "coco_train" / os.path.basename(rec["image"])).read_bytes()
    # Two questions share image 1: one copy per image, and only images that are used.
    assert sorted(os.listdir(root / "train2014")) == ["COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"]
    assert report["splits"]["train"]["images"] == 2
    assert report["total"] == 3 + 3


def test_filter_counts_and_report(vqa, tmp_path, capsys):
    out = tmp_path / "chat.json"
    assert main(flags(vqa) + ["--output-chat-json", str(out)]) == 0
    report = load(tmp_path / "chat.report.json")
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert train["filtered"] == TRAIN_FILTERED
    assert train["filtered_total"] == 5
    assert (train["questions"], train["annotations"], train["records"]) == (7, 7, 3)
    assert val["filtered"] == {} and val["records"] == 3
    assert report["total"] == 6
    assert report["outputs"] == {"train": str(out), "val": str(tmp_path / "chat_val.json")}
    missing = f"COCO_train2014_000000000003.jpg not in {vqa['images_train_dir']}"  # one example per reason
    assert train["filtered_examples"]["missing_image"] == missing
    assert train["filtered_examples"]["question_without_annotation"] == "question_id 40 has no annotation"
    printed = capsys.readouterr().out
    assert "6 records in total" in printed and f"missing_image 1, e.g. {missing}" in printed
    assert "empty_answer 1, e.g. question_id 22" in printed


def test_val_written_separately_with_eval_fields(vqa, tmp_path):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    val = load(tmp_path / "chat_val.json")
    assert [r["question_id"] for r in val] == [100, 101, 110]
    assert all(r["split"] == "val" and r["image"].startswith("val2014/COCO_val2014_") for r in val)
    assert val[1]["answers"] == ["green"] * 8 + ["other"] * 2 and val[1]["answer_type"] == "other"
    assert all(r["split"] == "train" for r in load(out))


def test_val_only_writes_only_the_val_file(vqa, tmp_path, capsys):
    only_val = {k: v for k, v in vqa.items() if "val" in k}
    custom_val = tmp_path / "held_out.json"
    assert main(flags(only_val) + ["--output-chat-json", str(tmp_path / "chat.json"),
                                   "--output-val-chat-json", str(custom_val)]) == 0
    assert not (tmp_path / "chat.json").exists()
    assert len(load(custom_val)) == 3
    assert "only the val split" in capsys.readouterr().out


def test_rerun_is_byte_identical_and_does_not_recopy(vqa, tmp_path):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    before = {p: (p.read_bytes()) for p in (out, tmp_path / "chat_val.json")}
    image = tmp_path / "train2014" / "COCO_train2014_000000000001.jpg"
    stat = image.stat()
    report = convert(**vqa, output_chat_json=str(out))
    assert {p: p.read_bytes() for p in before} == before
    after = image.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert report["splits"]["train"]["images_placed"] == 0
    assert report["splits"]["train"]["images_already_there"] == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_link_images_makes_symlinks(vqa, tmp_path):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out), link_images=True)
    for rec in load(out) + load(tmp_path / "chat_val.json"):
        placed = tmp_path / rec["image"]
        assert placed.is_symlink() and os.path.isabs(os.readlink(placed)) and placed.is_file()
    # Switching back to copies replaces the links with real files.
    convert(**vqa, output_chat_json=str(out))
    assert not (tmp_path / load(out)[0]["image"]).is_symlink()


def test_dataset_root_dir_layout_is_what_train_stage1_reads(vqa, tmp_path):
    from utils.align_plan import translate_align_flags

    data = tmp_path / "data"
    assert main(flags(vqa) + ["--dataset-root-dir", str(data)]) == 0
    base = data / "download" / "llava-laion-cc-sbu-558k"
    assert len(load(base / "chat.json")) == 3 and len(load(base / "chat_val.json")) == 3
    assert (base / "chat.report.json").is_file()
    assert (base / "train2014" / "COCO_train2014_000000000001.jpg").is_file()
    # The align plan's flags resolve to exactly these paths.
    argv = translate_align_flags(["--dataset.type", "llava-v15", "--dataset.dataset_root_dir", str(data)])
    assert argv[argv.index("--chat_json") + 1] == str(base / "chat.json")
    assert argv[argv.index("--image_root") + 1] == str(base)
    assert validate_chat_json(str(base / "chat.json"), str(base)) == []


def test_failed_write_keeps_the_previous_output(vqa, tmp_path, monkeypatch):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    good = out.read_bytes()
    changed = {**TRAIN_A, 10: (1, "crimson")}
    src = tmp_path / "vqa2"
    src.mkdir()
    new_inputs = {**vqa, **write_split(src, "train", TRAIN_Q, changed, [1, 2])}

    def fsync_fails(fd):  # the temp file holds a partial write when the disk gives up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_vqa.os, "fsync", fsync_fails)
    with pytest.raises(OSError):
        convert(**new_inputs, output_chat_json=str(out))
    monkeypatch.undo()
    assert out.read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]

    real_replace = os.replace

    def replace_fails_for_json(src_path, dst_path):
        if str(dst_path).endswith(".json"):
            raise OSError("simulated crash before the rename")
        real_replace(src_path, dst_path)

    monkeypatch.setattr(convert_vqa.os, "replace", replace_fails_for_json)
    with pytest.raises(OSError):
        convert(**new_inputs, output_chat_json=str(out))
    monkeypatch.undo()
    assert out.read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    convert(**new_inputs, output_chat_json=str(out))  # and a clean run does replace it
    assert load(out)[0]["conversations"][1]["value"] == "crimson"


def test_output_that_fails_validation_is_not_written(vqa, tmp_path, monkeypatch, capsys):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    good = out.read_bytes()
    # A converter bug that emits a 3-turn record must be caught before it replaces anything.
    real_dump = convert_vqa.dump_records

    def broken_dump(records):
        records[0]["conversations"].append({"from": "gpt", "value": "extra"})
        return real_dump(records)

    monkeypatch.setattr(convert_vqa, "dump_records", broken_dump)
    assert main(flags(vqa) + ["--output-chat-json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exactly 2 turns" in err and f"{out}: the converted output failed validation, previous file kept" in err
    assert ".tmp" not in err  # problems name the file the user asked for, not the temp it was checked as
    assert out.read_bytes() == good
    fresh = tmp_path / "fresh" / "chat.json"
    assert main(flags(vqa) + ["--output-chat-json", str(fresh)]) == 1
    err = capsys.readouterr().err
    assert "failed validation, nothing written" in err and "previous file kept" not in err
    assert not fresh.exists()


def test_validation_catches_a_broken_file(vqa, tmp_path, capsys):
    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    assert main(["--validate-only", str(out), "--image-root", str(tmp_path)]) == 0
    records = load(out)
    records[0]["conversations"] = records[0]["conversations"][::-1]              # gpt before human
    records[1]["conversations"][0]["value"] = "no placeholder here"
    records[2]["image"] = "train2014/COCO_train2014_000000000099.jpg"            # not on disk
    records.append({"image": records[0]["image"], "conversations": records[1]["conversations"][:1]})
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records), encoding="utf-8")
    problems = validate_chat_json(str(broken), str(tmp_path))
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "human then gpt" in text and "exactly one <image>" in text and "not found" in text and "exactly 2 turns" in text
    assert main(["--validate-only", str(broken), "--image-root", str(tmp_path)]) == 1
    assert "4 problem(s)" in capsys.readouterr().err
    not_list = tmp_path / "dict.json"
    not_list.write_text('{"image": "x"}', encoding="utf-8")
    assert "expected a JSON list" in validate_chat_json(str(not_list), str(tmp_path))[0]
    # Images resolve against the image root: the right file with the wrong root fails.
    assert validate_chat_json(str(out), str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("damage, needle", [
    (os.remove, "no such file"),
    (lambda p: Path(p).write_text('{"questions": [ '), "not valid JSON"),
    (lambda p: Path(p).write_text('{"info": {}}'), "'questions' list"),
])
def test_bad_input_file_exits_2_naming_it(vqa, tmp_path, capsys, damage, needle):
    damage(vqa["questions_val"])
    out = tmp_path / "out" / "chat.json"
    assert main(flags(vqa) + ["--output-chat-json", str(out)]) == 2
    err = capsys.readouterr().err
    assert vqa["questions_val"] in err and needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # the train split was fine, yet nothing was written


def test_empty_image_dir_says_why_every_record_was_dropped(vqa, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out" / "chat.json"
    assert main(flags({**vqa, "images_val_dir": str(empty)}) + ["--output-chat-json", str(out)]) == 2
    err = capsys.readouterr().err
    missing = f"COCO_val2014_000000000005.jpg not in {empty}"
    assert f"the val split produced no records: {empty} (--images-val-dir) is empty" in err
    assert f"dropped 3: missing_image 3, e.g. {missing}" in err
    assert "nothing written" in err and "previous file kept" not in err
    # The train split was fine, but half a conversion is not written: fix the flag and rerun.
    assert not out.exists() and not (tmp_path / "out" / "chat_val.json").exists()
    report = load(tmp_path / "out" / "chat.report.json")  # the report is where a user looks: it says why
    val = report["splits"]["val"]
    assert (val["records"], val["filtered"], val["filtered_examples"]) == (0, {"missing_image": 3}, {"missing_image": missing})
    assert report["splits"]["train"]["filtered"] == TRAIN_FILTERED and "is empty" in report["error"]


def test_empty_split_keeps_the_previous_output_and_says_so(vqa, tmp_path, capsys):
    out = tmp_path / "chat.json"
    assert main(flags(vqa) + ["--output-chat-json", str(out)]) == 0
    before = {p: p.read_bytes() for p in (out, tmp_path / "chat_val.json")}
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(flags({**vqa, "images_val_dir": str(empty)}) + ["--output-chat-json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"previous file kept: {out}, {tmp_path / 'chat_val.json'}" in err and "nothing written" not in err
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("mistake, needle", [
    ("other_names", "expected e.g. COCO_val2014_000000000005.jpg, found 1 other file(s), e.g. 5.jpg"),
    ("train_folder", "holds train2014 images (e.g. COCO_train2014_000000000001.jpg), but the questions name "
                     "val2014 ones (e.g. COCO_val2014_000000000005.jpg): point --images-val-dir at the val2014 folder"),
    ("coco_root", "holds a val2014/ folder: pass --images-val-dir {root}/val2014"),
], ids=["other-names", "train-folder", "coco-root"])
def test_wrong_image_dir_names_the_likeliest_mistake(vqa, tmp_path, capsys, mistake, needle):
    root = tmp_path / "images"
    root.mkdir()
    if mistake == "other_names":
        (root / "5.jpg").write_bytes(b"not looked at")
    elif mistake == "train_folder":
        root = Path(vqa["images_train_dir"])
    else:
        os.rename(vqa["images_val_dir"], root / "val2014")
    only_val = {k: v for k, v in vqa.items() if "val" in k}
    assert main(flags({**only_val, "images_val_dir": str(root)}) + ["--output-chat-json", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert f"{root} (--images-val-dir)" in err and needle.format(root=root) in err and "missing_image 3" in err


def test_val_files_given_as_train_name_the_flag_to_use(vqa, tmp_path, capsys):
    swapped = {"questions_train": vqa["questions_val"], "annotations_train": vqa["annotations_val"],
               "images_train_dir": vqa["images_val_dir"]}
    out = ["--output-chat-json", str(tmp_path / "chat.json")]
    assert main(flags(swapped) + out) == 2
    err = capsys.readouterr().err
    assert (f"{vqa['questions_val']} is a val2014 file (its data_subtype) given as --questions-train: "
            f"pass it as --questions-val") in err
    assert "pass it as --annotations-val, with the val2014 images as --images-val-dir" in err
    assert "missing_image 3, e.g. COCO_train2014_000000000005.jpg" in err
    # Only the annotations are val's: that file is the one named.
    assert main(flags({**vqa, "annotations_train": vqa["annotations_val"]}) + out) == 2
    err = capsys.readouterr().err
    assert f"{vqa['annotations_val']} is a val2014 file (its data_subtype) given as --annotations-train" in err
    assert "--questions-train:" not in err and "question_without_annotation 7" in err


def test_bad_flags_exit_2(vqa, tmp_path, capsys):
    out = ["--output-chat-json", str(tmp_path / "chat.json")]
    partial = {k: v for k, v in vqa.items() if k != "images_val_dir"}
    assert main(flags(partial) + out) == 2
    assert "--images-val-dir" in capsys.readouterr().err
    assert main(flags(vqa) + out + ["--template", "Question: {question}"]) == 2
    assert "<image>" in capsys.readouterr().err
    assert main(flags(vqa) + out + ["--template", "<image> what?"]) == 2
    assert main(out) == 2  # no split at all
    assert not (tmp_path / "chat.json").exists()


def test_template_and_max_per_split(vqa, tmp_path):
    out = tmp_path / "chat.json"
    report = convert(**vqa, output_chat_json=str(out), template="Q: {question}\n<image>", max_per_split=2)
    train = load(out)
    assert [r["question_id"] for r in train] == [10, 11]
    assert train[0]["conversations"][0]["value"] == "Q: what colour is the circle\n<image>"
    assert report["splits"]["val"]["records"] == 2


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    """The toy world's Qwen-style tokenizer (ChatML + Qwen3 template, no BOS, <|image_pad|>),
    built alone: the LM and tower that the `tiny` fixture also trains are not needed here."""
    from transformers import AutoTokenizer

    from toy_world import build_tokenizer

    path = tmp_path_factory.mktemp("qwen_tok")
    build_tokenizer(str(path))
    return AutoTokenizer.from_pretrained(path)


def test_training_on_the_output_supervises_only_the_answer(vqa, tmp_path, qwen_tokenizer):
    from dataset import ImageLoader
    from readers import read_chat_json
    from model import ModelSpec
    from prompts import IGNORE_INDEX, PromptFormat, encode_conversation

    out = tmp_path / "chat.json"
    convert(**vqa, output_chat_json=str(out))
    records, skipped = read_chat_json(str(out))
    assert len(records) == 3 and not skipped
    assert records[0].meta["answers"][0] == "red" and records[0].meta["question_id"] == 10  # kept for scoring
    spec = ModelSpec(vision_tower="unused", llm="unused")  # only its prompt defaults matter here
    tok = qwen_tokenizer
    fmt = PromptFormat.build(tok, spec.image_token, 4, False, spec.chat_template_kwargs)
    for rec in records:
        ids, labels = encode_conversation(tok, fmt, rec.conversations, max_text_len=128)
        question = rec.conversations[0]["content"].split("Question: ")[1]
        answer = rec.conversations[1]["content"]
        supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert supervised == tok.encode(answer, add_special_tokens=False) + [fmt.end_of_turn_id]
        assert tok.decode(supervised) == answer + "<|im_end|>"
        prompt = ids[:next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)]
        assert question in tok.decode(prompt)
        assert prompt.count(fmt.image_token_id) == 4
        assert ImageLoader(root=str(tmp_path))(rec.image).size == (16, 12)  # the path resolves under the root


def test_image_root_that_is_the_coco_folder_is_left_alone(vqa, tmp_path):
    # Images already in ROOT/train2014 (the COCO layout): neither copied nor replaced by a
    # link to themselves, even with --link-images.
    root = tmp_path / "coco"
    root.mkdir()
    os.rename(vqa["images_train_dir"], root / "train2014")
    inputs = {**vqa, "images_train_dir": str(root / "train2014")}
    report = convert(**inputs, output_chat_json=str(tmp_path / "chat.json"), output_image_root=str(root),
                     link_images=True)
    image = root / "train2014" / "COCO_train2014_000000000001.jpg"
    assert image.is_file() and not image.is_symlink()
    assert report["splits"]["train"]["images_placed"] == 0
    assert validate_chat_json(str(tmp_path / "chat.json"), str(root)) == []
