"""One run's bookkeeping around the training loop, so that train() reads as the loop alone: the
run's folders (runs/<run>/ and checkpoints/<run>/, resume or refusal), what is logged each step
(metrics.jsonl, TensorBoard, a line every --log_interval, alarms), held-out evaluation with sample
replies, checkpoints with the state that makes a resume exact, and the summary at the end.

Every rank evaluates its share of the held-out set (a sharded model needs every rank in each
forward) and writes its shards of a checkpoint's resume state; rank 0 logs, writes the files
people use and the summary; every rank contributes its data position and RNG to a checkpoint
and its skip counts to the summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from assistant import Assistant
from checkpoint_io import checkpoint_weights, save_checkpoint
from dataset import Batch, LlavaDataset
from heldout import eval_summary, heldout_loss, log_heldout_loss, log_sample_replies
from model import LlavaModel
from parallel import reshard
from utils import console
from utils.alarms import Alarms
from utils.checkpoint import (STAGE_SCRIPTS, resume_command, resume_point, run_name_of, save_training,
                              unfinished_run)
from utils.config import dump_json, print_config, redacted
from utils.dist import DistInfo, barrier, cleanup as cleanup_dist, tell_launcher
from utils.flops import mfu
from utils.integrity import MANIFEST
from utils.metrics import RunLogger, log_line, periodic_scalars, print_summary, run_totals
from utils.skips import Skips, SkipTally
from utils.trackers import parse_trackers


@dataclass
class RunFolders:
    name: str
    run_dir: str                 # runs/<run>: config.json, metrics.jsonl, TensorBoard events, summary.json
    ckpt_dir: str                # checkpoints/<run>: step folders and `latest`
    resume_from: str | None      # the checkpoint this run continues, if any


def open_run(cfg: Any, dist: DistInfo) -> RunFolders:
    """The run's name and folders, and the checkpoint to resume from, with the config printed.
    `--resume auto` without --run_name continues the newest unfinished run of this stage (a new
    run's name is the time, so there would never be anything to resume). Nothing is written yet."""
    name = cfg.run_name or (run_name_of(cfg.resume) if cfg.resume not in ("", "auto") else "")
    if not name and cfg.resume == "auto":
        name = unfinished_run(cfg.checkpoints_dir, cfg.stage)
        console.info(f"--resume auto: continuing run '{name}', the newest unfinished stage-{cfg.stage} run in "
                     f"{cfg.checkpoints_dir}/")
    name = name or time.strftime(f"stage{cfg.stage}_%Y%m%d_%H%M%S")
    run_dir, ckpt_dir = os.path.join(cfg.runs_dir, name), os.path.join(cfg.checkpoints_dir, name)
    resume_from = resume_point(cfg.resume, cfg.overwrite, name, ckpt_dir, run_dir)
    barrier()  # rank 0 may have just deleted an old run (--overwrite)
    print_config(redacted(cfg), f"stage-{cfg.stage} config (run {name})")
    return RunFolders(name, run_dir, ckpt_dir, resume_from)


def finished_run(folders: RunFolders, step: int) -> dict:
    """A run resumed after its last step: say so and name its checkpoint; its folders are left
    exactly as they were (summary.json included)."""
    path = os.path.join(folders.run_dir, "summary.json")
    summary = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    checkpoint = folders.resume_from
    console.success(f"run '{folders.name}' finished at step {step} already: nothing to train (raise --max_steps to "
                    f"train it further)\n  checkpoint:    {checkpoint}\n  chat with it:  python eval_llava.py "
                    f"--checkpoint {checkpoint}")
    cleanup_dist()
    return {"run": folders.name, "run_dir": folders.run_dir, **summary, "steps": step, "checkpoint": checkpoint,
            "already_finished": True}


@dataclass
class Run:
    """What the loop reports to, step by step (see the module docstring)."""

    cfg: Any
    folders: RunFolders
    dist: DistInfo
    model: LlavaModel
    tokenizer: Any
    eval_ds: LlavaDataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    tally: SkipTally             # what the loader skipped (rank 0: the run's totals)
    logger: RunLogger | None     # rank 0 only
    alarms: Alarms
    assistant: Assistant         # answers the sample questions at each evaluation (each rank its share)
    summary: dict

    @classmethod
    def start(cls, cfg: Any, folders: RunFolders, dist: DistInfo, state: dict, model: LlavaModel, tokenizer: Any,
              eval_ds: LlavaDataset, read_skips: Skips, total_steps: int, optimizer, scheduler) -> "Run":
        """Write the config, open the logs, arm the alarms and take the held-out loss before training
        (the curve's "before" point; a resumed run has it already)."""
        main = dist.is_main
        if main:
            dump_json(redacted(cfg), os.path.join(folders.run_dir, "config.json"))
        # Rank 0 holds the run's totals: the reading skips once (every rank reads the same records),
        # and on resume the checkpoint's totals, which include them already.
        tally = SkipTally(skipped=Counter(state["skipped"] if folders.resume_from else read_skips if main else {}),
                          examples=dict(read_skips.examples) if main else {}, truncated=state.get("truncated", 0))
        # wandb / SwanLab continue the tracker run whose id the run folder keeps (a resume makes no second one).
        logger = RunLogger(folders.run_dir, parse_trackers(cfg.trackers), purge_after=state["step"], name=folders.name,
                           config=redacted(cfg)) if main else None
        # The loss must have moved once warmup is over; the gap must have left zero by the second eval.
        warmup = int(total_steps * cfg.warmup_ratio)
        alarms = Alarms(logger, flat_after=min(max(100, 2 * warmup), total_steps),
                        gap_after=min(2 * cfg.eval_interval or total_steps, total_steps),
                        eval_loss_before=state["summary"].get("eval_loss_before"), enabled=main)
        run = cls(cfg, folders, dist, model, tokenizer, eval_ds, optimizer, scheduler, total_steps, tally, logger,
                  alarms, Assistant.from_model(model, tokenizer),
                  {"run": folders.name, "run_dir": folders.run_dir, **state["summary"]})
        if cfg.eval_interval and state["step"] == 0:
            before = log_heldout_loss(model, eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers, logger, 0)
            alarms.eval(0, before)
            reshard(model)
            run.summary["eval_loss_before"] = before["eval/loss"]
        return run

    def log_step(self, step: int, losses: list[float], grad_norm: float, lr: float, counts: Any, nonfinite: int,
                 epoch: int, micro: list[Batch], seconds: float, bar: Any) -> None:
        """Every step to metrics.jsonl and TensorBoard, the alarms' checks, the bar; a line every --log_interval."""
        cfg = self.cfg
        self.alarms.step(step, losses, grad_norm)
        self.alarms.data(step, self.tally.unusable, self.tally.used)
        scalars = {"train/loss": losses[-1], "train/ppl": math.exp(min(losses[-1], 50.0)), "train/lr": lr,
                   "train/grad_norm": grad_norm, "train/samples_per_s": counts.samples / seconds,
                   "train/tokens_per_s": counts.seq_tokens / seconds, "train/epoch": epoch,
                   "train/nonfinite_steps": nonfinite,
                   **mfu(self.model, micro, counts.local_tokens, bool(cfg.features_cache), seconds)}
        periodic = cfg.log_interval and step % cfg.log_interval == 0
        if periodic:
            scalars.update(periodic_scalars(self.dist.device, self.tally))
        if self.logger:
            self.logger.log(step, scalars)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", sps=f"{scalars['train/samples_per_s']:.1f}")
        if periodic and self.dist.is_main:
            console.info(log_line(step, self.total_steps, losses[-cfg.log_interval:], scalars, self.tally,
                                  self.alarms.active))

    def evaluate(self, step: int) -> None:
        """Held-out loss and image-ablation gap, the alarms that watch them (rank 0), and sample replies."""
        cfg = self.cfg
        metrics = log_heldout_loss(self.model, self.eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers,
                                   self.logger, step)
        self.alarms.eval(step, metrics)
        log_sample_replies(self.assistant, self.eval_ds, cfg.sample_replies, self.logger, step)
        reshard(self.model)      # FSDP: the gathered weights of evaluation go (parallel.py)
        self.summary.update(eval_summary(metrics))

    def save(self, step: int, epoch: int, offset: int, losses: list[float], nonfinite: int) -> str:
        """A step folder: what trained (checkpoint_io.save_checkpoint) and the state that makes a
        resume exact (utils.checkpoint.save_training). Every rank takes part and gets its path."""
        cfg, run = self.cfg, self.folders.name
        # "manifest": a step saved with one (save_step writes it last) and found without it is incomplete.
        meta = {"step": step, "total_steps": self.total_steps, "run": run, "stage": cfg.stage,
                "init_from": cfg.stage1 or cfg.init, "train_config": redacted(cfg), "manifest": MANIFEST}
        state = {"step": step, "total_steps": self.total_steps, "epoch": epoch, "losses": losses,
                 "nonfinite_steps": nonfinite,
                 "summary": {k: v for k, v in self.summary.items() if k.startswith(("eval", "image_"))}}

        reshard(self.model)                     # the optimizer's parameters are the sharded ones
        weights = checkpoint_weights(self.model)   # whole, on rank 0's CPU (gathered from FSDP's shards)

        def write_weights(folder: str) -> None:
            save_checkpoint(self.model, folder, meta, self.tokenizer, weights)

        rank_state = {"offset": offset, "skipped": dict(self.tally.skipped), "truncated": self.tally.truncated}
        return save_training(self.folders.ckpt_dir, state, write_weights, self.model, self.optimizer, self.scheduler,
                             self.dist, rank_state, cfg.keep_last)

    def stopped(self, step: int, checkpoint: str, signum: int, argv: list[str] | None) -> dict:
        """After a stop request's checkpoint: the command that continues the run."""
        command = resume_command(argv or [], self.folders.name, self.dist.world_size, STAGE_SCRIPTS[self.cfg.stage])
        if self.dist.is_main:
            self.logger.close()      # a tracker run left open would be marked crashed; the resume continues it
            console.warn(f"stopped at step {step}; checkpoint {checkpoint}. Continue with:\n  {command}")
        # Under torchrun: the launcher's failure report (a worker exiting 128 + signal) shows this.
        tell_launcher(f"stopped at step {step} on request; checkpoint {checkpoint}. Continue with: {command}")
        cleanup_dist()
        return {**self.summary, "interrupted": True, "signal": signum, "steps": step, "checkpoint": checkpoint}

    def finish(self, losses: list[float], nonfinite: int, global_batch: int, seconds: float, checkpoint: str) -> dict:
        """summary.json, the alarms, what to do next; every rank leaves together."""
        cfg, summary = self.cfg, self.summary
        summary.update(run_totals(self.tally, self.dist, losses, nonfinite, cfg.log_interval or 10, self.total_steps,
                                  global_batch, seconds))
        summary["checkpoint"] = checkpoint
        if "eval_loss" not in summary:   # every rank: its share of the held-out set
            metrics = heldout_loss(self.model, self.eval_ds, cfg.eval_samples, cfg.batch_size, cfg.num_workers)
            self.alarms.eval(self.total_steps, metrics)
            summary.update(eval_summary(metrics))
        if self.dist.is_main:
            summary["alarms"] = self.alarms.fired
            if self.alarms.too_short:
                summary["alarms_too_short_to_judge"] = self.alarms.too_short
            dump_json(summary, os.path.join(self.folders.run_dir, "summary.json"))
            self.logger.close()
            print_summary(summary, self.alarms, checkpoint, cfg.runs_dir)
        barrier()        # leave together: a rank tearing down while rank 0 still evaluates can abort gloo
        cleanup_dist()
        return summary
