r"""LLaVA stage 1 (modality alignment): train the projector between a frozen vision tower and
a frozen LLM on image-caption (or VQA) data.

    python train_stage1.py --demo          # offline toy world on CPU, ~2 minutes on 2 cores the first time
    python train_stage1.py --model clip-zh-qwen3-0.6b --batch_size 16 \
        --data_root /data/sa1b_train --eval_data_root /data/sa1b_eval
    torchrun --standalone --nproc-per-node 8 train_stage1.py --model dinov3-qwen3vltext-align \
        --data_format chat --data_root /data/llava-laion-cc-sbu-558k
    # the Prismatic align plan's own command line works too (see utils/align_plan.py)

`train(cfg)` reads top to bottom: setup -> model -> data -> optimizer -> resume -> loop
(micro-steps, clip, step, log, evaluate, checkpoint) -> summary. The demo is
toy_demo.run_demo: measurements around an ordinary train() call.

Stages 2 and 3 (train_stage2.py, train_stage3_lora.py) are this same loop with their own
defaults: what trains (--tune_llm full | lora, --tune_projector) and where it starts
(--stage1 / --init CKPT) are flags of TrainConfig.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers in DataLoader workers

import functools
import math
import multiprocessing
import random
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, replace

import torch

from bookkeeping import Run, finished_run, open_run
from checkpoint_io import build_model, load_checkpoint, read_checkpoint_meta
from dataset import (Batch, EpochSampler, ImageLoader, ImageTransform, LlavaDataset, collate, collate_packed,
                     show_first_sample, to_device)
from model import LlavaModel, ModelSpec
from parallel import SHARDED, grad_norm as clip_grad_norm, parallelize
from prompts import PromptFormat, supervised_tokens
from readers import Record, read_records
from toy_demo import prepare_demo, run_demo
from train_config import (TrainConfig, demo_differences, parse_args, refuse_early, resolve_models, start_point,
                          tuning_of)
from tuning import add_lora, assert_trainable, check_device, is_peft, merged, set_trainable
from utils import console
from utils.checkpoint import complete_optimizer_state, find_latest, fresh_state, restore_training, saved_global_batch
from utils.cpu import precision_note, resolve_precision, use_threads
from utils.dist import (QuitNow, StopRequest, alike_on_every_rank, all_reduce_sum, ignore_stop_signals,
                        setup as setup_dist, tell_launcher)
from utils.feature_cache import FeatureCache, cache_key, image_key
from utils.seeds import epoch_seed, seed_everything
from utils.skips import Skips, SkipTally


# --------------------------------------------------------------------------- data

@dataclass
class DataSplit:
    """The records a run trains and evaluates on, read before any model loads (a wrong path
    fails in seconds and leaves no run folder behind), with what reading skipped."""

    train: list[Record]
    held_out: list[Record]
    root: str            # where the training records' images live
    eval_root: str
    skipped: Skips       # by reason, an example each ("eval/" for the held-out set's)


def read_data(cfg: TrainConfig) -> DataSplit:
    """The training records and the held-out ones: --eval_data_root, or a seeded share of the
    training records (--eval_ratio), or the tail of the training records."""
    for flag in ("data_root", "eval_data_root", "image_root"):
        path = getattr(cfg, flag)
        if path and not os.path.isdir(path):
            raise SystemExit(f"--{flag} {path}: no such folder")
    try:  # a wrong folder or an unreadable file: one line that names it, not a traceback
        records, skipped, root = read_records(cfg.data_format, cfg.data_root, cfg.chat_json, cfg.max_samples, cfg.labels)
        held_out = (read_records(cfg.data_format, cfg.eval_data_root, cfg.eval_chat_json, labels=cfg.labels)
                    if cfg.eval_data_root or cfg.eval_chat_json else None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--data_format {cfg.data_format}: {e}") from None
    if cfg.chat_json and cfg.image_root:
        root = cfg.image_root
    if held_out:
        eval_records, eval_skipped, eval_root = held_out
        if cfg.eval_chat_json and cfg.image_root:  # one image folder serves both chat.json files
            eval_root = cfg.image_root
        skipped.merge(eval_skipped, "eval/")
    elif cfg.eval_ratio:
        # The course's stage-2 split: a seeded shuffle, the last share held out (same every run).
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        n_hold = max(1, int(len(records) * cfg.eval_ratio))
        eval_records, eval_root = [records[i] for i in order[-n_hold:]], root
        records = [records[i] for i in order[:-n_hold]]
        console.info(f"--eval_ratio {cfg.eval_ratio}: {n_hold} of the training records held out (seed {cfg.seed})")
    else:
        # No held-out set named: hold out the tail of the training data.
        n_hold = min(cfg.eval_samples or 500, len(records) // 10)
        records, eval_records, eval_root = records[:len(records) - n_hold], records[len(records) - n_hold:], root
        console.notice(f"no --eval_data_root: holding out the last {n_hold} training records for evaluation")
    if not records:
        raise SystemExit(f"no usable training records in {cfg.data_root or cfg.chat_json} "
                         f"(skipped: {skipped.describe()})")
    return DataSplit(records, eval_records, root, eval_root, skipped)


def load_datasets(cfg: TrainConfig, data: DataSplit, tokenizer, fmt: PromptFormat,
                  spec: ModelSpec) -> tuple[LlavaDataset, LlavaDataset]:
    """(train dataset, eval dataset) over the records read.

    With --features_cache, samples carry cached features instead of pixels; the cache must
    have been made for this tower, layer, selection and preprocessing (the model's spec). The
    held-out set uses the cache too when every one of its images is in it, else its images.
    """
    transform = ImageTransform.from_dict(spec.image_transform)
    common = dict(tokenizer=tokenizer, fmt=fmt, transform=transform, max_text_len=cfg.max_text_len,
                  instructions=cfg.instructions, seed=cfg.seed)
    cache = cfg.image_cache or None
    draft = transform.size  # JPEG draft decoding down to (no less than) the tower's input
    features = eval_features = None
    if cfg.features_cache:
        features = FeatureCache(cfg.features_cache)
        features.check(cache_key(spec.vision_path, spec.feature_layer, spec.feature_select, spec.feature_post_norm,
                                 spec.image_transform, spec.num_image_tokens, spec.vision_hidden_size))
        console.kv("feature cache", f"{cfg.features_cache}: {len(features):,} images, "
                                    f"{features.bytes_per_image() / 2**10:.0f} KiB each")
        if all(image_key(r.image, data.eval_root) in features for r in data.held_out):
            eval_features = features
    train_ds = LlavaDataset(data.train, loader=ImageLoader(data.root, cache_dir=cache, draft=draft),
                             features=features, **common)
    eval_ds = LlavaDataset(data.held_out, loader=ImageLoader(data.eval_root, cache_dir=cache, draft=draft),
                            features=eval_features, **common)
    return train_ds, eval_ds


def report_data(train_ds: LlavaDataset, eval_ds: LlavaDataset, read_skips: Skips, cfg: TrainConfig,
                grad_accum: int, dist, total_steps: int, tokenizer) -> None:
    console.header("data")
    console.kv("train / eval records", f"{len(train_ds):,} / {len(eval_ds):,}")
    console.kv("global batch", f"{cfg.batch_size * grad_accum * dist.world_size} = {cfg.batch_size} x {grad_accum} "
                               f"accum x {dist.world_size} procs")
    console.kv("steps", f"{total_steps} ({max(len(train_ds) // (cfg.batch_size * grad_accum * dist.world_size), 1)} "
                        "per epoch)")
    if read_skips:
        console.notice(f"skipped while reading: {read_skips.describe()}")
    if dist.is_main:
        show_first_sample(train_ds, tokenizer)


def batches(ds: LlavaDataset, cfg: TrainConfig, rank: int, world: int, tally: SkipTally, epoch: int = 0,
            start: int = 0):
    """Endless (epoch, offset, batch) stream of batches that hold at least one usable sample. Each
    epoch reshuffles with (seed, epoch); `offset` is how far into the epoch all ranks have read
    (in samples, dataset.EpochSampler) once this batch is trained on, and `start` the offset to
    continue from, so a resume continues exactly. `tally` counts what every batch skipped.

    A run that cannot make progress stops here and says why, instead of looping for ever:
    too few records for one batch, or no usable sample in a whole pass or in
    --max_empty_batches batches in a row (a wrong --image_root, a dead URL list)."""
    lengths = ds.text_lengths() if cfg.group_by_length else None
    pad_id = ds.tokenizer.pad_token_id if ds.tokenizer.pad_token_id is not None else 0
    per_pass = len(ds) // (cfg.batch_size * world)                # whole micro-steps of every rank only
    if per_pass == 0:
        raise SystemExit(f"{len(ds)} training records make no full batch of {cfg.batch_size}"
                         + (f" on each of {world} processes" if world > 1 else "") + ": lower --batch_size")
    limit = min(per_pass, cfg.max_empty_batches or per_pass)
    empty = 0
    while True:
        ds.set_epoch(epoch)
        sampler = EpochSampler(len(ds), cfg.seed, epoch, rank, world, start=start, lengths=lengths,
                               batch_size=cfg.batch_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=functools.partial(collate_packed if cfg.pack else collate, pad_id=pad_id),
            pin_memory=torch.cuda.is_available(), drop_last=True,
            prefetch_factor=4 if cfg.num_workers else None, worker_init_fn=ignore_stop_signals,
            # Its own generator: a DataLoader otherwise draws its base seed from the global RNG,
            # which a resumed run restores before the loader starts; dropout (LoRA) would shift.
            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        for i, batch in enumerate(loader, start=1):
            tally.add(batch)
            if batch["size"]:
                empty = 0
                yield epoch, start + i * cfg.batch_size * world, batch
                continue
            empty += 1
            if empty >= limit:
                where = "in a whole pass over" if limit == per_pass else f"in {empty} batches in a row of"
                raise SystemExit(f"no usable samples {where} the {len(ds):,} training records: {tally.describe()}. "
                                 "Check --data_root / --image_root / --chat_json.")
        epoch, start = epoch + 1, 0


# --------------------------------------------------------------------------- training

def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """One run of any stage; `argv` (the command line it was parsed from) only shapes the resume hint."""
    # ---- setup: processes, seeds, the models on disk, the data, the run folder, the global batch.
    # Every rank checks the same inputs here: under torchrun, rank 0 alone explains a refusal.
    dist = setup_dist(cfg.device)
    device = dist.device
    seed_everything(cfg.seed)            # the projector's init, then the instruction draws and data order
    with alike_on_every_rank():
        refuse_early(cfg)
        cfg, vision_path, llm_path = resolve_models(cfg)
        data = read_data(cfg)            # before any model loads: a wrong path fails at once
        folders = open_run(cfg, dist)
        grad_accum = accumulation(cfg, dist.world_size, folders.resume_from)
    global_batch = cfg.batch_size * grad_accum * dist.world_size
    cfg = replace(cfg, global_batch_size=global_batch)   # recorded: a resume on other processes keeps it

    # ---- model: frozen tower; projector fresh (stage 1) or from the start point; the LLM frozen,
    # in full or with LoRA adapters. On resume, every trained weight comes from the checkpoint.
    # Then spread over the processes (parallel.py: DDP or FSDP2; nothing is wrapped in one process).
    model, tokenizer = build_training_model(cfg, vision_path, llm_path, dist, folders.resume_from)
    par = parallelize(model, cfg.train_strategy, dist, cfg.fsdp_offload, cfg.hsdp_shard_size)
    console.kv("processes", par.describe())

    # ---- data, the steps it makes, and the optimizer over what trains
    train_ds, eval_ds = load_datasets(cfg, data, tokenizer, PromptFormat.for_model(model.spec, tokenizer), model.spec)
    total_steps = cfg.max_steps or cfg.epochs * max(len(train_ds) // global_batch, 1)
    optimizer, scheduler, params = make_optimizer(cfg, model, total_steps)

    # ---- resume: trained weights and optimizer (resharded to this run), schedule, data position, RNG
    state = fresh_state(dist.world_size)
    if folders.resume_from:
        state = restore_training(folders.resume_from, model, optimizer, scheduler, dist, cfg.batch_size)
        if state["step"] >= total_steps:  # the resume hint typed again after the end: nothing to do
            return finished_run(folders, state["step"])
        console.success(f"resumed from {folders.resume_from} at step {state['step']}")
    report_data(train_ds, eval_ds, data.skipped, cfg, grad_accum, dist, total_steps, tokenizer)
    # Logs, alarms, evaluation, checkpoints and the summary (bookkeeping.py); the "before" evaluation.
    run = Run.start(cfg, folders, dist, state, model, tokenizer, eval_ds, data.skipped, total_steps, optimizer,
                    scheduler)
    run.summary["train_strategy"] = par.strategy or "none"

    # ---- loop
    stream = batches(train_ds, cfg, dist.rank, dist.world_size, run.tally, state["epoch"], state["offsets"][dist.rank])
    model.train()
    stop = StopRequest()
    losses, nonfinite, in_a_row, checkpoint = state["losses"], state["nonfinite_steps"], 0, ""
    # In a terminal a bar redraws in place; in a log file only the periodic log lines appear.
    bar = console.progress(total_steps, f"stage {cfg.stage}", "step", initial=state["step"], show=dist.is_main, every=0)
    t_start = time.time()
    for step in range(state["step"] + 1, total_steps + 1):
        t0 = time.time()
        # Micro-batches of this step, fetched first so the loss can be normalised by the
        # supervised-token count of the whole global step (a mean over tokens, not batches).
        micro = []
        for _ in range(grad_accum):
            epoch, position, batch = next(stream)
            micro.append(to_device(batch, device))
        counts = StepCounts.over_ranks(micro, stop.requested, device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for k, b in enumerate(micro):
            # Gradients are reduced over the processes on the last micro-batch only (parallel.py).
            with par.sync(last=k == grad_accum - 1), model.autocast():
                ls, _ = par.engine(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b.get("pixel_values"),
                                   image_features=b.get("image_features"), position_ids=b.get("position_ids"))
                # This rank's token sum over the global step's tokens (x processes: DDP/FSDP average).
                (ls / counts.tokens * par.grad_scale).backward()
            loss_sum += ls.detach()
        grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
        loss = all_reduce_sum(loss_sum).item() / max(counts.tokens, 1)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
            in_a_row = 0
        else:
            # A non-finite loss or gradient would poison AdamW's moments: skip the update
            # (the schedule still advances), count it, and stop if it keeps happening.
            nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
            refuse_nonfinite(step, loss, grad_norm, in_a_row, cfg.max_nonfinite, run.tally, folders.ckpt_dir)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log every step; evaluate and checkpoint at their intervals, at the end and on a stop
        losses.append(loss)
        run.log_step(step, losses, grad_norm, scheduler.get_last_lr()[-1], counts, nonfinite, epoch, micro,
                     time.time() - t0, bar)
        last = step == total_steps
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            run.evaluate(step)
        if (cfg.save_interval and step % cfg.save_interval == 0) or last or counts.stopping:
            checkpoint = run.save(step, epoch, position, losses, nonfinite)
        if counts.stopping and not last:
            bar.close()
            stop.release()
            return run.stopped(step, checkpoint, stop.signum, argv)
    bar.close()
    stop.release()
    return run.finish(losses, nonfinite, global_batch, time.time() - t_start, checkpoint)


@dataclass
class StepCounts:
    """What one optimizer step trained on, summed over every rank by one all-reduce, which also
    carries whether any rank was asked to stop (so all of them stop after the same step)."""

    tokens: float        # supervised tokens of the global step: the loss is their mean
    samples: float
    seq_tokens: float    # every token the LLM read (padding excluded)
    stopping: bool
    local_tokens: int    # this rank's supervised tokens (its MFU)

    @classmethod
    def over_ranks(cls, micro: list[Batch], stop_requested: bool, device: torch.device) -> "StepCounts":
        local = sum(supervised_tokens(b["labels"]) for b in micro)
        counts = torch.tensor([local, sum(b["size"] for b in micro), sum(int(b["attention_mask"].sum()) for b in micro),
                               float(stop_requested)], dtype=torch.float64, device=device)
        tokens, samples, seq_tokens, stopping = all_reduce_sum(counts).tolist()
        return cls(tokens, samples, seq_tokens, stopping > 0, local)


def make_optimizer(cfg: TrainConfig, model: LlavaModel, total_steps: int):
    """(AdamW over what trains, its schedule, the trained parameters): the projector in a group of
    its own (--projector_lr), linear warmup, then cosine decay (or constant)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    projector = [p for n, p in model.trainable_parameters() if n.startswith("projector.")]
    llm = [p for n, p in model.trainable_parameters() if not n.startswith("projector.")]
    groups = [{"params": projector, "lr": cfg.projector_lr or cfg.lr}, {"params": llm, "lr": cfg.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    complete_optimizer_state(optimizer)   # every parameter in the resume state from the first save on
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = (get_cosine_schedule_with_warmup(optimizer, warmup, total_steps) if cfg.lr_scheduler == "cosine"
                 else get_constant_schedule_with_warmup(optimizer, warmup))
    return optimizer, scheduler, projector + llm


def refuse_nonfinite(step: int, loss: float, grad_norm: float, in_a_row: int, limit: int, tally: SkipTally,
                     ckpt_dir: str) -> None:
    """Say that a step's update was skipped; stop the run when it keeps happening."""
    console.notice(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                   f"({in_a_row} in a row, limit {limit})")
    if in_a_row >= limit:
        raise SystemExit(f"{in_a_row} non-finite steps in a row at step {step}: lower --lr, check the data "
                         f"(skipped: {dict(tally.skipped)}), or resume from {find_latest(ckpt_dir)}")


def accumulation(cfg: TrainConfig, world_size: int, resume_from: str | None = None) -> int:
    """Micro-batches per optimizer step: --grad_accum, or what --global_batch_size implies.

    A resumed run keeps the global batch of its checkpoint on any process count, so that its steps
    read the same samples as an uninterrupted run: the accumulation is derived when this command's
    batch size and processes can make it (dropping `torchrun` from the resume command would halve
    it otherwise), and the resume is refused, naming the flags that continue it unchanged, when they
    cannot. --change_global_batch trains on with this command's global batch instead."""
    per_step = cfg.batch_size * world_size
    asked = cfg.global_batch_size or per_step * cfg.grad_accum
    saved = saved_global_batch(resume_from) if resume_from else None
    if saved is None or saved.size == asked:
        return asked // per_step
    if cfg.change_global_batch:
        console.notice(f"--change_global_batch: the global batch goes from {saved.size} ({saved.describe()}) to "
                       f"{asked} from step {saved.step} on")
        return asked // per_step
    if saved.size % per_step == 0:
        console.notice(f"resuming with the checkpoint's global batch {saved.size} ({saved.describe()}): "
                       f"{cfg.batch_size} x {saved.size // per_step} accumulated x {world_size} process(es) here "
                       f"(this command alone would make {asked}; --change_global_batch trains on with that)")
        return saved.size // per_step
    raise SystemExit(f"--resume {resume_from}: that run trained with a global batch of {saved.size} "
                     f"({saved.describe()}); --batch_size {cfg.batch_size} on {world_size} process(es) cannot make "
                     f"it. Continue it unchanged with {saved.ways_to_continue(world_size, cfg.batch_size)}; or add "
                     f"--change_global_batch to train on with a global batch of {asked}.")


def build_training_model(cfg: TrainConfig, vision_path: str, llm_path: str, dist, resume_from: str | None):
    """The model as training runs it, from one of three places: the checkpoint to resume (every
    trained weight as saved), a start point (--stage1/--init: its projector and LLM), or the
    frozen models alone (a fresh projector). Then what --tune_llm/--tune_projector ask trains,
    exactly (asserted), with gradient checkpointing and compile when asked. Prints the counts."""
    tuning = tuning_of(cfg)
    check_device(tuning, dist.device)            # QLoRA on a CPU: refused before anything loads
    # FSDP: built on the CPU (in the device's dtypes), then fully_shard moves one unit at a time.
    sharded = dist.launched and cfg.train_strategy in SHARDED
    device = torch.device("cpu") if sharded else dist.device
    compute = resolve_precision(cfg.precision, dist.device)       # bf16 (autocast) or None (fp32)
    build = dict(attn_implementation=cfg.attn, models_dir=cfg.models_dir, trust_remote_code=cfg.trust_remote_code,
                 load_in_4bit=tuning.load_in_4bit, frozen_dtype=compute or torch.float32)
    if tuning.llm == "full":
        build["llm_dtype"] = torch.float32       # fp32 master weights; autocast computes in bf16
    start = resume_from or start_point(cfg)
    if start:
        own_llm = read_checkpoint_meta(start).get("tuning", {}).get("llm") == "full"   # it carries its LLM
        model, tokenizer, _ = load_checkpoint(start, device, cfg.vision_tower or None,
                                              None if own_llm else cfg.llm or None, trainable=bool(resume_from), **build)
        if resume_from and model.tuning != tuning:
            # Its optimizer state belongs to exactly the parameters it trained.
            differ = ", ".join(f"--{'tune_llm' if k == 'llm' else 'tune_projector' if k == 'projector' else k} "
                               f"{getattr(model.tuning, k)} there, {getattr(tuning, k)} here"
                               for k in vars(tuning) if getattr(model.tuning, k) != getattr(tuning, k))
            raise SystemExit(f"--resume {resume_from}: that run trained other parameters ({differ}); resume it "
                             "with its own settings")
        if not resume_from:
            if is_peft(model.llm) and tuning.llm == "lora":
                raise SystemExit(f"{start} carries LoRA adapters already: export it (scripts/export_hf.py merges them) "
                                 "and start from that, or continue it with --resume")
            model.llm = merged(model.llm)        # LoRA start, full tuning: the adapters become weights
            if model.tuning.llm == "full":       # its tuned LLM is this run's base: name it by its folder
                model.spec.llm = model.spec.llm_path
    else:
        spec = ModelSpec(vision_tower=cfg.vision_tower, llm=cfg.llm, projector=cfg.projector,
                         feature_layer=cfg.feature_layer, feature_select=cfg.feature_select,
                         feature_post_norm=cfg.feature_post_norm, image_wrap=cfg.image_wrap,
                         vision_path=vision_path, llm_path=llm_path)
        model, tokenizer = build_model(spec, device, **build)
    if tuning.llm == "lora" and not is_peft(model.llm):
        model.llm = add_lora(model.llm, tuning)
    model.tuning = tuning
    model.autocast_dtype, model.ce_chunk_size = compute, cfg.ce_chunk_size
    set_trainable(model, tuning)
    counts = assert_trainable(model, tuning)     # exactly what the flags ask, nothing else
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile:
        # dynamic: text lengths vary from batch to batch; compiling per length would never end.
        model.llm.get_decoder().compile(dynamic=True)
        if model.vision is not None:
            model.vision.model.compile(dynamic=False)
    console.header("model")
    console.kv("trains", f"{tuning.describe()} ({', '.join(f'{k} {v:,}' for k, v in counts.items() if v)} parameters)")
    if start:
        console.kv("starts from", start)
    summary = model.summary()
    for k, v in summary.items():
        console.kv(k, v)
    console.kv("precision", "bf16 autocast, fp32 master weights and loss" if compute else "fp32")
    if dist.device.type == "cpu":
        params = sum(summary["params"].values())
        console.kv("threads", use_threads(cfg.threads, params))
        note = precision_note(cfg.precision, compute, params)
        if note:
            console.notice(note)
    return model, tokenizer




def main(argv: list[str] | None = None, stage_defaults: dict | None = None, doc: str | None = None) -> dict:
    """Parse, then train (or run the demo). Later stages call this with their defaults and docstring."""
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    console.quiet_library_bars()
    cfg = parse_args(argv, stage_defaults, doc or __doc__)
    with alike_on_every_rank():
        refuse_early(cfg)        # what needs no model: before a demo builds anything
    if cfg.demo:  # the toy world (and an earlier stage's demo) first; then an ordinary run, measured around
        # One setting never breaks across lines (textwrap breaks at spaces, not at no-break spaces).
        differ = ", ".join(f"{k} {v!r} (default {d!r})".replace(" ", "\xa0")
                           for k, (v, d) in demo_differences(cfg, stage_defaults).items())
        console.info(f"the stage-{cfg.stage} demo's settings where they differ from the defaults (train_config."
                     "DEMO_DEFAULTS; flags you type win):\n"
                     + textwrap.fill(differ, 110, initial_indent="  ", subsequent_indent="  ").replace("\xa0", " "))
        cfg = prepare_demo(cfg)
        return run_demo(cfg, lambda c: train(c, argv), started)
    return train(cfg, argv)


def run_cli(stage_defaults: dict | None = None, doc: str | None = None) -> None:
    """`python train_stageN.py`: after a stop request (checkpoint saved) exit 128 + the signal, as
    a process killed by it would (130 Ctrl-C, 143 SIGTERM); at once on a second Ctrl-C."""
    try:
        summary = main(None, stage_defaults, doc)
        if summary.get("interrupted"):
            sys.exit(128 + summary.get("signal", signal.SIGINT))
        # A demo whose figures miss a bar exits 3 (a fork's CI can run the demo as a self-test).
        sys.exit(3 if not all(v["ok"] for v in summary.get("verdicts", {}).values()) else 0)
    except SystemExit as e:
        if isinstance(e.code, str):
            tell_launcher(e.code)     # torchrun's failure report names the reason
        raise
    except KeyboardInterrupt as e:  # a second Ctrl-C in training, or one outside it: at once, no traceback
        # DataLoader workers stuck in slow I/O would each hold the exit for seconds: stop them
        # first (a SIGTERM from this process ends them at once: utils.dist.ignore_stop_signals).
        for child in multiprocessing.active_children():
            child.terminate()
        console.error("quit at once: the steps since the last checkpoint are not saved" if isinstance(e, QuitNow)
                      else "interrupted outside the training steps: no trained step is lost")
        sys.exit(130)


if __name__ == "__main__":
    run_cli()
