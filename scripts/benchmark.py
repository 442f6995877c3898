"""Stage-1 training throughput: our model against transformers' LlavaForConditionalGeneration.

Both are built in the same run from the bundled real-size configs (configs/*.json) with random
weights, nothing downloaded, and share the very same weight tensors. Everything but the
projector is frozen in both; each computes its own loss (ours: logits at supervised positions
only; the reference: LLaVA's own, over [B, T, vocab]). One timed step = forward + backward +
AdamW step on the projector, at the same batch and the same token ids.

Like for like: both compute the same function, checked on the loss before training. LLaVA
cannot apply the tower's final norm to the features (the course's ln_post) nor drop DINOv3's
registers, so a comparison runs both without the norm and with every token (printed as
"like for like"); --no_reference times ours exactly as the arch defines it.

What the lean loss buys is memory: the reference materialises [B, T, V] logits (and their
gradient), ours [M, V] at the M supervised tokens. At the same batch the two run at about the
same speed when the LLM dominates; the difference is the largest batch that fits, which
--sweep finds for each model (then compares both at the smaller of the two).

    python scripts/benchmark.py --arch course --batch_size 4 --steps 3 --device cpu     # real size, CPU: minutes
    python scripts/benchmark.py --arch course --sweep --json course.json                 # GPU: bf16, SDPA
    python scripts/benchmark.py --arch align --sweep --json align.json
    python scripts/benchmark.py --arch small --batch_size 8                              # a quick CPU look
    # several processes (torchrun): time and memory per process of one step under a strategy (parallel.py)
    torchrun --nproc-per-node 2 scripts/benchmark.py --arch course --tune_llm full --train_strategy fsdp-full-shard
    python scripts/benchmark.py --arch course --tune_llm full --train_strategy fsdp-full-shard   # 1 process: the baseline
    # stages 2 and 3 at the course's settings (512 text tokens): ours only, the LLM trains too
    python scripts/benchmark.py --arch course --tune_llm full --gradient_checkpointing --batch_size 4 --text_len 512 --answer_len 256
    python scripts/benchmark.py --arch course --tune_llm lora --batch_size 8 --text_len 512 --answer_len 256
    # side by side, each in a fresh process: the loss in chunks against whole [M, vocab] logits, fp32 against bf16
    python scripts/benchmark.py --arch course --tune_llm lora --batch_size 8 --text_len 512 --answer_len 512 \
        --compare ce_chunk_size --ce_chunk_size 1024 --steps 2 --warmup 1
    python scripts/benchmark.py --arch course --batch_size 4 --steps 20 --warmup 0 --compare precision

Architectures: course (Chinese-CLIP ViT-B/16 + Qwen3-0.6B), align (DINOv3 ViT-B/16 + Qwen3-VL-2B
text), llava15 (CLIP-L/14-336 + Qwen3-1.7B), small (a scaled-down CLIP + Qwen3 with the real
151,936-token vocabulary: a tiny decoder, so the LM head dominates and the lean loss looks far
better than at real size), tiny / tiny_align (seconds, for tests).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the GPU (utils/flops.py PEAK_FLOPS). Model
FLOPs per sample (utils/flops.step_flops), 2 x multiply-adds of the matmuls a step must do:
  vision forward   2 P_v N_v + 4 L_v N_v^2 d_v            (skipped with --cached_features)
  projector        6 P_proj N                              (forward + weight and input grads)
  LLM forward      2 P_lm T + 4 L T^2 d_attn              (P without embeddings; full-square attention)
  LLM backward     the same again: gradients reach the inputs only, never frozen weights
  LM head          4 V d M                                 (forward + input grad at M supervised tokens)
The reference does more work (all T positions through the LM head), which is not credited.
On a CPU, peak memory is the process's resident set, sampled; both models share one process,
so the second one measured (the reference) starts from what the first left allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from backbones import VISION_TYPES, arch_config, prefix_tokens  # noqa: E402
from model import LlavaModel, ModelSpec, Projector, VisionTower  # noqa: E402
from parallel import SHARDED, STRATEGIES, grad_norm, parallelize  # noqa: E402
from prompts import IGNORE_INDEX  # noqa: E402
from tuning import Tuning, add_lora, assert_trainable, set_trainable  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.checkpoint import complete_optimizer_state  # noqa: E402
from utils.dist import gather_objects, pick_device, setup as setup_dist  # noqa: E402
from utils.cpu import resolve_precision  # noqa: E402
from utils.flops import peak_flops, step_flops  # noqa: E402

IMAGE_TOKEN_ID = 151655  # Qwen's <|image_pad|>


@dataclass
class Arch:
    vision: str | dict
    llm: str | dict
    projector: str
    feature_layer: int
    feature_select: str
    feature_post_norm: bool


ARCHS = {
    "course": Arch("clip-vit-b16-zh", "qwen3-0.6b", "linear", -1, "all", True),
    "align": Arch("dinov3-vitb16", "qwen3vl-2b-text", "mlp2x_gelu", -1, "patch", True),
    "llava15": Arch("clip-vit-l14-336", "qwen3-1.7b", "mlp2x_gelu", -2, "patch", False),
    "small": Arch(dict(model_type="clip_vision_model", hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=768, image_size=224, patch_size=16),
                  dict(model_type="qwen3", vocab_size=151936, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       tie_word_embeddings=True),
                  "linear", -1, "all", False),
    # few-second sizes for tests: a CLIP pair, and the align plan's shape (DINOv3 with registers)
    "tiny_align": Arch(dict(model_type="dinov3_vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, image_size=32, patch_size=8, num_register_tokens=4),
                       dict(model_type="qwen3", vocab_size=1000, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            tie_word_embeddings=True),
                       "mlp2x_gelu", -1, "patch", True),
    "tiny": Arch(dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, image_size=32, patch_size=8),
                 dict(model_type="qwen3", vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
                 "mlp2x_gelu", -1, "all", False),
}


def _config(c: str | dict):
    from transformers import AutoConfig

    if isinstance(c, dict):
        c = dict(c)
        return AutoConfig.for_model(c.pop("model_type"), **c)
    cfg = arch_config(c, models_dir="/nonexistent")  # always the bundled config: no download, no local folder
    return getattr(cfg, "vision_config", cfg)


def build_ours(arch: Arch, dtype: torch.dtype, attn: str, device: torch.device, seed: int = 0) -> LlavaModel:
    """Random-weight towers from configs, wrapped exactly as training wraps them."""
    import transformers

    torch.manual_seed(seed)
    vcfg, lcfg = _config(arch.vision), _config(arch.llm)
    lcfg._attn_implementation = attn
    with torch.device(device):  # random init where the model runs: seconds on a GPU for billions of weights
        vmodel = getattr(transformers, VISION_TYPES[vcfg.model_type][1])(vcfg)
        llm = transformers.AutoModelForCausalLM.from_config(lcfg, attn_implementation=attn)
        projector = Projector(arch.projector, vcfg.hidden_size, lcfg.hidden_size)
    vision = VisionTower(vmodel, vcfg.model_type, arch.feature_layer, arch.feature_select, arch.feature_post_norm)
    llm.requires_grad_(False).eval()
    spec = ModelSpec(vision_tower="random", llm="random", projector=arch.projector, feature_layer=arch.feature_layer,
                     feature_select=arch.feature_select, feature_post_norm=arch.feature_post_norm,
                     num_image_tokens=vision.num_tokens, vision_hidden_size=vcfg.hidden_size,
                     llm_hidden_size=lcfg.hidden_size)
    vision.to(dtype)
    llm.to(dtype)
    model = LlavaModel(vision, projector, llm, spec, IMAGE_TOKEN_ID if lcfg.vocab_size > IMAGE_TOKEN_ID else 3)
    return model.to(device)


def build_reference(ours: LlavaModel, attn: str):
    """transformers' LlavaForConditionalGeneration holding our tensors (no copy)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    v, lm, spec = ours.vision.model, ours.llm, ours.spec
    # LLaVA can drop the first token ("default") or keep all ("full"); it has no final-norm
    # option, so a post-norm arch is measured without it (same FLOPs).
    strategy = "default" if spec.feature_select == "patch" else "full"
    cfg = LlavaConfig(vision_config=v.config.to_dict(), text_config=lm.config.to_dict(),
                      image_token_index=ours.image_token_id, projector_hidden_act="gelu",
                      vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=strategy,
                      image_seq_length=ours.vision.num_tokens)
    cfg.text_config._attn_implementation = attn
    ref = LlavaForConditionalGeneration(cfg).to(next(lm.parameters()).device)
    d_lm = lm.config.hidden_size
    state = {f"model.vision_tower.{k}": t for k, t in v.state_dict().items()}
    state.update({f"model.language_model.{k}": t for k, t in lm.model.state_dict().items()})
    state["lm_head.weight"] = lm.lm_head.weight
    p = ours.projector
    state["model.multi_modal_projector.linear_1.weight"] = p.linear_1.weight.detach().clone()
    state["model.multi_modal_projector.linear_1.bias"] = p.linear_1.bias.detach().clone()
    if isinstance(p.linear_2, torch.nn.Linear):
        state["model.multi_modal_projector.linear_2.weight"] = p.linear_2.weight.detach().clone()
        state["model.multi_modal_projector.linear_2.bias"] = p.linear_2.bias.detach().clone()
    else:  # a linear projector: LLaVA's linear_2 becomes the identity and its GELU is linear
        ref.config.projector_hidden_act = "linear"
        from transformers.activations import ACT2FN

        ref.model.multi_modal_projector.act = ACT2FN["linear"]
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(d_lm, device=p.linear_1.weight.device)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d_lm, device=p.linear_1.weight.device)
    missing, unexpected = ref.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"reference weight mapping: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ref.requires_grad_(False)
    ref.model.multi_modal_projector.float().requires_grad_(True)
    return ref.eval()


