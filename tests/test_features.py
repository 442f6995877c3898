"""Cached vision features: same loss as the image path, refused for another tower or selection."""

import json
import os
import shutil

import pytest

from dataset import ImageLoader, ImageTransform, LlavaDataset
from readers import read_records
from heldout import heldout_loss
from tests.conftest import train_argv
from scripts.cache_features import cache_features
from utils.feature_cache import FeatureCache, cache_key


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    sources = [("sa1b", tiny.eval, "", "")]
    common = dict(feature_layer=-1, feature_select="all", feature_post_norm=True, batch_size=16, num_workers=0)
    fp32 = cache_features(tiny.vision, sources, str(out / "fp32"), dtype="float32", shard_size=20, **common)
    fp16 = cache_features(tiny.vision, sources, str(out / "fp16"), dtype="float16", **common)
    return out, fp32, fp16


def _eval_set(model, tok, fmt, tiny, features=None):
    records, _, root = read_records("sa1b", tiny.eval)
    transform = ImageTransform.from_dict(model.spec.image_transform)
    return LlavaDataset(records, tok, fmt, transform, ImageLoader(root), instructions="zh", features=features)


def _key(spec):
    return cache_key(spec.vision_path, spec.feature_layer, spec.feature_select, spec.feature_post_norm,
                     spec.image_transform, spec.num_image_tokens, spec.vision_hidden_size)


def test_cached_features_give_the_image_path_loss(tiny, toy_model, caches):
    model, tok, fmt = toy_model
    out, fp32, fp16 = caches
    n_images = len(read_records("sa1b", tiny.eval)[0])
    assert fp32["images"] == n_images and fp32["shards"] == -(-n_images // 20) and not fp32["failed"]
    assert fp32["bytes_per_image"] >= 17 * 32 * 4 and fp16["bytes_per_image"] < fp32["bytes_per_image"]
    cache = FeatureCache(str(out / "fp32"))
    cache.check(_key(model.spec))                       # made for exactly this tower and selection
    images = heldout_loss(model, _eval_set(model, tok, fmt, tiny), batch_size=8)
    cached = heldout_loss(model, _eval_set(model, tok, fmt, tiny, cache), batch_size=8)
    assert cached["eval/loss"] == pytest.approx(images["eval/loss"], rel=1e-5, abs=1e-6)
    assert cached["eval/image_ablation_gap"] == pytest.approx(images["eval/image_ablation_gap"], abs=1e-5)
    half = heldout_loss(model, _eval_set(model, tok, fmt, tiny, FeatureCache(str(out / "fp16"))), batch_size=8)
    assert half["eval/loss"] == pytest.approx(images["eval/loss"], rel=1e-2)


def test_a_cache_for_another_selection_or_tower_is_refused(tiny, toy_model, caches, tmp_path):
    model, _, _ = toy_model
    out, _, _ = caches
    cache = FeatureCache(str(out / "fp32"))
    spec = model.spec
    want = _key(spec)
    with pytest.raises(ValueError, match="feature_select"):
        cache.check({**want, "feature_select": "patch", "num_tokens": spec.num_image_tokens - 1})
    with pytest.raises(ValueError, match="feature_layer"):
        cache.check({**want, "feature_layer": -2})
    # Same architecture, one weight changed: another tower.
    other = tmp_path / "tower"
    shutil.copytree(tiny.vision, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tower_sha256"):
        cache.check(cache_key(str(other), spec.feature_layer, spec.feature_select, spec.feature_post_norm,
                              spec.image_transform, spec.num_image_tokens, spec.vision_hidden_size))


def test_training_from_the_cache(tiny, caches, tmp_path):
    """A short run reads features only (the eval set is all cached); a wrong cache stops the run."""
    import train_stage1

    out, _, _ = caches
    argv = train_argv(tiny, tmp_path, "cached", 3, "--feature_post_norm", data_root=tiny.eval, batch_size=8,
                      eval_samples=500, feature_layer=-1, feature_select="all", features_cache=out / "fp32",
                      trackers="jsonl")
    summary = train_stage1.main(argv + ["--run_name", "cached"])
    assert summary["steps"] == 3 and summary["skipped"] == {}
    with pytest.raises(ValueError, match="feature_select"):
        train_stage1.main([a if a != "all" else "patch" for a in argv] + ["--run_name", "wrong"])
    index = json.loads((out / "fp32" / "index.json").read_text())
    assert os.path.isfile(out / "fp32" / index["shards"][0])


def test_dataset_test_reports_every_stage_and_the_cached_path(tiny, caches, tmp_path):
    from scripts.dataset_test import main

    out, _, _ = caches
    argv = ["--data_root", tiny.eval, "--llm", tiny.llm, "--vision_tower", tiny.vision, "--n", "16", "--num_workers", "0",
            "--batch_size", "8"]
    images = main(argv + ["--json", str(tmp_path / "speed.json")])
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(images))
    assert (images["samples"], images["failed"], images["tower_input"]) == (16, {}, 32)
    assert set(images["per_stage_samples_per_s"]) == {"read", "decode", "resize_normalize", "tokenize"}
    assert images["dataloader"]["features_cache"] is False and images["draft_decoding"] is True
    cached = main(argv + ["--features_cache", str(out / "fp32")])
    assert cached["dataloader"]["features_cache"] is True and cached["dataloader"]["skipped"] == {}
