"""Export a checkpoint of any stage as a plain transformers LLaVA folder: weights, configs,
processor (image processor + tokenizer + chat template) and a README model card. A stage-2
checkpoint brings its tuned LLM; a stage-3 one has its LoRA adapters merged into the weights
(W + BA x alpha/r). The folder loads with no custom code:

    LlavaForConditionalGeneration.from_pretrained(DIR); AutoProcessor.from_pretrained(DIR)

CPU example on the offline toy world. The demo's own default applies the tower's final norm to
every token (the course's ln_post), which LLaVA cannot express, so train this run without it, and
with an MLP projector, whose GELU vLLM knows (the demo's linear one exports as act "linear"):
    python train_stage1.py --demo --no-feature_post_norm --projector mlp2x_gelu --max_steps 60 --run_name demo_export
    python scripts/export_hf.py --checkpoint checkpoints/demo_export --out exports/demo_export --verify

What maps exactly onto LlavaForConditionalGeneration (anything else is refused, exit code 2):
    features     hidden_states[feature_layer] of the tower, no final norm (feature_post_norm=False)
    selection    "all" -> strategy "full"; "patch" -> "default" (drops exactly one token: CLS),
                 or "full" for towers without prefix tokens (SigLIP)
    projector    linear -> act "linear" with linear_2 = identity; mlp2x_gelu -> act "gelu"
    LLM          any *ForCausalLM whose base model AutoModel rebuilds (the Qwen3-VL text model is
                 exported as plain Qwen3: for text positions its M-RoPE equals 1-D RoPE)
The output is written to DIR.partial and renamed to DIR when complete: no half-written folder.

Every export ends with its vLLM verdict, also written into the model card:
    vLLM: yes            vLLM's own LLaVA (vllm/model_executor/models/llava.py) builds every part:
                         a CLIP or SigLIP tower, a projector act in vLLM's activation registry
                         (mlp2x_gelu -> "gelu"), a text model in its registry (Qwen3ForCausalLM)
    vLLM: no — <reason>  what vLLM lacks: a Chinese-CLIP or DINOv3 tower, or the linear projector's
                         act "linear" (not in vLLM's get_act_fn registry); transformers still loads it
The verdict follows vLLM's source (checkpoint_io.vllm_blockers says which rules); vLLM is not run.
A refused export says in one line how to train a checkpoint that exports.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python scripts/export_hf.py` from the repository root
    sys.path.insert(0, ROOT)

from backbones import VISION_TYPES, read_json  # noqa: E402
from dataset import ImageTransform  # noqa: E402
from prompts import IMAGE_PLACEHOLDER, PromptFormat, encode_prompt  # noqa: E402
from checkpoint_io import (EXPORT_RECIPE, LLAVA_PROJECTOR_ACT, VLLM_RECIPE, checkpoint_file, export_blockers,  # noqa: E402
                           exported_llm_architecture, load_checkpoint, read_checkpoint_meta, tower_prefix_tokens,
                           vllm_verdict)
from model import LlavaModel, ModelSpec  # noqa: E402
from tuning import Tuning, merged  # noqa: E402
from utils import console  # noqa: E402
from utils.config import Parser  # noqa: E402

# PIL resampling filters by the names ImageTransform stores.
RESAMPLE_IDS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# SigLIP's attention-pooling head: LLaVA never reads it (features are hidden_states[layer]), but
# vLLM's SigLIP applies it inside LLaVA when vision_use_head is true (transformers' default) in
# the versions between its SigLIP-embedding support and PR #32299, turning N tokens into one.
# Its keys, in transformers 5's flat SiglipVisionModel and in the older nested one:
SIGLIP_HEAD = ("head.", "vision_model.head.")


class NotExportable(Exception):
    """A checkpoint whose model LlavaForConditionalGeneration cannot reproduce exactly."""


@dataclass
class Plan:
    """How our token selection maps onto LLaVA's config and processor."""

    strategy: str                  # vision_feature_select_strategy: "full" | "default"
    additional_tokens: int         # LlavaProcessor.num_additional_image_tokens (CLS, registers)


# --------------------------------------------------------------------------- what can be exported

