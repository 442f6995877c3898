r"""VQA v2 (questions + annotations + COCO images) -> LLaVA `chat.json` + image folder.

The align plan's converter, done right: questions and annotations are joined on
`question_id`, every dropped item is counted by reason, each image is copied (or symlinked)
once, outputs are written atomically and validated before they replace anything, and a
rerun produces byte-identical files without copying images again.

Outputs (the val split is written separately so that it can be scored, never trained on):
    --output-chat-json  FILE      train records (a JSON list, one record per line)
    --output-val-chat-json FILE   val records; default `<FILE stem>_val.json` beside FILE
    <FILE stem>.report.json       counts per split, dropped questions by reason with an example
                                  each; written on every run that read its inputs, failed or not
    --output-image-root DIR       images under DIR/train2014/ and DIR/val2014/; the `image`
                                  of each record is relative to DIR (default: FILE's folder)
With only the val split given, only the val file (and the report) is written.
`--dataset-root-dir DIR` picks the align plan's layout instead: DIR/download/
llava-laion-cc-sbu-558k/chat.json (+ chat_val.json) with the images in that same folder, which
is what `train_stage1.py --dataset.dataset_root_dir DIR --dataset.type llava-v15` reads.

A record (the human turn comes from --template; the gpt turn is `multiple_choice_answer`):
    {"id": "vqa_458752000", "image": "train2014/COCO_train2014_000000458752.jpg",
     "conversations": [{"from": "human", "value": "Answer the question based on the image.\\n<image>\\nQuestion: What is this photo taken looking through?"},
                       {"from": "gpt", "value": "net"}],
     "question_id": 458752000, "image_id": 458752, "answer_type": "other", "question_type": "what is this",
     "answers": ["net", "net", ...ten...], "split": "train"}

Exit codes: 0 ok, 1 the written output failed validation (a previous output is kept),
2 unusable command line or input file, or a split whose every question was dropped (no
chat.json is written; the error names the likeliest cause, e.g. a wrong --images-X-dir or a
val2014 file given as --questions-train).

CPU check on the official files (a 200-question subset per split, images symlinked):
    python convert_vqa.py --questions-train v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations-train v2_mscoco_train2014_annotations.json --images-train-dir train2014 \
        --questions-val v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations-val v2_mscoco_val2014_annotations.json --images-val-dir val2014 \
        --dataset-root-dir data/vqa --link-images --max-per-split 200
    python convert_vqa.py --validate-only data/vqa/download/llava-laion-cc-sbu-558k/chat.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from readers import validate_chat_json
from utils import console
from utils.align_plan import LLAVA_V15_CHAT
from utils.atomic import CheckFailed, atomic_path, atomic_write
from utils.config import Parser

IMAGE_PLACEHOLDER = "<image>"  # the same literal dataset.py turns into image slots
DEFAULT_TEMPLATE = "Answer the question based on the image.\n<image>\nQuestion: {question}"
# COCO 2014 file names and the sub-folder each split's images go to under the image root.
SPLITS = {"train": ("COCO_train2014_{:012d}.jpg", "train2014"),
          "val": ("COCO_val2014_{:012d}.jpg", "val2014")}
FILTER_REASONS = ("question_without_annotation", "annotation_without_question", "empty_question",
                  "empty_answer", "missing_image", "malformed_question", "malformed_annotation",
                  "image_id_mismatch", "duplicate_question_id", "placeholder_in_text")


class ConvertError(Exception):
    """A problem the user must fix; `code` is the process exit status main() returns."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


@dataclass
class SplitInputs:
    name: str
    questions: str
    annotations: str
    images_dir: str


@dataclass
class Drops:
    """Questions dropped from one split: a count and the first example per reason, so that
    "missing_image 300" comes with the file name and folder a user can check."""
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, example)


# --------------------------------------------------------------------------- reading

