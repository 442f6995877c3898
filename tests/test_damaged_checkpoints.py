"""Checkpoints damaged after their save (issue 34): every step folder carries a manifest (sizes and
CRC-32, written last, inside the commit); `--resume auto` skips a damaged newest step with one line
naming the file and continues from the newest intact one to the uninterrupted run's weights; a step
named on purpose is refused with the newest intact one; every reader says "damaged: <file>: <what>";
`checkpoint_io.py --verify`; --keep_last counts intact steps only; steps saved before manifests are
checked by loading. The 2-process case (a damaged shard of rank 1) is in tests/test_parallel.py."""

import json
import os
import shutil
import zlib

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from tests.conftest import train_argv
from tests.test_resume import losses
from utils.checkpoint import resume_point, step_dirs
from utils.integrity import MANIFEST, find_problem

STEPS = 12     # saved at 4, 8 and 12


def args(tiny, out, name, *extra, **flags):
    return train_argv(tiny, out, name, STEPS, *extra, **{"save_interval": 4, "keep_last": 0, "lr": 3e-3, **flags})


@pytest.fixture(scope="module")
def ref(tiny, tmp_path_factory):
    """The uninterrupted run: steps 4, 8 and 12 saved, every step's loss logged."""
    out = tmp_path_factory.mktemp("damaged_ref")
    train_stage1.main(args(tiny, out, "ref"))
    return out


def copy_run(ref, out, name: str) -> str:
    shutil.copytree(ref / "ck" / "ref", out / "ck" / name)
    return str(out / "ck" / name)


