"""The contract training and inference share: how a conversation about an image becomes the
token ids the LLM sees, and which of them are supervised.

- The user turn carries an `<image>` placeholder; it becomes N image slots (`<|image_pad|>`
  for Qwen, optionally wrapped in <|vision_start|>/<|vision_end|>) that receive the projected
  features. No code assumes a BOS token: the LLM's own chat template renders everything.
- The prompt of a training sample is exactly what `eval_llava.py` feeds for the same messages
  (`add_generation_prompt=True`; Qwen3 with `enable_thinking=False` and its empty think block).
- The supervised target is the answer tokens plus the end-of-turn token, nothing else
  (IGNORE_INDEX elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from utils.skips import SampleError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<|image_pad|>"                          # Qwen's image-pad token: its positions get the features
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}      # Qwen3: answer without thinking, as the course does
IGNORE_INDEX = -100                                    # label of every token the loss skips

# Instruction pools for caption data. The course trains with one instruction only.
INSTRUCTION_POOLS: dict[str, list[str]] = {
    "course": ["描述这张图片"],
    "zh": ["描述这张图片", "请描述这张图片。", "这张图片里有什么？", "用一句话描述这张图片。", "简要说明图中的内容。"],
    "en": ["Describe the image briefly.", "What is in this picture?", "Give a short caption for the image.",
           "Summarize the visual content of the image.", "Write a terse but informative summary of the picture."],
}
CAPTION_PROMPT = INSTRUCTION_POOLS["course"][0]        # "describe this image": the default question everywhere


@dataclass
class PromptFormat:
    """How a conversation becomes token ids for one LLM + tower pair.

    The `<image>` placeholder becomes `num_image_tokens` slots of `image_token_id` (wrapped
    in `wrap_ids` when set). `end_of_turn_id` ends every supervised answer; generation stops
    at any of `stop_ids`.
    """

    image_token_id: int
    num_image_tokens: int
    end_of_turn_id: int
    stop_ids: list[int]
    wrap_ids: tuple[int, int] | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, spec: Any, tokenizer) -> "PromptFormat":
        """The format a model's spec (model.ModelSpec: image_token, num_image_tokens, image_wrap,
        chat_template_kwargs) implies: what training, chat and export all build."""
        return cls.build(tokenizer, spec.image_token, spec.num_image_tokens, spec.image_wrap, spec.chat_template_kwargs)

    @classmethod
    def build(cls, tokenizer, image_token: str, num_image_tokens: int, wrap: bool = False,
              chat_template_kwargs: dict | None = None) -> "PromptFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the LLM's tokenizer has no chat template; training and chat render every prompt with it")
        kwargs = dict(chat_template_kwargs or {})
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        wrap_ids = None
        if wrap:
            start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
            if None in (start, end) or tokenizer.unk_token_id in (start, end):
                raise ValueError("image wrapping needs <|vision_start|>/<|vision_end|> in the tokenizer")
            wrap_ids = (start, end)
        eot = find_end_of_turn(tokenizer, kwargs)
        stops = [eot] + [t for t in [tokenizer.eos_token_id] if t is not None and t != eot]
        return cls(image_id, num_image_tokens, eot, stops, wrap_ids, kwargs)

    def image_ids(self) -> list[int]:
        slots = [self.image_token_id] * self.num_image_tokens
        return [self.wrap_ids[0], *slots, self.wrap_ids[1]] if self.wrap_ids else slots


def _is_special(tokenizer, tid: int) -> bool:
    tok = tokenizer.added_tokens_decoder.get(tid)
    return (tok is not None and tok.special) or tid in tokenizer.all_special_ids


def find_end_of_turn(tokenizer, chat_template_kwargs: dict) -> int:
    """The token the chat template puts right after an assistant answer (`<|im_end|>` for
    ChatML, `</s>` for Llama-2 style), found by rendering a probe; eos when there is none."""
    probe = "PROBEANSWER"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, **chat_template_kwargs)
    tail = text[text.rindex(probe) + len(probe):]
    for tid in tokenizer.encode(tail, add_special_tokens=False):
        if _is_special(tokenizer, tid):
            return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("cannot find the end-of-turn token: the template adds none and there is no eos")
    return tokenizer.eos_token_id


def _encode_text(tokenizer, fmt: PromptFormat, text: str) -> list[int]:
    """Tokenise rendered template text; each `<image>` becomes the image slots.

    add_special_tokens=False: the template already holds every special token it wants
    (a BOS for Llama-style templates, none for Qwen); adding more would double them.
    """
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids += fmt.image_ids()
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def encode_prompt(tokenizer, fmt: PromptFormat, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids that the model sees before it answers the last user message.

    This one function serves training and `eval_llava.py`, so the two can never disagree.
    Earlier assistant answers (multi-turn) stay in the prompt as the template renders them
    as history; the returned mask marks them (and their end-of-turn token) for supervision.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **fmt.chat_template_kwargs)
    # Character spans of earlier answers, found in order so a repeated phrase in a question
    # is never mistaken for the answer.
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for msg in messages:
        at = text.find(msg["content"], cursor) if msg["content"] else -1
        if at < 0:
            continue
        if msg["role"] == "assistant":
            pieces += [(text[cursor:at], False), (msg["content"], True)]
            cursor = at + len(msg["content"])
        else:
            pieces.append((text[cursor:at + len(msg["content"])], False))
            cursor = at + len(msg["content"])
    pieces.append((text[cursor:], False))
    ids: list[int] = []
    mask: list[int] = []
    after_answer = False
    for piece, supervised in pieces:
        toks = _encode_text(tokenizer, fmt, piece) if piece else []
        flags = [int(supervised)] * len(toks)
        if after_answer and toks and toks[0] == fmt.end_of_turn_id:
            flags[0] = 1  # the end-of-turn token that closes an earlier answer
        ids += toks
        mask += flags
        if piece:
            after_answer = supervised
    return ids, mask


def history_matches_live_chat(tokenizer, chat_template_kwargs: dict) -> bool:
    """Whether the template renders an earlier answer, as history, exactly as the tokens a live
    chat generated for it at that turn (the generation prompt followed by the answer).

    ChatML without thinking does; Qwen3's does not: the turn being generated follows an empty
    `<think></think>` block that the same answer loses once it is history. Supervising an
    earlier answer inside the full rendering would then train a prefix inference never shows,
    so such conversations are trained one turn per sample (dataset.LlavaDataset).
    """
    probe = "PROBEANSWER"
    first = [{"role": "user", "content": "hi"}]
    live = tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
    history = tokenizer.apply_chat_template(first + [{"role": "assistant", "content": probe},
                                                     {"role": "user", "content": "more"}],
                                            tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
    return history.startswith(live + probe)


def encode_conversation(tokenizer, fmt: PromptFormat, messages: list[dict], max_text_len: int,
                        prompt_cache: dict | None = None, images: int = 1,
                        supervise_history: bool = True) -> tuple[list[int], list[int]]:
    """Training ids and labels for a conversation that ends with an assistant answer.

    Prompt = exactly what inference feeds for the same history; target = answer tokens plus
    the end-of-turn token, nothing else (-100 elsewhere). Earlier answers are supervised too
    when `supervise_history` (only for templates where history_matches_live_chat).
    `max_text_len` counts tokens other than image slots. A conversation that does not fit
    loses whole trailing turns (the caller counts them: fewer end-of-turn labels than answers);
    a per-turn sample (`supervise_history` False) of a later turn that does not fit is skipped;
    a first answer that does not fit loses its tail, never an image slot.
    `images` is the number of `<image>` placeholders the user turns must carry (0: text only).
    `prompt_cache` memoises the rendered prompt: caption data has a handful of distinct
    prompts (one per instruction), and rendering the chat template is the costliest step.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise SampleError("bad_conversation", "last turn is not an answer")
    if not messages[-1]["content"].strip():
        raise SampleError("empty_answer")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if placeholders != images:
        raise SampleError("no_image_placeholder" if placeholders < images else
                          "placeholder_without_image" if images == 0 else "too_many_images")
    while True:
        key = tuple((m["role"], m["content"]) for m in messages[:-1])
        if prompt_cache is not None and key in prompt_cache:
            prompt, mask = prompt_cache[key]
        else:
            prompt, mask = encode_prompt(tokenizer, fmt, messages[:-1])
            if prompt_cache is not None and len(prompt_cache) < 10_000:  # bounded: VQA questions rarely repeat
                prompt_cache[key] = (prompt, mask)
        n_image = len(fmt.image_ids()) * images
        target = tokenizer.encode(messages[-1]["content"], add_special_tokens=False) + [fmt.end_of_turn_id]
        budget = max_text_len - (len(prompt) - n_image)
        answers = sum(m["role"] == "assistant" for m in messages)
        if budget >= len(target) or answers == 1:
            break
        if not supervise_history:  # one turn per sample: this turn's sample goes, the earlier ones stay
            raise SampleError("turn_over_max_text_len", f"answer {answers} does not fit in {max_text_len} tokens")
        messages = messages[:-2]  # drop the last (question, answer) pair and try again
    if budget <= 0:
        raise SampleError("prompt_too_long", f"{len(prompt) - n_image} text tokens > {max_text_len}")
    target = target[:budget]
    ids = prompt + target
    if not supervise_history:
        mask = [0] * len(prompt)
    labels = [t if m else IGNORE_INDEX for t, m in zip(prompt, mask)] + target
    return ids, labels


def caption_messages(caption: str, instruction: str) -> list[dict]:
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{instruction}"},
            {"role": "assistant", "content": caption}]


def with_image_placeholder(messages: list[dict]) -> list[dict]:
    """Put `<image>` before the first user turn's text unless some user turn already has it."""
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "user"):
        return messages
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = f"{IMAGE_PLACEHOLDER}\n{out[first]['content']}"
    return out


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: label t is predicted at position t-1, so the first
    column never counts."""                                    # labels [B, T]
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def ensure_image_token(tokenizer, token: str) -> int:
    """Id of the image-slot token; added to the tokenizer when the LLM does not know it.
    An added id may be past the embedding table; the model never looks it up."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        tokenizer.add_tokens([token], special_tokens=True)
        tid = tokenizer.convert_tokens_to_ids(token)
    return int(tid)
