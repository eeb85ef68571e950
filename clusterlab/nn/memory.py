"""State a method carries from step to step and epoch to epoch, as buffers of the method.

Being buffers, they are in every checkpoint (a fresh one included), move with the model to its
device, and are rebuilt by `test` and `predict` from the checkpoint alone:

- `KeyQueues`: Q first-in-first-out queues of L keys each, shapes fixed at construction: the one
  queue module (SCL's semantic memory: one queue per cluster; MoCo's memory bank: one queue).
- `SampleTable`: per-sample labels and label-change counts, keyed by the sample's index in the
  training set. Its length is the training set's, known only once the data is set up: the method
  sizes it in `setup("fit")`, and loading a checkpoint sizes it from the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterlab.errors import ConfigError


class KeyQueues(nn.Module):
    """`num_queues` FIFO queues of `queue_size` L2-normalised keys.

    Buffers: `keys` (Q x L x D), `index` (Q x L: the training-set index of the sample each key came
    from; -1 for the initial keys) and `pointer` (Q: the slot each queue writes next, its oldest).
    Like MoCo's queue, the memory starts full of random unit vectors, so that every contrastive set
    has its full size from the first step.
    """

    def __init__(self, num_queues: int, queue_size: int, dim: int) -> None:
        super().__init__()
        if num_queues < 1 or queue_size < 1:
            raise ConfigError(
                f"a memory needs at least one queue of at least one key, not {num_queues} x {queue_size}"
            )
        self.register_buffer("keys", F.normalize(torch.randn(num_queues, queue_size, dim), dim=-1))
        self.register_buffer("index", torch.full((num_queues, queue_size), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros(num_queues, dtype=torch.long))

    @torch.no_grad()
    def reset_(self) -> None:
        """Empty again: random unit keys, no owners, every queue writing its first slot next."""
        self.keys.copy_(F.normalize(torch.randn(self.keys.shape, device=self.keys.device), dim=-1))
        self.index.fill_(-1)
        self.pointer.zero_()

    @property
    def num_queues(self) -> int:
        return self.keys.shape[0]

    @property
    def queue_size(self) -> int:
        return self.keys.shape[1]

    def flat_keys(self) -> Tensor:
        """All keys as one (Q * L) x D matrix, queue after queue: a copy, so that a loss computed
        from it keeps its gradient when the queues move on in the same step."""
        return self.keys.flatten(0, 1).clone()

    def queue_of_slot(self) -> Tensor:
        """The queue each row of `flat_keys()` belongs to: (Q * L)."""
        return torch.arange(self.num_queues, device=self.keys.device).repeat_interleave(self.queue_size)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, queue: Tensor, index: Tensor) -> None:
        """Key i enters queue `queue[i]`, replacing that queue's oldest key; keys enter in order.

        When one call brings a queue more keys than it holds, the newest `queue_size` stay: the
        same result as enqueueing the keys one at a time.
        """
        n, size = len(keys), self.queue_size
        if n == 0:
            return
        # Fixed shapes throughout, so that the host never waits for the device (no bincount, no
        # boolean mask): counts and starts of the queues come from binary searches in the sorted
        # queue numbers, and a key that an unusually full call pushes out again at once is written
        # with the value of the key that ends in its slot (the latest of its queue with the same
        # slot), so that every write to a slot carries the same value, in whatever order they land.
        queue = queue.to(self.pointer.device)
        order = torch.argsort(queue, stable=True)  # grouped by queue, in arrival order within each
        grouped = queue[order]
        queues = torch.arange(self.num_queues, device=queue.device)
        starts = torch.searchsorted(grouped, queues)
        counts = torch.searchsorted(grouped, queues, right=True) - starts
        rank = torch.arange(n, device=queue.device) - starts[grouped]  # arrival rank within its queue
        latest = rank + size * torch.div(counts[grouped] - 1 - rank, size, rounding_mode="floor")
        source = order[starts[grouped] + latest]
        slot = (self.pointer[grouped] + rank) % size
        self.keys[grouped, slot] = keys[source].to(self.keys.dtype)
        self.index[grouped, slot] = index.to(self.index.device)[source]
        self.pointer.copy_((self.pointer + counts) % size)


class SampleTable(nn.Module):
    """Per-sample pseudo labels of T clustering tasks, with how often each one changed.

    Buffers: `labels` (T x N), `changes` (T x N, s_i of SCL's Eq. 6), and `epoch`, the epoch whose
    labels these are (so that a refresh is never applied twice, whatever the resume point).
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.register_buffer("labels", torch.zeros(num_tasks, 0, dtype=torch.long))
        self.register_buffer("changes", torch.zeros(num_tasks, 0, dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self._sizes: dict[tuple[int, int], Tensor] = {}  # cluster sizes per (task, C): see cluster_sizes

    def __len__(self) -> int:
        return self.labels.shape[1]

    def reset(self, num_samples: int, num_clusters: list[int], generator: torch.Generator) -> None:
        """A random balanced partition per task (sizes differ by at most one), no changes yet."""
        device = self.labels.device
        labels = (
            torch.stack([torch.randperm(num_samples, generator=generator) % c for c in num_clusters])
            if num_clusters
            else torch.zeros(0, num_samples, dtype=torch.long)
        )
        self.labels = labels.to(device)
        self.changes = torch.zeros_like(self.labels)
        self.epoch.zero_()
        self._sizes.clear()

    def cluster_sizes(self, task: int, num_clusters: int) -> Tensor:
        """How many samples each of the task's clusters holds (at least `num_clusters` entries).
        Counted once per change of the labels, not per step: bincount makes the host wait for the
        device (it sizes its output by the largest label)."""
        sizes = self._sizes.get((task, num_clusters))
        if sizes is None or sizes.device != self.labels.device:
            sizes = self._sizes[task, num_clusters] = self.labels[task].bincount(minlength=num_clusters)
        return sizes

    def update(self, task: int, labels: Tensor) -> None:
        """New labels of one task: s_i^e = s_i^{e-1} + 1[y_i^e != y_i^{e-1}] (Eq. 6)."""
        labels = labels.to(self.labels.device)
        self.changes[task] += labels != self.labels[task]
        self.labels[task] = labels
        self._sizes = {key: value for key, value in self._sizes.items() if key[0] != task}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The table has the training set's length; a model built for `test` or `predict` has not
        # seen that set, so it takes the length from the checkpoint.
        self._sizes.clear()  # counts of the labels being replaced
        for name in ("labels", "changes"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        self._sizes.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
