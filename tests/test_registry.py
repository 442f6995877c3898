"""Ids, presets, downloads and the align plan's command line, without the network."""

import os

import pytest

import backbones
import train_config
import train_stage1
from backbones import PRESETS, REGISTRY, MissingModel, resolve_model
from scripts import download_models
from utils.hub import read_hf_token


def test_every_preset_names_registry_models():
    assert {"clip-zh-qwen3-0.6b", "dinov3-qwen3vltext-align", "llava15-qwen3-1.7b"} <= set(PRESETS)  # never vacuous
    for name, preset in PRESETS.items():
        assert REGISTRY[preset["vision_tower"]].kind == "vision", name
        assert REGISTRY[preset["llm"]].kind == "llm", name


def test_missing_id_stops_with_the_exact_download_command(tmp_path):
    with pytest.raises(MissingModel) as err:
        resolve_model("qwen3-0.6b", str(tmp_path))
    assert f"python scripts/download_models.py qwen3-0.6b --models_dir {tmp_path}" in str(err.value)
    (tmp_path / "qwen3-0.6b").mkdir()
    (tmp_path / "qwen3-0.6b" / "config.json").write_text("{}")
    assert resolve_model("qwen3-0.6b", str(tmp_path)) == str(tmp_path / "qwen3-0.6b")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a known id"):
        resolve_model("no-such-model", str(tmp_path))


def test_training_without_the_models_names_all_of_them_and_one_download_command(tmp_path, tiny):
    with pytest.raises(SystemExit) as err:
        train_stage1.main(["--model", "clip-zh-qwen3-0.6b", "--models_dir", str(tmp_path), "--data_root", str(tmp_path)])
    message = str(err.value)
    assert "clip-vit-b16-zh, qwen3-0.6b" in message                       # both missing models, not the first
    assert f"python scripts/download_models.py --preset clip-zh-qwen3-0.6b --models_dir {tmp_path}" in message
    # Only part of the preset missing (the tower given as a folder): the missing id by name.
    with pytest.raises(SystemExit) as err:
        train_stage1.main(["--model", "clip-zh-qwen3-0.6b", "--vision_tower", tiny.vision, "--models_dir", str(tmp_path),
                           "--data_root", str(tmp_path)])
    assert f"python scripts/download_models.py qwen3-0.6b --models_dir {tmp_path}" in str(err.value)


