"""Model FLOPs of a stage-1 step, the GPU's peak, and MFU: what training logs and
scripts/benchmark.py reports, from one count.

FLOPs are 2 x multiply-adds of the matmuls a step must do:
  vision forward   2 P_v N + 4 L_v N^2 d_v per image        (none from cached features)
  projector        6 P_proj N per image                       (forward + weight and input grads)
  LLM forward      2 P T + 4 L T^2 d_attn per sample          (P without embeddings)
  LLM backward     the same again: gradients reach the inputs only, frozen weights get none
                   (stage 2, LLM tuned in full: twice that, weight gradients too)
  LM head          4 V d per supervised token                 (forward + input grad; 6 when tuned in full)
"""

from __future__ import annotations

from typing import Any

import torch

# Peak dense bf16 tensor FLOP/s per GPU (vendor datasheets, without sparsity), for MFU.
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H800": 989e12,
              "H20": 148e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L20": 119.5e12,
              "RTX 4090": 165.2e12, "RTX 3090": 71e12, "A10": 125e12, "V100": 125e12}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, peak bf16 FLOP/s or None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    low = name.lower()
    if "h100" in low:  # "NVIDIA H100 80GB HBM3" is the SXM part
        return name, PEAK_FLOPS["H100 PCIe" if "pcie" in low else "H100 NVL" if "nvl" in low else "H100 SXM"]
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if all(part.lower() in low for part in key.split()):
            return name, PEAK_FLOPS[key]
    return name, None


def matmul_params(model: Any) -> tuple[int, int, int]:
    """(projector, vision without embeddings, LLM decoder without embeddings) parameter counts
    of a model.LlavaModel; counted once and kept on the model, since training asks every step."""
    counts = getattr(model, "_matmul_params", None)
    if counts is None:
        decoder = model.llm.get_decoder()
        p_v = 0 if model.vision is None else sum(
            p.numel() for name, p in model.vision.model.named_parameters() if "embed" not in name)
        counts = (sum(p.numel() for p in model.projector.parameters()), p_v,
                  sum(p.numel() for p in decoder.parameters()) - decoder.get_input_embeddings().weight.numel())
        model._matmul_params = counts
    return counts


def step_flops(model: Any, n_images: int, seq_tokens: list[int], n_supervised: int, cached: bool = False) -> float:
    """Model FLOPs of one training step of a model.LlavaModel (see the module docstring)."""
    lm, n = model.llm.config, model.spec.num_image_tokens
    p_proj, p_v, p_lm = matmul_params(model)
    flops = 6.0 * p_proj * n * n_images
    if not cached and model.vision is not None:
        v = model.vision.model.config
        flops += n_images * (2 * p_v * n + 4 * v.num_hidden_layers * n * n * v.hidden_size)
    d_attn = lm.num_attention_heads * (getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads)
    llm_fwd = sum(2 * p_lm * t + 4 * lm.num_hidden_layers * t * t * d_attn for t in seq_tokens)
    # A fully tuned LLM (stage 2) also computes weight gradients: a third pass of the same size.
    # LoRA's adapters are too small to count; its frozen base needs input gradients only.
    full = getattr(getattr(model, "tuning", None), "llm", "none") == "full"
    return flops + (3 if full else 2) * llm_fwd + (6 if full else 4) * lm.vocab_size * lm.hidden_size * n_supervised


def sample_lengths(batch: dict) -> list[int]:
    """Tokens per sample: from the attention mask, or from where positions restart when packed."""
    if "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        return [b - a for a, b in zip(starts, starts[1:])]
    return batch["attention_mask"].sum(1).tolist()


def mfu(model: Any, micro: list[dict], n_supervised: int, cached: bool, seconds: float) -> dict[str, float]:
    """{"train/mfu": ...} for one step on a GPU of known peak (this rank's model FLOPs over its
    time); {} elsewhere."""
    peak = peak_flops(next(model.projector.parameters()).device)[1]
    if not peak:
        return {}
    flops = step_flops(model, sum(b["size"] for b in micro), [n for b in micro for n in sample_lengths(b)],
                       n_supervised, cached)
    return {"train/mfu": flops / seconds / peak}
