"""The seed helper scripts: flash-attn wheel names, LLM chat, Chinese-CLIP retrieval over a
folder (both on-disk layouts), and saving example samples. Tiny models, no network."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- check_flash_attn

@pytest.mark.parametrize("args, expected", [
    (("3.11", "2.8.0+cu128", "12.8", True, "linux_x86_64"),
     "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl"),
    (("cp310", "2.4.1", "12.4", False, "linux_x86_64"),
     "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp310-cp310-linux_x86_64.whl"),
    (("3.12.3", "2.9", "cu128", "TRUE", "linux_aarch64"),
     "flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp312-cp312-linux_aarch64.whl"),
    (("313", "2.7.1+cu118", "11.8", "false", "win_amd64"),
     "flash_attn-2.8.3+cu11torch2.7cxx11abiFALSE-cp313-cp313-win_amd64.whl"),
])
def test_wheel_name_follows_the_release_naming(args, expected):
    from scripts.check_flash_attn import wheel_name, wheel_url

    assert wheel_name(*args) == expected
    assert wheel_url(expected) == f"https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/{expected}"


def test_wheel_name_rejects_nonsense():
    from scripts.check_flash_attn import wheel_name

    with pytest.raises(ValueError):
        wheel_name("3.11", "latest", "12.8", True, "linux_x86_64")
    with pytest.raises(ValueError):
        wheel_name("3.11", "2.8", "12.8", "maybe", "linux_x86_64")


@pytest.mark.slow
def test_check_flash_attn_json_on_this_torch():
    out = subprocess.run([sys.executable, "scripts/check_flash_attn.py", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["python"] == f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert info["torch"] == torch.__version__ and info["cxx11abi"] in ("TRUE", "FALSE")
    assert isinstance(info["flash_attn"]["importable"], bool)
    if torch.version.cuda is None:  # the CPU torch of CI: no wheel, but what a CUDA 12 build would need
        assert info["wheel"] is None and "CPU-only" in info["notes"][0]
        assert info["would_need"].startswith("flash_attn-2.8.3+cu12torch")
        assert f"cxx11abi{info['cxx11abi']}-{info['python']}-{info['python']}-" in info["would_need"]
    else:
        assert info["wheel"].startswith("flash_attn-2.8.3+cu")


# --------------------------------------------------------------------------- chat_qwen3

def test_chat_keeps_history_streams_and_clears(toy, monkeypatch, capsys):
    """On the trained toy LM (replies are real text, so streaming shows)."""
    from scripts import chat_qwen3

    if not torch.cuda.is_available():
        assert chat_qwen3.pick_attn("auto") == "sdpa"
    first, second, third = "红色 描述这张图片", "这张图片里有什么？", "请描述这张图片。"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n/clear\n{third}\n/exit\nnever read\n"))
    session = chat_qwen3.main(["--llm", toy.llm, "--temperature", "0", "--max_new_tokens", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(session.turns) == 3  # /exit stopped before "never read"
    t1, t2, t3 = session.turns
    # Thinking off: the generation prompt ends in Qwen3's empty think block.
    assert t1.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Turn 2 sees turn 1 (question and answer); after /clear turn 3 sees neither.
    assert first in t2.prompt and t2.prompt.count("<|im_start|>user") == 2
    assert f"<|im_start|>assistant\n{t1.reply}<|im_end|>" in t2.prompt
    assert first not in t3.prompt and second not in t3.prompt and t3.prompt.count("<|im_start|>user") == 1
    # Streaming printed each reply as it was generated, in order.
    assert all(t.reply for t in session.turns)
    assert out.index(t1.reply) < out.index(t2.reply, out.index(t1.reply) + len(t1.reply)) < out.rindex(t3.reply)
    assert "[history cleared]" in out
    # EOF ends the loop cleanly.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    chat_qwen3.run(session)


# --------------------------------------------------------------------------- clip_eval

CAPTIONS = ["红色的圆形", "蓝色的方块", "绿色的三角", "黄色的十字", "紫色的圆形", "青色的方块"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_chinese_clip(vocab_size: int):
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    torch.manual_seed(0)
    cfg = ChineseCLIPConfig(
        # width 64 -> 1 head: the ModelScope mapping reads heads as width / 64 (as Chinese-CLIP does)
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=1),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab_size, max_position_embeddings=64),
        projection_dim=16)
    model = ChineseCLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorms and biases away from 1/0
    return model


def _to_modelscope_state(model) -> dict[str, torch.Tensor]:
    """The inverse of the loader: transformers names -> original Chinese-CLIP names."""
    sd = model.state_dict()
    v = {k[len("vision_model."):]: t for k, t in sd.items() if k.startswith("vision_model.")}
    out = {"visual.conv1.weight": v["embeddings.patch_embedding.weight"],
           "visual.class_embedding": v["embeddings.class_embedding"],
           "visual.positional_embedding": v["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": v["pre_layrnorm.weight"], "visual.ln_pre.bias": v["pre_layrnorm.bias"],
           "visual.ln_post.weight": v["post_layernorm.weight"], "visual.ln_post.bias": v["post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T.contiguous()}
    for i in range(model.config.vision_config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = torch.cat([v[f"{src}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([v[f"{src}self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{a}.weight"], out[f"{dst}{a}.bias"] = v[f"{src}{b}.weight"], v[f"{src}{b}.bias"]
    for k, t in sd.items():
        if k.startswith("text_model."):
            out["bert." + k[len("text_model."):]] = t
    hidden = model.config.text_config.hidden_size
    out["bert.pooler.dense.weight"], out["bert.pooler.dense.bias"] = torch.randn(hidden, hidden), torch.zeros(hidden)
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return {f"module.{k}": t.clone() for k, t in out.items()}


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """The same tiny Chinese CLIP as an HF folder and in ModelScope's layout, plus an image folder."""
    from transformers import BertTokenizer

    base = tmp_path_factory.mktemp("clip")
    chars = sorted({c for cap in CAPTIONS for c in cap})
    (base / "vocab.txt").write_text("\n".join(SPECIALS + chars) + "\n", encoding="utf-8")
    model = _tiny_chinese_clip(len(SPECIALS) + len(chars))
    hf, ms = base / "hf", base / "ms"
    model.save_pretrained(hf)
    BertTokenizer(vocab_file=str(base / "vocab.txt")).save_pretrained(hf)
    ms.mkdir()
    torch.save({"state_dict": _to_modelscope_state(model)}, ms / "pytorch_model.bin")
    (ms / "vocab.txt").write_text((base / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (ms / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "multi-modal-embedding",
                                                       "model": {"type": "clip-multi-modal-embedding"}}))
    (ms / "vision_model_config.json").write_text(json.dumps({"embed_dim": 16, "image_resolution": 32,
                                                             "vision_layers": 2, "vision_width": 64,
                                                             "vision_patch_size": 8}))
    (ms / "text_model_config.json").write_text(json.dumps({"vocab_size": len(SPECIALS) + len(chars),
                                                           "text_hidden_size": 32, "text_num_attention_heads": 4,
                                                           "text_num_hidden_layers": 2, "text_hidden_act": "gelu"}))
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, cap in enumerate(CAPTIONS):
        arr = rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"{i:05d}.{'png' if i % 2 else 'jpg'}")
        (images / f"{i:05d}.txt").write_text(cap + "\n", encoding="utf-8")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    return hf, ms, images


