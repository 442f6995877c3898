"""Building a model and its checkpoints: from a ModelSpec to a LlavaModel on a device (the frozen
parts loaded strictly from local folders, a fresh projector), saving what trained (projector,
`llm/`, `adapter/`) with the metadata that rebuilds it, and loading any stage's checkpoint back.
model.py is the architecture alone; this is how it meets the disk. What a checkpoint can be
exported to (scripts/export_hf.py's refusals, vLLM's verdict) is read from its spec here too, so
that a run can say it without loading anything and without importing a script.

    python checkpoint_io.py --list                                   # registry ids and presets
    python checkpoint_io.py --summary --model clip-zh-qwen3-0.6b     # tokens, widths, parameters (no download)
    python checkpoint_io.py --summary --vision_tower models/toy/vision --llm models/toy/llm
    python checkpoint_io.py --verify checkpoints/<run>                # each step: intact, or what is damaged
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from backbones import (MODELSCOPE_CLIP, PRESETS, REGISTRY, VISION_TYPES, describe, detect_vision_type,
                       from_pretrained_strict, knows_vision_markers, llm_type, load_llm, load_tokenizer,
                       prefix_tokens, preprocessing, read_json, resolve_model)
from model import LlavaModel, ModelSpec, Projector, VisionTower
from modelscope_clip import load_modelscope_chinese_clip
from prompts import ensure_image_token
from tuning import LLM_DIR, Tuning, check_device, load_adapter, quantization_config, save_llm
from utils import console
from utils.atomic import atomic_path, atomic_write
from utils.checkpoint import WEIGHTS_FILE, check_step, looks_like_step, newest_intact, step_dirs
from utils.config import Parser
from utils.dist import rank_and_world
from utils.integrity import DamagedCheckpoint, read_manifest

CHECKPOINT_FILE = WEIGHTS_FILE          # projector.safetensors
# The safetensors metadata key a checkpoint describes itself under. Named when only stage 1
# existed; kept, since every checkpoint already written (of any stage) carries it.
METADATA_KEY = "llava_stage1"


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


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", frozen_dtype: torch.dtype | None = None,
                attn_implementation: str = "sdpa", models_dir: str = "models",
                trust_remote_code: bool = False, llm_dtype: torch.dtype | None = None,
                load_in_4bit: bool = False) -> tuple[LlavaModel, Any]:
    """Load the frozen parts from local directories and create the projector.

    Frozen weights are stored in bf16 on CUDA (half the memory, full tensor-core speed) and
    fp32 on CPU; the projector stays fp32 (autocast handles its matmuls). `llm_dtype`
    overrides the LLM's (fp32 master weights when it is tuned in full); `load_in_4bit` loads
    it as QLoRA's NF4 base (CUDA only).
    Returns (model, tokenizer); `model.spec` is a copy of `spec` completed from the loaded parts
    (paths, widths, image tokens, preprocessing); `spec` itself is left as given.
    """
    spec = replace(spec)
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
    model = LlavaModel(vision, projector, llm, spec, image_token_id)
    # bf16 frozen weights beside an fp32 projector: forward passes under bf16 autocast.
    model.autocast_dtype = torch.bfloat16 if frozen_dtype == torch.bfloat16 else None
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


def save_checkpoint(model: LlavaModel, directory: str, extra: dict | None = None, tokenizer: Any = None,
                    weights: dict[str, torch.Tensor] | None = None) -> str:
    """Write `projector.safetensors` (weights + JSON metadata), a readable `model_spec.json`,
    and when the LLM was tuned its weights (tuning.save_llm: llm/ or adapter/).

    `weights`: what to write by name, whole (training gathers it from FSDP's shards:
    checkpoint_weights); by default the model's own.
    Each file is written to a temp name and renamed (and a training step folder is committed
    as a whole by utils.checkpoint.save_step), so a crash leaves the old files or the new ones.
    """
    meta = {"spec": asdict(model.spec), "tuning": asdict(model.tuning), **(extra or {})}
    projector = model.projector.state_dict() if weights is None else \
        {k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in projector.items()}
    path = os.path.join(directory, CHECKPOINT_FILE)
    if model.tuning.llm != "none":
        if tokenizer is None:
            raise ValueError("saving a tuned LLM needs its tokenizer (the llm/ folder must load on its own)")
        llm_weights = None if weights is None else {k[4:]: v for k, v in weights.items() if k.startswith("llm.")}
        save_llm(model.llm, tokenizer, directory, model.tuning, llm_weights)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
    atomic_write(os.path.join(directory, "model_spec.json"), json.dumps(meta, indent=2, ensure_ascii=False))
    return path


def checkpoint_weights(model: LlavaModel) -> dict[str, torch.Tensor]:
    """What save_checkpoint writes, whole and on the CPU of rank 0 ({} on the others); every rank
    must call it. The trained parameters, and the projector even when it did not train
    (--no-tune_projector): projector.safetensors always holds it, and under FSDP a frozen
    projector is a shard of the root like any other parameter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in full.items() if k in trained}   # (a frozen weight tied to a trained one slips in)
    main = rank_and_world()[0] == 0
    for name, p in model.projector.named_parameters():
        if not p.requires_grad:
            whole = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()   # every rank: a collective
            if main:
                weights[f"projector.{name}"] = whole
    return weights


