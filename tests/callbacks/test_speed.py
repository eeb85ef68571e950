"""The Speed callback (clusterlab.callbacks.speed): the layout, cuDNN, TF32 and compile settings a run
trains with, set once before the model moves to its device, and recorded in `applied`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clusterlab.callbacks.speed import Speed
from clusterlab.cli import ClusterLabCLI
from clusterlab.data.views import GeometricViews, Views
from clusterlab.methods import CC, DCCM
from clusterlab.nn import SmallCNN
from tests.helpers import REPO, TINY_BACKBONE_ARGS, tiny_cnn

TINY = [
    *TINY_BACKBONE_ARGS,
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=0",
    "--kmeans_baseline=false",
    "--figures.enabled=false",
]


def conv_weights(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]  # C = 1 is both layouts


def fit(tmp_path, *args) -> tuple[Speed, CC]:
    config = str(Path(REPO, "experiments", "cc_digits.yaml"))
    cli = ClusterLabCLI(args=["--config", config, "--runs_dir", str(tmp_path), *TINY, *args], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return next(c for c in cli.trainer.callbacks if isinstance(c, Speed)), cli.model


@pytest.mark.parametrize(
    "args, channels_last",
    [
        ([], False),  # float32 on the CPU: the layout the recorded results ran in
        (["--trainer.precision=bf16-mixed"], True),  # measured faster: benchmarks/results/cc-authors-cpu.md
        (["--speed.channels_last=true"], True),
        (["--trainer.precision=bf16-mixed", "--speed.channels_last=false"], False),
    ],
)
def test_channels_last_follows_the_setting_and_the_precision_on_the_cpu(tmp_path, args, channels_last):
    speed, model = fit(tmp_path, *args)
    assert speed.applied == {
        "device": "cpu",
        "channels_last": channels_last,
        "cudnn_benchmark": None,  # GPU-only settings are left alone on the CPU
        "matmul_precision": None,
        "compile": False,
    }
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    weights = conv_weights(model)
    assert weights and all(w.is_contiguous(memory_format=memory_format) for w in weights)


def test_on_a_gpu_device_it_turns_on_autotuning_tf32_and_channels_last():
    """`apply` as the callback calls it for a CUDA root device (the settings are torch's globals and
    the layout a module property: all set without a GPU)."""
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    model = CC(10, SmallCNN(1, (8, 16), (False, True)), Views())
    try:
        applied = Speed().apply(model, torch.device("cuda"), "32-true")
        assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.set_float32_matmul_precision(before[1])
    assert applied["channels_last"] and applied["matmul_precision"] == "high" and applied["cudnn_benchmark"]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))


def test_compile_keeps_the_backbones_parameter_names_so_checkpoints_load_either_way():
    model = CC(10, SmallCNN(1, (8, 16), (False, True)), Views())
    names = list(model.state_dict())
    Speed(compile=True).apply(model, torch.device("cpu"), "32-true")
    assert list(model.state_dict()) == names
    assert isinstance(model.backbone, SmallCNN)  # compiled in place, not wrapped


def test_compile_reaches_every_backbone_a_method_trains():
    """DCCM's restarts (separate_backbones) each have their own backbone: each is compiled."""
    model = DCCM(
        10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, num_heads=3, separate_backbones=True
    )
    Speed(compile=True).apply(model, torch.device("cpu"), "32-true")
    assert len({id(b) for b in model.backbones()}) == 3
    assert all(b._compiled_call_impl is not None for b in model.backbones())


@pytest.mark.slow
def test_a_compiled_backbone_trains_and_gives_the_same_outputs(tmp_path):
    """torch.compile on the CPU (inductor, a C++ compiler): ~30 s, so in make test-slow."""
    speed, model = fit(tmp_path, "--speed.compile=true")
    assert speed.applied["compile"]
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    compiled = model.backbone(x)  # through the compiled call
    eager = model.backbone.forward(x)  # forward itself is not compiled
    assert model.backbone._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