def _direct_top5(model, tokenizer, image_paths, query):
    """Reference: preprocess by hand, run the transformers model, rank with numpy."""
    from backbones import CLIP_MEAN, CLIP_STD

    pixels = []
    for p in image_paths:
        img = Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)
        x = (np.asarray(img, np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        pixels.append(x.transpose(2, 0, 1))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(np.stack(pixels))).pooler_output.numpy()
        enc = tokenizer([query], return_tensors="pt")
        txt = model.get_text_features(**enc).pooler_output.numpy()[0]
    cos = (img @ txt) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt))
    order = np.argsort(-cos)[:5]
    return [image_paths[i] for i in order], cos[order]


def test_clip_layouts_embed_identically(clip_dirs):
    from scripts.clip_eval import embed_images, embed_texts, list_images, load_chinese_clip

    hf, ms, images = clip_dirs
    a, b = load_chinese_clip(str(hf)), load_chinese_clip(str(ms))
    paths = list_images(str(images))
    ea, kept_a, skipped = embed_images(a, paths, batch_size=4)
    eb, kept_b, _ = embed_images(b, paths, batch_size=4)
    assert kept_a == kept_b and len(kept_a) == len(CAPTIONS) and skipped == {"corrupt_image": 1}
    np.testing.assert_allclose(ea, eb, atol=1e-5)
    np.testing.assert_allclose(embed_texts(a, CAPTIONS), embed_texts(b, CAPTIONS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, atol=1e-5)


def test_modelscope_layout_missing_text_weights_raise(clip_dirs, tmp_path):
    from scripts.clip_eval import load_chinese_clip

    _, ms, _ = clip_dirs
    state = torch.load(ms / "pytorch_model.bin", weights_only=True)
    del state["state_dict"]["module.bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    for name in ("configuration.json", "vocab.txt", "text_model_config.json"):
        (tmp_path / name).write_bytes((ms / name).read_bytes())
    with pytest.raises(RuntimeError, match="missing"):
        load_chinese_clip(str(tmp_path))


@pytest.mark.parametrize("layout", ["hf", "ms"])
def test_clip_eval_ranks_like_numpy_and_saves_a_chart(clip_dirs, tmp_path, monkeypatch, capsys, layout):
    from transformers import BertTokenizer, ChineseCLIPModel

    from scripts import clip_eval

    hf, ms, images = clip_dirs
    query = CAPTIONS[2]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{query}\n\nnever read\n"))  # the empty line ends it
    results = clip_eval.main(["--model", str(hf if layout == "hf" else ms), "--images", str(images),
                              "--out_dir", str(tmp_path / "charts"), "--device", "cpu"])
    assert len(results) == 1
    got = results[0]["top"]
    model = ChineseCLIPModel.from_pretrained(hf).eval()
    paths = [str(p) for p in sorted(images.iterdir()) if p.suffix in (".jpg", ".png") and p.name != "broken.jpg"]
    want_paths, want_scores = _direct_top5(model, BertTokenizer.from_pretrained(hf), paths, query)
    assert [p for p, _ in got] == want_paths
    np.testing.assert_allclose([s for _, s in got], want_scores, atol=1e-4)
    chart = results[0]["chart"]
    assert os.path.isfile(chart) and open(chart, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "top-5" in out and os.path.basename(want_paths[0]) in out


# --------------------------------------------------------------------------- save_examples

def _sa1b_dir(base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (base / "data").mkdir(parents=True)
    (base / "img").mkdir()
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        mode = "RGBA" if i == 1 else "RGB"  # an RGBA PNG must still come out as RGB JPEG
        Image.new(mode, (64, 48), color + ((128,) if mode == "RGBA" else ())).save(base / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", str({"global_caption": f"caption {i}", "local_caption": []})))
    (base / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    bad = [("img/missing.png", json.dumps({"global_caption": "gone"})),      # missing image
           ("img/0.png", "{not a dict"),                                     # malformed cap_seg
           ("img/corrupt.jpg", json.dumps({"global_caption": "corrupt"}))]   # undecodable image
    rows = rows[:1] + bad + rows[1:]
    pq.write_table(pa.table({"url": [u for u, _ in rows], "cap_seg": [c for _, c in rows]}),
                   base / "data" / "train-00000.parquet")


def test_save_examples_sa1b_skips_and_counts(tmp_path):
    from scripts.save_examples import main

    _sa1b_dir(tmp_path / "sa1b")
    out = tmp_path / "work" / "data_example"
    sentinel = tmp_path / "work" / "keep.txt"
    out.parent.mkdir()
    sentinel.write_text("untouched")
    written, skipped = main(["--data_root", str(tmp_path / "sa1b"), "--out", str(out), "--n", "3"])
    assert written == 3
    assert skipped == {"missing_image": 1, "bad_cap_seg": 1, "corrupt_image": 1}
    for i, cap in enumerate(["caption 0", "caption 1", "caption 2"]):
        img = Image.open(out / f"{i:05d}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 48)
        assert (out / f"{i:05d}.txt").read_text(encoding="utf-8").strip() == cap
    assert len((out / "examples.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    # A smaller second run leaves no stale sample behind and touches nothing outside --out.
    assert main(["--data_root", str(tmp_path / "sa1b"), "--out", str(out), "--n", "1"])[0] == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.jpg", "00000.txt", "examples.jsonl"]
    assert sentinel.read_text() == "untouched"


def test_save_examples_chat_writes_question_and_answer(tiny, tmp_path):
    from scripts.save_examples import main

    written, skipped = main(["--data_format", "chat", "--data_root", tiny.train, "--out", str(tmp_path), "--n", "2"])
    assert written == 2 and not skipped
    chat = json.load(open(os.path.join(tiny.train, "chat.json"), encoding="utf-8"))
    text = (tmp_path / "00001.txt").read_text(encoding="utf-8")
    assert text == f"Q: 描述这张图片\nA: {chat[1]['conversations'][1]['value']}\n"
