"""Readers and preprocessing on files the tests write."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from backbones import preprocessing
from dataset import EpochSampler, ImageTransform
from readers import read_chat_json, read_sa1b


def test_sa1b_reader_on_a_written_shard(tmp_path):
    (tmp_path / "data").mkdir()
    rows = {
        "url": ["https://example.invalid/a.jpg", "images/b.png", "images/c.png", "images/d.png", "images/e.png", ""],
        "cap_seg": [
            str({"global_caption": "一只猫", "local_caption": []}),       # the dataset's str(dict) form
            json.dumps({"global_caption": "a dog"}),                     # JSON also accepted
            "{'global_caption': ",                                       # not a dict
            str({"global_caption": "   "}),                              # empty caption
            str({"local_caption": ["x"]}),                               # no global caption
            str({"global_caption": "orphan"}),                           # no url
        ],
    }
    pq.write_table(pa.table(rows), tmp_path / "data" / "train-00000.parquet")
    records, skipped = read_sa1b(str(tmp_path))
    assert [(r.image, r.caption) for r in records] == [("https://example.invalid/a.jpg", "一只猫"), ("images/b.png", "a dog")]
    assert skipped == {"bad_cap_seg": 2, "empty_caption": 1, "bad_record": 1}
    assert set(skipped.examples) == set(skipped)                     # one example per reason: shard and row
    assert all(re.match(rf"{re.escape(str(tmp_path))}/.*\.parquet row \d+", e) for e in skipped.examples.values())
    assert len(read_sa1b(str(tmp_path), max_samples=1)[0]) == 1


def test_sa1b_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="missing column.*cap_seg"):
        read_sa1b(str(tmp_path))


def test_chat_json_reader_counts_bad_records(tmp_path):
    data = [
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
        {"id": "3", "image": "b.jpg", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "4", "image": "c.jpg", "conversations": [{"from": "human", "value": "q"}]},
        {"id": "5", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "6", "image": 7, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data))
    records, skipped = read_chat_json(str(path))
    assert [r.meta["id"] for r in records] == ["1", "5"]          # 5: text only, as in LLaVA's mix665k
    assert records[0].conversations[0] == {"role": "user", "content": "<image>\nq"}
    assert records[1].image == ""
    assert skipped == {"placeholder_without_image": 1, "bad_record": 1, "bad_roles": 1, "bad_conversation": 1}
    # Each reason comes with where to look: the file, the record's position and its id.
    assert skipped.examples == {
        "placeholder_without_image": f"{path} record 1 (id 2): an <image> placeholder but no image",
        "bad_roles": f"{path} record 2 (id 3): ['assistant', 'user']",
        "bad_conversation": f"{path} record 3 (id 4): fewer than 2 turns",
        "bad_record": f"{path} record 5 (id 6): image 7"}
    assert f"bad_roles 1, e.g. {path} record 2 (id 3)" in skipped.describe()
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        read_chat_json(str(path))


@pytest.mark.parametrize("size", [(70, 50), (50, 70), (32, 32)])
def test_clip_preprocessing_matches_transformers(size):
    from transformers import CLIPImageProcessorPil

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = ref(images=img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ImageTransform(size=32)(img), expected, atol=1e-5)


def test_siglip_style_square_resize_matches_transformers(tmp_path):
    from transformers import SiglipImageProcessorPil

    ref = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ref.save_pretrained(tmp_path)
    mine = ImageTransform.from_dict(preprocessing(str(tmp_path), 32))
    assert mine.mode == "square" and mine.mean == (0.5, 0.5, 0.5)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    np.testing.assert_allclose(mine(img), ref(images=img, return_tensors="np")["pixel_values"][0], atol=1e-5)


def test_epoch_sampler_is_a_deterministic_partition():
    a = EpochSampler(10, seed=3, epoch=1, rank=0, world_size=2).indices()
    b = EpochSampler(10, seed=3, epoch=1, rank=1, world_size=2).indices()
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5
    assert a == EpochSampler(10, seed=3, epoch=1, rank=0, world_size=2).indices()
    assert a != EpochSampler(10, seed=3, epoch=2, rank=0, world_size=2).indices()
    # `start` counts samples over all ranks: 4 read by two ranks is 2 each.
    assert list(EpochSampler(10, seed=3, epoch=1, rank=0, world_size=2, start=4)) == a[2:]


def test_epoch_sampler_reads_the_same_samples_per_step_on_any_process_count():
    """1 process x batch 8 and 2 or 4 processes x batch 4 or 2 read the same 8 samples at every
    micro-step, from the start and from a resumed offset; the tail short of a whole micro-step
    waits for the next epoch."""
    def steps(world, batch, start=0):
        ranks = [EpochSampler(21, seed=5, epoch=2, rank=r, world_size=world, batch_size=batch, start=start).indices()
                 for r in range(world)]
        return [sorted(i for ids in ranks for i in ids[k * batch:(k + 1) * batch]) for k in range(len(ranks[0]) // batch)]

    one = steps(1, 8)
    assert len(one) == 2 and len({i for s in one for i in s}) == 16            # 21 samples: 2 whole steps
    assert steps(2, 4) == steps(4, 2) == one
    assert steps(2, 4, start=8) == steps(1, 8, start=8) == one[1:]            # a resume on another count
    assert len(EpochSampler(21, seed=5, epoch=2, rank=1, world_size=2, batch_size=4, start=8)) == 4


def test_the_toy_world_cache_key_covers_the_prompt_code_and_instruction_pools(monkeypatch):
    """The cached toy LM is trained through prompts.py and the instruction pools: editing either
    must rebuild it rather than silently reuse a stale one."""
    import inspect

    import prompts
    import toy_world

    size = toy_world.SIZES["test"]
    before = toy_world.recipe_hash(size)
    assert toy_world.recipe_hash(size) == before                          # stable while nothing changes
    monkeypatch.setitem(toy_world.INSTRUCTION_POOLS, "zh", [*toy_world.INSTRUCTION_POOLS["zh"], "看图说话"])
    assert toy_world.recipe_hash(size) != before
    monkeypatch.undo()
    real = inspect.getsource
    monkeypatch.setattr(toy_world.inspect, "getsource", lambda obj: real(obj) + ("# edited" if obj is prompts else ""))
    assert toy_world.recipe_hash(size) != before
    monkeypatch.undo()
    monkeypatch.setattr(toy_world.inspect, "getsource",
                        lambda obj: real(obj) + ("# edited" if obj is toy_world.build_llm else ""))
    assert toy_world.recipe_hash(size) != before
