"""eval_llava.py --api_base: the same chat, one-shot and batch scoring against a reference model
behind an OpenAI-compatible API, here a fake one on 127.0.0.1. Rate limits are retried, server
errors and malformed bodies are counted failures (never a crash), and the key never appears in
any output, log or file."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import eval_llava
from utils import console
from assistant import ApiAssistant
from utils.openai_api import ApiError, ChatApi

KEY = "sk-test-4f1e9c0d2b7a"


class FakeApi:
    """Answers `/chat/completions` from a script of responses (status, body, headers), then
    from `answer(question)`; records every request."""

    def __init__(self):
        self.script: list[tuple[int, str, dict]] = []
        self.requests: list[dict] = []
        self.answer = lambda q: {"什么颜色？": "红色", "什么形状？": "圆形"}.get(q, "左边有一个红色的圆形。")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if fake.script:
                    status, text, headers = fake.script.pop(0)
                else:
                    question = body["messages"][-1]["content"]
                    if isinstance(question, list):
                        question = next(p["text"] for p in question if p["type"] == "text")
                    status, text, headers = 200, json.dumps({"choices": [{"message": {
                        "role": "assistant", "content": fake.answer(question)}}]}, ensure_ascii=False), {}
                data = text.encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()  # a quick shutdown


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("REF_KEY", KEY)
    fake = FakeApi()
    yield fake
    fake.server.shutdown()


def run(argv, capsys) -> tuple[str, str]:
    try:
        eval_llava.main(argv)
    finally:
        console.set_stream(None)
    out = capsys.readouterr()
    return out.out, out.err


def api_args(api) -> list[str]:
    return ["--api_base", api.base, "--api_model", "ref-vl", "--api_key_env", "REF_KEY", "--api_timeout", "5"]


def test_one_shot_sends_the_image_as_a_data_url_with_the_key_from_the_environment(api, tmp_path, capsys):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    out, err = run([*api_args(api), "--image", str(tmp_path / "a.png"), "--prompt", "什么颜色？"], capsys)
    assert out.strip() == "红色"
    req = api.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    parts = req["body"]["messages"][0]["content"]
    # the file as it is (a PNG stays a PNG: re-encoding changes pixels), and the question
    png = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + png and parts[1]["text"] == "什么颜色？"
    assert req["body"]["model"] == "ref-vl"
    assert KEY not in out + err


def test_chat_keeps_the_history_and_survives_a_failed_request(api, tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    assistant = ApiAssistant(ChatApi(api.base, "ref-vl", "REF_KEY", retries=0))
    api.script = [(200, "not json at all", {})]           # the first answer is malformed
    typed = f"{tmp_path / 'a.png'}\n什么颜色？\n什么颜色？\n什么形状？\nexit\n"
    eval_llava.chat(assistant, {"max_new_tokens": 8}, stdin=io.StringIO(typed))
    out, err = capsys.readouterr()
    assert "malformed_response" in out + err and "红色" in out and "圆形" in out
    last = api.requests[-1]["body"]["messages"]     # the failed question left no trace in the history
    assert [m["role"] for m in last] == ["user", "assistant", "user"] and last[1]["content"] == "红色"


def test_batch_vqa_is_scored_and_rate_limits_are_retried_failures_counted(api, tmp_path, capsys):
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    records = [{"id": str(i), "image": f"{i}.png", "question_id": i, "answer_type": "other",
                "answers": ["红色"] * 10,
                "conversations": [{"from": "human", "value": "<image>\n什么颜色？"}, {"from": "gpt", "value": "红色"}]}
               for i in range(4)]
    (tmp_path / "val.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    api.script = [(429, '{"error": "slow down"}', {"Retry-After": "0"}),          # retried: question 0 answered
                  *[(500, f'{{"error": "boom {KEY}"}}', {"Retry-After": "0"})] * 5,  # question 1: fails after retries
                  (200, '{"choices": []}', {})]                                     # question 2: malformed
    out, err = run([*api_args(api), "--vqa", str(tmp_path / "val.json"), "--out_dir", str(tmp_path / "out")], capsys)
    scores = json.loads(out)
    assert scores["overall"] == pytest.approx(50.0)            # 2 of 4 answered, both right
    assert scores["skipped_images"] == {"api_http_500": 1, "api_malformed_response": 1}
    files = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir())
    assert KEY not in out + err + files                         # not even when a server echoes it


def test_missing_key_or_bad_base_is_one_clear_line(api, monkeypatch, capsys):
    monkeypatch.delenv("REF_KEY")
    with pytest.raises(SystemExit) as stop:     # before the image is even looked at
        eval_llava.main([*api_args(api), "--image", "x.png", "--prompt", "q"])
    assert stop.value.code == 2 and "REF_KEY" in capsys.readouterr().err
    with pytest.raises(ValueError, match="http"):
        ChatApi("ftp://x", "m", "PATH")
    with pytest.raises(ApiError, match="connection"):
        monkeypatch.setenv("REF_KEY", KEY)
        ChatApi("http://127.0.0.1:9/v1", "m", "REF_KEY", retries=0, timeout=2).complete([])
