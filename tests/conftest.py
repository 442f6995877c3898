"""Shared fixtures: the toy world at test size (built once into .cache/toy_test/, git-ignored, and
reused by later sessions while its recipe is unchanged) and a Llama-style tokenizer with a BOS
token, trained in-process.

Tests marked `device` run on LLAVA_TEST_DEVICE (default cpu): scripts/gpu_check.sh runs them
with LLAVA_TEST_DEVICE=cuda on a GPU machine; CI and a laptop never need one."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, and on a 2-core AMD
# EPYC the quick tier took 45 s on one thread and on two when quiet, but 47 s against 66 s beside
# another CPU-bound process (two threads spin-wait for a busy core: utils/cpu.py).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

DEVICE = os.environ.get("LLAVA_TEST_DEVICE", "cpu")


def tolerance(device: str | torch.device = DEVICE) -> dict:
    """assert_close tolerances: float32 on a CPU; a GPU rounds differently (TF32 convolutions,
    bf16 frozen weights under autocast)."""
    return dict(rtol=1e-5, atol=1e-5) if torch.device(device).type == "cpu" else dict(rtol=2e-2, atol=2e-2)


def cached_world(size: str):
    """A toy world built once into .cache/ (git-ignored) and reused while its recipe stamp
    matches; a file lock per size keeps concurrent pytest processes (and the background build,
    pytest_collection_finish) from building it twice. Tests only read it."""
    import fcntl

    from toy_world import ensure_toy_world

    base = os.environ.get("LLAVA_TOY_TEST_DIR", os.path.join(ROOT, ".cache", "toy_test"))
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, f".lock-{size}"), "w") as lock:   # a lock per size: tiny never waits for test
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_toy_world(size, os.path.join(base, "models", "toy"), os.path.join(base, "data", "toy"),
                                log=lambda *a: None)


def train_argv(world, out, name: str = "run", steps: int = 8, *extra: str, **flags) -> list[str]:
    """A training command line on a toy world (`tiny` or `toy`), writing runs/ and ck/ under `out`.
    Small and quiet by default (batch 4, no workers, no periodic evaluation, 8 held-out samples,
    no sample replies); `flags` (--key value, True for a bare switch) and `extra` (raw words) come
    after the defaults, and argparse keeps the last value of a repeated flag."""
    argv = ["--vision_tower", world.vision, "--llm", world.llm, "--data_root", world.train,
            "--eval_data_root", world.eval, "--max_steps", str(steps), "--batch_size", "4", "--num_workers", "0",
            "--eval_interval", "0", "--eval_samples", "8", "--sample_replies", "0", "--run_name", name,
            "--runs_dir", str(out / "runs"), "--checkpoints_dir", str(out / "ck")]
    for key, value in flags.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv + list(extra)


@pytest.fixture(scope="session")
def toy():
    """The trained toy world (its LM prior and tower pretrained): for evidence of alignment."""
    return cached_world("test")


@pytest.fixture(scope="session")
def tiny():
    """The toy world's formats with random, untrained weights (built in about a second): for
    every test that needs real files but no evidence of alignment."""
    return cached_world("tiny")


def pytest_collection_modifyitems(items):
    """The trained toy world takes a while to build and its tests train for real: they are the
    slow tier (`python -m pytest -m "not slow"` leaves them out), with subprocess and torchrun
    tests, which carry the marker themselves."""
    for item in items:
        if "toy" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


def common(tmp_path, name, steps, *extra):
    """The flags of a stage-2/3 run on the tiny world: batch 4, a checkpoint every 4 steps (all
    kept), no periodic evaluation; gradient checkpointing when the run's name says "full"."""
    return ["--max_steps", str(steps), "--batch_size", "4", "--num_workers", "0", "--eval_interval", "0",
            "--eval_samples", "8", "--sample_replies", "0", "--save_interval", "4", "--keep_last", "0",
            "--run_name", name, "--runs_dir", str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "ck"),
            "--gradient_checkpointing" if "full" in name else "--no-gradient_checkpointing", *extra]


@pytest.fixture(scope="session")
def chain(tiny, tmp_path_factory):
    """Stage 1 -> stage 2 (full, CogVLM-SFT layout) -> stage 3 (LoRA, a LLaVA chat.json) on the
    tiny world, exportable settings (no post-norm). Returns (folder, instruction data, the three
    step folders)."""
    import train_stage1
    import train_stage2
    import train_stage3_lora
    from toy_instructions import ensure_instruction_data

    out = tmp_path_factory.mktemp("chain")
    data = ensure_instruction_data(tiny, "tiny", log=lambda *a: None)
    s1 = train_stage1.main(train_argv(tiny, out, "s1", 4, "--no-feature_post_norm", *common(out, "s1", 4),
                                      feature_layer=-1, feature_select="all"))
    s2 = train_stage2.main(["--stage1", s1["checkpoint"], "--data_root", data.sft_train, "--lr", "1e-3",
                            "--eval_ratio", "0.1", *common(out, "s2_full", 4)])
    s3 = train_stage3_lora.main(["--init", s2["checkpoint"], "--data_format", "chat", "--chat_json", data.style_train,
                                 "--image_root", data.style_images, "--eval_chat_json", data.style_eval, "--lr", "1e-2",
                                 *common(out, "s3", 4)])
    return out, data, s1["checkpoint"], s2["checkpoint"], s3["checkpoint"]


@pytest.fixture(scope="session")
def toy_model(tiny):
    """(model, tokenizer, prompt format) on the tiny world, projector freshly initialised, on
    the test device."""
    from checkpoint_io import build_model
    from model import ModelSpec
    from prompts import PromptFormat

    torch.manual_seed(0)
    spec = ModelSpec(vision_tower=tiny.vision, llm=tiny.llm, projector="mlp2x_gelu", feature_post_norm=True)
    model, tok = build_model(spec, DEVICE)
    return model, tok, PromptFormat.for_model(model.spec, tok)


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


@pytest.fixture(scope="session")
def bos_tokenizer(tmp_path_factory):
    """A tokenizer with BOS <s> and eos </s>, a Llama-2 style template that writes the BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["describe the image", "a red circle on the left", "what colour is it", "[INST] [/INST]"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.chat_template = LLAMA2_TEMPLATE
    path = tmp_path_factory.mktemp("bos_tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
