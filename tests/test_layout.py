"""Imports go one way (docs/layout.md's "目录结构（Layout）" section, whose table of floors must match
LAYERS below): every project file is parsed with ast, imports inside functions included, and no
module may import one of its own layer or above; no cycles at all."""

import ast
import os
import re

from tests.conftest import ROOT

# Lower layers never import higher ones. Same-layer imports are refused too, except inside
# utils/, whose helpers lean on each other (acyclically: checked below).
LAYERS = {
    "utils": 0,
    "modelscope_clip": 1,               # one foreign on-disk format: ModelScope's Chinese-CLIP
    "backbones": 2, "prompts": 2, "tuning": 2,  # where models come from | the prompt contract | what trains
    "model": 3, "readers": 3,           # the architecture | one reader per on-disk format
    "dataset": 4, "checkpoint_io": 4, "parallel": 4,   # images, dataset, sampler, collates | build, save,
                                        # load a model | several processes: DDP, FSDP2
    "assistant": 5, "convert_vqa": 5, "toy_world": 5,   # answering | VQA -> chat.json | the offline world
    "heldout": 6, "toy_instructions": 6, "bench": 6,   # evaluation during training | stages 2/3's toy data beside
                                        # the world | benchmarks in VLMEvalKit's TSV layout
    "bookkeeping": 7, "eval_llava": 7, "serve_api": 7, "toy_demo": 7, "web_demo": 7,   # a run's logs and
                                        # checkpoints | the CLIs: chat and evaluation, the API server, demos, page
    "train_config": 8,                  # a run's configuration and where its models come from
    "train_stage1": 9,                  # the training loop
    "train_stage2": 10, "train_stage3_lora": 10,   # the later stages: the same loop with their defaults
    "scripts": 11,                      # runnable helpers: leaves, nothing imports them
}


def layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def project_files() -> dict[str, str]:
    """module name -> path, for every .py file of the project (tests excluded)."""
    out = {}
    for folder in ("", "utils", "scripts"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder) or ROOT)):
            if name.endswith(".py"):
                module = (f"{folder}." if folder else "") + name[:-3]
                out[module.removesuffix(".__init__")] = os.path.join(ROOT, folder, name)
    return out


def imports_of(path: str) -> set[str]:
    """Every project module a file imports, at any depth (a function-level import included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from utils import console
    return {m for m in found if layer_of(m)}


def graph() -> dict[str, set[str]]:
    files = project_files()
    return {module: {m for m in imports_of(path) if m in files} for module, path in files.items()}


def test_every_project_file_has_a_layer():
    assert [m for m in project_files() if layer_of(m) is None] == []


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            mine, theirs = LAYERS[layer_of(module)], LAYERS[layer_of(dep)]
            if theirs > mine or (theirs == mine and layer_of(module) != "utils"):
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                return path + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state:
            assert visit(node, [node]) is None


def test_the_checker_sees_what_it_must(tmp_path):
    """The rules above would pass on an empty graph: they must see real edges, and an import
    tucked inside a function (the way a cycle is usually dodged) as much as one at the top."""
    g = graph()
    assert {"prompts", "utils.skips"} <= g["dataset"] and "backbones" in g["model"]
    assert "utils.console" in g["utils.config"]
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef later():\n    from train_stage1 import train\n    import model\n")
    assert imports_of(str(probe)) >= {"train_stage1", "train_stage1.train", "model"}


def test_training_imports_no_command_line_file():
    """train() gets its held-out evaluation, sample replies and run bookkeeping from modules of
    their own (heldout.py, assistant.py, bookkeeping.py), never from a CLI (eval_llava, web_demo)."""
    g = graph()
    seen, todo = set(), ["train_stage1"]
    while todo:
        for dep in g[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    assert {"heldout", "assistant", "bookkeeping", "checkpoint_io"} <= seen
    assert not seen & {"eval_llava", "web_demo", "convert_vqa"}, seen & {"eval_llava", "web_demo", "convert_vqa"}


def test_the_documented_layout_table_is_the_one_in_the_code():
    page = open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8").read()
    section = page[page.index("## 目录结构（Layout）"):]
    section = section[:section.index("\n## ", 1)]
    floors = {m: int(n) for n, mods in re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)
              for m in re.findall(r"`(\w+)`", mods)}
    assert floors == LAYERS
