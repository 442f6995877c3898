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

import argparse
import functools
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from backbones import PRESETS, MissingModel, download, resolve_model, vision_defaults
from dataset import (DATA_FORMATS, EpochSampler, ImageLoader, ImageTransform, Stage1Dataset, collate, collate_packed,
                     read_records, show_first_sample, to_device)
from eval_llava import Assistant, eval_summary, heldout_loss, log_heldout_loss, log_sample_replies
from model import ModelSpec, Projector, build_model, load_checkpoint, read_checkpoint_meta, save_checkpoint
from prompts import INSTRUCTION_POOLS, PromptFormat, supervised_tokens
from toy_demo import apply_demo_defaults, run_demo
from tuning import COURSE_LORA_TARGET, Tuning, add_lora, assert_trainable, check_device, is_peft, merged, set_trainable
from utils import console
from utils.alarms import Alarms
from utils.align_plan import translate_align_flags
from utils.checkpoint import (STAGE_SCRIPTS, find_latest, fresh_state, restore_training, resume_command, resume_point,
                              run_name_of, save_training)
from utils.config import (HelpFormatter, add_dataclass_args, dump_json, explicit_flags, from_namespace, print_config,
                          redacted)
from utils.dist import (StopRequest, all_reduce_grads, all_reduce_sum, available_cpus, barrier, cleanup as cleanup_dist,
                        ignore_sigint, seed_everything, setup as setup_dist)
