r"""LLaVA stage 3 (LoRA / QLoRA): adapt a stage-2 model to your own data with low-rank adapters
on the LLM (and the projector, unless --no-tune_projector); the base weights stay frozen. The
course's recipe: r 8, alpha 16, dropout 0.05 on q/k/v/o_proj, lr 2e-4, batch 8.

    python train_stage3_lora.py --demo    # offline toy world on CPU: adapts the stage-2 demo (built when missing)
    python train_stage3_lora.py --init checkpoints/<stage-2 run> --data_format chat \
        --chat_json my_style.json --image_root imgs
    python train_stage3_lora.py --init checkpoints/<stage-2 run> --data_root data/CogVLM-SFT-311K \
        --data_format cogvlm_sft --load_in_4bit     # QLoRA: a 4-bit base (CUDA, bitsandbytes)
    python train_stage3_lora.py --init ... --lora_target all-linear --lora_r 16 --lora_alpha 32

A checkpoint holds the projector and the adapter in PEFT's format (step_N/adapter/:
adapter_model.safetensors + adapter_config.json, loadable by PeftModel); its metadata names the
base LLM (the stage-2 checkpoint's llm/ folder). eval_llava.py chats with it directly;
scripts/export_hf.py merges the adapter into a plain LlavaForConditionalGeneration. Every flag
of train_stage1.py applies; only the defaults differ.
"""

import train_stage1
from train_stage1 import run_cli

# The course's stage 3. Flags you type win.
STAGE3_DEFAULTS = dict(stage=3, tune_llm="lora", data_format="cogvlm_sft", lr=2e-4, batch_size=8, max_text_len=512, warmup_ratio=0.03,
                       lr_scheduler="cosine", eval_ratio=0.02, eval_interval=500, save_interval=500, eval_samples=200)


def main(argv: list[str] | None = None) -> dict:
    """For tests and notebooks: this stage's run, in-process."""
    return train_stage1.main(argv, STAGE3_DEFAULTS, __doc__)


if __name__ == "__main__":
    run_cli(STAGE3_DEFAULTS, __doc__)
