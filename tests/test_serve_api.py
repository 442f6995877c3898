"""serve_api.py: an OpenAI-compatible server over Assistant. The request checks run in-process;
the rest against real server processes on 127.0.0.1, driven by the official `openai` package: a
stage-1 checkpoint of the course recipe (the toy world's) and a stage-3 LoRA checkpoint answer
greedily as `eval_llava.py --image --prompt` does, token for token; streamed and plain replies
agree; 8 clients at once are one batch; the bench through the server scores as the local bench;
401, 400, 413 and 429 come in OpenAI's error shape; SIGTERM answers what is in flight and exits 0."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

import eval_llava
import serve_api
from tests.conftest import ROOT, train_argv
from utils import console
from utils.serving import HttpError, held_back

KEY = "sk-serve-7c41d09e"
PROMPT = "描述这张图片"


# --------------------------------------------------------------------------- requests, checked in-process

def data_url(path_or_image, fmt: str = "PNG") -> str:
    if isinstance(path_or_image, str):
        with open(path_or_image, "rb") as fh:
            raw = fh.read()
    else:
        buf = io.BytesIO()
        path_or_image.save(buf, format=fmt)
        raw = buf.getvalue()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()


def ask(url: str | None, text: str = PROMPT, image_last: bool = False) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        image = {"type": "image_url", "image_url": {"url": url}}
        parts = parts + [image] if image_last else [image] + parts
    return [{"role": "user", "content": parts}]


def limits(**kw) -> argparse.Namespace:
    return serve_api.parse_args(["--checkpoint", "x", *[f"--{k}={v}" for k, v in kw.items()]])


def test_messages_become_the_prompt_eval_llava_builds():
    """The image goes before its turn's text (as eval_llava.py and training put it), wherever the
    client put the part; a client's own `<image>` is text; developer is system."""
    for image_last in (False, True):
        messages, image = serve_api.read_messages(ask("data:x", image_last=image_last))
        assert messages == [{"role": "user", "content": f"<image>\n{PROMPT}"}] and image == "data:x"
    messages, image = serve_api.read_messages([{"role": "developer", "content": "短一点"},
                                               {"role": "user", "content": "<image>你好"}])
    assert messages == [{"role": "system", "content": "短一点"}, {"role": "user", "content": "你好"}] and image is None
    refused = {"two images": ask("data:a") + [{"role": "assistant", "content": "好"}] + ask("data:b"),
               "the last turn is the model's": ask("data:a") + [{"role": "assistant", "content": "好"}],
               "a tool": [{"role": "tool", "content": "x"}],
               "audio": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
               "an image from the assistant": [{"role": "assistant", "content": [
                   {"type": "image_url", "image_url": {"url": "data:a"}}]}, {"role": "user", "content": "hi"}]}
    for why, raw in refused.items():
        with pytest.raises(HttpError) as e:
            serve_api.read_messages(raw)
        assert e.value.status == 400 and e.value.param == "messages", why


def test_settings_are_checked_and_none_is_dropped_silently():
    args = limits(max_tokens=64)
    q = serve_api.read_question({"messages": ask(None)}, args)
    assert (q["max_tokens"], q["temperature"], q["top_p"], q["stop"], q["stream"]) == (None, 0.0, 1.0, [], False)
    q = serve_api.read_question({"messages": ask(None), "max_tokens": 1000, "stop": "。", "seed": 3, "n": 1,
                                 "user": "u1", "stream": True, "stream_options": {"include_usage": True}}, args)
    assert (q["max_tokens"], q["stop"], q["seed"], q["include_usage"]) == (64, ["。"], 3, True)   # capped
    for bad, param in [({"n": 2}, "n"), ({"stop": ["a"] * 5}, "stop"), ({"temperature": 2.5}, "temperature"),
                       ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                       ({"seed": 1.5}, "seed"), ({"logprobs": True}, "logprobs"), ({"tools": [{"x": 1}]}, "tools"),
                       ({"frequency_penalty": 0.5}, "frequency_penalty")]:
        with pytest.raises(HttpError) as e:
            serve_api.read_question({"messages": ask(None), **bad}, args)
        assert e.value.status == 400 and e.value.param == param, bad
    assert "send 2 requests instead" in str(pytest.raises(HttpError, serve_api.read_question,
                                                          {"messages": ask(None), "n": 2}, args).value)


