"""A training run's configuration: TrainConfig (every flag of train_stage1.py, train_stage2.py
and train_stage3_lora.py, typed, with a default and a reason), how a command line becomes one
(a later stage's defaults, presets, the align plan's flags, the demo; what a user typed always
wins), and where the run's frozen models come from (registry ids, local folders, or the
checkpoint a stage-2/3 run starts from).

    python train_stage1.py --help        # every field below, with its default for that stage
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from backbones import PRESETS, MissingModel, download, resolve_model, vision_defaults
from checkpoint_io import read_checkpoint_meta
from model import Projector
from parallel import SHARDED, STRATEGIES, default_strategy
from prompts import INSTRUCTION_POOLS
from readers import DATA_FORMATS
from tuning import COURSE_LORA_TARGET, Tuning, check_device
from utils.align_plan import translate_align_flags
from utils.config import Parser, add_dataclass_args, explicit_flags, from_namespace
from utils.dist import available_cpus, pick_device
from utils.trackers import parse_trackers


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---- models
    model: str = _f("", "preset combination (flags you type override its parts)", choices=["", *PRESETS])
    vision_tower: str = _f("", "vision tower: registry id (docs/models-and-data.md) or local directory")
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
    precision: str = _f("auto", "bf16: matmuls in bf16 under autocast, fp32 master weights, the loss in fp32, frozen "
                                "weights stored in bf16; fp32: everything in fp32. auto: bf16 on CUDA; fp32 on a CPU "
                                "(CPUs with AMX or AVX512-BF16 compute bf16 natively and say so at start; others "
                                "emulate it, measured ~100x slower than fp32 on an AMD EPYC; and a demo's figures "
                                "must not move with the CPU type)", choices=["auto", "fp32", "bf16"])
    ce_chunk_size: int = _f(1024, "supervised tokens per chunk of the loss: over more than this, the logits are made "
                                  "and dropped a chunk at a time, never [tokens x vocab] at once (0: all at once)")
    threads: int = _f(0, "CPU threads per process (0: OMP_NUM_THREADS, else 1 for a model under 50M parameters, else "
                         "the cores no other process uses at the start; utils/cpu.py says why)")
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
    max_text_len: int = _f(128, "text tokens per sample, image slots not counted; a long answer loses its tail, a "
                                "long dialogue its last turns")
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
    change_global_batch: bool = _f(False, "resume with this command's global batch instead of the checkpoint's "
                                          "(off: a resume keeps it, deriving --grad_accum, or refuses)")
    lr: float = _f(2e-3, "peak learning rate (the course: 2e-3 for stage 1's linear projector, 2e-5 for stage 2's "
                         "full LLM, 2e-4 for stage 3's LoRA)")
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
    trackers: str = _f("jsonl,tensorboard", "log sinks, comma-separated, any of: jsonl, tensorboard, wandb, swanlab "
                                            "(wandb and swanlab: pip install them; offline with WANDB_MODE=offline, "
                                            "SWANLAB_MODE=offline; a resume continues the same tracker run)")
    checkpoints_dir: str = _f("checkpoints", "where checkpoints go")
    log_interval: int = _f(10, "steps between printed log lines (0 = none; metrics.jsonl still gets every step)")
    eval_interval: int = _f(200, "steps between held-out evaluations, plus one before training "
                                 "(0 = only once, at the end)")
    eval_samples: int = _f(500, "held-out samples per evaluation (0 = all)")
    sample_replies: int = _f(4, "held-out images answered and logged at each evaluation (0: none)")
    save_interval: int = _f(100, "steps between checkpoints (the align plan's 100; 0 = only at the end and on a stop)")
    keep_last: int = _f(3, "keep the newest K step checkpoints (0 = all)")
    resume: str = _f("", "'auto': continue from the newest complete checkpoint of --run_name; or a checkpoint path")
    overwrite: bool = _f(False, "delete an existing run of the same name and start over")
    max_nonfinite: int = _f(10, "abort after this many non-finite losses/gradients in a row (each is skipped)")
    trust_remote_code: bool = _f(False, "allow model folders to run their own Python code (off: never)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    train_strategy: str = _f("", "several processes (torchrun), parallel.py; default: ddp when the projector or LoRA "
                                 "trains, fsdp-full-shard when the LLM trains in full:\n"
                             + "\n".join(f"- {name}: {what}" for name, what in STRATEGIES.items()),
                             choices=list(STRATEGIES))
    fsdp_offload: bool = _f(False, "FSDP: keep the parameter, gradient and optimizer shards in CPU memory "
                                   "(CPUOffloadPolicy): a large LLM on a small GPU, slower steps")
    hsdp_shard_size: int = _f(0, "hsdp: processes per shard group (0: those of one node, LOCAL_WORLD_SIZE)")
    demo: bool = _f(False, "build the offline toy world and train on it (CPU, minutes); its settings: DEMO_DEFAULTS")


# ---- the demo (--demo): its values wherever the user typed nothing, beside the defaults they
# override (editing a default above changes the demo only where the demo does not set it; the
# demo prints where it differs). Where its world lives is toy_demo.prepare_demo's, after parsing.
# Stage 1 trains the course's linear projector on the toy world (its tower is a CLIP used the
# course's way: last layer, all tokens, ln_post).
STAGE1_DEMO = dict(batch_size=32, max_steps=600, lr=2e-3, warmup_ratio=0.05, log_interval=25, eval_interval=300,
                   eval_samples=200, save_interval=300, instructions="zh", num_workers=1, data_format="sa1b",
                   projector="linear", feature_layer=-1, feature_select="all", feature_post_norm=True)
# Stage 2: the toy LM is tiny (96 wide), so it takes a far larger lr than the course's 2e-5 for
# Qwen3-0.6B; gradient checkpointing would only slow it down. 800 steps: the yes/no comparisons
# (toy MME, toy POPE) are learnt late, after the formats (toy_instructions.SFT_KINDS has the figures).
STAGE2_DEMO = dict(batch_size=32, max_steps=800, lr=1e-3, projector_lr=1e-3, warmup_ratio=0.05, log_interval=25,
                   eval_interval=400, eval_samples=200, save_interval=400, num_workers=1, max_text_len=160,
                   gradient_checkpointing=False, data_format="cogvlm_sft", eval_ratio=0.0)
STAGE3_DEMO = dict(batch_size=32, max_steps=200, lr=3e-3, warmup_ratio=0.05, log_interval=25, eval_interval=100,
                   eval_samples=200, save_interval=100, num_workers=1, max_text_len=128, data_format="chat")
DEMO_DEFAULTS = {1: STAGE1_DEMO, 2: STAGE2_DEMO, 3: STAGE3_DEMO}
DEMO_RUN_PREFIX = {1: "demo", 2: "demo_stage2", 3: "demo_stage3"}


def build_parser(stage_defaults: dict | None = None, doc: str | None = None) -> argparse.ArgumentParser:
    """The flags of TrainConfig; a later stage's entry point passes its defaults (shown by --help)."""
    parser = Parser(description=doc or __doc__)
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(**{k: v for k, v in (stage_defaults or {}).items() if k != "stage"})
    return parser


