"""Several processes on PyTorch's own engines: DistributedDataParallel, or FSDP2 (`fully_shard`).
No gradient is synchronised by hand anywhere in this project.

    --train_strategy ddp                  every process holds the whole model; DDP averages the
                                          gradients of what trains, overlapped with backward
    --train_strategy fsdp-shard-grad-op   FSDP2, reshard_after_forward=False (like ZeRO-2): gradients
                                          and optimizer state sharded, parameters gathered from
                                          forward to backward
    --train_strategy fsdp-full-shard      FSDP2, reshard_after_forward=True (like ZeRO-3): parameters,
                                          gradients and optimizer state sharded
    --train_strategy hsdp                 FSDP2 on a 2-D mesh: sharded within a node, replicated
                                          across nodes (torchrun --nnodes N)

Defaults with several processes: ddp when only the projector or LoRA adapters train (their
frozen bases are cheaper to replicate than to all-gather at every step), fsdp-full-shard when
the LLM trains in full; the align preset sets Prismatic's fsdp-shard-grad-op. Plain `python`
wraps nothing: one process runs exactly the single-process loop. Under torchrun the strategy
applies even to one process (a smoke test of the multi-GPU path on one GPU).

FSDP units: one per LLM decoder layer; the root (the whole LlavaModel) holds the input
embeddings, the tied LM head, the final norm and the projector. The frozen vision tower is
replicated, not sharded: it runs under no_grad, so replicating it costs no communication at
all, and a rank whose batch is text-only (no tower forward) can never leave the others waiting
in an all-gather (LLaVA #1746). On CUDA parameters compute in bf16 with fp32 master weights and
fp32 gradient reduction; on a CPU everything stays fp32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from model import LlavaModel
from tuning import Tuning
from utils.dist import DistInfo

STRATEGIES = {
    "ddp": "DistributedDataParallel: the whole model on every process, gradients of what trains averaged",
    "fsdp-shard-grad-op": "FSDP2, parameters kept gathered forward to backward (ZeRO-2-like); grads+optimizer sharded",
    "fsdp-full-shard": "FSDP2, parameters resharded after forward (ZeRO-3-like); params+grads+optimizer sharded",
    "hsdp": "FSDP2 on a 2-D mesh: sharded within a node (--hsdp_shard_size), replicated across nodes",
}
SHARDED = ("fsdp-shard-grad-op", "fsdp-full-shard", "hsdp")


def default_strategy(tuning: Tuning) -> str:
    """What several processes use when --train_strategy is not given (see the module docstring;
    scripts/benchmark.py measures the stage-1 choice)."""
    return "fsdp-full-shard" if tuning.llm == "full" else "ddp"


@dataclass
class Parallel:
    """How the loop runs the model over several processes. `engine` is what a training step
    calls (a DDP wrapper, or the model itself); evaluation and saving use the model."""

    strategy: str               # "" in one process: nothing wrapped
    engine: nn.Module
    world_size: int

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; each rank's loss is already divided by the
        token count of the whole global step, so multiplying by the world size makes the average
        the gradient of the global mean (what a sum over ranks would give)."""
        return float(self.world_size) if self.strategy else 1.0

    def describe(self) -> str:
        if not self.strategy:
            return "one process: nothing wrapped"
        return (f"{self.strategy} over {self.world_size} process{'es' if self.world_size > 1 else ''} "
                f"({STRATEGIES[self.strategy]})")

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: gradients are reduced only on the last
        micro-batch of a step (accumulated locally before it)."""
        if not self.strategy or last:
            if self.sharded:
                self.engine.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.sharded:
            self.engine.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.engine.no_sync()


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over every trained parameter (sharded ones included: DTensor gradients
    give the norm over all shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def parallelize(model: LlavaModel, strategy: str, dist: DistInfo, offload: bool = False,
                hsdp_shard_size: int = 0, shard_vision: bool = False) -> Parallel:
    """Wrap `model` for `strategy` when a process group runs (torchrun), else leave it alone.
    Build the model (gradient checkpointing, LoRA, trainable set) before, the optimizer after:
    FSDP2 replaces parameters with sharded DTensors. `shard_vision` makes the frozen tower an FSDP
    unit of its own instead of a replica (scripts/benchmark.py measures both; training keeps the
    replica, which no text-only batch can desynchronise)."""
    if not dist.launched:
        return Parallel("", model, 1)
    if strategy == "ddp":
        return Parallel(strategy, ddp(model, dist), dist.world_size)
    mesh = device_mesh(strategy, dist, hsdp_shard_size)
    fully_shard_model(model, mesh, dist.device, reshard_after_forward=strategy != "fsdp-shard-grad-op",
                      offload=offload, shard_vision=shard_vision)
    return Parallel(strategy, model, dist.world_size)


def ddp(model: LlavaModel, dist: DistInfo) -> nn.Module:
    """DistributedDataParallel over what trains. Frozen parameters and buffers are the same files
    on every rank: they are not broadcast at start (a whole frozen LLM, or a 4-bit one, would be)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    # gradient_as_bucket_view: the gradients live in DDP's buckets instead of beside them (one copy less).
    # No broadcast_buffers (deprecated in torch 2.13, a FutureWarning per rank): every buffer is ignored
    # above, so DDP has none to broadcast, at start or in forward.
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def device_mesh(strategy: str, dist: DistInfo, hsdp_shard_size: int = 0):
    """1-D over every process (FSDP), or 2-D (replicate, shard) for HSDP: shard within groups of
    `hsdp_shard_size` processes (default: the processes of one node), replicate across them."""
    from torch.distributed.device_mesh import init_device_mesh

    if strategy != "hsdp":
        return init_device_mesh(dist.device.type, (dist.world_size,))
    shard = hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    if dist.world_size % shard:
        raise SystemExit(f"--train_strategy hsdp: {dist.world_size} processes do not split into shard groups of "
                         f"{shard}; set --hsdp_shard_size to a divisor of the process count")
    return init_device_mesh(dist.device.type, (dist.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def fully_shard_model(model: LlavaModel, mesh: Any, device: torch.device, reshard_after_forward: bool,
                      offload: bool = False, shard_vision: bool = False) -> None:
    """FSDP2 units, bottom up: each decoder layer, then the root (see the module docstring).
    Build the model on the CPU: fully_shard moves one unit at a time to `device` and keeps only
    its shard there, so no GPU ever holds the whole model (with `offload` the shards go back to
    the CPU, and each unit visits the GPU only for its forward and backward)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    common: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if model.autocast_dtype == torch.bfloat16 else MixedPrecisionPolicy(),
        # Pinned host memory copies faster to a GPU; a CPU-only machine has none to pin.
        offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy())
    for layer in model.llm.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **common)
    ignored = None
    if model.vision is not None:
        if shard_vision:
            fully_shard(model.vision, reshard_after_forward=reshard_after_forward, **common)
        else:  # a replica: FSDP neither shards nor moves it
            model.vision.to(device)
            ignored = set(model.vision.parameters())
    fully_shard(model, ignored_params=ignored, **common)
    model.sharded = True
    # FSDP2 picks its root at the first forward. Generation calls the LLM directly, not the
    # root: run one forward now (one token, nothing supervised) so that it never goes first.
    with torch.no_grad():
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        model(one, torch.ones_like(one), torch.full_like(one, -100))
    reshard(model)


def reshard(model: nn.Module) -> None:
    """Every FSDP unit back to its shards. A forward without backward (evaluation, the forward
    above) leaves the units that keep parameters gathered (the root; every layer under
    fsdp-shard-grad-op) holding the gathered ones as the module's parameters: the optimizer and
    the resume state must see the sharded ones. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
