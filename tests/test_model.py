"""The combined model: slot scatter, lean loss, frozen parts, save/load."""

import pytest
import torch

from dataset import ImageLoader, ImageTransform, LlavaDataset, collate, to_device
from readers import read_records
from checkpoint_io import load_checkpoint, read_checkpoint_meta, save_checkpoint
from model import Projector
from tests.conftest import tolerance


def toy_batch(model, tok, fmt, tiny, n=4):
    """A collated batch on the model's device (the test device for toy_model)."""
    records, _, root = read_records("sa1b", tiny.train, max_samples=n)
    ds = LlavaDataset(records, tok, fmt, ImageTransform.from_dict(model.spec.image_transform), ImageLoader(root))
    return to_device(collate([ds[i] for i in range(n)], tok.pad_token_id), next(model.projector.parameters()).device)


@pytest.mark.device
def test_slot_count_mismatch_raises(toy_model, tiny):
    model, tok, fmt = toy_model
    batch = toy_batch(model, tok, fmt, tiny, 2)
    ids = batch["input_ids"].clone()
    first_slot = (ids[0] == model.image_token_id).nonzero()[0, 0]
    ids[0, first_slot] = tok.pad_token_id  # one slot short
    with pytest.raises(ValueError, match="image slots"):
        model(ids, batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])


@pytest.mark.device
def test_only_the_projector_receives_gradients(toy_model, tiny):
    model, tok, fmt = toy_model
    batch = toy_batch(model, tok, fmt, tiny)
    model.train()
    assert not model.llm.training and not model.vision.training  # frozen parts stay in eval
    model.zero_grad(set_to_none=True)
    loss_sum, n = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    model.zero_grad(set_to_none=True)


@pytest.mark.device
def test_lean_loss_equals_full_logits_loss(toy_model, tiny):
    model, tok, fmt = toy_model
    batch = toy_batch(model, tok, fmt, tiny)
    with torch.no_grad():
        loss_sum, n = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"])
        embeds = model.embed(batch["input_ids"], model.encode_images(batch["pixel_values"]))
        # transformers' own loss: full [B, T, V] logits, shifted labels, mean over tokens.
        ref = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, ref.float(), **tolerance(ref.device))


@pytest.mark.parametrize("bias, cap, tied", [(False, None, True), (True, None, False), (True, 3.0, False)])
def test_chunked_loss_equals_the_whole_one_in_value_and_gradients(bias, cap, tied):
    """ChunkedCrossEntropy against F.cross_entropy over whole [M, V] logits: the loss and the
    gradients of the hidden states, the head's weight (tied to the embeddings: both paths add up)
    and bias, with and without soft-capping, chunks that do not divide M."""
    from model import ChunkedCrossEntropy

    torch.manual_seed(0)
    M, D, V = 37, 16, 50
    embed = torch.nn.Embedding(V, D)
    head = torch.nn.Linear(D, V, bias=bias)
    if tied:
        head.weight = embed.weight
    hidden0, targets = torch.randn(M, D, dtype=torch.float64).float(), torch.randint(0, V, (M,))
    ids = torch.randint(0, V, (5,))

    def run(chunk):
        for p in [*head.parameters(), *embed.parameters()]:
            p.grad = None
        hidden = hidden0.clone().requires_grad_(True)
        if chunk:
            loss = ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, cap)
        else:
            z = head(hidden)
            loss = torch.nn.functional.cross_entropy(torch.tanh(z / cap) * cap if cap else z, targets, reduction="sum")
        (loss * 0.5 + embed(ids).sum()).backward()          # a scale reaches backward; the embedding adds its part
        return loss.detach(), hidden.grad, head.weight.grad.clone(), None if head.bias is None else head.bias.grad.clone()

    whole = run(0)
    for chunk in (1, 8, 37, 64):
        for a, b in zip(run(chunk), whole):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_computes_as_the_whole_one_does():
    """Under autocast the chunks' matmuls run in bf16, as the whole logits' do (softmax in fp32)."""
    from model import ChunkedCrossEntropy

    torch.manual_seed(0)
    head, targets = torch.nn.Linear(32, 300, bias=False), torch.randint(0, 300, (40,))
    hidden0 = torch.randn(40, 32)
    out = {}
    for chunk in (0, 16):
        hidden = hidden0.clone().requires_grad_(True)
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (ChunkedCrossEntropy.apply(hidden, head.weight, None, targets, chunk, None) if chunk else
                    torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum"))
        loss.backward()
        out[chunk] = loss.detach(), hidden.grad, head.weight.grad
    for a, b in zip(out[16], out[0]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    fp32 = torch.nn.functional.cross_entropy(head(hidden0), targets, reduction="sum")
    assert out[16][0] != fp32       # the matmuls did run in bf16


@pytest.mark.device
def test_the_model_loss_in_chunks_equals_the_whole_one(toy_model, tiny):
    model, tok, fmt = toy_model
    batch = toy_batch(model, tok, fmt, tiny)
    results = []
    for chunk in (0, 5):
        model.ce_chunk_size = chunk
        model.zero_grad(set_to_none=True)
        loss_sum, n = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                            pixel_values=batch["pixel_values"])
        (loss_sum / n).backward()
        assert n > chunk
        results.append((loss_sum.detach(), [p.grad.clone() for p in model.projector.parameters()]))
    model.ce_chunk_size = 0
    model.zero_grad(set_to_none=True)
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, **tolerance())
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, **tolerance())


