"""The documentation against the code (issue 32): README.md and docs/*.md show commands whose
scripts exist and take the flags shown, name files that exist, link to pages and headings that
exist, state the demos' bars as toy_demo.py has them; the README stays a ten-minute read."""

import os
import re

import pytest

from tests.docs_text import ROOT, broken_links, doc_paths, doc_section, doc_texts, headings, shown_commands
from tests.test_cli import parser_of
from toy_demo import BARS, SKIP_BAR
from utils.align_plan import translate_align_flags

# Files the pages name that belong to other projects (the course, VLMEvalKit, vLLM, torch, Prismatic).
FOREIGN = {"eval_api.py",            # the course's API chat, with the key in its source
           "matching_util.py", "multiple_choice.py", "yorn.py",   # VLMEvalKit's scorers, reimplemented
           "llava.py", "run.py",     # vllm/model_executor/models/llava.py, torch/distributed/run.py
           "scripts/pretrain.py"}    # the align plan's (Prismatic's) script that train_stage1.py stands in for


def test_every_relative_link_resolves():
    assert broken_links() == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## 两条命令（Two）\n\n[a](docs/a.md) [gone](docs/gone.md) [web](https://example.com/x.md)\n"
        "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n", encoding="utf-8")
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n![img](a.png) [up](../README.md#两条命令two) [self](#a) [bad](../README.md#three)"
        " [miss](b.md#a)\n", encoding="utf-8")
    assert broken_links(str(tmp_path)) == [
        "README.md: docs/gone.md (no such file: docs/gone.md)",
        "docs/a.md: ../README.md#three (no heading of README.md has the anchor #three)",
        "docs/a.md: b.md#a (no such file: docs/b.md)"]


def unknown_flags(texts: dict[str, str], parsers: dict) -> tuple[int, list[str]]:
    """How many commands the pages show, and 'page: script --flag: why' for each that cannot run."""
    bad, seen = [], 0
    for rel, text in texts.items():
        for script, words in shown_commands(text):
            seen += 1
            if not os.path.exists(os.path.join(ROOT, script)):
                bad.append(f"{rel}: {script}: no such script")
                continue
            if script.startswith("train_stage"):
                words = translate_align_flags(words)
            if script not in parsers:
                parsers[script] = parser_of(script)
            known = parsers[script]._option_string_actions
            for word in words:
                flag = word.split("=")[0]
                if re.fullmatch(r"--[A-Za-z][\w-]*", flag) and flag not in known:
                    bad.append(f"{rel}: {script} {flag}: no such flag")
    return seen, bad


def test_every_command_shown_runs_a_script_that_takes_its_flags():
    """`python X.py --flag ...` and `torchrun ... X.py --flag ...` in README.md and docs/: X exists
    and its parser knows every flag (the align plan's dotted flags as train_stage1.py maps them)."""
    parsers = {}
    seen, bad = unknown_flags(doc_texts(), parsers)
    assert seen > 50 and not bad, bad
    page = ("```bash\npython eval_llava.py --checkpoint checkpoints/<run> --bench x.tsv \\\n    --bench_tokns 8\n```\n"
            "Inline: `python train_stage2.py --stage1 ck --tune_lm full` and `python nowhere.py --x`.\n")
    assert unknown_flags({"p.md": page}, parsers) == (3, ["p.md: eval_llava.py --bench_tokns: no such flag",
                                                         "p.md: train_stage2.py --tune_lm: no such flag",
                                                         "p.md: nowhere.py: no such script"])


def test_files_the_pages_name_exist():
    """Paths into scripts/, tests/, utils/, configs/ and docs/, and the project's own X.py names."""
    bad = []
    for rel, text in doc_texts().items():
        for path in re.findall(r"(?<![\w./<>-])((?:scripts|tests|utils|configs|docs)/[\w./-]*\w)", text):
            if path not in FOREIGN and not os.path.exists(os.path.join(ROOT, path)):
                bad.append(f"{rel}: {path}")
        for name in re.findall(r"(?<![\w./<>-])(\w+\.py)\b", text):
            if name not in FOREIGN and not any(os.path.exists(os.path.join(ROOT, d, name))
                                               for d in ("", "scripts", "utils", "tests")):
                bad.append(f"{rel}: {name}")
    assert not bad, bad


def test_the_readme_is_a_ten_minute_read_that_links_every_page():
    readme = doc_texts()["README.md"]
    assert len(readme.splitlines()) <= 300
    assert readme.index("## Quick start (English)") < readme.index("## 这是什么")
    for command in ("pip install torch==2.13.0 && pip install -r requirements.txt && python train_stage1.py --demo",
                    "python -m pytest"):
        assert readme.count(command) >= 2, command            # in the English quick start and in Chinese
    for page in doc_paths()[1:]:
        assert f"]({page})" in readme, f"README.md does not link {page}"
    # The demos' measured figures sit in one marked place for whoever remeasures them.
    assert readme.count("<!-- DEMO FIGURES") == 1 and readme.count("<!-- /DEMO FIGURES -->") == 1
    assert not any("DEMO FIGURES:" in text for rel, text in doc_texts().items() if rel != "README.md")


def test_ci_runs_the_readmes_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        last = [line for line in fh.read().splitlines() if line.strip()][-1]
    assert last == "python -m pytest" and "\npython -m pytest " in doc_texts()["README.md"]


def test_the_readme_states_each_demo_bar_as_toy_demo_has_it():
    """The README's table of verdicts: every figure toy_demo.BARS judges, with its bar and its sign."""
    section = doc_section("## 演示打印什么、怎么读判决")
    documented = {}
    for row in re.findall(r"^\| (?:stage \d|每个演示) \|([^|]+)\|([^|]+)\|$", section, re.M):
        figures = re.findall(r"`(\w+)`", row[0])
        bars = re.findall(r"([≤≥]) ([\d.]+)", row[1])
        assert len(figures) == len(bars), row
        documented.update(zip(figures, bars))
    wanted = {b.figure: ("≤" if b.ceiling else "≥", f"{b.bar:g}") for bars in BARS.values() for b in bars}
    wanted[SKIP_BAR.figure] = ("≤", f"{SKIP_BAR.bar:g}")
    assert documented == wanted


@pytest.mark.parametrize("page", doc_paths()[1:])
def test_every_docs_page_opens_with_its_one_title(page):
    """One topic a page: a level-1 title on its first line and no second one (code blocks aside)."""
    text = doc_texts()[page]
    titles = [h for h in headings(text) if f"\n# {h}\n" in f"\n{text}"]
    assert text.startswith("# ") and len(titles) == 1, (page, titles)
