"""Evaluation during training, on the held-out set: loss, perplexity and the image-ablation
gap (is the image used at all?), a few sample replies for TensorBoard, and caption exact match
(the demo's proof of alignment). Training and the demos call these; nothing here parses flags.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from assistant import Assistant
from dataset import LlavaDataset, collate, to_device
from model import LlavaModel
from prompts import IGNORE_INDEX, caption_messages
from utils import console
from utils.dist import all_reduce_sum, gather_objects, ignore_stop_signals, rank_and_world
from utils.metrics import RunLogger
from utils.skips import SampleError


@torch.no_grad()
def heldout_loss(model: LlavaModel, ds: LlavaDataset, n: int = 0, batch_size: int = 16,
                 num_workers: int = 0) -> dict:
    """Held-out loss, perplexity and the image-ablation gap over the first n records (0 = all).

    The gap is the held-out loss with every image swapped for another sample's image minus
    the loss with the right one. A projector that carries visual information makes it clearly
    positive; an untrained one (or an LLM that ignores the slots) leaves it near zero, however
    low the loss is, because captions alone are partly predictable. Swapping is a roll by one
    within each batch (a batch of one borrows the previous batch's image), so it costs one
    more forward pass and never a second image decode.

    Under torchrun every rank evaluates its share of the records (rank r: every r-th) and the
    sums are added over ranks. A sharded model all-gathers its weights in every forward, so each
    rank then runs the same number of forwards: two per batch, on a one-token filler batch (no
    supervised token) where its share has run out or a batch could not be read.
    """
    device = next(model.projector.parameters()).device
    pad_id = ds.tokenizer.pad_token_id if ds.tokenizer.pad_token_id is not None else 0
    rank, world = rank_and_world()
    count = min(n, len(ds)) if n else len(ds)
    subset = torch.utils.data.Subset(ds, range(rank, count, world))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=lambda b: collate(b, pad_id), worker_init_fn=ignore_stop_signals)
    steps = math.ceil(math.ceil(count / world) / batch_size)        # the same on every rank
    synced = world > 1
    filler = torch.full((1, 1), pad_id, device=device)
    was_training = model.training
    model.eval()
    key = "image_features" if getattr(ds, "features", None) is not None else "pixel_values"
    loss_sum, tokens, other = 0.0, 0, None
    right_sum, swapped_sum, swapped_tokens = 0.0, 0.0, 0   # over the batches that had a swap
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None or not batch["size"]:
            for _ in range(2 if synced else 0):
                model(filler, torch.ones_like(filler), torch.full_like(filler, IGNORE_INDEX))
            continue
        batch = to_device(batch, device)
        images = batch.get(key)                                      # [B_img, 3, H, W] or [B_img, N, D_v]
        with model.autocast():
            ls, nt = model(batch["input_ids"], batch["attention_mask"], batch["labels"], **{key: images})
            wrong = None if images is None else torch.roll(images, 1, 0) if len(images) > 1 else other
            if wrong is not None:
                ws, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"], **{key: wrong})
                swapped_sum, right_sum, swapped_tokens = swapped_sum + ws.item(), right_sum + ls.item(), swapped_tokens + int(nt)
            elif synced:  # nothing to swap here: the second forward of this batch, not counted
                model(batch["input_ids"], batch["attention_mask"], batch["labels"], **{key: images})
        if images is not None:
            other = images[:1]
        loss_sum += ls.item()
        tokens += int(nt)
    model.train(was_training)
    # Summed over ranks (exact in float64: the same figures in one process).
    loss_sum, tokens, right_sum, swapped_sum, swapped_tokens = all_reduce_sum(torch.tensor(
        [loss_sum, tokens, right_sum, swapped_sum, swapped_tokens], dtype=torch.float64, device=device)).tolist()
    loss = loss_sum / max(tokens, 1)
    out = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
    if swapped_tokens:
        out["eval/image_ablation_gap"] = (swapped_sum - right_sum) / swapped_tokens
    return out


def log_heldout_loss(model: LlavaModel, ds: LlavaDataset, n: int, batch_size: int, num_workers: int,
                     logger: RunLogger | None, step: int) -> dict:
    """heldout_loss at a training step: printed, logged, returned."""
    metrics = heldout_loss(model, ds, n, batch_size, num_workers)
    gap = metrics.get("eval/image_ablation_gap")
    console.info(f"  eval @ {step}: loss {metrics['eval/loss']:.4f} ppl {metrics['eval/ppl']:.2f}"
          + (f" | image-ablation gap {gap:+.4f}" if gap is not None else ""))
    if logger:
        logger.log(step, metrics)
    return metrics


def eval_summary(metrics: dict) -> dict:
    """Held-out metrics under their summary.json names."""
    out = {"eval_loss": metrics["eval/loss"], "eval_ppl": metrics["eval/ppl"]}
    if "eval/image_ablation_gap" in metrics:
        out["image_ablation_gap"] = metrics["eval/image_ablation_gap"]
    return out


def heldout_items(ds: LlavaDataset, n: int, instruction: str | None = None):
    """The first n held-out records as (image, prompt messages) items and reference answers.

    `instruction` replaces the (randomly drawn) instruction of caption records, so scores
    do not depend on the draw. A record whose image cannot be read is reported and left out.
    """
    items, refs = [], []
    for i in range(min(n, len(ds)) if n else len(ds)):
        messages, record = ds.messages(i), ds.record(i)
        if instruction is not None and record.caption is not None:
            messages = caption_messages(record.caption, instruction)
        if not record.image:
            continue  # a text-only record: nothing to look at
        try:
            image = ds.loader(record.image)
        except SampleError as e:
            console.warn(f"held-out record {i} left out: {e}")
            continue
        items.append((image, messages[:-1]))
        refs.append(messages[-1]["content"])
    return items, refs


def caption_exact_match(assistant: Assistant, ds: LlavaDataset, instruction: str, n: int = 0) -> float:
    """Share of held-out images whose greedy reply equals the reference exactly (the demo's proof)."""
    items, refs = heldout_items(ds, n, instruction)
    replies = assistant.reply_batch(items, max_new_tokens=32)
    return sum(r == ref for r, ref in zip(replies, refs)) / max(len(refs), 1)


def log_sample_replies(assistant: Assistant, ds: LlavaDataset, n: int, logger: RunLogger | None, step: int) -> None:
    """Answer the first n held-out images and log prompt, reply and reference (and the image);
    n = 0 logs none (heldout_items reads 0 as "all", which is right for scores, not for a log).
    Under torchrun every rank answers its share (each the same number of questions: a sharded
    model generates in step) and rank 0 logs them all."""
    if n <= 0:
        return
    items, refs = heldout_items(ds, n)
    rank, world = rank_and_world()
    mine = items[rank::world]
    share = math.ceil(len(items) / world)
    padded = mine + items[:1] * (share - len(mine))                 # answered, then dropped
    replies_of = gather_objects(assistant.reply_batch(padded, max_new_tokens=64)[:len(mine)] if padded else [])
    replies = [replies_of[i % world][i // world] for i in range(len(items))]
    if rank:
        return
    for k, ((image, msgs), reply, ref) in enumerate(zip(items, replies, refs)):
        question = msgs[-1]["content"].replace("<image>", "").strip()
        console.info(f"  [sample {k}] Q: {question} | A: {reply} | ref: {ref}")
        if logger:
            logger.text(f"samples/{k}", f"**Q:** {question}\n\n**A:** {reply}\n\n**ref:** {ref}", step)
            logger.image(f"samples/{k}", np.asarray(image.resize((224, 224))), step)
