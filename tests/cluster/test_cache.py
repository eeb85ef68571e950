"""clusterlab.cluster.cache: the folder decoded once into a memmap that batches are read from."""

from __future__ import annotations

import numpy as np
import torch

from tests.cluster.folders import write_photo_folder


def test_the_decode_cache_is_a_memmap_that_batches_are_read_from(tmp_path):
    from clusterlab.cluster import cache
    from clusterlab.cluster.data import CachedFolderData

    write_photo_folder(tmp_path / "photos", per_kind=3)
    found = cache.scan(tmp_path / "photos")
    decoded = cache.decode(found, tmp_path / "cache", 16)
    images = decoded.images
    assert images.images.shape == (12, 3, 16, 16) and len(decoded.skipped) == 3
    # The tensor is a view of the memory-mapped file: nothing was read into memory to build it.
    assert isinstance(decoded.memmap, np.memmap) and images.images.data_ptr() == decoded.memmap.ctypes.data
    on_disk = np.fromfile(tmp_path / "cache" / "images.u8", dtype=np.uint8).reshape(12, 3, 16, 16)
    assert torch.equal(images.images, torch.from_numpy(on_disk))
    data = CachedFolderData.of(images, found.root, 16, 2, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["image"], images.images[batch["index"]])
    again = cache.decode(found, tmp_path / "cache2", 16, reuse=tmp_path / "cache")
    assert again.reused and torch.equal(again.images.images, images.images)
    (found.paths[0]).write_bytes(found.paths[0].read_bytes())  # touched: another modification time
    assert not cache.decode(found, tmp_path / "cache3", 16, reuse=tmp_path / "cache").reused
