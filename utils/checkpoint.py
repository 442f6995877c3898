"""One run's checkpoints: atomic step folders, a `latest` pointer, rotation, the training state
(trained weights and optimizer, schedule, data position, RNG of every rank) and the rules of a
run folder.

    checkpoints/<run>/step_000100/   projector.safetensors (+ model_spec.json, llm/ or adapter/)
                                     resume/           trained parameters + optimizer state
                                                       (torch.distributed.checkpoint, as trained:
                                                       sharded under FSDP, one copy under DDP)
                                     trainer_state.pt  step, schedule, data position, RNG per rank
                                     manifest.json     every file's size and CRC-32, written last
    checkpoints/<run>/latest         "step_000100", written only after that folder is complete

A folder is written under a temporary name and renamed when complete, and the pointer is
replaced after that, so `kill -9` at any moment (a save included) leaves the previous
checkpoint intact and findable. What damages a folder later (a copy cut short, a full disk, a
file saved over) is found by its manifest (utils.integrity): a resume skips a damaged newest step
with a line naming the file and continues from the newest intact one.

trainer_state.pt holds only tensors and plain Python values and is read with weights_only=True:
loading it runs no pickled code; resume/ is tensors and DCP's metadata. DCP reshards resume/ onto
any process count and strategy when it loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from utils import console
from utils.atomic import atomic_write
from utils.config import redacted
from utils.dist import DistInfo, barrier, broadcast_object, gather_objects, rank_and_world
from utils.integrity import (MANIFEST, SPEC_FILE, check_step, find_problem, reason, remember_intact,
                             write_manifest)

STATE_FILE = "trainer_state.pt"
RESUME_DIR = "resume"
WEIGHTS_FILE = "projector.safetensors"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
STAGE_SCRIPTS = {1: "train_stage1.py", 2: "train_stage2.py", 3: "train_stage3_lora.py"}  # what a resume hint names


def is_complete(path: str) -> bool:
    """Whether a step folder looks whole at a glance: every file of its manifest there at its size
    (a folder saved before manifests: its weights, spec and training state there). No checksums:
    cheap enough for every listing; a resume and the readers check them (check_step)."""
    return find_problem(path, "all", checksums=False) is None


def looks_like_step(path: str) -> bool:
    """A folder that is or was one checkpoint (named step_NNNNNN, or holding a checkpoint's files),
    as opposed to a run folder of them."""
    return os.path.isdir(path) and (bool(STEP_DIR.match(os.path.basename(os.path.normpath(path)))) or any(
        os.path.lexists(os.path.join(path, f)) for f in (MANIFEST, WEIGHTS_FILE, STATE_FILE, SPEC_FILE)))


def step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the step folders, oldest first; temporary folders are not listed."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if (m := STEP_DIR.match(n))]
    return sorted(found)


def save_step(ckpt_dir: str, step: int, write: Callable[[str], None], keep_last: int = 0) -> str:
    """Write one checkpoint with `write(folder)`, commit it by renaming, point `latest` at it,
    then drop all but the newest `keep_last` (0 keeps all). Every rank calls this and runs
    `write` on the same temporary folder (each writes its shards; rank 0 the rest: a shared
    filesystem across nodes); rank 0 commits once all have written."""
    main = rank_and_world()[0] == 0
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_dir, name)
    tmp = broadcast_object(os.path.join(ckpt_dir, f".{name}.tmp{os.getpid()}"))   # rank 0's name
    if main:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    write(tmp)
    barrier()               # every rank's part is on disk
    write_manifest(tmp)     # last, inside the commit: every rank hashes a share, rank 0 writes it
    if main:
        if os.path.isdir(final):  # the same step saved again (an interrupt right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(os.path.join(ckpt_dir, "latest"), name + "\n")
        for old in rotated(ckpt_dir, keep_last):
            shutil.rmtree(old, ignore_errors=True)
    barrier()               # nobody reads `latest` before it names this step
    return final


def rotated(ckpt_dir: str, keep_last: int) -> list[str]:
    """The step folders --keep_last drops (0 keeps all): those older than the newest `keep_last`
    intact ones. A damaged or incomplete folder never counts, so a newer one that is not intact
    never pushes out the newest intact one, and is itself left for its owner to repair."""
    if keep_last <= 0:
        return []
    dirs = step_dirs(ckpt_dir)
    intact = [step for step, path in dirs if is_complete(path)]
    if len(intact) <= keep_last:
        return []
    return [path for step, path in dirs if step < intact[-keep_last]]


def in_resume_order(ckpt_dir: str) -> list[str]:
    """A run's step folders in the order a resume tries them: the one `latest` names, then the
    others, newest first."""
    named = ""
    pointer = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as fh:
            named = os.path.join(ckpt_dir, fh.read().strip())
    others = [path for _, path in reversed(step_dirs(ckpt_dir)) if path != named]
    return ([named] if os.path.isdir(named) and STEP_DIR.match(os.path.basename(named)) else []) + others


def find_latest(ckpt_dir: str) -> str | None:
    """The checkpoint `latest` names if it is complete, else the newest complete step folder
    (complete at a glance: is_complete)."""
    return next((path for path in in_resume_order(ckpt_dir) if is_complete(path)), None)


def agreed_check(path: str, parts: str = "all") -> str | None:
    """check_step on every rank of the group, each hashing its share, and one verdict for all: a
    damage that one rank alone sees (its share, or its node's copy) makes every rank skip the step;
    ranks that decided apart would load different steps and hang in the first collective."""
    rank, world = rank_and_world()
    if world == 1:
        return check_step(path, parts)
    found = [v for v in gather_objects(check_step(path, parts, share=(rank, world))) if v]
    if not found:
        remember_intact(path)
    return found[0] if found else None


def newest_intact(ckpt_dir: str, parts: str = "all", together: bool = False) -> tuple[str | None, list[str]]:
    """(the newest intact step folder of a run, or None; a "damaged: <file>: <what>" line for each
    one tried before it). `together`: every rank calls this and all reach the same answer."""
    skipped = []
    for path in broadcast_object(in_resume_order(ckpt_dir)) if together else in_resume_order(ckpt_dir):
        verdict = agreed_check(path, parts) if together else check_step(path, parts)
        if verdict is None:
            return path, skipped
        skipped.append(verdict)
    return None, skipped


def capture_rng() -> dict:
    """Every RNG the loop could touch, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": _to_plain(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def save_state(folder: str, state: dict) -> None:
    torch.save(state, os.path.join(folder, STATE_FILE))


def load_state(folder: str) -> dict:
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- a run folder

def resume_point(resume: str, overwrite: bool, run_name: str, ckpt_dir: str, run_dir: str) -> str | None:
    """The checkpoint to resume from (--resume auto | PATH), if any, checked first (every rank
    calls this and all agree): a run folder gives its newest intact step, saying which newer ones
    it skipped and why; a step folder named on purpose is refused when damaged, naming the newest
    intact one. Refuses to mix two runs in one folder unless told to start over (--overwrite
    deletes the old run)."""
    if resume and resume != "auto":
        if not looks_like_step(resume):
            return newest_or_refuse(resume, f"--resume {resume}")
        verdict = agreed_check(resume)
        if verdict:
            newest, _ = newest_intact(os.path.dirname(os.path.abspath(resume)), together=True)
            raise SystemExit(f"--resume {resume}: {verdict}. Not loaded; " + (
                f"the newest intact checkpoint of that run is {newest}: resume from it with --resume {newest}"
                if newest else "no other step of that run is intact either"))
        return resume
    if resume == "auto":
        if step_dirs(ckpt_dir):
            return newest_or_refuse(ckpt_dir, "--resume auto")
        console.notice(f"--resume auto: no checkpoint in {ckpt_dir}; starting from scratch")
        return None
    existing = find_latest(ckpt_dir)
    if overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    elif step_dirs(ckpt_dir):
        raise SystemExit(f"{ckpt_dir} already holds checkpoints of a run named '{run_name}' "
                         f"(latest: {existing}). Continue it with --resume auto, start over with --overwrite, "
                         "or pick another --run_name.")
    return None


def newest_or_refuse(ckpt_dir: str, flag: str) -> str:
    """The newest intact step of a run folder, every rank agreeing, with a line for each newer one
    skipped; refused, with what is wrong with each, when none is intact."""
    newest, skipped = newest_intact(ckpt_dir, together=True)
    for line in skipped:
        console.notice(f"{line}; skipped")
    if newest is None:
        if not skipped:
            raise SystemExit(f"{flag}: no checkpoint there")
        raise SystemExit(f"{flag}: no intact checkpoint in {ckpt_dir}:\n" + "\n".join(f"  {s}" for s in skipped)
                         + "\nCopy the run again from where it was saved, or start over with --overwrite.")
    if skipped:
        console.notice(f"continuing from {os.path.basename(newest)}, the newest intact checkpoint")
    return newest


def run_name_of(path: str) -> str:
    """The run name recorded in a checkpoint's model_spec.json ('' when there is none): --resume
    PATH without --run_name continues that run."""
    folder = path if looks_like_step(path) else (find_latest(path) or path)
    return read_spec(folder).get("run", "")


def read_spec(folder: str) -> dict:
    """A step folder's model_spec.json (what its safetensors metadata holds, readable); {} when absent."""
    try:
        with open(os.path.join(folder, "model_spec.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def is_finished(meta: dict) -> bool:
    """Whether a checkpoint is its run's last step. Checkpoints written before `total_steps` was
    recorded know it only when the run was counted in --max_steps."""
    total = meta.get("total_steps") or meta.get("train_config", {}).get("max_steps") or 0
    return bool(total) and meta.get("step", 0) >= total


def unfinished_run(checkpoints_dir: str, stage: int) -> str:
    """The run `--resume auto` continues when no --run_name is given: the newest run of `stage`
    under `checkpoints_dir` whose latest checkpoint is not its last step. Refuses (naming the
    runs there) when there is none: a resume never silently starts from scratch."""
    runs = []
    for name in sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []:
        latest = find_latest(os.path.join(checkpoints_dir, name))
        meta = read_spec(latest) if latest else {}
        if meta.get("stage", 1) == stage:
            runs.append((os.path.getmtime(os.path.join(latest, STATE_FILE)), name, meta))
    unfinished = [(mtime, name) for mtime, name, meta in runs if not is_finished(meta)]
    if unfinished:
        return max(unfinished)[1]
    finished = ", ".join(f"{name} (step {meta.get('step')})" for _, name, meta in sorted(runs, reverse=True)[:5])
    raise SystemExit(f"--resume auto without --run_name: no unfinished stage-{stage} run in {checkpoints_dir}/ to "
                     "continue" + (f"; finished: {finished}" if finished else "") + ". Name one with --run_name NAME, "
                     "or leave out --resume to start a new run.")


def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of an AdamW its state now, exactly as AdamW creates it at a parameter's
    first gradient (step 0, zero moments: numerically inert). A parameter without state would be
    missing from the resume state (DCP saves what exists: pytorch #192202), and a resumed
    optimizer would then ask for keys the checkpoint lacks."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _resume_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": the trained parameters, "optim": the optimizer}, keyed by parameter name, as this
    process holds them (sharded DTensors under FSDP: no gathering)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # ignore_frozen_params lets a frozen weight tied to another name through (LoRA's lm_head).
    return {"model": {k: v for k, v in msd.items() if k in trained}, "optim": osd}


@contextlib.contextmanager
def one_process_is_fine():
    """DCP warns at every save and load without a process group ("assuming the intent is to save
    in a single process"): that is plain `python`, the ordinary case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def save_resume(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The trained parameters and the optimizer into folder/resume/, every rank its own shards."""
    import torch.distributed.checkpoint as dcp

    with one_process_is_fine():
        dcp.save(_resume_state_dicts(model, optimizer), checkpoint_id=os.path.join(folder, RESUME_DIR))


def load_resume(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """folder/resume/ into the model's trained parameters and the optimizer, resharded to how
    this run holds them. Strict: a trained parameter or an optimizer entry the checkpoint lacks
    is an error, not a fresh start."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    state = _resume_state_dicts(model, optimizer)
    try:
        with one_process_is_fine():
            dcp.load(state, checkpoint_id=os.path.join(folder, RESUME_DIR))
    except (Exception, CheckpointException) as e:  # every rank gets the CheckpointException of any one
        causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        first = (str(causes[0]).splitlines() or [""])[0][:300]
        if any(isinstance(c, KeyError) or "Missing key" in str(c) or "mismatch" in str(c) for c in causes):
            raise SystemExit(f"--resume {folder}: its resume state does not fit this run ({first}); was it trained "
                             "with other --tune_llm / --tune_projector / LoRA settings?") from None
        # Checked before loading (utils.integrity); reading can still fail (a file damaged since).
        raise SystemExit(f"--resume {folder}: damaged: {os.path.join(folder, RESUME_DIR)}: cannot be loaded "
                         f"({reason(causes[0], 300)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def save_training(ckpt_dir: str, state: dict, write_weights: Callable[[str], None], model: torch.nn.Module,
                  optimizer, scheduler, info: DistInfo, rank_state: dict, keep_last: int) -> str:
    """A step folder with everything needed to continue bit-exactly: the weights people use
    (`write_weights(folder)`, rank 0), the resume state (resume/: every rank), the schedule, the
    step and, from every rank, its data offset, RNG and skip counts (`rank_state`: offset,
    skipped, truncated). Every rank calls it and gets the folder's path."""
    per_rank = gather_objects({**rank_state, "rng": capture_rng()})

    def write(folder: str) -> None:
        save_resume(folder, model, optimizer)
        if not info.is_main:
            return
        write_weights(folder)
        save_state(folder, {**state, "offsets": [p["offset"] for p in per_rank],
                            "rng": [p["rng"] for p in per_rank],
                            "skipped": dict(sum((Counter(p["skipped"]) for p in per_rank), Counter())),
                            "truncated": sum(p["truncated"] for p in per_rank), "world_size": info.world_size,
                            "scheduler": scheduler.state_dict()})

    return save_step(ckpt_dir, state["step"], write, keep_last)


@dataclass
class SavedBatch:
    """The global batch a checkpoint trained with, and how it was made."""

    size: int            # samples per optimizer step, over all processes
    batch_size: int      # per process and micro-step
    world_size: int
    step: int

    def describe(self) -> str:
        accum = self.size // (self.batch_size * self.world_size)
        return f"{self.batch_size} x {accum} accumulated x {self.world_size} process(es)"

    def ways_to_continue(self, world_size: int, batch_size: int) -> str:
        """The flags that make this global batch again: on `world_size` processes with a batch size
        no larger than `batch_size` (it may be what fits in memory), and as it ran."""
        ways = []
        if self.size % world_size == 0:
            per_process = self.size // world_size
            fits = [b for b in range(1, per_process + 1) if per_process % b == 0 and b <= batch_size]
            b = max(fits)
            ways.append(f"--batch_size {b} on {world_size} process(es) (x {per_process // b} accumulated)")
        launcher = f"torchrun --nproc-per-node {self.world_size}" if self.world_size > 1 else "python"
        ways.append(f"`{launcher}` with --batch_size {self.batch_size}, as it ran")
        return " or ".join(ways)


def saved_global_batch(path: str) -> SavedBatch:
    """The global batch of a checkpoint: recorded as train_config.global_batch_size since it is
    kept on resume; older checkpoints know their batch size, accumulation and process count."""
    train_cfg = read_spec(path).get("train_config", {})
    world = int(load_state(path).get("world_size", 1))
    batch = int(train_cfg.get("batch_size", 1))
    size = int(train_cfg.get("global_batch_size") or batch * int(train_cfg.get("grad_accum", 1)) * world)
    return SavedBatch(size, batch, world, int(read_spec(path).get("step", 0)))


def fresh_state(world_size: int) -> dict[str, Any]:
    """The training state of a run that starts from scratch (restore_training's shape)."""
    return {"step": 0, "epoch": 0, "offsets": [0] * world_size, "losses": [], "skipped": {}, "summary": {},
            "nonfinite_steps": 0}


def restore_training(path: str, model: torch.nn.Module, optimizer, scheduler, info: DistInfo,
                     batch_size: int) -> dict[str, Any]:
    """The training state of a checkpoint: trained weights and optimizer (resume/, resharded to
    this run), schedule, and this rank's data offset and RNG.

    On the process count it was written with, every rank continues exactly where it was. On
    another count the epoch continues from the same sample (every rank had consumed the same
    number of micro-steps); at the same global batch the steps then read the same samples as an
    uninterrupted run (dataset.EpochSampler), up to float rounding and the RNG of dropout."""
    try:
        state = load_state(path)
    except Exception as e:  # checked before loading; a file damaged since is still one line
        raise SystemExit(f"--resume {path}: damaged: {os.path.join(path, STATE_FILE)}: cannot be loaded "
                         f"({reason(e)})") from None
    if os.path.isdir(os.path.join(path, RESUME_DIR)):
        load_resume(path, model, optimizer)
    else:  # written before resume/ existed: the optimizer inside trainer_state.pt, weights from the files
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "offsets" not in state:  # older checkpoints counted batches per rank
        state["offsets"] = [p * batch_size * state["world_size"] for p in state["positions"]]
    if state["world_size"] == info.world_size:
        restore_rng(state["rng"][info.rank])
    else:
        offsets = state["offsets"]
        if len(set(offsets)) > 1:
            console.notice(f"resuming {state['world_size']} processes' checkpoint on {info.world_size}: its ranks had "
                         f"read up to samples {offsets} of the epoch (some skipped unusable batches); continuing "
                         f"from {min(offsets)}, so {max(offsets) - min(offsets)} samples may be read twice")
        else:
            console.info(f"resuming {state['world_size']} processes' checkpoint on {info.world_size}: the epoch "
                         f"continues at sample {offsets[0]}")
        state["offsets"] = [min(offsets)] * info.world_size
    if not info.is_main:  # totals live on rank 0; the others count afresh
        state["skipped"], state["truncated"] = {}, 0
    return state


def resume_command(argv: list[str], run_name: str, world_size: int, script: str = "train_stage1.py") -> str:
    """This run's command line with --resume auto: a typed --resume is replaced, the run name
    added unless it was typed, a token typed in place of a token file hidden."""
    kept, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume" or a.startswith("--resume="):
            i += 1 if "=" in a else 2
            continue
        if a == "--hf_token" and i + 1 < len(argv):
            kept += [a, redacted({"hf_token": argv[i + 1]})["hf_token"]]
            i += 2
            continue
        kept.append(f"--hf_token={redacted({'hf_token': a[11:]})['hf_token']}" if a.startswith("--hf_token=") else a)
        i += 1
    named = any(a.split("=")[0] in ("--run_name", "--run_id") for a in kept)
    launcher = f"torchrun --standalone --nproc-per-node {world_size}" if world_size > 1 else "python"
    return f"{launcher} {script} " + shlex.join([*kept, *([] if named else ["--run_name", run_name]),
                                                        "--resume", "auto"])
