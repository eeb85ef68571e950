"""benchmarks/throughput.py (and precision.py, which measures through it): the Trainer it times
runs at the precision the config asks for, so a "bf16" column is measured in bfloat16."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_BACKBONE_ARGS

sys.path.insert(0, str(Path(REPO, "benchmarks")))

import throughput  # noqa: E402

TINY = [*TINY_BACKBONE_ARGS, "--data.batch_size", "64"]


@pytest.mark.parametrize(
    "precision, plugin, dtype",
    [("bf16-mixed", "MixedPrecision", torch.bfloat16), ("32-true", "Precision", torch.float32)],
)
def test_the_timed_steps_run_at_the_configs_precision(precision, plugin, dtype):
    timer, trainer = throughput.timed_fit(
        str(Path(REPO, "experiments", "cc_digits.yaml")),
        [*TINY, "--trainer.precision", precision],
        "cpu",
        steps=2,
        warmup=1,
    )
    assert type(trainer.precision_plugin).__name__ == plugin and trainer.precision == precision
    assert timer.dtypes == {dtype}  # the backbone's output in every training step
    assert timer.images == 2 * 64 and timer.seconds > 0
