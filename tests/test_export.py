"""scripts/export_hf.py: every exportable combination loads as a plain transformers LLaVA and
reproduces our model exactly (prompt ids, pixels, logits at every position, greedy replies);
settings LLaVA cannot express are refused with their reason and leave nothing behind; every
export states whether vLLM's LLaVA loads it, by the rules of vLLM's source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import PRESETS, detect_vision_type, vision_defaults
from dataset import ImageTransform
from checkpoint_io import (build_model, export_blockers, export_verdict, save_checkpoint, vllm_blockers,
                           vllm_verdict)
from model import ModelSpec
from prompts import IMAGE_PLACEHOLDER, PromptFormat, encode_prompt
from scripts import export_hf
from tests.conftest import DEVICE
from tests.test_docs import doc_section

QUESTION = "描述这张图片"
ATOL = 1e-5 if DEVICE == "cpu" else 5e-3   # a GPU: TF32 convolutions in both models


def make_checkpoint(directory, seed: int = 0, **spec_kwargs):
    """Build our model, give the projector random non-trivial weights, save a checkpoint."""
    torch.manual_seed(seed)
    model, tok = build_model(ModelSpec(**spec_kwargs))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_(0, 0.3)
    meta = {"step": 7, "run": "export-test", "train_config": {"data_format": "sa1b", "data_root": "data/tiny/train",
                                                              "lr": 2e-3, "batch_size": 4}}
    save_checkpoint(model, str(directory), meta)
    return model.eval(), tok


def write_image(path) -> Image.Image:
    """A non-square image, so shortest-edge resize and centre crop are exercised."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 57, 3), dtype=np.uint8))
    img.save(path)
    return Image.open(path).convert("RGB")


def export(ckpt, out, *extra) -> int:
    return export_hf.main(["--checkpoint", str(ckpt), "--out", str(out), *extra])


