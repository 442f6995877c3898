"""scripts/download_data.py without the network: ModelScope's download call is replaced by a fake
that writes shards; VQA v2 archives come from a local HTTP server that drops the first transfer."""

import io
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scripts import download_data


def test_shard_selection():
    assert download_data.parse_shards("0-9") == list(range(10))
    assert download_data.parse_shards("10") == [10]
    assert download_data.parse_shards("0-2,7,1") == [0, 1, 2, 7]
    with pytest.raises(SystemExit, match="0-9 is the course's training set"):
        download_data.parse_shards("9-0")


@pytest.fixture
def fake_modelscope(monkeypatch):
    """Writes the shards a pattern names, as dataset_snapshot_download would; records the calls."""
    calls = []

    def download(dataset_id, local_dir, patterns):
        calls.append((dataset_id, sorted(patterns)))
        for pattern in patterns:
            shard = int(pattern.split("-")[1])
            os.makedirs(os.path.join(local_dir, "data"), exist_ok=True)
            pq.write_table(pa.table({"url": [f"https://x/{shard}.jpg"], "cap_seg": ["{'global_caption': 'c'}"]}),
                           os.path.join(local_dir, "data", f"train-{shard:04d}-of-0724-abc.parquet"))

    monkeypatch.setattr(download_data, "modelscope_dataset_download", download)
    return calls


def test_sa1b_downloads_only_what_is_missing_and_refetches_a_damaged_shard(tmp_path, fake_modelscope, capsys):
    out = str(tmp_path / "sa1b")
    got = download_data.main(["sa1b", "--shards", "0-2", "--out", out])
    assert got["shards"] == [0, 1, 2]
    assert fake_modelscope == [("Tongyi-DataEngine/SA1B-Dense-Caption",
                                ["data/train-0000-*.parquet", "data/train-0001-*.parquet", "data/train-0002-*.parquet"])]
    assert "python scripts/prepare_sa1b.py --data_root " + out in capsys.readouterr().out
    download_data.main(["sa1b", "--shards", "0-2", "--out", out])         # all there: no second download
    assert len(fake_modelscope) == 1
    damaged = os.path.join(out, "data", "train-0001-of-0724-abc.parquet")
    with open(damaged, "r+b") as fh:
        fh.truncate(10)                                                  # an interrupted transfer
    download_data.main(["sa1b", "--shards", "0-3", "--out", out])
    assert fake_modelscope[-1][1] == ["data/train-0001-*.parquet", "data/train-0003-*.parquet"]
    from readers import read_sa1b

    records, skipped = read_sa1b(out)                                   # training reads the layout as it is
    assert len(records) == 4 and not skipped


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Files(BaseHTTPRequestHandler):
    """Serves `files` with range support; the first GET of each file is cut off half-way."""

    files: dict[str, bytes] = {}
    cut: set = set()
    ranges: list = []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            type(self).ranges.append((self.path, start))
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path not in self.cut:
            type(self).cut.add(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])   # then the connection drops
            return
        self.wfile.write(body[start:])

    def log_message(self, *a):
        pass


def test_vqav2_resumes_an_interrupted_archive_and_extracts_atomically(tmp_path, monkeypatch, capsys):
    questions = json.dumps({"questions": [{"question_id": 1, "image_id": 9, "question": "what?"}]}).encode() * 50
    annotations = json.dumps({"annotations": []}).encode() * 50
    _Files.files = {"/vqa/v2_Questions_Val_mscoco.zip": _zip({"v2_OpenEnded_mscoco_val2014_questions.json": questions}),
                    "/vqa/v2_Annotations_Val_mscoco.zip": _zip({"v2_mscoco_val2014_annotations.json": annotations}),
                    "/zips/val2014.zip": _zip({"val2014/COCO_val2014_000000000009.jpg": b"jpeg" * 300})}
    _Files.cut, _Files.ranges = set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setitem(download_data.VQA_FILES, "val", [
        (f"{base}/vqa/v2_Questions_Val_mscoco.zip", "v2_OpenEnded_mscoco_val2014_questions.json"),
        (f"{base}/vqa/v2_Annotations_Val_mscoco.zip", "v2_mscoco_val2014_annotations.json")])
    monkeypatch.setitem(download_data.COCO_IMAGES, "val", (f"{base}/zips/val2014.zip", "val2014"))
    monkeypatch.setattr(download_data.time, "sleep", lambda s: None)     # retry backoff
    out = tmp_path / "vqa"
    try:
        download_data.main(["vqav2", "--splits", "val", "--out", str(out)])
    finally:
        server.shutdown()
    assert (out / "v2_OpenEnded_mscoco_val2014_questions.json").read_bytes() == questions
    assert (out / "v2_mscoco_val2014_annotations.json").read_bytes() == annotations
    assert (out / "val2014" / "COCO_val2014_000000000009.jpg").read_bytes() == b"jpeg" * 300
    # Every archive was cut half-way once and finished from where it stopped, not from zero.
    assert sorted(p for p, start in _Files.ranges if start > 0) == sorted(_Files.files)
    assert not [n for n in os.listdir(out) if n.startswith(".extract")]
    assert f"--questions-val {out}/v2_OpenEnded_mscoco_val2014_questions.json" in capsys.readouterr().out


