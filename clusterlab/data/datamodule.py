"""The one data module: a source's splits in memory, served as (index, image, label) batches.

Images stay uint8 until they reach the training device, where the method makes its views
(clusterlab.data.views). The index of every sample is in the batch: it keys every per-sample
table a method keeps (neighbours, pseudo labels, weights).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from clusterlab import csvsafe
from clusterlab.config_checks import check_data_arguments
from clusterlab.data.sources import (
    DEFAULT_MAX_PIXELS,
    SOURCES,
    ImageFolder,
    ImageSet,
    Source,
    UnreadableImagesError,
)
from clusterlab.errors import ConfigError
from clusterlab.seeding import derive_seed, run_seed

Split = Literal["train", "test", "train+test"]
_NEIGHBOR_STREAM = 1  # keeps the neighbour draws apart from the other draws of an epoch
_CHUNK_STREAM = 3  # the same for the chunked schedule's orders


class IndexedImages(Dataset):
    """In-memory images served a batch at a time: one indexing operation per batch, no per-image
    Python work, so a DataLoader without workers keeps up with the GPU."""

    def __init__(self, images: ImageSet, with_images: bool = True) -> None:
        self.images, self.labels, self.with_images = images.images, images.labels, with_images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if not self.with_images:  # a method that trains on features computed once: no pixels to copy
            return {"index": index, "label": self.labels[index]}
        return {"index": index, "image": self.images[index], "label": self.labels[index]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class LazyImageFolder(Dataset):
    """A folder decoded a batch at a time (in DataLoader workers when num_workers > 0), so that
    predictions stream out while the folder is read. Unreadable images are reported by path and
    left out of their batch."""

    def __init__(self, source: ImageFolder, split: str) -> None:
        self.source = source
        self.paths, self.labels = source.listing(split)

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, indices) -> torch.Tensor:
        arrays = [self.source.decode(self.paths[i]) for i in indices]
        return torch.from_numpy(np.stack([a for a in arrays if a is not None]))

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        arrays = [(i, self.source.decode(self.paths[i])) for i in indices]
        kept = [(i, a) for i, a in arrays if a is not None]
        index = torch.tensor([i for i, _ in kept], dtype=torch.long)
        size, channels = self.source.image_size, self.source.channels
        images = (
            torch.from_numpy(np.stack([a for _, a in kept]))
            if kept
            else torch.empty(0, channels, size, size, dtype=torch.uint8)
        )
        return {"index": index, "image": images, "label": self.labels[index]}


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # __getitems__ already built the batch


class ResumableLoader(DataLoader):
    """The training loader, resumable inside an epoch: Lightning keeps its `state_dict` in every
    checkpoint, and a run resumed from a checkpoint written mid-epoch skips the batches that epoch
    had already trained on, so it continues with the batch it would have trained on next (the
    order is the seeded sampler's, the same again). `batches_done` is counted by the data module
    as batches reach the training step (not as the loader prefetches them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = 0
        self._resume: dict | None = None

    def _epoch(self) -> int:
        return int(getattr(self.batch_sampler, "epoch", getattr(self.sampler, "epoch", 0)))

    def __iter__(self):
        return self._batches(super().__iter__())

    def _batches(self, iterator):
        # A generator: the sampler's epoch is read at the first batch, after Lightning set it.
        resume, self._resume = self._resume, None
        skip = resume["batches_done"] if resume and resume["epoch"] == self._epoch() else 0
        skip = skip if skip < len(self) else 0
        for _ in range(skip):
            next(iterator)
        self.batches_done = skip
        yield from iterator

    def state_dict(self) -> dict:
        return {"epoch": self._epoch(), "batches_done": self.batches_done}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict)


class ChunkBatches(Sampler[list[int]]):
    """The DCCM authors' schedule as batches: the epoch's permutation is cut into chunks of
    `chunk_size` images; each chunk is visited `repeats` times, each time in a new order, a global
    batch at a time, and each batch `batch_repeats` times in a row (its random views drawn anew).
    Each process takes its share of every global batch. Every order is drawn from (seed, epoch,
    chunk, repeat): the same on every process, and again after a resume.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world: int,
        rank: int,
        chunk_size: int,
        repeats: int,
        batch_repeats: int,
    ) -> None:
        self.num_samples, self.batch_size, self.world, self.rank = num_samples, batch_size, world, rank
        self.chunk_size, self.repeats, self.batch_repeats = chunk_size, repeats, batch_repeats
        self.global_batch = batch_size * world
        if not self.global_batch <= chunk_size <= num_samples:
            raise ConfigError(
                f"chunk_size {chunk_size} must lie between the global batch ({self.global_batch}) and the "
                f"{num_samples} training images"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps_per_chunk(self) -> int:
        return self.repeats * (self.chunk_size // self.global_batch) * self.batch_repeats

    def chunk(self, number: int) -> torch.Tensor:
        """The training-set indices of chunk `number` of this epoch (all processes' images)."""
        generator = torch.Generator().manual_seed(derive_seed(self.epoch, _CHUNK_STREAM))
        return torch.randperm(self.num_samples, generator=generator)[number * self.chunk_size :][
            : self.chunk_size
        ]

    def __iter__(self):
        for number in range(self.num_samples // self.chunk_size):
            chunk = self.chunk(number)
            for repeat in range(self.repeats):
                generator = torch.Generator().manual_seed(
                    derive_seed(self.epoch, _CHUNK_STREAM, number, repeat)
                )
                order = chunk[torch.randperm(len(chunk), generator=generator)]
                for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
                    mine = order[start : start + self.global_batch][self.rank :: self.world].tolist()
                    for _ in range(self.batch_repeats):
                        yield mine

    def __len__(self) -> int:
        return self.num_samples // self.chunk_size * self.steps_per_chunk


class ShardSampler(DistributedSampler):
    """Rank r gets samples r, r + W, r + 2W, ...: every sample exactly once, none repeated.

    (torch's DistributedSampler pads the shards to equal length, which would count a few samples
    twice in the evaluation metrics.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ClusterDataModule(pl.LightningDataModule):
    """Serves one data set for clustering. Under DDP it shards every loader itself (train: a
    seeded DistributedSampler or DCCM's ChunkBatches; evaluation: ShardSampler), so the Trainer
    runs with `use_distributed_sampler=False` (the CLI's default).

    Args:
        dataset: which source: digits (embedded, no set-up), fashion_mnist, cifar10, cifar20
            (CIFAR-100 on its 20 super-classes), stl10, image_folder.
        root: where the data set lies on disk (each source has a default or says how to get it).
        train_split: the split trained on: "train+test" for CC, DCCM and SCL; "train" for NNM.
        eval_split: the split evaluated on (default: train_split); "test" for NNM.
        unlabeled: also train on the unlabeled split (STL-10's 100k images): every training batch
            then carries as many unlabeled images ("unlabeled_image"), drawn at random from that
            split, for the method to use where its paper says (CC: the instance head only).
            A method can also hand over per-sample neighbours (`set_neighbors`, NNM): training
            batches then carry one neighbour per sample ("neighbor_index", "neighbor_image").
        batch_size: per-process training batch; the global batch is batch_size x processes.
        eval_batch_size: per-process batch for validation, test and predict.
        num_workers: DataLoader workers (0 is right for in-memory data sets).
        num_clusters: clusters to find; default: the number of classes of the data set.
        image_size, channels: image_folder only: decoded side and channels (1 or 3). When not given
            they are the checkpoint's training input (predict) or 64 px in colour.
        on_error: image_folder only: an unreadable image stops the run ("raise", the default of
            fit / validate / test) or is reported by path and skipped ("skip", the default of predict).
        stream: image_folder, predict only: decode the folder batch by batch instead of loading it
            whole first, so that predictions stream out (with --data.num_workers decoding ahead).
        max_pixels: image_folder only: an image of more pixels (width x height, read from its
            header; a JPEG at the reduced scale it is decoded at) is not decoded but unreadable,
            as `on_error` says (default: clusterlab.data.sources.DEFAULT_MAX_PIXELS, 120,000,000).
    """

    def __init__(
        self,
        dataset: Literal["digits", "fashion_mnist", "cifar10", "cifar20", "stl10", "image_folder"] = "digits",
        root: str | None = None,
        train_split: Split = "train+test",
        eval_split: Split | None = None,
        unlabeled: bool = False,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        num_clusters: int | None = None,
        image_size: int | None = None,
        channels: Literal[1, 3] | None = None,
        on_error: Literal["raise", "skip"] | None = None,
        stream: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        super().__init__()
        check_data_arguments(
            dataset,
            batch_size,
            eval_batch_size,
            num_workers,
            num_clusters,
            image_size,
            channels,
            stream,
            max_pixels,
        )
        self.save_hyperparameters(ignore=["num_clusters"])  # the model logs the resolved value
        self._num_clusters = num_clusters
        if dataset == "image_folder":
            self.source: Source = ImageFolder(
                root,
                image_size or 64,
                channels or 3,
                on_error or "raise",
                max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            )
        else:
            self.source = SOURCES[dataset](root)
        self.eval_split = eval_split or train_split
        self._splits: dict[str, ImageSet] = {}
        self.train_set: ImageSet | None = None
        self.unlabeled_set: ImageSet | None = None
        self.eval_set: ImageSet | None = None
        self.predict_set: LazyImageFolder | None = None
        self.neighbors: torch.Tensor | None = None  # N x K candidate neighbours (set_neighbors)
        self._columns, self._columns_epoch = torch.empty(0, dtype=torch.long), None
        self._train_loader: ResumableLoader | None = None
        self.chunks: dict | None = None  # set_chunks: DCCM's chunked schedule
        self.images_in_training_batches = True  # train_on_indices: False

    @property
    def input_channels(self) -> int:
        """Channels of the images this data module serves: the backbone's input channels (the
        CLI links them, so that `--data.channels` is the one setting)."""
        return self.source.channels

    @property
    def num_clusters(self) -> int:
        if self._num_clusters is not None:
            clusters = self._num_clusters
        elif self.source.num_classes >= 2:
            clusters = self.source.num_classes
        else:
            raise ConfigError(
                f"{self.source.name} at {self.source.root} has no class sub-folders (at least two) to count "
                "clusters "
                f"from: set the number of clusters with --data.num_clusters K"
            )
        if clusters < 2:
            raise ConfigError(f"--data.num_clusters {clusters}: clustering needs at least 2 clusters")
        return clusters

    def _check_clusters_fit(self, images: ImageSet, split: str) -> None:
        if self.num_clusters > len(images):
            raise ConfigError(
                f"{self.num_clusters} clusters for the {len(images)} images of {self.source.name} {split}: "
                "there "
                f"cannot be more clusters than images; lower --data.num_clusters"
            )

    def split(self, name: str) -> ImageSet:
        if name not in self._splits:
            try:
                self._splits[name] = self.source.load(name)
            except UnreadableImagesError as error:
                raise self._listed(error) from None
        return self._splits[name]

    def _listed(self, error: UnreadableImagesError) -> UnreadableImagesError:
        """The same error, with every unreadable image listed in <run dir>/unreadable.csv."""
        folder = Path(self.trainer.default_root_dir) if self.trainer is not None else Path.cwd()
        listing = folder / "unreadable.csv"
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([("path", "reason"), *map(csvsafe.row, error.failures)])
        return UnreadableImagesError(error.failures, error.total, error.root, listing)

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.source, ImageFolder) and self.hparams.on_error is None:
            self.source.on_error = "skip" if stage == "predict" else "raise"
        if stage == "predict" and self.hparams.stream:
            if not isinstance(self.source, ImageFolder):
                raise ConfigError("--data.stream true needs --data.dataset image_folder")
            self.predict_set = LazyImageFolder(self.source, self.eval_split)
            return
        self.eval_set = self.split(self.eval_split)
        if stage != "predict":
            self._check_clusters_fit(self.eval_set, self.eval_split)
        if stage == "fit" and self.train_set is None:
            self.train_set = self.split(self.hparams.train_split)
            self._check_clusters_fit(self.train_set, self.hparams.train_split)
            if self.hparams.unlabeled:
                self.unlabeled_set = self.source.load("unlabeled")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler, drop_last: bool, kind=DataLoader
    ) -> DataLoader:
        return kind(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            collate_fn=_as_batch,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        dataset = IndexedImages(self.train_set, with_images=self.images_in_training_batches)
        if len(dataset) < self.hparams.batch_size * world:
            raise ConfigError(
                f"{self.source.name} {self.hparams.train_split}: {len(dataset)} images do not fill one "
                "global batch of "
                f"{self.hparams.batch_size} x {world} processes; lower --data.batch_size"
            )
        if self.chunks is not None:
            batches = ChunkBatches(len(dataset), self.hparams.batch_size, world, rank, **self.chunks)
            self._train_loader = ResumableLoader(
                dataset,
                batch_sampler=batches,
                num_workers=self.hparams.num_workers,
                collate_fn=_as_batch,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.hparams.num_workers > 0,
            )
            return self._train_loader
        # Seeded by the run seed and the epoch (Lightning calls set_epoch): the same order on
        # every rank, each taking its shard, and the same order again after a resume.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=run_seed())
        self._train_loader = self._loader(
            dataset, self.hparams.batch_size, sampler, drop_last=True, kind=ResumableLoader
        )
        return self._train_loader

    def set_chunks(self, chunk_size: int, repeats: int, batch_repeats: int) -> None:
        """Train in chunks (`ChunkBatches`, DCCM's authors' schedule). The first batch of every
        chunk also carries this process's share of the chunk: "chunk_index" and "chunk_image"."""
        self.chunks = {"chunk_size": chunk_size, "repeats": repeats, "batch_repeats": batch_repeats}

    def train_on_indices(self) -> None:
        """Training batches carry each sample's index and label (and neighbour's index), not its
        image: for a method that trains on features embedded once (TEMI), which would otherwise
        copy every batch's pixels for nothing."""
        self.images_in_training_batches = False

    def set_neighbors(self, neighbors: torch.Tensor) -> None:
        """Give every training sample its candidate neighbours (N x K indices into the training
        split, e.g. NNM's mined top-K). From then on every training batch also carries one of them
        per sample, drawn at random: "neighbor_index" and its uint8 "neighbor_image"."""
        if self.train_set is None:
            raise RuntimeError("set_neighbors() needs the training split: call it after setup('fit')")
        if neighbors.ndim != 2 or len(neighbors) != len(self.train_set):
            raise ConfigError(
                f"neighbour table of shape {tuple(neighbors.shape)}: expected "
                f"{len(self.train_set)} rows (one per training image) x K"
            )
        self.neighbors = neighbors.long().cpu()
        self._columns_epoch = None

    def on_before_batch_transfer(
        self, batch: dict[str, torch.Tensor], dataloader_idx: int
    ) -> dict[str, torch.Tensor]:
        if self.trainer is None or not self.trainer.training:
            return batch
        if self._train_loader is not None:
            batches = self._train_loader.batch_sampler
            position = self._train_loader.batches_done
            if isinstance(batches, ChunkBatches) and position % batches.steps_per_chunk == 0:
                world, rank = self._world()
                share = batches.chunk(position // batches.steps_per_chunk)[rank::world]
                batch["chunk_index"], batch["chunk_image"] = share, self.train_set.images[share]
            self._train_loader.batches_done += 1  # this batch goes to the training step now
        # Drawn from (run seed, epoch, batch): a resumed run draws the same images again. The batch
        # is named by its first sample, which the seeded sampler fixes.
        epoch, first = self.trainer.current_epoch, int(batch["index"][0])
        if self.unlabeled_set is not None:
            generator = torch.Generator().manual_seed(derive_seed(epoch, first))
            pick = torch.randint(len(self.unlabeled_set), (len(batch["index"]),), generator=generator)
            batch["unlabeled_image"] = self.unlabeled_set.images[pick]
        if self.neighbors is not None:
            index = batch["index"]
            column = self._neighbor_columns(epoch)[index]
            batch["neighbor_index"] = self.neighbors[index, column]
            if self.images_in_training_batches:
                batch["neighbor_image"] = self.train_set.images[batch["neighbor_index"]]
        return batch

    def _neighbor_columns(self, epoch: int) -> torch.Tensor:
        """Which of its K neighbours each training sample gets in this epoch: drawn from (run seed,
        epoch) for every sample at once, so a sample's neighbour depends neither on the batch it
        is in nor on the number of processes, and a resumed run draws it again."""
        if self._columns_epoch != epoch:
            generator = torch.Generator().manual_seed(derive_seed(epoch, _NEIGHBOR_STREAM))
            self._columns = torch.randint(
                self.neighbors.shape[1], (len(self.neighbors),), generator=generator
            )
            self._columns_epoch = epoch
        return self._columns

    def _eval_loader(self) -> DataLoader:
        world, rank = self._world()
        dataset = IndexedImages(self.eval_set)
        return self._loader(
            dataset, self.hparams.eval_batch_size, ShardSampler(dataset, world, rank), drop_last=False
        )

    def train_eval_dataloader(self) -> DataLoader:
        """The training set in order, every sample once, each rank its own shard: for passes over the
        whole training set during training (SCL's epoch-end pseudo labels, neighbour mining)."""
        world, rank = self._world()
        dataset = IndexedImages(self.train_set)
        return self._loader(
            dataset, self.hparams.eval_batch_size, ShardSampler(dataset, world, rank), drop_last=False
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            return self._eval_loader()
        world, rank = self._world()
        return self._loader(
            self.predict_set,
            self.hparams.eval_batch_size,
            ShardSampler(self.predict_set, world, rank),
            drop_last=False,
        )

    # -- what reports and figures need of the evaluation set --------------------------------

    @property
    def eval_paths(self) -> list[str] | None:
        """File of every evaluation sample, for folder data sets (None otherwise)."""
        if self.predict_set is not None:
            return [str(p) for p in self.predict_set.paths]
        return self.eval_set.paths if self.eval_set is not None else None

    def eval_images(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images of the given evaluation samples (decoded on demand when streaming)."""
        if self.predict_set is not None:
            return self.predict_set.images(indices.tolist())
        return self.eval_set.images[indices]
