"""Chinese-CLIP image-text matching over a folder: type a sentence, get the best images.

A sanity check of the vision tower the course aligns (clip-vit-b16-zh): load the *whole*
Chinese CLIP (vision and text tower), embed every image of a folder once, then for each
text line print the top-5 images by cosine similarity and save a bar chart of the scores.
Both downloads of clip-vit-b16-zh work: Hugging Face's OFA-Sys/chinese-clip-vit-base-patch16
(transformers layout) and ModelScope's iic/multi-modal_clip-vit-base-patch16_zh (ModelScope's
own layout: configuration.json + pytorch_model.bin with the original `visual.*` / `bert.*`
keys), converted here to transformers' ChineseCLIPModel.

    python scripts/download_models.py clip-vit-b16-zh
    python scripts/save_examples.py --data_root data/toy/train        # or any folder of images
    python scripts/clip_eval.py --images data_example                 # then type: 一只猫
    python scripts/clip_eval.py --query 红色的圆形 --query 蓝色的三角形   # non-interactive
"""

from __future__ import annotations

import glob
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbones import (CLIP_MEAN, CLIP_STD, MODELSCOPE_CLIP, detect_vision_type, from_pretrained_strict,  # noqa: E402
                       resolve_model)
from dataset import IMAGE_EXTENSIONS, ImageTransform, decode_image  # noqa: E402
from modelscope_clip import load_modelscope_chinese_clip, modelscope_state_dict, read_json  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.dist import pick_device  # noqa: E402
from utils.skips import SampleError  # noqa: E402

CONTEXT_LENGTH = 52  # Chinese-CLIP's text length (cn_clip's default context_length)


@dataclass
class ChineseClip:
    model: torch.nn.Module       # transformers ChineseCLIPModel, eval mode
    tokenizer: object            # BERT WordPiece over the download's vocab.txt
    transform: ImageTransform    # 224 bicubic, no crop, CLIP mean/std (both layouts)


# --------------------------------------------------------------------------- loading

