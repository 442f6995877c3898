"""web_demo.py as a user meets it: a real server in a subprocess on 127.0.0.1, driven by
gradio_client (the real client library). Same greedy text as eval_llava's one-shot, history in
follow-ups, five clients at once, every bad input answered with a message while the server keeps
serving, a client that leaves mid-stream, and nothing listening beyond the loopback address."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow   # a Gradio server in a subprocess: ~10 s to start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc, url: str, timeout: float = 120) -> None:
    """Poll for the page (the event we need), not for a fixed time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "web_demo.py exited:\n" + (
            "".join(proc.lines) if hasattr(proc, "lines") else proc.stdout.read())[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2).read(1)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the page never came up")


@pytest.fixture(scope="module")
def checkpoint(toy, tmp_path_factory):
    """The trained toy world's towers under a random projector: it says something (the untrained
    `tiny` LM only repeats a newline, which strips to '', and '' == '' compares nothing)."""
    from checkpoint_io import build_model, save_checkpoint

    from model import ModelSpec
    torch.manual_seed(0)
    model, _ = build_model(ModelSpec(vision_tower=toy.vision, llm=toy.llm))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("web_ckpt")
    save_checkpoint(model, str(folder), {"step": 3, "run": "web"})
    return str(folder)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The page as a user starts it, on a --port that something else holds (a socket of this
    fixture's): it serves on the next free port and says which. `proc.lines` is its log so far."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.Popen([sys.executable, "web_demo.py", "--checkpoint", checkpoint, "--device", "cpu",
                                 "--port", str(busy.getsockname()[1]), "--allow_urls"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "2"})
        proc.asked_port, proc.lines = busy.getsockname()[1], []
        threading.Thread(target=lambda: [proc.lines.append(line) for line in proc.stdout], daemon=True).start()
        deadline = time.time() + 120
        while not any("serving on http://" in line for line in proc.lines):
            assert proc.poll() is None and time.time() < deadline, "".join(proc.lines)[-3000:]
            time.sleep(0.05)
    serving = next(line for line in proc.lines if "serving on http://" in line)
    port = int(serving.split("http://127.0.0.1:")[1].split()[0])
    url = f"http://127.0.0.1:{port}/"
    wait_until_serving(proc, url)
    yield url, port, proc
    proc.terminate()
    proc.wait(timeout=30)


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def upload(c, path):
    from gradio_client import handle_file

    return c.predict(handle_file(str(path)), api_name="/load_image")


def ask(c, question, tokens=12):
    chatbot, _ = c.predict(question, tokens, 0.0, 1.0, api_name="/chat")
    return chatbot


def text_of(message) -> str:
    content = message["content"]
    return "".join(p.get("text", "") for p in content) if isinstance(content, list) else content


def one_shot(checkpoint, image, question, tokens=12) -> str:
    """What `python eval_llava.py --checkpoint C --image I --prompt Q` prints: its main, run in this
    process (the server is the subprocess under test; a second interpreter would only cost ~5 s)."""
    import contextlib
    import io

    import eval_llava

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_llava.main(["--checkpoint", checkpoint, "--device", "cpu", "--image", str(image), "--prompt", question,
                         "--max_new_tokens", str(tokens)])
    return out.getvalue().strip()


def test_same_greedy_text_as_one_shot_and_follow_ups_use_the_history(server, checkpoint, tiny):
    from assistant import Assistant
    from dataset import ImageLoader

    url, _, _ = server
    image = os.path.join(tiny.eval, "images", "000000.png")
    c = client(url)
    upload(c, image)
    first = ask(c, "描述这张图片")
    assert text_of(first[-1]) == one_shot(checkpoint, image, "描述这张图片") != ""
    second = ask(c, "什么颜色？")
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    # Exactly what eval_llava's chat would answer with that history.
    assistant = Assistant.from_checkpoint(checkpoint, "cpu")
    history = [{"role": "user", "content": "描述这张图片"}, {"role": "assistant", "content": text_of(first[-1])},
               {"role": "user", "content": "什么颜色？"}]
    assert text_of(second[-1]) == assistant.reply(ImageLoader()(image), history, max_new_tokens=12) != ""
    # A new image starts a new dialogue.
    upload(c, os.path.join(tiny.eval, "images", "000001.png"))
    assert len(ask(c, "描述这张图片")) == 2