def test_an_archive_entry_outside_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"../../escape.txt": b"x"}))
    with pytest.raises(SystemExit, match="outside the archive folder"):
        download_data.extract(str(archive), str(tmp_path / "out"), "escape.txt")
    assert not (tmp_path / "escape.txt").exists()


def test_cogvlm_sft_download_extracts_its_archive_into_the_course_layout(tmp_path, monkeypatch, capsys):
    """ModelScope delivers a zip (mocked here): it is extracted in place, the layout checked, and
    the stage-2 command names the folder that holds the subsets; a second run downloads nothing."""
    import json
    import zipfile

    calls = []

    def download(dataset_id, local_dir, patterns):
        calls.append(dataset_id)
        os.makedirs(local_dir, exist_ok=True)
        with zipfile.ZipFile(os.path.join(local_dir, "CogVLM-SFT-311K.zip"), "w") as zf:
            sub = "CogVLM-SFT-311K/llava_instruction_single_conversation_formate"
            zf.writestr(f"{sub}/images/000000001.jpg", b"x")
            zf.writestr(f"{sub}/labels_zh/000000001.json", json.dumps({"conversations": []}))

    monkeypatch.setattr(download_data, "modelscope_dataset_download", download)
    out = str(tmp_path / "cog")
    got = download_data.main(["cogvlm_sft", "--out", out])
    assert calls == [download_data.COGVLM_DATASET]
    assert got["data_root"] == os.path.join(out, "CogVLM-SFT-311K")
    assert got["subsets"] == ["llava_instruction_single_conversation_formate"]
    download_data.main(["cogvlm_sft", "--out", out])
    assert calls == [download_data.COGVLM_DATASET]          # already there: nothing fetched again

    monkeypatch.setattr(download_data, "modelscope_dataset_download", lambda *a: None)
    with pytest.raises(SystemExit, match="labels_zh"):
        download_data.main(["cogvlm_sft", "--out", str(tmp_path / "empty")])


def test_bench_tsv_resumes_checks_its_md5_and_refuses_a_wrong_one(tmp_path, monkeypatch):
    import hashlib

    good = b"index\tquestion\tA\tB\tanswer\timage\n" + b"0\tq\ta\tb\tA\t" + b"x" * 5000 + b"\n"
    _Files.files, _Files.cut, _Files.ranges = {"/MMB.tsv": good, "/BAD.tsv": good}, set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(download_data, "BENCH_FILES", {"MMB": (f"{base}/MMB.tsv", hashlib.md5(good).hexdigest()),
                                                       "BAD": (f"{base}/BAD.tsv", "0" * 32)})
    monkeypatch.setattr(download_data.time, "sleep", lambda s: None)
    try:
        got = download_data.main(["bench", "MMB", "--out", str(tmp_path)])
        assert (tmp_path / "MMB.tsv").read_bytes() == good and got == {"MMB": str(tmp_path / "MMB.tsv")}
        assert [start for p, start in _Files.ranges if p == "/MMB.tsv" and start > 0]   # resumed after the cut
        with pytest.raises(SystemExit, match="MD5"):
            download_data.main(["bench", "BAD", "--out", str(tmp_path)])
    finally:
        server.shutdown()
    assert (tmp_path / "BAD.tsv.bad").is_file() and not (tmp_path / "BAD.tsv").exists()
