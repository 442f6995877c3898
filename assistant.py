"""Answering: turn (image, messages) into a reply, with our model (`Assistant`) or a reference
model behind an OpenAI-compatible API (`ApiAssistant`), behind one interface. The terminal chat
and batch evaluation (eval_llava.py), the browser chat (web_demo.py), the held-out sample
replies of training (heldout.py) and the demos (toy_demo.py) all answer through it.

    reply(image, messages, stream=False, **gen) -> str        one answer (a chat turn, one shot)
    reply_batch(items, ...) -> list[str | None]                 many answers (None: a counted failure)
    encode(image, messages) / generate(prompts, ...)            the two halves of reply_batch (ours only;
                                                                serve_api.py batches its requests with them)
    stream(image, messages, gen, stop) -> Iterator[str]         the reply so far, growing (the page)
    question_budget(max_new_tokens) -> (n, unit)                how long a question may be
    fit(question, budget) -> (question, was_cut)
    description() -> str                                        what answers: stage, models, step / the API
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from checkpoint_io import checkpoint_file, load_checkpoint
from dataset import ImageLoader, ImageTransform, collate_prompts, encoded_file, original_size
from model import LlavaModel
from prompts import PromptFormat, encode_prompt, with_image_placeholder
from tuning import Tuning
from utils import console
from utils.dist import pick_device
from utils.openai_api import ApiError, ChatApi, api_messages
from utils.skips import SampleError

API_QUESTION_CHARS = 4000        # the reference API's question cap (its own limits vary)
API_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")   # what OpenAI-compatible APIs take in a data URL
API_MAX_SIDE = 1024              # as utils.openai_api.image_data_url: APIs bill and limit by pixels


@dataclass
class Assistant:
    """Our model with everything needed to turn (image, messages) into a reply: the prompt
    format and image preprocessing of its checkpoint, and training's image loader settings."""

    model: LlavaModel
    tokenizer: Any
    fmt: PromptFormat
    transform: ImageTransform
    loader: ImageLoader
    meta: dict = field(default_factory=dict)   # the checkpoint's metadata (step, stage, tuning), when loaded from one
    source: str = ""                           # the checkpoint's folder
    failures: Counter = field(default_factory=Counter)   # always empty: our model answers or raises

    @classmethod
    def from_model(cls, model: LlavaModel, tokenizer, loader: ImageLoader | None = None) -> "Assistant":
        fmt = PromptFormat.for_model(model.spec, tokenizer)
        transform = ImageTransform.from_dict(model.spec.image_transform)
        # The same loader settings as training (draft-mode JPEG decoding to the tower's size).
        return cls(model, tokenizer, fmt, transform, loader or ImageLoader(draft=transform.size))

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", vision_tower: str | None = None,
                        llm: str | None = None, trust_remote_code: bool = False) -> "Assistant":
        model, tokenizer, meta = load_checkpoint(path, device, vision_tower=vision_tower, llm=llm,
                                                 trust_remote_code=trust_remote_code)
        model.eval()
        assistant = cls.from_model(model, tokenizer)
        assistant.meta, assistant.source = meta, os.path.dirname(checkpoint_file(path))
        return assistant

    @property
    def draft(self) -> int:
        """The size JPEGs are draft-decoded down to (no less than the tower's input)."""
        return self.transform.size

    def pixels(self, image: Image.Image | str | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            return image
        return self.transform(self.loader(image) if isinstance(image, str) else image)   # [3, H, W]

    def reply_batch(self, items: list[tuple[Any, list[dict]]], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32,
                    streamer: Any = None, stop: Any = None) -> list[str]:
        """items: (image, messages ending with a user turn) -> reply texts, in order.

        The first user turn carries the image; `<image>` is prepended when it is missing.
        """
        replies: list[str] = []
        for start in range(0, len(items), batch_size):
            prompts = [self.encode(image, messages) for image, messages in items[start:start + batch_size]]
            out = self.generate(prompts, max_new_tokens, temperature, top_p, streamer=streamer, stop=stop)
            replies += [self.decode(r) for r in out]
        return replies

    def encode(self, image: Any, messages: list[dict]) -> tuple[list[int], np.ndarray | None]:
        """(prompt ids with the image slots, pixels [3, H, W]) of one question, as the chat feeds it.
        image None: a text-only question (stage 2 trains on those too), no slots and no pixels."""
        if image is None:
            return encode_prompt(self.tokenizer, self.fmt, messages)[0], None
        return encode_prompt(self.tokenizer, self.fmt, with_image_placeholder(messages))[0], self.pixels(image)

    def generate(self, prompts: list[tuple[list[int], np.ndarray | None]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, streamer: Any = None, stop: Any = None) -> list[list[int]]:
        """One left-padded batch of encoded prompts through LlavaModel.generate (the KV cache; the
        benchmarks' path): the reply ids of each, its stop token excluded. `streamer` gets the
        batch's new tokens at every step ([B]); `stop.is_set()` ends the batch at the next token."""
        device = next(self.model.projector.parameters()).device
        ids, mask = collate_prompts([p for p, _ in prompts], self.tokenizer.pad_token_id or 0)
        images = [px for _, px in prompts if px is not None]   # in row order: embed() fills the slots in order
        pixels = torch.from_numpy(np.stack(images)).to(device) if images else None
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.autocast():
                return self.model.generate(ids.to(device), mask.to(device), self.fmt.stop_ids, pixel_values=pixels,
                                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           streamer=streamer, stop=stop)
        finally:
            self.model.train(was_training)

    def decode(self, reply_ids: list[int]) -> str:
        """The reply text as every caller shows it: special tokens dropped, stripped."""
        return self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()

    def reply(self, image: Any, messages: list[dict], stream: bool = False, **kwargs) -> str:
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.reply_batch([(image, messages)], streamer=streamer, **kwargs)[0]

    def stream(self, image: Image.Image, messages: list[dict], gen: dict, stop: threading.Event,
               lock: threading.Lock | None = None) -> Iterator[str]:
        """The reply so far, growing, as it is generated in a worker thread, which holds `lock`
        (one generation at a time) until it ends: a consumer that stops reading (a closed tab)
        never holds it, and setting `stop` ends the generation at the next token. The last value
        is the whole stripped reply, as `reply` returns it."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work():
            try:
                with lock or contextlib.nullcontext():
                    result["reply"] = self.reply_batch([(image, messages)], streamer=streamer, stop=stop, **gen)[0]
            except Exception as e:  # noqa: BLE001 - raised again in the consumer's thread
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        worker.join()
        if "error" in result:
            raise result["error"]
        yield result["reply"]

    def question_budget(self, max_new_tokens: int) -> tuple[int, str]:
        """Question tokens that fit: the LLM's context minus the image slots, the reply and the template."""
        cfg = self.model.llm.config
        context = min(getattr(cfg, "max_position_embeddings", 4096) or 4096, 8192)
        return max(16, context - len(self.fmt.image_ids()) - max_new_tokens - 64), "tokens"

    def fit(self, question: str, budget: int) -> tuple[str, bool]:
        """The question cut to `budget` tokens, and whether it was cut."""
        ids = self.tokenizer.encode(question, add_special_tokens=False)
        if len(ids) <= budget:
            return question, False
        return self.tokenizer.decode(ids[:budget]), True

    def description(self) -> str:
        spec = self.model.spec
        return (f"stage {self.meta.get('stage', 1)} · step {self.meta.get('step', '?')} · `{self.source}`  \n"
                f"视觉塔 / tower `{spec.vision_tower}` ({spec.vision_type}) · projector {spec.projector} · "
                f"LLM `{spec.llm}` · 训练 / trained: {Tuning(**self.meta.get('tuning', {})).describe()}")


@dataclass
class ApiAssistant:
    """A reference model behind an OpenAI-compatible API with Assistant's interface: the same
    chat, one-shot and batch modes, scored the same way. A failed request is an ApiError in a
    chat (a message, the question dropped) and a counted failure (`failures`) in a batch."""

    api: ChatApi
    loader: ImageLoader = field(default_factory=ImageLoader)
    failures: Counter = field(default_factory=Counter)
    draft: int | None = None                   # the API decodes images itself: loaded whole

    def reply_batch(self, items: list[tuple[Any, list[dict]]], max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, batch_size: int = 32, streamer: Any = None, stop: Any = None) -> list[str | None]:
        out: list[str | None] = []
        for image, messages in items:
            try:
                out.append(self.api.complete(api_messages(sent_image(image), messages), max_new_tokens, temperature,
                                             top_p))
            except ApiError as e:
                self.failures[e.reason] += 1
                out.append(None)
        return out

    def reply(self, image: Any, messages: list[dict], stream: bool = False, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0) -> str:
        text = self.api.complete(api_messages(sent_image(image), messages), max_new_tokens, temperature, top_p)
        if stream:  # the local model streams as it generates; an API reply arrives whole
            print(text, flush=True)
        return text

    def stream(self, image: Image.Image, messages: list[dict], gen: dict, stop: threading.Event,
               lock: threading.Lock | None = None) -> Iterator[str]:
        """The reply in one piece (an ApiError when the API fails), asked while holding `lock`."""
        with lock or contextlib.nullcontext():
            reply = self.reply(image, messages, **gen)
        yield reply

    def question_budget(self, max_new_tokens: int) -> tuple[int, str]:
        return API_QUESTION_CHARS, "characters"

    def fit(self, question: str, budget: int) -> tuple[str, bool]:
        return question[:budget], len(question) > budget

    def description(self) -> str:
        return f"参考模型 / reference model `{self.api.model}` · {self.api.base}"


def sent_image(image: Image.Image | None) -> Image.Image | str | None:
    """The image as an API gets it: the file it was read from, as it is, when the API takes its
    format and size (a JPEG re-encoded changes pixels, and so replies: our own server's on a
    benchmark differed from the local run's); else the image, which api_messages makes a JPEG."""
    encoded = encoded_file(image) if image is not None else None
    if encoded is None or encoded[1] not in API_FORMATS or max(original_size(image)) > API_MAX_SIDE:
        return image
    data, fmt = encoded
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode("ascii")


def answer_all(assistant: Assistant | ApiAssistant, items: list[tuple[str, list[dict]]], root: str,
               batch_size: int, max_new_tokens: int, desc: str) -> tuple[list[str | None], Counter]:
    """(image source, prompt messages) -> replies in order; None where the image failed or the
    reference API gave no answer (each counted by reason)."""
    loader = ImageLoader(root, draft=assistant.draft)
    replies: list[str | None] = [None] * len(items)
    skipped: Counter = Counter()
    failed_before = Counter(assistant.failures)
    with console.progress(len(items), desc, unit="q") as bar:
        for start in range(0, len(items), batch_size):
            chunk, index = [], []
            for k in range(start, min(start + batch_size, len(items))):
                try:
                    chunk.append((loader(items[k][0]), items[k][1]))
                    index.append(k)
                except SampleError as e:
                    skipped[e.reason] += 1
            for k, reply in zip(index, assistant.reply_batch(chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)):
                replies[k] = reply
            bar.update(min(batch_size, len(items) - start))
    for reason, n in (Counter(assistant.failures) - failed_before).items():
        skipped[f"api_{reason}"] += n
    return replies, skipped


def add_api_args(p: argparse.ArgumentParser) -> None:
    """--api_base/--api_model/--api_key_env/--api_timeout: the reference model (eval_llava.py and web_demo.py)."""
    a = p.add_argument_group("reference model behind an OpenAI-compatible API (instead of --checkpoint)")
    a.add_argument("--api_base", default=None, help="e.g. https://api.openai.com/v1 (POST {base}/chat/completions)")
    a.add_argument("--api_model", default=None, help="the API's model name")
    a.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key "
                                                                   "(read from there only; never printed or saved)")
    a.add_argument("--api_timeout", type=float, default=60.0, help="seconds per request")


def load_assistant(args: argparse.Namespace) -> Assistant | ApiAssistant:
    """Our model from --checkpoint, or the reference model behind --api_base. A wrong
    --checkpoint (missing, or not one of ours) or API setting is one line, not a traceback."""
    if args.api_base:
        try:
            api = ChatApi(args.api_base, args.api_model, args.api_key_env, timeout=args.api_timeout)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        console.info(f"reference model {args.api_model} at {args.api_base} (key from ${args.api_key_env})")
        return ApiAssistant(api)
    device = pick_device(args.device)
    console.info(f"loading {args.checkpoint} on {device} ...")
    return Assistant.from_checkpoint(args.checkpoint, str(device), args.vision_tower, args.llm, args.trust_remote_code)
