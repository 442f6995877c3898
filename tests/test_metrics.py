"""Metrics against hand-worked values: the official VQA v2 accuracy (utils/vqa_eval.py) and
coco-caption's BLEU-4 / CIDEr-D (utils/caption_metrics.py). Pure Python, no network."""

from __future__ import annotations

import json
import math

import pytest

from utils.caption_metrics import bleu4, cider_d, score_captions, tokenize
from utils.vqa_eval import evaluate, main, normalize_answer, vqa_accuracy

# ---------------------------------------------------------------------------------------------
# VQA: normalisation, one rule per case


@pytest.mark.parametrize("raw, expected", [
    # punctuation touching a space is deleted ...
    ("yes, it is", "yes it is"),
    # ... punctuation touching no space separates words (becomes a space)
    ("black/white", "black white"),
    ("red,blue", "red blue"),
    ("yes!", "yes"),
    # a comma between digits: every listed mark is deleted, so the number stays whole
    ("1,000", "1000"),
    ("1,000 people", "1000 people"),
    # a period is dropped unless a digit follows it
    ("2.5", "2.5"),
    ("yes.", "yes"),
    ("mr. smith", "mr smith"),
    # ":" and "'" are not in the reference's list: they survive
    ("10:30", "10:30"),
    ("don't", "don't"),
    # number words zero..ten (and "none") become digits; others stay words
    ("Two", "2"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    # articles are dropped as whole words only
    ("a dog", "dog"),
    ("The red ball", "red ball"),
    ("an apple", "apple"),
    ("banana", "banana"),
    # apostrophe-less contractions are restored
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("thats right", "that's right"),
    # case and whitespace
    ("YES", "yes"),
    ("  yes\n", "yes"),
    ("red\tball", "red ball"),
    ("red   ball", "red ball"),
    # the newline becomes a space *before* the punctuation step, so "-" now touches a space
    # and is deleted everywhere (not turned into a space): "redblue green", as the reference
    ("red-blue\n-green", "redblue green"),
])
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_rules_compose():
    # "The" dropped, "Two" -> 2, "!" deleted (touches a space), trailing "." dropped.
    assert normalize_answer("The Two dogs ! .") == "2 dogs"


# ---------------------------------------------------------------------------------------------
# VQA: leave-one-out averaging


@pytest.mark.parametrize("k, expected", [
    # k of the 10 answers match. Leaving out a matching answer leaves k-1 matches, leaving
    # out another leaves k; acc = (k * min(1,(k-1)/3) + (10-k) * min(1,k/3)) / 10.
    (0, 0.0),   # nothing matches
    (1, 0.3),   # (1*0   + 9*1/3) / 10 = 3/10
    (2, 0.6),   # (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),   # (3*2/3 + 7*1)   / 10 = (2 + 7) / 10
    (4, 1.0),   # (4*1   + 6*1)   / 10: three others always remain
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(k, expected):
    answers = ["cat"] * k + ["dog", "bird", "fish", "cow", "pig", "hen", "owl", "rat", "elk", "ant"][: 10 - k]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_only():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    # The human answers get no digit/article step: a raw "two" in the annotations never
    # matches a prediction (which becomes "2"), as in the reference.
    assert vqa_accuracy("two", ["two"] * 3 + ["3"] * 7) == 0.0


def test_vqa_accuracy_gt_punctuation_only_when_answers_differ():
    # All 10 identical: the reference leaves them untouched, "1,000" != "1000" -> 0.
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0
    # Not all identical: punctuation runs on them, all become "1000" -> 10 matches -> 1.0.
    assert vqa_accuracy("1,000", ["1,000"] * 9 + ["1000"]) == 1.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------------------------------------
# VQA: evaluate() on a tiny official-schema file


def _official(answer_type: str, qid: int, answers: list[str]) -> dict:
    return {
        "question_id": qid, "image_id": qid // 10, "question_type": "what", "answer_type": answer_type,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


ANNOTATIONS = {"annotations": [
    _official("yes/no", 10, ["yes"] * 10),
    _official("number", 11, ["2"] * 3 + ["3"] * 7),
    _official("other", 12, ["red"] * 10),
    _official("other", 13, ["red"] + ["blue"] * 9),
]}
PREDICTIONS = [
    {"question_id": 10, "answer": "Yes"},   # 10 matches -> 1.0
    {"question_id": 11, "answer": "two"},   # -> "2", 3 matches -> 0.9
    # 12 has no prediction -> 0.0
    {"question_id": 13, "answer": "red"},   # 1 match -> 0.3
    {"question_id": 99, "answer": "no"},    # not annotated: counted, ignored
]
# overall (1.0 + 0.9 + 0 + 0.3) / 4 = 0.55; yes/no 1.0; number 0.9; other (0 + 0.3) / 2 = 0.15
EXPECTED = {
    "overall": 55.0,
    "per_answer_type": {"yes/no": 100.0, "number": 90.0, "other": 15.0},
    "n_scored": 4,
    "n_missing_predictions": 1,
    "n_unknown_question_ids": 1,
}


def test_evaluate_official_schema():
    assert evaluate(ANNOTATIONS, PREDICTIONS) == EXPECTED


def test_evaluate_accepts_three_annotation_forms():
    plain_list = ANNOTATIONS["annotations"]
    converter_records = [  # our converter's val records: answers as strings
        {"question_id": a["question_id"], "answer_type": a["answer_type"],
         "answers": [x["answer"] for x in a["answers"]], "image": f"{a['image_id']}.jpg"}
        for a in plain_list
    ]
    assert evaluate(plain_list, PREDICTIONS) == EXPECTED
    assert evaluate(converter_records, PREDICTIONS) == EXPECTED


def test_evaluate_rounds_and_reports_absent_types():
    # 2 of 3 "other" questions fully right: 66.666...% -> 66.67 (2 decimals, as the reference
    # prints); the two answer types with no question are None, not a made-up 0.
    anns = [_official("other", i, ["cat"] * 10) for i in range(3)]
    preds = [{"question_id": 0, "answer": "cat"}, {"question_id": 1, "answer": "cat"},
             {"question_id": 2, "answer": "dog"}]
    out = evaluate(anns, preds)
    assert out["overall"] == 66.67
    assert out["per_answer_type"] == {"yes/no": None, "number": None, "other": 66.67}


def test_evaluate_duplicate_prediction_id():
    preds = PREDICTIONS + [{"question_id": 11, "answer": "3"}]
    with pytest.raises(ValueError, match="11"):
        evaluate(ANNOTATIONS, preds)


def test_evaluate_checks_question_ids():
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (10, 11, 12)]}
    with pytest.raises(ValueError, match="not in the questions file"):
        evaluate(ANNOTATIONS, PREDICTIONS, questions)
    questions["questions"].append({"question_id": 13, "image_id": 1, "question": "?"})
    assert evaluate(ANNOTATIONS, PREDICTIONS, questions) == EXPECTED


def test_cli_prints_and_writes(tmp_path, capsys):
    paths = {}
    for name, obj in [("q", {"questions": [{"question_id": q} for q in (10, 11, 12, 13)]}),
                      ("a", ANNOTATIONS), ("p", PREDICTIONS)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = tmp_path / "scores.json"
    main(["--questions", str(paths["q"]), "--annotations", str(paths["a"]),
          "--predictions", str(paths["p"]), "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == EXPECTED
    assert json.loads(out.read_text()) == EXPECTED


# ---------------------------------------------------------------------------------------------
# Captions: tokenisation


def test_tokenize_english():
    assert tokenize("A man, riding a Horse.") == ["a", "man", "riding", "a", "horse"]
    # PTB keeps inner hyphens and splits clitics off.
    assert tokenize("The dog's T-shirt isn't red!") == ["the", "dog", "'s", "t-shirt", "is", "n't", "red"]


def test_tokenize_chinese_characters():
    # One token per character, punctuation (，。) dropped, an ASCII run stays one lowercased word.
    assert tokenize("一只黑猫，坐在T恤上。") == ["一", "只", "黑", "猫", "坐", "在", "t", "恤", "上"]
    assert tokenize("我有2个iPhone") == ["我", "有", "2", "个", "iphone"]


# ---------------------------------------------------------------------------------------------
# Captions: BLEU-4


def test_bleu4_identical_is_one():
    refs = {"1": ["a red circle on the left", "a red ring"], "2": ["a blue square at the top"]}
    hyps = {"1": "a red circle on the left", "2": "A blue square at the top."}
    assert bleu4(refs, hyps) == pytest.approx(1.0, abs=1e-6)


def test_bleu4_hand_worked():
    # hyp: the cat sat on the mat      ref: the cat sat on a mat     (6 tokens each, BP = 1)
    # 1-grams: the(min(2,1)=1) cat sat on mat -> 5/6
    # 2-grams: the cat, cat sat, sat on | on the, the mat -> 3/5
    # 3-grams: the cat sat, cat sat on | sat on the, on the mat -> 2/4
    # 4-grams: the cat sat on | cat sat on the, sat on the mat -> 1/3
    # BLEU-4 = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.537285...
    score = bleu4({"x": ["the cat sat on a mat"]}, {"x": "the cat sat on the mat"})
    assert score == pytest.approx((1 / 12) ** 0.25, rel=1e-6)


def test_bleu4_brevity_penalty_closest_reference():
    # Every hypothesis n-gram matches (precisions 4/4, 3/3, 2/2, 1/1), but the hypothesis has
    # 4 tokens and the closest reference 6 (the other has 8): BP = exp(1 - 6/4) = exp(-0.5).
    refs = {"x": ["the cat sat on the mat", "the cat sat on a red mat today"]}
    assert bleu4(refs, {"x": "the cat sat on"}) == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_bleu4_closest_tie_takes_shorter_reference():
    # 5-token hypothesis, references of 4 and 6 tokens: a tie, coco-caption takes 4, so no
    # penalty. Taking 6 would multiply by exp(1 - 6/5) = 0.82.
    # Precisions vs "the cat sat on": 4/5, 3/4, 2/3, 1/2 -> (1/5) ** (1/4).
    refs = {"x": ["the cat sat on", "the cat sat on a mat"]}
    assert bleu4(refs, {"x": "the cat sat on it"}) == pytest.approx(0.2 ** 0.25, rel=1e-6)


def test_bleu4_chinese_uses_characters():
    # 一只红色的猫 vs 一只红色的狗: 6 characters each; precisions 5/6, 4/5, 3/4, 2/3 -> (1/3) ** (1/4).
    # Without character tokens each caption would be one word and score ~0.
    assert bleu4({"x": ["一只红色的狗"]}, {"x": "一只红色的猫。"}) == pytest.approx((1 / 3) ** 0.25, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Captions: CIDEr-D

SHAPES = {
    "1": ["a red circle on the left", "a small red circle at the left"],
    "2": ["a blue square at the top", "a blue box on the top"],
    "3": ["a green triangle in the middle", "a green triangle at the centre"],
}


def test_cider_identical_beats_wrong_caption():
    right = {k: v[0] for k, v in SHAPES.items()}
    wrong = dict(right, **{"1": SHAPES["2"][0]})
    good, bad = cider_d(SHAPES, right), cider_d(SHAPES, wrong)
    assert good > 1.0
    assert bad < good - 0.5


def test_cider_hand_worked_with_clipping_and_length_penalty():
    # Two images, one reference each: N = 2, every reference n-gram has df 1, so every n-gram
    # (seen or unseen: df floored at 1) weighs w = tf * (log 2 - log 1) = tf * log 2.
    refs = {"1": ["red circle"], "2": ["blue square"]}
    # Image 2 exact: 1-grams and 2-grams cosine 1; no 3/4-grams (zero norm -> 0).
    # Score = 10 * (1 + 1 + 0 + 0) / 4 = 5.0. Image 1 exact too -> corpus 5.0.
    assert cider_d(refs, {"1": "red circle", "2": "blue square"}) == pytest.approx(5.0)
    # Document frequency counts images, not captions: image 1 with the same reference twice
    # still gives "red" df 1 (weight log 2, score 10 * (2 + 2) / 4 / 2 refs = 5.0). Counting
    # captions would give df 2, weight log 2 - log 2 = 0, and image 1 would score 0.
    twice = {"1": ["red circle", "red circle"], "2": ["blue square"]}
    assert cider_d(twice, {"1": "red circle", "2": "blue square"}) == pytest.approx(5.0)
    # IDF = log(N / df): a word in every image's references ("red", df 2 of N 2) weighs 0, so
    # "red square" for a red circle shares nothing that counts -> image 1 scores 0, image 2
    # (exact) 5.0 -> corpus 2.5.
    shared = {"1": ["red circle"], "2": ["red square"]}
    assert cider_d(shared, {"1": "red square", "2": "red square"}) == pytest.approx(2.5)
    # Image 1 "red circle circle":
    #   1-grams hyp (red w, circle 2w) vs ref (red w, circle w): clipping min(2w, w) ->
    #     (w*w + w*w) / (sqrt(5) w * sqrt(2) w) = 2 / sqrt(10)    [unclipped: 3 / sqrt(10)]
    #   2-grams hyp (red circle w, circle circle w) vs ref (red circle w): 1 / sqrt(2)
    #   3-grams: the reference has none -> 0; 4-grams: none.
    #   Length counted in bigrams: 2 vs 1 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    s1 = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)  # 3.3027...
    assert cider_d(refs, {"1": "red circle circle", "2": "blue square"}) == pytest.approx((s1 + 5.0) / 2, rel=1e-9)


def test_cider_length_penalty_lowers_padded_caption():
    # Padding with words unseen in the references only adds hypothesis weight (lower cosine)
    # and length (Gaussian penalty): the score must drop monotonically.
    hyps = [{**{k: v[0] for k, v in SHAPES.items()}, "1": SHAPES["1"][0] + " xyz" * n} for n in (0, 3, 12)]
    scores = [cider_d(SHAPES, h) for h in hyps]
    assert scores[0] > scores[1] > scores[2]


def test_cider_chinese_characters():
    refs = {"1": ["一只红色的圆在左边"], "2": ["一个蓝色的方块在上面"], "3": ["绿色三角形在中间"]}
    right = {k: v[0] for k, v in refs.items()}
    near = dict(right, **{"1": "一只红色的圆在右边"})  # one character differs
    assert cider_d(refs, right) > cider_d(refs, near) > 0.0


def test_score_captions_keys_and_subset():
    hyps = {"1": SHAPES["1"][0], "2": SHAPES["2"][0]}
    out = score_captions(SHAPES, hyps)
    assert set(out) == {"bleu4", "cider_d", "n"} and out["n"] == 2
    assert out["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # IDF comes from the references of the scored images only (as COCOEvalCap restricts to
    # the result's image ids): scoring 2 of 3 images equals scoring a 2-image reference set.
    assert out["cider_d"] == pytest.approx(cider_d({k: SHAPES[k] for k in hyps}, hyps))
    with pytest.raises(ValueError, match="no references"):
        score_captions(SHAPES, {"4": "a cat"})
