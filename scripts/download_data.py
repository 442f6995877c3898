"""Download the training and evaluation data, one command per dataset; re-running resumes.

SA1B-Dense-Caption (the course's stage-1 data) comes from ModelScope's dataset hub, shard by
shard: the course trains on the first 10 parquet shards and evaluates on the 11th.

    python scripts/download_data.py sa1b --shards 0-9 --out data/sa1b_train
    python scripts/download_data.py sa1b --shards 10 --out data/sa1b_eval

VQA v2 (the align plan's conversion, and VQA scoring) comes from its official servers: the
questions and annotations of train and val, and the COCO 2014 images they refer to (train2014
is 13 GB, val2014 6 GB; --no_images skips them).

    python scripts/download_data.py vqav2 --out data/vqav2
    python scripts/download_data.py vqav2 --out data/vqav2 --splits val

CogVLM-SFT-311K (the course's stage-2 data: Chinese and English single- and multi-turn dialogues
about ~130k images) comes from ModelScope (ZhipuAI/CogVLM-SFT-311K; on the HF hub
THUDM/CogVLM-SFT-311K); zip archives in it are extracted in place.

    python scripts/download_data.py cogvlm_sft --out data/CogVLM-SFT-311K

Benchmarks in VLMEvalKit's TSV layout (images inside, base64) come from where VLMEvalKit publishes
them (its vlmeval/dataset/image_mcq.py and image_yorn.py list the URLs and MD5s used here); the
MD5 is checked, and a file that does not match is set aside and refused.

    python scripts/download_data.py bench MMBench_DEV_CN --out data/bench
    python scripts/download_data.py bench MMBench_DEV_EN,MME,POPE --out data/bench

SA1B's parquet rows hold image URLs and captions, not images: prepare the images once with
scripts/prepare_sa1b.py (the command is printed at the end). Every shard is checked after the
download (a parquet footer that cannot be read is deleted, and the next run fetches it again);
archives are downloaded with HTTP range requests into OUT/downloads/*.part, so an interrupted
download continues where it stopped, and extracted through a temporary folder, so a crash
never leaves a half-extracted folder that looks complete.
"""

from __future__ import annotations

import fnmatch
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import console  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.fetch import file_md5  # noqa: E402

SA1B_DATASET = "Tongyi-DataEngine/SA1B-Dense-Caption"   # https://modelscope.cn/datasets/Tongyi-DataEngine/SA1B-Dense-Caption
SA1B_SHARD = "data/train-{:04d}-*.parquet"              # data/train-0000-of-0724-<hash>.parquet ...

