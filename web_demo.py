"""Chat with a trained model of any stage in the browser (Gradio): upload an image, ask, get a
streamed reply; follow-up turns keep the history exactly as eval_llava.py's chat does (the same
prompt code and stop tokens, through the same Assistant).

    python web_demo.py --checkpoint checkpoints/<run>/step_000600          # http://127.0.0.1:7860
    python web_demo.py --checkpoint checkpoints/demo_<time> --device cpu    # the --demo checkpoint, on a CPU
    OPENAI_API_KEY=... python web_demo.py --api_base https://api.openai.com/v1 --api_model gpt-4o-mini

Safe by default: it listens on 127.0.0.1 only (--host 0.0.0.0 is an explicit choice, printed
with a warning), --share is off unless given, the page reads only files a user uploaded (there
is no server-side path field), uploads are capped in size, and image URLs are off unless
--allow_urls (then fetched as the dataset's fetcher does: http(s) only, a byte cap, a timeout,
the pixel cap). One model serves everyone: requests wait in Gradio's queue and generate one at
a time; a browser that leaves mid-reply stops its generation and never blocks the queue.
Bad input (not an image, a corrupt file, a decompression bomb, an empty or over-long question)
gets a chat message, never a stack trace.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # nothing leaves the machine unasked
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import collections
import contextlib
import glob
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator

from PIL import Image

from dataset import ImageLoader, decode_image
from assistant import ApiAssistant, Assistant, add_api_args, load_assistant
from utils import console
from utils.config import Parser
from utils.openai_api import ApiError
from utils.skips import SampleError

MAX_UPLOAD_MB = 20               # an image above this gets a chat message (--max_upload_mb)
SERVER_CAP = 10                  # Gradio refuses an upload above this many times that (a toast, not a chat
                                 # message): the hard bound on what a client can make the server store
PORTS_TRIED = 100                # a busy --port: the next free one of this many is taken
TOY_EXAMPLES = "data/toy/eval/images"


class ChatEngine:
    """The model behind the page, ours or a reference API's (assistant.py gives both one
    interface). One request generates at a time, under one lock that the generating worker
    holds, so a handler that stops reading (a closed tab) never holds it."""

    def __init__(self, assistant: Assistant | ApiAssistant, header: str, max_new_tokens: int):
        self.assistant, self.header = assistant, header
        self.lock = threading.Lock()
        self.question_budget, self.unit = assistant.question_budget(max_new_tokens)

    def fit(self, question: str) -> tuple[str, bool]:
        """The question cut to the budget (tokens for our model, characters for an API)."""
        return self.assistant.fit(question, self.question_budget)

    def stream(self, image: Image.Image, messages: list[dict], gen: dict, stop: threading.Event) -> Iterator[str]:
        """The reply so far, growing; an ApiError when the reference API fails."""
        return self.assistant.stream(image, messages, gen, stop, self.lock)


PREVIEW_PX = 512                 # the page shows the image 260 px high: a larger preview only costs bytes
PREVIEWS_KEPT = 64               # Gradio copies a preview as the request ends; older files are ours to delete
_previews = tempfile.mkdtemp(prefix="llava_web_previews_")
_preview_files: collections.deque = collections.deque()
atexit.register(shutil.rmtree, _previews, True)


def preview_file(image: Image.Image) -> str:
    """The preview as a PNG file of its own. Gradio writes a returned PIL image into its cache in
    place, at a path named by the bytes' hash, so two users loading the same image at the same
    moment share one file that one is rewriting while the other downloads it: the download ends
    short ("peer closed connection ... received 0 bytes"). A file path instead is copied into the
    cache under a temporary name and renamed (gradio.processing_utils.save_file_to_cache)."""
    small = image.copy()
    small.thumbnail((PREVIEW_PX, PREVIEW_PX))
    fd, path = tempfile.mkstemp(suffix=".png", dir=_previews)
    with os.fdopen(fd, "wb") as fh:
        small.save(fh, format="PNG")
    _preview_files.append(path)
    while len(_preview_files) > PREVIEWS_KEPT:
        with contextlib.suppress(OSError):
            os.remove(_preview_files.popleft())
    return path


def build_app(engine: ChatEngine, allow_urls: bool = False, default_tokens: int = 256,
              max_upload_mb: float = MAX_UPLOAD_MB):
    import gradio as gr

    def note(chatbot: list, question: str, text: str) -> list:
        """A message from the page itself: shown, never fed to the model as history. The chat
        draws consecutive assistant messages as one bubble, so a note that follows the model's
        reply gets a user turn of its own: it must not read as the model's words."""
        if not question and chatbot and chatbot[-1]["role"] == "assistant":
            question = "（空 / empty）"
        turn = [{"role": "user", "content": question}] if question else []
        return chatbot + turn + [{"role": "assistant", "content": f"⚠️ {text}"}]

    def load_image(upload: str | None, url: str = ""):
        """A new image starts a new dialogue. Returns (preview, chatbot, state). The state holds
        the image, the model's history (as eval_llava keeps it) and what the page shows."""
        fresh = {"image": None, "messages": [], "shown": []}
        try:
            if url and url.strip():
                if not url.strip().startswith(("http://", "https://")):
                    raise SampleError("bad_url_scheme", "only http(s) URLs")
                image = ImageLoader()(url.strip())        # bounded: size, time, retries, pixel cap
            elif upload:
                size_mb = os.path.getsize(upload) / 2**20 if os.path.isfile(upload) else 0.0
                if size_mb > max_upload_mb:
                    raise SampleError("file_too_large", f"{size_mb:.1f} MB")
                image = decode_image(upload)              # pixel cap (decompression bombs), EXIF, modes
            else:
                return None, [], fresh
        except SampleError as e:
            why = {"image_too_large": "图片像素太多（可能是解压炸弹）/ too many pixels (a decompression bomb?)",
                   "corrupt_image": "不是图片或文件已损坏 / not an image, or a corrupt file",
                   "missing_image": "上传失败 / the upload is missing",
                   "file_too_large": f"文件太大（{e.detail}，上限 {max_upload_mb:g} MB）/ the file is too large "
                                     f"({e.detail}; the limit is {max_upload_mb:g} MB)"}.get(e.reason, str(e))
            shown = note([], "", f"无法读取图片 / could not read the image: {why}")
            return None, shown, {**fresh, "shown": shown}
        return preview_file(image), [], {"image": image, "messages": [], "shown": []}

    def respond(question: str, state: dict, max_new_tokens: float, temperature: float, top_p: float):
        """Stream one reply; yields (chatbot, state, cleared question box)."""
        question = (question or "").strip()
        chatbot = list(state.get("shown", []))

        def noted(text: str, q: str = question):
            shown = note(chatbot, q, text)
            return shown, {**state, "shown": shown}, ""

        if state.get("image") is None:
            yield noted("请先上传图片 / upload an image first")
            return
        if not question:
            yield noted("问题是空的 / the question is empty", "")
            return
        question, cut = engine.fit(question)
        shown = chatbot + [{"role": "user", "content": question}]
        if cut:
            shown.append({"role": "assistant", "content": f"⚠️ 问题太长，已截断到 {engine.question_budget} 个"
                                                          f"{'字符' if engine.unit == 'characters' else ' token'} / "
                                                          f"the question was cut to {engine.question_budget} "
                                                          f"{engine.unit}"})
        messages = state["messages"] + [{"role": "user", "content": question}]
        gen = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
        stop = threading.Event()
        reply = ""
        try:
            for reply in engine.stream(state["image"], messages, gen, stop):
                yield shown + [{"role": "assistant", "content": reply}], state, ""
        except ApiError as e:
            failed = note(shown, "", f"API 没有回答 / the API gave no answer: {e}")
            yield failed, {**state, "shown": failed}, ""
            return
        except Exception as e:  # noqa: BLE001 - the page says so, the server log has the details
            console.error(f"generation failed: {type(e).__name__}: {e}")
            failed = note(shown, "", f"生成失败 / generation failed ({type(e).__name__}); the server log has details")
            yield failed, {**state, "shown": failed}, ""
            return
        finally:
            stop.set()        # a closed tab closes this generator: its generation stops at the next token
        shown = shown + [{"role": "assistant", "content": reply}]
        state = {"image": state["image"], "messages": messages + [{"role": "assistant", "content": reply}],
                 "shown": shown}
        yield shown, state, ""

    def clear(state: dict):
        return [], {"image": state.get("image"), "messages": [], "shown": []}

    with gr.Blocks(title="LLaVA chat") as app:
        gr.Markdown("## LLaVA 图文对话 / image chat\n" + engine.header)
        state = gr.State({"image": None, "messages": [], "shown": []})
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="上传图片 / upload an image", file_types=["image"], type="filepath")
                url = gr.Textbox(label="或图片 URL / or an image URL", visible=allow_urls)
                preview = gr.Image(label="当前图片 / current image", interactive=False, type="filepath", height=260)
                with gr.Accordion("生成设置 / generation", open=False):
                    tokens = gr.Slider(1, 1024, value=default_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="对话 / chat", height=440)
                question = gr.Textbox(label="问题 / question", placeholder="描述这张图片")
                with gr.Row():
                    send = gr.Button("发送 / send", variant="primary")
                    reset = gr.Button("清空对话 / clear")
        examples = sorted(glob.glob(os.path.join(TOY_EXAMPLES, "*.png")))[:4]
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="示例图片 / toy examples")
        upload.change(load_image, [upload], [preview, chatbot, state], api_name="load_image", queue=False)
        if allow_urls:
            url.submit(lambda u: load_image(None, u), [url], [preview, chatbot, state], api_name="load_url")
        chat_inputs = [question, state, tokens, temperature, top_p]
        send.click(respond, chat_inputs, [chatbot, state, question], api_name="chat", concurrency_limit=1)
        question.submit(respond, chat_inputs, [chatbot, state, question], api_name=False, concurrency_limit=1)
        reset.click(clear, [state], [chatbot, state], api_name="clear", queue=False)
    return app.queue(default_concurrency_limit=1)


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="a run folder, a step folder or a projector.safetensors")
    p.add_argument("--vision_tower", default=None, help="override the tower path stored in the checkpoint")
    p.add_argument("--llm", default=None, help="override the (base) LLM path stored in the checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model folders to run their own code")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 exposes the page to your "
                                                      "network (printed with a warning)")
    p.add_argument("--port", type=int, default=7860, help=f"port; when it is busy, the next free one of "
                                                          f"{PORTS_TRIED} is taken (and printed)")
    p.add_argument("--share", action="store_true", help="a public gradio.live link (off unless given)")
    p.add_argument("--allow_urls", action="store_true", help="also accept http(s) image URLs (bounded fetches)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="the page's default reply length")
    p.add_argument("--max_upload_mb", type=float, default=MAX_UPLOAD_MB, help="a larger image file gets a chat "
                                                                              "message instead of a reply")
    add_api_args(p)
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.api_base):
        p.error("give --checkpoint (our model) or --api_base with --api_model (a reference model)")
    if args.api_base and not args.api_model:
        p.error("--api_base needs --api_model")
    console.quiet_library_bars()
    try:
        assistant = load_assistant(args)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    port = free_port(args.host, args.port)
    app = build_app(ChatEngine(assistant, assistant.description(), args.max_new_tokens), args.allow_urls,
                    args.max_new_tokens, args.max_upload_mb)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.warn(f"--host {args.host}: the page is reachable from other machines on your network; anyone who "
                     "can reach it can use the model")
    if args.share:
        console.warn("--share: a public gradio.live link; anyone with it can use the model")
    try:
        # quiet: Gradio's own banner tells a script's user to edit launch() (share=True); ours names flags.
        app.launch(server_name=args.host, server_port=port, share=args.share, show_error=False, ssr_mode=False,
                   max_file_size=f"{int(args.max_upload_mb * SERVER_CAP)}mb", quiet=True, prevent_thread_lock=True)
    except OSError as e:  # taken between our check and Gradio's bind, or not ours to bind
        raise SystemExit(f"cannot listen on {args.host}:{port} ({e}); pick another with --port") from None
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    console.success(f"serving on http://{host}:{port}" + (f"  (public: {app.share_url})" if app.share_url else "")
                    + "   Ctrl-C stops it")
    app.block_thread()


def free_port(host: str, port: int) -> int:
    """`port` when nothing listens there, else the next free one (said on the console); a clear
    error naming --port when none of PORTS_TRIED is free."""
    for candidate in range(port, port + PORTS_TRIED):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
        if candidate != port:
            console.warn(f"port {port} is in use: serving on {candidate} instead (choose with --port)")
        return candidate
    raise SystemExit(f"ports {port}-{port + PORTS_TRIED - 1} on {host} are all in use: pick a free one with --port")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