def test_five_clients_at_once_all_get_their_answers(server, checkpoint, tiny):
    url, _, _ = server
    image = os.path.join(tiny.eval, "images", "000002.png")
    want = one_shot(checkpoint, image, "描述这张图片")
    assert want
    got, errors = [None] * 5, []

    def user(i):
        try:
            c = client(url)
            upload(c, image)
            got[i] = text_of(ask(c, "描述这张图片")[-1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == [want] * 5


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header for a huge image with almost no data: a decompression bomb's signature."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_bad_input_is_a_chat_message_and_the_server_keeps_serving(server, tiny, tmp_path):
    url, _, proc = server
    c = client(url)
    notes = {}
    (tmp_path / "notes.png").write_text("this is not an image")
    good = open(os.path.join(tiny.eval, "images", "000003.png"), "rb").read()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 3])
    (tmp_path / "bomb.png").write_bytes(png_claiming(30000, 30000))
    for name in ("notes.png", "cut.png", "bomb.png"):
        _, chatbot = upload(c, tmp_path / name)
        notes[name] = text_of(chatbot[-1])
        assert "could not read the image" in notes[name]
    assert "not an image" in notes["notes.png"] and "decompression bomb" in notes["bomb.png"]
    assert "upload an image first" in text_of(ask(c, "描述这张图片")[-1])   # the bad image was not kept
    upload(c, os.path.join(tiny.eval, "images", "000003.png"))
    assert "empty" in text_of(ask(c, "   ")[-1])
    long = ask(c, "什么颜色？" * 400)
    assert any("was cut to" in text_of(m) for m in long)
    assert long[-1]["role"] == "assistant" and "⚠️" not in text_of(long[-1])   # and it was still answered
    assert "was cut to" in text_of(long[-2])
    assert proc.poll() is None
    assert len(ask(client(url), "描述这张图片")) >= 1                     # the next user is served


def test_a_client_that_leaves_mid_stream_does_not_wedge_the_queue(server, tiny):
    url, _, _ = server
    image = os.path.join(tiny.eval, "images", "000004.png")
    leaving = client(url)
    upload(leaving, image)
    job = leaving.submit("描述这张图片", 1024, 0.0, 1.0, api_name="/chat")
    deadline = time.time() + 60
    while job.status().code.name not in ("PROCESSING", "ITERATING", "FINISHED") and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    leaving.close()
    c = client(url)
    upload(c, image)
    start = time.time()
    assert ask(c, "描述这张图片")[-1]["role"] == "assistant"
    assert time.time() - start < 120


def test_nothing_listens_beyond_the_loopback_address(server):
    _, port, _ = server
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, p = local.split(":")
            if int(p, 16) == port and state == "0A":          # LISTEN
                listening.append(address)
    assert listening and all(a in ("0100007F", "00000000000000000000000001000000") for a in listening), listening


def test_the_page_can_ask_a_reference_model_behind_an_api_without_showing_its_key(tiny, monkeypatch):
    from tests.test_api import KEY, FakeApi

    fake = FakeApi()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "web_demo.py", "--api_base", fake.base, "--api_model", "ref-vl",
                             "--api_key_env", "REF_KEY", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "REF_KEY": KEY})
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(proc, url)
        c = client(url)
        upload(c, os.path.join(tiny.eval, "images", "000000.png"))
        assert text_of(ask(c, "什么颜色？")[-1]) == "红色"
        fake.script = [(500, "{}", {"Retry-After": "0"})] * 5
        assert "the API gave no answer" in text_of(ask(c, "什么形状？")[-1])
        assert text_of(ask(c, "什么形状？")[-1]) == "圆形"          # and the page goes on
        assert fake.requests[-1]["auth"] == f"Bearer {KEY}"
        page = urllib.request.urlopen(url + "config", timeout=10).read().decode()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
        fake.server.shutdown()
    assert KEY not in log + page


