"""Stages 2 and 3: what trains (exactly the requested set; frozen weights bit-identical), the
dialogue data (CogVLM-SFT layout, text-only records, per-turn samples on Qwen3's real template
with prompt parity against eval_llava's chat), tuned-LLM checkpoints (transformers' and PEFT's
formats, exact round trips), every downstream user of a checkpoint, export with merged LoRA,
exact resume after kill -9, and the QLoRA refusal on a CPU (torchrun: tests/test_parallel.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_stage2
import train_stage3_lora
from dataset import ImageLoader, ImageTransform, LlavaDataset, collate
from readers import COGVLM_SUBSETS, Record, read_cogvlm_sft
from checkpoint_io import build_model, checkpoint_weights, load_checkpoint, read_checkpoint_meta, save_checkpoint
from model import ModelSpec
from prompts import (IGNORE_INDEX, IMAGE_PLACEHOLDER, PromptFormat, encode_conversation, encode_prompt,
                     history_matches_live_chat, with_image_placeholder)
from tests.conftest import ROOT, common
from tuning import Tuning, add_lora, assert_trainable, check_device, set_trainable
from utils.checkpoint import find_latest

DIALOGUE = [{"role": "user", "content": "什么颜色？"}, {"role": "assistant", "content": "红色"},
            {"role": "user", "content": "什么形状？"}, {"role": "assistant", "content": "圆形"},
            {"role": "user", "content": "在哪里？"}, {"role": "assistant", "content": "左边"}]
# ChatML without a think block: history renders exactly as the live turn did.
PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def fmt_tok(toy_model):
    model, tok, fmt = toy_model
    return tok, fmt


def supervised(ids, labels) -> list[int]:
    return [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def dataset(records, tok, fmt, **kw) -> LlavaDataset:
    return LlavaDataset(records, tok, fmt, ImageTransform(size=32), ImageLoader(""), **kw)


# --------------------------------------------------------------------------- prompts and labels

def test_probe_tells_qwen3_from_a_prefix_consistent_template(fmt_tok):
    tok, fmt = fmt_tok
    assert history_matches_live_chat(tok, fmt.chat_template_kwargs) is False    # Qwen3's real template
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = PLAIN_CHATML
    assert history_matches_live_chat(plain, {}) is True


def test_qwen3_dialogue_becomes_one_sample_per_turn_with_exactly_each_answer_supervised(fmt_tok):
    tok, fmt = fmt_tok
    ds = dataset([Record(image="x.png", conversations=with_image_placeholder(DIALOGUE))], tok, fmt)
    assert ds.per_turn and len(ds) == 3
    for t in range(3):
        ids, labels = encode_conversation(tok, fmt, ds.messages(t), 128, supervise_history=False)
        answer = DIALOGUE[2 * t + 1]["content"]
        assert supervised(ids, labels) == tok.encode(answer, add_special_tokens=False) + [fmt.end_of_turn_id]
        assert ids.count(fmt.image_token_id) == fmt.num_image_tokens


def test_each_turn_is_trained_on_exactly_what_a_live_chat_feeds(fmt_tok, toy_model, monkeypatch):
    """Drive eval_llava's chat() turn by turn (the replies forced to the reference answers) and
    record the ids it feeds the model: each equals the prompt of that turn's training sample."""
    import io

    import eval_llava
    from assistant import Assistant
    from PIL import Image

    model, tok, fmt = toy_model
    assistant = Assistant.from_model(model, tok)
    fed = []
    answers = iter([DIALOGUE[1]["content"], DIALOGUE[3]["content"], DIALOGUE[5]["content"]])

    def fake_generate(input_ids, attention_mask, stop_ids, **kw):
        fed.append(input_ids[0][attention_mask[0].bool()].tolist())
        return [tok.encode(next(answers), add_special_tokens=False)]

    monkeypatch.setattr(model, "generate", fake_generate)
    monkeypatch.setattr(ImageLoader, "__call__", lambda self, src: Image.new("RGB", (40, 40)))
    typed = "/tmp/x.png\n" + "".join(m["content"] + "\n" for m in DIALOGUE if m["role"] == "user")
    eval_llava.chat(assistant, {"max_new_tokens": 4}, stdin=io.StringIO(typed))
    ds = dataset([Record(image="x.png", conversations=with_image_placeholder(DIALOGUE))], tok, fmt)
    assert len(fed) == len(ds) == 3
    for t in range(3):
        ids, labels = encode_conversation(tok, fmt, ds.messages(t), 128, supervise_history=False)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert ids[:first] == fed[t], f"turn {t + 1}"