# Flags counted in steps or samples: 0 has a meaning (off, all, derive), a negative one has none.
NON_NEGATIVE = ("max_samples", "max_text_len", "num_workers", "max_empty_batches", "grad_accum", "global_batch_size",
                "epochs", "max_steps", "log_interval", "eval_interval", "eval_samples", "sample_replies",
                "save_interval", "keep_last", "max_nonfinite", "ce_chunk_size", "threads")


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
    try:
        parse_trackers(cfg.trackers)
    except ValueError as e:
        parser.error(str(e))
    if not 0 <= cfg.eval_ratio < 1:
        parser.error(f"--eval_ratio {cfg.eval_ratio}: must be in [0, 1)")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            parser.error(f"--{name} {getattr(cfg, name)}: must be >= 0")
    for name in ("batch_size", "grad_accum", "max_text_len"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} {getattr(cfg, name)}: must be >= 1")
    explicit = explicit_flags(parser, argv)
    if cfg.model:
        for key, value in PRESETS[cfg.model].items():
            if key not in explicit:
                setattr(cfg, key, value)
    if cfg.demo:
        apply_demo_defaults(cfg, explicit)  # the demo's values; typed flags still win (its world: prepare_demo)
    cfg.train_strategy = cfg.train_strategy or default_strategy(tuning_of(cfg))
    check_strategy(cfg, parser)
    return cfg


def apply_demo_defaults(cfg: TrainConfig, explicit: set[str]) -> None:
    """--demo: the demo's settings (DEMO_DEFAULTS) wherever the user typed nothing, a run name included."""
    fill = dict(DEMO_DEFAULTS[cfg.stage])
    world = int(os.environ.get("WORLD_SIZE", "1"))     # under torchrun: the same global batch, the same figures
    if world > 1 and "batch_size" not in explicit and fill["batch_size"] % world == 0:
        fill["batch_size"] //= world
    if cfg.resume != "auto":  # --resume auto alone continues the newest unfinished demo run (bookkeeping.open_run)
        fill["run_name"] = time.strftime(f"{DEMO_RUN_PREFIX[cfg.stage]}_%Y%m%d_%H%M%S")
    for key, value in fill.items():
        if key not in explicit:
            setattr(cfg, key, value)


