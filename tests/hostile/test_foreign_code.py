"""No code runs from a file that a user or a config points at.

A pickle names functions that unpickling calls: a planted checkpoint, cache or data file could run
anything. Each test plants a payload at one place clusterlab reads (checkpoints of every stage, NNM's
pretext checkpoint and neighbour cache, a CIFAR batch, the folder command's decode cache), checks
first that the payload is live (a plain unpickling runs it), then that clusterlab refuses the file
with one line naming it and that the payload never ran.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CC, TINY_NNM, tiny_cnn, tiny_config, user_error


class Payload:
    """Unpickling this calls os.mkdir(marker): the marker folder appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a clusterlab checkpoint and carries the payload."""
    torch.save(
        {
            "state_dict": {},
            "clusterlab": {"method": "CC", "num_clusters": 10, "input_shape": [1, 8, 8]},
            "payload": Payload(marker),
        },
        path,
    )
    return path


def assert_live(path: Path, marker: Path) -> None:
    """The planted file does run its payload when unpickled without restrictions (so the tests
    below would see it run), and the marker is removed again."""
    torch.load(path, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_a_planted_checkpoint_is_refused_at_every_stage(in_tmp, capsys, stage):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    marker = in_tmp / "payload-ran"
    planted = plant_checkpoint(in_tmp / "planted.ckpt", marker)
    assert_live(planted, marker)
    line = user_error(capsys, stage, "--config", "tiny.yaml", "--ckpt_path", str(planted))
    assert f"cannot read checkpoint {planted}" in line
    assert "it names posix.mkdir, code that loading would run" in line
    assert not marker.exists()


def test_lightning_reads_checkpoints_weights_only(tmp_path):
    """The checkpoint plugin of every run loads weights-only, whatever Lightning or torch default to."""
    from clusterlab.checkpointing import AtomicCheckpointIO
    from clusterlab.errors import CheckpointError

    marker = tmp_path / "payload-ran"
    planted = plant_checkpoint(tmp_path / "planted.ckpt", marker)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {planted}"):
        AtomicCheckpointIO().load_checkpoint(planted)
    assert not marker.exists()
    # A real checkpoint still loads through it.
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.ckpt"
    )
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ok.ckpt")["epoch"] == 3


def test_a_planted_pretext_checkpoint_is_refused(in_tmp, capsys):
    (in_tmp / "nnm.yaml").write_text(TINY_NNM)
    marker = in_tmp / "payload-ran"
    planted = plant_checkpoint(in_tmp / "pretext.ckpt", marker)
    assert_live(planted, marker)
    line = user_error(
        capsys, "fit", "--config", "nnm.yaml", "--model.init_args.pretext_checkpoint", str(planted)
    )
    assert f"NNM's pretext checkpoint: cannot read checkpoint {planted}" in line
    assert not marker.exists()


def test_a_planted_neighbour_cache_is_refused_not_overwritten(tmp_path):
    from clusterlab.errors import CheckpointError
    from clusterlab.pretext import checkpoint_digest, mine_neighbors

    pretext = tmp_path / "pretext.ckpt"
    torch.save({"state_dict": {}}, pretext)
    marker = tmp_path / "payload-ran"
    cache = tmp_path / f"neighbors-{checkpoint_digest(pretext)[:16]}-n50-k5-cosine.pt"
    torch.save(Payload(marker), cache)
    assert_live(cache, marker)
    planted = cache.read_bytes()
    with pytest.raises(CheckpointError, match=f"the neighbour cache {cache} cannot be read"):
        mine_neighbors(pretext, 5, tiny_cnn(), loader=None, features=None, num_images=50)
    assert not marker.exists()
    assert cache.read_bytes() == planted  # not clusterlab's to replace: the user deletes it

    # A cache of the wrong shape (another data set) is refused the same way.
    torch.save(torch.zeros(50, 3, dtype=torch.long), cache)
    with pytest.raises(CheckpointError, match="is not a 50 x 5 table"):
        mine_neighbors(pretext, 5, tiny_cnn(), loader=None, features=None, num_images=50)


def test_a_planted_cifar_batch_is_refused(in_tmp, capsys):
    from tests import formats

    root = in_tmp / "data"
    formats.write_cifar10(root)
    marker = in_tmp / "payload-ran"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": Payload(marker), b"labels": [0]}, f)
    with open(batch, "rb") as f:
        pickle.load(f)
    assert marker.is_dir()
    marker.rmdir()
    (in_tmp / "tiny.yaml").write_text(tiny_config(data={"dataset": "cifar10"}))
    line = user_error(capsys, "fit", "--config", "tiny.yaml", "--data.root", str(root))
    assert f"cannot read CIFAR batch {batch}: it names posix.mkdir" in line
    assert not marker.exists()


def test_real_cifar_batches_still_load(tmp_path):
    """The restricted unpickler reads what the real files hold: dicts of numpy arrays, lists, bytes."""
    from clusterlab.data.sources import CIFAR10, CIFAR20
    from tests import formats

    images, labels = formats.write_cifar10(tmp_path / "c10")
    loaded = CIFAR10(tmp_path / "c10").load("train")
    assert torch.equal(loaded.images, torch.from_numpy(images)) and loaded.labels.tolist() == labels.tolist()
    coarse = formats.write_cifar100(tmp_path / "c100")
    assert CIFAR20(tmp_path / "c100").load("train").labels.tolist() == coarse.tolist()


def test_a_planted_decode_cache_runs_nothing(tmp_path):
    """The folder command's cache is JSON and raw bytes: a pickle planted in a previous output's
    cache is not a cache of this folder, so the folder is decoded again and nothing runs."""
    from clusterlab.cluster import cache
    from tests import formats

    formats.write_png_folder(tmp_path / "photos", per_class=2, size=(12, 10))
    marker = tmp_path / "payload-ran"
    previous = tmp_path / "previous" / "cache"
    previous.mkdir(parents=True)
    (previous / "index.json").write_bytes(pickle.dumps(Payload(marker)))
    (previous / "images.u8").write_bytes(pickle.dumps(Payload(marker)))
    decoded = cache.decode(cache.scan(tmp_path / "photos"), tmp_path / "new", 8, reuse=previous)
    assert not decoded.reused and len(decoded.images) == 4 and not marker.exists()