def test_prefix_consistent_template_supervises_every_answer_in_one_sample(fmt_tok):
    tok, fmt = fmt_tok
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = PLAIN_CHATML
    fmt = PromptFormat.build(plain, "<|image_pad|>", fmt.num_image_tokens)
    ds = dataset([Record(image="x.png", conversations=with_image_placeholder(DIALOGUE))], plain, fmt)
    assert not ds.per_turn and len(ds) == 1
    ids, labels = encode_conversation(plain, fmt, ds.messages(0), 128)
    want = sum((plain.encode(m["content"], add_special_tokens=False) + [fmt.end_of_turn_id]
                for m in DIALOGUE if m["role"] == "assistant"), [])
    assert supervised(ids, labels) == want


def test_over_long_dialogues_lose_whole_trailing_turns_and_are_counted(fmt_tok):
    tok, fmt = fmt_tok
    long = [dict(m) for m in DIALOGUE]
    long[4]["content"] = "在哪里？" * 40                      # the third question alone is over budget
    rec = Record(image="", conversations=long)
    # One sample per turn (Qwen3): turns 1 and 2 train; turn 3's sample is skipped, by reason.
    ds = dataset([rec], tok, fmt, max_text_len=60)
    items = [ds[i] for i in range(len(ds))]
    assert [i.get("skip") for i in items] == [None, None, "turn_over_max_text_len"]
    # Whole dialogue in one sample: the trailing turn goes, the first two stay, counted as truncated.
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = PLAIN_CHATML
    fmt2 = PromptFormat.build(plain, "<|image_pad|>", fmt.num_image_tokens)
    item = dataset([rec], plain, fmt2, max_text_len=60)[0]
    assert item["truncated"]
    kept = supervised(item["input_ids"], item["labels"])
    assert kept == sum((plain.encode(a, add_special_tokens=False) + [fmt2.end_of_turn_id] for a in ("红色", "圆形")), [])


def test_text_only_records_have_no_image_slots_and_mix_with_image_records(fmt_tok, toy_model, tiny):
    """A batch with a text-only sample gives each sample the loss it has alone."""
    model, tok, fmt = toy_model
    chat = json.load(open(os.path.join(tiny.train, "chat.json"), encoding="utf-8"))[:2]
    records = [Record(image=chat[0]["image"], conversations=[{"role": "user", "content": "<image>\n描述这张图片"},
                                                              {"role": "assistant", "content": "红色"}]),
               Record(image="", conversations=[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "是的"}]),
               Record(image=chat[1]["image"], conversations=[{"role": "user", "content": "<image>\n什么形状？"},
                                                              {"role": "assistant", "content": "圆形"}])]
    ds = LlavaDataset(records, tok, fmt, ImageTransform.from_dict(model.spec.image_transform),
                       ImageLoader(tiny.train))
    items = [ds[i] for i in range(3)]
    assert "pixel_values" not in items[1] and fmt.image_token_id not in items[1]["input_ids"]
    for item, answer in zip(items, ("红色", "是的", "圆形")):   # each supervises exactly its answer + <|im_end|>
        assert supervised(item["input_ids"], item["labels"]) == tok.encode(answer, add_special_tokens=False) + [
            fmt.end_of_turn_id]
    batch = collate(items, tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 3
    model.eval()
    with torch.no_grad():
        together, n = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
        alone = 0.0
        for item in items:
            b = collate([item], tok.pad_token_id)
            ls, _ = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b.get("pixel_values"))
            alone += float(ls)
    assert abs(float(together) - alone) < 1e-4 * abs(alone)