VQA_BASE = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"   # visualqa.org's download links point here
COCO_BASE = "http://images.cocodataset.org/zips"
VQA_FILES = {  # split -> [(url, what the archive holds)]
    "train": [(f"{VQA_BASE}/v2_Questions_Train_mscoco.zip", "v2_OpenEnded_mscoco_train2014_questions.json"),
              (f"{VQA_BASE}/v2_Annotations_Train_mscoco.zip", "v2_mscoco_train2014_annotations.json")],
    "val": [(f"{VQA_BASE}/v2_Questions_Val_mscoco.zip", "v2_OpenEnded_mscoco_val2014_questions.json"),
            (f"{VQA_BASE}/v2_Annotations_Val_mscoco.zip", "v2_mscoco_val2014_annotations.json")],
}
COGVLM_DATASET = "ZhipuAI/CogVLM-SFT-311K"   # https://modelscope.cn/datasets/ZhipuAI/CogVLM-SFT-311K
VLMEVAL = "https://opencompass.openxlab.space/utils"
BENCH_FILES = {   # name -> (url, md5), as VLMEvalKit's DATASET_URL / DATASET_MD5 list them (commit e8e78f0)
    "MMBench_DEV_EN": (f"{VLMEVAL}/benchmarks/MMBench/MMBench_DEV_EN.tsv", "b6caf1133a01c6bb705cf753bb527ed8"),
    "MMBench_DEV_CN": (f"{VLMEVAL}/benchmarks/MMBench/MMBench_DEV_CN.tsv", "08b8fc3324a5ed74155350f57be69fbd"),
    "MMBench_DEV_EN_V11": (f"{VLMEVAL}/benchmarks/MMBench/MMBench_DEV_EN_V11.tsv", "30c05be8f2f347a50be25aa067248184"),
    "MMBench_DEV_CN_V11": (f"{VLMEVAL}/benchmarks/MMBench/MMBench_DEV_CN_V11.tsv", "593f9b5f6bea453d870a798b34ae4f37"),
    "CCBench": (f"{VLMEVAL}/VLMEval/CCBench.tsv", "f5dde47f24dc5a6fb6e595b409b466ac"),
    "MMStar": (f"{VLMEVAL}/VLMEval/MMStar.tsv", "e1ecd2140806c1b1bbf54b43372efb9e"),
    "SEEDBench_IMG": (f"{VLMEVAL}/benchmarks/SEEDBench/SEEDBench_IMG.tsv", "68017231464752261a2526d6ca3a10c0"),
    "AI2D_TEST": (f"{VLMEVAL}/VLMEval/AI2D_TEST.tsv", "0f593e0d1c7df9a3d69bf1f947e71975"),
    "MME": (f"{VLMEVAL}/VLMEval/MME.tsv", "b36b43c3f09801f5d368627fb92187c3"),
    "POPE": (f"{VLMEVAL}/VLMEval/POPE.tsv", "c12f5acb142f2ef1f85a26ba2fbe41d5"),
    "HallusionBench": (f"{VLMEVAL}/VLMEval/HallusionBench.tsv", "0c23ac0dc9ef46832d7a24504f2a0c7c"),
}
COCO_IMAGES = {"train": (f"{COCO_BASE}/train2014.zip", "train2014"), "val": (f"{COCO_BASE}/val2014.zip", "val2014")}


# --------------------------------------------------------------------------- SA1B from ModelScope

def parse_shards(text: str) -> list[int]:
    """'0-9' -> [0..9]; '10' -> [10]; '0-3,7' -> [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()) or (b and int(b) < int(a)):
            raise SystemExit(f"--shards {text!r}: use N, A-B or a comma list of them (0-9 is the course's training set)")
        out += list(range(int(a), int(b or a) + 1))
    return sorted(set(out))


def modelscope_dataset_download(dataset_id: str, local_dir: str, patterns: list[str]) -> None:
    """ModelScope's dataset snapshot API (skips files already complete in local_dir)."""
    try:
        from modelscope.hub.snapshot_download import dataset_snapshot_download
    except ImportError:
        raise SystemExit(f"{dataset_id} comes from ModelScope: pip install modelscope") from None
    dataset_snapshot_download(dataset_id, local_dir=local_dir, allow_file_pattern=patterns)


def shard_files(out: str, shard: int) -> list[str]:
    folder = os.path.join(out, "data")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if fnmatch.fnmatch(f"data/{n}", SA1B_SHARD.format(shard)))


def readable_parquet(path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).metadata  # the footer: a truncated download has none
        return True
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        return False


def download_sa1b(shards: list[int], out: str) -> dict:
    """Fetch the shards still missing, check every one, report what is there."""
    todo = [s for s in shards if not any(readable_parquet(f) for f in shard_files(out, s))]
    if todo:
        console.info(f"SA1B-Dense-Caption: downloading shard(s) {todo} from ModelScope ({SA1B_DATASET}) -> {out}")
        modelscope_dataset_download(SA1B_DATASET, out, [SA1B_SHARD.format(s) for s in todo])
    else:
        console.info(f"SA1B-Dense-Caption: shard(s) {shards} already in {out}")
    present, missing = [], []
    for s in shards:
        files = shard_files(out, s)
        bad = [f for f in files if not readable_parquet(f)]
        for f in bad:
            os.remove(f)  # damaged: fetched again next time
        (present if files and not bad else missing).append(s)
    if missing:
        raise SystemExit(f"shard(s) {missing} missing or damaged after the download; run the same command again")
    return {"dataset": SA1B_DATASET, "out": out, "shards": present}


