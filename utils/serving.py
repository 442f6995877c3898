"""Batched generation behind serve_api.py: requests that arrive together become one left-padded
batch through the model's own generate (assistant.Assistant.generate, the benchmarks' path).

One worker thread owns the model. When it is free it takes the requests waiting that share their
sampling settings (greedy ones always batch; sampled ones batch by temperature and top_p; one with a
seed is generated alone, so that the same seed gives the same reply whatever else was asked), up to
--max_batch_size, after waiting --batch_window_ms for others to arrive when it was idle. Every step
of a batch, each row's new token is checked against its own limit and stop strings and streamed to
its client; the batch ends when every row is done (a row that is done early is cut, not waited for).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from utils import console


class HttpError(Exception):
    """A request refused or failed, as OpenAI reports one: a status, a message a person
    understands, the error's type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


@dataclass
class Job:
    """One request on its way through the worker; the event loop of its handler hears of it."""

    prompt: list[int]                 # prompt ids, image slots included
    pixels: np.ndarray | None         # [3, H, W]; None: a text-only question
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop
    ids: list[int] = field(default_factory=list)     # reply tokens so far (stop token excluded)
    text: str = ""                    # the final reply (set when done)
    finish: str = "stop"              # stop | length
    done: bool = False
    gone: bool = False                # the client left: generate no further for it
    sent: str = ""                    # streamed so far (always a prefix of `text`)
    arrived: float = 0.0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def key(self) -> tuple:
        """Requests with equal keys may share a batch (generate takes one temperature and top_p)."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.temperature, self.top_p)

    def tell(self, kind: str, payload: Any = None) -> None:
        """From the worker thread to the handler's event loop (a closed loop: the client is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            self.gone = True

    async def wait(self) -> None:
        """Until the reply is whole (HttpError if the model failed)."""
        async for _ in self.pieces():
            pass

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's new text as it is generated (one piece when not streaming)."""
        while True:
            kind, payload = await self.events.get()
            if kind == "end":
                return
            if kind == "error":
                raise payload
            yield payload


class Batcher:
    """The worker thread, its queue, and the text of each row as it grows (module docstring)."""

    def __init__(self, assistant: Any, max_batch: int, window_s: float, max_queue: int):
        self.assistant, self.max_batch, self.window, self.max_queue = assistant, max_batch, window_s, max_queue
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.running = 0
        self.draining = False         # the server stops taking requests: no batch waits for more
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def drain(self) -> None:
        """No request will arrive any more: what waits is generated at once, not after the window."""
        with self.cond:
            self.draining = True
            self.cond.notify_all()

    def close(self) -> None:
        """Answer every request still waiting, then stop the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise HttpError(429, f"the server is busy: {len(self.pending)} requests are waiting already "
                                     "(--max_queue); retry in a moment", "rate_limit_error", code="rate_limit_exceeded",
                                headers={"Retry-After": "1"})
            job.arrived = time.monotonic()
            self.pending.append(job)
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"status": "draining" if self.draining else "ok", "waiting": len(self.pending),
                    "generating": self.running}

    # ---- the worker thread

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest request and those waiting with its key, once the batch is
        full or the window since it arrived has passed. None when closing with nothing left."""
        with self.cond:
            self.running = 0
            while not self.pending:
                if self.closing:
                    return None
                self.cond.wait()
            first = self.pending[0]
            while True:
                batch = [j for j in self.pending if j.key == first.key][:self.max_batch]
                left = first.arrived + self.window - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self.draining or self.closing:
                    break
                self.cond.wait(left)
            for j in batch:
                self.pending.remove(j)
            self.running = len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            left = [j for j in batch if j.gone]
            if left:
                console.info(f"{len(left)} request(s) dropped: the client left before generation began")
            if len(left) < len(batch):
                self._generate([j for j in batch if not j.gone])

    def _generate(self, batch: list[Job]) -> None:
        started = time.monotonic()
        first = batch[0]
        if first.seed is not None and first.temperature > 0:
            torch.manual_seed(first.seed)
        rows = Rows(self.assistant, batch)
        try:
            self.assistant.generate([(j.prompt, j.pixels) for j in batch], max(j.max_tokens for j in batch),
                                    first.temperature, first.top_p, streamer=rows, stop=rows)
        except Exception as e:  # noqa: BLE001 - every client gets the error; the server keeps serving
            console.error(f"generation failed for a batch of {len(batch)}: {type(e).__name__}: {e}\n"
                          + traceback.format_exc())
            for j in batch:
                j.tell("error", HttpError(500, f"the model failed to answer ({type(e).__name__}); the server's log "
                                               "says more", "server_error"))
            return
        for j in batch:
            rows.finish(j, "length" if len(j.ids) >= j.max_tokens else "stop")
        tokens = sum(len(j.ids) for j in batch)
        console.info(f"batch of {len(batch)}: {tokens} tokens in {time.monotonic() - started:.2f}s")


class Rows:
    """The streamer and stop signal of one batch (LlavaModel.generate's `streamer` and `stop`):
    every step's new tokens go to their rows; `is_set` ends the batch once every row is done."""

    def __init__(self, assistant: Any, batch: list[Job]):
        self.assistant, self.batch = assistant, batch
        self.stop_ids = set(assistant.fmt.stop_ids)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:      # generate's first put is the prompt ([B, 0] with input embeddings)
            self.prompt_seen = True
            return
        for job, token in zip(self.batch, value.reshape(-1).tolist()):
            if job.done:
                continue
            if job.gone:
                self.finish(job, "stop")
            elif token in self.stop_ids:
                self.finish(job, "stop")
            else:
                job.ids.append(token)
                self.grow(job)

    def end(self) -> None:
        pass

    def is_set(self) -> bool:
        return all(j.done for j in self.batch)

    def grow(self, job: Job) -> None:
        """A row's new token: its stop strings, its limit, and the text that may be streamed."""
        text = self.assistant.tokenizer.decode(job.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish(job, "stop", text[:cut])
        elif len(job.ids) >= job.max_tokens:
            self.finish(job, "length")
        elif job.stream:
            self.send(job, held_back(text, job.stops))

    def finish(self, job: Job, reason: str, text: str | None = None) -> None:
        if job.done:
            return
        job.done, job.finish = True, reason
        # The reply as every caller shows it (Assistant.decode: stripped), unless a stop string cut it.
        job.text = self.assistant.decode(job.ids) if text is None else text
        self.send(job, job.text)
        job.tell("end")

    @staticmethod
    def send(job: Job, safe: str) -> None:
        if safe.startswith(job.sent) and len(safe) > len(job.sent):
            piece, job.sent = safe[len(job.sent):], safe
            job.tell("piece", piece)


def held_back(text: str, stops: list[str]) -> str:
    """The part of a growing reply that is sure to stay: without trailing whitespace (the reply is
    stripped), an incomplete character (a byte-level token mid UTF-8) or the start of a stop string."""
    text = text.rstrip()
    if text.endswith("\ufffd"):
        return text.rstrip("\ufffd").rstrip()
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return text[:-k].rstrip()
    return text
