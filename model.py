"""LLaVA model: frozen vision tower -> trainable projector -> LLM (frozen in stage 1; tuned in
full or through LoRA adapters in stages 2 and 3, see tuning.py).

Shape legend (used in every comment below):
    B    batch size (samples)           N     image tokens per image
    T    text tokens incl. image slots  M     supervised tokens in the batch
    D_v  vision width                   D_lm  LLM width            V  vocabulary size

    image [B,3,H,W] -> VisionTower -> [B,N,D_v] -> Projector -> [B,N,D_lm] --+
    ids [B,T] (N slots per image) -> embed_tokens -> [B,T,D_lm] <- scatter -+-> LLM -> loss

In stage 1 only the projector has trainable parameters. CPU checks (nothing is downloaded):
    python model.py --summary --model clip-zh-qwen3-0.6b
    python model.py --summary --vision_tower models/toy/vision --llm models/toy/llm
    python model.py --list
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from backbones import (MODELSCOPE_CLIP, PRESETS, REGISTRY, VISION_TYPES, describe, detect_vision_type,
                       from_pretrained_strict, image_tokens, knows_vision_markers, load_llm,
                       load_modelscope_chinese_clip, load_tokenizer, prefix_tokens, preprocessing, resolve_model)
from prompts import CHAT_TEMPLATE_KWARGS, IGNORE_INDEX, IMAGE_TOKEN, ensure_image_token
from tuning import (LLM_DIR, Tuning, assert_trainable, check_device, load_adapter, quantization_config,
                    save_llm)
from utils import console
from utils.atomic import atomic_path, atomic_write
from utils.checkpoint import WEIGHTS_FILE, find_latest
from utils.config import Parser

CHECKPOINT_FILE = WEIGHTS_FILE          # projector.safetensors
METADATA_KEY = "llava_stage1"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- vision tower

class VisionTower(nn.Module):
    """A frozen transformers vision model that returns [B, N, D_v] token features.

    feature_layer: index into hidden_states (-1 last layer, -2 LLaVA-1.5's choice).
    select: "all" keeps every token (CLS/registers too), "patch" drops the prefix tokens.
    post_norm: apply the tower's final norm to every selected token.
    """

    def __init__(self, model: nn.Module, model_type: str, feature_layer: int = -1,
                 select: str = "all", post_norm: bool = False):
        super().__init__()
        if select not in ("all", "patch"):
            raise ValueError(f"feature select must be 'all' or 'patch', got {select!r}")
        self.model = model
        self.family, _, self.norm_attr = VISION_TYPES[model_type]
        self.feature_layer, self.select, self.post_norm = feature_layer, select, post_norm
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_prefix_tokens = prefix_tokens(cfg)               # CLS (+ DINOv3's registers)
        self.num_tokens = image_tokens(cfg, select)               # N
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionTower":
        # Frozen means eval, always: DINOv3 randomises RoPE and dropout would fire in train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        x = out.hidden_states[self.feature_layer]                   # [B, prefix + grid², D_v]
        if self.post_norm:
            x = getattr(self.model, self.norm_attr)(x)
        if self.select == "patch":
            x = x[:, self.num_prefix_tokens:]
        return x                                                     # [B, N, D_v]


def load_vision_tower(path: str, feature_layer: int = -1, select: str = "all", post_norm: bool = False,
                      dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> VisionTower:
    import transformers

    model_type = detect_vision_type(path)
    if model_type == MODELSCOPE_CLIP:
        model = load_modelscope_chinese_clip(path, dtype)
    else:
        cls = getattr(transformers, VISION_TYPES[model_type][1])
        model = from_pretrained_strict(cls, path, "vision tower", dtype=dtype, trust_remote_code=trust_remote_code)
    return VisionTower(model, model_type, feature_layer, select, post_norm)


# --------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """D_v -> D_lm. Named like transformers' LlavaMultiModalProjector (linear_1, act, linear_2)
    so that export is a rename, not a rewrite.

    linear: one Linear (the course: 768 -> 1024, 0.79M parameters).
    mlp2x_gelu: Linear -> GELU -> Linear (LLaVA-1.5).
    """

    TYPES = ("linear", "mlp2x_gelu")

    def __init__(self, kind: str, d_v: int, d_lm: int):
        super().__init__()
        if kind not in self.TYPES:
            raise ValueError(f"projector must be one of {self.TYPES}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(d_v, d_lm)
        self.act = nn.GELU() if kind == "mlp2x_gelu" else nn.Identity()
        self.linear_2 = nn.Linear(d_lm, d_lm) if kind == "mlp2x_gelu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # [B, N, D_v]
        return self.linear_2(self.act(self.linear_1(x)))             # [B, N, D_lm]


# --------------------------------------------------------------------------- LLM

# --------------------------------------------------------------------------- the spec

@dataclass
class ModelSpec:
    """Everything needed to rebuild the model; stored as JSON in every checkpoint."""

    vision_tower: str                      # registry id or local path, as the user gave it
    llm: str                               # registry id or local path, as the user gave it
    projector: str = "linear"
    feature_layer: int = -1
    feature_select: str = "all"            # all | patch
    feature_post_norm: bool = False
    image_wrap: bool | None = None         # wrap slots in <|vision_start|> ... <|vision_end|>; None: auto
    image_token: str = IMAGE_TOKEN         # the token whose positions receive image features
    # Filled in by build_model from the loaded parts:
    vision_path: str = ""                  # where the frozen models were loaded from
    llm_path: str = ""
    vision_type: str = ""
    vision_hidden_size: int = 0
    llm_hidden_size: int = 0
    num_image_tokens: int = 0
    image_transform: dict = field(default_factory=dict)
    chat_template_kwargs: dict = field(default_factory=lambda: dict(CHAT_TEMPLATE_KWARGS))
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"checkpoint metadata has unknown fields {sorted(unknown)}; newer format?")
        return cls(**d)


# --------------------------------------------------------------------------- combined model

class LlavaStage1(nn.Module):
    def __init__(self, vision: VisionTower | None, projector: Projector, llm: nn.Module,
                 spec: ModelSpec, image_token_id: int):
        super().__init__()
        self.vision = vision            # None when training from cached features
        self.projector = projector
        self.llm = llm
        self.spec = spec
        self.image_token_id = image_token_id
        self.tuning = Tuning()          # what trains (tuning.py); stage 1: the projector only
        self.checkpointed_layers: list[nn.Module] = []

    def train(self, mode: bool = True) -> "LlavaStage1":
        super().train(mode)
        if self.tuning.llm == "none":
            self.llm.eval()             # frozen parts never leave eval mode (LoRA dropout needs train mode)
        if self.vision is not None:
            self.vision.eval()
        for layer in self.checkpointed_layers:
            # transformers checkpoints a decoder layer only when that layer's own `training`
            # flag is set; its children (attention, MLP, dropout) stay in eval mode.
            layer.training = mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each LLM layer in backward instead of storing its activations: ~30% more
        compute for a fraction of the activation memory (large LLMs, long sequences)."""
        enable = getattr(self.llm, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointed_layers = [m for m in self.llm.modules() if getattr(m, "gradient_checkpointing", False)]
        if not self.checkpointed_layers:
            raise RuntimeError(f"{type(self.llm).__name__} has no checkpointable layers")
        self.train(self.training)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def assert_only_projector_trainable(self) -> None:
        assert_trainable(self, Tuning())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vision is None:
            raise RuntimeError("this model was built without a vision tower; pass image_features")
        return self.vision(pixel_values)                             # [B, N, D_v]

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with projected image features written into the image slots.

        image_features holds the batch's images in order ([B_img, N, D_v], B_img <= B: text-only
        samples have none); None for a batch without any image. The projector runs even then
        (on no rows), so every process computes the same graph."""
        slots = input_ids == self.image_token_id                     # [B, T]
        weight = next(self.projector.parameters())
        if image_features is None:
            image_features = weight.new_zeros(0, self.spec.num_image_tokens, self.spec.vision_hidden_size)
        feats = self.projector(image_features.to(weight.dtype))      # [B_img, N, D_lm]
        n_slots, n_feats = int(slots.sum()), feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            # transformers' LLaVA raises here too: a silent mismatch trains garbage.
            raise ValueError(f"image slots ({n_slots}) != image features ({feats.shape[0]} images x "
                             f"{feats.shape[1]} tokens = {n_feats}); prompt and tower disagree")
        # The slot id may lie outside the embedding table (a token we added); look up 0 instead.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))  # [B, T, D_lm]
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def _features(self, pixel_values, image_features):
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        return image_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sum of token losses, number of supervised tokens).

        The caller divides by the supervised-token count of the whole global batch, so that
        gradient accumulation and several processes give the mean over all tokens.
        Logits exist only at supervised positions: [M, V], never [B, T, V].
        Packed batches (dataset.collate_packed) pass position_ids that restart at 0 for each
        sample and no attention mask; transformers then keeps attention within each sample.
        """
        embeds = self.embed(input_ids, self._features(pixel_values, image_features))
        if position_ids is not None:
            attention_mask = None
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False).last_hidden_state  # [B, T, D_lm]
        targets = labels[:, 1:]                                      # position t predicts token t+1
        keep = targets != IGNORE_INDEX                               # [B, T-1]
        logits = self.logits(hidden[:, :-1][keep])                   # [M, V]
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss_sum, keep.sum()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:  # Gemma-style models; Qwen has none
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_ids: list[int],
                 pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 streamer: Any = None, stop: Any = None) -> list[list[int]]:
        """Reply token ids per sample, stop tokens removed. Greedy when temperature == 0.

        input_ids are LEFT-padded for batches; transformers' generate derives positions
        from the attention mask and uses the KV cache. `stop` (a threading.Event) ends the
        generation at the next token once set (a browser that left).
        """
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return torch.full((ids.shape[0],), stop.is_set(), dtype=torch.bool, device=ids.device)

        embeds = self.embed(input_ids, self._features(pixel_values, image_features))
        sample = temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=list(stop_ids), pad_token_id=stop_ids[0])
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=gen_cfg,
                                streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([_Stop()]) if stop is not None else None)  # [B, new]
        replies = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            replies.append(row[:cut])
        return replies

    def summary(self) -> dict[str, Any]:
        def count(m):
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        parts = {"vision": count(self.vision), "projector": count(self.projector), "llm": count(self.llm)}
        return {
            "params": parts,
            "trainable": sum(p.numel() for _, p in self.trainable_parameters()),
            "frozen": sum(parts.values()) - sum(p.numel() for _, p in self.trainable_parameters()),
            "image_tokens": self.spec.num_image_tokens,
            "widths": f"D_v={self.spec.vision_hidden_size} -> D_lm={self.spec.llm_hidden_size}",
            "bf16_weights_gib": round(sum(parts.values()) * 2 / 2**30, 3),
        }


