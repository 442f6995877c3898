"""Talk to a trained stage-1 model: interactive chat or one-shot answers.

Everything comes from the checkpoint (towers, projector, prompt format); --vision_tower/--llm
only override where the frozen models live now.

    # interactive: type an image path or URL, then questions; `clear`, `exit`
    python eval_llava.py --checkpoint checkpoints/<run>/final
    # one shot: stdout carries the reply alone (logs go to stderr)
    python eval_llava.py --checkpoint checkpoints/<run>/final --image data/toy/eval/images/000000.png --prompt 描述这张图片
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataset import (IMAGE_PLACEHOLDER, ImageLoader, ImageTransform, PromptFormat, SampleError, Stage1Dataset,
                     caption_messages, collate, collate_prompts, encode_prompt, to_device)
from model import LlavaStage1, load_checkpoint
from utils import console
from utils.metrics import RunLogger


@dataclass
class Assistant:
    """A model with everything needed to turn (image, messages) into a reply."""

    model: LlavaStage1
    tokenizer: Any
    fmt: PromptFormat
    transform: ImageTransform
    loader: ImageLoader

    @classmethod
    def from_model(cls, model: LlavaStage1, tokenizer, loader: ImageLoader | None = None) -> "Assistant":
        spec = model.spec
        fmt = PromptFormat.build(tokenizer, spec.image_token, spec.num_image_tokens, spec.image_wrap,
                                 spec.chat_template_kwargs)
        transform = ImageTransform.from_dict(spec.image_transform)
        # The same loader settings as training (draft-mode JPEG decoding to the tower's size).
        return cls(model, tokenizer, fmt, transform, loader or ImageLoader(draft=transform.size))

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", vision_tower: str | None = None,
                        llm: str | None = None, trust_remote_code: bool = False) -> "Assistant":
        model, tokenizer, _ = load_checkpoint(path, device, vision_tower=vision_tower, llm=llm,
                                              trust_remote_code=trust_remote_code)
        model.eval()
        return cls.from_model(model, tokenizer)

    def pixels(self, image: Image.Image | str | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            return image
        return self.transform(self.loader(image) if isinstance(image, str) else image)   # [3, H, W]

    def reply_batch(self, items: list[tuple[Any, list[dict]]], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32,
                    streamer: Any = None) -> list[str]:
        """items: (image, messages ending with a user turn) -> reply texts, in order.

        The first user turn carries the image; `<image>` is prepended when it is missing.
        """
        device = next(self.model.projector.parameters()).device
        replies: list[str] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [encode_prompt(self.tokenizer, self.fmt, with_image_placeholder(m))[0] for _, m in chunk]
            ids, mask = collate_prompts(prompts, self.tokenizer.pad_token_id or 0)
            pixels = torch.from_numpy(np.stack([self.pixels(img) for img, _ in chunk])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = self.model.generate(ids.to(device), mask.to(device), self.fmt.stop_ids, pixel_values=pixels,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          streamer=streamer)
            replies += [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out]
        self.model.train(was_training)
        return replies

    def reply(self, image: Any, messages: list[dict], stream: bool = False, **kwargs) -> str:
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.reply_batch([(image, messages)], streamer=streamer, **kwargs)[0]


# --------------------------------------------------------------------------- held-out evaluation (used by training too)

@torch.no_grad()
def heldout_loss(model: LlavaStage1, ds: Stage1Dataset, n: int = 0, batch_size: int = 16,
                 num_workers: int = 0) -> dict:
    """Held-out loss and perplexity over the first n records (a fixed set; 0 = all)."""
    device = next(model.projector.parameters()).device
    pad_id = ds.tokenizer.pad_token_id if ds.tokenizer.pad_token_id is not None else 0
    subset = torch.utils.data.Subset(ds, range(min(n, len(ds)) if n else len(ds)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=lambda b: collate(b, pad_id))
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in loader:
        if not batch["size"]:
            continue
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ls, nt = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
        loss_sum += ls.item()
        tokens += int(nt)
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def heldout_items(ds: Stage1Dataset, n: int, instruction: str | None = None):
    """The first n held-out records as (image, prompt messages) items and reference answers.

    `instruction` replaces the (randomly drawn) instruction of caption records, so scores
    do not depend on the draw. A record whose image cannot be read is reported and left out.
    """
    items, refs = [], []
    for i in range(min(n, len(ds)) if n else len(ds)):
        messages = ds.messages(i)
        if instruction is not None and ds.records[i].caption is not None:
            messages = caption_messages(ds.records[i].caption, instruction)
        try:
            image = ds.loader(ds.records[i].image)
        except SampleError as e:
            console.warn(f"held-out record {i} left out: {e}")
            continue
        items.append((image, messages[:-1]))
        refs.append(messages[-1]["content"])
    return items, refs


def caption_exact_match(assistant: Assistant, ds: Stage1Dataset, instruction: str, n: int = 0) -> float:
    """Share of held-out images whose greedy reply equals the reference exactly (the demo's proof)."""
    items, refs = heldout_items(ds, n, instruction)
    replies = assistant.reply_batch(items, max_new_tokens=32)
    return sum(r == ref for r, ref in zip(replies, refs)) / max(len(refs), 1)


def log_sample_replies(assistant: Assistant, ds: Stage1Dataset, n: int, logger: RunLogger | None, step: int) -> None:
    """Answer a few held-out images and log prompt, reply and reference (and the image)."""
    items, refs = heldout_items(ds, n)
    replies = assistant.reply_batch(items, max_new_tokens=64)
    for k, ((image, msgs), reply, ref) in enumerate(zip(items, replies, refs)):
        question = msgs[-1]["content"].replace("<image>", "").strip()
        console.info(f"  [sample {k}] Q: {question} | A: {reply} | ref: {ref}")
        if logger:
            logger.text(f"samples/{k}", f"**Q:** {question}\n\n**A:** {reply}\n\n**ref:** {ref}", step)
            logger.image(f"samples/{k}", np.asarray(image.resize((224, 224))), step)


def with_image_placeholder(messages: list[dict]) -> list[dict]:
    """Put `<image>` before the first user turn's text unless some user turn already has it."""
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "user"):
        return messages
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = f"{IMAGE_PLACEHOLDER}\n{out[first]['content']}"
    return out