def test_training_without_models_lists_the_presets():
    with pytest.raises(SystemExit) as err:
        train_stage1.main(["--data_root", "x"])
    for name, preset in PRESETS.items():
        assert f"--model {name}" in str(err.value) and preset["llm"] in str(err.value)


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what would be fetched and write a file, instead of touching the network."""
    calls = []

    def fetch(source, repo, target, token):
        calls.append((source, repo, token))
        os.makedirs(os.path.join(target, ".cache"), exist_ok=True)
        with open(os.path.join(target, "config.json"), "w") as fh:
            fh.write("{}")

    monkeypatch.setattr(backbones, "fetch_snapshot", fetch)
    return calls


def test_download_uses_modelscope_by_default_and_lands_atomically(tmp_path, fake_hub):
    path = backbones.download("qwen3-0.6b", str(tmp_path), log=lambda *a: None)
    assert fake_hub == [("modelscope", "Qwen/Qwen3-0.6B", None)]
    assert path == str(tmp_path / "qwen3-0.6b") and os.path.isfile(os.path.join(path, "config.json"))
    assert not os.path.exists(path + ".partial") and not os.path.exists(os.path.join(path, ".cache"))
    backbones.download("qwen3-0.6b", str(tmp_path), log=lambda *a: None)  # already there: no fetch
    assert len(fake_hub) == 1


def test_gated_model_needs_a_token_and_never_prints_it(tmp_path, fake_hub, monkeypatch, capsys):
    monkeypatch.delenv("MY_HF_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="gated"):
        backbones.download("dinov3-vitb16", str(tmp_path), hf_token="MY_HF_TOKEN")
    secret = "hf_secretTOKEN123"
    monkeypatch.setenv("MY_HF_TOKEN", secret)
    download_models.main(["dinov3-vitb16", "--models_dir", str(tmp_path), "--hf_token", "MY_HF_TOKEN"])
    assert fake_hub[-1] == ("hf", "facebook/dinov3-vitb16-pretrain-lvd1689m", secret)
    # a token file works the same way
    token_file = tmp_path / ".hf_token"
    token_file.write_text(secret + "\n")
    assert read_hf_token(str(token_file)) == secret
    out = capsys.readouterr()
    assert secret not in out.out + out.err


def test_preset_download_fetches_both_parts(tmp_path, fake_hub, capsys):
    download_models.main(["--preset", "clip-zh-qwen3-0.6b", "--models_dir", str(tmp_path), "--source", "hf"])
    assert [c[1] for c in fake_hub] == ["OFA-Sys/chinese-clip-vit-base-patch16", "Qwen/Qwen3-0.6B"]
    assert "--model clip-zh-qwen3-0.6b" in capsys.readouterr().out


ALIGN_ARGV = ["--stage", "align", "--model.type", "dinov3-qwen3vltext-align", "--model.align_max_steps", "20",
              "--dataset.type", "llava-v15", "--dataset.dataset_root_dir", "DATA", "--run_root_dir", "RUNS",
              "--trackers", '["jsonl"]']


def test_align_plan_command_line_maps_onto_our_flags():
    cfg = train_config.parse_args(ALIGN_ARGV + ["--model.align_learning_rate=5e-4"])
    assert (cfg.model, cfg.vision_tower, cfg.llm, cfg.projector) == (
        "dinov3-qwen3vltext-align", "dinov3-vitb16", "qwen3vl-2b-text", "mlp2x_gelu")
    assert cfg.max_steps == 20 and cfg.lr == 5e-4 and cfg.global_batch_size == 256 and cfg.batch_size == 16
    assert cfg.data_format == "chat"
    assert cfg.chat_json == os.path.join("DATA", "download", "llava-laion-cc-sbu-558k", "chat.json")
    assert cfg.image_root == os.path.join("DATA", "download", "llava-laion-cc-sbu-558k")
    assert (cfg.runs_dir, cfg.checkpoints_dir, cfg.trackers) == ("RUNS", "RUNS", "jsonl")
    cfg = train_config.parse_args(ALIGN_ARGV + ["--model.align_lr_scheduler_type", "constant",
                                                "--model.align_per_device_batch_size", "8"])
    assert cfg.lr_scheduler == "constant" and cfg.batch_size == 8


@pytest.mark.parametrize("extra, message", [
    (["--stage", "finetune"], "stage 1 only"),
    (["--dataset.type", "llava-multimodal-instruct"], "only llava-v15"),
    (["--trackers", '["mlflow"]'], "not supported"),     # Prismatic's wandb is one of ours
    (["--model.llm_backbone_id", "x"], "not an align-stage flag"),
])
def test_align_flags_refuse_what_cannot_be_done(extra, message):
    with pytest.raises(SystemExit, match=message):
        train_config.translate_align_flags(ALIGN_ARGV + extra)


def test_typed_flags_override_a_preset():
    cfg = train_config.parse_args(["--model", "clip-zh-qwen3-0.6b", "--lr", "1e-4", "--projector", "mlp2x_gelu"])
    assert (cfg.lr, cfg.projector, cfg.batch_size, cfg.max_samples) == (1e-4, "mlp2x_gelu", 16, 100_000)


def test_summary_of_every_preset_from_bundled_configs(tmp_path):
    """Token accounting works before any download: real-size configs ship in configs/."""
    from checkpoint_io import summary_from_configs as describe

    for name, preset in PRESETS.items():
        s = describe(preset["vision_tower"], preset["llm"], preset["projector"], models_dir=str(tmp_path))
        d_v, d_lm = (int(x.split("=")[1]) for x in s["widths"].split(" -> "))
        per_proj = d_v * d_lm + d_lm if preset["projector"] == "linear" else d_v * d_lm + d_lm + d_lm * d_lm + d_lm
        assert s["trainable"] == s["params"]["projector"] == per_proj, name
    course = describe("clip-vit-b16-zh", "qwen3-0.6b", "linear", models_dir=str(tmp_path))
    assert course["image_tokens_per_image"] == 197 and course["widths"] == "D_v=768 -> D_lm=1024"
    assert 0.55e9 < course["params"]["llm"] < 0.65e9          # Qwen3-0.6B, tied embeddings
    assert describe("clip-vit-l14-336", "qwen3-1.7b", models_dir=str(tmp_path))["image_tokens_per_image"] == 576
    assert describe("dinov3-vitb16", "qwen3vl-2b-text", models_dir=str(tmp_path))["image_tokens_per_image"] == 196
    assert describe("siglip-so400m-384", "qwen3vl-4b-text", models_dir=str(tmp_path))["image_tokens_per_image"] == 729
    for model_id in REGISTRY:
        assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{model_id}.json"))


def test_one_feature_table_for_describe_training_and_the_dataset_preview(tiny, tmp_path, monkeypatch, capsys):
    """A local CLIP folder: describe, training and dataset.py's preview all take the family's
    defaults (layer -2, patch tokens), so all three count the same image slots."""
    import shutil
    import sys

    from transformers import CLIPVisionConfig, CLIPVisionModel

    import dataset
    from backbones import describe, vision_defaults
    from checkpoint_io import build_model
    from model import ModelSpec
    from tests.test_backbones import VC

    clip = str(tmp_path / "clip")
    CLIPVisionModel(CLIPVisionConfig(**VC)).save_pretrained(clip)
    assert vision_defaults(clip) == {"feature_layer": -2, "feature_select": "patch", "feature_post_norm": False}
    model, _ = build_model(ModelSpec(clip, tiny.llm, **vision_defaults(clip)))
    assert describe(clip, tiny.llm)["image_tokens_per_image"] == model.spec.num_image_tokens == 16
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(f"{tiny.train}/chat.json", tmp_path / "elsewhere" / "chat.json")  # images stay in tiny.train
    argv = ["dataset.py", "--data_format", "chat", "--chat_json", str(tmp_path / "elsewhere" / "chat.json"),
            "--llm", tiny.llm, "--vision_tower", clip, "--max_samples", "5"]
    monkeypatch.setattr(sys, "argv", argv + ["--image_root", tiny.train])
    dataset.main()
    out = capsys.readouterr().out
    assert "16 image slots (patch tokens)" in out and "<|image_pad|> x 16" in out
    monkeypatch.setattr(sys, "argv", argv)                                   # no --image_root: it says why
    dataset.main()
    assert "none of the first 5 records can be used: missing_image 5" in capsys.readouterr().out