def test_a_growing_reply_holds_back_what_may_still_change():
    assert held_back("左边有一个 ", []) == "左边有一个"                 # the reply is stripped at the end
    assert held_back("左边有一\ufffd", []) == "左边有一"                # half a character
    assert held_back("左边有一个红", ["红色"]) == "左边有一个"          # maybe the start of a stop string
    assert held_back("左边有一个红", ["蓝色"]) == "左边有一个红"


def test_images_are_capped_in_bytes_and_pixels_and_urls_can_be_refused():
    args = limits(max_image_pixels=5000, max_image_mb=0.01)
    small = Image.new("RGB", (40, 40), (255, 0, 0))
    assert serve_api.load_image(data_url(small), args, draft=16).size == (40, 40)
    cases = {data_url(Image.new("RGB", (100, 100))): (400, "100x100 is over the server's 5,000 pixels"),
             data_url(Image.effect_noise((120, 120), 50).convert("RGB"), "BMP"): (413, "over 0.01 MB"),
             "data:image/png;base64,@@@": (400, "does not decode"),
             "data:image/png," + "abc": (400, "carries base64"),
             "data:image/png;base64," + base64.b64encode(b"not an image").decode(): (400, "not an image"),
             "file:///etc/passwd": (400, "a data: URL (base64) or an http(s) URL")}
    for url, (status, said) in cases.items():
        with pytest.raises(HttpError) as e:
            serve_api.load_image(url, args, draft=16)
        assert e.value.status == status and said in e.value.message, (url[:40], e.value.message)
    # the decompression-bomb guard of training, by default: 12,000 x 12,000 is refused from its header
    bomb = data_url(Image.new("1", (12000, 12000)))
    with pytest.raises(HttpError, match="over the server's 100,000,000 pixels"):
        serve_api.load_image(bomb, limits(), draft=16)
    with pytest.raises(HttpError, match="fetches no URLs"):
        serve_api.load_image("http://127.0.0.1:9/x.png", serve_api.parse_args(["--checkpoint", "x",
                                                                                "--no-allow_urls"]), draft=16)


# --------------------------------------------------------------------------- a real server

class Served:
    """serve_api.py in a process of its own on a free port (--port 0); its log collected line by
    line, so a test waits for a line instead of sleeping."""

    def __init__(self, *argv: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "serve_api.py", "--port", "0", "--device", "cpu", *argv],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for("serving ")
        self.base = re.search(r" at (http://\S+/v1)", line).group(1)
        self.port = int(self.base.rsplit(":", 1)[1].split("/")[0])

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<exit>")
            self.cond.notify_all()

    def wait_for(self, text: str, timeout: float = 180, nth: int = 1) -> str:
        """The nth line holding `text`, once the server has logged it (or an assertion, if it exits first)."""
        def hits() -> list[str]:
            return [ln for ln in self.lines if text in ln]

        with self.cond:
            self.cond.wait_for(lambda: len(hits()) >= nth or "<exit>" in self.lines, timeout)
            found = hits()
        assert len(found) >= nth, f"no line {nth} with {text!r} in the server's log:\n" + self.log[-3000:]
        return found[nth - 1]

    @property
    def log(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=120)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def course_stage1(toy, tmp_path_factory):
    """A stage-1 checkpoint of the course recipe (ln_post on every token) on the trained toy world:
    its replies are captions that depend on the image, so equality means something."""
    import train_stage1

    out = tmp_path_factory.mktemp("course")
    return train_stage1.main(train_argv(toy, out, "course_s1", 4, "--feature_post_norm"))["checkpoint"]


def eval_llava_reply(checkpoint: str, image: str, prompt: str, capsys) -> str:
    """What `eval_llava.py --checkpoint C --image I --prompt P` prints (run in-process)."""
    capsys.readouterr()
    try:
        eval_llava.main(["--checkpoint", checkpoint, "--image", image, "--prompt", prompt, "--device", "cpu"])
    finally:
        console.set_stream(None)
    return capsys.readouterr().out.rstrip("\n")


def toy_images(world, n: int) -> list[str]:
    folder = os.path.join(world.eval, "images")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:n]]