@torch.no_grad()
def assert_exact(model, tok, ckpt, out, tmp_path, capsys, generate: bool = True) -> float:
    """The exported folder against our model: input ids, pixels, logits, greedy reply."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import eval_llava

    spec = model.spec
    image_path = tmp_path / "probe.png"
    image = write_image(image_path)
    processor = AutoProcessor.from_pretrained(out)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert type(llava.model.vision_tower) is type(model.vision.model)

    # Prompt ids: the exported chat template + processor give exactly encode_prompt's ids.
    fmt = PromptFormat.build(tok, spec.image_token, spec.num_image_tokens, spec.image_wrap, spec.chat_template_kwargs)
    ours_ids = encode_prompt(tok, fmt, [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{QUESTION}"}])[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ours_ids
    assert ours_ids.count(model.image_token_id) == spec.num_image_tokens

    # Pixels: the exported image processor reproduces ImageTransform (float rounding only).
    ours_px = torch.from_numpy(ImageTransform.from_dict(spec.image_transform)(image))[None]
    torch.testing.assert_close(inputs["pixel_values"], ours_px, rtol=0, atol=1e-6)

    # Logits at every position, same ids and pixels into both, on the test device (float32 weights).
    ids, px = torch.tensor([ours_ids]).to(DEVICE), ours_px.to(DEVICE)
    model.to(DEVICE), llava.to(DEVICE)
    ours = model.llm(inputs_embeds=model.embed(ids, model.encode_images(px))).logits
    theirs = llava(input_ids=ids, pixel_values=px).logits
    diff = float((ours - theirs).abs().max())
    assert diff <= ATOL, f"max |logit diff| {diff}"
    model.cpu(), llava.cpu()

    if generate and DEVICE == "cpu":  # one-shot on a GPU runs bf16: greedy text is compared on the CPU  # greedy reply of eval_llava's one-shot mode == transformers' generate on the export
        from utils import console

        capsys.readouterr()
        try:
            eval_llava.main(["--checkpoint", str(ckpt), "--image", str(image_path), "--prompt", QUESTION,
                             "--max_new_tokens", "12", "--device", "cpu"])
        finally:
            console.set_stream(None)  # one-shot mode points logs at this test's stderr; later tests need theirs
        ours_reply = capsys.readouterr().out.strip()
        out_ids = llava.generate(**inputs, max_new_tokens=12, do_sample=False)
        theirs_reply = processor.decode(out_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert theirs_reply == ours_reply
    print(f"max |logit diff| = {diff:.2e}")
    return diff


# --------------------------------------------------------------------------- exportable

@pytest.mark.device
@pytest.mark.parametrize("projector,layer,select", [("linear", -1, "all"), ("mlp2x_gelu", -2, "patch")])
def test_toy_clip_qwen3_exports_exactly(tiny, tmp_path, capsys, projector, layer, select):
    model, tok = make_checkpoint(tmp_path / "ckpt", vision_tower=tiny.vision, llm=tiny.llm, projector=projector,
                                 feature_layer=layer, feature_select=select, feature_post_norm=False)
    capsys.readouterr()
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 0
    printed = capsys.readouterr().out
    assert not os.path.exists(tmp_path / "hf.partial")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["projector_hidden_act"] == ("linear" if projector == "linear" else "gelu")
    assert cfg["text_config"]["architectures"] == ["Qwen3ForCausalLM"]   # what vLLM builds the LLM from
    assert cfg["vision_feature_select_strategy"] == ("full" if select == "all" else "default")
    assert cfg["vision_feature_layer"] == layer and cfg["image_seq_length"] == model.spec.num_image_tokens
    assert "auto_map" not in cfg  # nothing needs trust_remote_code
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "LlavaForConditionalGeneration" in card and "optimizer steps: 7" in card and "data/tiny/train" in card
    # The verdict, printed and in the model card: the linear projector's act "linear" is not in vLLM's
    # activation registry; CLIP + mlp2x_gelu ("gelu") + Qwen3 is what vLLM's LLaVA builds.
    assert "expected to work" not in card
    if projector == "linear":
        assert "vLLM: no — " in printed and "'linear'" in printed and "vLLM: yes" not in printed
        assert "**vLLM: no — " in card and "eval_llava.py" in card and "--projector mlp2x_gelu" in card
    else:
        assert "vLLM: yes" in printed and "vLLM: no" not in printed
        assert "**vLLM: yes.**" in card and f"vllm serve {tmp_path / 'hf'}" in card
    assert_exact(model, tok, tmp_path / "ckpt", tmp_path / "hf", tmp_path, capsys)


def test_modelscope_chinese_clip_exports_exactly(tiny, tmp_path, capsys):
    from tests.test_backbones import write_modelscope_clip

    write_modelscope_clip(tmp_path / "ms")
    model, tok = make_checkpoint(tmp_path / "ckpt", vision_tower=str(tmp_path / "ms"), llm=tiny.llm,
                                 feature_layer=-1, feature_select="all", feature_post_norm=False)
    capsys.readouterr()
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 0
    printed = capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "chinese_clip_vision_model"
    assert "vLLM: no — " in printed and "ChineseCLIPVisionModel" in printed
    assert "ChineseCLIPVisionModel" in (tmp_path / "hf" / "README.md").read_text()
    assert_exact(model, tok, tmp_path / "ckpt", tmp_path / "hf", tmp_path, capsys, generate=False)


def test_qwen3vl_text_model_exports_as_plain_qwen3(tiny, tmp_path, capsys):
    """Image slots wrapped in <|vision_start|>/<|vision_end|>; the export's plain 1-D RoPE equals
    Qwen3-VL's interleaved M-RoPE for text: checked against the original full model."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from tests.test_backbones import make_qwen3vl

    tok = AutoTokenizer.from_pretrained(tiny.llm)
    full = make_qwen3vl(tmp_path / "qwen3vl", vocab_size=len(tok))
    tok.save_pretrained(tmp_path / "qwen3vl")
    model, tok = make_checkpoint(tmp_path / "ckpt", vision_tower=tiny.vision, llm=str(tmp_path / "qwen3vl"),
                                 projector="mlp2x_gelu", feature_layer=-2, feature_select="patch",
                                 feature_post_norm=False)
    assert model.spec.image_wrap
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 0
    text_config = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    # vLLM builds the LLM that text_config.architectures names; the in-memory Qwen3 text model has none of its own.
    assert text_config["model_type"] == "qwen3" and text_config["architectures"] == ["Qwen3ForCausalLM"]
    assert_exact(model, tok, tmp_path / "ckpt", tmp_path / "hf", tmp_path, capsys)

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, len(tok), (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as in batched generation
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask).logits
        got = llava(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1, 3:], ref[1, 3:], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["dinov3", "siglip"])
