"""The folder's decode cache as the data module of every phase."""

from __future__ import annotations

from pathlib import Path

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import ImageSet


class CachedFolderData(ClusterDataModule):
    """`--data.dataset image_folder` on a folder that is already decoded: every split is the
    memmap-backed ImageSet of clusterlab.cluster.cache, so batches are read from the cache, not
    decoded again, and the folder is never loaded into memory whole. Everything else (batches,
    seeded order, evaluation shards) is the data module's own.

    Made with `CachedFolderData.of(images, ...)`: the images are not a constructor argument,
    because Lightning deep-copies every constructor argument into the hyper-parameters (and keeps
    the copy as the initial ones), which read the whole memmap into memory: 307 MB for 100,000
    images at 32 px, once per phase."""

    def __init__(self, root: str, image_size: int, num_clusters: int, batch_size: int) -> None:
        super().__init__(
            "image_folder",
            root=str(root),
            image_size=image_size,
            channels=3,
            num_clusters=num_clusters,
            batch_size=batch_size,
            eval_batch_size=512,
        )
        self.images: ImageSet | None = None

    @classmethod
    def of(
        cls, images: ImageSet, root: Path, image_size: int, num_clusters: int, batch_size: int
    ) -> CachedFolderData:
        data = cls(str(root), image_size, num_clusters, batch_size)
        data.images = images
        return data

    def split(self, name: str) -> ImageSet:
        if self.images is None:
            raise RuntimeError("CachedFolderData is made with CachedFolderData.of(images, ...)")
        return self.images
