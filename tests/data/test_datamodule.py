"""The data module: unrepeated evaluation shards, neighbours delivered with each batch."""

import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule, ShardSampler


def test_shard_sampler_covers_every_sample_exactly_once():
    data = list(range(11))
    shards = [list(ShardSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(ShardSampler(data, 3, r)) for r in range(3)] == [len(s) for s in shards]


def _training_batch(data, trainer, indices):
    batch = data.train_dataloader().dataset.__getitems__(indices)
    return data.on_before_batch_transfer(batch, 0)


def test_training_batches_carry_one_of_each_samples_neighbours_drawn_per_epoch():
    data = ClusterDataModule("digits", batch_size=32)
    data.setup("fit")
    torch.manual_seed(0)
    table = torch.stack([torch.randperm(len(data.train_set))[:5] for _ in range(len(data.train_set))])
    data.set_neighbors(table)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    data.trainer = trainer
    trainer.training = True
    batch = _training_batch(data, trainer, list(range(40, 72)))
    index, neighbor = batch["index"], batch["neighbor_index"]
    assert all(int(n) in table[int(i)].tolist() for i, n in zip(index, neighbor))
    assert torch.equal(batch["neighbor_image"], data.train_set.images[neighbor])
    # A sample's draw depends on (seed, epoch, sample), not on its batch: a resumed run or another
    # number of processes gives it the same neighbour.
    other = _training_batch(data, trainer, list(range(71, 39, -1)))
    assert torch.equal(other["neighbor_index"].flip(0), neighbor)
    trainer.fit_loop.epoch_progress.current.completed = 1
    next_epoch = _training_batch(data, trainer, list(range(40, 72)))
    assert not torch.equal(next_epoch["neighbor_index"], neighbor)


def test_chunked_batches_visit_each_chunk_several_times_each_batch_twice():
    from clusterlab.data.datamodule import ChunkBatches

    batches = list(ChunkBatches(40, batch_size=5, world=1, rank=0, chunk_size=20, repeats=3, batch_repeats=2))
    assert len(batches) == 2 * 3 * 4 * 2  # chunks x visits x batches per visit x views per batch
    first, second = batches[:24], batches[24:]
    assert all(first[i] == first[i + 1] for i in range(0, 24, 2))  # each batch twice in a row
    chunk = set(sum(first[:8], []))
    assert len(chunk) == 20 and all(set(sum(first[k : k + 8], [])) == chunk for k in (8, 16))  # 3 visits
    assert first[:8] != first[8:16]  # each visit in a new order
    assert chunk.isdisjoint(sum(second, []))  # the next chunk: other images

    shares = [list(ChunkBatches(40, 5, 2, rank, 20, 3, 2)) for rank in (0, 1)]
    together = list(ChunkBatches(40, 10, 1, 0, 20, 3, 2))
    for a, b, whole in zip(*shares, together):  # the two processes' shares make the global batch
        assert sorted(a + b) == sorted(whole)