def test_cogvlm_sft_reader_layout_counts_and_image_placement(tmp_path):
    root = tmp_path / "CogVLM-SFT-311K"
    for subset in COGVLM_SUBSETS:
        (root / subset / "images").mkdir(parents=True)
        (root / subset / "labels_zh").mkdir()
        (root / subset / "labels").mkdir()
    single, multi = (root / s for s in COGVLM_SUBSETS)
    conv = {"conversations": [{"role": "user", "content": "图里有什么？"}, {"role": "assistant", "content": "一只猫"}]}
    for folder, stem in ((single, "000000001"), (multi, "000000002"), (multi, "000000003")):
        (folder / "labels_zh" / f"{stem}.json").write_text(json.dumps(conv, ensure_ascii=False), encoding="utf-8")
        (folder / "labels" / f"{stem}.json").write_text(json.dumps(
            {"conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A cat"}]}))
    (single / "images" / "000000001.jpg").write_bytes(b"x")
    (multi / "images" / "000000002.jpg").write_bytes(b"x")       # 000000003 has no image
    (multi / "labels_zh" / "000000004.json").write_text("{not json")
    (multi / "images" / "000000004.jpg").write_bytes(b"x")
    records, skipped = read_cogvlm_sft(str(root))
    assert [r.image for r in records] == [f"{COGVLM_SUBSETS[0]}/images/000000001.jpg",
                                          f"{COGVLM_SUBSETS[1]}/images/000000002.jpg"]
    assert records[0].conversations[0]["content"] == f"{IMAGE_PLACEHOLDER}\n图里有什么？"   # where chat puts it
    assert skipped == {"label_without_image": 1, "bad_label_file": 1}
    assert skipped.examples["label_without_image"] == (f"{multi / 'labels_zh' / '000000003.json'}: "
                                                       f"no {COGVLM_SUBSETS[1]}/images/000000003.jpg")
    assert skipped.examples["bad_label_file"].startswith(f"{multi / 'labels_zh' / '000000004.json'}: ")
    english, _ = read_cogvlm_sft(str(root), labels="labels")
    assert english[0].conversations[1]["content"] == "A cat"
    with pytest.raises(FileNotFoundError, match="labels_xx"):
        read_cogvlm_sft(str(root), labels="labels_xx")


# --------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("tuning", [Tuning("full"), Tuning("lora"), Tuning("lora", projector=False),
                                    Tuning("full", projector=False), Tuning("lora", lora_target="all-linear")])
def test_exactly_the_requested_parameters_get_gradients(tiny, tuning):
    torch.manual_seed(0)
    model, tok = build_model(ModelSpec(vision_tower=tiny.vision, llm=tiny.llm))
    if tuning.llm == "lora":
        model.llm = add_lora(model.llm, tuning)
    model.tuning = tuning
    set_trainable(model, tuning)
    counts = assert_trainable(model, tuning)
    assert counts["vision"] == 0 and (counts["projector"] > 0) == tuning.projector
    fmt = PromptFormat.for_model(model.spec, tok)
    ids, labels = encode_conversation(tok, fmt, [{"role": "user", "content": "<image>\nq"},
                                                 {"role": "assistant", "content": "红色"}], 64)
    if tuning.llm == "lora":  # fresh LoRA B is zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    model.train()
    loss, _ = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels]),
                    pixel_values=torch.randn(1, 3, 32, 32))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == want and want
    assert all(".lora_" in n or n.startswith("projector.") for n in want) if tuning.llm == "lora" else True
    # Something trainable that the flags did not ask for is caught.
    next(p for n, p in model.named_parameters() if n.startswith("vision.")).requires_grad_(True)
    with pytest.raises(RuntimeError, match="trainable set differs"):
        assert_trainable(model, tuning)


