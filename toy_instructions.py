"""The toy data of stages 2 and 3, written beside a built toy world (toy_world.py) from the same
shapes: a toy CogVLM-SFT-311K of single- and multi-turn questions (colour, shape, position,
yes/no, captions) -> data/toy/sft/{train,eval}, and a LLaVA chat.json teaching a new answer style
(full-sentence answers) -> data/toy/style, and small benchmarks in VLMEvalKit's TSV layout on
held-out images -> data/toy/bench: an MMBench-style multiple-choice set with circular rotations
(a category per attribute), an MME-style yes/no pair set and a POPE-style existence set. The SFT
data asks the same formats (VLMEvalKit's and LLaVA's prompts) on its own images, as LLaVA-1.5's
mix carries its benchmark-style instructions. It has a stamp of its own, so adding it never
rebuilds the world stage 1 trained on.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import inspect
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass

from prompts import IMAGE_PLACEHOLDER, INSTRUCTION_POOLS
from readers import COGVLM_SUBSETS
from toy_world import COMBOS, ENGLISH, IS_IT, SHAPES, SIZES, VALUES, ToyPaths, ToySize, caption_of, render
from utils.bench_scoring import CIRCULAR_STRIDE, mcq_prompt, yes_no_prompt


# Questions about one attribute (several phrasings; the first is the toy VQA set's own), answered
# by one word, and yes/no questions about the colour. The stage-1 prior never saw these dialogues.
QUESTIONS = {"color": ["什么颜色？", "图中的形状是什么颜色？", "它是什么颜色的？"],
             "shape": ["什么形状？", "这是什么形状？", "图里画的是什么形状？"],
             "position": ["在哪里？", "它在图片的哪一边？", "形状在哪个位置？"]}
# The multiple-choice questions, in English like MMBench's, with English options (toy_world.ENGLISH).
QUESTIONS_EN = {"color": ["What color is the shape?", "Which color is the shape in the image?", "What is its color?"],
                "shape": ["What shape is it?", "Which shape is drawn in the image?", "What is the shape?"],
                "position": ["Where is the shape?", "On which side of the image is the shape?", "Where is it?"]}
YES_NO_BENCH = {"color": "图中的形状是{value}的吗？ Please answer yes or no.",
                "position": "形状在{value}吗？ Please answer yes or no."}
EXISTENCE = "图中有{value}吗？"
# The kinds of turn in the toy SFT data, in shares. The benchmarks' formats get the larger shares.
# The yes/no comparison is learnt late and only from many examples (2-core AMD EPYC, the demo's
# stage-1 checkpoint): yes/no data alone, 400 steps: MME 338 of 400, POPE F1 98; these shares with
# existence at 2: 400 steps MME 256 / POPE 72.7, 800 steps 358 / 89.3; existence at 3, 800 steps:
# 388 / 96, multiple choice 100. Larger yes/no shares at 400 steps scored lower (122-154).
SFT_KINDS = {"color": 1, "shape": 1, "position": 1, "caption": 1, "mcq": 2, "yes_no": 1, "yes_no_bench": 3,
             "existence": 3}
MME_MAX = 200 * len(YES_NO_BENCH)   # MME scores acc + acc+ (in %) per category: 200 each
BENCH_NAMES = {"mcq": "toy_MMBench_EN", "mme": "toy_MME", "pope": "toy_POPE"}
STYLE_NOTE = "stage 3's style: every question is answered with the full caption sentence"


@dataclass
class InstructionPaths:
    sft_train: str      # CogVLM-SFT-311K layout: <subset>/images/*.jpg + <subset>/labels_zh/*.json
    sft_eval: str
    style_train: str    # LLaVA chat.json (images under style_images)
    style_eval: str
    style_images: str
    bench: str          # VLMEvalKit-layout TSVs: toy_MMBench_EN.tsv, toy_MME.tsv, toy_POPE.tsv


def qa_turn(kind: str, attrs: dict, rng: random.Random, style: bool = False) -> list[dict]:
    """One (question, answer) pair about `attrs` (color, shape, position); `style` answers with
    the full caption instead of one word (stage 3's new style)."""
    if kind == "mcq":
        # VLMEvalKit's multiple-choice prompt ("Please select the correct answer from the options
        # above."), in English with English options, answered with the option's text, which
        # VLMEvalKit's exact matching maps to its letter (can_infer_text). The toy LM is too small
        # to learn to point at the letter before the right option: 29% after 400 steps text-only,
        # chance 25% (LLaVA's "Answer with the option's letter" prompt asks for exactly that, so
        # the toy data leaves it out).
        attr = rng.choice(list(VALUES))
        question = mcq_prompt(rng.choice(QUESTIONS_EN[attr]), mcq_options(attr, attrs, rng))
        return [{"role": "user", "content": question}, {"role": "assistant", "content": ENGLISH[attrs[attr]]}]
    if kind in ("yes_no_bench", "existence"):
        attr = rng.choice(list(YES_NO_BENCH)) if kind == "yes_no_bench" else "shape"
        asked = attrs[attr] if rng.random() < 0.5 else rng.choice([v for v in VALUES[attr] if v != attrs[attr]])
        template = YES_NO_BENCH[attr] if kind == "yes_no_bench" else EXISTENCE
        question = yes_no_prompt(template.format(value=asked), rng.choice(["vlmeval", "llava"]))
        return [{"role": "user", "content": question}, {"role": "assistant", "content": "Yes" if asked == attrs[attr] else "No"}]
    if kind == "yes_no":     # the prior's comparison, as it learnt it (toy_world.IS_IT)
        attr = rng.choice(list(VALUES))
        asked = attrs[attr] if rng.random() < 0.5 else rng.choice([v for v in VALUES[attr] if v != attrs[attr]])
        question, answer = IS_IT[attr].format(value=asked), "是的" if asked == attrs[attr] else "不是"
    elif kind == "caption":
        question, answer = rng.choice(INSTRUCTION_POOLS["zh"]), caption_of(**attrs)
    else:
        question, answer = rng.choice(QUESTIONS[kind]), attrs[kind]
    if style:
        answer = caption_of(**attrs)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def mcq_options(attr: str, attrs: dict, rng: random.Random) -> dict[str, str]:
    """Up to four lettered options about `attr`, in English, the true value among them, in random order."""
    others = rng.sample([v for v in VALUES[attr] if v != attrs[attr]], min(3, len(VALUES[attr]) - 1))
    values = [ENGLISH[v] for v in others + [attrs[attr]]]
    rng.shuffle(values)
    return dict(zip("ABCD", values))


def _b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


def write_benches(out_dir: str, n_images: int, size: ToySize, seed: int) -> dict[str, str]:
    """The three toy benchmarks on new renders, in VLMEvalKit's layout (base64 images; rotations
    and the second question of an image refer to the first row's image by its index)."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    mcq, mme, pope = [], [], []
    for i in range(n_images):
        color, shape, position = rng.choice(COMBOS)
        attrs = {"color": color, "shape": shape, "position": position}
        image = _b64(render(color, shape, position, size.image_px, rng))
        attr = ("color", "shape", "position")[i % 3]
        options = mcq_options(attr, attrs, rng)
        letters, values = list(options), list(options.values())
        for k in range(len(values)):          # CircularEval: rotation k shifts the options by k
            rolled = dict(zip(letters, values[k:] + values[:k]))
            mcq.append({"index": i + k * CIRCULAR_STRIDE, "question": QUESTIONS_EN[attr][0], "hint": "",
                        **{c: rolled.get(c, "") for c in "ABCD"},
                        "answer": next(c for c, v in rolled.items() if v == ENGLISH[attrs[attr]]),
                        "category": attr, "l2-category": "attribute", "image": image if k == 0 else str(i)})
        mme_attr = ("color", "position")[i % 2]
        wrong = rng.choice([v for v in VALUES[mme_attr] if v != attrs[mme_attr]])
        for j, (value, answer) in enumerate([(attrs[mme_attr], "Yes"), (wrong, "No")]):
            mme.append({"index": 2 * i + j, "question": YES_NO_BENCH[mme_attr].format(value=value), "answer": answer,
                        "category": mme_attr, "image_path": f"{i:06d}.jpg", "image": image if j == 0 else str(2 * i)})
        split = ("random", "popular", "adversarial")[i % 3]
        absent = {"random": rng.choice([s for s in SHAPES if s != shape]),
                  "popular": SHAPES[0] if shape != SHAPES[0] else SHAPES[1],
                  "adversarial": SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]}[split]
        for j, (value, answer) in enumerate([(shape, "Yes"), (absent, "No")]):
            pope.append({"index": 2 * i + j, "question": EXISTENCE.format(value=value), "answer": answer,
                         "category": split, "image": image if j == 0 else str(2 * i)})
    paths = {}
    for key, rows in (("mcq", mcq), ("mme", mme), ("pope", pope)):
        paths[key] = os.path.join(out_dir, f"{BENCH_NAMES[key]}.tsv")
        with open(paths[key], "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
    return paths


def draw_kinds(rng: random.Random, n: int) -> list[str]:
    """n different kinds of turn, drawn by their SFT_KINDS shares (one of each at most: two
    multiple-choice questions in one dialogue outgrow the demo's --max_text_len)."""
    left, kinds = dict(SFT_KINDS), []
    for _ in range(n):
        kinds.append(rng.choices(list(left), list(left.values()))[0])
        del left[kinds[-1]]
    return kinds


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
            kinds = draw_kinds(rng, rng.randint(*turns))
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
                           style_images=os.path.join(root, "style", "images"), bench=os.path.join(root, "bench"))
    stamp = os.path.join(root, "instructions.json")
    code = "".join(inspect.getsource(f) for f in (qa_turn, draw_kinds, mcq_options, write_benches, write_sft, write_style,
                                                  mcq_prompt, yes_no_prompt))
    want = hashlib.sha256(json.dumps({"size": asdict(size), "q": QUESTIONS, "q_en": QUESTIONS_EN, "en": ENGLISH, "yn": IS_IT, "kinds": SFT_KINDS, "code": code},
                                     ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as fh:
            if json.load(fh).get("recipe") == want:
                return out
    log(f"writing the toy instruction data under {root}/sft and {root}/style ...")
    for d in (os.path.dirname(out.sft_train), os.path.dirname(out.style_train), out.bench):
        shutil.rmtree(d, ignore_errors=True)
    n = size.n_train
    write_sft(out.sft_train, n, n // 2, size, seed=size.seed + 400)
    write_sft(out.sft_eval, size.n_eval // 2, size.n_eval // 2, size, seed=size.seed + 500)
    write_style(out, n // 2, size.n_eval, size, seed=size.seed + 600)
    write_benches(out.bench, max(size.n_eval // 4, 6), size, seed=size.seed + 700)
    with open(stamp, "w", encoding="utf-8") as fh:
        json.dump({"recipe": want}, fh)
    return out
