"""Every family from a tiny random checkpoint in its real on-disk layout, loaded through the
same code a user's download goes through."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from backbones import VISION_TYPES, detect_vision_type, load_llm, vision_defaults
from checkpoint_io import load_vision_tower

VC = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


# --------------------------------------------------------------------------- ModelScope Chinese CLIP

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, d * 4), gelu=QuickGELU(), c_proj=nn.Linear(d * 4, d)))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """Chinese-CLIP's / OpenAI CLIP's original vision tower, written independently of
    transformers: the reference the ModelScope key mapping is checked against."""

    def __init__(self, image=32, patch=8, width=128, layers=2, out_dim=16, head_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, width // head_width)
                                                     for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def course_features(self, x):
        """The course's CLIPVisionTower: all tokens, ln_post on every one, no proj."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)                        # [B, grid², width]
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)                                  # LND
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x)


def write_modelscope_clip(path, wrap_module=True, width=128, head_width=64, config="write"):
    """ModelScope's layout: configuration.json + pytorch_model.bin holding the whole Chinese
    CLIP (visual.* and bert.*) under the original key names, and vision_model_config.json
    (config="write"; "omit" leaves it out, a dict is written as given)."""
    torch.manual_seed(0)
    ref = VisualTransformer(width=width, head_width=head_width).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial LayerNorm affine too
    state = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    state["bert.embeddings.word_embeddings.weight"] = torch.randn(10, 8)  # text tower: ignored
    state["logit_scale"] = torch.tensor(4.6)
    if wrap_module:
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "multi-modal-embedding", "pipeline": {"type": "multi-modal-embedding"},
        "model": {"type": "clip-multi-modal-embedding"}}))
    if config == "write":  # Chinese-CLIP's model_configs: vision_head_width only where it is not 64 (ViT-H/14)
        config = {"embed_dim": 16, "image_resolution": 32, "vision_layers": 2, "vision_width": width,
                  "vision_patch_size": 8, **({"vision_head_width": head_width} if head_width != 64 else {})}
    if isinstance(config, dict):
        (path / "vision_model_config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("wrap_module, width, head_width, config", [
    (True, 128, 64, "write"),   # the course's B/16 shape: 64-wide heads, weights under state_dict/module.
    (False, 128, 64, "omit"),   # no vision_model_config.json: read off the tensors
    (True, 320, 80, "write"),   # ViT-H/14's 80-wide heads: only the config knows (a 64 guess was silently wrong)
    (False, 48, 16, "write"),   # a narrow tower (a 64 guess crashed)
])
def test_modelscope_chinese_clip_matches_the_original_architecture(tmp_path, wrap_module, width, head_width, config):
    """ModelScope's Chinese-CLIP layout -> ChineseCLIPVisionModel gives the original
    architecture's features (the course's: all tokens, ln_post on each, no proj)."""
    ref = write_modelscope_clip(tmp_path / "ms", wrap_module, width=width, head_width=head_width, config=config)
    assert detect_vision_type(str(tmp_path / "ms")) == "modelscope_chinese_clip"
    d = vision_defaults("clip-vit-b16-zh", str(tmp_path / "ms"))
    assert d == dict(feature_layer=-1, feature_select="all", feature_post_norm=True)  # the course's semantics
    tower = load_vision_tower(str(tmp_path / "ms"), feature_layer=-1, select="all", post_norm=True)
    assert (tower.num_tokens, tower.hidden_size, tower.model.config.num_attention_heads) == (17, width, width // head_width)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.course_features(x)
    torch.testing.assert_close(tower(x), expected, rtol=1e-4, atol=1e-4)


def test_modelscope_clip_config_that_contradicts_the_weights_is_refused(tmp_path):
    write_modelscope_clip(tmp_path / "a", width=128, config={"vision_width": 768, "vision_layers": 2,
                                                              "vision_patch_size": 8, "image_resolution": 32})
    with pytest.raises(ValueError, match="vision_width 768 in the file but 128 in the weights"):
        load_vision_tower(str(tmp_path / "a"))
    # No config and a width the default head width (64) does not divide: a clear error, not a crash.
    write_modelscope_clip(tmp_path / "b", width=48, head_width=16, config="omit")
    with pytest.raises(ValueError, match="width 48 is not a multiple of the default head width 64"):
        load_vision_tower(str(tmp_path / "b"))


def test_modelscope_layout_without_visual_weights_is_refused(tmp_path):
    (tmp_path / "configuration.json").write_text("{}")
    torch.save({"bert.x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no visual"):
        load_vision_tower(str(tmp_path))


# --------------------------------------------------------------------------- transformers towers

def test_chinese_clip_hf_layout(tmp_path):
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    full = ChineseCLIPModel(ChineseCLIPConfig(vision_config=VC, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99))).eval()
    full.save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path), **{"feature_layer": -1, "select": "all", "post_norm": True})
    x = torch.randn(2, 3, 32, 32)
    expected = full.vision_model.post_layernorm(full.vision_model(pixel_values=x).last_hidden_state)
    torch.testing.assert_close(tower(x), expected)
    assert VISION_TYPES[detect_vision_type(str(tmp_path))][0] == "chinese_clip"