def test_image_urls_when_allowed_are_http_only_and_bounded(server, tiny):
    """--allow_urls: an http(s) image loads; a file:// URL or a bare path (a server-side file) does not."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    url, _, _ = server
    handler = functools.partial(SimpleHTTPRequestHandler, directory=os.path.join(tiny.eval, "images"))
    handler.log_message = lambda *a: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        c = client(url)
        for bad in ("file:///etc/passwd", "/etc/passwd", os.path.join(tiny.eval, "images", "000000.png")):
            _, chatbot = c.predict(bad, api_name="/load_url")
            assert "could not read the image" in text_of(chatbot[-1])
        _, chatbot = c.predict(f"http://127.0.0.1:{files.server_address[1]}/000000.png", api_name="/load_url")
        assert chatbot == []
        assert ask(c, "描述这张图片")[-1]["role"] == "assistant"
    finally:
        files.shutdown()


def test_a_busy_port_moves_to_the_next_free_one_and_the_log_names_flags(server):
    """The module's server was asked for a port that was taken (see the fixture). The log names
    our flags (--port, --share), never Gradio's launch() arguments."""
    _, port, proc = server
    log = "".join(proc.lines)
    assert port != proc.asked_port
    assert f"port {proc.asked_port} is in use: serving on {port} instead (choose with --port)" in log
    assert "share=True" not in log and "launch()" not in log and "Traceback" not in log


def test_an_oversized_upload_and_an_empty_question_are_chat_messages_of_their_own(server, tiny, tmp_path):
    url, _, _ = server
    c = client(url)
    big = tmp_path / "big.png"
    big.write_bytes(open(os.path.join(tiny.eval, "images", "000005.png"), "rb").read() + b"\0" * (30 * 2**20))
    _, chatbot = upload(c, big)                                   # 30 MB: above the page's 20 MB
    note = text_of(chatbot[-1])
    assert "文件太大" in note and "the file is too large" in note and "20 MB" in note   # in both languages
    upload(c, os.path.join(tiny.eval, "images", "000005.png"))
    ask(c, "描述这张图片")
    chatbot = ask(c, "   ")
    roles = [m["role"] for m in chatbot]
    assert roles == ["user", "assistant", "user", "assistant"], roles   # not glued to the model's reply
    assert "empty" in text_of(chatbot[-1]) and "⚠️" not in text_of(chatbot[1])


def test_every_loaded_image_is_previewed_through_a_file_of_its_own(tiny):
    """test_five_clients_at_once failed now and then (RemoteProtocolError: 'received 0 bytes,
    expected 678'): Gradio writes a returned PIL image into its cache in place, at a path named by
    the bytes' hash, so clients loading the same image at once shared a file that one rewrote
    while another downloaded it (10 clients x 20 rounds of /load_image failed 3 times here). A
    returned file path is copied in atomically instead: every load must give one, of its own."""
    import web_demo
    from assistant import ApiAssistant

    app = web_demo.build_app(web_demo.ChatEngine(ApiAssistant(api=None), "test", 16))
    load = next(f for f in app.fns.values() if f.api_name == "load_image").fn
    image = os.path.join(tiny.eval, "images", "000002.png")
    previews = [load(image)[0] for _ in range(3)]
    assert all(isinstance(p, str) and os.path.isfile(p) for p in previews)        # never a PIL image
    assert len(set(previews)) == 3                                                 # never a shared file
    from PIL import Image

    assert Image.open(previews[0]).size == Image.open(image).size
