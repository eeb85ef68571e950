"""Counting the operations that make the accelerator wait for the host (host syncs).

A CUDA kernel is queued and the host moves on; an operation whose result the host must read (a
number, or the size of an output that depends on the data) waits until every kernel queued before
it has finished. One such wait per training step leaves the GPU idle while Python prepares the next
kernels. `HostSyncCounter` records these operations as they are dispatched, on any device: on the
CPU, where nothing waits, it counts the ones that would wait on a GPU, so a test can hold a training
step to zero without one.

    with HostSyncCounter() as syncs:
        model.training_step(batch, 0)
    print(syncs.summary())  # op, count and where: the first frame in clusterlab or kornia

It sees every op that goes through the dispatcher, clusterlab's own and those of the libraries it
calls (kornia, torch.nn.functional), but not what a kernel does inside (`masked_select` is counted
once, not its inner `nonzero`). Not seen on the CPU: copies between devices (`.cpu()` of a CPU
tensor dispatches nothing); on a GPU they are counted as `copy to host` / `copy from host`.
Not counted on the CPU: the reads that are host tensors or device asserts on a GPU (torch.optim's
step counters, kornia's `_check_async`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clusterlab.loggers import logs_this_step

aten = torch.ops.aten


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _arg(args, kwargs, position: int, name: str, default):
    return args[position] if len(args) > position else kwargs.get(name, default)


def _any_mask(indices) -> bool:
    return any(_is_mask(i) for i in (indices or ()) if i is not None)


# op overload -> when it syncs (None: always). Only ops whose CUDA kernel itself waits for the host.
_SYNCING: dict = {
    # A number copied to the host: .item(), bool() / int() / float() of a tensor, `if tensor:`,
    # tensor.tolist() element by element. item and is_nonzero decompose to it; kept for other modes.
    aten._local_scalar_dense.default: None,
    aten.item.default: None,
    aten.is_nonzero.default: None,
    # Outputs whose size depends on the data: the host reads the count before allocating.
    aten.nonzero.default: None,  # (nonzero_static has a fixed size: no wait)
    aten.masked_select.default: None,
    aten._unique2.default: None,
    aten._unique.default: None,
    aten.unique_dim.default: None,
    aten.unique_consecutive.default: None,
    # Indexing with a boolean mask is nonzero(mask) first (x[mask], x[mask] = v).
    aten.index.Tensor: lambda args, kwargs: _any_mask(args[1]),
    aten.index_put.default: lambda args, kwargs: _any_mask(args[1]),
    aten.index_put_.default: lambda args, kwargs: _any_mask(args[1]),
    aten._index_put_impl_.default: lambda args, kwargs: _any_mask(args[1]),
    # bincount sizes its output by max(input) + 1 (minlength only sets a floor): reads the max.
    aten.bincount.default: None,
    # histc with min == max (the default 0, 0) reads the data's min and max.
    aten.histc.default: lambda a, k: _arg(a, k, 2, "min", 0) == _arg(a, k, 3, "max", 0),
    # repeat_interleave with a tensor of repeats sums them to size the output, unless given
    # output_size. (With an int it does not.)
    aten.repeat_interleave.Tensor: lambda args, kwargs: kwargs.get("output_size") is None,
    aten.repeat_interleave.self_Tensor: lambda args, kwargs: (
        kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    ),
    # A bool returned to Python.
    aten.equal.default: None,
    aten.allclose.default: None,
    # multinomial without replacement (or one sample) checks the probabilities on the host
    # (`(max < inf & min >= 0).item()`, `(sum == 0).item()`) before sampling.
    aten.multinomial.default: lambda args, kwargs: (
        not _arg(args, kwargs, 2, "replacement", False) or _arg(args, kwargs, 1, "num_samples", 1) == 1
    ),
    # masked_fill with a 0-dim tensor value on the device reads the value (value.item()); a
    # Python number (masked_fill.Scalar) or a CPU scalar does not.
    aten.masked_fill.Tensor: lambda args, kwargs: args[2].device == args[0].device,
    aten.masked_fill_.Tensor: lambda args, kwargs: args[2].device == args[0].device,
}


def _copy_direction(func, args, kwargs) -> str | None:
    """A blocking copy between the host and an accelerator (non_blocking=False waits for the
    stream): seen on a GPU only, where the devices differ."""
    if func is aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device")
        blocking = not kwargs.get("non_blocking", False)
    elif func in (aten.copy_.default, aten.copy.default):
        source, target = args[1].device, args[0].device
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return None
    if target is None or not blocking or torch.device(source).type == torch.device(target).type:
        return None
    return "copy to host" if torch.device(target).type == "cpu" else "copy from host"


_TORCH = (os.path.dirname(torch.__file__) + os.sep).replace("\\", "/")


def _location() -> str:
    """The innermost caller outside torch itself: the line of clusterlab or kornia (or Lightning,
    for what its loop does) that asked for the op, so that a developer can find it."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not path.startswith(_TORCH) and not path.endswith("clusterlab/syncs.py"):
            return f"{_short(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _called_from(part: str, function: str | None = None) -> bool:
    """Whether the innermost Python frame that asked for the op (past this module and torch's
    private wrappers, torch/_dynamo, torch/_compile.py) is in a path containing `part` (and in
    the function named `function`, if given)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not (path.endswith("clusterlab/syncs.py") or "/torch/_" in path):
            return part in path and function in (None, frame.f_code.co_name)
        frame = frame.f_back
    return False


def _short(path: str) -> str:
    for root in ("clusterlab/", "kornia/", "tests/"):
        at = path.rfind("/" + root)
        if at >= 0:
            return path[at + 1 :]
    return path


class HostSyncCounter(TorchDispatchMode):
    """Records every dispatched op that makes the device wait for the host, with where it was
    called from. Enter and exit it around the code to count (a `with` block, or `__enter__` /
    `__exit__` from hooks); it can be entered again to add to the same counts, and `clear()`s.

    Args:
        cpu_run: the code runs on the CPU and stands for a GPU run (the default): ops on CPU tensors
            count as they would on the GPU. False on a GPU: ops whose tensors are all on the host
            wait for nothing and are not counted.
    """

    def __init__(self, cpu_run: bool = True) -> None:
        super().__init__()
        self.cpu_run = cpu_run
        self.counts: Counter[tuple[str, str]] = Counter()  # (op, location) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self._sync_name(func, args, kwargs)
        if name is not None and not self._on_host(func, args):
            self.counts[name, _location()] += 1
        return func(*args, **kwargs)

    def _on_host(self, func, args) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not self.cpu_run:
            return all(t.device.type == "cpu" for t in tensors)
        # torch.optim keeps each parameter's step counter on the host (unless capturable or fused)
        # and reads it every step (Adam's bias correction): a host tensor on a GPU too.
        if func is not aten._local_scalar_dense.default:
            return False
        # kornia (0.9.2 on) checks its arguments with `_check_async`: `torch._assert_async` on a GPU
        # (no wait; a false condition raises at the next synchronisation), a host read on the CPU.
        return _called_from("torch/optim/") or _called_from("kornia/core/check.py", "_check_async")

    @staticmethod
    def _sync_name(func, args, kwargs) -> str | None:
        rule: Callable | None | bool = _SYNCING.get(func, False)
        if rule is not False and (rule is None or rule(args, kwargs)):
            masked = " (bool mask)" if func.overloadpacket in _MASKED else ""
            return str(func.overloadpacket.__name__) + masked
        return _copy_direction(func, args, kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_op(self) -> Counter[str]:
        ops: Counter[str] = Counter()
        for (op, _), n in self.counts.items():
            ops[op] += n
        return ops

    def clear(self) -> None:
        self.counts.clear()

    def summary(self, per: int = 1) -> str:
        """One line per (op, location), most frequent first; counts divided by `per` (steps)."""
        if not self.counts:
            return "no host syncs"
        lines = [f"{self.total / per:g} host syncs" + (f" per step ({per} steps)" if per > 1 else "")]
        for (op, where), n in self.counts.most_common():
            lines.append(f"  {n / per:6g}  {op:32s} {where}")
        return "\n".join(lines)


_MASKED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class CountTrainingSyncs(pl.Callback):
    """Counts the host syncs of steady training steps: from the method's `on_train_batch_start`
    to the end of its `on_train_batch_end` (the views, forward, backward, optimizer step and every
    callback's end-of-batch work), through `HostSyncCounter`.

    Skipped: the first `warmup` steps of the fit (one-off set-up), each epoch's last batch (epoch-level
    work such as NNM's global-neighbour pass runs there) and the steps on which Lightning logs
    (`log_every_n_steps`: the values logged on step are read then, by design). Turn the progress bar
    off: it reads the logged loss every step.

    `counter` holds the counts of all counted steps, `steps` how many there were.
    """

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.counter = HostSyncCounter()  # cpu_run set in setup, from the module's device
        self.steps = 0
        self._active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.counter.cpu_run = pl_module.device.type == "cpu"
        # The method's own hooks run after every callback's: wrapping them spans all of a step.
        start, end = pl_module.on_train_batch_start, pl_module.on_train_batch_end

        def on_train_batch_start(batch, batch_idx: int):
            if self._counts(trainer, batch_idx):
                self.counter.__enter__()
                self._active = True
                self.steps += 1
            return start(batch, batch_idx)

        def on_train_batch_end(outputs, batch, batch_idx: int) -> None:
            try:
                end(outputs, batch, batch_idx)
            finally:
                if self._active:
                    self._active = False
                    self.counter.__exit__(None, None, None)

        pl_module.on_train_batch_start = on_train_batch_start
        pl_module.on_train_batch_end = on_train_batch_end

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._active:  # a step that raised
            self._active = False
            self.counter.__exit__(None, None, None)
        for hook in ("on_train_batch_start", "on_train_batch_end"):
            pl_module.__dict__.pop(hook, None)

    def _counts(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return (
            trainer.global_step >= self.warmup
            and batch_idx + 1 < trainer.num_training_batches
            and not logs_this_step(trainer)
        )

    def summary(self) -> str:
        return self.counter.summary(per=max(self.steps, 1))
