"""The terminal chat as a user types into it: image paths in every spelling a terminal produces,
missing files, Ctrl-C during a reply and at the prompt; a run folder as --checkpoint."""

import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from dataset import ImageLoader
from eval_llava import chat, image_reference
from tests.conftest import ROOT, train_argv


class FakeAssistant:
    """The chat loop's two needs: a loader and a reply; records what the model was asked."""

    def __init__(self, interrupt_on: str = ""):
        self.loader = ImageLoader()
        self.asked: list[tuple[tuple, list[str]]] = []
        self.interrupt_on = interrupt_on

    def reply(self, image, messages, stream=False, **gen):
        if messages[-1]["content"] == self.interrupt_on:
            raise KeyboardInterrupt  # Ctrl-C while the reply streams
        self.asked.append((image.size, [m["content"] for m in messages]))
        return f"answer {len(self.asked)}"


class Lines:
    """stdin that ends with Ctrl-C at the prompt instead of EOF."""

    def __init__(self, lines):
        self.lines = list(lines)

    def readline(self):
        if not self.lines:
            raise KeyboardInterrupt
        return self.lines.pop(0) + "\n"


@pytest.mark.parametrize("line, expected", [
    ("data/tiny/eval/images/nope.png", "data/tiny/eval/images/nope.png"),
    ("~/x.png", os.path.expanduser("~/x.png")),
    ("'/tmp/a b/c.png'", "/tmp/a b/c.png"),                 # drag-and-drop, quoted
    ("/tmp/a\\ b/c.png", "/tmp/a b/c.png"),                 # drag-and-drop, escaped space
    ("cat.jpg", "cat.jpg"),                                # path-shaped with an image extension
    ("./photo", None),                                     # no extension, not a file: the chat asks
    ("https://example.com/a.jpg", "https://example.com/a.jpg"),
    ("描述这张图片", None),
    ("what's in the picture?", None),                      # an apostrophe is not a quote
    ("is the circle left/right?", None),
    ("它是红色/蓝色的吗？", None),                             # Chinese has no spaces: one word with a "/"
    ("红色/蓝色", None),
    ("'红色还是蓝色'", None),                                # quoted, but nothing path-like in it
])
def test_what_counts_as_an_image_reference(line, expected):
    assert image_reference(line) == expected


def test_an_existing_file_is_an_image_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "scan", format="PNG")       # no extension, but it exists
    Image.new("RGB", (4, 4)).save(tmp_path / "a b.png")                  # spaces, typed unquoted
    assert image_reference("scan") == "scan" and image_reference("a b.png") == "a b.png"


def test_a_question_with_a_slash_is_asked_and_an_ambiguous_path_is_asked_about(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "first.png")
    assistant = FakeAssistant()
    chat(assistant, {}, stdin=Lines([
        str(tmp_path / "first.png"),
        "它是红色/蓝色的吗？",                                     # a question, never "file not found"
        "/tmp/no_such_scan", "",                               # a path or a question? Enter: a question
        "./nope/scan", "n",                                    # "n": not sent
        "这是什么",
    ]))
    out = capsys.readouterr()
    assert [q[-1] for _, q in assistant.asked] == ["它是红色/蓝色的吗？", "/tmp/no_such_scan", "这是什么"]
    assert "file not found" not in out.err
    assert out.out.count("is not a file. Send it to the model as a question? [Y/n]") == 2
    assert "not sent; type an existing image path (nothing at ./nope/scan)" in out.out


def test_missing_paths_are_reported_and_never_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a b").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "a b" / "c.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "first.png")
    assistant = FakeAssistant(interrupt_on="stop me")
    chat(assistant, {}, stdin=Lines([
        str(tmp_path / "first.png"), "描述这张图片",
        "data/tiny/eval/images/nope.png", "~/x.png",             # missing: said so, not questions
        f"'{tmp_path / 'a b' / 'c.png'}'",                      # a quoted path with a space: a new image
        "stop me",                                              # Ctrl-C during the reply
        "这是什么",
    ]))                                                         # then Ctrl-C at the prompt: chat returns
    out = capsys.readouterr()
    assert assistant.asked == [((8, 8), ["描述这张图片"]), ((20, 10), ["这是什么"])]  # the stopped turn left no trace
    assert "file not found: data/tiny/eval/images/nope.png" in out.err
    assert f"file not found: {tmp_path / 'x.png'}" in out.err
    assert "reply stopped" in out.out
    assert out.out.count("dialogue reset") == 2


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """A 4-step run: a run folder with a `latest` pointer, as training leaves it."""
    import train_stage1

    out = tmp_path_factory.mktemp("chat_run")
    train_stage1.main(train_argv(tiny, out, "c", 4, eval_samples=4, save_interval=2))
    return out / "ck" / "c"


