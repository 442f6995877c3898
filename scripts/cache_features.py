r"""Run the frozen vision tower once over a dataset and store its features for training.

Stage 1 never changes the tower, so its output for an image is the same on every epoch, for
every question about that image (VQA has ~5 per image) and in every learning-rate sweep.
Computing it once removes image decoding and the ViT from the training step:

    python scripts/cache_features.py --vision_tower models/toy/vision --data_root data/toy/train \
        --eval_data_root data/toy/eval --out data/toy_features --feature_layer -1 --feature_select all --feature_post_norm
    python train_stage1.py --demo --features_cache data/toy_features

Features are stored fp16 in memory-mappable .npy shards ([n, N, D_v]) with index.json; the
cache key names the tower by the hash of its files plus layer, selection, final norm and
preprocessing (utils/feature_cache.py), and training refuses a cache made for other settings.
Disk cost: N x D_v x 2 bytes an image, e.g. 197 x 768 x 2 = 296 KiB for Chinese-CLIP B/16,
29 GiB for the course's 100k images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbones import preprocessing, resolve_model, vision_defaults  # noqa: E402
from dataset import ImageLoader, ImageTransform  # noqa: E402
from readers import read_records  # noqa: E402
from checkpoint_io import load_vision_tower  # noqa: E402
from utils import console  # noqa: E402
from utils.atomic import atomic_path, atomic_write  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.dist import pick_device  # noqa: E402
from utils.feature_cache import cache_key, image_key  # noqa: E402
from utils.skips import SampleError  # noqa: E402


class _Images(torch.utils.data.Dataset):
    """Unique image sources -> (position, pixels) or (position, skip reason)."""

    def __init__(self, sources: list[tuple[str, str]], transform, draft: int):
        self.sources, self.transform = sources, transform
        self.loaders = {root: ImageLoader(root, draft=draft) for root in {r for _, r in sources}}

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src, root = self.sources[i]
        try:
            return i, self.transform(self.loaders[root](src))
        except SampleError as e:
            return i, e.reason
        except Exception as e:  # noqa: BLE001 - one odd file must not end the job
            return i, f"unexpected_{type(e).__name__}"


def _collate(batch):
    good = [(i, x) for i, x in batch if not isinstance(x, str)]
    bad = [(i, x) for i, x in batch if isinstance(x, str)]
    pixels = torch.from_numpy(np.stack([x for _, x in good])) if good else None
    return [i for i, _ in good], pixels, bad


def cache_features(vision_tower: str, sources: list[tuple[str, str, str, str]], out: str, models_dir: str = "models",
                   feature_layer: int | None = None, feature_select: str | None = None,
                   feature_post_norm: bool | None = None, batch_size: int = 64, num_workers: int = 2,
                   shard_size: int = 4096, dtype: str = "float16", device: str = "cpu", max_samples: int = 0) -> dict:
    """sources: (data_format, data_root, chat_json, image_root override) per dataset. Returns the report."""
    t0 = time.time()
    path = resolve_model(vision_tower, models_dir)
    d = vision_defaults(vision_tower, path)
    layer = d["feature_layer"] if feature_layer is None else feature_layer
    select = feature_select or d["feature_select"]
    post_norm = d["feature_post_norm"] if feature_post_norm is None else feature_post_norm
    dev = torch.device(device)
    tower = load_vision_tower(path, layer, select, post_norm, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tower.to(dev)
    transform = ImageTransform.from_dict(preprocessing(path, tower.image_size))
    key = cache_key(path, layer, select, post_norm, transform.to_dict(), tower.num_tokens, tower.hidden_size)

    unique: dict[str, tuple[str, str]] = {}
    for fmt, root, chat_json, image_root in sources:
        records, _, found_root = read_records(fmt, root, chat_json, max_samples)
        base = image_root or found_root
        for r in records:
            unique.setdefault(image_key(r.image, base), (r.image, base))
    keys = list(unique)
    loader = torch.utils.data.DataLoader(_Images(list(unique.values()), transform, transform.size),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    os.makedirs(out, exist_ok=True)
    np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    rows: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    shards: list[str] = []
    buffer: list[np.ndarray] = []
    buffer_keys: list[str] = []

    def flush() -> None:
        name = f"features-{len(shards):05d}.npy"
        with atomic_path(os.path.join(out, name)) as tmp:
            np.save(tmp, np.concatenate(buffer))                    # [n, N, D_v]
        for row, k in enumerate(buffer_keys):
            rows[k] = [len(shards), row]
        shards.append(name)
        buffer.clear()
        buffer_keys.clear()

    bar = console.progress(len(loader), "features", "batch")   # in a log file: a line every 30 s
    for positions, pixels, bad in loader:
        bar.update(1)
        for i, reason in bad:
            failed[keys[i]] = reason
        if pixels is None:
            continue
        feats = tower(pixels.to(dev)).float().cpu().numpy().astype(np_dtype)   # [B, N, D_v]
        for i, f in zip(positions, feats):
            buffer.append(f[None])
            buffer_keys.append(keys[i])
            if len(buffer) == shard_size:
                flush()
    bar.close()
    if buffer:
        flush()
    index = {"key": key, "shards": shards, "rows": rows, "failed": failed, "dtype": dtype,
             "num_tokens": tower.num_tokens, "dim": tower.hidden_size}
    atomic_write(os.path.join(out, "index.json"), json.dumps(index, ensure_ascii=False))  # last: marks it complete
    size = sum(os.path.getsize(os.path.join(out, s)) for s in shards)
    seconds = time.time() - t0
    report = {"images": len(rows), "failed": dict(Counter(failed.values())), "shards": len(shards),
              "bytes_per_image": round(size / max(1, len(rows))), "total_gib": round(size / 2**30, 3),
              "seconds": round(seconds, 1), "images_per_s": round(len(keys) / max(seconds, 1e-9), 1),
              "tokens_x_dim": [tower.num_tokens, tower.hidden_size], "dtype": dtype}
    atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--vision_tower", required=True, help="registry id or local tower folder")
    p.add_argument("--models_dir", default="models", help="where registry ids live")
    p.add_argument("--data_format", default="sa1b", choices=["sa1b", "chat"], help="on-disk format of the data")
    p.add_argument("--data_root", default="", help="training data directory")
    p.add_argument("--chat_json", default="", help="chat format: chat.json path")
    p.add_argument("--image_root", default="", help="chat format: image folder for --chat_json")
    p.add_argument("--eval_data_root", default="", help="also cache the held-out set (same format)")
    p.add_argument("--eval_chat_json", default="", help="chat format: held-out chat.json")
    p.add_argument("--max_samples", type=int, default=0, help="first N records of each dataset (0 = all)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--feature_layer", type=int, default=None, help="hidden state index (default: the tower's)")
    p.add_argument("--feature_select", default=None, choices=["all", "patch"], help="default: the tower's")
    p.add_argument("--feature_post_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="final norm on every token (default: the tower's)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored precision")
    p.add_argument("--batch_size", type=int, default=64, help="images per tower forward")
    p.add_argument("--num_workers", type=int, default=2, help="decoding processes")
    p.add_argument("--shard_size", type=int, default=4096, help="images per .npy shard")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    console.quiet_library_bars()
    sources = [(args.data_format, args.data_root, args.chat_json, args.image_root)]
    if args.eval_data_root or args.eval_chat_json:
        sources.append((args.data_format, args.eval_data_root, args.eval_chat_json, ""))
    report = cache_features(args.vision_tower, sources, args.out, args.models_dir, args.feature_layer,
                            args.feature_select, args.feature_post_norm, args.batch_size, args.num_workers,
                            args.shard_size, args.dtype, str(pick_device(args.device)), args.max_samples)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
