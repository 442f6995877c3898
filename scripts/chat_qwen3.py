"""Multi-turn terminal chat with the LLM alone (no image), streaming its tokens.

Talk to the frozen LLM before aligning anything to it: how does it answer, in which language,
how long, with or without thinking? Works for Qwen3 and for the text model of Qwen3-VL (a
folder or a registry id, resolved like train_stage1.py). Commands: /clear forgets the
history, /exit (or Ctrl-D) quits.

    python scripts/download_models.py qwen3-0.6b && python scripts/chat_qwen3.py
    python scripts/chat_qwen3.py --llm qwen3vl-2b-text --thinking --temperature 0.6
    python toy_world.py --size demo && python scripts/chat_qwen3.py --llm models/toy/llm --temperature 0   # CPU, seconds
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from backbones import load_llm, load_tokenizer, resolve_model  # noqa: E402
from prompts import find_end_of_turn  # noqa: E402
from utils.config import Parser  # noqa: E402
from utils.dist import pick_device  # noqa: E402


def pick_attn(flag: str) -> str:
    """'auto': flash_attention_2 when flash_attn imports and a GPU is there, else sdpa."""
    if flag != "auto":
        return flag
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401 - a wheel built for another torch fails only here
            return "flash_attention_2"
        except Exception:  # noqa: BLE001
            pass
    return "sdpa"


@dataclass
class Turn:
    """One exchange as the model saw it: the rendered prompt and the reply it streamed."""

    prompt: str
    reply: str


@dataclass
class ChatSession:
    model: torch.nn.Module
    tokenizer: object
    thinking: bool = False
    system: str = ""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    history: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Qwen3's template takes enable_thinking; other templates ignore the variable.
        self.template_kwargs = {"enable_thinking": self.thinking}
        eot = find_end_of_turn(self.tokenizer, self.template_kwargs)     # <|im_end|> for ChatML
        self.stop_ids = [eot] + [t for t in [self.tokenizer.eos_token_id] if t is not None and t != eot]
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 32768)

    def clear(self) -> None:
        self.history = []

    def render(self, messages: list[dict]) -> str:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True,
                                                  **self.template_kwargs)

    def _prompt_ids(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The prompt, dropping the oldest exchanges while it leaves no room for the reply."""
        while True:
            text = self.render(messages)
            # add_special_tokens=False: the template already wrote every special token (Qwen has no BOS).
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) + self.max_new_tokens <= self.max_positions or len(messages) <= 1:
                return text, ids
            messages[:] = messages[2:]
            print("[history too long for the context: dropped the oldest exchange]", flush=True)

    @torch.no_grad()
    def ask(self, user_text: str) -> str:
        """Generate a reply to `user_text` given the history, streaming it to stdout."""
        from transformers import GenerationConfig, TextStreamer

        messages = self.history + [{"role": "user", "content": user_text}]
        prompt, ids = self._prompt_ids(messages)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)                       # [1, T]
        greedy = self.temperature <= 0
        # A fresh GenerationConfig: the checkpoint's own (Qwen3 ships sampling at 0.6) must not
        # override the flags typed here.
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=not greedy,
                               eos_token_id=self.stop_ids, bos_token_id=None,
                               pad_token_id=self.stop_ids[0] if self.tokenizer.pad_token_id is None
                               else self.tokenizer.pad_token_id,
                               **({} if greedy else {"temperature": self.temperature, "top_p": self.top_p}))
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  generation_config=gen, streamer=streamer)
        new = out[0, input_ids.shape[1]:].tolist()
        reply = self.tokenizer.decode([t for t in new if t not in self.stop_ids], skip_special_tokens=True).strip()
        # Kept in full; Qwen3's template strips the <think> part of earlier answers by itself.
        self.history = messages + [{"role": "assistant", "content": reply}]
        self.turns.append(Turn(prompt, reply))
        return reply


def run(session: ChatSession) -> None:
    """The read-eval-print loop: one line per user turn; /clear, /exit, EOF."""
    print("Chat with the LLM. /clear resets the history, /exit or Ctrl-D quits.", flush=True)
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            print("", flush=True)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            session.clear()
            print("[history cleared]", flush=True)
            continue
        try:
            session.ask(text)
        except KeyboardInterrupt:
            # Ctrl-C stops one answer, not the chat; the unanswered question is not kept.
            print("\n[interrupted]", flush=True)


def main(argv: list[str] | None = None) -> ChatSession:
    p = Parser(description=__doc__)
    p.add_argument("--llm", default="qwen3-0.6b", help="registry id (in --models_dir) or a local model folder")
    p.add_argument("--models_dir", default="models", help="where registry ids live: <models_dir>/<id>")
    p.add_argument("--thinking", action="store_true", help="let Qwen3 think first (enable_thinking=True)")
    p.add_argument("--system", default="", help="optional system prompt")
    p.add_argument("--max_new_tokens", type=int, default=512, help="reply length cap (thinking needs more)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; Qwen3 suggests 0.7 (0.6 thinking)")
    p.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling (ignored when greedy)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                   help="attention kernel; auto = flash_attention_2 when installed and on a GPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    args = p.parse_args(argv)

    try:
        path = resolve_model(args.llm, args.models_dir)
    except FileNotFoundError as e:  # MissingModel included: its message holds the download command
        raise SystemExit(str(e)) from None
    device = pick_device(args.device)
    # bf16 halves memory on a GPU; CPUs are faster and exact in fp32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = pick_attn(args.attn)
    print(f"LLM {path} | {device} {str(dtype).removeprefix('torch.')} | attention {attn} | "
          f"thinking {'on' if args.thinking else 'off'}", flush=True)
    model = load_llm(path, dtype, attn).to(device)
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{path}: the tokenizer has no chat template; this script chats through it")
    session = ChatSession(model, tokenizer, args.thinking, args.system, args.max_new_tokens, args.temperature,
                          args.top_p)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - arrow keys and history in input()
        except ImportError:
            pass
    run(session)
    return session


if __name__ == "__main__":
    main()
