"""Where the frozen backbones come from: short ids, presets, local folders in each real
on-disk format, and the loaders that turn them into transformers modules.

    python checkpoint_io.py --list                             # ids and presets
    python checkpoint_io.py --summary --model clip-zh-qwen3-0.6b   # tokens, widths, parameters (no download)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from modelscope_clip import load_modelscope_chinese_clip, read_json
from utils import console
from utils.hub import fetch_snapshot, read_hf_token

# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelInfo:
    """A short id: where to download it and how to use it by default."""

    kind: str                       # vision | llm
    hf: str                         # Hugging Face repo id
    modelscope: str | None          # ModelScope repo id (None: not mirrored there)
    family: str = ""                # vision: a key of FEATURE_DEFAULTS
    gated: bool = False             # needs an HF token (DINOv3)
    note: str = ""


# The one table of feature defaults per tower family, used by training, the feature cache,
# the dataset preview and `describe` alike (flags a user types win). Each follows the family's
# usual stage-1 recipe:
#   Chinese CLIP (the course): last layer, all 197 tokens, ln_post on all of them, no proj.
#   CLIP (LLaVA-1.5): layer -2, patch tokens only, no final norm.
#   SigLIP: no CLS; last layer with post-layernorm (= its last_hidden_state).
#   DINOv3: last layer after its final norm, patch tokens only: CLS and the 4 registers
#   are dropped (registers are global "sink" tokens without a place in the image).
FEATURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "chinese_clip": dict(feature_layer=-1, feature_select="all", feature_post_norm=True),
    "clip": dict(feature_layer=-2, feature_select="patch", feature_post_norm=False),
    "siglip": dict(feature_layer=-1, feature_select="all", feature_post_norm=True),
    "dinov3": dict(feature_layer=-1, feature_select="patch", feature_post_norm=True),
}

REGISTRY: dict[str, ModelInfo] = {
    "clip-vit-b16-zh": ModelInfo("vision", "OFA-Sys/chinese-clip-vit-base-patch16", "iic/multi-modal_clip-vit-base-patch16_zh",
                                 "chinese_clip", note="ModelScope format by default (the course); 197 tokens x 768"),
    "clip-vit-b16": ModelInfo("vision", "openai/clip-vit-base-patch16", "openai-mirror/clip-vit-base-patch16", "clip",
                              note="196 tokens x 768"),
    "clip-vit-l14-336": ModelInfo("vision", "openai/clip-vit-large-patch14-336", "openai-mirror/clip-vit-large-patch14-336",
                                  "clip", note="LLaVA-1.5's tower; 576 tokens x 1024"),
    "siglip-b16-224": ModelInfo("vision", "google/siglip-base-patch16-224", "google/siglip-base-patch16-224", "siglip",
                                note="196 tokens x 768"),
    "siglip-so400m-384": ModelInfo("vision", "google/siglip-so400m-patch14-384", "google/siglip-so400m-patch14-384",
                                   "siglip", note="729 tokens x 1152"),
    "dinov3-vits16": ModelInfo("vision", "facebook/dinov3-vits16-pretrain-lvd1689m", "facebook/dinov3-vits16-pretrain-lvd1689m",
                               "dinov3", gated=True, note="196 tokens x 384"),
    "dinov3-vitb16": ModelInfo("vision", "facebook/dinov3-vitb16-pretrain-lvd1689m", "facebook/dinov3-vitb16-pretrain-lvd1689m",
                               "dinov3", gated=True, note="196 tokens x 768"),
    "dinov3-vitl16": ModelInfo("vision", "facebook/dinov3-vitl16-pretrain-lvd1689m", "facebook/dinov3-vitl16-pretrain-lvd1689m",
                               "dinov3", gated=True, note="196 tokens x 1024"),
    "qwen3-0.6b": ModelInfo("llm", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", note="D_lm 1024"),
    "qwen3-1.7b": ModelInfo("llm", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B", note="D_lm 2048"),
    "qwen3vl-2b-text": ModelInfo("llm", "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct",
                                 note="text model of Qwen3-VL-2B (vision weights never loaded); D_lm 2048"),
    "qwen3vl-4b-text": ModelInfo("llm", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-4B-Instruct",
                                 note="text model of Qwen3-VL-4B (vision weights never loaded); D_lm 2560"),
}

# --model presets: a whole combination; any flag the user types overrides its part.
PRESETS: dict[str, dict[str, Any]] = {
    # The course: Chinese CLIP ViT-B/16 + linear 768->1024 + Qwen3-0.6B, first 100k SA1B captions.
    "clip-zh-qwen3-0.6b": dict(vision_tower="clip-vit-b16-zh", llm="qwen3-0.6b", projector="linear",
                               lr=2e-3, batch_size=16, max_samples=100_000, data_format="sa1b"),
    # The align plan: DINOv3 ViT-B/16 + the text model of Qwen3-VL-2B, Prismatic's align-stage
    # defaults (gelu-mlp projector, lr 1e-3, global batch 256, cosine with 3% warmup, 1 epoch, FSDP
    # keeping parameters gathered from forward to backward).
    "dinov3-qwen3vltext-align": dict(vision_tower="dinov3-vitb16", llm="qwen3vl-2b-text", projector="mlp2x_gelu",
                                     lr=1e-3, batch_size=16, global_batch_size=256, epochs=1, weight_decay=0.0,
                                     max_grad_norm=1.0, warmup_ratio=0.03, save_interval=100, data_format="chat",
                                     train_strategy="fsdp-shard-grad-op"),
    # LLaVA-1.5's recipe on a Qwen3 LLM: CLIP-L/14-336 (layer -2, patches) + mlp2x_gelu.
    "llava15-qwen3-1.7b": dict(vision_tower="clip-vit-l14-336", llm="qwen3-1.7b", projector="mlp2x_gelu",
                               lr=1e-3, batch_size=32, global_batch_size=256, warmup_ratio=0.03, data_format="chat"),
}


class MissingModel(FileNotFoundError):
    """A registry id with no local folder yet; the message holds the command that fetches it."""


def download_command(model_id: str, models_dir: str) -> str:
    return f"python scripts/download_models.py {model_id} --models_dir {models_dir}"


def resolve_model(name: str, models_dir: str = "models") -> str:
    """An id or a path -> a local directory. Never downloads (that is an explicit script)."""
    if os.path.isdir(name):
        return name
    if name in REGISTRY:
        path = os.path.join(models_dir, name)
        if os.path.isdir(path) and os.listdir(path):
            return path
        raise MissingModel(f"model '{name}' is not in {models_dir}/. Download it first:\n  "
                           f"{download_command(name, models_dir)}\n(or point at a local folder)")
    raise FileNotFoundError(f"'{name}' is neither a local directory nor a known id ({', '.join(REGISTRY)})")


# --------------------------------------------------------------------------- downloads (an explicit step)

def download(model_id: str, models_dir: str = "models", source: str = "modelscope",
             hf_token: str | None = ".hf_token", log=print) -> str:
    """Fetch one registry id into <models_dir>/<id> and return that path.

    The files land in <id>.partial first and are renamed when complete, so an interrupted
    download is never mistaken for a model (resuming reuses the partial folder).
    """
    if model_id not in REGISTRY:
        raise SystemExit(f"unknown id {model_id!r}; known: {', '.join(REGISTRY)}")
    info = REGISTRY[model_id]
    target = os.path.join(models_dir, model_id)
    if os.path.isdir(target) and os.listdir(target):
        log(f"{model_id}: already in {target}")
        return target
    repo = info.modelscope if source == "modelscope" else info.hf
    if repo is None or (info.gated and source == "modelscope"):
        log(f"{model_id}: not on ModelScope{' (gated model)' if info.gated else ''}; using Hugging Face ({info.hf})")
        source, repo = "hf", info.hf
    token = read_hf_token(hf_token) if source == "hf" else None
    if info.gated and not token:
        raise SystemExit(f"{model_id} is gated on Hugging Face: accept its licence at https://huggingface.co/{info.hf}, "
                         f"then put your token in .hf_token or pass --hf_token ENV_VAR_NAME")
    partial = target + ".partial"
    log(f"{model_id}: downloading {repo} from {source} -> {target}")
    fetch_snapshot(source, repo, partial, token)
    shutil.rmtree(os.path.join(partial, ".cache"), ignore_errors=True)  # hub bookkeeping, not model files
    os.replace(partial, target)
    return target


def vision_defaults(name: str, path: str | None = None) -> dict[str, Any]:
    """Feature defaults for a tower (FEATURE_DEFAULTS of its family): the registry names the
    family of an id, the files of a folder name theirs."""
    family = REGISTRY[name].family if name in REGISTRY else VISION_TYPES[detect_vision_type(path or name)][0]
    return dict(FEATURE_DEFAULTS[family])


# --------------------------------------------------------------------------- on-disk formats

# model_type in config.json -> (family, transformers class, attribute of the final norm).
# Features are always `hidden_states[feature_layer]`, optionally passed through the final
# norm: that one rule expresses LLaVA-1.5 (layer -2, no norm), the course (layer -1 +
# ln_post on all tokens), SigLIP and DINOv3 (layer -1 + norm == their last_hidden_state).
VISION_TYPES: dict[str, tuple[str, str, str]] = {
    "clip_vision_model": ("clip", "CLIPVisionModel", "post_layernorm"),
    "clip": ("clip", "CLIPVisionModel", "post_layernorm"),
    "chinese_clip_vision_model": ("chinese_clip", "ChineseCLIPVisionModel", "post_layernorm"),
    "chinese_clip": ("chinese_clip", "ChineseCLIPVisionModel", "post_layernorm"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel", "post_layernorm"),
    "siglip": ("siglip", "SiglipVisionModel", "post_layernorm"),
    "dinov3_vit": ("dinov3", "DINOv3ViTModel", "norm"),
    "modelscope_chinese_clip": ("chinese_clip", "ChineseCLIPVisionModel", "post_layernorm"),
}


MODELSCOPE_CLIP = "modelscope_chinese_clip"


def detect_vision_type(path: str) -> str:
    """The model_type of a tower folder, from its files: a transformers config.json, or
    ModelScope's own Chinese-CLIP layout (configuration.json + pytorch_model.bin)."""
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        model_type = read_json(cfg_path).get("model_type", "")
        if model_type not in VISION_TYPES:
            raise ValueError(f"{path}: unsupported vision model_type {model_type!r}; supported: {sorted(VISION_TYPES)}")
        return model_type
    if os.path.isfile(os.path.join(path, "configuration.json")) and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return MODELSCOPE_CLIP
    raise FileNotFoundError(f"{path}: neither a transformers model (config.json) nor ModelScope's Chinese-CLIP "
                            "layout (configuration.json + pytorch_model.bin)")