def test_a_run_folder_is_a_checkpoint(tiny_run, tiny, tmp_path, capsys):
    """A run folder means the checkpoint its `latest` pointer names; a step folder and the
    safetensors file work as before; anything else is a clear error."""
    import eval_llava
    from checkpoint_io import checkpoint_file

    step4 = str(tiny_run / "step_000004" / "projector.safetensors")
    assert checkpoint_file(str(tiny_run)) == checkpoint_file(str(tiny_run / "step_000004")) == checkpoint_file(step4) == step4
    (tiny_run / "latest").write_text("step_000002\n")                   # the pointer decides, not the newest name
    assert checkpoint_file(str(tiny_run)) == str(tiny_run / "step_000002" / "projector.safetensors")
    with pytest.raises(FileNotFoundError, match="give a run folder"):
        checkpoint_file(str(tmp_path))
    image = os.path.join(tiny.eval, "images", "000000.png")
    eval_llava.main(["--checkpoint", str(tiny_run), "--image", image, "--prompt", "描述这张图片", "--max_new_tokens", "4"])
    out = capsys.readouterr()
    assert f"loading {tiny_run}" in out.err and len(out.out.splitlines()) == 1   # the reply line alone on stdout
    (tiny_run / "latest").write_text("step_000004\n")


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_leaves_without_a_traceback(tiny_run):
    proc = subprocess.Popen([sys.executable, "eval_llava.py", "--checkpoint", str(tiny_run)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while not seen.endswith("你: ".encode()):                    # the prompt is up: the loop waits for input
        chunk = proc.stdout.read(1)
        assert chunk, proc.stderr.read().decode()[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_loaded_names_the_files_size_not_the_draft_decoded_one(tmp_path, capsys, fmt):
    """A JPEG is draft-decoded to the tower's size (32 here): the model sees 32x32, the user
    is told the file's 64x64, as for a PNG."""
    path = tmp_path / f"a.{fmt.lower()}"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, format=fmt)
    assistant = FakeAssistant()
    assistant.loader = ImageLoader(draft=32)
    chat(assistant, {}, stdin=Lines([str(path), "这是什么"]))
    assert "image loaded (64x64); dialogue reset" in capsys.readouterr().out
    assert assistant.asked[0][0] == ((32, 32) if fmt == "JPEG" else (64, 64))


def test_a_folder_is_said_to_be_one_and_never_asked(tmp_path, monkeypatch, capsys):
    """An existing folder typed as a line (relative, absolute with a slash, quoted) is not a
    question; a typo inside a folder that exists is asked about; "红色/蓝色" stays a question."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "images").mkdir(parents=True)
    for name in ("b.png", "a.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "bench" / "images" / name)
    assistant = FakeAssistant()
    chat(assistant, {}, stdin=Lines([
        "bench/images/a.png",
        "bench/images", f"{tmp_path / 'bench'}/", "'bench'",     # folders: said so, never asked
        "bench/imagez", "n",                                     # a typo in an existing folder: asked, "n"
        "红色/蓝色",                                               # no folder 红色: a question
    ]))
    out = capsys.readouterr()
    assert [q[-1] for _, q in assistant.asked] == ["红色/蓝色"]
    assert "bench/images is a folder, not an image (2 images in it, e.g. bench/images/a.png): " \
           "type an image's path" in out.out
    assert f"{tmp_path / 'bench'}/ is a folder, not an image (no images in it)" in out.out
    assert "bench is a folder, not an image (no images in it)" in out.out
    assert "「bench/imagez」 is not a file. Send it to the model as a question? [Y/n]" in out.out