def looks_like_image(text: str) -> bool:
    return text.startswith(("http://", "https://", "file://")) or os.path.isfile(text)


def chat(assistant: Assistant, gen: dict, stdin=sys.stdin) -> None:
    """The course's terminal loop: an image path/URL loads an image and resets the dialogue,
    text asks about it, `clear` empties the history, `exit`/`quit` leave."""
    console.info("Type an image path or http(s) URL to load it; then ask. 'clear' resets, 'exit' quits.")
    image, messages = None, []
    while True:
        print("\n你: ", end="", flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        if line.lower() in ("exit", "quit"):
            break
        if line.lower() == "clear":
            messages = []
            console.success("history cleared (the image stays)")
            continue
        if looks_like_image(line):
            try:
                image = assistant.loader(line)
            except SampleError as e:
                console.error(f"could not load the image: {e}")
                continue
            messages = []
            console.success(f"image loaded ({image.size[0]}x{image.size[1]}); dialogue reset")
            continue
        if image is None:
            console.warn("load an image first (a path or an http(s) URL)")
            continue
        messages.append({"role": "user", "content": line})
        print("助手: ", end="", flush=True)
        reply = assistant.reply(image, messages, stream=True, **gen)
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Chat with a stage-1 checkpoint, or answer once.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or its projector.safetensors")
    p.add_argument("--vision_tower", default=None, help="override the tower path stored in the checkpoint")
    p.add_argument("--llm", default=None, help="override the LLM path stored in the checkpoint")
    p.add_argument("--image", default=None, help="one-shot mode: image path or URL")
    p.add_argument("--prompt", default=None, help="one-shot mode: the question")
    p.add_argument("--max_new_tokens", type=int, default=256, help="reply length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model folders to run their own code")
    args = p.parse_args(argv)
    from utils.dist import pick_device

    one_shot = args.image is not None or args.prompt is not None
    if one_shot and (args.image is None or args.prompt is None):
        p.error("one-shot mode needs both --image and --prompt")
    if one_shot:
        console.set_stream(sys.stderr)  # stdout carries the reply alone
    device = pick_device(args.device)
    console.info(f"loading {args.checkpoint} on {device} ...")
    assistant = Assistant.from_checkpoint(args.checkpoint, str(device), args.vision_tower, args.llm,
                                          args.trust_remote_code)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if one_shot:
        try:
            image = assistant.loader(args.image)
        except SampleError as e:
            console.error(f"could not load the image: {e}")
            sys.exit(2)
        print(assistant.reply(image, [{"role": "user", "content": args.prompt}], **gen))
    else:
        chat(assistant, gen)


if __name__ == "__main__":
    main()
