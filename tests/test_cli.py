"""Command lines as a new user meets them: every script's --help, flags that win over presets
and the demo, refused values, intervals of 0, the resume hint."""

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

import toy_demo
import train_config
import train_stage1
from tests.conftest import ROOT, train_argv
from tests.docs_text import doc_texts
from utils.checkpoint import resume_command

SCRIPTS = ["train_stage1.py", "train_stage2.py", "train_stage3_lora.py", "eval_llava.py", "web_demo.py", "serve_api.py", "convert_vqa.py",
           "checkpoint_io.py", "dataset.py", "toy_world.py",
           *sorted(f"scripts/{n}" for n in os.listdir(os.path.join(ROOT, "scripts"))
                   if n.endswith(".py") and n != "__init__.py")]


class _Parser(Exception):
    """Carries the parser a script builds out of its main(), before anything else runs."""


def parser_of(script: str) -> argparse.ArgumentParser:
    module = importlib.import_module(script[:-3].replace("/", "."))
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **kw):
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        module.main() if script in ("dataset.py", "toy_world.py") else module.main([])
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}: main() did not parse arguments")


def help_entries(text: str) -> dict[str, str]:
    """--help text -> {option string: its whole entry}."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS + ["utils/vqa_eval.py"])
def test_every_script_help_exits_0_and_shows_each_default_once(script, capsys):
    parser = parser_of(script)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])          # what `python SCRIPT --help` runs (a stray % used to crash here)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    entries = help_entries(text)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        entry = entries[action.option_strings[0]]
        mentions = entry.lower().count("default")
        assert mentions <= 1, f"{script} {action.option_strings[0]}: default shown {mentions} times: {entry}"
        if action.default not in (None, "", argparse.SUPPRESS):
            assert mentions == 1, f"{script} {action.option_strings[0]}: default {action.default!r} not shown: {entry}"


@pytest.mark.slow
def test_help_from_the_shell(tmp_path):
    """The same, as a user types it (imports, sys.path set-up of scripts/, the formatter)."""
    for script in ("train_stage1.py", "scripts/export_hf.py"):
        res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "(default: " in res.stdout, res.stderr[-2000:]


def test_parsing_the_demo_builds_nothing(tmp_path, monkeypatch):
    """Parsing only parses: --demo's world, data and earlier-stage run are made by the entry
    point's main (toy_demo.prepare_demo), never while reading flags."""
    monkeypatch.chdir(tmp_path)                                       # where models/toy would appear
    for stage_defaults in (None, {"stage": 2}, {"stage": 3}):
        cfg = train_config.parse_args(["--demo"], stage_defaults)
        assert cfg.demo and cfg.max_steps == train_config.DEMO_DEFAULTS[cfg.stage]["max_steps"]
        assert (cfg.data_root, cfg.stage1, cfg.init) == ("", "", "")   # filled by prepare_demo, from the built world
    assert os.listdir(tmp_path) == []