def test_qlora_is_refused_on_a_cpu_with_the_reason(tiny, tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        check_device(Tuning("lora", load_in_4bit=True), torch.device("cpu"))
    with pytest.raises(SystemExit, match="CUDA GPU"):
        train_stage3_lora.main(["--vision_tower", tiny.vision, "--llm", tiny.llm, "--data_root", tiny.train,
                                "--data_format", "sa1b", "--load_in_4bit", "--device", "cpu",
                                "--runs_dir", str(tmp_path / "r"), "--checkpoints_dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit):   # 4-bit weights cannot be trained in full: a parse error
        train_stage2.main(["--load_in_4bit"])


def test_refusals_that_need_no_model_come_before_the_demo_builds_anything(monkeypatch, tmp_path):
    """`train_stage3_lora.py --demo --load_in_4bit` on a CPU used to run the whole stage-2 demo
    (minutes) before refusing; flash-attention on a CPU failed only at the model load."""
    import toy_demo

    def nothing_may_run(*a, **kw):
        raise AssertionError("the demo started before the refusal")

    monkeypatch.setattr(toy_demo, "ensure_toy_world", nothing_may_run)
    monkeypatch.setattr(toy_demo, "previous_demo", nothing_may_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        train_stage3_lora.main(["--demo", "--load_in_4bit", "--device", "cpu"])
    with pytest.raises(SystemExit, match="flash_attention_2 needs a CUDA GPU"):
        train_stage2.main(["--demo", "--attn", "flash_attention_2", "--device", "cpu"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage, llm", [(2, "full"), (3, "lora")])
def test_a_tuned_checkpoint_given_as_stage1_is_refused_naming_init(chain, tmp_path, stage, llm):
    """--stage1 promises a projector-only start; a tuned checkpoint would silently start from its
    tuned LLM instead. The meaning of --init is what the user wanted."""
    tuned = chain[stage + 1]                      # (folder, data, s1, s2, s3)
    with pytest.raises(SystemExit, match=rf"a stage-{stage} checkpoint \(LLM tuned: {llm}\), not a stage-1 one\. "
                                         rf"To continue from this tuned model use --init {tuned}"):
        train_stage2.main(["--stage1", str(tuned), "--data_root", str(tmp_path), "--runs_dir", str(tmp_path / "r"),
                           "--checkpoints_dir", str(tmp_path / "c")])


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind", ["full", "lora"])
def test_tuned_checkpoint_round_trip_is_exact_in_the_libraries_own_formats(tiny, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    tuning = Tuning(kind)
    model, tok = build_model(ModelSpec(vision_tower=tiny.vision, llm=tiny.llm))
    if kind == "lora":
        model.llm = add_lora(model.llm, tuning)
    model.tuning = tuning
    set_trainable(model, tuning)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model, str(tmp_path), {"step": 1, "stage": 2}, tok)
    # What training writes: the trained weights gathered whole (FSDP's path, here from one process)
    # give the same files, tied weights saved once.
    save_checkpoint(model, str(tmp_path / "gathered"), {"step": 1, "stage": 2}, tok, checkpoint_weights(model))
    for sub in ("projector.safetensors", "llm/model.safetensors", "adapter/adapter_model.safetensors"):
        if os.path.isfile(tmp_path / sub):   # (the bytes of a header with two metadata keys vary in order)
            a, b = load_file(tmp_path / sub), load_file(tmp_path / "gathered" / sub)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert read_checkpoint_meta(str(tmp_path)) == read_checkpoint_meta(str(tmp_path / "gathered"))
    again, _, meta = load_checkpoint(str(tmp_path))
    assert meta["tuning"]["llm"] == kind
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model.llm(input_ids=ids).logits, again.llm(input_ids=ids).logits)
    for a, b in zip(model.projector.parameters(), again.projector.parameters()):
        assert torch.equal(a, b)
    # The folders load with the libraries alone.
    if kind == "full":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny.llm)
        plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    assert not any(n.endswith((".bin", ".pt", ".pth")) for _, _, fs in os.walk(tmp_path) for n in fs)


# --------------------------------------------------------------------------- the stages end to end

def test_stage2_trains_llm_and_projector_only_and_stage3_trains_adapters_only(tiny, chain):
    out, data, s1, s2, s3 = chain
    from transformers import AutoModelForCausalLM

    llm0 = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny.llm).state_dict().items()}
    meta2, meta3 = (json.load(open(os.path.join(c, "model_spec.json"), encoding="utf-8")) for c in (s2, s3))
    assert (meta2["stage"], meta2["tuning"]["llm"], meta2["init_from"]) == (2, "full", s1)
    assert (meta3["stage"], meta3["tuning"]["llm"], meta3["init_from"]) == (3, "lora", s2)
    assert meta3["spec"]["llm"] == os.path.join(s2, "llm")         # stage 3's base: stage 2's LLM, named by its folder
    # Stage 2 changed the LLM; stage 3 left that base untouched (its adapters live apart).
    llm2 = load_file(os.path.join(s2, "llm", "model.safetensors"))
    assert any(not torch.equal(llm2[k], llm0[k]) for k in llm2 if k in llm0)
    m3, _, _ = load_checkpoint(s3)
    base3 = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in m3.llm.state_dict().items() if "lora_" not in k}
    for k, v in llm2.items():
        assert torch.equal(base3[k], v), k
    # The vision tower is bit-identical to its files after both stages.
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tiny.vision).state_dict()
    for k, v in m3.vision.model.state_dict().items():
        assert torch.equal(v, tower[k]), k
    # Projector: trained in both stages.
    p1, p2, p3 = (load_file(os.path.join(c, "projector.safetensors")) for c in (s1, s2, s3))
    assert any(not torch.equal(p1[k], p2[k]) for k in p1) and any(not torch.equal(p2[k], p3[k]) for k in p2)


