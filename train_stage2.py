r"""LLaVA stage 2 (instruction tuning): the LLM and the projector learn to follow instructions
about images, starting from a stage-1 checkpoint; the vision tower stays frozen. The course's
recipe: CogVLM-SFT-311K's Chinese single- and multi-turn dialogues, batch 4, lr 2e-5, cosine
with 3% warmup, gradient checkpointing, 512 text tokens, a seeded 2% held-out split.

    python train_stage2.py --demo       # offline toy world on CPU: continues the stage-1 demo (built when missing)
    python train_stage2.py --stage1 checkpoints/<stage-1 run> --data_root data/CogVLM-SFT-311K
    python train_stage2.py --stage1 checkpoints/<run> --data_format chat --chat_json data/llava_v1_5_mix665k.json \
        --image_root data/llava_images        # LLaVA's instruction format; text-only records mix in
    python train_stage2.py --vision_tower clip-vit-b16-zh --llm qwen3-0.6b --data_root ...   # one stage from scratch
    torchrun --standalone --nproc-per-node 8 train_stage2.py --stage1 checkpoints/<run> --data_root ...

Each answer of a dialogue is trained on exactly what eval_llava.py feeds before it in a live
chat (Qwen3's template: one sample per turn, see dataset.LlavaDataset). A checkpoint holds the
projector and the LLM in transformers' format (step_N/llm/); eval_llava.py, export and stage 3
take it like any other. Every flag of train_stage1.py applies; only the defaults differ.
"""

import train_stage1
from train_stage1 import run_cli

# The course's stage 2. Flags you type win.
STAGE2_DEFAULTS = dict(stage=2, tune_llm="full", data_format="cogvlm_sft", lr=2e-5, batch_size=4,
                       max_text_len=512, warmup_ratio=0.03, lr_scheduler="cosine", gradient_checkpointing=True,
                       eval_ratio=0.02, eval_interval=500, save_interval=500, eval_samples=200)


def main(argv: list[str] | None = None) -> dict:
    """For tests and notebooks: this stage's run, in-process."""
    return train_stage1.main(argv, STAGE2_DEFAULTS, __doc__)


if __name__ == "__main__":
    run_cli(STAGE2_DEFAULTS, __doc__)
