"""A short training run on each preset's shape, with tiny checkpoints in the real formats:
the course (ModelScope Chinese CLIP + linear + Qwen3), LLaVA-1.5 (dual-tower CLIP, layer -2,
patches, mlp2x_gelu) and the align plan's own torchrun command line (DINOv3 + Qwen3-VL text)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import train_stage1
from checkpoint_io import read_checkpoint_meta
from tests.conftest import ROOT
from tests.test_backbones import VC, make_dinov3, make_qwen3vl, write_modelscope_clip

# Qwen3-VL Instruct renders ChatML without a think block; stored beside the processor.
QWEN3VL_STYLE_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def common(tiny, tmp_path, steps=6):
    return ["--data_root", tiny.train, "--eval_data_root", tiny.eval, "--max_steps", str(steps), "--batch_size", "4",
            "--num_workers", "0", "--eval_interval", "0", "--eval_samples", "8", "--sample_replies", "0",
            "--runs_dir", str(tmp_path / "runs"), "--checkpoints_dir", str(tmp_path / "ck"), "--run_name", "p"]


def test_course_preset_with_the_modelscope_clip(tiny, tmp_path):
    write_modelscope_clip(tmp_path / "clip_ms")
    summary = train_stage1.main(["--model", "clip-zh-qwen3-0.6b", "--vision_tower", str(tmp_path / "clip_ms"),
                                 "--llm", tiny.llm, *common(tiny, tmp_path)])
    spec = read_checkpoint_meta(summary["checkpoint"])["spec"]
    assert (spec["projector"], spec["vision_type"], spec["num_image_tokens"]) == ("linear", "modelscope_chinese_clip", 17)
    assert (spec["feature_layer"], spec["feature_select"], spec["feature_post_norm"]) == (-1, "all", True)
    assert spec["image_transform"]["mode"] == "square" and spec["image_wrap"] is False
    assert spec["vision_path"] == str(tmp_path / "clip_ms") and spec["llm_path"] == tiny.llm
    meta = read_checkpoint_meta(summary["checkpoint"])
    assert meta["train_config"]["model"] == "clip-zh-qwen3-0.6b" and meta["train_config"]["max_samples"] == 100_000


def test_llava15_preset_with_a_dual_tower_clip(tiny, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    CLIPModel(CLIPConfig(vision_config=VC, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=4, vocab_size=99, bos_token_id=0,
                                                            eos_token_id=1))).save_pretrained(tmp_path / "clip")
    summary = train_stage1.main(["--model", "llava15-qwen3-1.7b", "--vision_tower", str(tmp_path / "clip"),
                                 "--llm", tiny.llm, "--global_batch_size", "8", *common(tiny, tmp_path)])
    spec = read_checkpoint_meta(summary["checkpoint"])["spec"]
    assert (spec["projector"], spec["feature_layer"], spec["feature_select"], spec["num_image_tokens"]) == (
        "mlp2x_gelu", -2, "patch", 16)
    assert summary["global_batch"] == 8  # 4 per step x 2 accumulated


@pytest.fixture(scope="module")
def qwen3vl_llm(tiny, tmp_path_factory):
    """A tiny Qwen3-VL checkpoint with the tiny (Qwen-style) tokenizer and the template beside it."""
    path = tmp_path_factory.mktemp("qwen3vl")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.llm)
    make_qwen3vl(path, vocab_size=len(tok))
    tok.chat_template = None
    tok.save_pretrained(path)
    for name in ("chat_template.jinja",):
        if os.path.exists(path / name):
            os.remove(path / name)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3VL_STYLE_TEMPLATE}))
    return path


@pytest.mark.slow
def test_align_plan_command_line_under_torchrun(tiny, tmp_path, qwen3vl_llm):
    make_dinov3(tmp_path / "dinov3")
    # The plan's layout: <dataset_root_dir>/download/llava-laion-cc-sbu-558k/chat.json, images beside it.
    root = tmp_path / "data" / "download" / "llava-laion-cc-sbu-558k"
    root.mkdir(parents=True)
    shutil.copy(os.path.join(tiny.train, "chat.json"), root / "chat.json")
    os.symlink(os.path.join(tiny.train, "images"), root / "images")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "train_stage1.py", "--stage", "align", "--model.type", "dinov3-qwen3vltext-align",
           "--model.align_max_steps", "4", "--model.align_global_batch_size", "8",
           "--model.align_per_device_batch_size", "2", "--dataset.type", "llava-v15",
           "--dataset.dataset_root_dir", str(tmp_path / "data"), "--run_root_dir", str(tmp_path / "runs"),
           "--trackers", '["jsonl"]', "--run_id", "align", "--vision_tower", str(tmp_path / "dinov3"),
           "--llm", str(qwen3vl_llm), "--num_workers", "0", "--eval_samples", "8", "--sample_replies", "1",
           "--eval_data_root", tiny.eval, "--eval_chat_json", os.path.join(tiny.eval, "chat.json")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "align" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 4
    assert os.path.isfile(tmp_path / "runs" / "align" / "metrics.jsonl")
    assert not any(n.startswith("events.out") for n in os.listdir(tmp_path / "runs" / "align"))  # jsonl only
    spec = read_checkpoint_meta(summary["checkpoint"])["spec"]
    assert (spec["vision_type"], spec["feature_select"], spec["num_image_tokens"]) == ("dinov3_vit", "patch", 16)
    assert spec["projector"] == "mlp2x_gelu" and spec["image_wrap"] is True  # Qwen3-VL's own markers
    assert "<|vision_start|>" in res.stdout  # the first sample shows the wrapped slots
