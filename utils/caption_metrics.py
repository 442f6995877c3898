"""Caption metrics: corpus BLEU-4 and CIDEr-D, reimplemented to give the numbers of
pycocoevalcap (coco-caption) `Bleu(4)` and `Cider` without Java or the package itself.

Both compare each hypothesis caption with the reference captions of the same image, on
n-grams of 1..4 tokens:

- BLEU-4: clipped n-gram precision (a hypothesis n-gram counts at most as often as it occurs
  in the single reference where it is most frequent), pooled over the whole corpus, geometric
  mean over n=1..4, times a brevity penalty exp(1 - r/c) when the corpus hypothesis length c
  is below r, the sum over images of the reference length *closest* to each hypothesis
  (ties go to the shorter reference). 1.0 is a perfect match.
- CIDEr-D (what pycocoevalcap's `Cider` class actually computes): n-grams weighted by
  TF-IDF, where the document frequency counts the images of the evaluated set whose
  references contain the n-gram; for each reference, the cosine similarity of the
  hypothesis and reference vectors, with hypothesis weights clipped to the reference ones
  (repeating a good word does not pay) and multiplied by a Gaussian length penalty
  exp(-(l_hyp - l_ref)^2 / (2 * 6^2)); averaged over references and over n=1..4, times 10.
  The score is relative to the evaluated set (IDF comes from its references), so it is only
  comparable between runs on the same images (and is 0 for a single image: every IDF is
  log 1 = 0). Typical COCO values are 0.5-1.3; a caption identical to its only reference
  scores 10 when it has at least 4 tokens (5 with 2 tokens: it has no 3- or 4-grams).

Two reference details are kept on purpose: the "length" in the penalty is the number of
bigrams (tokens - 1, or 0 for an empty caption), and an n-gram order where the hypothesis or
the reference has no n-gram (a 2-token caption has no 3-grams) contributes 0 instead of a
division by zero (pycocoevalcap 1.2).

Tokenisation replaces coco-caption's Java PTBTokenizer (see `tokenize`); that is the one
place where numbers can differ slightly from the package on English text with clitics or
unusual punctuation.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

NGRAM_ORDER = 4
CIDER_SIGMA = 6.0  # std of the Gaussian length penalty, in tokens (pycocoevalcap's default)

_CJK = re.compile(
    "[\u3040-\u30ff"  # Japanese kana (written without spaces too)
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: extension A, unified, compatibility
    "\U00020000-\U0002ebef]"  # extensions B-F
)
# PTB splits English clitics off ("don't" -> "do n't", "dog's" -> "dog 's"); we do the same
# so that a hypothesis "dog's" shares the unigram "dog" with a reference "dog".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Inside Chinese text: a run of ASCII letters/digits is one word, anything else one character.
_ZH_TOKEN = re.compile(r"[a-z0-9]+|\S")
# English: a clitic, a word (with inner hyphens/apostrophes), or one other non-space character
# (punctuation, dropped afterwards, or a symbol such as "$", kept like PTB keeps it).
_EN_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-']\w+)*|[^\w\s]")


def _is_punct(ch: str) -> bool:
    # Unicode "P*" categories cover ASCII marks and Chinese ones (，。、！？「」) alike.
    return unicodedata.category(ch).startswith("P")


def tokenize(text: str) -> list[str]:
    """Tokens for BLEU/CIDEr.

    Text containing any CJK character: one token per character that is neither space nor
    punctuation, except that runs of ASCII letters/digits stay whole words ("T恤" -> t, 恤).
    Otherwise (PTB-like): lowercase, clitics split off as PTB does ("don't" -> do n't),
    punctuation tokens removed as coco-caption does after PTB (a hyphen or apostrophe inside
    a word is kept: "t-shirt"), symbols such as "$" kept, split on whitespace.
    Text is NFKC-normalised first so full-width letters and digits read as ASCII.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    if _CJK.search(text):
        return [t for t in _ZH_TOKEN.findall(text) if not _is_punct(t[0])]
    tokens = _EN_TOKEN.findall(_CLITIC.sub(r" \1", text))
    return [t for t in tokens if not all(_is_punct(c) for c in t)]


def _ngrams(tokens: list[str], n: int = NGRAM_ORDER) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


def _prepare(references: dict[str, list[str]], hypotheses: dict[str, str]
             ) -> list[tuple[list[str], list[list[str]]]]:
    """[(hypothesis tokens, [reference tokens, ...]), ...] over the hypothesis keys."""
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    extra = [k for k in hypotheses if k not in references]
    if extra:
        raise ValueError(f"{len(extra)} hypothesis keys have no references (e.g. {extra[:5]})")
    pairs = []
    for key in sorted(hypotheses, key=str):  # fixed order: float sums are then reproducible
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")
        pairs.append((tokenize(hypotheses[key]), [tokenize(r) for r in refs]))
    return pairs


def _bleu4(pairs: list[tuple[list[str], list[list[str]]]]) -> float:
    guess = [0] * NGRAM_ORDER    # hypothesis n-grams, per order, whole corpus
    correct = [0] * NGRAM_ORDER  # of which matched (clipped), per order
    hyp_len = ref_len = 0
    for hyp, refs in pairs:
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref)  # | keeps the max count per n-gram: the clipping ceiling
        for gram, count in _ngrams(hyp).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(NGRAM_ORDER):
            guess[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        # "closest" reference length; the tuple makes ties pick the shorter one, as coco-caption.
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    # coco-caption's smoothing constants: an order with no match gives ~0, not a ZeroDivisionError.
    tiny, small = 1e-15, 1e-9
    score = 1.0
    for k in range(NGRAM_ORDER):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1.0 / NGRAM_ORDER
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return float(score)


def _cider_d(pairs: list[tuple[list[str], list[list[str]]]]) -> float:
    hyp_counts = [_ngrams(hyp) for hyp, _ in pairs]
    ref_counts = [[_ngrams(r) for r in refs] for _, refs in pairs]
    # Document = one image's reference set; an n-gram counts once per image.
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_n_docs = math.log(float(len(pairs)))

    def vectorise(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(NGRAM_ORDER)]
        norm = [0.0] * NGRAM_ORDER
        length = 0
        for gram, tf in counts.items():
            # An n-gram unseen in the references gets df 1 (log 0 guarded), the highest IDF.
            w = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
            n = len(gram) - 1
            vec[n][gram] = w
            norm[n] += w * w
            if n == 1:  # the reference measures length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec_h, norm_h, len_h = vectorise(hyp)
        total = [0.0] * NGRAM_ORDER
        for ref in refs:
            vec_r, norm_r, len_r = vectorise(ref)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(NGRAM_ORDER):
                # min(): the "-D" clipping; a hypothesis cannot exceed the reference's weight.
                val = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
                if norm_h[n] != 0 and norm_r[n] != 0:
                    val /= norm_h[n] * norm_r[n]
                total[n] += val * penalty
        # Mean over n-gram orders, mean over references, x10 (CIDEr-D's scale).
        scores.append(sum(total) / NGRAM_ORDER / len(refs) * 10.0)
    return float(sum(scores) / len(scores))


def bleu4(references: dict[str, list[str]], hypotheses: dict[str, str]) -> float:
    """Corpus BLEU-4 in [0, 1] as coco-caption's Bleu(4) ("closest" reference length).

    references: image id -> reference captions; hypotheses: image id -> one caption, keys a
    subset of `references` (only those images are scored)."""
    return _bleu4(_prepare(references, hypotheses))


def cider_d(references: dict[str, list[str]], hypotheses: dict[str, str]) -> float:
    """Corpus CIDEr-D as pycocoevalcap's Cider (x10 scale); IDF from the references of the
    images in `hypotheses` (keys a subset of `references`)."""
    return _cider_d(_prepare(references, hypotheses))


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict:
    """{"bleu4": float, "cider_d": float, "n": images scored}; the keys of `hypotheses` must
    be a subset of those of `references` (ValueError otherwise)."""
    pairs = _prepare(references, hypotheses)
    return {"bleu4": _bleu4(pairs), "cider_d": _cider_d(pairs), "n": len(pairs)}
