"""ModelScope's own Chinese-CLIP format (`iic/multi-modal_clip-vit-base-patch16_zh`, the course's
tower): `configuration.json` + `pytorch_model.bin` holding the original Chinese-CLIP key names
(visual.conv1, visual.transformer.resblocks.N.attn.in_proj_weight, visual.ln_post, visual.proj,
bert.*), read as transformers' ChineseCLIPVisionModel. backbones.py detects the format and
loads towers through this; scripts/clip_eval.py reads both towers of the file.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# Chinese-CLIP's head width when vision_model_config.json does not say (its CLIP() defaults to 64;
# its checkpoint loader uses 80 for ViT-H/14's 1280 width and 104 for 1664).
MODELSCOPE_HEAD_WIDTH = {1280: 80, 1664: 104}


def modelscope_clip_architecture(path: str, sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The tower's shape in Chinese-CLIP's own config names (vision_width, vision_layers,
    vision_patch_size, image_resolution, vision_head_width).

    Everything but the head width can be read off the tensors; the head width cannot (attention
    weights are [3W, W] for any head count), and a wrong one gives silently wrong features. So
    ModelScope's vision_model_config.json is read when the folder has it and must agree with
    the tensors; without it, Chinese-CLIP's own rule applies."""
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    found = {"vision_width": int(width), "vision_patch_size": int(patch), "image_resolution": int(grid * patch),
             "vision_layers": 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))}
    cfg_path = os.path.join(path, "vision_model_config.json")
    declared = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    wrong = [f"{k} {declared[k]} in the file but {v} in the weights" for k, v in found.items()
             if k in declared and declared[k] != v]
    if wrong:
        raise ValueError(f"{cfg_path} does not describe {path}/pytorch_model.bin: {'; '.join(wrong)}")
    head = int(declared.get("vision_head_width", MODELSCOPE_HEAD_WIDTH.get(found["vision_width"], 64)))
    if head <= 0 or found["vision_width"] % head:
        source = f"vision_head_width {head} in {cfg_path}" if "vision_head_width" in declared else \
            f"the default head width {head} (no vision_head_width in {cfg_path})"
        raise ValueError(f"{path}: vision width {found['vision_width']} is not a multiple of {source}; "
                         "give the tower's real head width in vision_model_config.json")
    return {**found, "vision_head_width": head}


def modelscope_state_dict(path: str) -> dict[str, torch.Tensor]:
    """ModelScope's Chinese-CLIP pytorch_model.bin as one flat state dict with the original key
    names (visual.*, bert.*, text_projection, logit_scale; 'module.'/'clip_model.' prefixes
    stripped). Read with weights_only=True: no pickle code runs from a downloaded file."""
    raw = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raw = raw.get("state_dict", raw)
    out = {}
    for k, v in raw.items():
        for prefix in ("module.", "clip_model."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def load_modelscope_chinese_clip(path: str, dtype: torch.dtype = torch.float32,
                                 state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """ModelScope's own Chinese-CLIP checkpoint (original key names: visual.conv1,
    visual.transformer.resblocks.N.attn.in_proj_weight, visual.ln_post, visual.proj, bert.*)
    -> transformers' ChineseCLIPVisionModel. The architecture comes from the tensor shapes and
    vision_model_config.json (the head width); `visual.proj` (the contrastive head) and the
    text tower are not part of the tower. `state`: the file already read (modelscope_state_dict).
    """
    from transformers import ChineseCLIPVisionConfig, ChineseCLIPVisionModel

    state = modelscope_state_dict(path) if state is None else state
    sd = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if "conv1.weight" not in sd:
        raise ValueError(f"{path}/pytorch_model.bin: no visual.* weights of a Chinese-CLIP VisualTransformer")
    arch = modelscope_clip_architecture(path, sd)
    cfg = ChineseCLIPVisionConfig(hidden_size=arch["vision_width"], num_hidden_layers=arch["vision_layers"],
                                  intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                                  num_attention_heads=arch["vision_width"] // arch["vision_head_width"],
                                  image_size=arch["image_resolution"], patch_size=arch["vision_patch_size"],
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
    n_layers = arch["vision_layers"]
    out = {"embeddings.class_embedding": sd["class_embedding"],
           "embeddings.patch_embedding.weight": sd["conv1.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "pre_layrnorm.weight": sd["ln_pre.weight"], "pre_layrnorm.bias": sd["ln_pre.bias"],
           "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"]}
    for i in range(n_layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, t in zip("qkv", sd[src + "attn.in_proj_weight"].chunk(3)):
            out[f"{dst}self_attn.{name}_proj.weight"] = t
        for name, t in zip("qkv", sd[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{name}_proj.bias"] = t
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    model = ChineseCLIPVisionModel(cfg)
    missing, unexpected = model.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: ModelScope Chinese-CLIP mapping incomplete; missing={missing} unexpected={unexpected}")
    return model.to(dtype)
