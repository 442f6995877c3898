"""Benchmark scoring by VLMEvalKit's rules without a judge (reimplemented from
vlmeval/utils/matching_util.py, vlmeval/dataset/utils/multiple_choice.py and
vlmeval/dataset/utils/yorn.py, read at commit e8e78f0), so our figures compare with published
ones. Where VLMEvalKit is strict, so is this: "选A", a lone lowercase "c", "是的" are unparsed.
`lenient=True` also accepts those forms; its figures are reported apart, never mixed in.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

CIRCULAR_STRIDE = 1_000_000      # MMBench: index + k * 1e6 is rotation k of question `index`
OPTION_PUNCTUATION = ".()[],:;!*#{}"
# A reply that refuses counts as the "no option" answer Z (VLMEvalKit's reject_to_answer).
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
LENIENT_CHOICE = re.compile(r"(?:选项?|答案[是为：:]?\s*|answer\s*(?:is)?\s*[:：]?\s*|^|[\s(（])([A-Za-z])(?:$|[\s.。,，)）:：、])",
                            re.IGNORECASE)
MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                  "posters", "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


# --------------------------------------------------------------------------- prompts

# The instruction after the options. VLMEvalKit's default prompt (ImageMCQDataset.build_prompt) is
# English for every language; LLaVA's (VLMEvalKit's llava.py) is Chinese when the prompt has Chinese.
VLMEVAL_MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
LLAVA_MCQ_INSTRUCTION = {"en": "Answer with the option's letter from the given choices directly.",
                         "cn": "请直接回答选项字母。"}
LLAVA_YORN_INSTRUCTION = "Answer the question using a single word or phrase."
PROMPT_STYLES = ("vlmeval", "llava")


def cn_string(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None, style: str = "vlmeval") -> str:
    """vlmeval: "Hint: ...", "Question: ...", "Options:" with "A. text" lines, its instruction.
    llava: hint, question and "A. text" lines joined by newlines, then LLaVA's instruction."""
    if style == "llava":
        text = (f"{hint}\n{question}" if hint else question) + "".join(f"\n{k}. {v}" for k, v in options.items())
        return f"{text}\n{LLAVA_MCQ_INSTRUCTION['cn' if cn_string(text) else 'en']}"
    prompt = (f"Hint: {hint}\n" if hint else "") + f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + VLMEVAL_MCQ_INSTRUCTION
    return prompt


def yes_no_prompt(question: str, style: str = "vlmeval") -> str:
    """vlmeval: the question as it stands (MME's already ends in "Please answer yes or no.");
    llava: LLaVA-1.5's short-answer instruction after it, as in its POPE and MME evaluation."""
    return question if style == "vlmeval" else f"{question}\n{LLAVA_YORN_INSTRUCTION}"


# --------------------------------------------------------------------------- multiple choice

def _option_letter(reply: str, options: dict[str, str]) -> str | None:
    """can_infer_option: a letter standing alone among the last five words, once."""
    if "Failed to obtain answer via API" in reply:
        return None
    if any(r in reply for r in REFUSALS):
        return "Z"
    text = reply
    for c in OPTION_PUNCTUATION:
        text = text.replace(c, " ")
    words = text.split()
    found = [c for c in options if c in words]
    if len(found) == 1:
        for c in options:
            if c in words and words.index(c) > len(words) - 5:
                return c
    elif not found and "Z" in words:
        return "Z"
    m = VERBOSE_ANSWER.search(reply)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def _option_text(reply: str, options: dict[str, str]) -> str | None:
    """can_infer_text: the text of exactly one option inside a reply at most twice their length."""
    low = reply.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_choice(reply: str | None, options: dict[str, str], lenient: bool = False) -> str | None:
    """The option letter a reply chose, 'Z' for a refusal, None when it cannot be parsed."""
    if reply is None:
        return None
    reply = str(reply)
    found = _option_letter(reply, options) or _option_text(reply, options)
    if found or not lenient:
        return found
    letters = {m.group(1).upper() for m in LENIENT_CHOICE.finditer(reply.strip())} & set(options)
    return letters.pop() if len(letters) == 1 else None


def judge_prompt(question: str, options: dict[str, str], reply: str) -> str:
    """The judge's task, as VLMEvalKit's GPT matcher phrases it (Chinese for a Chinese question)."""
    listed = "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    if cn_string(question):
        return ("你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。你会被提供：一个问题，多个选项，一个答案。"
                "你的任务是找到与答案意义最相近的选项。如果所有选项的意义都与答案显著不同，则输出 Z。"
                "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。\n"
                f"问题: {question}?\n选项: {listed}\n答案: {reply}\n输出: ")
    return ("You are an AI assistant who will help me to match an answer with several options of a single-choice "
            "question. You are provided with a question, several options, and an answer, and you need to find which "
            "option is most similar to the answer. If the meaning of all options are significantly different from the "
            "answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid "
            f"options), and Z.\nQuestion: {question}?\nOptions: {listed}\nAnswer: {reply}\nYour output: ")