def plan_export(spec: ModelSpec) -> Plan:
    """The LLaVA settings that reproduce `spec`'s image tokens, or NotExportable with the reason
    (checkpoint_io.export_blockers, which runs without loading the model) and the recipe of a
    checkpoint that exports."""
    blockers = export_blockers(spec)
    if blockers:
        raise NotExportable(" ".join(blockers) + f"\nTo export: {EXPORT_RECIPE}. To load it in vLLM too: {VLLM_RECIPE}.")
    n_prefix = tower_prefix_tokens(spec)
    if spec.feature_select == "all" or n_prefix == 0:
        return Plan("full", n_prefix)
    return Plan("default", 1)   # one prefix token (export_blockers refuses more): LLaVA's "default" drops CLS


def check_llm(model: LlavaModel) -> None:
    """The LLM must be rebuilt by AutoModel from its config with the same weights and head."""
    from transformers import AutoModel

    llm = model.llm
    if not (hasattr(llm, "model") and hasattr(llm, "lm_head")):
        raise NotExportable(f"{type(llm).__name__} is not a <base model> + lm_head causal LM")
    if getattr(llm.config, "final_logit_softcapping", None):
        raise NotExportable("the LLM caps its logits (final_logit_softcapping); LLaVA's lm_head does not")
    with torch.device("meta"):
        rebuilt = type(AutoModel.from_config(copy.deepcopy(llm.config)))
    if rebuilt is not type(llm.model):
        raise NotExportable(f"AutoModel builds {rebuilt.__name__} from the LLM's config, not {type(llm.model).__name__}")
    rows = llm.get_input_embeddings().weight.shape[0]
    if model.image_token_id >= rows:
        raise NotExportable(
            f"image token {model.spec.image_token!r} (id {model.image_token_id}) was added to the tokenizer and has no "
            f"embedding row ({rows} rows); LLaVA looks it up before replacing it. Train with an image token the LLM "
            "already has (Qwen: <|image_pad|>).")


# --------------------------------------------------------------------------- the pieces

def llava_config(model: LlavaModel, plan: Plan):
    from transformers import LlavaConfig

    spec, vision = model.spec, model.vision
    vcfg = copy.deepcopy(vision.model.config)
    if getattr(vcfg, "vision_use_head", False):
        vcfg.vision_use_head = False   # SIGLIP_HEAD: unused by LLaVA, harmful in some vLLM versions
    tcfg = copy.deepcopy(model.llm.config)
    # vLLM builds the LLM that text_config.architectures names ("No model architectures are
    # specified" without it); a Qwen3-VL text model built in memory has none.
    tcfg.architectures = [type(model.llm).__name__]
    return LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_id=model.image_token_id,
        image_seq_length=spec.num_image_tokens,
        # nn.Identity between two layers == "linear" act; linear_2 becomes the identity matrix.
        projector_hidden_act=LLAVA_PROJECTOR_ACT[spec.projector],
        vision_feature_select_strategy=plan.strategy, vision_feature_layer=spec.feature_layer,
        multimodal_projector_bias=True, tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)))


def llava_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Our parts under LlavaForConditionalGeneration's names."""
    siglip = model.vision.family == "siglip"
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()
             if not (siglip and k.startswith(SIGLIP_HEAD))}   # llava_config drops the head
    state.update({f"model.language_model.{k}": v for k, v in model.llm.model.state_dict().items()})
    state["lm_head.weight"] = model.llm.lm_head.weight
    proj = model.projector
    d_lm = proj.linear_1.out_features
    state["model.multi_modal_projector.linear_1.weight"] = proj.linear_1.weight
    state["model.multi_modal_projector.linear_1.bias"] = proj.linear_1.bias
    if proj.kind == "linear":
        # W2 = I, b2 = 0 makes linear_2 exact: I @ x + 0 == x bit for bit.
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(d_lm)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d_lm)
    else:
        state["model.multi_modal_projector.linear_2.weight"] = proj.linear_2.weight
        state["model.multi_modal_projector.linear_2.bias"] = proj.linear_2.bias
    return {k: v.detach() for k, v in state.items()}


