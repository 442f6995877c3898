r"""Prepare SA1B-Dense-Caption once: download every image, decode, shrink, store locally.

The course fetches each image from its URL inside the training loop, on every epoch, and
decodes a full-size SA-1B photo (~1500x2250) to feed a 224-pixel tower. This script does that
work once: parallel downloads (retries with backoff, timeout, byte cap, content check), JPEG
draft-mode decoding, resize to a short side, atomic writes, a ledger of every failure with its
reason, and an index in the SA1B schema so that training reads the prepared set unchanged:

    python scripts/prepare_sa1b.py --data_root data/SA1B-Dense-Caption --out data/sa1b_prepared \
        --max_samples 100000 --short_side 256 --workers 32
    python train_stage1.py --data_format sa1b --data_root data/sa1b_prepared ...

CPU check on the demo's data (local paths work as well as URLs):
    python scripts/prepare_sa1b.py --data_root data/toy/train --out data/toy_prepared --short_side 48

Re-running resumes: images already on disk are kept, recorded failures are not retried
unless --retry_failed. Output layout:
    OUT/images/ab/<sha1 of url>.jpg     the prepared images
    OUT/data/prepared-00000.parquet     index: url (relative path), cap_seg (original), source_url
    OUT/failures.jsonl                  one line per failed sample: source_url, reason, detail
    OUT/report.json                     counts, bytes per image, throughput
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from dataset import ImageLoader  # noqa: E402
from readers import sa1b_rows  # noqa: E402
from utils import console  # noqa: E402
from utils.atomic import atomic_path, atomic_write  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.skips import SampleError  # noqa: E402


def read_rows(data_root: str, max_samples: int = 0) -> tuple[list[tuple[str, str]], Counter]:
    """(url, original cap_seg as a string) of usable rows, selected exactly as training selects
    them (dataset.sa1b_rows), so `--max_samples 100000` is the course's subset."""
    rows, skipped = sa1b_rows(data_root, max_samples)
    return [(url, cap if isinstance(cap, str) else json.dumps(cap, ensure_ascii=False)) for url, cap, _ in rows], skipped


def image_relpath(url: str) -> str:
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()
    return os.path.join("images", digest[:2], f"{digest}.jpg")


def shrink(img: Image.Image, short_side: int) -> Image.Image:
    """Resize so the short side is `short_side` (never enlarge). Bicubic, like the towers."""
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    return img.resize((max(short_side, round(w * scale)), max(short_side, round(h * scale))), Image.BICUBIC)


def prepare_one(url: str, out: str, loader: ImageLoader, short_side: int, quality: int) -> tuple[str, str, int]:
    """Fetch, decode (draft), shrink and store one image. Returns (status, detail, bytes)."""
    rel = image_relpath(url)
    path = os.path.join(out, rel)
    if os.path.isfile(path):
        return "exists", rel, os.path.getsize(path)
    try:
        img = shrink(loader(url), short_side)  # URL or local path; draft-decoded to >= short_side
        with atomic_path(path) as tmp:  # a kill never leaves a half-written image under its name
            img.save(tmp, "JPEG", quality=quality)
        return "ok", rel, os.path.getsize(path)
    except SampleError as e:
        return e.reason, str(e)[:300], 0
    except Exception as e:  # noqa: BLE001 - one odd image must not end a 100k-image job
        return f"unexpected_{type(e).__name__}", str(e)[:300], 0


def read_ledger(path: str) -> dict[str, dict]:
    failed: dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    failed[entry["source_url"]] = entry
                except (ValueError, KeyError):
                    continue  # a line cut by a kill
    return failed