def from_pretrained_strict(cls, path: str, what: str, **kwargs) -> nn.Module:
    """`cls.from_pretrained` that refuses missing or mis-shaped weights (they would be random
    and frozen: a silent 'loss stuck' run). Unexpected keys are normal when the folder holds a
    whole dual-tower CLIP (its text tower); they are counted in one line, not a table."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report below, once, in our own words
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    bad = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise RuntimeError(f"{what} {path}: {len(bad)} weights missing or mis-shaped, e.g. {bad[:3]}")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        prefixes = sorted({k.split(".")[0] for k in unexpected})
        console.info(f"{what}: ignored {len(unexpected)} weights not part of {cls.__name__} ({', '.join(prefixes)})")
    return model


# --------------------------------------------------------------------------- preprocessing

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}   # PIL's numbering in processor configs


def preprocessing(path: str, image_size: int) -> dict[str, Any]:
    """A tower's image preprocessing as the dict dataset.ImageTransform is built from (and a
    checkpoint stores): its preprocessor_config.json when it has one, else the family default.
    ModelScope's Chinese-CLIP pipeline resizes straight to image_size, no crop; CLIP crops.

    mode "shortest_edge": resize the short side to `size`, centre-crop `size`x`size`;
    mode "square": resize straight to `size`x`size`."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(cfg_path):
        mode = "square" if detect_vision_type(path) == MODELSCOPE_CLIP else "shortest_edge"
        return {"size": image_size, "mode": mode, "resample": "bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    cfg = read_json(cfg_path)
    size = cfg.get("size", image_size)
    crop = cfg.get("do_center_crop", False)
    if isinstance(size, dict) and "shortest_edge" in size:
        target, mode = size["shortest_edge"], "shortest_edge" if crop else "square"
    elif isinstance(size, dict):
        target, mode = size.get("height", image_size), "square"
    else:
        target, mode = int(size), "shortest_edge" if crop else "square"
    if crop:
        crop_size = cfg.get("crop_size", target)
        crop_size = crop_size.get("height", target) if isinstance(crop_size, dict) else crop_size
        if crop_size != target:
            raise ValueError(f"{cfg_path}: resize {target} with crop {crop_size} is not supported")
    resample = cfg.get("resample", 3)
    return {"size": int(target), "mode": mode, "resample": RESAMPLE_NAMES.get(resample, str(resample)),
            "mean": list(cfg.get("image_mean", CLIP_MEAN)), "std": list(cfg.get("image_std", CLIP_STD))}


# --------------------------------------------------------------------------- LLMs

def llm_type(path: str) -> str:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{path}: no config.json; not a transformers LLM directory")
    return read_json(cfg).get("model_type", "")


def qwen3vl_text_config(path: str):
    """The Qwen3Config equivalent to a Qwen3-VL checkpoint's text model.

    With text-only inputs the three M-RoPE position streams are equal, so interleaved
    M-RoPE is ordinary 1-D RoPE and the text model is exactly Qwen3 (checked against
    Qwen3VLForConditionalGeneration's logits in tests/test_backbones.py).
    """
    from transformers import Qwen3Config

    top = read_json(os.path.join(path, "config.json"))
    t = top["text_config"]
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"{path}: rope type {rope.get('rope_type')!r} has no exact Qwen3 equivalent")
    theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))
    tied = top.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    return Qwen3Config(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"], head_dim=t.get("head_dim", t["hidden_size"] // t["num_attention_heads"]),
        hidden_act=t.get("hidden_act", "silu"), max_position_embeddings=t.get("max_position_embeddings", 32768),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), attention_bias=t.get("attention_bias", False),
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tied,
        bos_token_id=t.get("bos_token_id"), eos_token_id=t.get("eos_token_id"), pad_token_id=t.get("pad_token_id"))


