"""clusterlab.cluster.data: the decode cache as the data module, never read into memory whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def _resident_megabytes() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in status.splitlines()
        if line.startswith(("RssAnon", "RssFile"))
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_large_cache_is_never_read_into_memory_whole(tmp_path):
    """50,000 images at 32 px (154 MB): making the data module, its setup and a batch keep them on
    disk. (Lightning deep-copies constructor arguments into the hyper-parameters: the images as
    an argument were read whole into anonymous memory, and kept.)"""
    from clusterlab.cluster.data import CachedFolderData
    from clusterlab.data.sources import ImageSet

    count = 50_000
    array = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=(count, 3, 32, 32))
    images = ImageSet(torch.from_numpy(array), torch.zeros(count, dtype=torch.long), [], [])
    before = _resident_megabytes()
    data = CachedFolderData.of(images, tmp_path, 32, 10, batch_size=256)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    after = _resident_megabytes()
    assert batch["image"].shape == (256, 3, 32, 32)
    assert data.split("train").images.data_ptr() == array.ctypes.data  # the memmap itself
    assert "images" not in data.hparams and "images" not in data.hparams_initial  # nor in hparams.yaml
    assert after["RssAnon"] - before["RssAnon"] < 40, (before, after)  # not the 154 MB