def test_parsing_imports_no_demo_code():
    """train_config (what every stage parses with) holds the demo's settings itself: reading flags
    pulls in neither the toy world nor the benchmarks nor the assistant."""
    code = ("import sys, train_config; train_config.parse_args(['--demo']); "
            "print(sorted(m for m in ('toy_demo', 'toy_world', 'toy_instructions', 'bench', 'assistant') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_typed_negation_wins_over_presets_and_the_demo_for_every_boolean(monkeypatch):
    # What trains is checked as a whole (tests/test_stages.py): --no-tune_projector alone trains
    # nothing, --load_in_4bit needs LoRA and --fsdp_offload a sharded strategy, so they are refused
    # here by design.
    booleans = [f.name for f in dataclasses.fields(train_config.TrainConfig)
                if f.type in ("bool", "bool | None")
                and f.name not in ("demo", "tune_projector", "load_in_4bit", "fsdp_offload")]
    assert {"feature_post_norm", "image_wrap", "pack", "compile", "overwrite"} <= set(booleans)
    # A preset and the demo that switch every boolean on: a typed --no-X must still win.
    preset = "clip-zh-qwen3-0.6b"
    monkeypatch.setitem(train_config.PRESETS, preset, {**train_config.PRESETS[preset], **{n: True for n in booleans}})
    monkeypatch.setitem(train_config.DEMO_DEFAULTS, 1, {**train_config.STAGE1_DEMO, **{n: True for n in booleans}})
    for name in booleans:
        for base in (["--model", preset], ["--demo"]):
            assert getattr(train_config.parse_args([*base, f"--no-{name}"]), name) is False, (base, name)
            assert getattr(train_config.parse_args(base), name) is True, (base, name)
    # The demo's own default (ln_post on every token, the course's recipe) loses to the typed flag,
    # as the export's refusal message tells users to do.
    monkeypatch.setitem(train_config.DEMO_DEFAULTS, 1, dict(train_config.STAGE1_DEMO, feature_post_norm=True))
    assert train_config.parse_args(["--demo", "--no-feature_post_norm"]).feature_post_norm is False
    assert train_config.parse_args(["--demo", "--feature_post"]).feature_post_norm is True   # a unique prefix
    cfg = train_config.parse_args(["--demo", "--lr=5e-4", "--batch_size", "8"])
    assert (cfg.lr, cfg.batch_size, cfg.max_steps) == (5e-4, 8, train_config.STAGE1_DEMO["max_steps"])


@pytest.mark.parametrize("argv, message", [
    (["--save_interval", "-1"], "--save_interval -1: must be >= 0"),
    (["--log_interval", "-5"], "--log_interval -5: must be >= 0"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--fsdp_offload"], "--fsdp_offload keeps FSDP's shards on the CPU: it needs a sharded --train_strategy"),
    (["--train_strategy", "fsdp-full-shard", "--hsdp_shard_size", "4"], "--hsdp_shard_size is hsdp's shard group"),
    (["--tune_llm", "lora", "--load_in_4bit", "--train_strategy", "hsdp"], "Use --train_strategy ddp"),
    (["--train_strategy", "zero3"], "invalid choice: 'zero3'"),
])
def test_values_that_cannot_work_are_refused_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train_config.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_intervals_of_zero_mean_off(tiny, tmp_path, capsys):
    summary = train_stage1.main(train_argv(tiny, tmp_path, "z", 12, log_interval=0, save_interval=0, eval_interval=0))
    out = capsys.readouterr().out
    assert summary["steps"] == 12 and "step 12/12" not in out and "eval @" not in out   # no log lines, no evals
    assert sorted(os.listdir(tmp_path / "ck" / "z")) == ["latest", "step_000012"]      # only the final save
    assert "eval_loss" in summary and summary["checkpoint"].endswith("step_000012")   # evaluated once, at the end


def test_resume_hint_repeats_the_command_with_the_run_name_once():
    hint = resume_command(["--demo", "--run_name", "a", "--lr", "1e-3"], "a", 1)
    assert hint == "python train_stage1.py --demo --run_name a --lr 1e-3 --resume auto"
    hint = resume_command(["--demo", "--resume", "checkpoints/x/step_000004", "--hf_token", "hf_abc"],
                                       "x", 2)
    assert hint == ("torchrun --standalone --nproc-per-node 2 train_stage1.py --demo --hf_token '<redacted>' "
                    "--run_name x --resume auto")
    assert resume_command(["--trackers", '["jsonl"]', "--run_id", "r"], "r", 1) == \
        "python train_stage1.py --trackers '[\"jsonl\"]' --run_id r --resume auto"


@pytest.mark.slow   # a demo: two measurements around a training run
def test_demo_logs_its_before_and_after_figures_and_prints_its_wall_time(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy_demo, "ensure_toy_world", lambda *a, **kw: tiny)   # the test world stands in for the demo's
    # A student edits the demo's settings where they live, beside the defaults (train_config).
    monkeypatch.setitem(train_config.STAGE1_DEMO, "warmup_ratio", 0.1)
    summary = train_stage1.main(["--demo", "--max_steps", "10", "--batch_size", "8", "--num_workers", "0",
                                 "--eval_interval", "5", "--eval_samples", "16", "--sample_replies", "0",
                                 "--runs_dir", str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "ck")])
    out = capsys.readouterr().out
    assert re.search(r"demo wall time +\d+s on \d+ x .+ \(CPU\)", out)
    # It says where it differs from the defaults, and who set each value.
    start = out.index("demo's settings where they differ from the defaults")
    differ = " ".join(out[start:out.index("\n\n", start)].split())       # the header and its indented lines
    assert "train_config.DEMO_DEFAULTS; flags you type win" in differ
    for said in ("warmup_ratio 0.1 (default 0.03)", "batch_size 8 (default 16)", "max_steps 10 (default 0)",
                 "feature_post_norm True (default None)"):
        assert said in differ, differ
    assert json.loads(open(os.path.join(summary["run_dir"], "config.json")).read())["warmup_ratio"] == 0.1
    # Whether its checkpoint can be exported, and the recipe that can (the demo's ln_post cannot).
    export = next(line for line in out.splitlines() if line.strip().startswith("export "))
    assert "export_hf.py: no" in export and "--no-feature_post_norm" in export, export
    assert summary["export"] in export
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    demo = {r["step"]: r for r in rows if "demo/heldout_exact_match" in r}
    assert sorted(demo) == [0, 10]
    assert demo[0]["demo/heldout_exact_match"] == summary["heldout_exact_match_before"]
    assert demo[10]["demo/toy_vqa_accuracy"] == summary["toy_vqa_accuracy_after"]


@pytest.mark.slow   # the stage-2 demo: VQA, second turn, captions and the three toy benchmarks, twice
def test_the_stage2_demo_summary_carries_the_toy_benchmark_figures(tiny, chain, tmp_path, monkeypatch):
    import train_stage2
    from toy_instructions import ensure_instruction_data

    _, _, s1, _, _ = chain
    monkeypatch.setattr(toy_demo, "ensure_toy_world", lambda *a, **kw: tiny)
    monkeypatch.setattr(toy_demo, "ensure_instruction_data", lambda paths, size, log: ensure_instruction_data(paths, "tiny", log))
    summary = train_stage2.main(["--demo", "--stage1", s1, "--max_steps", "4", "--batch_size", "8", "--num_workers", "0",
                                 "--eval_interval", "0", "--save_interval", "0", "--eval_samples", "8",
                                 "--sample_replies", "0", "--runs_dir", str(tmp_path / "runs"),
                                 "--checkpoints_dir", str(tmp_path / "ck")])
    saved = json.loads(open(os.path.join(summary["run_dir"], "summary.json")).read())
    for key in ("toy_mmbench_circular", "toy_mmbench_vanilla", "toy_mme_perception", "toy_pope_f1"):
        assert 0 <= saved[f"{key}_before"] <= 2000 and 0 <= saved[f"{key}_after"] <= 2000, key
    bench_dir = os.path.join(summary["run_dir"], "bench")
    assert sorted(os.listdir(bench_dir)) == ["stage1_step4", "stage2_step4"]   # the start and the trained model
    scores = json.loads(open(os.path.join(bench_dir, "stage2_step4", "toy_MMBench_EN_scores.json")).read())
    assert scores["exact"]["circular"] == saved["toy_mmbench_circular_after"]


def test_wrong_paths_are_one_line_errors_not_tracebacks(tiny, tmp_path, capsys):
    import eval_llava
    from scripts import export_hf

    (tmp_path / "nope").mkdir()                       # a folder without shards (a missing one: the test below)
    with pytest.raises(SystemExit, match=f"--data_format sa1b: no parquet shards in {tmp_path}/nope"):
        train_stage1.main(["--vision_tower", tiny.vision, "--llm", tiny.llm, "--data_root", str(tmp_path / "nope"),
                           "--runs_dir", str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "ck")])
    with pytest.raises(SystemExit) as err:
        eval_llava.main(["--checkpoint", str(tmp_path / "nope"), "--image", "x.png", "--prompt", "hi"])
    assert err.value.code == 2 and "give a run folder" in capsys.readouterr().err
    assert export_hf.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# --------------------------------------------------------------------------- what a new user hits (issue 19)

