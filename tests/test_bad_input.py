"""Bad input that must be survived: odd image files, failing URLs (a local HTTP server on
127.0.0.1), malformed rows and shards, and SA1B preparation with its ledger and resume."""

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset import ImageLoader, ImageTransform, LlavaDataset, decode_image
from readers import read_chat_json, read_sa1b
from prompts import PromptFormat, encode_conversation
from utils.skips import SampleError


def jpeg_bytes(size=(64, 48), color=(200, 30, 30), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", **save)
    return buf.getvalue()


# --------------------------------------------------------------------------- image files

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_odd_but_valid_images_become_upright_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))          # fully transparent red -> white
    assert decode_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    assert decode_image(_png(pal)).getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(_png(Image.new("L", (8, 8), 128))).getpixel((0, 0)) == (128, 128, 128)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert decode_image(_png(sixteen)).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped to 255/65535
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG")  # CMYK red
    r, g, b = decode_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    # EXIF orientation 6 (rotate 90 CW on display): stored 20x10, shown 10x20.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (10, 20)


def test_unusable_image_files_are_skipped_with_their_reason(tmp_path, monkeypatch):
    import dataset

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes()[:200])
    (tmp_path / "text.jpg").write_text("<html>not an image</html>")
    Image.new("RGB", (300, 300)).save(tmp_path / "bomb.png")
    loader = ImageLoader(str(tmp_path))
    reasons = {}
    monkeypatch.setattr(dataset, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # 300x300 is > 2x the limit: a bomb
    for name in ["empty.jpg", "cut.jpg", "text.jpg", "bomb.png", "absent.jpg"]:
        with pytest.raises(SampleError) as err:
            loader(name)
        reasons[name] = err.value.reason
    assert reasons == {"empty.jpg": "corrupt_image", "cut.jpg": "corrupt_image", "text.jpg": "corrupt_image",
                       "bomb.png": "image_too_large", "absent.jpg": "missing_image"}
    with pytest.raises(SampleError, match="bad_url_scheme"):
        loader("ftp://example.invalid/a.jpg")


def test_draft_decoding_shrinks_big_jpegs_but_keeps_the_tower_size():
    big = jpeg_bytes((1600, 1200))
    img = decode_image(big, draft=224)
    assert img.size == (400, 300)             # 1/4 scale: the smallest that keeps both sides >= 224
    assert decode_image(big).size == (1600, 1200)
    assert decode_image(jpeg_bytes((300, 200)), draft=224).size == (300, 200)  # no scale keeps 224


# --------------------------------------------------------------------------- URLs

class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}
    hits: Counter = Counter()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.hits[self.path] += 1
        kind, *rest = self.routes.get(self.path, ("status", 404))
        if kind == "image":
            self._send(200, "image/jpeg", rest[0])
        elif kind == "status":
            self._send(rest[0], "text/plain", b"error")
        elif kind == "html":
            self._send(200, "text/html; charset=utf-8", b"<html><body>please log in</body></html>")
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", rest[0])
            self.end_headers()
        elif kind == "stall":
            rest[0].wait(5)  # released by the test after the client timed out
            self._send(200, "image/jpeg", jpeg_bytes())
        elif kind == "flaky":  # fails the first time, works the second
            if self.hits[self.path] == 1:
                self._send(503, "text/plain", b"busy")
            else:
                self._send(200, "image/jpeg", rest[0])

    def _send(self, code, kind, body):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    release = threading.Event()
    good = jpeg_bytes((640, 480))
    _Handler.hits = Counter()
    _Handler.routes = {
        "/ok.jpg": ("image", good),
        "/missing.jpg": ("status", 404),
        "/broken.jpg": ("status", 500),
        "/login.jpg": ("html",),
        "/loop.jpg": ("redirect", "/loop2.jpg"),
        "/loop2.jpg": ("redirect", "/loop.jpg"),
        "/to_ok.jpg": ("redirect", "/ok.jpg"),
        "/to_ftp.jpg": ("redirect", "ftp://127.0.0.1/x.jpg"),
        "/huge.jpg": ("image", good + b"\0" * 5000),
        "/slow.jpg": ("stall", release),
        "/flaky.jpg": ("flaky", good),
        "/garbage.jpg": ("image", b"\xff\xd8\xff" + b"x" * 100),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)   # poll: a quick shutdown
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", _Handler.hits, len(good)
    release.set()
    httpd.shutdown()
    httpd.server_close()


def test_url_failures_are_named_and_retried_only_when_it_can_help(server):
    base, hits, good_len = server
    loader = ImageLoader(timeout=0.5, retries=2, backoff=0.0, max_bytes=good_len + 100)
    assert loader(f"{base}/ok.jpg").size == (640, 480)
    assert loader(f"{base}/to_ok.jpg").size == (640, 480)
    assert loader(f"{base}/flaky.jpg").size == (640, 480) and hits["/flaky.jpg"] == 2
    expected = {"/missing.jpg": "url_error", "/broken.jpg": "url_error", "/login.jpg": "url_not_image",
                "/loop.jpg": "url_error", "/to_ftp.jpg": "url_error", "/huge.jpg": "url_too_large",
                "/slow.jpg": "url_error", "/garbage.jpg": "corrupt_image"}
    for path, reason in expected.items():
        with pytest.raises(SampleError) as err:
            loader(base + path)
        assert err.value.reason == reason, path
    assert hits["/missing.jpg"] == 1          # a 404 is final
    assert hits["/broken.jpg"] == 2           # a 500 may heal: retried
    assert hits["/slow.jpg"] == 2             # timeouts retried too