def test_every_stage_checkpoint_chats_evaluates_and_exports(tiny, chain, tmp_path, capsys):
    import eval_llava
    from scripts import export_hf
    from utils import console

    out, data, s1, s2, s3 = chain
    image = os.path.join(data.style_images, json.load(open(data.style_eval, encoding="utf-8"))[0]["image"])
    for ckpt in (s2, s3):
        try:
            eval_llava.main(["--checkpoint", ckpt, "--image", image, "--prompt", "什么颜色？", "--max_new_tokens", "4",
                             "--device", "cpu"])
            eval_llava.main(["--checkpoint", ckpt, "--vqa", data.style_eval, "--image_root", data.style_images,
                             "--out_dir", str(tmp_path / "vqa"), "--device", "cpu", "--answer_tokens", "4"])
            eval_llava.main(["--checkpoint", ckpt, "--captions", os.path.join(tiny.eval, "chat.json"),
                             "--out_dir", str(tmp_path / "cap"), "--device", "cpu", "--max_new_tokens", "4"])
        finally:
            console.set_stream(None)
        printed = capsys.readouterr().out
        assert '"overall"' in printed and '"captioned"' in printed
    # Export of the LoRA run: a plain LLaVA with the adapters merged, the same logits as ours.
    from transformers import LlavaForConditionalGeneration

    assert export_hf.main(["--checkpoint", s3, "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    ours, tok, _ = load_checkpoint(s3)
    ours.eval()
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    fmt = PromptFormat.for_model(ours.spec, tok)
    ids = torch.tensor([encode_prompt(tok, fmt, [{"role": "user", "content": "<image>\n什么颜色？"}])[0]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = ours.llm(inputs_embeds=ours.embed(ids, ours.encode_images(px))).logits
        b = llava(input_ids=ids, pixel_values=px).logits
    assert float((a - b).abs().max()) < 1e-4
    assert "peft" not in open(tmp_path / "hf" / "config.json").read()


def test_a_lora_start_point_is_refused_for_more_lora(chain, tmp_path):
    out, data, s1, s2, s3 = chain
    with pytest.raises(SystemExit, match="LoRA adapters already"):
        train_stage3_lora.main(["--init", s3, "--data_format", "chat", "--chat_json", data.style_train,
                                "--image_root", data.style_images, *common(tmp_path, "again", 2)])


# --------------------------------------------------------------------------- resume

def run_script(script, argv, **kw):
    """The script as a user runs it, on as many threads as this process (the in-process reference
    runs beside it: the same thread count is what makes the two bit-identical)."""
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, **kw)


def trained_weights(step_dir) -> dict:
    out = dict(load_file(os.path.join(step_dir, "projector.safetensors")))
    for sub in ("llm/model.safetensors", "adapter/adapter_model.safetensors"):
        if os.path.isfile(os.path.join(step_dir, sub)):
            out.update({f"{sub}:{k}": v for k, v in load_file(os.path.join(step_dir, sub)).items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_stage2.py", "train_stage3_lora.py"])
def test_kill_9_then_resume_is_bit_identical_in_stages_2_and_3(chain, tmp_path, script):
    from tests.test_resume import losses, wait_for_checkpoint

    out, data, s1, s2, s3 = chain
    start = ["--stage1", s1] if script == "train_stage2.py" else ["--init", s2]
    argv = [*start, "--data_format", "cogvlm_sft", "--data_root", data.sft_train, "--eval_ratio", "0.1",
            "--lr", "1e-3", "--seed", "3"]

    def go(name, *extra):
        return run_script(script, [*argv, *common(tmp_path, name, 12), *extra])

    # The uninterrupted reference runs in this process; the interrupted run as a user's would.
    entry = train_stage2 if script == "train_stage2.py" else train_stage3_lora
    entry.main([*argv, *common(tmp_path, "ref", 12)])
    proc = go("cut")
    wait_for_checkpoint(proc, tmp_path / "ck" / "cut")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_at = int(os.path.basename(find_latest(str(tmp_path / "ck" / "cut")))[5:])
    assert resumed_at < 12
    proc = go("cut", "--resume", "auto")
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and f"at step {resumed_at}" in log, log[-3000:]
    a, b = trained_weights(tmp_path / "ck" / "ref" / "step_000012"), trained_weights(tmp_path / "ck" / "cut" / "step_000012")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = losses(tmp_path / "runs" / "ref"), losses(tmp_path / "runs" / "cut")
    assert la == lb