# --------------------------------------------------------------------------- build / save / load

def build_model(spec: ModelSpec, device: torch.device | str = "cpu", frozen_dtype: torch.dtype | None = None,
                attn_implementation: str = "sdpa", models_dir: str = "models",
                trust_remote_code: bool = False, llm_dtype: torch.dtype | None = None,
                load_in_4bit: bool = False) -> tuple[LlavaStage1, Any]:
    """Load the frozen parts from local directories and create the projector.

    Frozen weights are stored in bf16 on CUDA (half the memory, full tensor-core speed) and
    fp32 on CPU; the projector stays fp32 (autocast handles its matmuls). `llm_dtype`
    overrides the LLM's (fp32 master weights when it is tuned in full); `load_in_4bit` loads
    it as QLoRA's NF4 base (CUDA only).
    Returns (model, tokenizer); `spec` is completed in place.
    """
    device = torch.device(device)
    if frozen_dtype is None:
        frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec.vision_path = _locate(spec.vision_tower, spec.vision_path, models_dir)
    spec.llm_path = _locate(spec.llm, spec.llm_path, models_dir)
    vision = load_vision_tower(spec.vision_path, spec.feature_layer, spec.feature_select,
                               spec.feature_post_norm, frozen_dtype, trust_remote_code)
    spec.vision_type = detect_vision_type(spec.vision_path)
    spec.vision_hidden_size, spec.num_image_tokens = vision.hidden_size, vision.num_tokens
    spec.image_transform = preprocessing(spec.vision_path, vision.image_size)
    if spec.image_wrap is None:
        spec.image_wrap = knows_vision_markers(spec.llm_path)
    llm = load_llm(spec.llm_path, llm_dtype or frozen_dtype, attn_implementation, trust_remote_code,
                   quantization_config() if load_in_4bit else None)
    tokenizer = load_tokenizer(spec.llm_path, trust_remote_code)
    spec.llm_hidden_size = llm.config.hidden_size
    image_token_id = ensure_image_token(tokenizer, spec.image_token)
    projector = Projector(spec.projector, spec.vision_hidden_size, spec.llm_hidden_size)
    model = LlavaStage1(vision, projector, llm, spec, image_token_id)
    if load_in_4bit:  # from_pretrained placed the 4-bit base already (bitsandbytes weights refuse .to())
        vision.to(device)
        projector.to(device)
    else:
        model.to(device)
    model.assert_only_projector_trainable()
    return model, tokenizer


