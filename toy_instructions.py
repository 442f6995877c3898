"""The toy data of stages 2 and 3, written beside a built toy world (toy_world.py) from the same
shapes: a toy CogVLM-SFT-311K of single- and multi-turn questions (colour, shape, position,
yes/no, captions) -> data/toy/sft/{train,eval}, and a LLaVA chat.json teaching a new answer style
(full-sentence answers) -> data/toy/style. It has a stamp of its own, so adding it never rebuilds
the world stage 1 trained on.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass

from prompts import IMAGE_PLACEHOLDER, INSTRUCTION_POOLS
from readers import COGVLM_SUBSETS
from toy_world import COLORS, COMBOS, SIZES, ToyPaths, ToySize, caption_of, render


# Questions about one attribute (several phrasings; the first is the toy VQA set's own), answered
# by one word, and yes/no questions about the colour. The stage-1 prior never saw these dialogues.
QUESTIONS = {"color": ["什么颜色？", "图中的形状是什么颜色？", "它是什么颜色的？"],
             "shape": ["什么形状？", "这是什么形状？", "图里画的是什么形状？"],
             "position": ["在哪里？", "它在图片的哪一边？", "形状在哪个位置？"]}
YES_NO = ("是{color}的吗？", "是的", "不是")
STYLE_NOTE = "stage 3's style: every question is answered with the full caption sentence"


@dataclass
class InstructionPaths:
    sft_train: str      # CogVLM-SFT-311K layout: <subset>/images/*.jpg + <subset>/labels_zh/*.json
    sft_eval: str
    style_train: str    # LLaVA chat.json (images under style_images)
    style_eval: str
    style_images: str


def qa_turn(kind: str, attrs: dict, rng: random.Random, style: bool = False) -> list[dict]:
    """One (question, answer) pair about `attrs` (color, shape, position); `style` answers with
    the full caption instead of one word (stage 3's new style)."""
    if kind == "yes_no":
        asked = attrs["color"] if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != attrs["color"]])
        question, answer = YES_NO[0].format(color=asked), YES_NO[1] if asked == attrs["color"] else YES_NO[2]
    elif kind == "caption":
        question, answer = rng.choice(INSTRUCTION_POOLS["zh"]), caption_of(**attrs)
    else:
        question, answer = rng.choice(QUESTIONS[kind]), attrs[kind]
    if style:
        answer = caption_of(**attrs)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_sft(out_dir: str, n_single: int, n_multi: int, size: ToySize, seed: int) -> None:
    """A toy CogVLM-SFT-311K: single-turn dialogues (a third of them caption requests, so stage 2
    keeps captioning) and 2-3 turn dialogues about one image, labels without `<image>`."""
    rng = random.Random(seed)
    for subset, n, turns in ((COGVLM_SUBSETS[0], n_single, (1, 1)), (COGVLM_SUBSETS[1], n_multi, (2, 3))):
        os.makedirs(os.path.join(out_dir, subset, "images"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, subset, "labels_zh"), exist_ok=True)
        for i in range(n):
            color, shape, position = rng.choice(COMBOS)
            attrs = {"color": color, "shape": shape, "position": position}
            render(color, shape, position, size.image_px, rng).save(
                os.path.join(out_dir, subset, "images", f"{i:09d}.jpg"), quality=95)
            kinds = rng.sample(["color", "shape", "position", "yes_no", "caption"], rng.randint(*turns))
            conv = [t for kind in kinds for t in qa_turn(kind, attrs, rng)]
            with open(os.path.join(out_dir, subset, "labels_zh", f"{i:09d}.json"), "w", encoding="utf-8") as fh:
                json.dump({"conversations": conv}, fh, ensure_ascii=False)


def write_style(paths: InstructionPaths, n_train: int, n_eval: int, size: ToySize, seed: int) -> None:
    """Stage 3's data, a LLaVA chat.json: attribute questions answered in the new style."""
    rng = random.Random(seed)
    os.makedirs(paths.style_images, exist_ok=True)
    for path, n, tag in ((paths.style_train, n_train, "train"), (paths.style_eval, n_eval, "eval")):
        records = []
        for i in range(n):
            color, shape, position = rng.choice(COMBOS)
            attrs = {"color": color, "shape": shape, "position": position}
            name = f"{tag}_{i:06d}.png"
            render(color, shape, position, size.image_px, rng).save(os.path.join(paths.style_images, name))
            conv = qa_turn(rng.choice(["color", "shape", "position"]), attrs, rng, style=True)
            conv[0]["content"] = f"{IMAGE_PLACEHOLDER}\n{conv[0]['content']}"
            records.append({"id": f"style-{tag}-{i}", "image": name, "conversations": [
                {"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]} for t in conv]})
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(records, fh, ensure_ascii=False, indent=1)


def ensure_instruction_data(paths: ToyPaths, size: str | ToySize = "demo", log=print) -> InstructionPaths:
    """The toy data of stages 2 and 3 beside a built toy world (its own stamp, so adding it never
    rebuilds the world stage 1 trained on)."""
    size = SIZES[size] if isinstance(size, str) else size
    root = os.path.dirname(paths.train)
    out = InstructionPaths(sft_train=os.path.join(root, "sft", "train"), sft_eval=os.path.join(root, "sft", "eval"),
                           style_train=os.path.join(root, "style", "train.json"),
                           style_eval=os.path.join(root, "style", "eval.json"),
                           style_images=os.path.join(root, "style", "images"))
    stamp = os.path.join(root, "instructions.json")
    code = "".join(inspect.getsource(f) for f in (qa_turn, write_sft, write_style))
    want = hashlib.sha256(json.dumps({"size": asdict(size), "q": QUESTIONS, "yn": YES_NO, "code": code},
                                     ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as fh:
            if json.load(fh).get("recipe") == want:
                return out
    log(f"writing the toy instruction data under {root}/sft and {root}/style ...")
    for d in (os.path.dirname(out.sft_train), os.path.dirname(out.style_train)):
        shutil.rmtree(d, ignore_errors=True)
    n = size.n_train
    write_sft(out.sft_train, n, n // 2, size, seed=size.seed + 400)
    write_sft(out.sft_eval, size.n_eval // 2, size.n_eval // 2, size, seed=size.seed + 500)
    write_style(out, n // 2, size.n_eval, size, seed=size.seed + 600)
    with open(stamp, "w", encoding="utf-8") as fh:
        json.dump({"recipe": want}, fh)
    return out