def checkpoint_file(path: str) -> str:
    """The safetensors file of a checkpoint given as the file itself, its step folder, or a run
    folder (checkpoints/<run>: the checkpoint its `latest` pointer names, else the newest), after
    checking what a reader loads (utils.integrity: sizes and checksums against the manifest, or
    every file loaded in a step saved before manifests). A damaged step folder raises
    DamagedCheckpoint naming the file; a run folder gives its newest intact step and says which
    newer ones it passed over."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not looks_like_step(path):      # a run folder
        folder, skipped = newest_intact(path, "model")
        for line in skipped:
            _say_once(f"{line}; skipped")
        if folder is None and skipped:
            raise DamagedCheckpoint(f"no intact checkpoint in {path}:\n" + "\n".join(f"  {s}" for s in skipped))
        if folder and skipped:
            _say_once(f"using {folder}, the newest intact checkpoint of {path}")
    if folder and looks_like_step(folder) and (verdict := check_step(folder, "model")):
        raise DamagedCheckpoint(verdict)
    found = path if os.path.isfile(path) else os.path.join(folder or path, CHECKPOINT_FILE)
    if not os.path.isfile(found):
        raise FileNotFoundError(f"no checkpoint at {path}: give a run folder (checkpoints/<run>), one of its "
                                f"step folders, or a {CHECKPOINT_FILE}")
    return found


_said: set[str] = set()


def _say_once(line: str) -> None:
    """A skipped step is said once per process, however often its run folder is resolved."""
    if line not in _said:
        _said.add(line)
        console.notice(line)


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


def load_projector_weights(model: LlavaModel, path: str) -> None:
    """Strict load: every key present, no extras, same shapes (a silent partial load is how
    'loss stuck at 7.5' reports start)."""
    state = load_file(checkpoint_file(path), device="cpu")
    missing, unexpected = model.projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: projector keys do not match; missing={missing} unexpected={unexpected}")


def load_checkpoint(path: str, device: torch.device | str = "cpu", vision_tower: str | None = None,
                    llm: str | None = None, trainable: bool = False, **build_kwargs) -> tuple[LlavaModel, Any, dict]:
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
        console.notice(f"{path}: trained over a 4-bit base (QLoRA); on {device.type} the base loads in full precision")
    elif tuning.load_in_4bit:
        check_device(tuning, device)
        build_kwargs.setdefault("load_in_4bit", True)
    if tuning.llm == "full" and device.type == "cuda" and trainable:
        build_kwargs.setdefault("llm_dtype", torch.float32)   # master weights for more training
    model, tokenizer = build_model(spec, device, **build_kwargs)
    for key in ("num_image_tokens", "vision_hidden_size", "llm_hidden_size"):
        if stored[key] != getattr(model.spec, key):
            raise ValueError(f"{path}: checkpoint has {key}={stored[key]} but the loaded models give "
                             f"{getattr(model.spec, key)}; wrong --vision_tower/--llm?")
    load_projector_weights(model, path)
    if tuning.llm == "lora":
        model.llm = load_adapter(model.llm, folder, trainable)
    model.tuning = tuning
    return model, tokenizer, meta


# --------------------------------------------------------------------------- what an export can be

# Our projector types as transformers' LlavaMultiModalProjector (linear_1 -> act -> linear_2): a
# linear projector is act "linear" (transformers' identity) with linear_2 = I, exactly.
LLAVA_PROJECTOR_ACT = {"linear": "linear", "mlp2x_gelu": "gelu"}
# vLLM's own LLaVA (vllm/model_executor/models/llava.py, init_vision_tower_for_llava) builds a tower
# only for a CLIPVisionConfig, SiglipVisionConfig or PixtralVisionConfig (isinstance checks) and
# raises "Unsupported vision config" otherwise: ChineseCLIPVisionConfig and DINOv3ViTConfig subclass
# none of them. Pixtral is not a tower this toolkit trains with.
VLLM_TOWER_FAMILIES = ("clip", "siglip")
# vLLM's get_act_fn (vllm/model_executor/layers/activation.py, _ACTIVATION_REGISTRY) builds both the
# projector's act and the CLIP/SigLIP MLPs' act, and raises "Activation function 'linear' is not
# supported" for a name it lacks. These names are in every version read; "linear" is in none.
VLLM_ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "relu2", "silu", "quick_gelu")
# Text models in vLLM's registry (vllm/model_executor/models/registry.py) that this toolkit's LLMs
# export as (Qwen3-VL's text model becomes Qwen3ForCausalLM); vLLM builds the LLM named by
# text_config.architectures, which the export writes. Others may be there too: check vLLM's list.
VLLM_TEXT_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
# How to train a checkpoint that exports, and one that vLLM loads too, in one line each.
EXPORT_RECIPE = "train with --no-feature_post_norm (a DINOv3 tower: also --feature_select all)"
VLLM_RECIPE = ("train with a CLIP or SigLIP tower, --projector mlp2x_gelu and --no-feature_post_norm "
               "(the llava15-qwen3-1.7b preset is such a recipe)")


def tower_prefix_tokens(spec: ModelSpec) -> int:
    """backbones.prefix_tokens of the checkpoint's tower, from its config.json alone (DINOv3's
    register count lives there); no weights are loaded."""
    cfg = os.path.join(spec.vision_path, "config.json")
    registers = read_json(cfg).get("num_register_tokens", 0) if os.path.isfile(cfg) else 0
    return prefix_tokens(SimpleNamespace(model_type=spec.vision_type, num_register_tokens=registers))


def export_blockers(spec: ModelSpec) -> list[str]:
    """Why scripts/export_hf.py refuses `spec` ([] when it exports it): image tokens that
    transformers' LlavaForConditionalGeneration cannot reproduce exactly. From the spec and the
    tower's config.json alone; the checks that need the loaded LLM and tokenizer (an added image
    token, capped logits) run at export time."""
    family = VISION_TYPES[spec.vision_type][0]
    if spec.feature_post_norm:
        # LLaVA feeds hidden_states[vision_feature_layer] to the projector as they are. For CLIP,
        # Chinese-CLIP, SigLIP and DINOv3 those are taken before the final norm (transformers
        # captures them with tie_last_hidden_states=False), and a LayerNorm divides each token
        # by its own std: no linear layer folds it, so there is no exact rewrite.
        return [f"feature_post_norm=True applies the {family} tower's final norm to every token; "
                "LlavaForConditionalGeneration takes hidden_states[vision_feature_layer] without any final norm, "
                "and a per-token LayerNorm cannot be folded into the projector. Train with --no-feature_post_norm "
                "(e.g. LLaVA-1.5's --feature_layer -2 --feature_select patch --no-feature_post_norm)."]
    n_prefix = tower_prefix_tokens(spec)
    if spec.feature_select == "patch" and n_prefix > 1:
        return [f"feature_select=patch drops {n_prefix} prefix tokens (CLS + {n_prefix - 1} registers) of the "
                f"{family} tower; LLaVA's 'default' strategy drops only the first token. Train with "
                "--feature_select all (keeps CLS and registers) and --no-feature_post_norm."]
    return []


def vllm_blockers(spec: ModelSpec) -> list[str]:
    """Why vLLM's own LLaVA cannot load an export of `spec` ([] when it can), by the rules of
    vLLM's source (see the constants above); for a spec that export_blockers passes. Checked from
    the spec and the tower's and LLM's config.json, not by running vLLM."""
    family, tower_class, _ = VISION_TYPES[spec.vision_type]
    reasons = []
    if family not in VLLM_TOWER_FAMILIES:
        reasons.append(f"vLLM's LLaVA builds only CLIP, SigLIP and Pixtral vision towers, not {tower_class} "
                       "(init_vision_tower_for_llava: 'Unsupported vision config')")
    act = LLAVA_PROJECTOR_ACT[spec.projector]
    if act not in VLLM_ACTIVATIONS:
        reasons.append(f"the {spec.projector} projector exports as projector_hidden_act={act!r}, which vLLM's "
                       "activation registry lacks (get_act_fn knows gelu, relu, silu, quick_gelu, ...; "
                       "train with --projector mlp2x_gelu)")
    tower_cfg = os.path.join(spec.vision_path, "config.json")
    tower_act = read_json(tower_cfg).get("hidden_act") if os.path.isfile(tower_cfg) else None
    if family in VLLM_TOWER_FAMILIES and tower_act and tower_act not in VLLM_ACTIVATIONS:
        reasons.append(f"the tower's hidden_act {tower_act!r} is not in vLLM's activation registry")
    arch = exported_llm_architecture(spec)
    if arch is None:
        reasons.append(f"no config.json at {spec.llm_path!r} says which text model this is")
    elif arch not in VLLM_TEXT_ARCHITECTURES:
        reasons.append(f"text model {arch} is not among those checked in vLLM's model registry "
                       f"({', '.join(VLLM_TEXT_ARCHITECTURES)}); see vLLM's supported models")
    return reasons


def exported_llm_architecture(spec: ModelSpec) -> str | None:
    """The causal-LM class an export carries as text_config.architectures, from the LLM's
    config.json: Qwen3-VL's text model is loaded (and exported) as Qwen3ForCausalLM."""
    if not spec.llm_path or not os.path.isfile(os.path.join(spec.llm_path, "config.json")):
        return None
    if llm_type(spec.llm_path) == "qwen3_vl":
        return "Qwen3ForCausalLM"
    return (read_json(os.path.join(spec.llm_path, "config.json")).get("architectures") or [None])[0]


