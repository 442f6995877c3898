"""Cached vision features: the on-disk format read by training and written by
scripts/cache_features.py.

A cache folder holds fp16 (or fp32) `.npy` shards of shape [n, N, D_v], opened memory-mapped,
and `index.json` with the cache key and, per image, its shard and row. The key names the tower
by the SHA-256 of its files (config + weights) plus the feature layer, token selection, final
norm and preprocessing, so a cache can never feed a projector trained for another tower or
selection: `check` refuses it and says which setting differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def tower_digest(path: str) -> str:
    """SHA-256 over the tower folder's config and weight files (names and bytes, sorted)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if not (name.endswith(WEIGHT_FILES) or name in ("config.json", "configuration.json")):
            continue
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def cache_key(vision_path: str, feature_layer: int, feature_select: str, feature_post_norm: bool,
              image_transform: dict, num_tokens: int, dim: int) -> dict[str, Any]:
    return {"tower_sha256": tower_digest(vision_path), "feature_layer": feature_layer,
            "feature_select": feature_select, "feature_post_norm": bool(feature_post_norm),
            "image_transform": image_transform, "num_tokens": num_tokens, "dim": dim}


def image_key(src: str, root: str) -> str:
    """One name per image across data roots: the URL, or the absolute local path."""
    if src.startswith(("http://", "https://")):
        return src
    if src.startswith("file://"):
        src = src[len("file://"):]
    return os.path.abspath(src if os.path.isabs(src) else os.path.join(root, src))


class MissingFeatures(KeyError):
    """An image the cache has no features for (its reason: failed when caching, or never seen)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FeatureCache:
    """Read side: `cache[key]` -> [N, D_v] numpy array (a copy out of the memory map)."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{directory}: no index.json; build the cache with scripts/cache_features.py")
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        self.directory, self.key = directory, index["key"]
        self.failed: dict[str, str] = index.get("failed", {})
        self.rows: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index["rows"].items()}
        self.shard_files: list[str] = index["shards"]
        self._shards: list[np.ndarray | None] = [None] * len(self.shard_files)  # opened lazily (per worker)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.rows:
            raise MissingFeatures(f"feature_cache_{self.failed[key]}" if key in self.failed else "not_in_feature_cache")
        shard, row = self.rows[key]
        if self._shards[shard] is None:
            self._shards[shard] = np.load(os.path.join(self.directory, self.shard_files[shard]), mmap_mode="r")
        return np.array(self._shards[shard][row])                    # [N, D_v]

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse a cache made for another tower, layer, selection or preprocessing."""
        diff = [k for k in expected if self.key.get(k) != expected[k]]
        if diff:
            detail = "; ".join(f"{k}: cache has {self.key.get(k)!r}, this run wants {expected[k]!r}" for k in diff)
            raise ValueError(f"feature cache {self.directory} was made for other settings ({detail}). "
                             f"Rebuild it with scripts/cache_features.py for this tower and selection.")

    def bytes_per_image(self) -> float:
        total = sum(os.path.getsize(os.path.join(self.directory, f)) for f in self.shard_files)
        return total / max(1, len(self.rows))