def chat_template(base: str, spec: ModelSpec, fmt: PromptFormat, tokenizer) -> str:
    """The LLM's own template behind a prelude that (1) defaults the template kwargs training used
    (Qwen3: enable_thinking=false), (2) turns list content ({"type": "image"} / {"type": "text"})
    into our string form, image first as "<image>\\n" like eval_llava, and (3) replaces each
    `<image>` with one image token (wrapped in <|vision_start|>/<|vision_end|> when training
    wrapped it); LlavaProcessor then expands that token to N copies."""
    image = spec.image_token
    if fmt.wrap_ids:
        start, end = tokenizer.convert_ids_to_tokens(list(fmt.wrap_ids))
        image = f"{start}{image}{end}"
    defaults = "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {json.dumps(v)} %}}{{%- endif %}}\n"
                       for k, v in spec.chat_template_kwargs.items())
    prelude = (
        "{#- stage-1 export: our prompt format in front of the LLM's own template -#}\n" + defaults +
        "{%- set _s1 = namespace(messages=[], text='') %}\n"
        "{%- for message in messages %}\n"
        "    {%- if message['content'] is string %}\n"
        "        {%- set _s1.text = message['content'] %}\n"
        "    {%- else %}\n"
        "        {%- set _s1.text = '' %}\n"
        "        {%- for part in message['content'] %}\n"
        f"            {{%- if part['type'] == 'image' %}}{{%- set _s1.text = _s1.text + '{IMAGE_PLACEHOLDER}' + "
        "('' if loop.last else '\\n') %}\n"
        "            {%- elif part['type'] == 'text' %}{%- set _s1.text = _s1.text + part['text'] %}{%- endif %}\n"
        "        {%- endfor %}\n"
        "    {%- endif %}\n"
        f"    {{%- set _s1.messages = _s1.messages + [dict(message, content=_s1.text.replace('{IMAGE_PLACEHOLDER}', "
        f"{json.dumps(image)}))] %}}\n"
        "{%- endfor %}\n"
        "{%- set messages = _s1.messages %}\n")
    return prelude + base


def image_processor(t: ImageTransform):
    """A CLIP image processor that reproduces dataset.ImageTransform (PIL resize on uint8,
    centre crop, /255, mean/std); it is saved as "CLIPImageProcessor"."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if t.resample not in RESAMPLE_IDS:
        raise NotExportable(f"image resample {t.resample!r} has no PIL filter id")
    square = {"height": t.size, "width": t.size}
    if t.mode == "shortest_edge":
        size, crop = {"shortest_edge": t.size}, True
    elif t.mode == "square":
        size, crop = square, False
    else:
        raise NotExportable(f"image transform mode {t.mode!r} has no image-processor equivalent")
    return CLIPImageProcessorPil(do_resize=True, size=size, resample=RESAMPLE_IDS[t.resample], do_center_crop=crop,
                                 crop_size=square, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=list(t.mean), image_std=list(t.std), do_convert_rgb=True)


def build_processor(model: LlavaModel, tokenizer, plan: Plan):
    from transformers import LlavaProcessor

    spec = model.spec
    fmt = PromptFormat.for_model(spec, tokenizer)
    tok = copy.deepcopy(tokenizer)
    # The tokenizer gets the same template, so tokenizer-only users render the same prompt.
    tok.chat_template = chat_template(tokenizer.chat_template, spec, fmt, tokenizer)
    proc = LlavaProcessor(image_processor=image_processor(ImageTransform.from_dict(spec.image_transform)),
                          tokenizer=tok, patch_size=model.vision.model.config.patch_size,
                          vision_feature_select_strategy=plan.strategy, chat_template=tok.chat_template,
                          image_token=spec.image_token, num_additional_image_tokens=plan.additional_tokens)
    if proc.image_token != spec.image_token or proc.image_token_id != model.image_token_id:
        raise NotExportable(f"the processor's image token {proc.image_token!r} ({proc.image_token_id}) is not "
                            f"the one training used, {spec.image_token!r} ({model.image_token_id})")
    size = model.vision.image_size
    n = (size // proc.patch_size) ** 2 + plan.additional_tokens - (plan.strategy == "default")
    if n != spec.num_image_tokens:
        raise NotExportable(f"the processor would expand an image to {n} tokens; training used {spec.num_image_tokens}")
    return proc, fmt


def vllm_note(spec: ModelSpec, where: str) -> str:
    """The model card's vLLM paragraph: the verdict (checkpoint_io.vllm_verdict) and what to do."""
    verdict = vllm_verdict(spec)
    if verdict == "vLLM: yes":
        return (f"**{verdict}.** vLLM's own LLaVA implementation builds every part of this export: the "
                f"`{VISION_TYPES[spec.vision_type][1]}` tower, the projector act "
                f"`{LLAVA_PROJECTOR_ACT[spec.projector]}` and the text model `{exported_llm_architecture(spec)}`, "
                f"so `vllm serve {where}` loads it. This follows vLLM's source "
                "(`vllm/model_executor/models/llava.py`, `vllm/model_executor/layers/activation.py`); "
                "this project does not run vLLM.")
    return (f"**{verdict}.** That is vLLM's own LLaVA implementation (`vllm/model_executor/models/llava.py`: "
            "CLIP, SigLIP and Pixtral towers only; projector acts from its activation registry, which has no "
            "`linear`). Use transformers as above, or the training checkpoint itself with this toolkit's "
            "`eval_llava.py` / `web_demo.py` (an OpenAI-compatible `serve_api.py` is coming). "
            f"A checkpoint that vLLM loads: {VLLM_RECIPE}.")