def write_index(out: str, done: list[tuple[str, str, str]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    path = os.path.join(out, "data", "prepared-00000.parquet")
    table = pa.table({"url": [d[0] for d in done], "cap_seg": [d[1] for d in done], "source_url": [d[2] for d in done]})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def prepare(data_root: str, out: str, max_samples: int = 0, short_side: int = 256, workers: int = 16,
            timeout: float = 10.0, retries: int = 3, max_bytes: int = 50 * 2**20, quality: int = 90,
            retry_failed: bool = False, backoff: float = 0.5, progress: bool = True) -> dict:
    """Prepare the images of `data_root`'s shards into `out`; returns the report."""
    t0 = time.time()
    rows, bad_rows = read_rows(data_root, max_samples)
    os.makedirs(out, exist_ok=True)
    ledger_path = os.path.join(out, "failures.jsonl")
    failed_before = {} if retry_failed else read_ledger(ledger_path)
    if retry_failed and os.path.isfile(ledger_path):
        os.replace(ledger_path, ledger_path + ".previous")
    loader = ImageLoader(root=data_root, timeout=timeout, retries=retries, max_bytes=max_bytes, draft=short_side,
                         backoff=backoff)
    todo = [url for url, _ in rows if url not in failed_before]
    todo = list(dict.fromkeys(todo))  # the same URL twice is fetched once
    status: dict[str, tuple[str, str, int]] = {}
    counts: Counter = Counter()
    with open(ledger_path, "a", encoding="utf-8") as ledger, ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda u: (u, prepare_one(u, out, loader, short_side, quality)), todo)
        bar = console.progress(len(todo), "prepare", "img", show=progress)   # in a log file: a line every 30 s
        for url, res in results:
            bar.update(1)
            status[url] = res
            counts[res[0] if res[0] in ("ok", "exists") else "failed"] += 1
            if res[0] not in ("ok", "exists"):
                ledger.write(json.dumps({"source_url": url, "reason": res[0], "detail": res[1]}, ensure_ascii=False) + "\n")
                ledger.flush()
        bar.close()
    done, failed = [], Counter()
    for url, cap in rows:
        if url in status and status[url][0] in ("ok", "exists"):
            done.append((status[url][1], cap, url))
        else:
            failed[status[url][0] if url in status else failed_before[url]["reason"]] += 1
    index = write_index(out, done)
    sizes = [status[u][2] for _, _, u in done]
    seconds = time.time() - t0
    report = {
        "data_root": data_root, "out": out, "index": index, "rows": len(rows), "prepared": len(done),
        "new_images": counts["ok"], "already_there": counts["exists"],
        "failed": dict(failed), "failed_earlier_not_retried": sum(1 for u, _ in rows if u in failed_before),
        "bad_rows": dict(bad_rows), "short_side": short_side,
        "bytes_per_image": round(sum(sizes) / max(1, len(sizes))), "seconds": round(seconds, 2),
        "images_per_s": round(len(todo) / max(seconds, 1e-9), 1),
    }
    atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=2, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--data_root", required=True, help="SA1B-Dense-Caption folder: {root}/data/*.parquet or *.parquet")
    p.add_argument("--out", required=True, help="output folder (images/, data/, failures.jsonl, report.json)")
    p.add_argument("--max_samples", type=int, default=0, help="first N usable rows (the course uses 100000); 0 = all")
    p.add_argument("--short_side", type=int, default=256, help="stored short side in pixels (>= the tower's input)")
    p.add_argument("--workers", type=int, default=16, help="download threads (I/O bound: more than CPU cores is fine)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=3, help="tries per URL (backoff 0.5 s, doubling)")
    p.add_argument("--max_bytes", type=int, default=50 * 2**20, help="refuse bodies above this many bytes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--retry_failed", action="store_true", help="try again the URLs the ledger lists as failed")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs, CI)")
    args = p.parse_args(argv)
    report = prepare(args.data_root, args.out, args.max_samples, args.short_side, args.workers, args.timeout,
                     args.retries, args.max_bytes, args.quality, args.retry_failed, progress=not args.no_progress)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"train with: python train_stage1.py --data_format sa1b --data_root {args.out}")
    return report


if __name__ == "__main__":
    main()
