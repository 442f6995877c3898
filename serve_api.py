"""An OpenAI-compatible HTTP server for a checkpoint of any stage: stage 1 (the course recipe
included), stage 2, stage 3 with its LoRA adapter. vLLM cannot load what this course trains
(Chinese-CLIP and DINOv3 towers, a linear projector, ln_post on every token), yet every client of
the field speaks this API: the openai SDK, lmms-eval's and VLMEvalKit's API models, chat front-ends,
and our own `eval_llava.py --api_base`.

    python serve_api.py --checkpoint checkpoints/<run>                    # http://127.0.0.1:8000/v1
    python serve_api.py --checkpoint checkpoints/demo_<time> --device cpu --port 8001
    MY_KEY=... python serve_api.py --checkpoint ... --api_key_env MY_KEY   # clients send Bearer $MY_KEY

The prompt contract is eval_llava.py's (the same Assistant: chat template, image slots, stop
tokens), so a greedy reply equals `eval_llava.py --checkpoint X --image I --prompt P`, token for
token. Requests that arrive together are generated as one left-padded batch (Assistant.generate,
the benchmarks' path; utils/serving.py). Safe by default: loopback only unless --host, a bearer key
with --api_key_env, caps on the body, the image (bytes and pixels) and the queue (429 when full),
errors in OpenAI's JSON shape, and SIGTERM finishes what is in flight, refuses the rest, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import signal
import socket
import sys
import time
import uuid
import warnings
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from assistant import Assistant
from checkpoint_io import read_checkpoint_meta
from dataset import MAX_IMAGE_PIXELS, ImageLoader, decode_image
from prompts import IMAGE_PLACEHOLDER
from utils import console
from utils.config import Parser
from utils.dist import pick_device
from utils.serving import Batcher, HttpError, Job
from utils.skips import SampleError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields a client may send that change nothing about the reply (bookkeeping on OpenAI's side).
HARMLESS = {"model", "user", "metadata", "store", "service_tier", "stream_options"}
KNOWN = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
         *HARMLESS}


# --------------------------------------------------------------------------- a request, read and checked

def read_question(body: dict, args: argparse.Namespace) -> dict:
    """A chat/completions body -> our messages, the image's URL and the sampling settings, or an
    HttpError (400) that says which field is wrong and what would be right."""
    messages, image = read_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise HttpError(400, f"max_tokens {max_tokens!r}: a whole number >= 1", param="max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise HttpError(400, "top_p 0 keeps no token: give a value in (0, 1]", param="top_p")
    n = body.get("n", 1)
    if n not in (1, None):
        raise HttpError(400, f"n={n}: this server returns one choice per request; send {n} requests instead (they "
                             "are batched together)", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise HttpError(400, "stop: a string or a list of up to 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise HttpError(400, f"seed {seed!r}: a whole number", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, f"stream {stream!r}: true or false", param="stream")
    options = body.get("stream_options") or {}
    for key, value in body.items():      # a setting we would ignore is refused, never silently dropped
        if key not in KNOWN and value not in (None, False, 0, "", [], {}, "none", {"type": "text"}):
            raise HttpError(400, f"{key} is not supported by this server (it serves a LLaVA-style model: text and "
                                 "one image in, text out)", param=key)
    # None: as many as fit the context, up to the cap (the handler knows the prompt's length)
    return {"messages": messages, "image": image, "max_tokens": max_tokens and min(max_tokens, args.max_tokens),
            "temperature": temperature, "top_p": top_p, "stop": stop, "seed": seed, "stream": stream,
            "include_usage": bool(isinstance(options, dict) and options.get("include_usage"))}


def read_messages(raw: Any) -> tuple[list[dict], str | None]:
    """OpenAI messages -> ours (role, text) and the one image's URL. The image goes before the text
    of its user turn, as eval_llava.py and training put it; a `<image>` typed by a client is text."""
    if not isinstance(raw, list) or not raw:
        raise HttpError(400, "messages: a non-empty list of {role, content}", param="messages")
    out, image = [], None
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise HttpError(400, f"{where}: role must be system, user or assistant (this model has no tools)",
                            param="messages")
        role, content, texts, has_image = ROLES[m["role"]], m.get("content"), [], False
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if content is None and role == "assistant":
            parts = []
        if not isinstance(parts, list):
            raise HttpError(400, f"{where}.content: a string or a list of text and image_url parts", param="messages")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"].replace(IMAGE_PLACEHOLDER, ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if role != "user" or not isinstance(url, str):
                    raise HttpError(400, f"{where}.content[{j}]: an image_url part goes in a user message, as "
                                         "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", param="messages")
                if image is not None:
                    raise HttpError(400, "one image per conversation: this model was trained with one (start a new "
                                         "conversation for another image)", param="messages")
                image, has_image = url, True
            else:
                raise HttpError(400, f"{where}.content[{j}]: a text or image_url part (type {kind!r} is not supported)",
                                param="messages")
        text = "\n".join(texts)
        out.append({"role": role, "content": f"{IMAGE_PLACEHOLDER}\n{text}" if has_image else text})
    if out[-1]["role"] != "user":
        raise HttpError(400, "the last message must be the user's: this server answers it", param="messages")
    return out, image


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise HttpError(400, f"{key} {value!r}: a number in [{low:g}, {high:g}]", param=key)
    return float(value)


def load_image(url: str, args: argparse.Namespace, draft: int) -> Image.Image:
    """A data: URL (base64) or, unless --no-allow_urls, an http(s) URL fetched as the chat fetches
    one (timeout, retries, byte cap), then the pixel cap and the decompression-bomb guard."""
    max_bytes = int(args.max_image_mb * 2**20)
    if url.startswith("data:"):
        head, comma, data = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise HttpError(400, "image_url: a data URL carries base64 (data:image/png;base64,...)", param="messages")
        if len(data) * 3 // 4 > max_bytes:
            raise HttpError(413, f"image_url: the image is over {args.max_image_mb:g} MB (--max_image_mb)",
                            param="messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "image_url: the data URL's base64 does not decode", param="messages") from None
    elif url.startswith(("http://", "https://")):
        if not args.allow_urls:
            raise HttpError(400, "image_url: this server fetches no URLs (--no-allow_urls); send the image as a "
                                 "data: URL", param="messages")
        try:
            raw = ImageLoader(max_bytes=max_bytes).fetch(url)
        except SampleError as e:
            raise HttpError(400, f"image_url: could not fetch the image ({e.reason}: {e.detail})",
                            param="messages") from None
    else:
        raise HttpError(400, "image_url: a data: URL (base64) or an http(s) URL", param="messages")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the cap below decides
            with Image.open(io.BytesIO(raw)) as header:                       # the header only: no decoding
                width, height = header.size
    except Image.DecompressionBombError:
        width, height = args.max_image_pixels + 1, 1
    except (OSError, ValueError, SyntaxError):
        raise HttpError(400, "image_url: not an image, or a damaged one", param="messages") from None
    if width * height > args.max_image_pixels:
        raise HttpError(400, f"image_url: {width}x{height} is over the server's {args.max_image_pixels:,} pixels "
                             "(--max_image_pixels)", param="messages")
    try:
        return decode_image(raw, draft)
    except SampleError as e:
        raise HttpError(400, f"image_url: not an image, or a damaged one ({e.reason})", param="messages") from None


# --------------------------------------------------------------------------- the app

def build_app(assistant: Assistant, args: argparse.Namespace, key: str | None, name: str) -> FastAPI:
    """GET /v1/models, POST /v1/chat/completions (plain or streamed), GET /health."""
    batcher = Batcher(assistant, args.max_batch_size, args.batch_window_ms / 1000, args.max_queue)
    context = min(getattr(assistant.model.llm.config, "max_position_embeddings", 4096) or 4096, 32768)
    created = int(time.time())

    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)   # every request still waiting is answered first

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.draining = lambda: False       # main() points it at uvicorn's own flag

    def refusal(headers: dict[bytes, bytes]) -> HttpError | None:
        """The drain, the key (when set) and the body cap, before any handler reads the body."""
        if app.state.draining():
            return HttpError(503, "the server is shutting down; retry when it is back", "server_error",
                             code="shutting_down")
        sent = headers.get(b"authorization", b"")
        if key is not None and not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            return HttpError(401, "no valid API key: send the header `Authorization: Bearer <key>` with the key this "
                                  "server was started with", "authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > args.max_body_mb * 2**20:
            return HttpError(413, f"the request body is over {args.max_body_mb:g} MB (--max_body_mb)")
        return None

    app.add_middleware(Guard, refusal=refusal)

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, e: HttpError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, e: StarletteHTTPException):
        what = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return error(HttpError(e.status_code, f"{what}: {request.method} {request.url.path} (this server has "
                                              "GET /v1/models and POST /v1/chat/completions)", code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception):
        console.error(f"{request.method} {request.url.path} failed: {type(e).__name__}: {e}")
        return error(HttpError(500, f"the server failed on this request ({type(e).__name__}); its log says more",
                               "server_error"))

    @app.get("/health")
    async def health():
        return batcher.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name, created)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != name:
            raise HttpError(404, f"model {model_id!r}: this server serves {name!r}", code="model_not_found")
        return model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, int(args.max_body_mb * 2**20))
        question = read_question(body, args)
        image = None
        if question["image"] is not None:
            image = await run_in_threadpool(load_image, question["image"], args, assistant.draft)
        prompt, pixels = await run_in_threadpool(assistant.encode, image, question["messages"])
        max_tokens = question["max_tokens"] or min(args.max_tokens, context - len(prompt))
        if max_tokens < 1 or len(prompt) + max_tokens > context:
            raise HttpError(400, f"the prompt is {len(prompt)} tokens (image slots included); with max_tokens "
                                 f"{max_tokens} that is over the model's context of {context}",
                            param="messages", code="context_length_exceeded")
        job = Job(prompt, pixels, max_tokens, question["temperature"], question["top_p"], question["seed"],
                  question["stop"], question["stream"], asyncio.get_running_loop())
        batcher.submit(job)                        # 429 when the queue is full
        reply_id, made = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if question["stream"]:
            return StreamingResponse(stream_events(job, reply_id, made, name, question["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await job.wait()
        finally:
            job.gone = True                         # a client that left is not generated for
        return {"id": reply_id, "object": "chat.completion", "created": made, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish, "logprobs": None}],
                "usage": usage(job)}

    return app


async def read_body(request: Request, limit: int) -> dict:
    """The JSON body, read no further than `limit` bytes (a chunked body has no Content-Length)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HttpError(413, f"the request body is over {limit / 2**20:g} MB (--max_body_mb)")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


