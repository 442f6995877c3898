"""Performance features keep the numbers: packing, length grouping, gradient checkpointing,
and the benchmark (ours vs transformers' LLaVA on the same weights) runs and writes its JSON."""

import json

import pytest
import torch

from dataset import EpochSampler, ImageLoader, ImageTransform, LlavaDataset, collate, collate_packed
from readers import read_records


def _batch_items(tiny, model, tok, fmt, n=6):
    records, _, root = read_records("sa1b", tiny.eval)
    ds = LlavaDataset(records, tok, fmt, ImageTransform.from_dict(model.spec.image_transform), ImageLoader(root),
                       instructions="zh")
    return [ds[i] for i in range(n)]


def _loss_and_grad(model, batch):
    model.projector.zero_grad(set_to_none=True)
    ls, nt = model(batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"],
                   position_ids=batch.get("position_ids"))
    (ls / nt).backward()
    return (ls / nt).item(), int(nt), model.projector.linear_1.weight.grad.clone()


def test_packed_batch_gives_the_padded_loss_and_gradient(tiny, toy_model):
    model, tok, fmt = toy_model
    items = _batch_items(tiny, model, tok, fmt)
    padded, packed = collate(items, tok.pad_token_id), collate_packed(items, tok.pad_token_id)
    assert packed["input_ids"].shape == (1, sum(len(i["input_ids"]) for i in items))
    assert padded["input_ids"].numel() > packed["input_ids"].numel()   # the padding is gone
    loss_a, n_a, grad_a = _loss_and_grad(model, padded)
    loss_b, n_b, grad_b = _loss_and_grad(model, packed)
    assert n_a == n_b
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)
    # Without the restarting positions the samples would attend to each other: a different loss.
    no_pos = dict(packed)
    no_pos.pop("position_ids")
    assert _loss_and_grad(model, no_pos)[0] != pytest.approx(loss_a, rel=1e-5)


def test_gradient_checkpointing_keeps_loss_and_gradient(tiny, toy_model):
    model, tok, fmt = toy_model
    batch = collate(_batch_items(tiny, model, tok, fmt, 4), tok.pad_token_id)
    model.train()
    before = _loss_and_grad(model, batch)
    calls = []
    attn = model.llm.get_decoder().layers[0].self_attn
    handle = attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        _loss_and_grad(model, batch)
        plain = len(calls)
        model.enable_gradient_checkpointing()
        calls.clear()
        after = _loss_and_grad(model, batch)
    finally:
        handle.remove()
        (getattr(model.llm, "activation_checkpointing_disable", None) or model.llm.gradient_checkpointing_disable)()
        model.checkpointed_layers = []
    assert plain == 1 and len(calls) == 2                            # recomputed in backward
    assert model.llm.training is False                                # frozen parts stay in eval mode
    assert after[0] == pytest.approx(before[0], rel=1e-6)
    torch.testing.assert_close(after[2], before[2], rtol=1e-5, atol=1e-7)


def test_length_grouping_is_a_seeded_partition_of_similar_lengths():
    lengths = [int(x) for x in torch.randint(1, 500, (400,), generator=torch.Generator().manual_seed(0))]
    kw = dict(n=400, seed=1, epoch=0, lengths=lengths, batch_size=8, world_size=2)
    ranks = [EpochSampler(rank=r, **kw).indices() for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(400))
    assert ranks[0] == EpochSampler(rank=0, **kw).indices()           # resumable: same order again
    spread = lambda order: sum(max(lengths[i] for i in order[b:b + 8]) - min(lengths[i] for i in order[b:b + 8])
                               for b in range(0, len(order), 8))
    plain = EpochSampler(400, seed=1, epoch=0, rank=0, world_size=2).indices()
    assert spread(ranks[0]) < spread(plain) / 5