def _accuracy_table(rows: list[tuple[Any, bool]]) -> dict[str, dict]:
    """rows: (item, hit) -> per category and l2-category: accuracy (percent) and count."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, hit in rows:
        groups[item.category].append(hit)
        if item.l2_category:
            groups[item.l2_category].append(hit)
    return {k: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def score_choices(items: list, choices: dict[Any, str | None], circular: bool) -> dict:
    """Vanilla accuracy on every row and on the original questions; with `circular`, MMBench's
    CircularEval: a question counts only when every rotation of it is answered right (an
    unparsed rotation fails the group, as VLMEvalKit's exact matching does)."""
    hits = {it.index: choices.get(it.index) == it.answer for it in items}
    unparsed = sum(choices.get(it.index) is None for it in items)
    out: dict[str, Any] = {"unparsed": unparsed, "n": len(items)}
    originals = [it for it in items if not circular or int(it.index) < CIRCULAR_STRIDE]
    out["vanilla"] = 100.0 * sum(hits[it.index] for it in originals) / max(len(originals), 1)
    out["vanilla_all"] = 100.0 * sum(hits.values()) / max(len(items), 1)
    if circular:
        groups: dict[int, list[bool]] = defaultdict(list)
        for it in items:
            groups[int(it.index) % CIRCULAR_STRIDE].append(hits[it.index])
        main = [it for it in items if int(it.index) < CIRCULAR_STRIDE]
        rows = [(it, all(groups[int(it.index)])) for it in main]
        out["circular"] = 100.0 * sum(h for _, h in rows) / max(len(rows), 1)
        out["questions"] = len(rows)
        out["categories"] = {k: {"circular": v["accuracy"], "n": v["n"]} for k, v in _accuracy_table(rows).items()}
        for k, v in _accuracy_table([(it, hits[it.index]) for it in main]).items():
            out["categories"][k]["vanilla"] = v["accuracy"]
    else:
        out["categories"] = {k: {"vanilla": v["accuracy"], "n": v["n"]}
                             for k, v in _accuracy_table([(it, hits[it.index]) for it in items]).items()}
    out["overall"] = out["circular"] if circular else out["vanilla"]
    return out


# --------------------------------------------------------------------------- yes / no

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")


def _process_punctuation(text: str) -> str:
    """VLMEvalKit's process_punctuation, quirks kept: a mark next to a space is deleted, else it
    becomes a space; at most 32 periods are removed (it passes re.UNICODE as the count)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=32)


LENIENT_YES = ("是", "是的", "对", "对的", "有", "yes")
LENIENT_NO = ("否", "不是", "不", "没有", "不对", "no")


def extract_yes_no(reply: str | None, lenient: bool = False) -> str:
    """'Yes', 'No' or 'Unknown' (YOrN_Extraction: the word yes or no, and not both)."""
    if reply is None:
        return "Unknown"
    words = _process_punctuation(str(reply).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    if lenient and "yes" not in words and "no" not in words:   # Chinese, or "yes" glued to "。"
        head = re.split(r"[，,。.！!？?\s]", str(reply).strip().lower(), maxsplit=1)[0]
        if head in LENIENT_NO or head.startswith(("不", "没")):
            return "No"
        if head in LENIENT_YES or head.startswith("是"):
            return "Yes"
    return "Unknown"


def _pair_key(item) -> str:
    """MME pairs its two questions of an image by image_path; without one, by the whole shared
    image (its first bytes are the format's header, the same for every JPEG of one encoder)."""
    return item.image_path or item.image or str(item.index)


def score_yes_no(items: list, answers: dict[Any, str | None], kind: str) -> dict:
    hits = {it.index: answers.get(it.index) == it.answer for it in items}
    unknown = sum(answers.get(it.index) in (None, "Unknown") for it in items)
    out: dict[str, Any] = {"n": len(items), "unknown": unknown,
                           "accuracy": 100.0 * sum(hits.values()) / max(len(items), 1)}
    if kind == "mme":
        stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for it in items:
            stats[it.category][_pair_key(it)].append(hits[it.index])
        cats = {}
        for cat, pairs in sorted(stats.items()):
            flat = [h for v in pairs.values() for h in v]
            acc, plus = 100.0 * sum(flat) / len(flat), 100.0 * sum(all(v) for v in pairs.values()) / len(pairs)
            cats[cat] = {"acc": acc, "acc_plus": plus, "score": acc + plus, "n": len(flat)}
        out["categories"] = cats
        out["perception"] = sum(cats[c]["score"] for c in MME_PERCEPTION if c in cats)
        out["cognition"] = sum(cats[c]["score"] for c in MME_COGNITION if c in cats)
        out["categories_present"] = {"perception": [c for c in MME_PERCEPTION if c in cats],
                                     "cognition": [c for c in MME_COGNITION if c in cats]}
        out["overall"] = out["perception"] + out["cognition"]
    elif kind == "pope":
        # A row listed under several splits ("adversarial,popular") counts in each, and in the overall.
        rows = [(s.strip(), it) for it in items for s in (it.split or "overall").split(",")]
        out["splits"] = {s: _pope([r for sp, r in rows if sp == s], answers) for s in sorted({s for s, _ in rows})}
        out.update({f"all_{k}": v for k, v in _pope((r for _, r in rows), answers).items()})
        out["overall"] = out["all_f1"]
    elif kind == "hallusionbench":
        out.update(_hallusion(items, hits))
        out["overall"] = out["aAcc"]
    else:
        out["categories"] = {c: {"accuracy": 100.0 * sum(hits[it.index] for it in g) / len(g), "n": len(g)}
                             for c, g in _by_category(items).items()}
        out["overall"] = out["accuracy"]
    return out


def _by_category(items: list, l2: bool = False) -> dict[str, list]:
    """Items per category (and, with `l2`, per l2-category too)."""
    groups: dict[str, list] = defaultdict(list)
    for it in items:
        groups[it.category].append(it)
        if l2 and it.l2_category:
            groups[it.l2_category].append(it)
    return dict(sorted(groups.items()))


def _pope(rows, answers: dict) -> dict:
    """Precision, recall and F1 of "Yes" (an Unknown answer counts as No), accuracy, yes-ratio."""
    tp = fp = fn = right = yes = n = 0
    for it in rows:
        truth, pred = it.answer == "Yes", answers.get(it.index) == "Yes"
        tp, fp, fn = tp + (truth and pred), fp + (pred and not truth), fn + (truth and not pred)
        right += answers.get(it.index) == it.answer
        yes, n = yes + pred, n + 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": 100 * f1, "accuracy": 100.0 * right / max(n, 1), "precision": 100 * precision,
            "recall": 100 * recall, "yes_ratio": 100.0 * yes / max(n, 1), "n": n}


def _hallusion(items: list, hits: dict) -> dict:
    """aAcc over questions; fAcc over figures and qAcc over questions (every variant right), keyed
    by the l2-category and the set/figure/question ids of HallusionBench's index (a_b_c_SET_FIG_Q);
    overall, then per category and per l2-category, as VLMEvalKit's Hallusion_rating splits them."""
    def rate(group: list) -> dict:
        figures, questions = defaultdict(list), defaultdict(list)
        for it in group:
            parts = str(it.index).split("_")
            if len(parts) >= 6:
                figures[f"{it.l2_category}_{parts[3]}_{parts[4]}"].append(hits[it.index])
                questions[f"{it.l2_category}_{parts[3]}_{parts[5]}"].append(hits[it.index])
        out = {"aAcc": 100.0 * sum(hits[it.index] for it in group) / max(len(group), 1)}
        if figures:
            out["fAcc"] = 100.0 * sum(all(v) for v in figures.values()) / len(figures)
            out["qAcc"] = 100.0 * sum(all(v) for v in questions.values()) / len(questions)
        return {**out, "n": len(group)}

    out = rate(items)
    del out["n"]
    out["categories"] = {c: rate(g) for c, g in _by_category(items, l2=True).items()}
    return out


# --------------------------------------------------------------------------- the terminal table

def table(scores: dict) -> list[str]:
    """Lines of a plain table: the overall figures, then one line per category or split."""
    lines = []
    head = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines.append("  " + " · ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in head.items()))
    for key in ("categories", "splits"):
        rows = scores.get(key) or {}
        if not rows:
            continue
        cols = list(next(iter(rows.values())))
        width = max(len(str(c)) for c in rows) + 2
        lines.append(f"  {key[:-1] if key == 'splits' else 'category':<{width}}" + "".join(f"{c:>11}" for c in cols))
        for name, figures in rows.items():
            lines.append(f"  {name:<{width}}" + "".join(
                f"{figures.get(c, float('nan')):>11.2f}" if isinstance(figures.get(c), float) else f"{figures.get(c, ''):>11}"
                for c in cols))
    return lines