def test_other_towers_export_exactly(tiny, tmp_path, capsys, family):
    """DINOv3 with every token (CLS + 4 registers + patches: LLaVA's "full"); SigLIP with patch
    selection, which has no prefix token to drop, so "full" as well."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tests.test_backbones import VC, make_dinov3

    if family == "dinov3":
        make_dinov3(tmp_path / "tower")
        select, n_tokens = "all", 16 + 5
    else:
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**VC)).save_pretrained(tmp_path / "tower")
        select, n_tokens = "patch", 16
    model, tok = make_checkpoint(tmp_path / "ckpt", vision_tower=str(tmp_path / "tower"), llm=tiny.llm,
                                 feature_layer=-1, feature_select=select, feature_post_norm=False)
    assert model.spec.num_image_tokens == n_tokens
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vision_feature_select_strategy"] == "full"
    if family == "siglip":
        # LLaVA never reads SigLIP's attention-pooling head; some vLLM versions apply it inside LLaVA
        # (one token per image) when vision_use_head is true, transformers' default.
        from safetensors import safe_open

        assert cfg["vision_config"]["vision_use_head"] is False
        with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as fh:
            assert not [k for k in fh.keys() if ".head." in k]
    assert_exact(model, tok, tmp_path / "ckpt", tmp_path / "hf", tmp_path, capsys, generate=False)


# --------------------------------------------------------------------------- refused

def assert_refused(ckpt, out, capsys, *needles: str) -> None:
    capsys.readouterr()
    assert export(ckpt, out) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_post_norm_on_a_clip_tower_is_refused(tiny, tmp_path, capsys):
    """The course's setting (ln_post on all tokens): no exact LLaVA equivalent."""
    make_checkpoint(tmp_path / "ckpt", vision_tower=tiny.vision, llm=tiny.llm, feature_post_norm=True)
    assert_refused(tmp_path / "ckpt", tmp_path / "hf", capsys, "feature_post_norm", "--no-feature_post_norm",
                   "To export: train with --no-feature_post_norm", "--projector mlp2x_gelu")


def test_dinov3_patch_only_is_refused(tiny, tmp_path, capsys):
    from tests.test_backbones import make_dinov3

    make_dinov3(tmp_path / "dino")
    make_checkpoint(tmp_path / "ckpt", vision_tower=str(tmp_path / "dino"), llm=tiny.llm, feature_select="patch",
                    feature_post_norm=False)
    assert_refused(tmp_path / "ckpt", tmp_path / "hf", capsys, "registers", "--feature_select all")