def test_benchmark_runs_on_cpu_and_writes_json(tmp_path):
    from scripts.benchmark import main

    out = tmp_path / "bench.json"
    result = main(["--arch", "tiny", "--batch_size", "2", "--steps", "1", "--warmup", "1", "--json", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    for who in ("ours", "reference"):   # the figures agree with each other: one step of batch 2, seq tokens each
        r = on_disk[who]
        assert r["samples_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3), rel=0.01)
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * on_disk["seq_len"], rel=0.01)
        assert r["peak_mem_bytes"] > 2**20                             # the RSS of a process that holds torch
    assert on_disk["seq_len"] == 4 + 17 + 64 and on_disk["supervised_tokens"] == 48
    assert on_disk["ratio"] == pytest.approx(on_disk["ours"]["samples_per_s"] / on_disk["reference"]["samples_per_s"],
                                             rel=1e-2)
    assert "mfu" in on_disk and on_disk["mfu"] is None                  # no peak FLOP/s for a CPU
    # the same weights and batch: LLaVA's own loss equals ours before training
    assert on_disk["initial_loss"]["ours"] == pytest.approx(on_disk["initial_loss"]["reference"], rel=1e-5)
    cached = main(["--arch", "tiny", "--batch_size", "2", "--steps", "1", "--warmup", "0", "--cached_features",
                   "--no_reference"])
    assert cached["cached_features"] and cached["flops_per_sample"] < on_disk["flops_per_sample"]
    assert "reference" not in cached and cached["comparison"] == []


def test_benchmark_compares_equal_computations_and_sweeps_both_models():
    """The align plan's shape (final norm on features, DINOv3's registers dropped) is not what
    LLaVA computes: the comparison runs both without the norm and with every token, and the
    losses before training agree. The sweep finds each model's largest batch."""
    from scripts.benchmark import ARCHS, main

    assert ARCHS["tiny_align"].feature_post_norm and ARCHS["tiny_align"].feature_select == "patch"
    r = main(["--arch", "tiny_align", "--batch_size", "1", "--steps", "1", "--warmup", "0", "--sweep",
              "--sweep_limit", "4"])
    assert len(r["comparison"]) == 2 and r["image_tokens"] == 16 + 5
    assert r["initial_loss"]["ours"] == pytest.approx(r["initial_loss"]["reference"], rel=1e-5)
    for who in ("ours", "reference"):
        assert [t["batch_size"] for t in r["sweep"][who]["tried"]] == [1, 2, 4]
        assert r["sweep"][who]["largest_batch"] == 4
    assert r["batch_size"] == 4                                        # compared where both fit
    assert r["logits_bytes"] == {"ours": 4 * 48 * 1000 * 4, "reference": 4 * r["seq_len"] * 1000 * 4}
    # Ours alone keeps the arch as defined: the norm and the patch-only selection.
    alone = main(["--arch", "tiny_align", "--batch_size", "1", "--steps", "1", "--warmup", "0", "--no_reference"])
    assert alone["image_tokens"] == 16 and alone["comparison"] == []


@pytest.mark.slow   # four fresh processes
def test_benchmark_compares_chunked_loss_and_precision_side_by_side(tmp_path):
    """--compare: each variant in a process of its own, on the same batch and weights. Chunks
    change no loss (up to float rounding); bf16 changes it by rounding, not more."""
    from scripts.benchmark import main

    common = ["--arch", "tiny", "--batch_size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    chunks = main([*common, "--compare", "ce_chunk_size", "--ce_chunk_size", "16", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["max_loss_diff"] == chunks["max_loss_diff"]
    whole, chunked = chunks["variants"]["whole loss"], chunks["variants"]["chunks of 16"]
    assert (whole["ce_chunk_size"], chunked["ce_chunk_size"]) == (0, 16) and len(chunked["ours"]["losses"]) == 3
    assert chunks["max_loss_diff"] < 1e-5
    assert chunked["logits_bytes"]["ours"] == 16 * 1000 * 4 < whole["logits_bytes"]["ours"]
    precision = main([*common, "--compare", "precision"])
    fp32, bf16 = precision["variants"]["fp32"], precision["variants"]["bf16"]
    assert (fp32["precision"], bf16["precision"], bf16["dtype"]) == ("fp32", "bf16", "torch.bfloat16")
    assert 0 < precision["max_loss_diff"] < 1e-2


def test_step_flops_counts_each_part(tiny, toy_model):
    """The FLOP count behind MFU: vision only from images, LLM quadratic in length, head per token."""
    from utils.flops import sample_lengths, step_flops

    model, tok, fmt = toy_model
    items = _batch_items(tiny, model, tok, fmt, 4)
    padded, packed = collate(items, tok.pad_token_id), collate_packed(items, tok.pad_token_id)
    assert sample_lengths(packed) == sample_lengths(padded) == [len(i["input_ids"]) for i in items]
    lengths = sample_lengths(padded)
    full = step_flops(model, 4, lengths, 40)
    cached = step_flops(model, 4, lengths, 40, cached=True)
    assert full > cached > 0
    assert step_flops(model, 4, lengths, 41) - step_flops(model, 4, lengths, 40) == \
        4 * model.llm.config.vocab_size * model.llm.config.hidden_size
    one, two = step_flops(model, 1, [10], 0, True), step_flops(model, 1, [20], 0, True)
    assert two > 2 * one - 6.0 * sum(p.numel() for p in model.projector.parameters()) * model.spec.num_image_tokens