@pytest.mark.device
def test_image_features_land_in_the_slots(toy_model, tiny):
    model, tok, fmt = toy_model
    batch = toy_batch(model, tok, fmt, tiny, 2)
    feats = model.encode_images(batch["pixel_values"])                  # [B, N, D_v]
    embeds = model.embed(batch["input_ids"], feats)
    slots = batch["input_ids"] == model.image_token_id
    projected = model.projector(feats.float()).to(embeds.dtype)        # frozen parts may be bf16 on a GPU
    torch.testing.assert_close(embeds[slots].view(2, -1, embeds.shape[-1]), projected)
    text = model.llm.get_input_embeddings()(batch["input_ids"].masked_fill(slots, 0))
    torch.testing.assert_close(embeds[~slots], text[~slots])


def test_save_load_round_trip_is_exact_and_strict(toy_model, tmp_path):
    model, tok, fmt = toy_model
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p))
    ckpt = save_checkpoint(model, str(tmp_path / "ck"), {"step": 7})
    meta = read_checkpoint_meta(str(tmp_path / "ck"))
    assert meta["step"] == 7 and meta["spec"]["projector"] == "mlp2x_gelu"
    loaded, _, _ = load_checkpoint(str(tmp_path / "ck"))               # nothing but the checkpoint
    for (k, a), (k2, b) in zip(model.projector.state_dict().items(), loaded.projector.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.spec == model.spec
    # A file whose keys do not match the projector is refused, not half-loaded.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(ckpt, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    tensors["linear_3.weight"] = torch.zeros(1)
    save_file(tensors, ckpt, metadata=metadata)
    with pytest.raises(RuntimeError, match="unexpected"):
        load_checkpoint(str(tmp_path / "ck"))


def test_generate_batched_equals_one_by_one(toy_model, tiny):
    from assistant import Assistant

    model, tok, fmt = toy_model
    asst = Assistant.from_model(model, tok)
    records, _, root = read_records("sa1b", tiny.eval, max_samples=3)
    items = [(ImageLoader(root)(r.image), [{"role": "user", "content": q}])
             for r, q in zip(records, ["描述这张图片", "这张图片里有什么？", "请描述这张图片。"])]
    together = asst.reply_batch(items, max_new_tokens=12)
    alone = [asst.reply_batch([it], max_new_tokens=12)[0] for it in items]
    assert together == alone


def test_projector_shapes_and_names():
    lin, mlp = Projector("linear", 8, 16), Projector("mlp2x_gelu", 8, 16)
    assert set(lin.state_dict()) == {"linear_1.weight", "linear_1.bias"}
    assert set(mlp.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert mlp(torch.zeros(2, 3, 8)).shape == (2, 3, 16)
    with pytest.raises(ValueError):
        Projector("qformer", 8, 16)


def test_frozen_loads_are_strict_about_missing_weights(tiny, tmp_path):
    """A tower folder without some of its weights must not load as random frozen weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from checkpoint_io import load_vision_tower

    bad = tmp_path / "vision"
    shutil.copytree(tiny.vision, bad)
    state = load_file(str(bad / "model.safetensors"))
    state.pop(next(k for k in state if "encoder.layers.0" in k))
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="missing"):
        load_vision_tower(str(bad))


def test_vision_tower_loads_from_a_whole_dual_tower_clip(tmp_path):
    """openai/clip-* and OFA-Sys/chinese-clip-* ship text + vision in one folder."""
    from transformers import CLIPConfig, CLIPModel

    from checkpoint_io import load_vision_tower

    vc = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
              bos_token_id=0, eos_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=vc, text_config=tc)).eval()
    full.save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path), feature_layer=-2, select="patch")
    x = torch.randn(2, 3, 32, 32)
    expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tower(x), expected)
    assert tower.num_tokens == 16