def _modelscope_text_config(path: str, sd: dict[str, torch.Tensor]) -> dict:
    """ChineseCLIPTextConfig kwargs: read off the tensor shapes; heads from text_model_config.json
    when it is there (shapes cannot tell them), else hidden/64 as in every released size."""
    hidden = sd["embeddings.word_embeddings.weight"].shape[1]
    cfg_path = os.path.join(path, "text_model_config.json")
    ms = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    return dict(vocab_size=sd["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
                num_hidden_layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")),
                num_attention_heads=ms.get("text_num_attention_heads", max(1, hidden // 64)),
                intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
                type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0],
                hidden_act=ms.get("text_hidden_act", "gelu"), layer_norm_eps=1e-12)


def load_modelscope_full(path: str) -> torch.nn.Module:
    """ModelScope's Chinese-CLIP checkpoint -> ChineseCLIPModel (both towers + projections).

    The vision tower goes through modelscope_clip.load_modelscope_chinese_clip (the same mapping that
    training uses); `bert.*` maps 1:1 onto ChineseCLIPTextModel (transformers' converter does the
    same), `visual.proj` / `text_projection` are [in, out] matrices, so Linear weights are their
    transposes. Missing weights raise; the only weights left out are BERT's pooler, which
    Chinese-CLIP never uses (it projects the [CLS] hidden state).
    """
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    sd = modelscope_state_dict(path)                     # read once, for both towers
    vision = load_modelscope_chinese_clip(path, state=sd)
    bert = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    for key in ("visual.proj", "text_projection", "logit_scale"):
        if key not in sd:
            raise ValueError(f"{path}/pytorch_model.bin: no {key}; not a whole Chinese-CLIP checkpoint")
    if "embeddings.word_embeddings.weight" not in bert:
        raise ValueError(f"{path}/pytorch_model.bin: no bert.* text tower")
    embed_dim = sd["visual.proj"].shape[1]
    if sd["text_projection"].shape[1] != embed_dim:
        raise ValueError(f"{path}: image embedding {embed_dim} != text embedding {sd['text_projection'].shape[1]}")
    cfg = ChineseCLIPConfig(text_config=_modelscope_text_config(path, bert), vision_config=vision.config.to_dict(),
                            projection_dim=embed_dim)
    model = ChineseCLIPModel(cfg)
    model.vision_model.load_state_dict(vision.state_dict(), strict=True)  # same module tree
    ignored = {k for k in bert if k.startswith("pooler.")}
    missing, unexpected = model.text_model.load_state_dict({k: v for k, v in bert.items() if k not in ignored},
                                                           strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: bert.* -> ChineseCLIPTextModel mapping incomplete; "
                           f"missing={missing[:5]} unexpected={unexpected[:5]}")
    with torch.no_grad():
        model.visual_projection.weight.copy_(sd["visual.proj"].T)          # [D_v, E] -> Linear [E, D_v]
        model.text_projection.weight.copy_(sd["text_projection"].T)        # [D_t, E] -> Linear [E, D_t]
        model.logit_scale.copy_(sd["logit_scale"].reshape(()))
    return model


def load_chinese_clip(path: str, device: str | torch.device = "cpu") -> ChineseClip:
    """A local Chinese-CLIP folder in either layout -> model, tokenizer, image transform."""
    from transformers import AutoTokenizer, BertTokenizer, ChineseCLIPModel

    if detect_vision_type(path) == MODELSCOPE_CLIP:
        model = load_modelscope_full(path)
        vocab = os.path.join(path, "vocab.txt")
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{path}: no vocab.txt (the BERT vocabulary of the text tower)")
        # Chinese-CLIP's FullTokenizer = BERT's basic (lower-case, split CJK chars) + WordPiece.
        tokenizer = BertTokenizer(vocab_file=vocab, do_lower_case=True, tokenize_chinese_chars=True)
    else:
        if read_json(os.path.join(path, "config.json")).get("model_type") != "chinese_clip":
            raise ValueError(f"{path}: not a whole Chinese-CLIP (model_type chinese_clip); the text tower is needed")
        model = from_pretrained_strict(ChineseCLIPModel, path, "Chinese-CLIP")
        tokenizer = AutoTokenizer.from_pretrained(path)
    # Chinese-CLIP's own preprocessing, for both layouts so they embed identically: straight
    # resize to the tower's size (224), bicubic, no crop, CLIP mean/std (cn_clip's image_transform).
    transform = ImageTransform(size=model.config.vision_config.image_size, mode="square", resample="bicubic",
                               mean=CLIP_MEAN, std=CLIP_STD)
    model.requires_grad_(False)
    return ChineseClip(model.eval().to(device), tokenizer, transform)


# --------------------------------------------------------------------------- embeddings

def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features.
    return out if torch.is_tensor(out) else out.pooler_output


def list_images(folder: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}/")
    return files


@torch.no_grad()
def embed_images(clip: ChineseClip, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[str], Counter]:
    """L2-normalised image embeddings [N, E] for the readable images, their paths, skip counts."""
    device = next(clip.model.parameters()).device
    chunks, kept, skipped = [], [], Counter()
    for start in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[start:start + batch_size]:
            try:
                pixels.append(clip.transform(decode_image(p, draft=clip.transform.size)))
                kept.append(p)
            except SampleError as e:
                skipped[e.reason] += 1
        if pixels:
            x = torch.from_numpy(np.stack(pixels)).to(device)                    # [B, 3, H, W]
            chunks.append(torch.nn.functional.normalize(_features(clip.model.get_image_features(pixel_values=x)), dim=-1))
    if not chunks:
        raise RuntimeError(f"none of the {len(paths)} images could be read: {dict(skipped)}")
    return torch.cat(chunks).float().cpu().numpy(), kept, skipped                # [N, E]


@torch.no_grad()
def embed_texts(clip: ChineseClip, texts: list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """L2-normalised text embeddings [M, E] (the [CLS] state through text_projection)."""
    device = next(clip.model.parameters()).device
    enc = clip.tokenizer(texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    feats = _features(clip.model.get_text_features(**enc))
    return torch.nn.functional.normalize(feats, dim=-1).float().cpu().numpy()


def top_k(image_emb: np.ndarray, text_emb: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """(image index, cosine) of the k best images for one normalised text embedding [E]."""
    scores = image_emb @ text_emb                                                # [N]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


# --------------------------------------------------------------------------- output

def caption_of(image_path: str) -> str:
    """The sidecar caption that save_examples.py writes (00000.jpg -> 00000.txt), one line."""
    txt = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(txt):
        return ""
    with open(txt, encoding="utf-8", errors="replace") as fh:
        return " ".join(fh.read().split())


_FONT_READY = False
CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS"]


def _setup_matplotlib():
    """Agg backend (no display needed) and the first installed CJK font, if any."""
    global _FONT_READY
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    if not _FONT_READY:
        installed = {f.name for f in font_manager.fontManager.ttflist}
        found = [f for f in CJK_FONTS if f in installed]
        if found:
            plt.rcParams["font.sans-serif"] = found[:1] + list(plt.rcParams["font.sans-serif"])
        else:
            print("! no CJK font found (e.g. apt-get install fonts-noto-cjk): Chinese in charts shows as boxes",
                  flush=True)
        plt.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212; negative cosines happen
        _FONT_READY = True
    return plt


def save_chart(query: str, hits: list[tuple[str, float]], path: str) -> str:
    """Horizontal bars, best on top: one per image, labelled with its file name (and caption)."""
    plt = _setup_matplotlib()
    labels = [name if len(name) <= 40 else name[:39] + "…" for name, _ in hits]
    scores = [s for _, s in hits]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Glyph ... missing from font": reported once above
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(hits) + 1.4))
        bars = ax.barh(range(len(hits)), scores, color="#4C72B0")
        ax.set_yticks(range(len(hits)), labels)
        ax.invert_yaxis()
        for bar, s in zip(bars, scores):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {s:.3f}", va="center", fontsize=9)
        ax.set_xlabel("cosine similarity")
        ax.set_title(query if len(query) <= 60 else query[:59] + "…")
        ax.set_xlim(min(0.0, min(scores) * 1.1), max(scores) * 1.15 + 1e-6)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def answer(clip: ChineseClip, image_emb: np.ndarray, paths: list[str], query: str, out_dir: str, n: int,
           k: int = 5) -> dict:
    """One query: print the top-k, save the chart; returns what was shown."""
    hits = top_k(image_emb, embed_texts(clip, [query])[0], k)
    rows = []
    print(f"top-{len(hits)} for {query!r}:")
    for rank, (i, score) in enumerate(hits, 1):
        name, cap = os.path.basename(paths[i]), caption_of(paths[i])
        print(f"  {rank}. {score:+.4f}  {name}" + (f"  {cap[:80]}" if cap else ""))
        rows.append((name, score))
    slug = re.sub(r"[^\w]+", "_", query).strip("_")[:30] or "query"
    chart = save_chart(query, [(f"{nm} {caption_of(paths[i])[:20]}".strip(), s) for (nm, s), (i, _) in zip(rows, hits)],
                       os.path.join(out_dir, f"{n:03d}_{slug}.png"))
    print(f"  chart: {chart}", flush=True)
    return {"query": query, "top": [(paths[i], s) for i, s in hits], "chart": chart}


def main(argv: list[str] | None = None) -> list[dict]:
    p = Parser(description=__doc__)
    p.add_argument("--model", default="clip-vit-b16-zh", help="registry id (in --models_dir) or a local folder, "
                   "HF or ModelScope layout")
    p.add_argument("--models_dir", default="models", help="where registry ids live: <models_dir>/<id>")
    p.add_argument("--images", default="data_example", help="folder of images (and optional NNNNN.txt captions)")
    p.add_argument("--out_dir", default="runs/clip_eval", help="where the bar charts go")
    p.add_argument("--top_k", type=int, default=5, help="images shown per query")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--query", action="append", default=[], help="run these queries and exit (repeatable); "
                   "without it, read queries from stdin until an empty line or EOF")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda ...")
    args = p.parse_args(argv)

    try:
        path = resolve_model(args.model, args.models_dir)
    except FileNotFoundError as e:  # MissingModel included: its message holds the download command
        raise SystemExit(str(e)) from None
    device = str(pick_device(args.device))
    clip = load_chinese_clip(path, device)
    paths = list_images(args.images)
    image_emb, paths, skipped = embed_images(clip, paths, args.batch_size)
    print(f"{len(paths)} images embedded from {args.images}/ with {path}"
          + (f"; skipped {dict(skipped)}" if skipped else ""), flush=True)
    results = []
    queries = iter(args.query) if args.query else None
    while True:
        if queries is not None:
            query = next(queries, "")
        else:
            try:
                query = input("\ntext> ").strip()
            except EOFError:
                query = ""
        if not query:
            break
        results.append(answer(clip, image_emb, paths, query, args.out_dir, len(results), args.top_k))
    return results


if __name__ == "__main__":
    main()
