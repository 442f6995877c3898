"""Real-size frozen models with random weights, built from the bundled configs/ and saved in
their on-disk formats, plus a small SA1B-format dataset: the whole training path at full size
with nothing downloaded (the GPU check trains on these; so can a laptop, slowly).

    python scripts/random_models.py --preset clip-zh-qwen3-0.6b --out /tmp/rand
    python train_stage1.py --vision_tower /tmp/rand/vision --llm /tmp/rand/llm \\
        --data_root /tmp/rand/data/train --eval_data_root /tmp/rand/data/eval --max_steps 100
    python scripts/random_models.py --preset clip-zh-qwen3-0.6b --out /tmp/rand_small --layers 2   # CPU-sized

The tokenizer is the toy world's Qwen-style one (same special tokens and chat template, a small
vocabulary inside the real embedding table); images are the toy world's shapes. Random weights
learn nothing meaningful: this checks speed, memory and that every part runs, not alignment.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from backbones import PRESETS, REGISTRY, VISION_TYPES, arch_config  # noqa: E402
from toy_world import SIZES, build_tokenizer, write_split  # noqa: E402
from utils.config import Parser  # noqa: E402


def shrink(cfg, layers: int | None):
    """Keep the widths and vocabulary, cut the depth (a CPU-sized copy of the same shapes)."""
    if layers:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
    return cfg


def write_vision(model_id: str, out: str, layers: int | None, dtype: torch.dtype) -> str:
    import transformers

    cfg = shrink(arch_config(model_id, models_dir="/nonexistent"), layers)   # always the bundled config
    cfg = getattr(cfg, "vision_config", cfg)
    model = getattr(transformers, VISION_TYPES[cfg.model_type][1])(cfg).to(dtype)
    model.save_pretrained(out)
    # The tower's preprocessing as its family ships it: a square resize (Chinese-CLIP as the course
    # uses it, SigLIP, DINOv3) or CLIP's shortest edge + centre crop.
    square = VISION_TYPES[cfg.model_type][0] != "clip"
    size = cfg.image_size
    with open(os.path.join(out, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "size": {"height": size, "width": size} if square else {"shortest_edge": size},
                   "do_center_crop": not square, **({} if square else {"crop_size": {"height": size, "width": size}}),
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
                  fh, indent=2)
    return out


def write_llm(model_id: str, out: str, layers: int | None, dtype: torch.dtype) -> str:
    from transformers import AutoModelForCausalLM

    cfg = shrink(arch_config(model_id, models_dir="/nonexistent"), layers)
    tok = build_tokenizer(out)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"{model_id}: the toy tokenizer ({len(tok)} tokens) does not fit a {cfg.vocab_size}-row table")
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="clip-zh-qwen3-0.6b", choices=list(PRESETS), help="which pair to build")
    p.add_argument("--out", required=True, help="folder for vision/, llm/ and data/")
    p.add_argument("--layers", type=int, default=0, help="keep only this many layers of each model (0 = all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored weights (the real "
                                                                                    "checkpoints are bf16)")
    p.add_argument("--n_train", type=int, default=512, help="training images")
    p.add_argument("--n_eval", type=int, default=64, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="weights and data")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    preset, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    paths = {"vision": write_vision(preset["vision_tower"], os.path.join(args.out, "vision"), args.layers or None, dtype),
             "llm": write_llm(preset["llm"], os.path.join(args.out, "llm"), args.layers or None, dtype),
             "train": os.path.join(args.out, "data", "train"), "eval": os.path.join(args.out, "data", "eval")}
    write_split(paths["train"], args.n_train, SIZES["test"], seed=args.seed + 100)
    write_split(paths["eval"], args.n_eval, SIZES["test"], seed=args.seed + 200)
    print(json.dumps({**paths, "preset": args.preset, "vision_id": preset["vision_tower"], "llm_id": preset["llm"],
                      "layers": args.layers or "all", "note": REGISTRY[preset["llm"]].note}, indent=2))
    return paths


if __name__ == "__main__":
    main()
