"""Callbacks and configs the CLI tests load by class path."""

from __future__ import annotations

import copy
import functools
import math
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import SmallImageViews
from clusterlab.methods import SCL
from clusterlab.nn import SmallCNN
from tests.launch import clusterlab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method: str = "CC", *, model: dict | None = None, trainer: dict | None = None, **top) -> str:
    """The one tiny test config, as YAML text: `method` (a name in clusterlab.methods) on digits, an
    8/16-channel CNN, batches of 64, 4 epochs of 3 batches with an evaluation after each, a CSV log,
    no k-means baseline, no figures (`figures=FIGURES` draws them), and the method's own views and
    optimiser (SCL also its cosine schedule, NNM the pretext pattern of TINY_SIMCLR's runs).
    `model` (init_args), `trainer` and the top-level keyword arguments (`data`, `figures`,
    `seed_everything`, ...) are merged over it; a value of None removes the key."""
    config = {
        "seed_everything": 3,
        "trainer": {
            "max_epochs": 4,
            "limit_train_batches": 3,
            "check_val_every_n_epoch": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "logger": [{"class_path": "clusterlab.loggers.CSVLogger"}],
        },
        "model": {
            "class_path": f"clusterlab.methods.{method}",
            "init_args": {
                "backbone": {
                    "class_path": "clusterlab.nn.SmallCNN",
                    "init_args": {"in_channels": 1, "widths": [8, 16], "downsample": [False, True]},
                },
                **copy.deepcopy(_TINY_METHOD_ARGS[method]),
            },
        },
        "data": {"dataset": "digits", "batch_size": 64},
        "kmeans_baseline": False,
        "figures": {"enabled": False, "embedding_points": 300},
    }
    _merge(config["model"]["init_args"], model or {})
    _merge(config["trainer"], trainer or {})
    _merge(config, top)
    return yaml.safe_dump(config, sort_keys=False)


# The figures (a t-SNE and three PNGs) take 2.6 of a tiny run's 6 s after its imports: off in the
# tiny configs, on (figures=FIGURES) in the tests that read them or kill a run while it draws them.
FIGURES = {"enabled": True, "embedding_points": 300}


def _adam(lr: float) -> dict:
    return {"class_path": "torch.optim.Adam", "init_args": {"lr": lr}}


_TINY_METHOD_ARGS = {  # what each method needs beyond the shared backbone
    "CC": {"views": {"class_path": "clusterlab.data.views.SmallImageViews"}, "optimizer": _adam(0.001)},
    "SimCLR": {"views": {"class_path": "clusterlab.data.views.SmallImageViews"}},
    "NNM": {
        "pretext_checkpoint": "runs/tiny_simclr/*-seed{seed}/checkpoints/last.ckpt",
        "views": {
            "class_path": "clusterlab.data.views.StrongViews",
            "init_args": {
                "flip": False,
                "ops": {"identity": None, "rotate": [0, 20], "contrast": None},
                "cutout_fill": 0.0,
            },
        },
        "optimizer": _adam(0.001),
    },
    "TEMI": {
        "pretext_checkpoint": "runs/tiny_simclr/*-seed{seed}/checkpoints/last.ckpt",
        "views": {"class_path": "clusterlab.data.views.Views"},
        "num_heads": 2,
        "num_neighbors": 5,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
    },
    "SCL": {
        "views": {"class_path": "clusterlab.data.views.SmallImageViews"},
        "memory_size": 90,
        "optimizer": {
            "class_path": "torch.optim.SGD",
            "init_args": {"lr": 0.03, "momentum": 0.9, "weight_decay": 0.0005},
        },
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "init_args": {"T_max": 4},
        },
    },
    "DCCM": {
        "views": {"class_path": "clusterlab.data.views.GeometricViews", "init_args": {"flip": False}},
        "discriminator_dim": 16,
        "optimizer": {"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.001}},
    },
}


def _merge(base: dict, changes: dict) -> None:
    """`changes` into `base`, dicts merged key by key; None removes a key; a class of another
    `class_path` replaces the one there (its init_args are its own)."""
    for key, value in changes.items():
        old = base.get(key)
        if value is None:
            base.pop(key, None)
        elif (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("class_path") in (None, old.get("class_path"))
        ):
            _merge(old, value)
        else:
            base[key] = value


# The same CNN as command-line overrides, for a test that shrinks a config of experiments/.
TINY_BACKBONE_ARGS = [
    "--model.init_args.backbone.init_args.widths=[8, 16]",
    "--model.init_args.backbone.init_args.downsample=[false, true]",
]

# The tiny configs the CLI tests write (tiny_config: one builder). SimCLR then NNM on digits: the
# NNM config names the SimCLR run's checkpoint.
TINY_CC = tiny_config("CC")
TINY_CC_FIGURES = tiny_config("CC", figures=FIGURES)  # tests that read figures, or kill a run drawing them
TINY_SIMCLR = tiny_config(
    "SimCLR",
    trainer={"max_epochs": 1, "limit_train_batches": 2, "check_val_every_n_epoch": None, "logger": False},
)
TINY_NNM = tiny_config("NNM", trainer={"logger": False})
TINY_TEMI = tiny_config("TEMI")
TINY_SCL = tiny_config("SCL")
TINY_DCCM = tiny_config("DCCM")