def sse_events(base: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed reply, read raw (the openai client hides [DONE])."""
    with httpx.stream("POST", base + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


@pytest.mark.slow   # a server process, the bench twice
def test_a_stage1_course_checkpoint_answers_as_eval_llava_plain_streamed_batched_and_on_the_bench(
        toy, course_stage1, tmp_path, capsys, monkeypatch):
    from toy_instructions import ensure_instruction_data

    monkeypatch.setenv("SERVE_TEST_KEY", "unused")     # eval_llava's API client sends a key; this server wants none

    server = Served("--checkpoint", course_stage1)
    try:
        client = server.client()
        assert [m.id for m in client.models.list()] == ["course_s1"]
        images = toy_images(toy, 8)
        expected = [eval_llava_reply(course_stage1, img, PROMPT, capsys) for img in images]
        assert len(set(expected)) > 1 and all(expected), expected      # captions that follow the image

        plain = client.chat.completions.create(model="course_s1", messages=ask(data_url(images[1])), max_tokens=256,
                                               temperature=0)
        assert plain.choices[0].message.content == expected[1]
        assert plain.choices[0].finish_reason == "stop" and plain.object == "chat.completion"
        u = plain.usage
        assert u.completion_tokens > 0 and u.prompt_tokens > 17 and u.total_tokens == u.prompt_tokens + u.completion_tokens

        pieces, usage = [], None
        for chunk in client.chat.completions.create(model="course_s1", messages=ask(data_url(images[1])), stream=True,
                                                    max_tokens=256, stream_options={"include_usage": True}):
            pieces += [c.delta.content for c in chunk.choices if c.delta.content]
            usage = chunk.usage or usage
        assert "".join(pieces) == expected[1] and len(pieces) > 1 and usage == u

        raw = sse_events(server.base, {"model": "x", "messages": ask(data_url(images[1])), "stream": True,
                                       "max_tokens": 3})
        assert raw[-1] == "[DONE]"
        chunks = [json.loads(e) for e in raw[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"    # 3 tokens: cut by max_tokens

        # A stop string is cut off, streamed or not; streamed text never runs past it (its start is held back
        # until the next token shows whether the stop string follows).
        for stop in (["的"], ["色的", "圆形"]):
            cut = min((expected[1].find(x) for x in stop if x in expected[1]), default=len(expected[1]))
            stopped = client.chat.completions.create(model="x", messages=ask(data_url(images[1])), stop=stop)
            assert stopped.choices[0].message.content == expected[1][:cut] and cut < len(expected[1])
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="x", messages=ask(data_url(images[1])), stop=stop, stream=True) if c.choices)
            assert streamed == expected[1][:cut], (stop, streamed)

        # 8 clients at once: all answered, as each is alone, and batched
        got: dict[int, object] = {}

        def one(k: int) -> None:
            try:
                got[k] = client.chat.completions.create(model="x", messages=ask(data_url(images[k])),
                                                        temperature=0).choices[0].message.content
            except Exception as e:  # noqa: BLE001 - the assertion below shows it
                got[k] = e

        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got.get(k) for k in range(8)] == expected
        assert max(int(n) for n in re.findall(r"batch of (\d+):", server.log)) > 1

        # The toy MMBench and POPE through our own server score as the local bench, answer for answer.
        data = ensure_instruction_data(toy, "test", log=lambda *a: None)
        replies: set = set()
        for name in ("toy_MMBench_EN", "toy_POPE"):
            tsv = os.path.join(data.bench, f"{name}.tsv")
            eval_llava.main(["--api_base", server.base, "--api_model", "course_s1", "--api_key_env", "SERVE_TEST_KEY",
                             "--bench", tsv, "--out_dir", str(tmp_path / "api")])
            eval_llava.main(["--checkpoint", course_stage1, "--bench", tsv, "--out_dir", str(tmp_path / "local"),
                             "--device", "cpu"])
            console.set_stream(None)
            api, local = (json.loads((tmp_path / d / f"{name}_scores.json").read_text()) for d in ("api", "local"))
            drop = ("model", "file")
            assert {k: v for k, v in api.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}
            answers = [[json.loads(ln) for ln in (tmp_path / d / f"{name}_predictions.jsonl").read_text().splitlines()[1:]]
                       for d in ("api", "local")]
            assert sorted(answers[0], key=lambda r: r["index"]) == sorted(answers[1], key=lambda r: r["index"])
            replies |= {r.get("prediction") for r in answers[0]}
        assert len(replies) > 2, replies        # answers that follow the image and the question
    finally:
        server.close()
    assert server.proc.returncode == 0, server.log[-2000:]


@pytest.mark.slow   # a server process
def test_a_stage3_lora_checkpoint_with_a_key_and_limits(chain, tiny, tmp_path, capsys):
    _, _, _, _, s3 = chain
    server = Served("--checkpoint", s3, "--api_key_env", "SERVE_KEY", "--max_body_mb", "0.5",
                    "--max_image_pixels", "10000", "--batch_window_ms", "3000", "--max_batch_size", "8",
                    env={"SERVE_KEY": KEY})
    try:
        image = toy_images(tiny, 1)[0]
        expected = eval_llava_reply(s3, image, PROMPT, capsys)
        assert expected
        client = server.client(KEY)
        reply = client.chat.completions.create(model="x", messages=ask(data_url(image)), max_tokens=256, temperature=0)
        assert reply.choices[0].message.content == expected

        for key in ("unused", KEY + "x"):      # no key, a wrong key: 401 in OpenAI's shape
            with pytest.raises(openai.AuthenticationError) as e:
                server.client(key).chat.completions.create(model="x", messages=ask(data_url(image)))
            assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
            assert "Authorization: Bearer" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            server.client("unused").models.list()

        for bad, said in [({"n": 2}, "one choice per request"),
                          ({"messages": ask(data_url(Image.new("RGB", (200, 200))))}, "200x200 is over"),
                          ({"messages": ask(data_url(image)) + ask(data_url(image))}, "one image per conversation")]:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**{"model": "x", "messages": ask(data_url(image)), **bad})
            assert e.value.status_code == 400 and said in e.value.body["message"], e.value.body
            assert e.value.body["type"] == "invalid_request_error" and "Traceback" not in str(e.value.body)
        with pytest.raises(openai.APIStatusError) as e:          # over --max_body_mb
            client.chat.completions.create(model="x", messages=ask(None, "字" * 300_000))
        assert e.value.status_code == 413 and "--max_body_mb" in e.value.body["message"]
        r = httpx.get(server.base.replace("/v1", "/v2/nothing"))
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("no such endpoint")

        # A client that leaves mid-stream ends its generation (this model would go on to max_tokens).
        with httpx.stream("POST", server.base + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "x", "messages": ask(data_url(image)), "stream": True, "max_tokens": 400},
                          timeout=120) as r:
            for line in r.iter_lines():                            # until the first text: generating, then gone
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
        left = int(re.search(r"batch of 1: (\d+) tokens", server.wait_for("batch of 1: ", nth=2)).group(1))
        assert left < 400, server.log[-1000:]

        # 8 clients at once: one left-padded batch (the window waits for them), all answered alike
        got: dict[int, object] = {}

        def one(k: int) -> None:
            try:
                got[k] = client.chat.completions.create(model="x", messages=ask(data_url(image)), max_tokens=256,
                                                        temperature=0).choices[0].message.content
            except Exception as e:  # noqa: BLE001 - the assertion below shows it
                got[k] = e

        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got.get(k) for k in range(8)] == [expected] * 8
        server.wait_for("batch of 8:")
    finally:
        server.close()
    assert server.proc.returncode == 0 and KEY not in server.log


@pytest.mark.slow   # a server process
def test_a_full_queue_is_429_and_sigterm_answers_what_is_in_flight_then_exits_0(chain):
    _, _, s1, _, _ = chain
    # The window holds the first requests in the queue (nothing else will come to batch with them).
    server = Served("--checkpoint", s1, "--max_queue", "2", "--batch_window_ms", "600000")
    client = server.client()
    got: dict[int, object] = {}

    def one(k: int) -> None:
        try:
            got[k] = client.chat.completions.create(model="x", messages=ask(None, "你好"), max_tokens=4)
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            got[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while httpx.get(server.base.replace("/v1", "/health")).json()["waiting"] < 2:
            assert time.monotonic() < deadline, server.log[-2000:]
            time.sleep(0.02)        # polling the server's own count: the wait ends on the condition
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="x", messages=ask(None, "你好"), max_tokens=4)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "rate_limit_exceeded" and "--max_queue" in e.value.body["message"]

        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("Shutting down")      # uvicorn closes the listening socket right after this line
        try:                                  # no new request gets in: refused, or (a hair earlier) told 503
            late = httpx.get(server.base + "/models", timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        # Answered at once: nothing new can join their batch, so the 10-minute window is not waited out.
        for t in threads:
            t.join(120)
        assert server.proc.wait(120) == 0, server.log[-2000:]
    finally:
        server.close()
    assert all(isinstance(got[k], openai.types.chat.ChatCompletion) for k in range(2)), got   # both answered
    assert "batch of 2:" in server.log and "Traceback" not in server.log