def cut_in_half(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF                       # same size: only the checksum can tell
    open(path, "wb").write(bytes(data))


# damage to the newest step folder -> what the line names (after "damaged: <step folder>/")
DAMAGES = {
    "shard_cut": (lambda s: cut_in_half(os.path.join(s, "resume", "__0_0.distcp")),
                  "resume/__0_0.distcp: {half:,} bytes, {size:,} when saved (cut short)"),
    "resume_missing": (lambda s: shutil.rmtree(os.path.join(s, "resume")), "resume: missing (2 files)"),
    "state_missing": (lambda s: os.remove(os.path.join(s, "trainer_state.pt")), "trainer_state.pt: missing"),
    "weights_changed": (lambda s: flip_a_byte(os.path.join(s, "projector.safetensors")),
                        "projector.safetensors: changed since the save (same size, CRC-32 "),
    "manifest_missing": (lambda s: os.remove(os.path.join(s, MANIFEST)), "manifest.json: missing"),
}


def damage(step: str, kind: str) -> str:
    """Damage `step` as DAMAGES[kind] says; the start of the line that must name it."""
    shard = os.path.join(step, "resume", "__0_0.distcp")
    size = os.path.getsize(shard)
    DAMAGES[kind][0](step)
    return f"damaged: {step}/" + DAMAGES[kind][1].format(half=size // 2, size=size)


def projector(step) -> dict:
    return load_file(os.path.join(step, "projector.safetensors"))


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_resume_auto_skips_a_damaged_newest_step_and_reaches_the_uninterrupted_weights(ref, tiny, tmp_path, capsys,
                                                                                        kind):
    ck = copy_run(ref, tmp_path, "r")
    line = damage(os.path.join(ck, "step_000012"), kind)
    capsys.readouterr()
    summary = train_stage1.main(args(tiny, tmp_path, "r", "--resume", "auto"))
    out = capsys.readouterr().out
    skipped = next(x for x in out.splitlines() if "damaged:" in x)
    assert skipped.startswith(f"! {line}") and skipped.endswith("; skipped"), skipped
    assert "! continuing from step_000008, the newest intact checkpoint" in out
    assert f"resumed from {ck}/step_000008 at step 8" in out and "Traceback" not in out
    a, b = projector(ref / "ck" / "ref" / "step_000012"), projector(summary["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ran = losses(tmp_path / "runs" / "r")
    assert set(ran) == {9, 10, 11, 12} and all(ran[s] == losses(ref / "runs" / "ref")[s] for s in ran)
    assert find_problem(summary["checkpoint"]) is None              # saved again over the damaged one


def test_the_manifest_holds_every_file_with_its_size_and_zlibs_crc32(ref):
    """Written last, inside the commit: every other file of the step, checkable with any CRC-32 tool."""
    step = ref / "ck" / "ref" / "step_000012"
    entries = json.loads((step / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(entries) == on_disk and "resume/__0_0.distcp" in on_disk and "trainer_state.pt" in on_disk
    for rel, entry in entries.items():
        data = (step / rel).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, rel


def test_each_damage_is_one_line_naming_the_file(ref, tmp_path):
    for kind in DAMAGES:
        ck = copy_run(ref, tmp_path, kind)
        line = damage(os.path.join(ck, "step_000012"), kind)
        problem = find_problem(os.path.join(ck, "step_000012"))
        assert problem.startswith(line) and "\n" not in problem, (kind, problem)
        assert find_problem(os.path.join(ck, "step_000008")) is None


def test_a_damaged_step_named_on_purpose_is_refused_with_the_newest_intact_one(ref, tiny, tmp_path, monkeypatch):
    ck = copy_run(ref, tmp_path, "n")
    line = damage(os.path.join(ck, "step_000012"), "shard_cut")
    monkeypatch.setattr(train_stage1, "build_training_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as refused:
        train_stage1.main(args(tiny, tmp_path, "n", "--resume", f"{ck}/step_000012"))
    message = str(refused.value.code)
    assert message.startswith(f"--resume {ck}/step_000012: {line}") and "\n" not in message
    assert message.endswith(f"Not loaded; the newest intact checkpoint of that run is {ck}/step_000008: resume "
                            f"from it with --resume {ck}/step_000008")


def test_no_intact_step_is_refused_listing_what_is_wrong_with_each(ref, tiny, tmp_path, monkeypatch):
    ck = copy_run(ref, tmp_path, "none")
    lines = [damage(os.path.join(ck, f"step_{s:06d}"), kind)
             for s, kind in ((4, "state_missing"), (8, "weights_changed"), (12, "shard_cut"))]
    monkeypatch.setattr(train_stage1, "build_training_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as refused:
        train_stage1.main(args(tiny, tmp_path, "none", "--resume", "auto"))
    listed = str(refused.value.code).splitlines()
    assert listed[0] == f"--resume auto: no intact checkpoint in {ck}:"
    assert [x.strip()[:len(y)] for x, y in zip(listed[1:4], reversed(lines))] == list(reversed(lines))


def legacy(ck: str) -> None:
    """Make a run's steps look saved before manifests existed: no manifest, no mark in the spec."""
    for _, step in step_dirs(ck):
        if os.path.exists(os.path.join(step, MANIFEST)):
            os.remove(os.path.join(step, MANIFEST))
        spec_path = os.path.join(step, "model_spec.json")
        spec = json.load(open(spec_path, encoding="utf-8"))
        spec.pop("manifest", None)
        json.dump(spec, open(spec_path, "w", encoding="utf-8"))


def test_steps_saved_before_manifests_are_checked_by_loading(ref, tmp_path, capsys):
    ck = copy_run(ref, tmp_path, "old")
    legacy(ck)
    assert all(find_problem(step) is None for _, step in step_dirs(ck))
    cut_in_half(os.path.join(ck, "step_000012", "resume", "__0_0.distcp"))
    os.truncate(os.path.join(ck, "step_000008", "projector.safetensors"), 100)
    problem = find_problem(os.path.join(ck, "step_000012"))
    assert problem.startswith(f"damaged: {ck}/step_000012/resume/__0_0.distcp: ") and "(cut short)" in problem
    assert find_problem(os.path.join(ck, "step_000008")).startswith(
        f"damaged: {ck}/step_000008/projector.safetensors: cannot be loaded (SafetensorError: ")
    capsys.readouterr()
    assert resume_point("auto", False, "old", ck, str(tmp_path / "runs" / "old")) == f"{ck}/step_000004"
    out = capsys.readouterr().out
    assert out.count("; skipped") == 2 and "continuing from step_000004, the newest intact checkpoint" in out


def test_a_damaged_step_saved_before_manifests_resumes_from_the_intact_one(ref, tiny, tmp_path, capsys):
    ck = copy_run(ref, tmp_path, "old")
    legacy(ck)
    cut_in_half(os.path.join(ck, "step_000012", "resume", "__0_0.distcp"))
    summary = train_stage1.main(args(tiny, tmp_path, "old", "--resume", "auto"))
    assert "continuing from step_000008" in capsys.readouterr().out
    a, b = projector(ref / "ck" / "ref" / "step_000012"), projector(summary["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_counts_intact_steps_only(ref, tiny, tmp_path):
    """Step 12 damaged (a copy from another machine cut short, say); the run goes on from step 8 to
    step 10 with --keep_last 2: the two newest intact steps, 8 and 10, stay (a rotation that counted
    the damaged 12 kept 10 alone), and the damaged one is left for its owner to repair."""
    ck = copy_run(ref, tmp_path, "k")
    damage(os.path.join(ck, "step_000012"), "shard_cut")
    train_stage1.main(train_argv(tiny, tmp_path, "k", 10, "--resume", "auto", save_interval=2, keep_last=2, lr=3e-3))
    assert [s for s, _ in step_dirs(ck)] == [8, 10, 12]
    assert find_problem(os.path.join(ck, "step_000010")) is None


def test_verify_checks_a_run_folder_and_a_step_folder(ref, tmp_path, capsys):
    import checkpoint_io

    def verify(path):
        with pytest.raises(SystemExit) as done:
            checkpoint_io.main(["--verify", str(path)])
        return done.value.code, capsys.readouterr().out.splitlines()

    ck = copy_run(ref, tmp_path, "v")
    code, lines = verify(ck)
    assert code == 0 and lines == [f"step_{s:06d}  intact (5 files, sizes and CRC-32 as saved)" for s in (4, 8, 12)]
    line = damage(os.path.join(ck, "step_000004"), "weights_changed")
    code, lines = verify(ck)                        # an older step damaged: said, but the newest is intact
    assert code == 0 and lines[0].startswith(f"step_000004  {line}") and len(lines) == 3
    line = damage(os.path.join(ck, "step_000012"), "resume_missing")
    code, lines = verify(ck)
    assert code == 1 and lines[2] == f"step_000012  {line}"
    assert verify(os.path.join(ck, "step_000012")) == (1, [f"step_000012  {line}"])
    assert verify(os.path.join(ck, "step_000008"))[0] == 0
    code, _ = verify(tmp_path)                     # holds no checkpoint at all
    assert code == 2


def test_every_reader_says_damaged_naming_the_file(ref, tiny, tmp_path, capsys):
    """A projector.safetensors cut short (the issue's eval case said "is not a checkpoint"): the
    chat, one-shot and --bench modes, the web page, the export, stage 2's --stage1 and stage 3's
    --init each refuse in one line that says "damaged" and names the file; a run folder passes
    over the damaged step to the newest intact one, saying so; an image stays "not a checkpoint"."""
    import eval_llava
    import train_stage2
    import train_stage3_lora
    import web_demo
    from scripts import export_hf

    ck = copy_run(ref, tmp_path, "read")
    step = os.path.join(ck, "step_000012")
    size = os.path.getsize(os.path.join(step, "projector.safetensors"))
    cut_in_half(os.path.join(step, "projector.safetensors"))
    line = f"damaged: {step}/projector.safetensors: {size // 2:,} bytes, {size:,} when saved (cut short)"
    image = os.path.join(tiny.eval, "images", sorted(os.listdir(os.path.join(tiny.eval, "images")))[0])
    data = ["--data_root", tiny.train, "--runs_dir", str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "x")]
    readers = {
        "chat": lambda: eval_llava.main(["--checkpoint", step]),
        "one-shot": lambda: eval_llava.main(["--checkpoint", f"{step}/projector.safetensors", "--image", image,
                                             "--prompt", "describe"]),
        "bench": lambda: eval_llava.main(["--checkpoint", step, "--bench", str(tmp_path / "any.tsv")]),
        "web": lambda: web_demo.main(["--checkpoint", step]),
        "export": lambda: sys_exit(export_hf.main(["--checkpoint", step, "--out", str(tmp_path / "export")])),
        "stage1": lambda: train_stage2.main(["--stage1", step, *data]),
        "init": lambda: train_stage3_lora.main(["--init", step, *data]),
    }
    for name, read in readers.items():
        with pytest.raises(SystemExit) as refused:
            read()
        said = capsys.readouterr()
        text = "\n".join(filter(None, [said.out.strip(), said.err.strip(), str(refused.value.code)]))
        assert line in text and sum("damaged:" in x for x in text.splitlines()) == 1, (name, text)
        assert "not a checkpoint" not in text and "Traceback" not in text, (name, text)
    with pytest.raises(SystemExit):
        eval_llava.main(["--checkpoint", ck, "--image", str(tmp_path / "none.png"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert f"! {line}; skipped" in err and f"using {ck}/step_000008, the newest intact checkpoint of {ck}" in err
    with pytest.raises(SystemExit):
        eval_llava.main(["--checkpoint", image])
    assert "is not a checkpoint" in capsys.readouterr().err


def sys_exit(code: int) -> None:
    raise SystemExit(code)


def test_loading_a_resume_state_damaged_since_its_check_is_one_line(tmp_path):
    """The check runs before loading; a shard damaged after it (or a step saved before manifests
    whose damage loading alone finds) still fails in one line that says "damaged", while a state
    that does not fit the model keeps its own message."""
    from utils.checkpoint import RESUME_DIR, complete_optimizer_state, load_resume, save_resume

    def build(layers):
        model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(layers)])
        optimizer = torch.optim.AdamW(model.parameters())
        complete_optimizer_state(optimizer)
        return model, optimizer

    save_resume(str(tmp_path), *build(1))
    with pytest.raises(SystemExit, match=r"does not fit this run \(Missing key in checkpoint state_dict: model\.1\."):
        load_resume(str(tmp_path), *build(2))
    cut_in_half(tmp_path / RESUME_DIR / "__0_0.distcp")
    with pytest.raises(SystemExit) as refused:
        load_resume(str(tmp_path), *build(1))
    assert str(refused.value.code).startswith(f"--resume {tmp_path}: damaged: {tmp_path / RESUME_DIR}: cannot be "
                                              "loaded (")
    assert "\n" not in str(refused.value.code)
