"""eval_llava.py checks what it can before it loads a model (a Qwen3 load costs a minute; a typo
must not): a missing, folder or non-image --image, a --bench TSV missing or missing columns, a
missing --vqa/--captions, a file that is not a checkpoint; and refuses an empty --prompt."""

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


def test_bad_inputs_are_refused_before_the_model_loads(checkpoint, no_model, tmp_path, capsys):
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "cols.tsv").write_text("index\tquestion\n1\tq\n")
    ask = ["--checkpoint", checkpoint]
    cases = {
        ("--image", str(tmp_path / "nope.png")): f"--image {tmp_path / 'nope.png'}: no such file",
        ("--image", str(tmp_path / "text.jpg")): f"--image {tmp_path / 'text.jpg'}: not an image, or a damaged one",
        ("--image", str(tmp_path / "imgs")): f"--image {tmp_path / 'imgs'} is a folder, not an image (1 image in it, "
                                              f"e.g. {tmp_path / 'imgs' / 'a.png'})",
        ("--image", "ftp://example.com/a.png"): "--image ftp://example.com/a.png: neither an http(s) URL nor a file path",
        ("--bench", str(tmp_path / "cols.tsv")): "missing column(s) answer, image or image_path (it has: index, question)",
        ("--bench", str(tmp_path / "nope.tsv")): f"--bench {tmp_path / 'nope.tsv'}: no such file",
        ("--vqa", str(tmp_path / "nope.json")): f"--vqa {tmp_path / 'nope.json'}: no such file",
        ("--captions", str(tmp_path / "nope")): f"--captions {tmp_path / 'nope'}: no such file or folder",
    }
    for (flag, value), message in cases.items():
        extra = ["--prompt", "这是什么"] if flag == "--image" else []
        assert message in refused(ask + [flag, value] + extra, capsys), (flag, value)
    image = str(tmp_path / "imgs" / "a.png")
    assert "is not a checkpoint" in refused(["--checkpoint", image, "--image", image, "--prompt", "q"], capsys)
    # The checks pass good inputs on: a URL is not fetched, and the next step is the model.
    for good in (image, "https://example.com/a.jpg"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            eval_llava.main(ask + ["--image", good, "--prompt", "这是什么"])


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_when_parsing(no_model, tmp_path, capsys, prompt):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        eval_llava.main(["--checkpoint", str(tmp_path), "--image", str(tmp_path / "a.png"), "--prompt", prompt])
    assert e.value.code == 2
    assert "--prompt is empty: give the question to ask about --image" in capsys.readouterr().err