def load_qwen3vl_text(path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The text model + LM head of a Qwen3-VL checkpoint as a Qwen3ForCausalLM. Only the
    `model.language_model.*` and `lm_head` tensors are read: the vision tower is never loaded."""
    from safetensors import safe_open
    from transformers import Qwen3ForCausalLM

    cfg = qwen3vl_text_config(path)
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith("model.language_model."):
                    state["model." + k[len("model.language_model."):]] = fh.get_tensor(k).to(dtype)
                elif k == "lm_head.weight":
                    state[k] = fh.get_tensor(k).to(dtype)
    with torch.device("meta"):
        llm = Qwen3ForCausalLM(cfg)
    missing, unexpected = llm.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{path}: Qwen3-VL text weights incomplete; missing={missing[:3]} unexpected={unexpected[:3]}")
    if cfg.tie_word_embeddings:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    # Buffers (rotary inv_freq) were created on meta: rebuild them on the CPU.
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=cfg)
    llm.config._attn_implementation = attn_implementation
    return llm


def load_llm(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
             trust_remote_code: bool = False, quantization_config: Any = None) -> nn.Module:
    """A causal LM from a local directory, frozen and in eval mode. A Qwen3-VL folder gives
    its text model (AutoModelForCausalLM rejects that config). `quantization_config`: a 4-bit
    base for QLoRA (tuning.quantization_config)."""
    from transformers import AutoModelForCausalLM

    if llm_type(path) == "qwen3_vl":
        if quantization_config is not None:
            raise SystemExit(f"{path}: a 4-bit Qwen3-VL text model is not supported; use a Qwen3 LLM for QLoRA")
        llm = load_qwen3vl_text(path, dtype, attn_implementation)
    else:
        extra = {"quantization_config": quantization_config, "device_map": {"": torch.cuda.current_device()}} \
            if quantization_config is not None else {}
        llm = from_pretrained_strict(AutoModelForCausalLM, path, "LLM", dtype=dtype, attn_implementation=attn_implementation,
                                     trust_remote_code=trust_remote_code, **extra)
    llm.requires_grad_(False)
    llm.eval()
    return llm


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The LLM's tokenizer with its chat template. Multimodal repos (Qwen3-VL) may keep the
    template beside the processor (chat_template.json / .jinja) rather than in the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None):
        for name in ("chat_template.jinja", "chat_template.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    tok.chat_template = json.load(fh)["chat_template"] if name.endswith(".json") else fh.read()
                break
    return tok


def knows_vision_markers(path: str) -> bool:
    """Image slots are wrapped in <|vision_start|> ... <|vision_end|> by default only for LLMs
    trained with them (Qwen3-VL); Qwen3 text models have the tokens but never saw them."""
    return llm_type(path) in ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")


# --------------------------------------------------------------------------- summary from configs

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def arch_config(name: str, models_dir: str = "models"):
    """The transformers config of an id or folder without loading weights: the local folder
    when present, else the real-size config bundled in configs/<id>.json."""
    from transformers import AutoConfig

    try:
        path = resolve_model(name, models_dir)
    except MissingModel:
        path = None
    if path and detect_kind(path) == "vision" and detect_vision_type(path) == MODELSCOPE_CLIP:
        return load_modelscope_chinese_clip(path).config
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return AutoConfig.from_pretrained(path)
    bundled = os.path.join(CONFIGS_DIR, f"{name}.json")
    if not os.path.isfile(bundled):
        raise FileNotFoundError(f"no local folder and no bundled config for {name!r}")
    d = read_json(bundled)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def detect_kind(path: str) -> str:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return "vision"  # ModelScope's Chinese-CLIP layout has no config.json
    mt = read_json(cfg).get("model_type", "")
    return "vision" if mt in VISION_TYPES else "llm"


def vision_arch(vision: str, models_dir: str = "models"):
    """The vision half of a tower's config (a dual-tower CLIP folder holds both halves)."""
    vcfg = arch_config(vision, models_dir)
    return getattr(vcfg, "vision_config", vcfg)


def prefix_tokens(vcfg) -> int:
    """Tokens before the patches in a tower's hidden states: CLS for CLIP types, none for
    SigLIP, CLS + registers for DINOv3."""
    family = VISION_TYPES[vcfg.model_type][0]
    return {"clip": 1, "chinese_clip": 1, "siglip": 0}.get(family, 1 + getattr(vcfg, "num_register_tokens", 0))


def image_tokens(vcfg, select: str) -> int:
    """Image slots per image: the patch grid, plus the prefix tokens when all are kept."""
    grid = vcfg.image_size // vcfg.patch_size
    return grid * grid + (prefix_tokens(vcfg) if select == "all" else 0)


def describe(vision: str, llm: str, models_dir: str = "models", feature_layer: int | None = None,
             feature_select: str | None = None) -> dict[str, Any]:
    """Token accounting from configs alone (meta device, nothing loaded or downloaded): image
    tokens, widths, parameters of the frozen parts. Unset feature flags take the tower family's
    defaults, as training does. checkpoint_io.summary_from_configs adds the projector."""
    import transformers

    vcfg, lcfg = vision_arch(vision, models_dir), arch_config(llm, models_dir)
    if getattr(lcfg, "model_type", "") == "qwen3_vl":
        lcfg = _qwen3vl_text_config_from(lcfg)
    select = feature_select or FEATURE_DEFAULTS[VISION_TYPES[vcfg.model_type][0]]["feature_select"]
    with torch.device("meta"):
        vmodel = getattr(transformers, VISION_TYPES[vcfg.model_type][1])(vcfg)
        lmodel = transformers.AutoModelForCausalLM.from_config(lcfg)
    return {"vision": vision, "llm": llm, "image_tokens_per_image": image_tokens(vcfg, select),
            "d_v": vcfg.hidden_size, "d_lm": lcfg.hidden_size,
            "params": {"vision": sum(p.numel() for p in vmodel.parameters()),
                       "llm": sum(p.numel() for p in lmodel.parameters())}}


def _qwen3vl_text_config_from(cfg):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        return qwen3vl_text_config(d)