class KillAt(pl.Callback):
    """Signals its own process at a given batch: SIGKILL (default), a crash that flushes nothing;
    SIGINT, a Ctrl-C, sent as a terminal sends it, to the whole process group."""

    def __init__(self, epoch: int, batch: int, signal_name: str = "SIGKILL") -> None:
        self.epoch, self.batch = epoch, batch
        self.signal = signal.Signals[signal_name]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            if self.signal == signal.SIGKILL:
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os.killpg(os.getpgid(0), self.signal)


def tiny_cnn(norm: str = "batch") -> SmallCNN:
    """An 8/16-channel CNN for 8x8 grey digits; norm "group" for the distributed tests on CPU."""
    return SmallCNN(1, widths=(8, 16), downsample=(False, True), norm=norm)


def tiny_scl(**kwargs) -> SCL:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.03, momentum=0.9)
    args = {"memory_size": 90, "views": SmallImageViews(), "optimizer": optimizer}
    return SCL(10, SmallCNN(1, (8, 16), (False, True)), **{**args, **kwargs})


def trainer(devices: int = 1, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer for methods built in Python; devices > 1: real gloo processes, forked
    (ddp_fork): a spawned one imports torch and Lightning again, 14 of a 15-s test. The launchers a
    user types (torchrun, srun, Lightning's own) start fresh interpreters in tests/cli/test_launch.py."""
    callbacks = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks)
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # as the CLI: the data module shards its loaders itself
        callbacks=callbacks,
        **kwargs,
    )


def save_pretext(model, path) -> str:
    """A SimCLR model saved as a clusterlab checkpoint, without training it (what NNM loads)."""
    import torch

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def state(run_dir):
    return torch.load(next(run_dir.glob("*/checkpoints/last.ckpt")), weights_only=False)


def assert_first_steps_equal(single_dir, ddp_dir, world: int = 2) -> tuple[dict, list[dict]]:
    """The first step recorded (tests.ddp_workers.RecordFirstStep) on `world` processes against one
    process with the whole batch: the ranks' batches together are its batch, and every rank has its
    loss and gradients. Returns the single process's record and the ranks'."""
    single = torch.load(os.path.join(single_dir, "rank0.pt"))
    ranks = [torch.load(os.path.join(ddp_dir, f"rank{r}.pt")) for r in range(world)]
    assert sorted(torch.cat([r["batch"] for r in ranks]).tolist()) == sorted(single["batch"].tolist())
    for result in ranks:
        assert float(result["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return single, ranks


def kill_and_resume(folder, config: str) -> tuple[dict, dict, dict]:
    """Fits `config` (4 epochs of 3 batches) whole as run "whole"; then as run "killed", SIGKILLed in
    epoch 2 at batch 1 and continued with `--ckpt_path last`. Returns the last checkpoints of the
    whole run, of the killed run as it was at the kill, and of the resumed run; asserts that both
    ended at the same place and that every tensor of the state dict is equal."""
    kill = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.epoch=2",
        "--trainer.callbacks.batch=1",
    ]
    whole = clusterlab("fit", "--config", config, "--name", "whole", cwd=folder)
    assert whole.returncode == 0, whole.tail()
    killed = clusterlab("fit", "--config", config, "--name", "killed", *kill, cwd=folder)
    assert killed.returncode == -signal.SIGKILL, killed.tail()  # mid-epoch 2
    at_kill = state(folder / "runs" / "killed")
    assert at_kill["epoch"] == 1  # the last checkpoint is epoch 1's
    resumed = clusterlab("fit", "--config", config, "--name", "killed", "--ckpt_path", "last", cwd=folder)
    assert resumed.returncode == 0, resumed.tail()

    expected, got = state(folder / "runs" / "whole"), state(folder / "runs" / "killed")
    assert got["epoch"] == expected["epoch"] == 3 and got["global_step"] == expected["global_step"] == 12
    for name, tensor in expected["state_dict"].items():
        same = torch.equal(got["state_dict"][name], tensor)
        assert same or torch.allclose(got["state_dict"][name], tensor, rtol=0, atol=0, equal_nan=True), name
    return expected, at_kill, got


def similarity(backbone, plain, images):
    """Cosine similarities of the images' backbone features, a row's own set to -inf."""
    backbone.eval()
    with torch.no_grad():
        f = F.normalize(backbone(plain(images)), dim=1)
    return (f @ f.T).fill_diagonal_(-math.inf)


def assert_top_k(neighbors, similarity):
    """`neighbors` are each row's k most similar other rows (up to ties in the similarity)."""
    k = neighbors.shape[1]
    assert not (neighbors == torch.arange(len(neighbors))[:, None]).any()
    torch.testing.assert_close(
        similarity.gather(1, neighbors), similarity.topk(k, dim=1).values, rtol=0, atol=1e-5
    )


def fit_digits(model, devices=1, epochs=1, batch_size=64, callbacks=(), **kwargs) -> pl.Trainer:
    """Fit `model` on digits for a few batches of each epoch (2 unless limit_train_batches says)."""
    run = trainer(
        devices,
        callbacks,
        max_epochs=epochs,
        limit_train_batches=kwargs.pop("limit_train_batches", 2),
        **kwargs,
    )
    run.fit(model, ClusterDataModule("digits", batch_size=batch_size))
    return run


def user_error(capsys, *args) -> str:
    """Runs `clusterlab *args` in this process, which must stop with a user error: exit code 1 and
    one line on stderr (returned)."""
    from clusterlab.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("clusterlab")]
    assert done.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]
