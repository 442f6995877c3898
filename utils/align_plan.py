"""The Prismatic "align plan" command line, mapped onto train_stage1.py's flags.

    torchrun --standalone --nnodes 1 --nproc-per-node 8 train_stage1.py --stage align \
        --model.type dinov3-qwen3vltext-align --model.align_max_steps 20 --dataset.type llava-v15 \
        --dataset.dataset_root_dir DIR --run_root_dir DIR --trackers '["jsonl"]'

Global vs per-device batch becomes gradient accumulation; `llava-v15` is
DIR/download/llava-laion-cc-sbu-558k/chat.json with images relative to that folder; the
strategies (fsdp-shard-grad-op, fsdp-full-shard) are PyTorch's FSDP2 (parallel.py). What cannot
be honoured is refused by name rather than ignored.
"""

from __future__ import annotations

import json
import os

from utils.trackers import TRACKERS

ALIGN_FLAGS = {"--model.type": "--model", "--model.align_epochs": "--epochs",
               "--model.align_max_steps": "--max_steps", "--model.align_global_batch_size": "--global_batch_size",
               "--model.align_per_device_batch_size": "--batch_size", "--model.align_learning_rate": "--lr",
               "--model.align_weight_decay": "--weight_decay", "--model.align_max_grad_norm": "--max_grad_norm",
               "--model.align_lr_scheduler_type": "--lr_scheduler", "--model.align_warmup_ratio": "--warmup_ratio",
               "--model.align_train_strategy": "--train_strategy", "--run_id": "--run_name", "--hf_token": "--hf_token"}
SCHEDULERS = {"linear-warmup+cosine-decay": "cosine", "cosine": "cosine", "constant": "constant"}
LLAVA_V15_CHAT = os.path.join("download", "llava-laion-cc-sbu-558k")


def translate_align_flags(argv: list[str]) -> list[str]:
    """Rewrite the align plan's dotted flags into ours; refuse what this script cannot do."""
    pairs, out, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        elif arg.startswith("--") and ("." in arg or arg in ("--stage", "--run_root_dir", "--run_id", "--trackers")) and i + 1 < len(argv):
            key, value = arg, argv[i + 1]
            i += 2
        else:
            out.append(arg)
            i += 1
            continue
        pairs.append((key, value))
    dataset_type = dataset_root = None
    for key, value in pairs:
        if key == "--stage":
            if value != "align":
                raise SystemExit(f"--stage {value}: this script trains stage 1 only (the projector, '--stage align'); "
                                 "finetuning the LLM is a later stage and not supported here")
        elif key == "--dataset.type":
            dataset_type = value
        elif key == "--dataset.dataset_root_dir":
            dataset_root = value
        elif key == "--run_root_dir":
            out += ["--runs_dir", value, "--checkpoints_dir", value]
        elif key == "--trackers":
            names = json.loads(value) if value.strip().startswith("[") else value.split(",")
            unknown = set(names) - set(TRACKERS)
            if unknown:
                raise SystemExit(f"--trackers: {sorted(unknown)} not supported ({', '.join(TRACKERS)})")
            out += ["--trackers", ",".join(names)]
        elif key == "--model.align_lr_scheduler_type":
            if value not in SCHEDULERS:
                raise SystemExit(f"--model.align_lr_scheduler_type {value}: supported {sorted(SCHEDULERS)}")
            out += ["--lr_scheduler", SCHEDULERS[value]]
        elif key == "--model.align_max_steps":
            out += ["--max_steps", "0" if value in ("None", "null", "") else value]
        elif key in ALIGN_FLAGS:
            out += [ALIGN_FLAGS[key], value]
        elif key.startswith("--") and "." not in key:
            out += [key, value]
        else:
            raise SystemExit(f"{key}: not an align-stage flag this script understands ({', '.join(ALIGN_FLAGS)}, "
                             "--stage, --dataset.type, --dataset.dataset_root_dir, --run_root_dir, --trackers)")
    if dataset_type is not None:
        if dataset_type != "llava-v15":
            raise SystemExit(f"--dataset.type {dataset_type}: only llava-v15 (a LLaVA chat.json) is an align dataset")
        root = os.path.join(dataset_root or ".", LLAVA_V15_CHAT)
        out += ["--data_format", "chat", "--chat_json", os.path.join(root, "chat.json"), "--image_root", root]
    return out