def test_existing_output_is_kept_without_overwrite(tiny, tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", vision_tower=tiny.vision, llm=tiny.llm, feature_post_norm=False)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert export(tmp_path / "ckpt", tmp_path / "hf") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- verdicts from the spec alone

def spec_of(tower: str, llm: str, **features) -> ModelSpec:
    """A checkpoint's spec as build_model completes it, from the folders' files alone (no weights):
    all that export_blockers / vllm_blockers read."""
    return ModelSpec(vision_tower=str(tower), llm=str(llm), vision_path=str(tower), llm_path=str(llm),
                     vision_type=detect_vision_type(str(tower)), **features)


def test_vllm_verdict_follows_vllm_source(tiny, tmp_path):
    """vLLM's LLaVA builds CLIP/SigLIP/Pixtral towers only (init_vision_tower_for_llava) and
    projector acts from its get_act_fn registry, which has no "linear"."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from tests.test_backbones import VC, make_dinov3, make_qwen3vl, write_modelscope_clip

    exportable = dict(feature_layer=-1, feature_select="all", feature_post_norm=False)
    clip_mlp = spec_of(tiny.vision, tiny.llm, projector="mlp2x_gelu", **exportable)
    assert export_blockers(clip_mlp) == [] and vllm_blockers(clip_mlp) == []
    assert vllm_verdict(clip_mlp) == "vLLM: yes" and export_verdict(clip_mlp) == "export_hf.py: yes; vLLM: yes"

    clip_linear = spec_of(tiny.vision, tiny.llm, projector="linear", **exportable)
    (reason,) = vllm_blockers(clip_linear)
    assert "projector_hidden_act='linear'" in reason and "--projector mlp2x_gelu" in reason
    assert vllm_verdict(clip_linear) == f"vLLM: no — {reason}"

    write_modelscope_clip(tmp_path / "zh")
    zh = vllm_blockers(spec_of(tmp_path / "zh", tiny.llm, projector="linear", **exportable))
    assert len(zh) == 2 and "ChineseCLIPVisionModel" in zh[0] and "CLIP, SigLIP and Pixtral" in zh[0]
    assert "'linear'" in zh[1]
    make_dinov3(tmp_path / "dino")
    (dino,) = vllm_blockers(spec_of(tmp_path / "dino", tiny.llm, projector="mlp2x_gelu", **exportable))
    assert "DINOv3ViTModel" in dino

    SiglipVisionModel(SiglipVisionConfig(**VC)).save_pretrained(tmp_path / "siglip")
    assert vllm_blockers(spec_of(tmp_path / "siglip", tiny.llm, projector="mlp2x_gelu", **exportable)) == []

    # vLLM builds the tower's MLP act with the same registry
    (tmp_path / "odd_act").mkdir()
    with open(os.path.join(tiny.vision, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    (tmp_path / "odd_act" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_10"}))
    (odd,) = vllm_blockers(spec_of(tmp_path / "odd_act", tiny.llm, projector="mlp2x_gelu", **exportable))
    assert "'gelu_10'" in odd

    # The text model: Qwen3-VL's exports as Qwen3ForCausalLM (in vLLM's registry); one not checked says so.
    make_qwen3vl(tmp_path / "qwen3vl")
    assert vllm_blockers(spec_of(tiny.vision, tmp_path / "qwen3vl", projector="mlp2x_gelu", **exportable)) == []
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (text,) = vllm_blockers(spec_of(tiny.vision, tmp_path / "gpt2", projector="mlp2x_gelu", **exportable))
    assert "GPT2LMHeadModel" in text


def test_course_and_demo_recipes_cannot_be_exported(tiny, tmp_path):
    """The course preset's features (ln_post on all 197 tokens) and the toy demo's (the same recipe
    on its CLIP) are refused without loading anything, with the recipe that exports."""
    from tests.test_backbones import write_modelscope_clip

    write_modelscope_clip(tmp_path / "zh")
    preset = PRESETS["clip-zh-qwen3-0.6b"]
    course = spec_of(tmp_path / "zh", tiny.llm, projector=preset["projector"], **vision_defaults(preset["vision_tower"]))
    # The demos' features (their DEMO_DEFAULTS): the course's recipe on the toy CLIP.
    demo = spec_of(tiny.vision, tiny.llm, projector="linear", feature_layer=-1, feature_select="all",
                   feature_post_norm=True)
    for spec in (course, demo):
        (blocker,) = export_blockers(spec)
        assert "feature_post_norm=True" in blocker
        assert vllm_verdict(spec) == "vLLM: no — the checkpoint cannot be exported at all"
        line = export_verdict(spec)
        assert line.startswith("export_hf.py: no (feature_post_norm=True")
        assert "--no-feature_post_norm" in line and "--projector mlp2x_gelu" in line and "\n" not in line
    # DINOv3 keeping only patches drops CLS + 4 registers; LLaVA drops one token
    from tests.test_backbones import make_dinov3

    make_dinov3(tmp_path / "dino")
    (blocker,) = export_blockers(spec_of(tmp_path / "dino", tiny.llm, feature_select="patch", feature_post_norm=False))
    assert "registers" in blocker and "--feature_select all" in blocker


def test_the_docs_say_which_exports_load_where():
    """Where users read about exports, the course preset and stages 2/3 (docs/export.md, docs/training.md):
    the course's recipe (and the demos') cannot be exported, the exportable recipe in one line, and
    exactly what vLLM loads."""
    export_section = doc_section("# 导出为 transformers LLaVA")
    heading = export_section.splitlines()[0]
    assert "可用于 vLLM" not in heading            # not every export: say which
    for needle in ("vLLM: yes", "vLLM: no", "`linear`", "Chinese-CLIP", "DINOv3", "--projector mlp2x_gelu",
                   "--no-feature_post_norm", "eval_llava.py", "get_act_fn", "init_vision_tower_for_llava"):
        assert needle in export_section, needle
    for heading in ("## Stage 2 与 stage 3", "## 课程的命令行"):
        section = doc_section(heading)
        assert "--no-feature_post_norm" in section and "--projector mlp2x_gelu" in section, heading
    assert "导不出" in doc_section("## Stage 2 与 stage 3")