def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as err:
        train_config.parse_args(["--bacth_size", "16"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines                                    # not 54 lines of usage first
    assert "--bacth_size (did you mean --batch_size?)" in lines[0] and "--help" in lines[0]
    import eval_llava

    with pytest.raises(SystemExit):
        eval_llava.main(["--checkpont", "x"])
    assert "(did you mean --checkpoint?)" in capsys.readouterr().err


def test_checkpoint_paths_in_help_and_docs_are_folders_that_training_writes():
    """Every checkpoints/<run>/X a user is shown (--help, README.md, docs/*.md): X is a step folder
    (or nothing: the run folder follows `latest`). There is no `final` folder."""
    texts = {script: parser_of(script).format_help() for script in SCRIPTS}
    texts.update(doc_texts())
    for name, text in texts.items():
        for sub in re.findall(r"checkpoints/<[\w-]+>/([\w.]+)", text):
            assert re.fullmatch(r"step_\d{6}|latest", sub), f"{name}: checkpoints/<run>/{sub}"
    assert "checkpoints/<run>" in texts["eval_llava.py"]


def test_gpu_check_help_and_unknown_options(tmp_path):
    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    for flag in ("--help", "-h"):
        res = subprocess.run(["bash", script, flag], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and res.stdout.startswith("usage: bash scripts/gpu_check.sh OUT_DIR"), res.stderr
        assert not os.path.exists(flag)                              # never taken for OUT_DIR
    res = subprocess.run(["bash", script, str(tmp_path / "o"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown option '--bogus'" in res.stderr


@pytest.mark.slow
def test_gpu_check_without_a_gpu_stops_before_building_anything(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the refusal is for machines without one")
    work = tmp_path / "work"
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "WORK": str(work)})
    assert res.returncode == 3 and "no CUDA GPU" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "out").exists() and not work.exists()      # nothing built, nothing written


def test_a_wrong_data_root_fails_before_any_model_loads_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(train_stage1, "build_training_model", no_model)
    for flag in ("--data_root", "--eval_data_root"):
        argv = ["--vision_tower", tiny.vision, "--llm", tiny.llm, "--data_root", tiny.train, "--eval_data_root",
                tiny.eval, flag, str(tmp_path / "nope"), "--runs_dir", str(tmp_path / "runs"),
                "--checkpoints_dir", str(tmp_path / "ck")]
        with pytest.raises(SystemExit, match=f"{flag} {tmp_path / 'nope'}: no such folder"):
            train_stage1.main(argv)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_an_image_given_as_checkpoint_is_one_line(tiny, tmp_path, capsys):
    import eval_llava
    from scripts import export_hf

    image = os.path.join(tiny.eval, "images", "000000.png")
    with pytest.raises(SystemExit) as err:
        eval_llava.main(["--checkpoint", image, "--image", image, "--prompt", "hi"])
    err_text = capsys.readouterr().err
    assert err.value.code == 2 and f"{image} is not a checkpoint" in err_text and "Traceback" not in err_text
    assert export_hf.main(["--checkpoint", image, "--out", str(tmp_path / "x")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_a_download_without_the_client_library_is_one_line(tmp_path, monkeypatch):
    from scripts import download_models

    monkeypatch.setitem(sys.modules, "modelscope", None)           # not installed
    with pytest.raises(SystemExit, match="needs the modelscope package: pip install modelscope"):
        download_models.main(["--preset", "clip-zh-qwen3-0.6b", "--models_dir", str(tmp_path)])


@pytest.mark.slow
def test_a_download_with_no_network_is_one_line(tmp_path):
    # The Hugging Face hub with no network: a closed port on this machine stands in for it.
    res = subprocess.run([sys.executable, "scripts/download_models.py", "qwen3-0.6b", "--source", "hf",
                          "--models_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                              "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("download of Qwen/Qwen3-0.6B from hf failed:")


@pytest.mark.slow
def test_gpu_check_tests_log_ends_with_the_pytest_count(tmp_path):
    """pytest.ini passes -q already; a second -q (-qq) dropped the "N passed" line from tests.log.
    The step runs one device test of a file of its own: what is checked is the step's pytest
    command line and its log, not the suite (which would only add a model load)."""
    (tmp_path / "test_one.py").write_text("import pytest\n\n\n@pytest.mark.device\ndef test_one():\n    pass\n")
    res = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out"), "--dry-run", "--only", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "WORK": str(tmp_path / "work"),
                              "PYTEST_ADDOPTS": f"--rootdir {ROOT} -c {ROOT}/pytest.ini {tmp_path / 'test_one.py'}"})
    log = (tmp_path / "out" / "tests.log").read_text()
    assert re.search(r"\b1 passed\b", log), log[-2000:]
    assert "tests on cpu: exit 0" in res.stdout and "benchmark" not in res.stdout    # --only: that step alone


def test_verdicts_hold_the_figures_to_their_bars_and_set_the_exit_status(monkeypatch, capsys):
    """Each demo's headline figures against their bars (a ceiling for a starting point and for
    skipped turns), printed with what they mean, carried in summary.json, and exit status 3
    when one falls short (0 when all hold)."""
    summary = {"heldout_exact_match_before": 0.025, "heldout_exact_match_after": 0.975,
               "skipped": {"turn_over_max_text_len": 0, "missing_image": 2}}
    found = toy_demo.verdicts(summary, 1)
    assert found["heldout_exact_match_after"] == {"value": 0.975, "bar": 0.95, "ok": True}
    assert found["heldout_exact_match_before"]["ok"] and found["turns_skipped_as_too_long"]["ok"]
    toy_demo.print_verdicts(found, 1)
    out = capsys.readouterr().out
    assert "✓ heldout exact match 0.975 ≥ 0.95: the projector aligned" in out
    missed = toy_demo.verdicts({**summary, "heldout_exact_match_after": 0.5,
                                "skipped": {"turn_over_max_text_len": 3}}, 1)
    assert not missed["heldout_exact_match_after"]["ok"] and not missed["turns_skipped_as_too_long"]["ok"]
    toy_demo.print_verdicts(missed, 1)
    err = capsys.readouterr().err
    assert "✗ heldout exact match 0.5 < 0.95: alignment fell short" in err
    assert "✗ turns skipped as too long 3 > 0" in err
    for verdict, code in ((missed, 3), (found, 0)):
        monkeypatch.setattr(train_stage1, "main", lambda *a, v=verdict: {"verdicts": v})
        with pytest.raises(SystemExit) as stop:
            train_stage1.run_cli()
        assert stop.value.code == code