def make_batch(ours: LlavaModel, batch: int, text_len: int, answer_len: int, device: torch.device, seed: int = 0):
    """Token ids [B, 4 + N + text_len] with N image slots after a 4-token prompt head; the last
    `answer_len` tokens are supervised."""
    g = torch.Generator().manual_seed(seed)
    n = ours.vision.num_tokens
    vocab = min(ours.llm.config.vocab_size, ours.image_token_id)
    head = torch.randint(0, vocab, (batch, 4), generator=g)
    text = torch.randint(0, vocab, (batch, text_len), generator=g)
    ids = torch.cat([head, torch.full((batch, n), ours.image_token_id), text], 1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - answer_len] = IGNORE_INDEX
    size = ours.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {k: t.to(device) for k, t in dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                                             pixel_values=pixels).items()}


def flops_per_sample(ours: LlavaModel, text_len: int, answer_len: int, cached: bool) -> float:
    return step_flops(ours, 1, [4 + ours.vision.num_tokens + text_len], answer_len, cached)


class PeakRSS:
    """Samples this process's resident memory (CPU runs have no allocator peak counter)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def time_steps(step_fn, device: torch.device, steps: int, warmup: int) -> tuple[float, int, list[float]]:
    """(seconds per step, peak memory bytes, the loss of every step, warm-up included)."""
    losses = [step_fn() for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for _ in range(steps):
            losses.append(step_fn())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    return seconds, peak, [float(x) for x in losses]


def step_ours(model: LlavaModel, batch: dict, features: torch.Tensor | None, device: torch.device):
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with model.autocast():
            ls, nt = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                           pixel_values=None if features is not None else batch["pixel_values"],
                           image_features=features)
            loss = ls / nt
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def step_reference(ref, batch: dict, device: torch.device, autocast_dtype: torch.dtype | None):
    """The reference under the same autocast as ours: the same precision on both sides."""
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_dtype is not None):
            loss = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def comparable(arch: Arch) -> tuple[Arch, list[str]]:
    """The nearest architecture LlavaForConditionalGeneration computes exactly, and what changed.

    LLaVA feeds hidden_states[layer] to its projector without the tower's final norm, and its
    "default" selection drops exactly one token. A comparison must run the same function in both
    (the initial losses are checked), so the course's ln_post is left out of both, and DINOv3's
    CLS + 4 registers are kept by both. Neither changes the FLOPs beyond a LayerNorm or 5 tokens."""
    changes = []
    if arch.feature_post_norm:
        arch = replace(arch, feature_post_norm=False)
        changes.append("features without the tower's final norm (LLaVA has no such option)")
    prefix = prefix_tokens(_config(arch.vision))
    if arch.feature_select == "patch" and prefix > 1:
        arch = replace(arch, feature_select="all")
        changes.append(f"all tokens kept, {prefix} prefix tokens included (LLaVA's default drops only one)")
    return arch, changes


@dataclass
class Models:
    """Both models of one comparison, built once and timed at any batch size."""

    arch: str
    ours: LlavaModel
    ref: Any                 # LlavaForConditionalGeneration sharing ours' weights, or None
    changes: list[str]       # what `comparable` changed so that both compute the same function
    device: torch.device
    dtype: torch.dtype


def build(arch_name: str, precision: str = "auto", attn: str = "sdpa", device: str = "auto",
          reference: bool = True, tune_llm: str = "none", gradient_checkpointing: bool = False,
          ce_chunk_size: int = 0) -> Models:
    """Ours (and the reference); `tune_llm` full or lora trains the LLM as stages 2 and 3 do
    (full: fp32 master weights; lora: the course's adapters over the frozen base). `precision`
    as training's --precision: bf16 stores the frozen weights in bf16 and runs under autocast."""
    dev = pick_device(device)
    compute = resolve_precision(precision, dev)
    torch_dtype = compute or torch.float32
    arch, changes = comparable(ARCHS[arch_name]) if reference else (ARCHS[arch_name], [])
    ours = build_ours(arch, torch_dtype, attn, dev)
    ours.autocast_dtype, ours.ce_chunk_size = compute, ce_chunk_size
    tuning = Tuning(tune_llm)
    if tune_llm == "full":
        ours.llm.float()
    elif tune_llm == "lora":
        ours.llm = add_lora(ours.llm, tuning)
    ours.tuning = tuning
    set_trainable(ours, tuning)
    assert_trainable(ours, tuning)
    if gradient_checkpointing:
        ours.enable_gradient_checkpointing()
    return Models(arch_name, ours, build_reference(ours, attn) if reference else None, changes, dev, torch_dtype)


def run(m: Models, batch_size: int, text_len: int = 64, answer_len: int = 48, cached_features: bool = False,
        steps: int = 10, warmup: int = 2, measure: tuple[str, ...] = ("ours", "reference")) -> dict:
    """Time `measure` ("ours", "reference" or both) at one batch size. With the reference, both
    compute the same function (see comparable), checked on the loss before training."""
    ours, ref, dev = m.ours, m.ref if "reference" in measure else None, m.device
    batch = make_batch(ours, batch_size, text_len, answer_len, dev)
    features = ours.encode_images(batch["pixel_values"]).detach() if cached_features else None   # [B, N, D_v]
    flops = flops_per_sample(ours, text_len, answer_len, cached_features)
    device_name, peak = peak_flops(dev)
    seq = batch["input_ids"].shape[1]
    vocab = ours.llm.config.vocab_size

    def figures(seconds, peak_mem, losses, f):
        sps = batch_size / seconds
        return {"samples_per_s": round(sps, 2), "tokens_per_s": round(sps * seq, 1), "step_ms": round(seconds * 1e3, 3),
                "peak_mem_bytes": int(peak_mem), "loss": round(losses[-1], 5), "losses": [round(x, 6) for x in losses],
                "mfu": round(sps * f / peak, 4) if peak else None}

    result = {"arch": m.arch, "device": device_name, "batch_size": batch_size, "seq_len": seq,
              "image_tokens": ours.vision.num_tokens, "supervised_tokens": answer_len, "dtype": str(m.dtype),
              "precision": "bf16" if ours.autocast_dtype else "fp32", "ce_chunk_size": ours.ce_chunk_size,
              "attn": ours.llm.config._attn_implementation, "cached_features": cached_features,
              "tune_llm": ours.tuning.llm, "gradient_checkpointing": bool(ours.checkpointed_layers),
              "trainable_params": sum(p.numel() for _, p in ours.trainable_parameters()),
              "flops_per_sample": flops, "peak_flops": peak, "steps": steps, "comparison": m.changes,
              # What the lean loss saves (computed, not measured): one fp32 copy of the logits the
              # loss reads, [B, T, V] in the reference against [M, V] at supervised tokens in ours
              # (a chunk of them with --ce_chunk_size).
              "logits_bytes": {"ours": min(batch_size * answer_len, ours.ce_chunk_size or batch_size * answer_len)
                               * vocab * 4, "reference": batch_size * seq * vocab * 4}}
    if ref is not None:
        # Same weights, same batch, same function: the two losses agree before either trains.
        with torch.no_grad(), ours.autocast():
            ls, nt = ours(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
            ref_loss = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        result["initial_loss"] = {"ours": float(ls / nt), "reference": float(ref_loss)}
        tol = 2e-2 if m.dtype == torch.bfloat16 else 1e-4
        if abs(float(ls / nt) - float(ref_loss)) > tol * abs(float(ref_loss)):
            raise RuntimeError(f"ours and the reference disagree before training ({result['initial_loss']}): "
                               "they would not be timing the same computation")
    for who in measure:
        step = (step_ours(ours, batch, features, dev) if who == "ours"
                else step_reference(ref, batch, dev, ours.autocast_dtype))
        f = flops if who == "ours" else flops_per_sample(ours, text_len, answer_len, False)
        try:
            result[who] = figures(*time_steps(step, dev, steps, warmup), f)
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                raise
            result[who] = {"error": "out of memory at this batch"}
        finally:
            del step
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if "samples_per_s" in result.get("ours", {}) and "samples_per_s" in result.get("reference", {}):
        result["ratio"] = round(result["ours"]["samples_per_s"] / result["reference"]["samples_per_s"], 3)
    result["mfu"] = result.get("ours", {}).get("mfu")
    return result


def sweep(m: Models, start: int, limit: int, who: str, **kw) -> dict:
    """Double the batch until `who` ("ours" or "reference") runs out of memory or reaches
    `limit`: the largest batch that fits, and the throughput there. The lean loss's gain shows
    here: no [B, T, V] logits, so a larger batch fits."""
    best, b, tried = None, start, []
    while b <= limit:
        r = run(m, b, measure=(who,), **kw)
        if "error" in r[who]:
            tried.append({"batch_size": b, "error": r[who]["error"]})
            break
        tried.append({"batch_size": b, "samples_per_s": r[who]["samples_per_s"], "mfu": r[who]["mfu"],
                      "peak_mem_bytes": r[who]["peak_mem_bytes"]})
        best = tried[-1]
        b *= 2
    return {"largest_batch": best["batch_size"] if best else None,
            "samples_per_s_at_largest": best["samples_per_s"] if best else None, "tried": tried}


def print_table(r: dict) -> None:
    rows = [("", "ours", "reference")]
    ours, ref = r.get("ours", {}), r.get("reference", {})
    for key in ("samples_per_s", "tokens_per_s", "step_ms", "peak_mem_bytes", "mfu", "loss"):
        fmt = (lambda x: f"{x / 2**30:.2f} GiB") if key == "peak_mem_bytes" else str
        rows.append((key, fmt(ours[key]) if ours.get(key) is not None else "-",
                     fmt(ref[key]) if ref.get(key) is not None else ref.get("error", "-")))
    rows.append(("logits (fp32)", *(f"{r['logits_bytes'][k] / 2**30:.2f} GiB" for k in ("ours", "reference"))))
    print(f"\narch {r['arch']} on {r['device']} | batch {r['batch_size']} | seq {r['seq_len']} "
          f"({r['image_tokens']} image + text) | {r['dtype']} | {r['attn']} | cached features {r['cached_features']}"
          f" | LLM {r['tune_llm']}{' + gradient checkpointing' if r['gradient_checkpointing'] else ''}"
          f" | {r['trainable_params'] / 1e6:.2f}M trainable")
    for a, b, c in rows:
        print(f"  {a:<16}{b:>18}{c:>22}")
    for change in r.get("comparison", []):
        print(f"  like for like: {change}")
    if r.get("ratio"):
        print(f"  ours / reference samples/s: {r['ratio']:.2f}x")
    if r.get("initial_loss"):
        print(f"  loss before training, same weights: ours {r['initial_loss']['ours']:.5f} | "
              f"reference {r['initial_loss']['reference']:.5f}")
    for who, s in r.get("sweep", {}).items():
        print(f"  sweep {who}: largest batch {s['largest_batch']} at {s['samples_per_s_at_largest']} samples/s")


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a sharded DTensor: its own shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def run_parallel(args) -> dict:
    """--train_strategy: one training step (forward, backward, gradient reduction, clipping, AdamW)
    of every process at --batch_size each, and what each process holds of the parameters, the
    gradients and the optimizer state (counted from its tensors) besides its peak memory. Under
    torchrun the strategy applies (parallel.py, as training uses it); with plain `python` nothing
    is wrapped: the one-process baseline."""
    info = setup_dist(args.device)
    sharded = info.launched and args.train_strategy in SHARDED
    precision = "bf16" if resolve_precision(args.precision, info.device) else "fp32"   # the device's, not the CPU's
    # FSDP builds on the CPU and fully_shard moves one unit at a time, as training does.
    m = build(args.arch, precision, args.attn, "cpu" if sharded else str(info.device), reference=False,
              tune_llm=args.tune_llm, gradient_checkpointing=args.gradient_checkpointing,
              ce_chunk_size=args.ce_chunk_size)
    model = m.ours
    par = parallelize(model, args.train_strategy, info, args.fsdp_offload, shard_vision=args.fsdp_vision == "shard")
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    complete_optimizer_state(opt)
    batch = make_batch(model, args.batch_size, args.text_len, args.answer_len, info.device, seed=info.rank)
    grads = [0]

    def step():
        with model.autocast():
            ls, nt = par.engine(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                pixel_values=batch["pixel_values"])
            (ls / (nt * info.world_size) * par.grad_scale).backward()   # the global mean over equal batches
        grad_norm(params, 1.0)
        grads[0] = local_bytes([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ls.detach() / nt
    seconds, peak, losses = time_steps(step, info.device, args.steps, args.warmup)
    loss = losses[-1]
    mine = {"rank": info.rank, "step_ms": round(seconds * 1e3, 1), "peak_mem_bytes": int(peak),
            "params_bytes": local_bytes(model.parameters()), "trained_params_bytes": local_bytes(params),
            "grads_bytes": grads[0], "optimizer_bytes": local_bytes(t for st in opt.state.values() for t in st.values()
                                                                    if torch.is_tensor(t) and t.dim()),
            "loss": round(float(loss), 5)}
    ranks = gather_objects(mine)
    result = {"arch": args.arch, "device": peak_flops(info.device)[0], "train_strategy": par.strategy or "none",
              "processes": info.world_size, "fsdp_offload": args.fsdp_offload, "vision_tower": args.fsdp_vision,
              "tune_llm": model.tuning.llm, "gradient_checkpointing": bool(model.checkpointed_layers),
              "batch_per_process": args.batch_size, "seq_len": batch["input_ids"].shape[1],
              "samples_per_s": round(args.batch_size * info.world_size / max(r["step_ms"] for r in ranks) * 1e3, 3),
              "per_process": ranks}
    if info.is_main:
        gib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        print(f"\n{result['train_strategy']} x {info.world_size} on {result['device']} | arch {args.arch} | LLM "
              f"{result['tune_llm']} | batch {args.batch_size} per process | seq {result['seq_len']} | "
              f"{result['samples_per_s']} samples/s | vision tower {args.fsdp_vision}")
        print(f"  {'rank':<6}{'step':>10}{'peak mem':>14}{'params':>14}{'grads':>14}{'optimizer':>14}")
        for r in ranks:
            print(f"  {r['rank']:<6}{r['step_ms']:>8} ms{gib(r['peak_mem_bytes']):>14}{gib(r['params_bytes']):>14}"
                  f"{gib(r['grads_bytes']):>14}{gib(r['optimizer_bytes']):>14}")
        if args.json:
            atomic_write(args.json, json.dumps(result, indent=2))
    if info.launched:
        # Both ranks leave together: a peer that destroys its gloo group while rank 0 still writes the
        # JSON has aborted at exit under load ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def compare(args, argv: list[str]) -> dict:
    """--compare: ours twice, each in a fresh process (a CPU's peak memory is the process's resident
    set, which a second model in the same process would start from), one setting changed: fp32
    against bf16, or the whole loss against chunks. Both train the same batch from the same
    weights, so their loss curves can be compared step by step."""
    keep, i = [], 0
    while i < len(argv):                     # this command without --compare/--json; the variant's flags follow
        if argv[i].split("=")[0] in ("--compare", "--json"):
            i += 1 if "=" in argv[i] else 2
            continue
        keep.append(argv[i])
        i += 1
    if args.compare == "precision":
        variants = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"]}
    else:
        n = args.ce_chunk_size or 1024
        variants = {"whole loss": ["--ce_chunk_size", "0"], f"chunks of {n}": ["--ce_chunk_size", str(n)]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            path = os.path.join(tmp, f"{len(results)}.json")
            code = subprocess.run([sys.executable, os.path.abspath(__file__), *keep, *extra, "--no_reference",
                                   "--json", path]).returncode
            if code != 0:   # killed by the kernel for memory (-9), most likely: the other variant still counts
                results[name] = {"ours": {"error": f"exited {code}" + (" (killed: out of memory?)" if code == -9
                                                                       else "")}}
                continue
            with open(path, encoding="utf-8") as fh:
                results[name] = json.load(fh)
    (a_name, a), (b_name, b) = results.items()
    shape = a if "tune_llm" in a else b
    if "tune_llm" in shape:
        print(f"\n--compare {args.compare}: arch {args.arch} | LLM {shape['tune_llm']} | batch {shape['batch_size']} | "
              f"seq {shape['seq_len']} | {shape['supervised_tokens']} supervised tokens a sample | {shape['device']}")
    print(f"  {'':<16}{'step':>12}{'samples/s':>12}{'peak mem':>12}{'first loss':>12}{'last loss':>12}")
    for name, r in results.items():
        o = r["ours"]
        if "error" in o:
            print(f"  {name:<16}{o['error']:>48}")
            continue
        print(f"  {name:<16}{o['step_ms'] / 1e3:>10.2f} s{o['samples_per_s']:>12}{o['peak_mem_bytes'] / 2**30:>8.2f} GiB"
              f"{o['losses'][0]:>12.5f}{o['loss']:>12.5f}")
    summary = {}
    if "error" not in a["ours"] and "error" not in b["ours"]:
        la, lb = a["ours"]["losses"], b["ours"]["losses"]
        summary = {"speed": round(a["ours"]["step_ms"] / b["ours"]["step_ms"], 3),     # samples/s are rounded
                   "peak_mem": round(b["ours"]["peak_mem_bytes"] / a["ours"]["peak_mem_bytes"], 3),
                   "max_loss_diff": max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(la, lb))}
        print(f"  {b_name} / {a_name}: {summary['speed']:.2f}x the samples/s, {summary['peak_mem']:.2f}x the peak "
              f"memory; over {len(la)} steps on one batch the losses differ by at most {summary['max_loss_diff']:.2e} "
              "(relative)")
    out = {"compare": args.compare, "variants": results, **summary}
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--arch", default="course", choices=list(ARCHS), help="architecture (see above)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per step (both models); the sweep's start")
    p.add_argument("--text_len", type=int, default=64, help="text tokens per sample besides the image slots")
    p.add_argument("--answer_len", type=int, default=48, help="supervised tokens per sample (caption + end of turn)")
    p.add_argument("--precision", "--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="as training's --precision: bf16 = frozen weights in bf16 and autocast, on both models "
                        "(auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--ce_chunk_size", type=int, default=0, help="ours: the loss in chunks of this many supervised "
                                                                "tokens (training's --ce_chunk_size; 0: whole)")
    p.add_argument("--compare", default=None, choices=["precision", "ce_chunk_size"],
                   help="ours twice, each in a fresh process (its own peak memory): fp32 against bf16, or the "
                        "whole loss against --ce_chunk_size chunks (1024 when not given); a side-by-side table")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention backend")
    p.add_argument("--cached_features", action="store_true", help="ours trains from cached features (no ViT; "
                                                                   "the reference still runs its tower)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no_reference", action="store_true", help="measure ours only, with the arch exactly as defined")
    p.add_argument("--sweep", action="store_true", help="find the largest batch each model fits, then compare both "
                                                        "at the smaller of the two")
    p.add_argument("--sweep_limit", type=int, default=1024, help="largest batch the sweep tries")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--tune_llm", default="none", choices=list(Tuning.MODES),
                   help="train the LLM as stage 2 (full) or stage 3 (lora) does; measures ours only")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute LLM layers in backward "
                                                                        "(stage 2's default)")
    p.add_argument("--train_strategy", default=None, choices=list(STRATEGIES),
                   help="time and memory per process of a step under this strategy (under torchrun; plain python: "
                        "the one-process baseline); ours only")
    p.add_argument("--fsdp_offload", action="store_true", help="with a sharded --train_strategy: CPUOffloadPolicy")
    p.add_argument("--fsdp_vision", default="replicate", choices=["replicate", "shard"],
                   help="FSDP: the frozen tower replicated (what training does) or an FSDP unit of its own")
    args = p.parse_args(argv)
    if args.train_strategy:
        return run_parallel(args)
    kw = dict(text_len=args.text_len, answer_len=args.answer_len, cached_features=args.cached_features,
              steps=args.steps, warmup=args.warmup)
    alone = args.no_reference or args.tune_llm != "none" or args.gradient_checkpointing  # the reference is stage 1's
    measure = ("ours",) if alone else ("ours", "reference")
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:])
    models = build(args.arch, args.precision, args.attn, args.device, reference=not alone, tune_llm=args.tune_llm,
                   gradient_checkpointing=args.gradient_checkpointing, ce_chunk_size=args.ce_chunk_size)
    batch, sweeps = args.batch_size, {}
    if args.sweep:
        for who in measure:
            sweeps[who] = sweep(models, args.batch_size, args.sweep_limit, who, **kw)
            print(json.dumps({who: sweeps[who]}), flush=True)
        fits = [s["largest_batch"] for s in sweeps.values() if s["largest_batch"]]
        batch = min(fits) if fits else args.batch_size
    result = run(models, batch, measure=measure, **kw)
    if sweeps:
        result["sweep"] = sweeps
    print_table(result)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