def model_card(meta: dict, spec: ModelSpec, plan: Plan, dtype: torch.dtype, params: int, where: str) -> str:
    """README.md: what was trained, on what, for how long, and how to load it."""
    cfg = meta.get("train_config") or {}
    data = [f"- format: `{cfg.get('data_format', '?')}`"]
    for key in ("data_root", "chat_json", "image_root", "max_samples", "instructions", "eval_data_root"):
        if cfg.get(key) not in (None, "", 0):
            data.append(f"- {key}: `{cfg[key]}`")
    train = [f"- optimizer steps: {meta.get('step', '?')}"] + [
        f"- {k}: `{cfg[k]}`" for k in ("lr", "batch_size", "global_batch_size", "grad_accum", "epochs", "max_steps",
                                       "lr_scheduler", "warmup_ratio", "weight_decay", "seed") if k in cfg]
    stage = meta.get("stage", 1)
    tuning = Tuning(**meta.get("tuning", {})).describe()
    proj = ("linear (exported as `projector_hidden_act=\"linear\"`, `linear_2` = identity)"
            if spec.projector == "linear" else "mlp2x_gelu (`linear_1` -> GELU -> `linear_2`)")
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, stage-{stage}]
---

# {meta.get('run') or f'stage-{stage} model'} (LLaVA stage {stage})

A frozen vision tower and an LLM joined by a projector. What trained: {tuning}
(stage 1 aligns the projector on image-caption / VQA data; stage 2 tunes the LLM in full on
instructions; stage 3 adds LoRA adapters, merged into the weights here). Exported as a plain
`LlavaForConditionalGeneration`; it loads with no custom code.

## Model

| part | value |
|---|---|
| vision tower | `{spec.vision_tower}` (`{spec.vision_type}`, loaded from `{spec.vision_path}`) |
| LLM | `{spec.llm}` (loaded from `{spec.llm_path}`), width {spec.llm_hidden_size} |
| projector | {proj}: {spec.vision_hidden_size} -> {spec.llm_hidden_size} |
| image features | `hidden_states[{spec.feature_layer}]`, tokens `{spec.feature_select}` (strategy `{plan.strategy}`), no final norm |
| image tokens | {spec.num_image_tokens} x `{spec.image_token}` per image{', wrapped in <|vision_start|> ... <|vision_end|>' if spec.image_wrap else ''} |
| preprocessing | {spec.image_transform.get('size')} px, {spec.image_transform.get('mode')}, {spec.image_transform.get('resample')}, mean {spec.image_transform.get('mean')}, std {spec.image_transform.get('std')} |
| chat template kwargs baked in | `{json.dumps(spec.chat_template_kwargs)}` |
| weights | {str(dtype).replace('torch.', '')}, {params / 1e6:.1f}M parameters |

## Training data

{chr(10).join(data)}

## Training

{chr(10).join(train)}

## Use

