"""Copy the first N samples of a dataset into a small folder you can open and look at.

Each kept sample becomes `00000.jpg` (RGB JPEG, from a local path or a URL) and `00000.txt`
(the SA1B caption; for a chat.json sample `Q: <question>` and `A: <first answer>`), plus one
`examples.jsonl` line saying where it came from. The folder feeds scripts/clip_eval.py and is
a quick look at what stage 1 trains on. Unreadable samples are skipped and counted. Only this
folder is written; earlier NNNNN.jpg/.txt files in it are replaced.

    python toy_world.py --size demo && python scripts/save_examples.py --data_root data/toy/train
    python scripts/save_examples.py --data_format sa1b --data_root data/sa1b --n 50
    python scripts/save_examples.py --data_format chat --chat_json data/vqav2/chat.json --out data_example_vqa
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import ImageLoader  # noqa: E402
from readers import Record, read_records  # noqa: E402
from prompts import IMAGE_PLACEHOLDER  # noqa: E402
from utils.atomic import atomic_path, atomic_write  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.skips import SampleError  # noqa: E402

OUR_FILES = re.compile(r"^\d{5}\.(jpg|txt)$")


def sample_text(rec: Record) -> str:
    """The caption, or `Q:`/`A:` lines for the first question and answer of a conversation."""
    if rec.caption is not None:
        return rec.caption.strip()
    convs = rec.conversations or []
    question = next((m["content"] for m in convs if m["role"] == "user"), "")
    answer = next((m["content"] for m in convs if m["role"] == "assistant"), "")
    # The <image> placeholder is a training device, not part of what was asked.
    question = " ".join(question.replace(IMAGE_PLACEHOLDER, " ").split())
    if not answer.strip():
        raise SampleError("empty_answer")
    return f"Q: {question}\nA: {answer.strip()}"


def save_examples(data_format: str, data_root: str = "", chat_json: str = "", out: str = "data_example",
                  n: int = 20, max_side: int = 1024, scan: int = 0, timeout: float = 10.0,
                  log=print) -> tuple[int, Counter]:
    """Write up to `n` good samples to `out`; returns (written, skip counts by reason).

    At most `scan` records are read (default 10*n): a folder of broken URLs ends instead of
    walking a 100k-row shard.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} exists and is not a folder")
    records, skipped, root = read_records(data_format, data_root, chat_json, max_samples=scan or 10 * n)
    skipped = Counter(skipped)
    loader = ImageLoader(root=root, timeout=timeout, retries=2)
    os.makedirs(out, exist_ok=True)
    # Replace an earlier run's samples so a smaller --n leaves no stale tail behind.
    for name in os.listdir(out):
        if OUR_FILES.match(name):
            os.remove(os.path.join(out, name))
    written, manifest = 0, []
    for rec in records:
        if written >= n:
            break
        try:
            text = sample_text(rec)
            img = loader(rec.image)                       # RGB, EXIF-rotated (dataset.to_rgb)
        except SampleError as e:
            skipped[e.reason] += 1
            continue
        except Exception as e:  # noqa: BLE001 - one odd sample must not end the copy; say what it was
            skipped[f"unexpected_{type(e).__name__}"] += 1
            continue
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side))           # keeps aspect; SA1B photos are ~1500x2250
        stem = os.path.join(out, f"{written:05d}")
        with atomic_path(stem + ".jpg") as tmp:
            img.save(tmp, "JPEG", quality=92)
        atomic_write(stem + ".txt", text + "\n")
        manifest.append({"id": f"{written:05d}", "source": rec.image, "text": text, **rec.meta})
        written += 1

    atomic_write(os.path.join(out, "examples.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in manifest))
    log(f"wrote {written} samples to {out}/ (asked for {n}); skipped {sum(skipped.values())}"
        + (f": {dict(sorted(skipped.items()))}" if skipped else ""))
    if written < n:
        log(f"! only {written} good samples in the first {len(records)} records read")
    return written, skipped


def main(argv: list[str] | None = None) -> tuple[int, Counter]:
    p = Parser(description=__doc__)
    p.add_argument("--data_format", default="sa1b", choices=["sa1b", "chat"], help="on-disk format")
    p.add_argument("--data_root", default="data/toy/train", help="dataset folder (sa1b: {root}/data/*.parquet)")
    p.add_argument("--chat_json", default="", help="chat.json path (chat format; default {data_root}/chat.json)")
    p.add_argument("--out", default="data_example", help="output folder (only it is written)")
    p.add_argument("--n", type=int, default=20, help="samples to save")
    p.add_argument("--max_side", type=int, default=1024, help="shrink larger images to this side (0 = keep)")
    p.add_argument("--scan", type=int, default=0, help="read at most this many records (0 = 10*n)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per image URL request")
    args = p.parse_args(argv)
    return save_examples(args.data_format, args.data_root, args.chat_json, args.out, args.n, args.max_side,
                         args.scan, args.timeout)


if __name__ == "__main__":
    main()
