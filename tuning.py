"""What trains beyond the projector (stages 2 and 3), and how a tuned LLM is saved and loaded.

    --tune_llm none   the LLM stays frozen (stage 1)
    --tune_llm full   every LLM weight trains (stage 2, the course's full fine-tuning)
    --tune_llm lora   low-rank adapters through peft (stage 3; the course: r 8, alpha 16,
                      dropout 0.05 on q/k/v/o_proj); with --load_in_4bit the frozen base is
                      4-bit NF4 through bitsandbytes (QLoRA, CUDA only)

The vision tower is frozen in every stage. Training asserts that exactly the parameters these
flags name have requires_grad (assert_trainable), and a test checks the others are bit-identical
after training.

A step folder of a stage-2/3 run holds, beside projector.safetensors (always: it also carries
the metadata that rebuilds the model):
    llm/       --tune_llm full: the LLM in transformers' format with its tokenizer
               (AutoModelForCausalLM.from_pretrained loads it)
    adapter/   --tune_llm lora: PEFT's adapter_model.safetensors + adapter_config.json
               (PeftModel.from_pretrained loads it on the base LLM the metadata names)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

LLM_DIR = "llm"
ADAPTER_DIR = "adapter"
COURSE_LORA_TARGET = "q_proj,k_proj,v_proj,o_proj"


@dataclass
class Tuning:
    """What a run trains; stored in every checkpoint's metadata ("tuning")."""

    llm: str = "none"                      # none | full | lora
    projector: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = COURSE_LORA_TARGET  # comma-separated module names, or all-linear
    load_in_4bit: bool = False             # QLoRA: the frozen base in 4-bit NF4

    MODES = ("none", "full", "lora")

    def __post_init__(self):
        if self.llm not in self.MODES:
            raise ValueError(f"tune_llm must be one of {self.MODES}, got {self.llm!r}")
        if self.load_in_4bit and self.llm != "lora":
            raise ValueError("--load_in_4bit is QLoRA: it needs --tune_llm lora (a 4-bit base cannot be trained in "
                             "full, and a frozen one gains nothing)")
        if self.llm == "none" and not self.projector:
            raise ValueError("nothing to train: --tune_llm none with --no-tune_projector")

    def describe(self) -> str:
        llm = {"none": "LLM frozen", "full": "LLM in full",
               "lora": f"LoRA r={self.lora_r} alpha={self.lora_alpha} on {self.lora_target}"
                       + (" over a 4-bit base (QLoRA)" if self.load_in_4bit else "")}[self.llm]
        return ("projector + " if self.projector else "projector frozen, ") + llm