# --------------------------------------------------------------------------- CogVLM-SFT-311K from ModelScope

def cogvlm_subsets(out: str) -> list[str]:
    """Subset folders (anywhere below `out`) that hold images/ and labels_zh/."""
    return sorted(root for root, dirs, _ in os.walk(out) if "images" in dirs and "labels_zh" in dirs)


def download_cogvlm_sft(out: str) -> dict:
    """Fetch the dataset (ModelScope resumes partial files), extract any zip archives in it, and
    check that the course's layout is there: <subset>/images + <subset>/labels_zh."""
    if not cogvlm_subsets(out):
        console.info(f"CogVLM-SFT-311K: downloading from ModelScope ({COGVLM_DATASET}) -> {out}")
        modelscope_dataset_download(COGVLM_DATASET, out, ["*"])
        os.makedirs(out, exist_ok=True)
        for archive in sorted(f for f in os.listdir(out) if f.endswith(".zip")):
            stem = archive[:-4]
            console.info(f"extracting {archive}")
            extract(os.path.join(out, archive), out, stem)
    subsets = cogvlm_subsets(out)
    if not subsets:
        raise SystemExit(f"{out}: no <subset>/images + <subset>/labels_zh folders after the download; found "
                         f"{sorted(os.listdir(out))[:10]} (run the same command again to resume)")
    root = os.path.commonpath([os.path.dirname(s) for s in subsets])
    return {"dataset": COGVLM_DATASET, "out": out, "data_root": root,
            "subsets": [os.path.relpath(s, root) for s in subsets]}


# --------------------------------------------------------------------------- VQA v2 over HTTP

