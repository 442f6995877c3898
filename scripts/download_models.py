"""Download registry models (or a preset's pair) into the models folder.

ModelScope is the default source (the course's users are in China); `--source hf` uses the
Hugging Face hub. Gated models (DINOv3) need an HF token: a `.hf_token` file in the repo root,
or `--hf_token NAME` where NAME is an environment variable holding it (the align plan's
convention). The token is never printed, logged or saved.

    python scripts/download_models.py --preset clip-zh-qwen3-0.6b
    python scripts/download_models.py qwen3-0.6b clip-vit-b16-zh --models_dir models
    HF_TOKEN=hf_xxx python scripts/download_models.py dinov3-vitb16 --source hf --hf_token HF_TOKEN
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backbones import PRESETS, REGISTRY, download  # noqa: E402
from utils.config import Parser  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("ids", nargs="*", help=f"registry ids: {', '.join(REGISTRY)}")
    p.add_argument("--preset", choices=list(PRESETS), help="download both models of a --model preset")
    p.add_argument("--models_dir", default="models", help="destination folder; each id goes to <models_dir>/<id>")
    p.add_argument("--source", default="modelscope", choices=["modelscope", "hf"], help="where to download from")
    p.add_argument("--hf_token", default=".hf_token", help="token file, or the NAME of an env var holding the token")
    args = p.parse_args(argv)
    ids = list(args.ids)
    if args.preset:
        ids += [PRESETS[args.preset]["vision_tower"], PRESETS[args.preset]["llm"]]
    if not ids:
        p.error("name ids or --preset")
    paths = {i: download(i, args.models_dir, args.source, args.hf_token) for i in dict.fromkeys(ids)}
    print("\nlocal paths:")
    for i, path in paths.items():
        print(f"  {i:<20} {path}")
    print(f"\ntrain with ids (resolved under {args.models_dir}/) or with these folders, e.g.\n  python train_stage1.py "
          + (f"--model {args.preset}" if args.preset else " ".join(
              f"--{'vision_tower' if REGISTRY[i].kind == 'vision' else 'llm'} {paths[i]}" for i in paths))
          + ("" if args.models_dir == "models" else f" --models_dir {args.models_dir}"))


if __name__ == "__main__":
    main()
