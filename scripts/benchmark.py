"""Stage-1 training throughput: our model against transformers' LlavaForConditionalGeneration.

Both are built in the same run from the bundled real-size configs (configs/*.json) with random
weights, nothing downloaded, and share the very same weight tensors. Everything but the
projector is frozen in both; each computes its own loss (ours: logits at supervised positions
only; the reference: LLaVA's own, over [B, T, vocab]). One timed step = forward + backward +
AdamW step on the projector, at the same batch and the same token ids.

    python scripts/benchmark.py --arch small --batch_size 8 --steps 5          # CPU, a few minutes
    python scripts/benchmark.py --arch course --batch_size 64 --cached_features --json bench.json   # GPU
    python scripts/benchmark.py --arch course --cached_features --sweep         # largest batch that fits

Architectures: course (Chinese-CLIP ViT-B/16 + Qwen3-0.6B), align (DINOv3 ViT-B/16 + Qwen3-VL-2B
text), llava15 (CLIP-L/14-336 + Qwen3-1.7B), small (a scaled-down CLIP + Qwen3 with the real
151,936-token vocabulary, for CPU).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the GPU (utils/dist.py PEAK_FLOPS). Model
FLOPs per sample (model.LlavaStage1.step_flops), 2 x multiply-adds of the matmuls a step must do:
  vision forward   2 P_v N_v + 4 L_v N_v^2 d_v            (skipped with --cached_features)
  projector        6 P_proj N                              (forward + weight and input grads)
  LLM forward      2 P_lm T + 4 L T^2 d_attn              (P without embeddings; full-square attention)
  LLM backward     the same again: gradients reach the inputs only, never frozen weights
  LM head          4 V d M                                 (forward + input grad at M supervised tokens)
The reference does more work (all T positions through the LM head), which is not credited.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from utils.config import HelpFormatter  # noqa: E402
from backbones import VISION_TYPES, arch_config  # noqa: E402
from model import LlavaStage1, ModelSpec, Projector, VisionTower  # noqa: E402
from utils.dist import peak_flops  # noqa: E402

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
    # a few-second sanity size for tests
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


def build_ours(arch: Arch, dtype: torch.dtype, attn: str, device: torch.device, seed: int = 0) -> LlavaStage1:
    """Random-weight towers from configs, wrapped exactly as training wraps them."""
    import transformers

    torch.manual_seed(seed)
    vcfg, lcfg = _config(arch.vision), _config(arch.llm)
    lcfg._attn_implementation = attn
    vmodel = getattr(transformers, VISION_TYPES[vcfg.model_type][1])(vcfg)
    vision = VisionTower(vmodel, vcfg.model_type, arch.feature_layer, arch.feature_select, arch.feature_post_norm)
    llm = transformers.AutoModelForCausalLM.from_config(lcfg, attn_implementation=attn)
    llm.requires_grad_(False).eval()
    projector = Projector(arch.projector, vcfg.hidden_size, lcfg.hidden_size)
    spec = ModelSpec(vision_tower="random", llm="random", projector=arch.projector, feature_layer=arch.feature_layer,
                     feature_select=arch.feature_select, feature_post_norm=arch.feature_post_norm,
                     num_image_tokens=vision.num_tokens, vision_hidden_size=vcfg.hidden_size,
                     llm_hidden_size=lcfg.hidden_size)
    vision.to(dtype)
    llm.to(dtype)
    model = LlavaStage1(vision, projector, llm, spec, IMAGE_TOKEN_ID if lcfg.vocab_size > IMAGE_TOKEN_ID else 3)
    return model.to(device)


def build_reference(ours: LlavaStage1, attn: str):
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


def make_batch(ours: LlavaStage1, batch: int, text_len: int, answer_len: int, device: torch.device, seed: int = 0):
    """Token ids [B, 4 + N + text_len] with N image slots after a 4-token prompt head; the last
    `answer_len` tokens are supervised."""
    g = torch.Generator().manual_seed(seed)
    n = ours.vision.num_tokens
    vocab = min(ours.llm.config.vocab_size, ours.image_token_id)
    head = torch.randint(0, vocab, (batch, 4), generator=g)
    text = torch.randint(0, vocab, (batch, text_len), generator=g)
    ids = torch.cat([head, torch.full((batch, n), ours.image_token_id), text], 1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - answer_len] = -100
    size = ours.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {k: t.to(device) for k, t in dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                                             pixel_values=pixels).items()}


def flops_per_sample(ours: LlavaStage1, text_len: int, answer_len: int, cached: bool) -> float:
    return ours.step_flops(1, [4 + ours.vision.num_tokens + text_len], answer_len, cached)


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


def time_steps(step_fn, device: torch.device, steps: int, warmup: int) -> tuple[float, int, float]:
    """(seconds per step, peak memory bytes, last loss)."""
    for _ in range(warmup):
        loss = step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    return seconds, peak, float(loss)


def step_ours(model: LlavaStage1, batch: dict, features: torch.Tensor | None, device: torch.device):
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ls, nt = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                           pixel_values=None if features is not None else batch["pixel_values"],
                           image_features=features)
            loss = ls / nt
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def step_reference(ref, batch: dict, device: torch.device):
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(arch_name: str, batch_size: int, text_len: int = 64, answer_len: int = 48, dtype: str = "auto",
        attn: str = "sdpa", cached_features: bool = False, steps: int = 10, warmup: int = 2, device: str = "auto",
        reference: bool = True) -> dict:
    from utils.dist import pick_device

    dev = pick_device(device)
    torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                   "fp32": torch.float32}[dtype]
    arch = ARCHS[arch_name]
    ours = build_ours(arch, torch_dtype, attn, dev)
    batch = make_batch(ours, batch_size, text_len, answer_len, dev)
    features = ours.encode_images(batch["pixel_values"]).detach() if cached_features else None   # [B, N, D_v]
    flops = flops_per_sample(ours, text_len, answer_len, cached_features)
    device_name, peak = peak_flops(dev)
    seq = batch["input_ids"].shape[1]

    def figures(seconds, peak_mem, loss, f):
        sps = batch_size / seconds
        return {"samples_per_s": round(sps, 2), "tokens_per_s": round(sps * seq, 1), "step_ms": round(seconds * 1e3, 1),
                "peak_mem_bytes": int(peak_mem), "loss": round(loss, 5),
                "mfu": round(sps * f / peak, 4) if peak else None}

    result = {"arch": arch_name, "device": device_name, "batch_size": batch_size, "seq_len": seq,
              "image_tokens": ours.vision.num_tokens, "supervised_tokens": answer_len, "dtype": str(torch_dtype),
              "attn": attn, "cached_features": cached_features, "flops_per_sample": flops,
              "peak_flops": peak, "steps": steps}
    ref = build_reference(ours, attn) if reference else None
    if ref is not None:
        # Same weights, same batch: the two losses must agree before either trains (exactly
        # when LLaVA can express our token selection, i.e. no final-norm on the features).
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ls, nt = ours(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
            ref_loss = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        result["initial_loss"] = {"ours": float(ls / nt), "reference": float(ref_loss)}
    result["ours"] = figures(*time_steps(step_ours(ours, batch, features, dev), dev, steps, warmup), flops)
    if ref is not None:
        ref_flops = flops_per_sample(ours, text_len, answer_len, False)
        del ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        try:
            result["reference"] = figures(*time_steps(step_reference(ref, batch, dev), dev, steps, warmup), ref_flops)
            result["ratio"] = round(result["ours"]["samples_per_s"] / result["reference"]["samples_per_s"], 3)
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                raise
            result["reference"] = {"error": "out of memory at this batch"}
            result["ratio"] = None
    result["mfu"] = result["ours"]["mfu"]
    return result


def sweep(arch_name: str, start: int, limit: int, **kw) -> dict:
    """Double the batch until ours runs out of memory (or reaches `limit`); report the largest."""
    best, b, tried = None, start, []
    while b <= limit:
        try:
            r = run(arch_name, b, reference=False, **kw)
            tried.append({"batch_size": b, "samples_per_s": r["ours"]["samples_per_s"], "mfu": r["ours"]["mfu"]})
            best = b
        except Exception as e:  # noqa: BLE001
            if not _oom(e):
                raise
            tried.append({"batch_size": b, "error": "out of memory"})
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        b *= 2
    return {"largest_batch": best, "tried": tried}


def print_table(r: dict) -> None:
    rows = [("", "ours", "reference")]
    ref = r.get("reference", {})
    for key in ("samples_per_s", "tokens_per_s", "step_ms", "peak_mem_bytes", "mfu", "loss"):
        fmt = (lambda x: f"{x / 2**30:.2f} GiB") if key == "peak_mem_bytes" else str
        rows.append((key, fmt(r["ours"][key]) if r["ours"].get(key) is not None else "-",
                     fmt(ref[key]) if ref.get(key) is not None else ref.get("error", "-")))
    print(f"\narch {r['arch']} on {r['device']} | batch {r['batch_size']} | seq {r['seq_len']} "
          f"({r['image_tokens']} image + text) | {r['dtype']} | {r['attn']} | cached features {r['cached_features']}")
    for a, b, c in rows:
        print(f"  {a:<16}{b:>18}{c:>22}")
    if r.get("ratio"):
        print(f"  ours / reference samples/s: {r['ratio']:.2f}x")
    if r.get("initial_loss"):
        print(f"  loss before training, same weights: ours {r['initial_loss']['ours']:.5f} | "
              f"reference {r['initial_loss']['reference']:.5f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", default="small", choices=list(ARCHS), help="architecture (see above)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per step (both models)")
    p.add_argument("--text_len", type=int, default=64, help="text tokens per sample besides the image slots")
    p.add_argument("--answer_len", type=int, default=48, help="supervised tokens per sample (caption + end of turn)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="frozen weights (auto: bf16 on GPU)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention backend")
    p.add_argument("--cached_features", action="store_true", help="ours trains from cached features (no ViT)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no_reference", action="store_true", help="measure ours only")
    p.add_argument("--sweep", action="store_true", help="find the largest batch that fits (ours), then compare there")
    p.add_argument("--sweep_limit", type=int, default=1024, help="largest batch the sweep tries")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    kw = dict(text_len=args.text_len, answer_len=args.answer_len, dtype=args.dtype, attn=args.attn,
              cached_features=args.cached_features, steps=args.steps, warmup=args.warmup, device=args.device)
    batch = args.batch_size
    sweep_result = None
    if args.sweep:
        sweep_result = sweep(args.arch, args.batch_size, args.sweep_limit, **kw)
        print(json.dumps(sweep_result))
        batch = sweep_result["largest_batch"] or args.batch_size
    result = run(args.arch, batch, reference=not args.no_reference, **kw)
    if sweep_result:
        result["sweep"] = sweep_result
    print_table(result)
    if args.json:
        from utils.config import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