def load_vqa_json(path: str, key: str) -> tuple[list, str]:
    """(the list under `key` ("questions" / "annotations"), its `data_subtype`, e.g. "val2014")
    of an official VQA v2 file."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file (VQA {key} JSON)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        have = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ConvertError(f"{path}: expected a JSON object with a {key!r} list (official VQA v2 schema); have {have}")
    return data[key], str(data.get("data_subtype") or "")


def _qid(item: Any) -> int | None:
    # bool is an int subclass; a true/false id is a broken row, not question 1.
    qid = item.get("question_id") if isinstance(item, dict) else None
    return qid if isinstance(qid, int) and not isinstance(qid, bool) else None


def index_by_qid(items: list, kind: str, drops: Drops) -> tuple[dict[int, dict], set[int]]:
    """(question_id -> item, ids seen more than once). Rows without an int id are counted as
    malformed; a repeated id drops every row that has it (counted once per row), since which of
    two contradicting rows is right cannot be known here."""
    out: dict[int, dict] = {}
    dups: set[int] = set()
    for i, item in enumerate(items):
        qid = _qid(item)
        if qid is None:
            drops.add(f"malformed_{kind}", f"{kind} {i} has no integer question_id")
        elif qid in dups:
            drops.add("duplicate_question_id", f"question_id {qid}")
        elif qid in out:
            drops.add("duplicate_question_id", f"question_id {qid}", n=2)
            del out[qid]
            dups.add(qid)
        else:
            out[qid] = item
    return out, dups


# --------------------------------------------------------------------------- mapping

def build_records(split: SplitInputs, questions: list, annotations: list, template: str,
                  max_per_split: int = 0) -> tuple[list[dict], dict[str, str], Drops]:
    """Join one split on question_id -> (records sorted by question_id, image rel path -> source
    path, dropped questions). Each dropped question is counted under its first reason."""
    drops = Drops()
    qs, q_dups = index_by_qid(questions, "question", drops)
    anns, a_dups = index_by_qid(annotations, "annotation", drops)
    dups = q_dups | a_dups  # already counted; their other half must not count again below
    pattern, subdir = SPLITS[split.name]
    records: list[dict] = []
    images: dict[str, str] = {}
    exists: dict[str, bool] = {}  # one stat per image, not one per question (~5 questions/image)
    for qid in sorted((qs.keys() | anns.keys()) - dups):
        if max_per_split and len(records) >= max_per_split:
            break  # counts then cover the question ids examined, in id order
        q, a = qs.get(qid), anns.get(qid)
        if a is None:
            drops.add("question_without_annotation", f"question_id {qid} has no annotation")
            continue
        if q is None:
            drops.add("annotation_without_question", f"question_id {qid} has no question")
            continue
        image_id, question = q.get("image_id"), q.get("question")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(question, str):
            drops.add("malformed_question", f"question_id {qid}")
            continue
        answer, answers = a.get("multiple_choice_answer"), a.get("answers")
        if not isinstance(answers, list) or not all(isinstance(x, dict) and isinstance(x.get("answer"), str)
                                                    for x in answers):
            drops.add("malformed_annotation", f"question_id {qid}")
            continue
        if a.get("image_id", image_id) != image_id:
            drops.add("image_id_mismatch", f"question_id {qid}")
            continue
        question = " ".join(question.split())  # stray newlines/tabs would change the prompt layout
        if not question:
            drops.add("empty_question", f"question_id {qid}")
            continue
        answer = answer.strip() if isinstance(answer, str) else ""
        if not answer:
            drops.add("empty_answer", f"question_id {qid}")
            continue
        if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:
            # dataset.py would see two image placeholders and skip the sample at training time.
            drops.add("placeholder_in_text", f"question_id {qid}")
            continue
        name = pattern.format(image_id)
        src = os.path.join(split.images_dir, name)
        if src not in exists:
            exists[src] = os.path.isfile(src)
        if not exists[src]:
            drops.add("missing_image", f"{name} not in {split.images_dir}")
            continue
        rel = f"{subdir}/{name}"  # forward slashes: the file is read on any OS
        images[rel] = src
        records.append({
            "id": f"vqa_{qid}",
            "image": rel,
            "conversations": [{"from": "human", "value": template.replace("{question}", question)},
                              {"from": "gpt", "value": answer}],
            "question_id": qid,
            "image_id": image_id,
            "answer_type": str(a.get("answer_type", "")),
            "question_type": str(a.get("question_type", "")),
            "answers": [x["answer"] for x in answers],  # all ten: VQA accuracy is min(#matches / 3, 1)
            "split": split.name,
        })
    return records, images, drops


# --------------------------------------------------------------------------- why a split came out empty

def _split_of(subtype: str) -> str | None:
    """'val2014' (an official file's data_subtype) -> 'val'; None for others (test2015, custom files)."""
    return next((name for name, (_, sub) in SPLITS.items() if sub == subtype), None)


def describe_image_dir(split: SplitInputs, expected: str) -> str:
    """Why none of the images the questions name is in the folder, likeliest mistake first."""
    flag, subdir = f"--images-{split.name}-dir", SPLITS[split.name][1]
    where = f"{split.images_dir} ({flag})"
    if os.path.isdir(os.path.join(split.images_dir, subdir)):  # the COCO root given instead of its split folder
        return f"{where} holds a {subdir}/ folder: pass {flag} {os.path.join(split.images_dir, subdir)}"
    found = sorted(e.name for e in os.scandir(split.images_dir) if e.is_file())  # failure path only
    if not found:
        return f"{where} is empty; it should hold the COCO {subdir} images, e.g. {expected}"
    for other, (_, other_dir) in SPLITS.items():
        seen = next((f for f in found if f.startswith(f"COCO_{other_dir}_")), None)
        if other != split.name and seen:
            return (f"{where} holds {other_dir} images (e.g. {seen}), but the questions name {subdir} ones "
                    f"(e.g. {expected}): point {flag} at the {subdir} folder")
    return (f"none of the images the questions name is in {where}: expected e.g. {expected}, "
            f"found {len(found)} other file(s), e.g. {found[0]}")


def explain_empty(split: SplitInputs, n_questions: int, subtypes: tuple[str, str], drops: Drops) -> str:
    """The error for a split that produced no records: the likeliest cause, then every count."""
    files = {"questions": (split.questions, subtypes[0]), "annotations": (split.annotations, subtypes[1])}
    # A file of the other split (its data_subtype says so): its images are named COCO_<other>2014_...
    wrong = [(kind, path, sub) for kind, (path, sub) in files.items() if _split_of(sub) not in (None, split.name)]
    if not n_questions:
        why = f"{split.questions} holds no questions"
    elif wrong:
        other = _split_of(wrong[0][2])
        why = "; ".join(f"{path} is a {sub} file (its data_subtype) given as --{kind}-{split.name}: "
                        f"pass it as --{kind}-{other}" for kind, path, sub in wrong)
        why += f", with the {SPLITS[other][1]} images as --images-{other}-dir"
    elif all(subtypes) and subtypes[0] != subtypes[1]:
        why = (f"the questions ({subtypes[0]}, {split.questions}) and the annotations "
               f"({subtypes[1]}, {split.annotations}) come from different splits")
    elif drops.counts.most_common(1)[0][0] == "missing_image":
        # The example is "<file name> not in <folder>": the name is the one the questions asked for.
        why = describe_image_dir(split, drops.examples["missing_image"].split(" not in ")[0])
    else:
        why = f"every question was dropped, most as {drops.counts.most_common(1)[0][0]}"
    dropped = "; ".join(f"{r} {n}, e.g. {drops.examples[r]}" for r, n in drops.counts.most_common())
    return f"the {split.name} split produced no records: {why}\n  dropped {sum(drops.counts.values())}: {dropped}"


# --------------------------------------------------------------------------- writing

def place_image(src: str, dst: str, link: bool) -> bool:
    """Copy (or symlink) src to dst atomically; False when an identical dst is already there.

    "Identical" is size + mtime for copies (copy2 keeps the mtime, as rsync's quick check
    does) and the same target for links, so a rerun over 80k images reads none of them.
    """
    if os.path.lexists(dst):
        if not os.path.islink(dst) and os.path.samefile(src, dst):
            # The image root already is the COCO folder: never replace a source with a copy or
            # a link of itself (a link would point at itself and the image would be gone).
            return False
        if link:
            if os.path.islink(dst) and os.readlink(dst) == os.path.abspath(src):
                return False
        elif not os.path.islink(dst):  # a link left by --link-images is replaced by a real file
            s, d = os.stat(src), os.stat(dst)
            if s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns:
                return False
    with atomic_path(dst) as tmp:   # readers see the old file or the new one, never a partial copy
        if link:
            os.symlink(os.path.abspath(src), tmp)
        else:
            shutil.copy2(src, tmp)
    return True


def dump_records(records: list[dict]) -> str:
    """A JSON list with one record per line: valid JSON, diff- and grep-friendly, and
    deterministic (insertion-ordered keys, no timestamps) so reruns are byte-identical."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def not_written(paths: list[str]) -> str:
    """What a failed run left behind: "previous file kept" only where there was one."""
    kept = [p for p in paths if os.path.exists(p)]
    return f"previous file kept: {', '.join(kept)}" if kept else "nothing written"


def write_checked(path: str, text: str, check: Callable[[str], list[str]] | None = None) -> None:
    """Write atomically; `check` runs on the finished temporary file first. A crash, a failed
    write or a failed check leaves the previous file untouched (and no temp)."""
    def named(tmp: str) -> list[str]:  # problems name the file the user asked for, not its temp
        return [p.replace(tmp, path) for p in check(tmp)] if check else []

    outcome = not_written([path])  # asked before the write replaces anything
    try:
        atomic_write(path, text, named)
    except CheckFailed as e:
        raise ConvertError(f"{path}: the converted output failed validation, {outcome}:\n"
                           + _format_problems(e.problems), code=1) from None


# --------------------------------------------------------------------------- validation (readers.validate_chat_json)

def _format_problems(problems: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return shown + more


# --------------------------------------------------------------------------- the conversion

def resolve_outputs(output_chat_json: str | None, output_val_chat_json: str | None,
                    output_image_root: str | None, dataset_root_dir: str | None) -> tuple[str, str, str, str]:
    """(train chat.json, val chat.json, image root, report path) from the flags."""
    if dataset_root_dir:
        if output_chat_json or output_image_root:
            raise ConvertError("--dataset-root-dir fixes the output paths; drop --output-chat-json/--output-image-root")
        base = os.path.join(dataset_root_dir, LLAVA_V15_CHAT)
        output_chat_json, output_image_root = os.path.join(base, "chat.json"), base
    if not output_chat_json:
        raise ConvertError("name the output: --output-chat-json FILE (or --dataset-root-dir DIR)")
    stem = os.path.splitext(output_chat_json)[0]
    # Images default to the chat.json's folder: that is where dataset.read_records and
    # train_stage1.py's held-out reader look when no image root is named.
    image_root = output_image_root or os.path.dirname(os.path.abspath(output_chat_json))
    val_json = output_val_chat_json or f"{stem}_val.json"
    if os.path.abspath(val_json) == os.path.abspath(output_chat_json):
        raise ConvertError("--output-val-chat-json must differ from --output-chat-json: val is never trained on")
    return output_chat_json, val_json, image_root, f"{stem}.report.json"


def check_template(template: str) -> None:
    if template.count(IMAGE_PLACEHOLDER) != 1 or "{question}" not in template:
        raise ConvertError(f"--template must contain {IMAGE_PLACEHOLDER} exactly once and {{question}}; "
                           f"got {template!r}")


def convert(*, questions_train: str | None = None, annotations_train: str | None = None,
            images_train_dir: str | None = None, questions_val: str | None = None,
            annotations_val: str | None = None, images_val_dir: str | None = None,
            output_chat_json: str | None = None, output_val_chat_json: str | None = None,
            output_image_root: str | None = None, dataset_root_dir: str | None = None,
            link_images: bool = False, template: str = DEFAULT_TEMPLATE, max_per_split: int = 0) -> dict:
    """Convert the given split(s) and return the report (also written as JSON).

    Everything is read and checked before anything is written; raises ConvertError
    (code 2: bad flags or input file, code 1: output failed validation).
    """
    check_template(template)
    splits: list[SplitInputs] = []
    for name, parts in (("train", (questions_train, annotations_train, images_train_dir)),
                        ("val", (questions_val, annotations_val, images_val_dir))):
        if any(parts) and not all(parts):
            flags = [f"--{k}-{name}" for k in ("questions", "annotations")] + [f"--images-{name}-dir"]
            missing = [f for f, p in zip(flags, parts) if not p]
            raise ConvertError(f"the {name} split needs {', '.join(flags)} together; missing {', '.join(missing)}")
        if all(parts):
            if not os.path.isdir(parts[2]):
                raise ConvertError(f"{parts[2]}: no such image folder (--images-{name}-dir)")
            splits.append(SplitInputs(name, *parts))
    if not splits:
        raise ConvertError("nothing to convert: give the train and/or val split "
                           "(--questions-X, --annotations-X, --images-X-dir)")
    train_json, val_json, image_root, report_path = resolve_outputs(
        output_chat_json, output_val_chat_json, output_image_root, dataset_root_dir)
    if max_per_split < 0:
        raise ConvertError("--max-per-split must be >= 0")

    # Read every input first: a bad file must stop the run before any output changes.
    loaded = {s.name: (load_vqa_json(s.questions, "questions"), load_vqa_json(s.annotations, "annotations"))
              for s in splits}

    report: dict[str, Any] = {"total": 0, "splits": {}, "outputs": {}, "image_root": image_root,
                              "template": template, "link_images": link_images, "max_per_split": max_per_split}
    built: dict[str, tuple[list[dict], dict[str, str]]] = {}
    empty: list[str] = []
    for s in splits:
        (questions, q_subtype), (annotations, a_subtype) = loaded[s.name]
        records, images, drops = build_records(s, questions, annotations, template, max_per_split)
        built[s.name] = records, images
        report["total"] += len(records)
        report["outputs"][s.name] = train_json if s.name == "train" else val_json
        report["splits"][s.name] = {
            "questions": len(questions), "annotations": len(annotations), "records": len(records),
            "images": len(images), "filtered": {r: drops.counts[r] for r in FILTER_REASONS if drops.counts[r]},
            "filtered_examples": {r: drops.examples[r] for r in FILTER_REASONS if r in drops.examples},
            "filtered_total": sum(drops.counts.values()),
        }
        if not records:
            empty.append(explain_empty(s, len(questions), (q_subtype, a_subtype), drops))

    def give_up(msg: str, code: int) -> ConvertError:
        # The report says why, also when nothing else was written: it is where a user looks.
        write_checked(report_path, json.dumps({**report, "error": msg}, indent=2, ensure_ascii=False) + "\n")
        return ConvertError(f"{msg}\n  report: {report_path}", code)

    if empty:  # a requested split that yields nothing is a wrong input, not a result
        raise give_up("\n".join(empty) + "\n  " + not_written(list(report["outputs"].values())), 2)

    # Images are in place before the JSON that names them appears; each file is validated
    # as a temp file and only then replaces the previous output.
    for name, (_, images) in built.items():
        copied = sum(place_image(src, os.path.join(image_root, rel), link_images)
                     for rel, src in sorted(images.items()))
        report["splits"][name].update(images_placed=copied, images_already_there=len(images) - copied)
    for name, (records, _) in built.items():
        try:
            write_checked(report["outputs"][name], dump_records(records),
                          check=lambda tmp: validate_chat_json(tmp, image_root))
        except ConvertError as e:
            raise give_up(str(e), e.code) from None
    write_checked(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["report"] = report_path
    return report


def print_report(report: dict) -> None:
    console.header("VQA v2 -> LLaVA chat.json")
    for name, st in report["splits"].items():
        console.info(f"{name:5s}: {st['records']} records from {st['questions']} questions / "
                     f"{st['annotations']} annotations; {st['images']} images "
                     f"({st['images_placed']} {'linked' if report['link_images'] else 'copied'}, "
                     f"{st['images_already_there']} already there)")
        console.info(f"       filtered {st['filtered_total']}" + ("" if st["filtered"] else ": none"))
        for reason, n in sorted(st["filtered"].items(), key=lambda kv: -kv[1]):
            console.info(f"         {reason} {n}, e.g. {st['filtered_examples'][reason]}")
        console.info(f"       -> {report['outputs'][name]}")
    if "train" not in report["splits"]:
        console.warn("only the val split was given: wrote the val file only, no training chat.json")
    console.info(f"image root: {report['image_root']}")
    # train_stage1.py resolves held-out images against --eval_data_root (default: the val
    # file's folder), so name the root explicitly: the val file may live elsewhere.
    outs, root = report["outputs"], report["image_root"]
    cmd = ["python train_stage1.py --data_format chat"]
    if "train" in outs:
        cmd.append(f"--chat_json {outs['train']} --image_root {root}")
    if "val" in outs:
        cmd.append(f"--eval_chat_json {outs['val']} --eval_data_root {root}")
    if "train" in outs:
        console.info("train on it with: " + " ".join(cmd))
    console.success(f"{report['total']} records in total; validated; report: {report['report']}")


# --------------------------------------------------------------------------- CLI

def _template_arg(value: str) -> str:
    # A shell gives "\n" as backslash + n; the default template uses real newlines.
    return value.replace("\\n", "\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    for split in ("train", "val"):
        p.add_argument(f"--questions-{split}", help=f"v2_OpenEnded_mscoco_{split}2014_questions.json")
        p.add_argument(f"--annotations-{split}", help=f"v2_mscoco_{split}2014_annotations.json")
        p.add_argument(f"--images-{split}-dir", help=f"folder holding COCO_{split}2014_<image_id:012d>.jpg")
    p.add_argument("--output-chat-json", help="train records go here")
    p.add_argument("--output-val-chat-json", help="val records (default: <output stem>_val.json beside it)")
    p.add_argument("--output-image-root", help="images go to ROOT/train2014, ROOT/val2014 (default: the output's folder)")
    p.add_argument("--dataset-root-dir", help="align-plan layout: DIR/download/llava-laion-cc-sbu-558k/{chat.json,chat_val.json,images}")
    p.add_argument("--link-images", action="store_true", help="symlink images instead of copying them")
    p.add_argument("--template", type=_template_arg, default=DEFAULT_TEMPLATE,
                   help="human turn; must hold <image> once and {question}; \\n means newline")
    p.add_argument("--max-per-split", type=int, default=0, help="keep at most N records per split (0: all)")
    p.add_argument("--validate-only", metavar="FILE", help="only run the checklist on an existing chat.json")
    p.add_argument("--image-root", help="with --validate-only: image folder (default: FILE's folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.validate_only:
            root = args.image_root or os.path.dirname(os.path.abspath(args.validate_only))
            problems = validate_chat_json(args.validate_only, root)
            if problems:
                console.error(f"{args.validate_only}: {len(problems)} problem(s)\n{_format_problems(problems)}")
                return 1
            console.success(f"{args.validate_only}: valid (images under {root})")
            return 0
        kwargs = {k: v for k, v in vars(args).items() if k not in ("validate_only", "image_root")}
        print_report(convert(**kwargs))
        return 0
    except ConvertError as e:
        console.error(str(e))
        return e.code
    except OSError as e:  # disk full, permissions: the previous outputs are still in place
        console.error(f"conversion failed, previous outputs kept: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
