"""eval_llava.py checks what it can before it loads a model (a typo must not cost a Qwen3 load):
a missing, folder or non-image --image, a --bench TSV missing or missing columns, a missing
--vqa/--captions, a file that is not a checkpoint; and refuses an empty --prompt."""

import pytest
from PIL import Image

import eval_llava
from tests.conftest import train_argv


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    import train_stage1

    out = tmp_path_factory.mktemp("inputs_run")
    train_stage1.main(train_argv(tiny, out, "c", 2, eval_samples=4))
    return str(out / "ck" / "c")


@pytest.fixture
def no_model(monkeypatch):
    """The model loader, made to fail loudly: a check that comes after it is a check too late."""
    def load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_llava, "load_assistant", load)


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        eval_llava.main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == "" and "loading" not in out.err
    assert len(out.err.strip().splitlines()) == 1, out.err       # one line
    return out.err.strip()


@pytest.fixture
def files(tmp_path):
    """A text file named .jpg, a folder holding one image, a TSV missing columns."""
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "cols.tsv").write_text("index\tquestion\n1\tq\n")
    return tmp_path


@pytest.mark.parametrize("flag, value, message", [
    ("--image", "{t}/nope.png", "--image {t}/nope.png: no such file"),
    ("--image", "{t}/text.jpg", "--image {t}/text.jpg: not an image, or a damaged one (cannot identify image file"),
    ("--image", "{t}/imgs", "--image {t}/imgs is a folder, not an image (1 image in it, e.g. {t}/imgs/a.png)"),
    ("--image", "ftp://example.com/a.png", "--image ftp://example.com/a.png: neither an http(s) URL nor a file path"),
    ("--image", "https:///a.png", "--image https:///a.png: neither an http(s) URL nor a file path"),
    ("--bench", "{t}/cols.tsv", "{t}/cols.tsv: not a VLMEvalKit benchmark TSV, missing column(s) answer, image or "
                                "image_path (it has: index, question)"),
    ("--bench", "{t}/nope.tsv", "--bench {t}/nope.tsv: no such file"),
    ("--vqa", "{t}/nope.json", "--vqa {t}/nope.json: no such file"),
    ("--captions", "{t}/nope", "--captions {t}/nope: no such file or folder"),
    ("--checkpoint", "{t}/imgs/a.png", "{t}/imgs/a.png is not a checkpoint: not a safetensors file"),
], ids=["image-missing", "image-text-file", "image-folder", "image-ftp-url", "image-url-without-host",
        "bench-missing-columns", "bench-missing", "vqa-missing", "captions-missing", "checkpoint-an-image"])
def test_a_bad_input_is_refused_before_the_model_loads(checkpoint, no_model, files, capsys, flag, value, message):
    argv = ([] if flag == "--checkpoint" else ["--checkpoint", checkpoint]) + [flag, value.format(t=files)]
    if flag == "--checkpoint":
        argv += ["--image", str(files / "imgs" / "a.png")]
    if flag in ("--image", "--checkpoint"):
        argv += ["--prompt", "这是什么"]
    assert message.format(t=files) in refused(argv, capsys)


def test_good_inputs_reach_the_model_and_a_url_is_not_fetched(checkpoint, no_model, files):
    for image in (str(files / "imgs" / "a.png"), "https://example.com/a.jpg"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            eval_llava.main(["--checkpoint", checkpoint, "--image", image, "--prompt", "这是什么"])


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_when_parsing(no_model, tmp_path, capsys, prompt):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        eval_llava.main(["--checkpoint", str(tmp_path), "--image", str(tmp_path / "a.png"), "--prompt", prompt])
    assert e.value.code == 2
    assert "--prompt is empty: give the question to ask about --image" in capsys.readouterr().err
