r"""Loader throughput: samples/s overall and per stage (read, decode, resize, tokenize).

Tells you whether the GPU will wait on data before you rent one. Per-stage figures are
measured on one process over the first --n samples; the overall figure runs the real
DataLoader with --num_workers workers, as training does.

    python scripts/dataset_test.py --data_root data/toy/train --llm models/toy/llm --vision_tower models/toy/vision
    python scripts/dataset_test.py --data_root data/sa1b_prepared --llm models/qwen3-0.6b \
        --vision_tower models/clip-vit-b16-zh --num_workers 8 --json data_speed.json
    python scripts/dataset_test.py ... --features_cache data/features    # the cached-feature path
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from backbones import (image_tokens, load_tokenizer, preprocessing, resolve_model, vision_arch,  # noqa: E402
                       vision_defaults)
from dataset import ImageLoader, ImageTransform, LlavaDataset, collate, decode_image  # noqa: E402
from readers import read_records  # noqa: E402
from prompts import CHAT_TEMPLATE_KWARGS, IMAGE_TOKEN, INSTRUCTION_POOLS, PromptFormat, encode_conversation  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.feature_cache import FeatureCache  # noqa: E402
from utils.skips import SampleError  # noqa: E402


def measure(data_format: str, data_root: str, chat_json: str, llm: str, vision_tower: str, n: int = 500,
            num_workers: int = 2, batch_size: int = 32, draft: bool = True, max_text_len: int = 128,
            features_cache: str = "", models_dir: str = "models", instructions: str = "zh") -> dict:
    records, skipped, root = read_records(data_format, data_root, chat_json, n)
    tok = load_tokenizer(resolve_model(llm, models_dir))
    vpath = resolve_model(vision_tower, models_dir)
    # Only sizes are needed here (input size, token count): no weights are read.
    vcfg = vision_arch(vpath)
    transform = ImageTransform.from_dict(preprocessing(vpath, vcfg.image_size))
    slots = image_tokens(vcfg, vision_defaults(vision_tower, vpath)["feature_select"])
    fmt = PromptFormat.build(tok, IMAGE_TOKEN, slots, False, CHAT_TEMPLATE_KWARGS)
    loader = ImageLoader(root, draft=transform.size if draft else None)
    ds = LlavaDataset(records, tok, fmt, transform, loader, max_text_len, instructions=instructions)
    stages = Counter()
    failed: Counter = Counter()
    done = 0
    for i in range(len(records)):
        src = records[i].image
        try:
            t0 = time.perf_counter()
            if src.startswith(("http://", "https://")):
                data = loader.fetch(src)
            else:
                with open(src if os.path.isabs(src) else os.path.join(root, src), "rb") as fh:
                    data = fh.read()
            t1 = time.perf_counter()
            img = decode_image(data, loader.draft)
            t2 = time.perf_counter()
            transform(img)
            t3 = time.perf_counter()
            encode_conversation(tok, fmt, ds.messages(i), max_text_len)
            t4 = time.perf_counter()
        except (SampleError, OSError) as e:
            failed[getattr(e, "reason", type(e).__name__)] += 1
            continue
        stages["read"] += t1 - t0
        stages["decode"] += t2 - t1
        stages["resize_normalize"] += t3 - t2
        stages["tokenize"] += t4 - t3
        done += 1
    per_stage = {k: round(done / v, 1) if v else None for k, v in stages.items()}
    one_process = round(done / sum(stages.values()), 1) if done else None

    if features_cache:
        ds.features = FeatureCache(features_cache)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                     collate_fn=lambda b: collate(b, pad_id),
                                     persistent_workers=False, prefetch_factor=4 if num_workers else None)
    t0, seen, skips = time.perf_counter(), 0, Counter()
    for batch in dl:
        seen += batch["size"]
        skips.update(batch["skipped"])
    overall = seen / (time.perf_counter() - t0)
    return {"samples": done, "skipped_reading": dict(skipped), "failed": dict(failed),
            "per_stage_samples_per_s": per_stage, "one_process_samples_per_s": one_process,
            "dataloader": {"num_workers": num_workers, "batch_size": batch_size, "samples_per_s": round(overall, 1),
                           "per_worker_samples_per_s": round(overall / max(1, num_workers), 1),
                           "features_cache": bool(features_cache), "skipped": dict(skips)},
            "draft_decoding": draft, "tower_input": transform.size}


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--data_format", default="sa1b", choices=["sa1b", "chat"], help="on-disk format")
    p.add_argument("--data_root", default="", help="dataset folder")
    p.add_argument("--chat_json", default="", help="chat format: chat.json path")
    p.add_argument("--llm", required=True, help="LLM id or folder (its tokenizer and chat template)")
    p.add_argument("--vision_tower", required=True, help="tower id or folder (its preprocessing)")
    p.add_argument("--models_dir", default="models", help="where registry ids live")
    p.add_argument("--n", type=int, default=500, help="samples to measure")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers for the overall figure")
    p.add_argument("--batch_size", type=int, default=32, help="DataLoader batch")
    p.add_argument("--no_draft", action="store_true", help="decode JPEGs at full size (to see what draft mode saves)")
    p.add_argument("--instructions", default="zh", choices=list(INSTRUCTION_POOLS), help="caption instruction pool")
    p.add_argument("--features_cache", default="", help="measure the cached-feature path instead of images")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    result = measure(args.data_format, args.data_root, args.chat_json, args.llm, args.vision_tower, args.n,
                     args.num_workers, args.batch_size, not args.no_draft, features_cache=args.features_cache,
                     models_dir=args.models_dir, instructions=args.instructions)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
