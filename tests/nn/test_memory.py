"""KeyQueues and SampleTable: fixed shapes, first in first out, lengths from checkpoints."""

import torch

from clusterlab.nn.memory import KeyQueues, SampleTable
from tests.helpers import tiny_scl


def test_memory_enqueue_is_first_in_first_out_per_queue_as_if_one_key_at_a_time():
    torch.manual_seed(0)
    fast, slow = KeyQueues(3, 4, 2), KeyQueues(3, 4, 2)
    slow.load_state_dict(fast.state_dict())
    for step in range(5):
        n = 7 if step != 3 else 13  # step 3 brings one queue more keys than it holds
        keys, queue, index = torch.randn(n, 2), torch.randint(0, 3, (n,)), torch.arange(n) + 100 * step
        fast.enqueue(keys, queue, index)
        for key, j, i in zip(keys, queue, index):  # the reference: one key at a time
            slow.keys[j, slow.pointer[j]], slow.index[j, slow.pointer[j]] = key, i
            slow.pointer[j] = (slow.pointer[j] + 1) % 4
        for name in ("keys", "index", "pointer"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), (step, name)


def test_memory_shapes_are_fixed_at_construction_and_in_the_state_dict():
    model = tiny_scl()  # C = 10: 90 // 9 = 10 keys per cluster; C / 2 = 5: 90 // 4 = 22; instances: 90
    state = model.state_dict()
    assert state["semantic_memory.clustering.keys"].shape == (10, 10, 128)
    assert state["semantic_memory.under_clustering.keys"].shape == (5, 22, 128)
    assert state["semantic_memory.over_clustering.keys"].shape == (1, 90, 128)
    assert all(
        name in state
        for name in ("sample_table.labels", "sample_table.changes", "momentum_encoder.backbone.net.0.weight")
    )


def test_sample_table_takes_its_length_from_a_checkpoint():
    saved = SampleTable(2)
    saved.reset(7, [4, 2], torch.Generator().manual_seed(0))
    loaded = SampleTable(2)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.labels, saved.labels) and len(loaded) == 7
    assert torch.bincount(saved.labels[0]).tolist() == [2, 2, 2, 1]  # a balanced random partition