def _locate(name: str, stored_path: str, models_dir: str) -> str:
    """The stored path when it still exists, else the id or path resolved again."""
    if stored_path and os.path.isdir(stored_path):
        return stored_path
    return resolve_model(name, models_dir)


def save_checkpoint(model: LlavaStage1, directory: str, extra: dict | None = None, tokenizer: Any = None) -> str:
    """Write `projector.safetensors` (weights + JSON metadata), a readable `model_spec.json`,
    and when the LLM was tuned its weights (tuning.save_llm: llm/ or adapter/).

    Each file is written to a temp name and renamed (and a training step folder is committed
    as a whole by utils.checkpoint.save_step), so a crash leaves the old files or the new ones.
    """
    meta = {"spec": asdict(model.spec), "tuning": asdict(model.tuning), **(extra or {})}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.projector.state_dict().items()}
    path = os.path.join(directory, CHECKPOINT_FILE)
    if model.tuning.llm != "none":
        if tokenizer is None:
            raise ValueError("saving a tuned LLM needs its tokenizer (the llm/ folder must load on its own)")
        save_llm(model.llm, tokenizer, directory, model.tuning)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
    atomic_write(os.path.join(directory, "model_spec.json"), json.dumps(meta, indent=2, ensure_ascii=False))
    return path