def check_device(tuning: Tuning, device: torch.device) -> None:
    """QLoRA's 4-bit kernels (bitsandbytes) run on CUDA only: refuse elsewhere, before any loading."""
    if not tuning.load_in_4bit:
        return
    if device.type != "cuda":
        raise SystemExit(f"--load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                         f"{device.type}. On this machine use --tune_llm lora without --load_in_4bit (the base "
                         "stays in full precision).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("--load_in_4bit needs bitsandbytes: pip install bitsandbytes")


def quantization_config():
    """QLoRA's base: NF4 weights, double quantisation, bf16 compute (the QLoRA paper's setting)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_config(tuning: Tuning):
    from peft import LoraConfig

    target: Any = "all-linear" if tuning.lora_target == "all-linear" else \
        [t.strip() for t in tuning.lora_target.split(",") if t.strip()]
    return LoraConfig(r=tuning.lora_r, lora_alpha=tuning.lora_alpha, lora_dropout=tuning.lora_dropout,
                      target_modules=target, bias="none", task_type="CAUSAL_LM")


def add_lora(llm: nn.Module, tuning: Tuning) -> nn.Module:
    """Wrap the LLM in fresh LoRA adapters (a PeftModelForCausalLM); the base stays frozen.
    Adapter weights are kept in fp32 even over a bf16 or 4-bit base (peft's autocast_adapter_dtype)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if tuning.load_in_4bit:
        # Norms to fp32 for stability; no gradient checkpointing here (a flag of its own).
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    try:
        with quiet_peft():
            return get_peft_model(llm, lora_config(tuning))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.split(".")[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise SystemExit(f"--lora_target {tuning.lora_target}: {e}. Linear layers of this LLM: {names}") from None


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers `is_gradient_checkpointing`, which transformers 5.2x calls deprecated:
    one FutureWarning per wrap that says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def expected_trainable(name: str, tuning: Tuning) -> bool:
    """Whether parameter `name` (of model.LlavaModel) trains under `tuning`."""
    if name.startswith("projector."):
        return tuning.projector
    if name.startswith("llm."):
        return tuning.llm == "full" or (tuning.llm == "lora" and ".lora_" in name)
    return False  # the vision tower: frozen in every stage


def set_trainable(model: nn.Module, tuning: Tuning) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(expected_trainable(name, tuning))


def assert_trainable(model: nn.Module, tuning: Tuning) -> dict[str, int]:
    """Exactly the parameters `tuning` names have requires_grad; returns the counts per part."""
    wrong = [(n, p.requires_grad) for n, p in model.named_parameters() if p.requires_grad != expected_trainable(n, tuning)]
    if wrong:
        raise RuntimeError(f"trainable set differs from what the flags ask ({tuning.describe()}): "
                           + ", ".join(f"{n} {'trains' if g else 'frozen'}" for n, g in wrong[:5]))
    counts = {"projector": 0, "llm": 0, "vision": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[name.split(".")[0]] += p.numel()
    if not sum(counts.values()):
        raise RuntimeError("no trainable parameters")
    return counts


def save_llm(llm: nn.Module, tokenizer, folder: str, tuning: Tuning,
             weights: dict[str, torch.Tensor] | None = None) -> None:
    """The tuned part of the LLM, in its library's own format (see the module docstring).
    `weights`: its trained parameters by name, whole (gathered from FSDP's shards); default: its own."""
    if weights is not None:
        # A weight tied to another (Qwen3's LM head is its input embedding) is saved once, under the
        # first name, as save_pretrained does with the model's own state dict.
        first: dict[int, str] = {}
        for name, p in llm.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        names = dict(llm.named_parameters(remove_duplicate=False))
        weights = {k: v for k, v in weights.items() if k not in names or first[id(names[k])] == k}
        if tuning.llm == "full":  # persistent buffers, if the LLM has any: never sharded, whole on every rank
            weights.update({k: v for k, v in llm.state_dict().items() if k not in names})
    if tuning.llm == "full":
        out = os.path.join(folder, LLM_DIR)
        llm.save_pretrained(out, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(out)
    elif tuning.llm == "lora":
        llm.save_pretrained(os.path.join(folder, ADAPTER_DIR), safe_serialization=True, state_dict=weights)


def load_adapter(llm: nn.Module, folder: str, trainable: bool = False) -> nn.Module:
    """PeftModel.from_pretrained(llm, folder/adapter), checked strictly: every tensor of the file
    is in the model with the same value, and the model has no adapter weight the file lacks."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(folder, ADAPTER_DIR)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"{folder}: a LoRA checkpoint without {ADAPTER_DIR}/adapter_config.json")
    with quiet_peft():
        model = PeftModel.from_pretrained(llm, path, is_trainable=trainable)
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    loaded = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    missing, unexpected = sorted(set(loaded) - set(saved)), sorted(set(saved) - set(loaded))
    differ = [k for k in set(saved) & set(loaded) if not torch.equal(saved[k].to(loaded[k].dtype), loaded[k])]
    if missing or unexpected or differ:
        raise RuntimeError(f"{path}: adapter does not match the model; missing={missing[:3]} "
                           f"unexpected={unexpected[:3]} not loaded={differ[:3]}")
    return model


def merged(llm: nn.Module) -> nn.Module:
    """A plain transformers LLM with the LoRA weights folded in (W + B A x alpha/r); the LLM
    itself when it has no adapters. For export: the result needs no peft to run."""
    if not is_peft(llm):
        return llm
    return llm.merge_and_unload()