from utils.feature_cache import FeatureCache, cache_key, image_key
from utils.flops import mfu
from utils.metrics import RunLogger, log_line, periodic_scalars, print_summary, run_totals
from utils.skips import SkipTally


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---- models
    model: str = _f("", "preset combination (flags you type override its parts)", choices=["", *PRESETS])
    vision_tower: str = _f("", "vision tower: registry id (see README) or local directory")
    llm: str = _f("", "LLM: registry id or local directory (weights, tokenizer, chat template)")
    models_dir: str = _f("models", "where registry ids live: <models_dir>/<id>")
    download: bool = _f(False, "download missing registry ids before training (scripts/download_models.py)")
    hf_token: str = _f(".hf_token", "gated downloads (DINOv3): a token file, or the NAME of an env var holding it")
    projector: str = _f("linear", "projector type", choices=list(Projector.TYPES))
    feature_layer: int | None = _f(None, "tower hidden state to use (-1 last, -2 LLaVA-1.5); default: the tower's")
    feature_select: str | None = _f(None, "all tokens (CLS, registers) or patch tokens only; default: the tower's",
                                    choices=["all", "patch"])
    feature_post_norm: bool | None = _f(None, "apply the tower's final norm to every token (the course: ln_post); "
                                        "default: the tower's")
    image_wrap: bool | None = _f(None, "wrap image slots in <|vision_start|>/<|vision_end|>; default: on for Qwen3-VL")
    attn: str = _f("sdpa", "LLM attention kernel", choices=["sdpa", "eager", "flash_attention_2"])
    gradient_checkpointing: bool = _f(False, "recompute LLM layers in backward: less activation memory, ~30% "
                                             "more compute (off: small LLMs fit without it)")
    compile: bool = _f(False, "torch.compile the LLM decoder and the vision tower (first steps are slow)")
    group_by_length: bool = _f(False, "batch samples of similar text length together (less padding); "
                                      "order is still seeded and resumable")
    pack: bool = _f(False, "padding-free batches: samples concatenated in one row, attention kept within each "
                           "(real savings with --attn flash_attention_2)")
    # ---- what trains and where it starts (stages 2 and 3 set these by default; tuning.py)
    stage1: str = _f("", "start from this stage-1 checkpoint (run or step folder): towers, projector and prompt "
                         "format come from it")
    init: str = _f("", "start from this checkpoint of any stage (stage 3: the stage-2 run): its LLM and projector")
    tune_llm: str = _f("none", "the LLM: frozen, tuned in full, or LoRA adapters", choices=list(Tuning.MODES))
    tune_projector: bool = _f(True, "train the projector (--no-tune_projector keeps it as the start point has it)")
    projector_lr: float = _f(0.0, "the projector's learning rate; 0 = --lr")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA branch")
    lora_target: str = _f(COURSE_LORA_TARGET, "LLM modules that get adapters, comma-separated, or all-linear")
    load_in_4bit: bool = _f(False, "QLoRA: the frozen LLM in 4-bit NF4 through bitsandbytes (CUDA only)")
    stage: int = _f(1, "set by the entry point", cli=False)
    # ---- data
    data_format: str = _f("sa1b", "sa1b parquet shards, a LLaVA chat.json, or CogVLM-SFT-311K's folders",
                          choices=list(DATA_FORMATS))
    data_root: str = _f("", "training data directory (sa1b: {root}/data/*.parquet; chat: {root}/chat.json; "
                            "cogvlm_sft: {root}/<subset>/{images,labels_zh})")
    labels: str = _f("labels_zh", "cogvlm_sft: the label folder (labels_zh Chinese, labels English)")
    eval_ratio: float = _f(0.0, "no held-out set named: hold out this seeded share of the training records "
                                "(the course's stage 2: 0.02); 0 = the last min(eval_samples, 10%)")
    chat_json: str = _f("", "chat format: chat.json path (images relative to --image_root)")
    image_root: str = _f("", "chat format: image folder for --chat_json")
    eval_data_root: str = _f("", "held-out data directory (same format); empty: hold out the tail of the training data")
    eval_chat_json: str = _f("", "chat format: held-out chat.json")
    max_samples: int = _f(0, "use only the first N training records (the course: 100000); 0 = all")
    max_text_len: int = _f(128, "text tokens per sample, image slots not counted; long answers lose their tail")
    instructions: str = _f("course", "caption instruction pool", choices=list(INSTRUCTION_POOLS))
    image_cache: str = _f("", "URL images: keep downloaded bytes here so later epochs never refetch")
    features_cache: str = _f("", "train from vision features cached by scripts/cache_features.py (no decoding, no ViT)")
    num_workers: int = _f(min(4, available_cpus()), f"DataLoader worker processes (default: min(4, cores) = "
                                                      f"{min(4, available_cpus())} here)")
    max_empty_batches: int = _f(100, "stop the run after this many batches in a row without one usable sample "
                                     "(it also stops after a full pass without one); 0 = only after a full pass")
    # ---- optimisation
    batch_size: int = _f(16, "samples per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step (derived when --global_batch_size is set)")
    global_batch_size: int = _f(0, "samples per optimizer step over all processes; 0 = batch_size x grad_accum x procs")
    lr: float = _f(2e-3, "peak learning rate (the course's 2e-3 suits a linear projector)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    warmup_ratio: float = _f(0.03, "share of steps with linear warmup before the decay")
    lr_scheduler: str = _f("cosine", "decay after warmup", choices=["cosine", "constant"])
    epochs: int = _f(1, "passes over the training data (ignored when --max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0 = derive from --epochs")
    seed: int = _f(0, "seed for data order, instruction choice and projector init")
    # ---- logging, evaluation, checkpoints
    run_name: str = _f("", "name of runs/<name>/ and checkpoints/<name>/ (default: timestamped)")
    runs_dir: str = _f("runs", "where run logs go")
    trackers: str = _f("jsonl,tensorboard", "log sinks, comma-separated: jsonl, tensorboard")
    checkpoints_dir: str = _f("checkpoints", "where checkpoints go")
    log_interval: int = _f(10, "steps between printed log lines (0 = none; metrics.jsonl still gets every step)")
    eval_interval: int = _f(200, "steps between held-out evaluations, plus one before training "
                                 "(0 = only once, at the end)")
    eval_samples: int = _f(500, "held-out samples per evaluation (0 = all)")
    sample_replies: int = _f(4, "held-out images answered and logged at each evaluation")
    save_interval: int = _f(100, "steps between checkpoints (the align plan's 100; 0 = only at the end and on a stop)")
    keep_last: int = _f(3, "keep the newest K step checkpoints (0 = all)")
    resume: str = _f("", "'auto': continue from the newest complete checkpoint of --run_name; or a checkpoint path")
    overwrite: bool = _f(False, "delete an existing run of the same name and start over")
    max_nonfinite: int = _f(10, "abort after this many non-finite losses/gradients in a row (each is skipped)")
    trust_remote_code: bool = _f(False, "allow model folders to run their own Python code (off: never)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    train_strategy: str = _f("ddp", "several processes: DDP over the projector, the frozen tower and LLM replicated "
                                    "on every GPU; the align plan's FSDP values are refused (not implemented)",
                             choices=["ddp", "fsdp-shard-grad-op", "fsdp-full-shard"])
    demo: bool = _f(False, "build the offline toy world and train on it (CPU, minutes)")


def build_parser(stage_defaults: dict | None = None, doc: str | None = None) -> argparse.ArgumentParser:
    """The flags of TrainConfig; a later stage's entry point passes its defaults (shown by --help)."""
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=HelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(**{k: v for k, v in (stage_defaults or {}).items() if k != "stage"})
    return parser


# Flags counted in steps or samples: 0 has a meaning (off, all, derive), a negative one has none.
NON_NEGATIVE = ("max_samples", "max_text_len", "num_workers", "max_empty_batches", "grad_accum", "global_batch_size",
                "epochs", "max_steps", "log_interval", "eval_interval", "eval_samples", "sample_replies",
                "save_interval", "keep_last", "max_nonfinite")


def parse_args(argv: list[str] | None = None, stage_defaults: dict | None = None, doc: str | None = None) -> TrainConfig:
    parser = build_parser(stage_defaults, doc)
    argv = translate_align_flags(sys.argv[1:] if argv is None else list(argv))
    cfg = from_namespace(TrainConfig, parser.parse_args(argv))
    cfg.stage = (stage_defaults or {}).get("stage", 1)
    try:
        tuning_of(cfg)
    except ValueError as e:
        parser.error(str(e))
    if cfg.stage1 and cfg.init:
        parser.error("give one start point: --stage1 or --init")
    if (cfg.stage1 or cfg.init) and cfg.model:
        parser.error("--model picks the frozen models of a fresh run; a start point (--stage1/--init) has its own")
    if not 0 <= cfg.eval_ratio < 1:
        parser.error(f"--eval_ratio {cfg.eval_ratio}: must be in [0, 1)")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            parser.error(f"--{name} {getattr(cfg, name)}: must be >= 0")
    for name in ("batch_size", "grad_accum", "max_text_len"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} {getattr(cfg, name)}: must be >= 1")
    if cfg.train_strategy != "ddp":
        parser.error(f"--train_strategy {cfg.train_strategy}: FSDP sharding is not implemented. Several processes "
                     "run DDP: the projector's gradients are synchronised and the frozen tower and LLM are replicated "
                     "on every GPU (bf16 weights: ~1.3 GiB for the course's pair, ~3.4 GiB for the align plan's). "
                     "Use --train_strategy ddp (or leave it out).")
    explicit = explicit_flags(parser, argv)
    if cfg.model:
        for key, value in PRESETS[cfg.model].items():
            if key not in explicit:
                setattr(cfg, key, value)
    if cfg.demo:
        apply_demo_defaults(cfg, explicit)  # builds the toy world on first use; typed flags still win
    return cfg


def tuning_of(cfg: TrainConfig) -> Tuning:
    return Tuning(llm=cfg.tune_llm, projector=cfg.tune_projector, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                  lora_dropout=cfg.lora_dropout, lora_target=cfg.lora_target, load_in_4bit=cfg.load_in_4bit)


def start_point(cfg: TrainConfig) -> str:
    return cfg.stage1 or cfg.init


def resolve_models(cfg: TrainConfig) -> tuple[str, str]:
    """Registry ids -> local folders (downloading first with --download); fill the tower's
    feature defaults for the flags left unset. Every missing model is named at once, with the
    one command that downloads them all. With a start point (--stage1/--init) the models and
    features are the checkpoint's: they fill the config (typed --vision_tower/--llm only say
    where the models live now) and ('', '') is returned."""
    if start_point(cfg):
        try:
            spec = read_checkpoint_meta(start_point(cfg))["spec"]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--{'stage1' if cfg.stage1 else 'init'}: {e}") from None
        if not cfg.data_root and not cfg.chat_json:
            raise SystemExit("name the training data: --data_root DIR (or --chat_json FILE), or run --demo")
        for key in ("projector", "feature_layer", "feature_select", "feature_post_norm", "image_wrap"):
            setattr(cfg, key, spec[key])
        return "", ""
    if not (cfg.vision_tower and cfg.llm):
        raise SystemExit(name_the_models_message())
    if not cfg.data_root and not cfg.chat_json:
        raise SystemExit("name the training data: --data_root DIR (or --chat_json FILE), or run --demo")
    paths, missing = {}, []
    for name in (cfg.vision_tower, cfg.llm):
        try:
            paths[name] = resolve_model(name, cfg.models_dir)
        except MissingModel:
            missing.append(name)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    if missing and not cfg.download:
        preset = PRESETS.get(cfg.model, {})
        whole_preset = preset and set(missing) == {preset["vision_tower"], preset["llm"]}
        what = f"--preset {cfg.model}" if whole_preset else " ".join(missing)
        raise SystemExit(f"not downloaded yet: {', '.join(missing)} (looked in {cfg.models_dir}/). Download with:\n"
                         f"  python scripts/download_models.py {what} --models_dir {cfg.models_dir}\n"
                         "or add --download to fetch them before training, or point --vision_tower/--llm at local "
                         "folders.")
    if missing:
        for name in missing:
            paths[name] = download(name, cfg.models_dir, hf_token=cfg.hf_token)
    vision_path, llm_path = paths[cfg.vision_tower], paths[cfg.llm]
    for key, value in vision_defaults(cfg.vision_tower, vision_path).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return vision_path, llm_path


def name_the_models_message() -> str:
    presets = "\n".join(f"  --model {name:<26} {p['vision_tower']} + {p['projector']} + {p['llm']}"
                        for name, p in PRESETS.items())
    return ("name the frozen models: a preset,\n" + presets + "\nor --vision_tower/--llm (registry ids or local "
            "folders; `python model.py --list` lists the ids), or run --demo for the offline toy world")


# --------------------------------------------------------------------------- data

def load_datasets(cfg: TrainConfig, tokenizer, fmt: PromptFormat, spec: ModelSpec):
    """(train dataset, eval dataset, skip counts from reading).

    With --features_cache, samples carry cached features instead of pixels; the cache must
    have been made for this tower, layer, selection and preprocessing (the model's spec). The
    held-out set uses the cache too when every one of its images is in it, else its images.
    """
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
        skipped.update({f"eval/{k}": v for k, v in eval_skipped.items()})
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
        console.warn(f"no --eval_data_root: holding out the last {n_hold} training records for evaluation")
    if not records:
        raise SystemExit(f"no usable training records in {cfg.data_root or cfg.chat_json} (skipped: {dict(skipped)})")
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
        if all(image_key(r.image, eval_root) in features for r in eval_records):
            eval_features = features
    train_ds = Stage1Dataset(records, loader=ImageLoader(root, cache_dir=cache, draft=draft), features=features, **common)
    eval_ds = Stage1Dataset(eval_records, loader=ImageLoader(eval_root, cache_dir=cache, draft=draft),
                            features=eval_features, **common)
    return train_ds, eval_ds, skipped


def report_data(train_ds: Stage1Dataset, eval_ds: Stage1Dataset, read_skips: Counter, cfg: TrainConfig,
                grad_accum: int, dist, total_steps: int, tokenizer) -> None:
    console.header("data")
    console.kv("train / eval records", f"{len(train_ds):,} / {len(eval_ds):,}")
    console.kv("global batch", f"{cfg.batch_size * grad_accum * dist.world_size} = {cfg.batch_size} x {grad_accum} "
                               f"accum x {dist.world_size} procs")
    console.kv("steps", f"{total_steps} ({max(len(train_ds) // (cfg.batch_size * grad_accum * dist.world_size), 1)} "
                        "per epoch)")
    if read_skips:
        console.warn(f"skipped while reading: {dict(read_skips)}")
    if dist.is_main:
        show_first_sample(train_ds, tokenizer)


def batches(ds: Stage1Dataset, cfg: TrainConfig, rank: int, world: int, tally: SkipTally, epoch: int = 0,
            start: int = 0):
    """Endless (epoch, batches consumed in this epoch, batch) stream of batches that hold at least
    one usable sample. Each epoch reshuffles with (seed, epoch); `start` skips batches already
    trained on, so a resume continues exactly. `tally` counts what every batch skipped.

    A run that cannot make progress stops here and says why, instead of looping for ever:
    too few records for one batch, or no usable sample in a whole pass or in
    --max_empty_batches batches in a row (a wrong --image_root, a dead URL list)."""
    lengths = ds.text_lengths() if cfg.group_by_length else None
    pad_id = ds.tokenizer.pad_token_id if ds.tokenizer.pad_token_id is not None else 0
    per_pass = math.ceil(len(ds) / world) // cfg.batch_size      # drop_last: whole batches only
    if per_pass == 0:
        raise SystemExit(f"{len(ds)} training records make no full batch of {cfg.batch_size}"
                         + (f" on each of {world} processes" if world > 1 else "") + ": lower --batch_size")
    limit = min(per_pass, cfg.max_empty_batches or per_pass)
    empty = 0
    while True:
        ds.set_epoch(epoch)
        sampler = EpochSampler(len(ds), cfg.seed, epoch, rank, world, start=start * cfg.batch_size,
                               lengths=lengths, batch_size=cfg.batch_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=functools.partial(collate_packed if cfg.pack else collate, pad_id=pad_id),
            pin_memory=torch.cuda.is_available(), drop_last=True,
            prefetch_factor=4 if cfg.num_workers else None, worker_init_fn=ignore_sigint,
            # Its own generator: a DataLoader otherwise draws its base seed from the global RNG,
            # which a resumed run restores before the loader starts; dropout (LoRA) would shift.
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        for i, batch in enumerate(loader, start=start + 1):
            tally.add(batch)
            if batch["size"]:
                empty = 0
                yield epoch, i, batch
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
    # ---- setup: processes, seeds, the models on disk, the run folder
    dist = setup_dist(cfg.device)
    device = dist.device
    seed_everything(cfg.seed)            # the projector's init, then the instruction draws and data order
    vision_path, llm_path = resolve_models(cfg)
    run_name, run_dir, ckpt_dir, resume_from = open_run(cfg, dist)

    # ---- model: frozen tower; projector fresh (stage 1) or from the start point; the LLM frozen,
    # in full or with LoRA adapters. On resume, every trained weight comes from the checkpoint.
    model, tokenizer = build_training_model(cfg, vision_path, llm_path, dist, resume_from)
    fmt = PromptFormat.for_model(model.spec, tokenizer)

    # ---- data, and the steps it makes
    grad_accum = accumulation(cfg, dist.world_size)
    train_ds, eval_ds, read_skips = load_datasets(cfg, tokenizer, fmt, model.spec)
    global_batch = cfg.batch_size * grad_accum * dist.world_size
    total_steps = cfg.max_steps or cfg.epochs * max(len(train_ds) // global_batch, 1)
    report_data(train_ds, eval_ds, read_skips, cfg, grad_accum, dist, total_steps, tokenizer)

    # ---- optimizer: AdamW on what trains (the projector with its own lr), warmup, then cosine (or constant)
    groups = [[p for n, p in model.trainable_parameters() if n.startswith("projector.") == is_proj] for is_proj in (1, 0)]
    params = groups[0] + groups[1]
    optimizer = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, (cfg.projector_lr or cfg.lr, cfg.lr))
                                   if g], weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = schedule(cfg.lr_scheduler, optimizer, warmup, total_steps)

    # ---- resume: weights, optimizer, schedule, data position and RNG exactly as they were
    state = fresh_state(dist.world_size)
    if resume_from:
        state = restore_training(resume_from, optimizer, scheduler, dist)
        console.success(f"resumed from {resume_from} at step {state['step']}")
    # Rank 0 holds the run's totals: reading skips once (every rank reads the same records),
    # and on resume the checkpoint's totals, which include them already.
    tally = SkipTally(skipped=Counter(state["skipped"] if resume_from else read_skips if dist.is_main else {}),
                      truncated=state.get("truncated", 0))
    logger = RunLogger(run_dir, tuple(cfg.trackers.split(",")), purge_after=state["step"]) if dist.is_main else None
    # The loss must have moved once warmup is over; the gap must have left zero by the second eval.
    alarms = Alarms(logger, flat_after=min(max(100, 2 * warmup), total_steps),
                    gap_after=min(2 * cfg.eval_interval or total_steps, total_steps),
                    eval_loss_before=state["summary"].get("eval_loss_before"), enabled=dist.is_main)
    summary: dict = {"run": run_name, "run_dir": run_dir, **state["summary"]}
    assistant = Assistant.from_model(model, tokenizer) if dist.is_main else None   # sample replies at each eval
    if dist.is_main and cfg.eval_interval and state["step"] == 0:  # the curve's "before" point
        before = log_heldout_loss(model, eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers, logger, 0)
        alarms.eval(0, before)
        summary["eval_loss_before"] = before["eval/loss"]

    # ---- loop
    stream = batches(train_ds, cfg, dist.rank, dist.world_size, tally, state["epoch"], state["positions"][dist.rank])
    model.train()
    losses: list[float] = state["losses"]
    nonfinite, in_a_row = state["nonfinite_steps"], 0
    checkpoint = ""
    stop = StopRequest()
    t_start = time.time()
    # In a terminal a bar redraws in place; in a log file only the periodic log lines appear.
    bar = console.progress(total_steps, "stage 1", "step", initial=state["step"], show=dist.is_main, every=0)
    for step in range(state["step"] + 1, total_steps + 1):
        t0 = time.time()
        # Micro-batches of this step, fetched first so the loss can be normalised by the
        # supervised-token count of the whole global step (a mean over tokens, not batches).
        micro = []
        for _ in range(grad_accum):
            epoch, position, batch = next(stream)
            micro.append(to_device(batch, device))
        # One all-reduce carries the step's counts and whether any rank was asked to stop.
        supervised = sum(supervised_tokens(b["labels"]) for b in micro)
        counts = torch.tensor([supervised, sum(b["size"] for b in micro),
                               sum(int(b["attention_mask"].sum()) for b in micro), float(stop.requested)],
                              dtype=torch.float64, device=device)
        n_tokens, n_samples, n_seq_tokens, stopping = all_reduce_sum(counts).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                ls, _ = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b.get("pixel_values"),
                              image_features=b.get("image_features"), position_ids=b.get("position_ids"))
                (ls / n_tokens).backward()   # this rank's token sum over the global step's tokens
            loss_sum += ls.detach()
        all_reduce_grads(params)             # summed over ranks: the gradient of the global mean
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        loss = all_reduce_sum(loss_sum).item() / max(n_tokens, 1)
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            optimizer.step()
            in_a_row = 0
        else:
            # A non-finite loss or gradient would poison AdamW's moments: skip the update
            # (the schedule still advances), count it, and stop if it keeps happening.
            nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
            console.warn(f"step {step}: non-finite loss {loss} / grad norm {float(grad_norm)}; update skipped "
                         f"({in_a_row} in a row, limit {cfg.max_nonfinite})")
            if in_a_row >= cfg.max_nonfinite:
                raise SystemExit(f"{in_a_row} non-finite steps in a row at step {step}: lower --lr, check the data "
                                 f"(skipped: {dict(tally.skipped)}), or resume from {find_latest(ckpt_dir)}")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log: every step to metrics.jsonl/TensorBoard, a line every --log_interval
        losses.append(loss)
        alarms.step(step, losses, float(grad_norm))
        alarms.data(step, tally.unusable, tally.used)
        dt = time.time() - t0
        scalars = {"train/loss": loss, "train/ppl": math.exp(min(loss, 50.0)), "train/lr": scheduler.get_last_lr()[-1],
                   "train/grad_norm": float(grad_norm), "train/samples_per_s": n_samples / dt,
                   "train/tokens_per_s": n_seq_tokens / dt, "train/epoch": epoch, "train/nonfinite_steps": nonfinite,
                   **mfu(model, micro, supervised, bool(cfg.features_cache), dt)}
        periodic = cfg.log_interval and step % cfg.log_interval == 0
        if periodic:
            scalars.update(periodic_scalars(device, tally))
        if logger:
            logger.log(step, scalars)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['train/lr']:.2e}", sps=f"{scalars['train/samples_per_s']:.1f}")
        if periodic and dist.is_main:
            bar.write(log_line(step, total_steps, losses[-cfg.log_interval:], scalars, tally, alarms.active))

        # ---- evaluate and checkpoint (rank 0 evaluates; the others wait in the next all-reduce)
        last = step == total_steps
        if dist.is_main and cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            metrics = log_heldout_loss(model, eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers, logger, step, bar.write)
            alarms.eval(step, metrics)
            log_sample_replies(assistant, eval_ds, cfg.sample_replies, logger, step)
            summary.update(eval_summary(metrics))
        if (cfg.save_interval and step % cfg.save_interval == 0) or last or stopping:
            train_state = {"step": step, "epoch": epoch, "losses": losses, "nonfinite_steps": nonfinite,
                           "summary": {k: v for k, v in summary.items() if k.startswith(("eval", "image_"))}}
            checkpoint = save_training(ckpt_dir, train_state, lambda folder: save_checkpoint(
                model, folder, {"step": step, "run": run_name, "stage": cfg.stage, "init_from": start_point(cfg),
                                "train_config": redacted(cfg)}, tokenizer), optimizer, scheduler,
                dist, {"position": position, "skipped": dict(tally.skipped), "truncated": tally.truncated}, cfg.keep_last)
        if stopping and not last:
            bar.close()
            if dist.is_main:
                console.warn(f"stopped at step {step}; checkpoint {checkpoint}. Continue with:\n  "
                             + resume_command(argv or [], run_name, dist.world_size, STAGE_SCRIPTS[cfg.stage]))
            cleanup_dist()
            return {**summary, "interrupted": True, "steps": step, "checkpoint": checkpoint}
    bar.close()

    # ---- summary
    summary.update(run_totals(tally, dist, losses, nonfinite, cfg.log_interval or 10, total_steps, global_batch,
                              time.time() - t_start))
    summary["checkpoint"] = checkpoint
    if dist.is_main:
        if "eval_loss" not in summary:
            metrics = heldout_loss(model, eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers)
            alarms.eval(total_steps, metrics)
            summary.update(eval_summary(metrics))
        summary["alarms"] = alarms.fired
        dump_json(summary, os.path.join(run_dir, "summary.json"))
        logger.close()
        print_summary(summary, alarms.fired, checkpoint, cfg.runs_dir)
    barrier()        # leave together: a rank tearing down while rank 0 still evaluates can abort gloo
    cleanup_dist()
    return summary