def fetch(url: str, dest: str, retries: int = 5, chunk: int = 1 << 20) -> str:
    """Download url -> dest, resuming a previous DEST.part with an HTTP range request; the
    file appears under its name only when complete."""
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        req = urllib.request.Request(url, headers={"User-Agent": "llava-stage1/1.0",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                if have and resp.status != 206:
                    have = 0  # the server ignored the range: start over
                total = have + int(resp.headers.get("Content-Length", 0))
                with open(part, "ab" if have else "wb") as fh:
                    while block := resp.read(chunk):
                        fh.write(block)
            if total and os.path.getsize(part) < total:
                raise urllib.error.URLError(f"connection closed at {os.path.getsize(part)} of {total} bytes")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:   # the part is already whole
                os.replace(part, dest)
                return dest
            if 400 <= e.code < 500:
                raise SystemExit(f"{url}: HTTP {e.code}") from None
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # incl. a cut connection
            reason = str(getattr(e, "reason", e)) or type(e).__name__
        console.warn(f"{os.path.basename(dest)}: {reason}; retrying ({attempt + 1}/{retries}), "
                     f"{os.path.getsize(part) if os.path.isfile(part) else 0:,} bytes kept")
        time.sleep(min(2 ** attempt, 30))
    raise SystemExit(f"{url}: gave up after {retries} tries; run the same command again to continue")


def extract(archive: str, out: str, expect: str) -> str:
    """Unzip `archive` so that OUT/expect appears complete or not at all."""
    target = os.path.join(out, expect)
    if os.path.exists(target):
        return target
    tmp = os.path.join(out, f".extract-{os.path.basename(archive)}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            resolved = os.path.realpath(os.path.join(tmp, name))
            if not resolved.startswith(os.path.realpath(tmp) + os.sep):
                raise SystemExit(f"{archive}: refusing an entry outside the archive folder: {name}")
        zf.extractall(tmp)
    found = next((os.path.join(root, expect) for root, dirs, files in os.walk(tmp)
                  if expect in files or expect in dirs), None)
    if found is None:
        raise SystemExit(f"{archive}: no {expect} inside")
    os.replace(found, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_vqav2(out: str, splits: list[str], images: bool) -> dict:
    got: dict = {"out": out}
    downloads = os.path.join(out, "downloads")
    for split in splits:
        wanted = VQA_FILES[split] + ([COCO_IMAGES[split]] if images else [])
        for url, expect in wanted:
            if os.path.exists(os.path.join(out, expect)):
                console.info(f"{expect}: already in {out}")
            else:
                console.info(f"{expect}: downloading {url}")
                extract(fetch(url, os.path.join(downloads, os.path.basename(url))), out, expect)
            got[expect] = os.path.join(out, expect)
    return got


def download_bench(names: list[str], out: str, files: dict | None = None) -> dict:
    """Each benchmark TSV to OUT/<name>.tsv (resumable), kept only when its MD5 matches."""
    files = files or BENCH_FILES
    got = {}
    for name in names:
        url, md5 = files[name]
        dest = os.path.join(out, f"{name}.tsv")
        if not (os.path.isfile(dest) and file_md5(dest) == md5):
            console.info(f"{name}: downloading {url}")
            fetch(url, dest)
            have = file_md5(dest)
            if have != md5:
                os.replace(dest, dest + ".bad")
                raise SystemExit(f"{name}: MD5 {have} is not VLMEvalKit's {md5}; the file is kept as {dest}.bad "
                                 f"(run again to download it afresh)")
        console.info(f"{name}: {dest} (MD5 {md5} checked)")
        got[name] = dest
    return got


def next_steps(dataset: str, out: str, splits: list[str], images: bool, got: dict | None = None) -> str:
    if dataset == "bench":
        return "\n".join(f"python eval_llava.py --checkpoint checkpoints/<run> --bench {p}" for p in (got or {}).values())
    if dataset == "cogvlm_sft":
        return (f"train stage 2 on it:\n  python train_stage2.py --stage1 checkpoints/<stage-1 run> "
                f"--data_root {(got or {}).get('data_root', out)}")
    if dataset == "sa1b":
        return (f"prepare the images once, then train:\n  python scripts/prepare_sa1b.py --data_root {out} "
                f"--out {out}_prepared --short_side 256\n  python train_stage1.py --model clip-zh-qwen3-0.6b "
                f"--data_root {out}_prepared ...")
    args = []
    for split in splits:
        args += [f"--questions-{split} {out}/v2_OpenEnded_mscoco_{split}2014_questions.json",
                 f"--annotations-{split} {out}/v2_mscoco_{split}2014_annotations.json",
                 f"--images-{split}-dir {out}/{split}2014"]
    note = "" if images else "\n(the COCO images are still needed: run again without --no_images)"
    return "convert to LLaVA's chat.json:\n  python convert_vqa.py " + " ".join(args) + \
        f" --dataset-root-dir {out}_align --link-images{note}"


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("dataset", choices=["sa1b", "vqav2", "cogvlm_sft", "bench"], help="what to download")
    p.add_argument("names", nargs="?", default="", help=f"bench: comma-separated names, from {', '.join(BENCH_FILES)}")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--shards", default="0-9", help="sa1b: parquet shards, e.g. 0-9 (the course's training set) or 10")
    p.add_argument("--splits", default="train,val", help="vqav2: comma-separated splits")
    p.add_argument("--no_images", action="store_true", help="vqav2: questions and annotations only, no COCO images")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.dataset == "sa1b":
        got = download_sa1b(parse_shards(args.shards), args.out)
    elif args.dataset == "cogvlm_sft":
        got = download_cogvlm_sft(args.out)
    elif args.dataset == "bench":
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCH_FILES]
        if unknown or not names:
            p.error(f"bench NAME: choose from {', '.join(BENCH_FILES)}" + (f" (not {', '.join(unknown)})" if unknown else ""))
        got = download_bench(names, args.out)
    else:
        unknown = set(splits) - set(VQA_FILES)
        if unknown or not splits:
            p.error(f"--splits: choose from {sorted(VQA_FILES)}")
        got = download_vqav2(args.out, splits, not args.no_images)
    console.success(f"{args.dataset} ready in {args.out}")
    console.info(next_steps(args.dataset, args.out, splits, not args.no_images, got))
    return got


if __name__ == "__main__":
    main()
