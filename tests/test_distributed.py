"""The gather helper: N processes compute the loss and gradients of one with the whole batch."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.ddp_workers import cc_loss, loss_worker


def test_gathered_cc_loss_on_two_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    inputs = [
        torch.randn(8, 16),
        torch.randn(8, 16),
        torch.randn(8, 5).softmax(1),
        torch.randn(8, 5).softmax(1),
    ]
    mp.spawn(loss_worker, args=(2, str(tmp_path / "store"), inputs, str(tmp_path)), nprocs=2, join=True)

    whole = [x.clone().requires_grad_(True) for x in inputs]
    loss = cc_loss(*whole)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(ranks):
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for local_grad, full in zip(result["grads"], whole):
            # Each process's rows get every process's gradient (summed); DDP's averaging over
            # the 2 processes then gives the single-process gradient.
            torch.testing.assert_close(local_grad / 2, full.grad[r * 4 : (r + 1) * 4], rtol=1e-5, atol=1e-7)