def vllm_verdict(spec: ModelSpec) -> str:
    """One line: "vLLM: yes", or "vLLM: no — <reasons>" (a checkpoint that cannot be exported: no)."""
    reasons = ["the checkpoint cannot be exported at all"] if export_blockers(spec) else vllm_blockers(spec)
    return "vLLM: no — " + "; ".join(reasons) if reasons else "vLLM: yes"


def export_verdict(spec: ModelSpec) -> str:
    """One line on what a checkpoint of `spec` can be exported to, with the recipe that would do
    better: for a run's closing lines (the demos) and export_hf's refusals."""
    blockers = export_blockers(spec)
    if blockers:
        return f"export_hf.py: no ({blockers[0].split(';')[0]}); to export, {EXPORT_RECIPE}; for vLLM, {VLLM_RECIPE}"
    vllm = vllm_verdict(spec)
    return f"export_hf.py: yes; {vllm}" + ("" if vllm == "vLLM: yes" else f"; for vLLM, {VLLM_RECIPE}")


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


def verify_checkpoints(path: str) -> int:
    """`--verify PATH`: one line per step folder of a run folder, oldest first (or the one step
    folder given): intact, or what is damaged. 1 when the newest step is damaged, 2 when PATH holds
    no checkpoint; run it before copying a run to another machine, and after."""
    steps = [path] if looks_like_step(path) else [p for _, p in step_dirs(path)]
    if not steps:
        console.error(f"--verify {path}: not a checkpoint (neither a step folder nor a run folder of them)")
        return 2
    verdict = None
    for step in steps:
        verdict = check_step(step, "all")
        if verdict is None:
            try:
                how = f"{len(read_manifest(step))} files, sizes and CRC-32 as saved"
            except (OSError, ValueError):
                how = "saved before manifests: every file loaded"
        print(f"{os.path.basename(os.path.normpath(step))}  " + (f"intact ({how})" if verdict is None else verdict),
              flush=True)
    return 1 if verdict else 0


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--verify", metavar="PATH", help="check a run folder (each step) or one step folder against "
                                                    "its manifest; exits 1 when the newest step is damaged")
    p.add_argument("--summary", action="store_true", help="print the summary from configs (what happens when "
                                                          "neither --list nor --verify is given)")
    p.add_argument("--list", action="store_true", help="list registry ids and presets")
    p.add_argument("--model", choices=list(PRESETS), help="a preset")
    p.add_argument("--vision_tower", help="registry id or local folder (overrides the preset's)")
    p.add_argument("--llm", help="registry id or local folder (overrides the preset's)")
    p.add_argument("--projector", choices=Projector.TYPES, help="projector type (overrides the preset's)")
    p.add_argument("--models_dir", default="models", help="where registry ids live")
    args = p.parse_args(argv)
    if args.verify:
        raise SystemExit(verify_checkpoints(args.verify))
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