async def stream_events(job: Job, reply_id: str, made: int, name: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format: the role, the text as it grows, the finish
    reason, the usage when asked, then `data: [DONE]`. A client that leaves ends its generation."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": made, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in job.pieces():
            yield chunk({"content": piece})
        yield chunk({}, job.finish)
        if include_usage:
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": made, "model": name,
                    "choices": [], "usage": usage(job)}
            yield f"data: {json.dumps(body)}\n\n"
    except HttpError as e:           # the model failed mid-stream: the error as OpenAI streams one
        yield f"data: {json.dumps(error_body(e))}\n\n"
    finally:
        job.gone = True
    yield "data: [DONE]\n\n"


def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.ids),
            "total_tokens": len(job.prompt) + len(job.ids)}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llava-toolkit"}


def error_body(e: HttpError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def error(e: HttpError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: /v1 requests that `refusal` turns away get its error and never reach a handler."""

    def __init__(self, app: Any, refusal: Any):
        self.app, self.refusal = app, refusal

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            refused = self.refusal(dict(scope["headers"]))
            if refused is not None:
                await error(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- the command line

class Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does (port 0: the port it was given), and
    telling the batcher when it drains (SIGTERM, Ctrl-C): uvicorn stops accepting, answers what is
    in flight, then stops the app."""

    def __init__(self, config: uvicorn.Config, name: str, batcher: Batcher):
        super().__init__(config)
        self.name, self.batcher = name, batcher

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.batcher.drain()
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            console.success(f"serving {self.name} at http://{host}:{port}/v1")


def check_port(host: str, port: int) -> None:
    """A port in use is one line before the model loads, not a bind error after it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port (0: any free one)") \
                from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint), a step folder, or a "
                                                       "projector.safetensors: any stage")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the "
                                                       "model to your network (printed with a warning)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument("--model_name", default=None, help="the model id clients see (default: the run's name)")
    p.add_argument("--api_key_env", default=None, help="require `Authorization: Bearer <key>`, the key read from "
                                                       "this environment variable (never printed or logged)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--vision_tower", default=None, help="override the tower path stored in the checkpoint")
    p.add_argument("--llm", default=None, help="override the LLM path stored in the checkpoint")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model folders to run their own code")
    g = p.add_argument_group("generation and batching")
    g.add_argument("--max_tokens", type=int, default=512, help="reply length cap: a request asking for more gets this "
                                                               "many; one asking for none, as many as fit the context "
                                                               "up to this")
    g.add_argument("--max_batch_size", type=int, default=8, help="requests generated together at most")
    g.add_argument("--batch_window_ms", type=float, default=10.0, help="how long an idle server waits after a "
                                                                       "request for others to batch with it")
    l = p.add_argument_group("limits")
    l.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond this get 429")
    l.add_argument("--max_body_mb", type=float, default=20.0, help="request body cap (413 above)")
    l.add_argument("--max_image_mb", type=float, default=10.0, help="image cap in bytes, data: or fetched (413 above)")
    l.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="decoded pixels cap (400 above); training's decompression-bomb guard by default")
    l.add_argument("--allow_urls", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch http(s) image URLs (as the chat does: timeout, retries, byte cap); --no-allow_urls "
                        "takes data: URLs only")
    args = p.parse_args(argv)
    for flag in ("max_tokens", "max_batch_size", "max_queue", "max_image_pixels"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    for flag in ("max_body_mb", "max_image_mb", "batch_window_ms"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: 0-65535")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console.set_stream(sys.stderr)         # every line of the server's log on one stream, with uvicorn's
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise SystemExit(f"--api_key_env {args.api_key_env}: that environment variable is not set "
                             f"(export {args.api_key_env}=<the key clients will send>)")
    try:
        meta = read_checkpoint_meta(args.checkpoint)      # a wrong path costs nothing: before the model loads
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    check_port(args.host, args.port)
    console.quiet_library_bars()
    device = pick_device(args.device)
    console.info(f"loading {args.checkpoint} on {device} ...")
    assistant = Assistant.from_checkpoint(args.checkpoint, str(device), args.vision_tower, args.llm,
                                          args.trust_remote_code)
    name = args.model_name or meta.get("run") or os.path.basename(os.path.abspath(assistant.source))
    console.info(assistant.description().replace("  \n", "\n"))
    if args.host not in LOOPBACK:
        console.warn(f"--host {args.host}: the model is reachable from other machines" +
                     ("" if key else "; anyone who can reach it can use it (--api_key_env requires a key)") +
                     ("; it fetches the image URLs clients send (--no-allow_urls stops that)" if args.allow_urls else ""))
    app = build_app(assistant, args, key, name)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=True,
                                   timeout_graceful_shutdown=None), name, app.state.batcher)
    app.state.draining = lambda: server.should_exit
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler makes that
    # a clean exit (0), not a death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    console.info("stopped: every request in flight was answered")


if __name__ == "__main__":
    main()
    sys.exit(0)
