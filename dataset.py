"""Data: image decoding and preprocessing, the dataset, the sampler and the collates. The
on-disk formats are readers.py's; how a sample becomes token ids and labels is prompts.py's.

Every sample is in LLaVA form: one image (or none: a text-only record) and `conversations` of
human/gpt turns with an `<image>` placeholder in a human turn when there is an image. A sample that cannot be used is skipped and counted by
reason (`skipped` in each batch), never silently dropped and never fatal.

CPU check (reads the demo's data after `python train_stage1.py --demo` has built it):
    python dataset.py --data_format sa1b --data_root data/toy/train --llm models/toy/llm --vision_tower models/toy/vision
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps

from backbones import (CLIP_MEAN, CLIP_STD, arch_config, image_tokens, knows_vision_markers, load_tokenizer,
                       preprocessing, resolve_model, vision_defaults)
from prompts import (CHAT_TEMPLATE_KWARGS, IGNORE_INDEX, IMAGE_TOKEN, INSTRUCTION_POOLS, PromptFormat,
                     caption_messages, encode_conversation, ensure_image_token, history_matches_live_chat)
from readers import DATA_FORMATS, Record, read_records
from utils import console
from utils.config import Parser
from utils.feature_cache import image_key
from utils.fetch import fetch
from utils.seeds import epoch_seed, sample_seed
from utils.skips import SampleError, SkipTally

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what counts as an image in a folder

# Pillow refuses images above this many pixels (decompression bombs); a 100-MP photo is fine.
MAX_IMAGE_PIXELS = 100_000_000
ORIGINAL_SIZE = "original_size"   # decode_image's note in Image.info: the size before draft decoding
ENCODED = "encoded"               # and the file it was decoded from: (bytes or path, format, decoded size)


# --------------------------------------------------------------------------- images

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, 0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC}


@dataclass
class ImageTransform:
    """The tower's preprocessing, with PIL and numpy (no torchvision); its settings come from
    backbones.preprocessing (the tower's processor config) and travel in every checkpoint.

    mode "shortest_edge": resize the short side to `size` keeping aspect, then centre-crop
    `size`x`size` (CLIP's processor). mode "square": resize straight to `size`x`size`, no crop
    (SigLIP, DINOv3, and the course's Chinese CLIP).
    """

    size: int = 224
    mode: str = "shortest_edge"
    resample: str = "bicubic"
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB") if img.mode != "RGB" else img
        w, h = img.size
        if self.mode == "square":
            img = img.resize((self.size, self.size), _RESAMPLE[self.resample])
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)
            new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), _RESAMPLE[self.resample])
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        # (x / 255 - mean) / std as one multiply-add per pixel, written channel-first.
        scale = (1.0 / (255.0 * np.asarray(self.std, np.float32)))[:, None, None]
        shift = (-np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32))[:, None, None]
        out = np.empty((3, img.size[1], img.size[0]), np.float32)              # [3, H, W]
        np.multiply(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), scale, out=out, dtype=np.float32)
        out += shift
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageTransform":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> upright RGB: EXIF rotation applied, transparency composited on white,
    16-bit scaled (not clipped), CMYK/palette/grayscale converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(data: bytes | str, draft: int | None = None) -> Image.Image:
    """Bytes or a file path -> RGB image, or SampleError (corrupt, not an image, too large).

    draft: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides
    >= draft pixels (libjpeg's DCT scaling), several times faster for a 224-pixel tower. The
    size the file had is kept for messages: original_size(image).
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            stored = img.size           # draft() below shrinks .size to the decoded scale
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            rgb = to_rgb(img)
            # What a user calls the image's size: the file's, upright (EXIF may have turned it).
            rgb.info[ORIGINAL_SIZE] = stored if rgb.size == img.size else stored[::-1]
            rgb.info[ENCODED] = (data, img.format, rgb.size)
            return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", str(e)) from None
    except FileNotFoundError:
        raise SampleError("missing_image", str(data)) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated/non-images
        raise SampleError("corrupt_image", f"{data if isinstance(data, str) else 'bytes'}: {e}") from None


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as stored, upright: a draft-decoded JPEG is smaller."""
    return img.info.get(ORIGINAL_SIZE, img.size)


def encoded_file(img: Image.Image) -> tuple[bytes, str] | None:
    """(the bytes, the format) decode_image read this image from, or None (not decoded by it, or
    resized since). An API client sends these as they are: re-encoding a JPEG changes its pixels,
    and another model's replies with them (our own server's, on a benchmark)."""
    data, fmt, size = img.info.get(ENCODED, (None, None, None))
    if data is None or size != img.size:
        return None
    if isinstance(data, str):
        try:
            with open(data, "rb") as fh:
                data = fh.read()
        except OSError:           # moved or deleted since (an upload's temporary file)
            return None
    return data, fmt


@dataclass
class ImageLoader:
    """Loads an image from a local path (relative to `root`), a file:// URL or an http(s) URL.

    URLs get a timeout, a byte cap and retries with backoff; an optional `cache_dir` keeps
    downloaded bytes so that later epochs never hit the network.
    """

    root: str = ""
    timeout: float = 10.0
    retries: int = 3
    max_bytes: int = 50 * 2**20
    cache_dir: str | None = None
    draft: int | None = None        # JPEG draft-mode target (the tower's input size)
    backoff: float = 0.5            # seconds before the 2nd try, doubling after

    def __call__(self, src: str) -> Image.Image:
        if src.startswith(("http://", "https://")):
            return decode_image(self.fetch(src), self.draft)
        if "://" in src and not src.startswith("file://"):
            raise SampleError("bad_url_scheme", src.split("://")[0])
        if src.startswith("file://"):
            src = src[len("file://"):]
        path = src if os.path.isabs(src) else os.path.join(self.root, src)
        if not os.path.isfile(path):
            raise SampleError("missing_image", path)
        return decode_image(path, self.draft)

    def fetch(self, url: str) -> bytes:
        return fetch(url, self.timeout, self.retries, self.max_bytes, self.backoff, self.cache_dir)


# --------------------------------------------------------------------------- dataset and collate

class LlavaDataset(torch.utils.data.Dataset):
    """Records -> {input_ids, labels, pixel_values} (no pixels for a text-only record) or
    {"skip": reason}. Serves every stage: captions, VQA, instruction dialogues.

    Instruction choice for caption records depends only on (seed, epoch, index), so a
    resumed run sees the same prompts as an uninterrupted one.

    Multi-turn dialogues: every answer is trained on exactly the tokens a live chat in
    eval_llava.py feeds before it. When the template renders history as a chat generated it
    (prompts.history_matches_live_chat), one sample supervises all answers; otherwise (Qwen3,
    whose generated turn follows an empty think block that history drops) a k-answer dialogue
    becomes k samples, sample t supervising answer t after the first t-1 turns as history.
    `per_turn` forces either way (None: decided by that probe).
    """

    def __init__(self, records: list[Record], tokenizer, fmt: PromptFormat, transform: ImageTransform,
                 loader: ImageLoader, max_text_len: int = 128, instructions: str = "course", seed: int = 0,
                 features=None, per_turn: bool | None = None):
        self.records, self.tokenizer, self.fmt = records, tokenizer, fmt
        self.transform, self.loader = transform, loader
        self.features = features  # a utils.feature_cache.FeatureCache: no decoding, no ViT
        self._prompts: dict = {}  # encode_conversation's prompt memo (one per worker process)
        self.max_text_len, self.instructions, self.seed = max_text_len, INSTRUCTION_POOLS[instructions], seed
        self.epoch = 0
        self._unexpected = 0
        if per_turn is None:
            multi = any(r.conversations is not None and len(r.conversations) > 2 for r in records)
            per_turn = multi and not history_matches_live_chat(tokenizer, fmt.chat_template_kwargs)
        self.per_turn = per_turn
        # (record, answers kept): one item per record, or one per answer of each dialogue.
        self.items: list[tuple[int, int]] = []
        for i, r in enumerate(records):
            answers = len(r.conversations) // 2 if r.conversations is not None else 1
            self.items += [(i, t) for t in range(1, answers + 1)] if per_turn else [(i, answers)]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def record(self, idx: int) -> Record:
        return self.records[self.items[idx][0]]

    def text_lengths(self) -> list[int]:
        """Characters of text per item: a cheap stand-in for token counts when grouping."""
        return [len(self.records[i].caption) if self.records[i].caption is not None
                else sum(len(m["content"]) for m in self.records[i].conversations[:2 * t]) for i, t in self.items]

    def messages(self, idx: int) -> list[dict]:
        i, answers = self.items[idx]
        rec = self.records[i]
        if rec.conversations is not None:
            return rec.conversations[:2 * answers]
        rng = random.Random(sample_seed(self.seed, self.epoch, i))
        return caption_messages(rec.caption or "", rng.choice(self.instructions))

    def __getitem__(self, idx: int) -> dict:
        rec = self.record(idx)
        try:
            messages = self.messages(idx)
            ids, labels = encode_conversation(self.tokenizer, self.fmt, messages, self.max_text_len, self._prompts,
                                              images=int(bool(rec.image)), supervise_history=not self.per_turn)
            if not rec.image:
                image = {}
            elif self.features is not None:
                image = {"image_features": self.features[image_key(rec.image, self.loader.root)]}
            else:
                image = {"pixel_values": self.transform(self.loader(rec.image))}
        except SampleError as e:
            return {"skip": e.reason, "detail": e.detail or rec.image, "index": idx}
        except KeyError as e:  # MissingFeatures: the image failed when caching, or is not in the cache
            return {"skip": getattr(e, "reason", "not_in_feature_cache"), "detail": rec.image, "index": idx}
        except Exception as e:  # noqa: BLE001 - bad data must never end a run; say what it was
            if self._unexpected < 3:
                print(f"! sample {idx} ({rec.image}): unexpected {type(e).__name__}: {e}", flush=True)
            self._unexpected += 1
            return {"skip": f"unexpected_{type(e).__name__}", "detail": f"{rec.image}: {e}", "index": idx}
        # Cut short: an answer lost its tail, or a dialogue its trailing turns (fewer closed answers).
        closed = sum(1 for t in labels if t == self.fmt.end_of_turn_id)
        wanted = 1 if self.per_turn or rec.conversations is None else len(messages) // 2
        truncated = labels[-1] != self.fmt.end_of_turn_id or closed < wanted
        return {"input_ids": ids, "labels": labels, **image, "index": idx, "truncated": truncated}


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices for one epoch and one rank, from the epoch's global sample `start`.

    The order depends only on (seed, epoch). Rank r takes every world_size-th index of that
    permutation, so a micro-step of all ranks together reads the next batch_size x world_size
    samples of it, whatever the split: after k micro-steps exactly the first k x batch_size x
    world_size samples are consumed. `start` counts samples over all ranks, which is why a
    resume continues exactly, and a resume on another process count (at the same global batch)
    reads the same samples in the same steps. Only whole micro-steps are read: the epoch's tail
    of fewer than batch_size x world_size samples waits for the next epoch's shuffle.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True, lengths: list[int] | None = None, batch_size: int = 1):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, epoch, rank, world_size
        self.start, self.shuffle = start, shuffle
        self.lengths, self.batch_size = lengths, batch_size
        self.usable = n - n % (batch_size * world_size)

    def indices(self) -> list[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.shuffle:
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        if self.lengths is not None:
            order = self._grouped(order, gen)
        return order[self.start:self.usable][self.rank::self.world]

    def _grouped(self, order: list[int], gen: torch.Generator) -> list[int]:
        """Length grouping (as LLaVA's --group_by_modality_length does): within megabatches of 50
        global batches, sort by length so each global batch holds similar lengths (little
        padding), then shuffle the batches. Depends only on (seed, epoch, batch x processes)."""
        step = self.batch_size * self.world
        out: list[int] = []
        for m in range(0, len(order), step * 50):
            mega = sorted(order[m:m + step * 50], key=lambda i: -self.lengths[i])
            groups = [mega[g:g + step] for g in range(0, len(mega), step)]
            out += [i for k in torch.randperm(len(groups), generator=gen).tolist() for i in groups[k]]
        return out

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(range(self.rank, max(self.usable - self.start, 0), self.world))


class Batch(TypedDict, total=False):
    """What collate and collate_packed return, and the training loop reads. A batch whose
    samples were all skipped carries only the counts (size 0)."""

    input_ids: torch.Tensor        # [B, T] right-padded; packed: [1, sum T]
    labels: torch.Tensor           # like input_ids; IGNORE_INDEX wherever the loss is not taken
    attention_mask: torch.Tensor   # [B, T] 1 = token; packed: all ones (the model ignores it)
    position_ids: torch.Tensor     # packed only: [1, sum T], restarting at 0 for each sample
    pixel_values: torch.Tensor     # [B_img, 3, H, W] (B_img <= B: text-only samples have none), or instead
    image_features: torch.Tensor   # [B_img, N, D_v] from the feature cache
    size: int                      # usable samples (B)
    index: list[int]               # their record indices
    skipped: Counter               # skip reason -> count, for this batch
    skip_examples: dict            # skip reason -> one example (a path, a URL)
    truncated: int                 # answers cut by --max_text_len


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def _images_and_counts(batch: list[dict]) -> tuple[list[dict], Batch]:
    """The usable samples, and what every batch carries: skip reasons, sizes, stacked images."""
    good = [b for b in batch if "skip" not in b]
    out: dict[str, Any] = {"skipped": Counter(b["skip"] for b in batch if "skip" in b), "size": len(good),
                           "truncated": sum(b.get("truncated", False) for b in good),
                           # one example per reason (a path, a URL): what a report names
                           "skip_examples": {b["skip"]: b.get("detail", "") for b in reversed(batch) if "skip" in b}}
    if good:
        out["index"] = [b["index"] for b in good]
        # [B_img, 3, H, W] images or [B_img, N, D_v] cached features, in sample order; text-only
        # samples have none (the model fills image slots row by row, so the order matches).
        for key in ("pixel_values", "image_features"):
            with_image = [b[key] for b in good if key in b]
            if with_image:
                out[key] = torch.from_numpy(np.stack(with_image))
    return good, out


def collate(batch: list[dict], pad_id: int) -> Batch:
    """Right-padded training batch; skipped samples leave only their reason behind."""
    good, out = _images_and_counts(batch)
    if not good:
        return out
    out["input_ids"] = pad([b["input_ids"] for b in good], pad_id)              # [B, T]
    out["labels"] = pad([b["labels"] for b in good], IGNORE_INDEX)               # [B, T]
    out["attention_mask"] = pad([[1] * len(b["input_ids"]) for b in good], 0)
    return out


def collate_packed(batch: list[dict], pad_id: int) -> Batch:
    """Padding-free batch: all samples in one row [1, sum T] with position_ids restarting at 0
    per sample. No pad token is computed; with flash-attention 2 the kernel runs variable
    lengths, with SDPA/eager transformers builds a block-diagonal causal mask."""
    good, out = _images_and_counts(batch)
    if not good:
        return out
    out["input_ids"] = torch.tensor([sum((b["input_ids"] for b in good), [])])               # [1, sum T]
    # A sample's first label is a prompt token (never supervised), so no loss crosses samples.
    out["labels"] = torch.tensor([sum((b["labels"] for b in good), [])])
    out["position_ids"] = torch.tensor([sum((list(range(len(b["input_ids"]))) for b in good), [])])
    out["attention_mask"] = torch.ones_like(out["input_ids"])  # counts tokens; the model ignores it when packed
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-padded prompts for batched generation: every row's last token is its real last token."""
    ids = pad(prompts, pad_id, left=True)
    mask = pad([[1] * len(p) for p in prompts], 0, left=True)
    return ids, mask


def show_first_sample(ds: LlavaDataset, tokenizer, tries: int = 50) -> None:
    """Print the first usable sample as the LLM sees it and its supervised target: the
    quickest way to catch a template or masking bug (the course does the same). When none of
    the first `tries` records can be used, say why."""
    seen = SkipTally()
    for i in range(min(len(ds), tries)):
        item = ds[i]
        if "skip" in item:
            seen.add_skip(item)
            continue
        target = [t for t in item["labels"] if t != IGNORE_INDEX]
        text = tokenizer.decode(item["input_ids"])
        n_slots = len(ds.fmt.image_ids())
        slot = tokenizer.decode([ds.fmt.image_token_id]) if ds.fmt.image_token_id < len(tokenizer) else "<image slot>"
        console.header("first sample")
        console.info("prompt + target:\n" + text.replace(slot * n_slots, f"{slot} x {n_slots}"))
        console.info(f"supervised target ({len(target)} tokens): {tokenizer.decode(target)!r}")
        if seen.unusable:
            console.warn(f"the {seen.unusable} record(s) before it were skipped: {seen.describe()}")
        return
    console.warn(f"first sample: none of the first {seen.unusable} records can be used: {seen.describe()}")


def main() -> None:
    """Read a dataset and print its first usable sample as training would see it. Only configs
    and the tokenizer are read: the image-slot count and preprocessing come from the tower's
    config and the same feature defaults training uses."""
    p = Parser(description=__doc__)
    p.add_argument("--data_format", default="sa1b", choices=list(DATA_FORMATS), help="on-disk format")
    p.add_argument("--data_root", default="", help="dataset directory")
    p.add_argument("--chat_json", default="", help="chat.json path (chat format)")
    p.add_argument("--image_root", default="", help="chat format: image folder for --chat_json (as in training)")
    p.add_argument("--llm", required=True, help="LLM id or local directory (tokenizer and chat template)")
    p.add_argument("--vision_tower", required=True, help="vision tower id or local directory")
    p.add_argument("--models_dir", default="models", help="where registry ids live")
    p.add_argument("--feature_select", default=None, choices=["all", "patch"], help="as in training (default: the tower's)")
    p.add_argument("--max_samples", type=int, default=0, help="read at most this many records (0 = all)")
    args = p.parse_args()
    records, skipped, root = read_records(args.data_format, args.data_root, args.chat_json, args.max_samples)
    vision, llm = resolve_model(args.vision_tower, args.models_dir), resolve_model(args.llm, args.models_dir)
    vcfg = arch_config(vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    select = args.feature_select or vision_defaults(args.vision_tower, vision)["feature_select"]
    tok = load_tokenizer(llm)
    ensure_image_token(tok, IMAGE_TOKEN)
    fmt = PromptFormat.build(tok, IMAGE_TOKEN, image_tokens(vcfg, select), knows_vision_markers(llm), CHAT_TEMPLATE_KWARGS)
    transform = ImageTransform.from_dict(preprocessing(vision, vcfg.image_size))
    ds = LlavaDataset(records, tok, fmt, transform, ImageLoader(args.image_root or root))
    print(f"{len(records)} records, skipped while reading: {dict(skipped)}; {fmt.num_image_tokens} image slots "
          f"({select} tokens)")
    show_first_sample(ds, tok, tries=200)


if __name__ == "__main__":
    main()
