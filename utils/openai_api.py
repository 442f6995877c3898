"""A reference model behind an OpenAI-compatible `/chat/completions` API, answering the same
questions as ours (eval_llava.py --api_base ..., web_demo.py --api_base ...), so students can
compare their model with a strong one on the same images and the same metrics.

The key comes from an environment variable (never a flag, never a file of ours) and is never
printed, logged or saved: every message this module produces has it masked. Images travel as
data URLs (JPEG). Timeouts, HTTP errors, rate limits (429: retried after Retry-After or a
doubling backoff) and malformed responses become an ApiError with a readable reason; callers
turn it into a chat message or a counted failure, never a crash.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from PIL import Image


class ApiError(Exception):
    """A request that did not produce an answer; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def image_data_url(image: Image.Image, max_side: int = 1024, quality: int = 90) -> str:
    """A JPEG data URL, the longer side capped at `max_side` (APIs bill and limit by pixels)."""
    img = image.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def api_messages(image: Image.Image | str | None, messages: list[dict], placeholder: str = "<image>") -> list[dict]:
    """Our chat messages (the first user turn carries the image) in the API's multimodal form. The
    text is sent as our model reads it, placeholder aside: VLMEvalKit's prompts end in " \n", and
    stripping that made an API model answer another prompt than ours."""
    out, sent = [], False
    for m in messages:
        text = m["content"].replace(placeholder + "\n", "").replace(placeholder, "")
        if m["role"] == "user" and image is not None and not sent:
            url = image if isinstance(image, str) else image_data_url(image)   # a str: a data URL made already
            out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": text}]})
            sent = True
        else:
            out.append({"role": m["role"], "content": text})
    return out


@dataclass
class ChatApi:
    """POST {base}/chat/completions. `key_env` names the environment variable holding the key."""

    base: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 4             # extra attempts after a 429, a 5xx or a timeout
    backoff: float = 1.0         # seconds before the first retry, doubling after
    max_wait: float = 30.0       # a Retry-After longer than this is cut to it
    sleep: object = field(default=time.sleep, repr=False)

    def __post_init__(self):
        if not self.base.startswith(("http://", "https://")):
            raise ValueError(f"--api_base {self.base!r}: an http(s) URL, e.g. https://api.openai.com/v1")
        self._key = os.environ.get(self.key_env, "")
        if not self._key:
            raise ValueError(f"the API key is read from the environment variable {self.key_env}, which is not set "
                             f"(export {self.key_env}=...; --api_key_env names another variable)")

    def _mask(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0) -> str:
        """The reply text, or ApiError after the retries."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "top_p": top_p, "stream": False}).encode()
        url = self.base.rstrip("/") + "/chat/completions"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            req = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read(16 * 2**20)
                return self._reply(raw)
            except urllib.error.HTTPError as e:
                detail = self._mask(e.read(2000).decode("utf-8", "replace").strip())
                if e.code == 429 or e.code >= 500:
                    if last:
                        raise ApiError("rate_limited" if e.code == 429 else f"http_{e.code}", detail[:300]) from None
                    wait = _retry_after(e.headers.get("Retry-After"), delay, self.max_wait)
                    self.sleep(wait)
                    delay *= 2
                    continue
                raise ApiError(f"http_{e.code}", detail[:300]) from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                if last:
                    reason = "timeout" if "timed out" in str(e) else "connection"
                    raise ApiError(reason, self._mask(str(getattr(e, "reason", e)))[:300]) from None
                self.sleep(delay)
                delay *= 2
        raise ApiError("no_reply")  # not reached: the last attempt returns or raises

    def _reply(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ApiError("malformed_response", self._mask(raw[:200].decode("utf-8", "replace"))) from None
        if isinstance(content, list):  # some servers answer in parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ApiError("malformed_response", f"content is {type(content).__name__}")
        return content.strip()


def _retry_after(header: str | None, default: float, cap: float) -> float:
    try:
        return min(max(float(header), 0.0), cap) if header is not None else default
    except ValueError:
        return default
