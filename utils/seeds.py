"""Every seed a run uses, in one place and named. What a run draws depends only on --seed, the
epoch and the sample's index: never on how many processes or DataLoader workers there are, nor
on what drew random numbers before (a resumed run restores the global RNG mid-epoch)."""

from __future__ import annotations

import random

import numpy as np
import torch

# Primes that mix (seed, epoch[, index]) into one integer: nearby seeds and epochs never collide
# in the range a run uses.
EPOCH_MIX = 7919
SAMPLE_MIX = 1_000_003
EPOCH_STRIDE = 10_007


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (every device) from one seed: the projector's initialisation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """An epoch's shuffle order (dataset.EpochSampler), and the base seed of that epoch's
    DataLoader workers (LoRA dropout must not shift when a resumed run restores the global RNG)."""
    return seed * EPOCH_MIX + epoch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One sample's random choices in one epoch (the caption instruction drawn for it)."""
    return seed * SAMPLE_MIX + epoch * EPOCH_STRIDE + index
