"""VQA v2 accuracy, reimplemented from the official evaluator (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py) so that our numbers are comparable with
published ones.

The metric in plain words
-------------------------
Every VQA v2 question has 10 answers written by 10 different people. A predicted answer is
"fully right" when at least 3 of them gave it; with fewer it earns a third per person.
To smooth over which 10 people happened to be asked, the official code repeats this with
each of the 10 answers left out in turn and averages:

    acc(question) = mean over i in 1..10 of  min(1, #{j != i : answer_j == prediction} / 3)

So with k matching human answers the score is 0.3 (k=1), 0.6 (k=2), 0.9 (k=3), 1.0 (k>=4).
The dataset score is the mean over questions, reported as a percentage with 2 decimals,
overall and per answer type ("yes/no", "number", "other").

Before comparing, the prediction is normalised the way the official code does it
(`normalize_answer`): newlines/tabs become spaces; punctuation is removed (or turned into a
space when it touches no space, so "black/white" -> "black white"); a comma between digits
is dropped ("1,000" -> "1000"); a period is dropped unless a digit follows ("2.5" stays);
then lowercase, number words zero..ten -> digits, articles a/an/the dropped, and
apostrophe-less contractions restored ("dont" -> "don't").

The human answers are NOT normalised like the prediction: the official annotation files
already hold normalised answers, and the reference only runs its punctuation step over them,
and only when the 10 answers are not all identical. We replicate that exactly.

Deliberate deviations from the reference (all about bookkeeping, none change a score on a
complete, well-formed submission):
- a missing prediction scores 0 for its question and is counted (the reference asserts that
  the results cover exactly the annotated questions and stops);
- predictions for question ids not in the annotations are counted and ignored (reference:
  same assertion); duplicate prediction ids raise ValueError (reference: the last one wins);
- "leave one out" removes the i-th answer by position; the reference removes every answer
  dict equal to it, which is the same thing for official data (each has a unique answer_id);
- question ids given as digit strings are compared as integers.

CLI (prints the scores as JSON):
    python -m utils.vqa_eval --questions Q.json --annotations A.json --predictions P.json --out scores.json
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Iterable

from utils.atomic import atomic_write
from utils.config import Parser

# The tables below are the reference's, entry for entry (including keys such as "Im" that can
# never match after lowercasing): changing one changes the metric.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# "none" -> "0" is in the reference too: "how many ...? none" must match "0".
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Neither ":" nor "'" is in the list (older versions of the reference had both): "don't" and
# "10:30" survive as written.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Written as in the reference: "(?!<=\d)" is a (harmless) typo for a lookbehind, so in effect
# this drops every period that is not followed by a digit ("2.5" stays, "yes." -> "yes").
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The reference passes re.UNICODE (== 32) as the positional `count` of sub(), so at most the
# first 32 such periods go. Kept for fidelity; no real answer has that many.
_PERIOD_COUNT = int(re.UNICODE)

ANSWER_TYPES = ("yes/no", "number", "other")


def _process_punctuation(text: str) -> str:
    out = text
    # Decided per mark on the *input*: a mark touching a space (or any text holding a
    # digit,digit comma) is deleted; otherwise it separates words, so it becomes a space.
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    # Contractions are looked up after the article filter, as in the reference.
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official normalisation applied to a predicted answer (see the module docstring)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official per-question accuracy in [0, 1] of `prediction` against the human `answers`
    (normally 10): leave-one-out average of min(1, matches among the others / 3).

    The prediction is normalised with `normalize_answer`; the human answers only get the
    punctuation step, and only when they are not all identical (as in the reference)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [_process_punctuation(a) for a in gts]
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leaving answer i out removes one match exactly when answer i itself matched.
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------------------------
# Whole-dataset evaluation


def _qid(value: Any) -> Any:
    # Official files use ints; a results file written by hand or by another tool may use "123".
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _records(obj: Any, key: str) -> list[dict]:
    """The list inside an official JSON dict (`obj[key]`), or `obj` itself when it is a list."""
    if isinstance(obj, dict):
        if key not in obj:
            raise ValueError(f"expected a list or a dict with key {key!r}, got keys {sorted(obj)[:8]}")
        obj = obj[key]
    if not isinstance(obj, list):
        raise ValueError(f"expected a list of {key}, got {type(obj).__name__}")
    return obj


def _gold(annotations: Any) -> dict[Any, tuple[str, list[str]]]:
    """question_id -> (answer_type, human answers as strings), from any accepted form."""
    gold: dict[Any, tuple[str, list[str]]] = {}
    for rec in _records(annotations, "annotations"):
        try:
            qid, answer_type, answers = _qid(rec["question_id"]), rec["answer_type"], rec["answers"]
        except KeyError as e:
            raise ValueError(f"annotation record lacks {e.args[0]!r}: {str(rec)[:200]}") from None
        # Official records hold dicts {answer, answer_confidence, answer_id}; our converter's
        # val records hold the answer strings themselves.
        texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"question_id {qid}: answers must be non-empty strings, got {answers!r}")
        if qid in gold:
            raise ValueError(f"duplicate question_id {qid} in annotations")
        gold[qid] = (answer_type, texts)
    if not gold:
        raise ValueError("no annotations to score")
    return gold


def _pct(values: list[float]) -> float:
    # As the reference prints: a percentage rounded to 2 decimals.
    return round(100.0 * sum(values) / len(values), 2)


def evaluate(annotations: Any, predictions: Iterable[dict], questions: Any | None = None) -> dict:
    """Score `predictions` against `annotations` with the official VQA v2 accuracy.

    annotations: the official annotations JSON dict (key "annotations"), a plain list of such
        annotation dicts, or a list of records with `question_id`, `answer_type` and `answers`
        as a list of strings (our converter's val records). Every annotated question is scored.
    predictions: official results format, `[{"question_id": int, "answer": str}, ...]`.
    questions: optional official questions JSON (dict with "questions", or a list); only
        used to check that every annotated question id is in it (files from different splits
        raise ValueError).

    A question without a prediction scores 0 (so a partial run is not flattered) and is
    counted in `n_missing_predictions`; predictions for ids not in the annotations are counted
    in `n_unknown_question_ids` and ignored; a duplicated prediction id raises ValueError.

    Returns {"overall", "per_answer_type": {"yes/no", "number", "other", ...}, "n_scored",
    "n_missing_predictions", "n_unknown_question_ids"}: accuracies in percent (0-100, 2
    decimals); an answer type with no question in the annotations is None. `n_scored` is the
    number of annotated questions in the average, missing ones included.
    """
    gold = _gold(annotations)

    if questions is not None:
        known = {_qid(q["question_id"]) for q in _records(questions, "questions")}
        stray = [qid for qid in gold if qid not in known]
        if stray:
            raise ValueError(f"{len(stray)} annotated question ids are not in the questions file "
                             f"(e.g. {stray[:5]}): annotations and questions from different splits?")

    answers: dict[Any, str] = {}
    n_unknown = 0
    for rec in predictions:
        qid = _qid(rec["question_id"])
        if qid in answers:
            raise ValueError(f"duplicate prediction for question_id {qid}")
        answers[qid] = str(rec["answer"])
        if qid not in gold:
            n_unknown += 1

    per_question: list[float] = []
    by_type: dict[str, list[float]] = {}
    n_missing = 0
    for qid, (answer_type, human) in gold.items():
        if qid in answers:
            acc = vqa_accuracy(answers[qid], human)
        else:
            acc = 0.0
            n_missing += 1
        per_question.append(acc)
        by_type.setdefault(answer_type, []).append(acc)

    per_type: dict[str, float | None] = {t: None for t in ANSWER_TYPES}
    per_type.update({t: _pct(v) for t, v in by_type.items()})
    return {
        "overall": _pct(per_question),
        "per_answer_type": per_type,
        "n_scored": len(per_question),
        "n_missing_predictions": n_missing,
        "n_unknown_question_ids": n_unknown,
    }


# ---------------------------------------------------------------------------------------------
# CLI


def _load(path: str) -> Any:
    """A JSON file, or JSON Lines (one record per line) when the file is not one JSON value."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict:
    """Command line entry point; prints the scores as JSON and returns them."""
    ap = Parser(description=__doc__)
    ap.add_argument("--questions", default=None,
                    help="official questions JSON (optional; only used to check question ids)")
    ap.add_argument("--annotations", required=True,
                    help="official annotations JSON, or our converter's val records (JSON or JSONL)")
    ap.add_argument("--predictions", required=True,
                    help='results JSON: [{"question_id": int, "answer": str}, ...]')
    ap.add_argument("--out", default=None, help="also write the scores JSON here")
    args = ap.parse_args(argv)

    questions = _load(args.questions) if args.questions else None
    scores = evaluate(_load(args.annotations), _load(args.predictions), questions)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text + "\n")
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