def checkpoint_file(path: str) -> str:
    """The safetensors file of a checkpoint given as the file itself, its step folder, or a run
    folder (checkpoints/<run>: the checkpoint its `latest` pointer names, else the newest)."""
    found = path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        found = find_latest(path) or path
    if os.path.isdir(found):
        found = os.path.join(found, CHECKPOINT_FILE)
    if not os.path.isfile(found):
        raise FileNotFoundError(f"no checkpoint at {path}: give a run folder (checkpoints/<run>), one of its "
                                f"step folders, or a {CHECKPOINT_FILE}")
    return found


class NotACheckpoint(FileNotFoundError):
    """A path that names a file, but not a checkpoint of this project (an image, another model's
    safetensors): every caller that reports a missing checkpoint in one line reports this too."""


def read_checkpoint_meta(path: str) -> dict:
    """The metadata a checkpoint describes itself with (spec, tuning, step, run, config)."""
    try:
        with safe_open(checkpoint_file(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except SafetensorError as e:      # an image or any other file given as --checkpoint
        raise NotACheckpoint(f"{path} is not a checkpoint: not a safetensors file ({e}). Give a run folder "
                             f"(checkpoints/<run>), one of its step folders, or a {CHECKPOINT_FILE}") from None
    if METADATA_KEY not in meta:
        raise NotACheckpoint(f"{path} is not a checkpoint of this project: a safetensors file without the "
                             f"'{METADATA_KEY}' metadata that train_stage1/2/3 write")
    return json.loads(meta[METADATA_KEY])


def load_projector_weights(model: LlavaStage1, path: str) -> None:
    """Strict load: every key present, no extras, same shapes (a silent partial load is how
    'loss stuck at 7.5' reports start)."""
    state = load_file(checkpoint_file(path), device="cpu")
    missing, unexpected = model.projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: projector keys do not match; missing={missing} unexpected={unexpected}")


def load_checkpoint(path: str, device: torch.device | str = "cpu", vision_tower: str | None = None,
                    llm: str | None = None, trainable: bool = False, **build_kwargs) -> tuple[LlavaStage1, Any, dict]:
    """Rebuild the model of any stage from a checkpoint alone; `vision_tower`/`llm` override
    stored paths (`llm`: the base LLM; a full-tuned checkpoint carries its own LLM in llm/).

    Everything is loaded strictly: the projector, a tuned LLM (from_pretrained refusing missing
    weights) and LoRA adapters (every tensor checked). `trainable`: LoRA adapters come back
    trainable (resume); `model.tuning` is the checkpoint's either way.
    """
    meta = read_checkpoint_meta(path)
    spec = ModelSpec.from_dict(meta["spec"])
    tuning = Tuning(**meta.get("tuning", {}))
    folder = os.path.dirname(os.path.abspath(checkpoint_file(path)))
    stored = asdict(spec)
    if vision_tower:
        spec.vision_tower, spec.vision_path = vision_tower, ""
    if tuning.llm == "full":
        if llm:
            raise ValueError(f"{path}: the LLM was tuned in full and lives in {LLM_DIR}/; --llm cannot replace it")
        spec.llm_path = os.path.join(folder, LLM_DIR)
    elif llm:
        spec.llm, spec.llm_path = llm, ""
    device = torch.device(device)
    if tuning.load_in_4bit and device.type != "cuda":
        # The adapter applies to the base in full precision too (what merging does); say so.
        console.warn(f"{path}: trained over a 4-bit base (QLoRA); on {device.type} the base loads in full precision")
    elif tuning.load_in_4bit:
        check_device(tuning, device)
        build_kwargs.setdefault("load_in_4bit", True)
    if tuning.llm == "full" and device.type == "cuda" and trainable:
        build_kwargs.setdefault("llm_dtype", torch.float32)   # master weights for more training
    model, tokenizer = build_model(spec, device, **build_kwargs)
    for key in ("num_image_tokens", "vision_hidden_size", "llm_hidden_size"):
        if stored[key] != getattr(spec, key):
            raise ValueError(f"{path}: checkpoint has {key}={stored[key]} but the loaded models give "
                             f"{getattr(spec, key)}; wrong --vision_tower/--llm?")
    load_projector_weights(model, path)
    if tuning.llm == "lora":
        model.llm = load_adapter(model.llm, folder, trainable)
    model.tuning = tuning
    return model, tokenizer, meta


def summary_from_configs(vision: str, llm: str, projector: str = "linear", models_dir: str = "models",
                         feature_layer: int | None = None, feature_select: str | None = None) -> dict[str, Any]:
    """backbones.describe plus the projector: image tokens, widths, parameters per part and bf16
    weight memory of a whole model, from configs alone (nothing downloaded or loaded)."""
    d = describe(vision, llm, models_dir, feature_layer, feature_select)
    with torch.device("meta"):
        proj = sum(p.numel() for p in Projector(projector, d["d_v"], d["d_lm"]).parameters())
    params = {"vision": d["params"]["vision"], "projector": proj, "llm": d["params"]["llm"]}
    return {"vision": vision, "llm": llm, "image_tokens_per_image": d["image_tokens_per_image"],
            "widths": f"D_v={d['d_v']} -> D_lm={d['d_lm']}", "params": params, "trainable": proj,
            "bf16_weights_gib": round(sum(params.values()) * 2 / 2**30, 2)}


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--summary", action="store_true", help="print the summary from configs (what happens when "
                                                          "--list is not given)")
    p.add_argument("--list", action="store_true", help="list registry ids and presets")
    p.add_argument("--model", choices=list(PRESETS), help="a preset")
    p.add_argument("--vision_tower", help="registry id or local folder (overrides the preset's)")
    p.add_argument("--llm", help="registry id or local folder (overrides the preset's)")
    p.add_argument("--projector", choices=Projector.TYPES, help="projector type (overrides the preset's)")
    p.add_argument("--models_dir", default="models", help="where registry ids live")
    args = p.parse_args()
    if args.list:
        for k, info in REGISTRY.items():
            console.kv(k, f"{info.kind:<6} hf={info.hf}  modelscope={info.modelscope}  {info.note}", 18)
        for k, v in PRESETS.items():
            console.kv(k, f"{v['vision_tower']} + {v['projector']} + {v['llm']}", 26)
    if args.summary or not args.list:
        preset = PRESETS.get(args.model or "", {})
        vision, llm = args.vision_tower or preset.get("vision_tower"), args.llm or preset.get("llm")
        if not (vision and llm):
            p.error("give --model PRESET or both --vision_tower and --llm (or --list)")
        projector = args.projector or preset.get("projector", "linear")
        for k, v in summary_from_configs(vision, llm, projector, args.models_dir).items():
            console.kv(k, v)


if __name__ == "__main__":
    main()