def test_url_cache_means_one_download_per_image(server, tmp_path):
    base, hits, _ = server
    loader = ImageLoader(cache_dir=str(tmp_path / "cache"), retries=1)
    for _ in range(3):
        loader(f"{base}/ok.jpg")
    assert hits["/ok.jpg"] == 1


# --------------------------------------------------------------------------- rows, shards, records

def test_dataset_skips_and_counts_every_bad_sample(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.llm)
    fmt = PromptFormat.build(tok, "<|image_pad|>", 4, False, {"enable_thinking": False})
    Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    long_caption = "red circle " * 400
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({
        "url": ["ok.png", "empty.png", "absent.png", "ok.png", "ok.png", "ok.png"],
        "cap_seg": [str({"global_caption": "a red circle"}), str({"global_caption": "x"}), str({"global_caption": "y"}),
                    str({"global_caption": long_caption}), "not a dict", str({"global_caption": " \n "})],
    }), tmp_path / "data" / "a.parquet")
    records, skipped = read_sa1b(str(tmp_path))
    assert skipped == {"bad_cap_seg": 1, "empty_caption": 1}
    ds = LlavaDataset(records, tok, fmt, ImageTransform(size=16), ImageLoader(str(tmp_path)), max_text_len=24)
    items = [ds[i] for i in range(len(ds))]
    assert Counter(it.get("skip") for it in items) == {None: 2, "corrupt_image": 1, "missing_image": 1}
    long = items[3]
    assert long["truncated"] and len(long["input_ids"]) - 4 <= 24   # slots are not counted, answer cut
    assert long["input_ids"].count(fmt.image_token_id) == 4         # never an image slot


def test_truncated_parquet_shard_is_a_clear_error_naming_the_file(tmp_path):
    pq.write_table(pa.table({"url": ["a.png"], "cap_seg": [str({"global_caption": "c"})]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "zz_cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="zz_cut.parquet"):
        read_sa1b(str(tmp_path))


def test_chat_records_without_image_placeholder_or_answer_are_skipped(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.llm)
    fmt = PromptFormat.build(tok, "<|image_pad|>", 4, False, {"enable_thinking": False})
    data = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "red"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "system", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png"},
        "not even a dict",
    ]
    (tmp_path / "chat.json").write_text(json.dumps(data))
    records, skipped = read_chat_json(str(tmp_path / "chat.json"))
    reasons = Counter()
    for r in records:
        try:
            encode_conversation(tok, fmt, r.conversations, 64)
        except SampleError as e:
            reasons[e.reason] += 1
    assert reasons == {"no_image_placeholder": 1, "empty_answer": 1, "too_many_images": 1}
    assert skipped == {"bad_record": 1, "bad_conversation": 2}     # no conversations; a "system" turn


# --------------------------------------------------------------------------- SA1B preparation

def _sa1b_root(tmp_path, base):
    root = tmp_path / "sa1b"
    (root / "data").mkdir(parents=True)
    Image.new("RGB", (600, 400), (0, 0, 255)).save(root / "local.jpg")
    urls = [f"{base}/ok.jpg", f"{base}/missing.jpg", f"{base}/login.jpg", "local.jpg", f"{base}/flaky.jpg", f"{base}/ok.jpg"]
    caps = [str({"global_caption": f"caption {i}"}) for i in range(len(urls))]
    caps.append("broken")
    urls.append(f"{base}/ok.jpg")
    pq.write_table(pa.table({"url": urls, "cap_seg": caps}), root / "data" / "shard-00000.parquet")
    return root


def test_prepare_sa1b_downloads_once_records_failures_and_resumes(server, tmp_path):
    from scripts.prepare_sa1b import main as prepare_main

    base, hits, _ = server
    root, out = _sa1b_root(tmp_path, base), tmp_path / "prepared"
    argv = ["--data_root", str(root), "--out", str(out), "--short_side", "64", "--workers", "3", "--timeout", "2",
            "--retries", "2", "--no_progress"]
    report = prepare_main(argv)
    assert report["rows"] == 6 and report["bad_rows"] == {"bad_cap_seg": 1}
    assert report["prepared"] == 4 and report["failed"] == {"url_error": 1, "url_not_image": 1}
    assert hits["/ok.jpg"] == 1                         # the repeated URL is fetched once
    ledger = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in ledger) == ["url_error", "url_not_image"]
    table = pq.read_table(out / "data" / "prepared-00000.parquet").to_pylist()
    assert [row["cap_seg"] for row in table] == [str({"global_caption": f"caption {i}"}) for i in (0, 3, 4, 5)]
    for row in table:
        with Image.open(out / row["url"]) as img:
            assert min(img.size) == 64                  # short side stored, aspect kept
    # training reads the prepared set with the ordinary SA1B reader, no network
    records, skipped = read_sa1b(str(out))
    assert len(records) == 4 and not skipped
    assert ImageLoader(str(out))(records[0].image).size == (85, 64)
    # resume: nothing fetched again, failures not retried, same index
    before = dict(hits)
    again = prepare_main(argv)
    assert dict(hits) == before and again["already_there"] == 3 and again["failed_earlier_not_retried"] == 2
    assert pq.read_table(out / "data" / "prepared-00000.parquet").to_pylist() == table
    # --retry_failed tries the ledger's URLs again
    prepare_main(argv + ["--retry_failed"])
    assert hits["/missing.jpg"] == before["/missing.jpg"] + 1