def demo_differences(cfg: TrainConfig, stage_defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """{flag: (the demo's value, the stage's default)} wherever a --demo run differs from the
    defaults in its DEMO_DEFAULTS settings (typed flags included: they win over both)."""
    defaults = vars(build_parser(stage_defaults).parse_args([]))
    return {key: (getattr(cfg, key), defaults[key]) for key in DEMO_DEFAULTS[cfg.stage]
            if getattr(cfg, key) != defaults[key]}


def refuse_early(cfg: TrainConfig) -> None:
    """Refusals that need no model and no data, made before anything runs: before the demo builds
    its world or runs an earlier stage's demo, before any model loads (a QLoRA run on a CPU used to
    find out after the whole stage-2 demo)."""
    device = pick_device(cfg.device)
    check_device(tuning_of(cfg), device)
    if cfg.attn == "flash_attention_2":
        if device.type != "cuda":
            raise SystemExit(f"--attn flash_attention_2 needs a CUDA GPU (this run is on {device.type}): use --attn sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise SystemExit("--attn flash_attention_2 needs the flash-attn package (scripts/check_flash_attn.py names "
                             "the wheel for this machine), or use --attn sdpa")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.global_batch_size and cfg.global_batch_size % (cfg.batch_size * world):
        raise SystemExit(f"--global_batch_size {cfg.global_batch_size} is not a multiple of batch_size "
                         f"{cfg.batch_size} x {world} process{'es' if world > 1 else ''}")


def check_strategy(cfg: TrainConfig, parser: argparse.ArgumentParser) -> None:
    """What several processes cannot do together is refused by name, before anything loads."""
    if cfg.fsdp_offload and cfg.train_strategy not in SHARDED:
        parser.error(f"--fsdp_offload keeps FSDP's shards on the CPU: it needs a sharded --train_strategy "
                     f"({', '.join(SHARDED)}), not {cfg.train_strategy}")
    if cfg.hsdp_shard_size and cfg.train_strategy != "hsdp":
        parser.error(f"--hsdp_shard_size is hsdp's shard group; --train_strategy is {cfg.train_strategy}")
    if cfg.load_in_4bit and cfg.train_strategy in SHARDED:
        parser.error(f"--load_in_4bit (QLoRA) with --train_strategy {cfg.train_strategy}: FSDP cannot shard "
                     "bitsandbytes' 4-bit weights here. Use --train_strategy ddp (each GPU holds the 4-bit base, "
                     "about 0.4 GiB per billion parameters) or LoRA over a bf16 base with FSDP.")


def tuning_of(cfg: TrainConfig) -> Tuning:
    return Tuning(llm=cfg.tune_llm, projector=cfg.tune_projector, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                  lora_dropout=cfg.lora_dropout, lora_target=cfg.lora_target, load_in_4bit=cfg.load_in_4bit)


def start_point(cfg: TrainConfig) -> str:
    return cfg.stage1 or cfg.init


def resolve_models(cfg: TrainConfig) -> tuple[TrainConfig, str, str]:
    """(the config with its feature settings completed, vision tower folder, LLM folder).

    Registry ids -> local folders (downloading first with --download); the tower's feature
    defaults fill the flags left unset. Every missing model is named at once, with the one
    command that downloads them all. With a start point (--stage1/--init) the models and
    features are the checkpoint's: they complete the config (typed --vision_tower/--llm only
    say where the models live now) and the folders are ('', '')."""
    if start_point(cfg):
        try:
            meta = read_checkpoint_meta(start_point(cfg))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--{'stage1' if cfg.stage1 else 'init'}: {e}") from None
        tuned = meta.get("tuning", {}).get("llm", "none")
        if cfg.stage1 and (tuned != "none" or meta.get("stage", 1) != 1):
            # Its tuned LLM would be this run's start: a different run from the one --stage1 names.
            raise SystemExit(f"--stage1 {cfg.stage1}: a stage-{meta.get('stage', '?')} checkpoint (LLM tuned: "
                             f"{tuned}), not a stage-1 one. To continue from this tuned model use --init "
                             f"{cfg.stage1}; --stage1 takes a projector-only checkpoint of train_stage1.py.")
        spec = meta["spec"]
        if not cfg.data_root and not cfg.chat_json:
            raise SystemExit("name the training data: --data_root DIR (or --chat_json FILE), or run --demo")
        features = ("projector", "feature_layer", "feature_select", "feature_post_norm", "image_wrap")
        return replace(cfg, **{key: spec[key] for key in features}), "", ""
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
    unset = {k: v for k, v in vision_defaults(cfg.vision_tower, vision_path).items() if getattr(cfg, k) is None}
    return replace(cfg, **unset), vision_path, llm_path


def name_the_models_message() -> str:
    presets = "\n".join(f"  --model {name:<26} {p['vision_tower']} + {p['projector']} + {p['llm']}"
                        for name, p in PRESETS.items())
    return ("name the frozen models: a preset,\n" + presets + "\nor --vision_tower/--llm (registry ids or local "
            "folders; `python checkpoint_io.py --list` lists the ids), or run --demo for the offline toy world")