```python
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{where}")
processor = AutoProcessor.from_pretrained("{where}", backend="pil")  # "pil": the exact resize training used
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The prompt tokens equal those training and `eval_llava.py` used for the same messages. With
torchvision installed, `AutoProcessor` picks the torchvision backend unless told `backend="pil"`;
its antialiased bicubic resize differs slightly from PIL's.

Stage-1 models describe images in the style of their training data; they are not instruction-tuned.

## vLLM

{vllm_note(spec, where)}
"""


# --------------------------------------------------------------------------- export

def target_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    """auto: the dtype the LLM checkpoint was stored in (a bf16 model stays bf16), else float32."""
    if name != "auto":
        return DTYPES[name]
    cfg = read_json(os.path.join(spec.llm_path, "config.json")) if spec.llm_path else {}
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(stored).replace("torch.", ""), torch.float32)


def write_export(model: LlavaModel, tokenizer, meta: dict, out: str, dtype: torch.dtype, final: str) -> None:
    """Everything into the folder `out` (the caller's temporary name for `final`)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    plan = plan_export(model.spec)
    check_llm(model)
    processor, fmt = build_processor(model, tokenizer, plan)
    config = llava_config(model, plan)
    llava = LlavaForConditionalGeneration(config)
    missing, unexpected = llava.load_state_dict(llava_state_dict(model), strict=False)
    if missing or unexpected:  # a silently random part would ship a broken model
        raise RuntimeError(f"weights do not map onto LLaVA: missing={missing[:5]} unexpected={unexpected[:5]}")
    llava.to(dtype).eval()
    # Stop where our generate stops (end of turn, then eos), greedy like eval_llava by default.
    llava.generation_config = GenerationConfig(eos_token_id=list(fmt.stop_ids), pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id, do_sample=False,
                                               max_new_tokens=256)
    os.makedirs(out)
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    params = sum(p.numel() for p in llava.parameters())
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(model_card(meta, model.spec, plan, dtype, params, final))
    with open(os.path.join(out, "stage1_checkpoint.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, ensure_ascii=False, default=str)  # provenance: the source metadata


@torch.no_grad()
def verify(model: LlavaModel, tokenizer, out: str) -> float:
    """Max |logit difference| between our model and the exported folder on one random image and
    a one-turn prompt, both run in float32."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    spec = model.spec
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (spec.image_transform["size"] + 7, spec.image_transform["size"], 3),
                                         dtype=np.uint8))
    fmt = PromptFormat.for_model(spec, tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, fmt, [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nDescribe."}])[0]])
    pixels = torch.from_numpy(ImageTransform.from_dict(spec.image_transform)(image))[None]
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    if inputs["input_ids"].tolist() != ids.tolist():
        raise RuntimeError("the exported chat template does not reproduce the training prompt tokens")
    ours = model.llm(inputs_embeds=model.embed(ids, model.encode_images(pixels))).logits.float()
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    theirs = llava(input_ids=ids, pixel_values=pixels).logits
    return float((ours - theirs).abs().max())


def export(checkpoint: str, out: str, dtype: str = "auto", overwrite: bool = False, do_verify: bool = False,
           vision_tower: str | None = None, llm: str | None = None) -> str:
    """Export `checkpoint` to the folder `out`; raises NotExportable before writing anything."""
    path = checkpoint_file(checkpoint)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise NotExportable(f"{out} exists; pass --overwrite to replace it")
    meta = read_checkpoint_meta(path)
    spec = ModelSpec.from_dict(meta["spec"])
    plan_export(spec)  # refuse before loading gigabytes of frozen weights
    model, tokenizer, meta = load_checkpoint(path, "cpu", vision_tower=vision_tower, llm=llm)
    model.llm = merged(model.llm)  # a stage-3 (LoRA) checkpoint: adapters folded in, a plain LLM again
    model.eval()
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier export
    try:
        write_export(model, tokenizer, meta, partial, target_dtype(dtype, model.spec), out)
        if do_verify:
            diff = verify(model, tokenizer, partial)
            rounding = "" if target_dtype(dtype, model.spec) == torch.float32 else " (weights rounded to a 16-bit dtype)"
            console.info(f"verify: max |logit difference| = {diff:.3g}{rounding}")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(out):
        old = out + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    console.success(f"exported {checkpoint} -> {out}")
    console.info(vllm_verdict(model.spec))   # the model card says the same, with what to do
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder (checkpoints/<run>: its latest checkpoint), "
                                                       "a step folder, or a projector.safetensors")
    p.add_argument("--out", required=True, help="output folder (written as OUT.partial, then renamed)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weight dtype; auto: the LLM's stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                   help="reload the export and report the max logit difference to our model (loads it twice)")
    p.add_argument("--vision_tower", default=None, help="override the tower path stored in the checkpoint")
    p.add_argument("--llm", default=None, help="override the LLM path stored in the checkpoint")
    args = p.parse_args(argv)
    console.quiet_library_bars()
    try:
        export(args.checkpoint, args.out, args.dtype, args.overwrite, args.verify, args.vision_tower, args.llm)
    except NotExportable as e:
        print(f"export_hf: cannot export {args.checkpoint}: {e}", file=sys.stderr, flush=True)
        return 2
    except FileNotFoundError as e:  # a wrong --checkpoint or model path
        print(f"export_hf: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
