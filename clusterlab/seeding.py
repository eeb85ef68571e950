"""Randomness that a resumed run reproduces exactly.

Every random draw of a training step (views, sampled neighbours or negatives) comes from the
global torch generator, which the base method reseeds at the start of each step from
(run seed, epoch, batch, rank). The draws of a step thus depend on where the step is, not on how
the run got there: an interrupted and resumed run continues with the same draws.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def run_seed() -> int:
    """The seed of this run (`--seed_everything`; Lightning exports it as PL_GLOBAL_SEED)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from the run seed and `keys`."""
    return int(np.random.SeedSequence([run_seed(), *map(int, keys)]).generate_state(2, np.uint64)[0] >> 1)


def reseed(*keys: int) -> None:
    torch.manual_seed(derive_seed(*keys))
