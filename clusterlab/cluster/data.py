"""The folder's decode cache as the data module of every phase."""

from __future__ import annotations

from pathlib import Path

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import ImageSet


class CachedFolderData(ClusterDataModule):
    """`--data.dataset image_folder` on a folder that is already decoded: every split is the
    memmap-backed ImageSet of clusterlab.cluster.cache, so batches are read from the cache, not
    decoded again, and the folder is never loaded into memory whole. Everything else (batches,
    seeded order, evaluation shards) is the data module's own."""

    def __init__(
        self, images: ImageSet, root: Path, image_size: int, num_clusters: int, batch_size: int
    ) -> None:
        super().__init__(
            "image_folder",
            root=str(root),
            image_size=image_size,
            channels=3,
            num_clusters=num_clusters,
            batch_size=batch_size,
            eval_batch_size=512,
        )
        # Lightning records the constructor's arguments in every checkpoint: the images are the
        # cache's, not a setting, and the folder is a path string (checkpoints load weights_only).
        self.hparams.pop("images", None)
        self.hparams["root"] = str(root)
        self.images = images

    def split(self, name: str) -> ImageSet:
        return self.images