def test_siglip_default_is_its_last_hidden_state(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    m = SiglipVisionModel(SiglipVisionConfig(**VC)).eval()
    m.save_pretrained(tmp_path)
    d = vision_defaults(str(tmp_path), str(tmp_path))
    tower = load_vision_tower(str(tmp_path), d["feature_layer"], d["feature_select"], d["feature_post_norm"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(x), m(pixel_values=x).last_hidden_state)
    assert tower.num_tokens == 16  # no CLS


def make_dinov3(path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    m = DINOv3ViTModel(DINOv3ViTConfig(**VC, num_register_tokens=4)).eval()
    m.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return m


def test_dinov3_drops_cls_and_registers_and_stays_in_eval(tmp_path):
    from backbones import preprocessing

    m = make_dinov3(tmp_path)
    d = vision_defaults("dinov3-vitb16", str(tmp_path))
    tower = load_vision_tower(str(tmp_path), d["feature_layer"], d["feature_select"], d["feature_post_norm"])
    assert tower.num_prefix_tokens == 5 and tower.num_tokens == 16
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(x), m(pixel_values=x).last_hidden_state[:, 5:])
    t = preprocessing(str(tmp_path), 32)
    assert (t["mode"], t["resample"], t["mean"]) == ("square", "bilinear", [0.485, 0.456, 0.406])


def test_dinov3_features_identical_across_calls_while_the_projector_trains(tmp_path):
    """DINOv3 randomises RoPE in train mode; a frozen tower must never enter it."""
    from model import LlavaModel, ModelSpec, Projector

    make_dinov3(tmp_path)
    tower = load_vision_tower(str(tmp_path), -1, "patch", True)
    proj = Projector("linear", 32, 8)
    model = LlavaModel(tower, proj, nn.Linear(1, 1), ModelSpec("v", "l"), 0)  # LLM unused here
    model.train()
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    first = model.encode_images(x)
    for _ in range(2):
        loss = proj(model.encode_images(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not tower.training and not tower.model.training
    assert torch.equal(first, model.encode_images(x))
    tower.model.train()  # even a direct call on the inner model is put back by LlavaModel.train
    model.train()
    assert not tower.model.training


# --------------------------------------------------------------------------- Qwen3-VL text model

def make_qwen3vl(path, vocab_size=128, tokenizer_dir=None):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=8, deepstack_visual_indexes=[0]), tie_word_embeddings=True)
    m = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    m.save_pretrained(path)
    return m


def test_qwen3vl_text_model_logits_match_the_full_model(tmp_path):
    full = make_qwen3vl(tmp_path)
    llm = load_llm(str(tmp_path))
    assert type(llm).__name__ == "Qwen3ForCausalLM" and not any(p.requires_grad for p in llm.parameters())
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()  # tied, as in the checkpoint
    ids = torch.randint(0, 128, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in batched generation
    with torch.no_grad():
        ours = llm(input_ids=ids, attention_mask=mask).logits
        ref = full(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1, 4:], ref[1, 4:], rtol=0, atol=1e-5)


def test_qwen3vl_loader_never_reads_vision_weights(tmp_path, monkeypatch):
    from safetensors import safe_open

    make_qwen3vl(tmp_path)
    read = []
    real = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.fh = real(*a, **k)

        def __enter__(self):
            self.inner = self.fh.__enter__()
            return self

        def __exit__(self, *a):
            return self.fh.__exit__(*a)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, k):
            read.append(k)
            return self.inner.get_tensor(k)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    load_llm(str(tmp_path))
    assert read and not any(k.startswith("model.visual") for k in read)