def open_run(cfg: TrainConfig, dist) -> tuple[str, str, str, str | None]:
    """(run name, runs/<run>, checkpoints/<run>, the checkpoint to resume from or None); the
    config is printed and saved in the run folder."""
    run_name = cfg.run_name or (run_name_of(cfg.resume) if cfg.resume not in ("", "auto") else "") \
        or time.strftime(f"stage{cfg.stage}_%Y%m%d_%H%M%S")
    run_dir, ckpt_dir = os.path.join(cfg.runs_dir, run_name), os.path.join(cfg.checkpoints_dir, run_name)
    resume_from = resume_point(cfg.resume, cfg.overwrite, run_name, ckpt_dir, run_dir)
    barrier()  # rank 0 may have just deleted an old run (--overwrite)
    print_config(redacted(cfg), f"stage-{cfg.stage} config (run {run_name})")
    if dist.is_main:
        dump_json(redacted(cfg), os.path.join(run_dir, "config.json"))
    return run_name, run_dir, ckpt_dir, resume_from


def schedule(kind: str, optimizer, warmup: int, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    return (get_cosine_schedule_with_warmup(optimizer, warmup, total_steps) if kind == "cosine"
            else get_constant_schedule_with_warmup(optimizer, warmup))


def accumulation(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: --grad_accum, or what --global_batch_size implies."""
    if not cfg.global_batch_size:
        return cfg.grad_accum
    per_step = cfg.batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise SystemExit(f"--global_batch_size {cfg.global_batch_size} is not a multiple of "
                         f"batch_size {cfg.batch_size} x {world_size} processes")
    return cfg.global_batch_size // per_step


def build_training_model(cfg: TrainConfig, vision_path: str, llm_path: str, dist, resume_from: str | None):
    """The model as training runs it, from one of three places: the checkpoint to resume (every
    trained weight as saved), a start point (--stage1/--init: its projector and LLM), or the
    frozen models alone (a fresh projector). Then what --tune_llm/--tune_projector ask trains,
    exactly (asserted), with gradient checkpointing and compile when asked. Prints the counts."""
    tuning = tuning_of(cfg)
    check_device(tuning, dist.device)            # QLoRA on a CPU: refused before anything loads
    build = dict(attn_implementation=cfg.attn, models_dir=cfg.models_dir, trust_remote_code=cfg.trust_remote_code,
                 load_in_4bit=tuning.load_in_4bit)
    if tuning.llm == "full":
        build["llm_dtype"] = torch.float32       # fp32 master weights; autocast computes in bf16
    start = resume_from or start_point(cfg)
    if start:
        own_llm = read_checkpoint_meta(start).get("tuning", {}).get("llm") == "full"   # it carries its LLM
        model, tokenizer, _ = load_checkpoint(start, dist.device, cfg.vision_tower or None,
                                              None if own_llm else cfg.llm or None, trainable=bool(resume_from), **build)
        if resume_from and model.tuning.llm != tuning.llm:
            raise SystemExit(f"--resume {resume_from}: that run tuned the LLM with '{model.tuning.llm}', this one asks "
                             f"for '{tuning.llm}'")
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
        model, tokenizer = build_model(spec, dist.device, **build)
    if tuning.llm == "lora" and not is_peft(model.llm):
        model.llm = add_lora(model.llm, tuning)
    model.tuning = tuning
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
    for k, v in model.summary().items():
        console.kv(k, v)
    return model, tokenizer




def main(argv: list[str] | None = None, stage_defaults: dict | None = None, doc: str | None = None) -> dict:
    """Parse, then train (or run the demo). Later stages call this with their defaults and docstring."""
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    console.quiet_bars_in_log_files()
    cfg = parse_args(argv, stage_defaults, doc)
    if cfg.demo:
        return run_demo(cfg, lambda c: train(c, argv), started)
    return train(cfg, argv)


def run_cli(stage_defaults: dict | None = None, doc: str | None = None) -> None:
    """`python train_stageN.py`: exit 130 after a Ctrl-C (checkpoint saved), at once on a second."""
    try:
        sys.exit(130 if main(None, stage_defaults, doc).get("interrupted") else 0)
    except KeyboardInterrupt:  # a second Ctrl-C: quit at once, without a traceback
        # DataLoader workers stuck in slow I/O would each hold the exit for seconds: stop them first.
        for child in multiprocessing.active_children():
            child.terminate()
        console.error("interrupted: nothing saved since the last checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    run_cli()
