"""The gather helpers: N processes compute the loss and gradients of one with the whole batch; what only
rank 0 reads reaches rank 0 alone. The processes are forked (tests/helpers.py's `trainer` says why)."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.ddp_workers import cc_loss, loss_worker, rank0_gather_worker


def test_gathered_cc_loss_on_two_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    inputs = [
        torch.randn(8, 16),
        torch.randn(8, 16),
        torch.randn(8, 5).softmax(1),
        torch.randn(8, 5).softmax(1),
    ]
    args = (2, str(tmp_path / "store"), inputs, str(tmp_path))
    mp.start_processes(loss_worker, args=args, nprocs=2, join=True, start_method="fork")

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


def test_gather_to_rank0_on_two_processes_reaches_rank0_alone(tmp_path):
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(rank0_gather_worker, args=args, nprocs=2, join=True, start_method="fork")
    zero, one = (torch.load(tmp_path / f"gather_rank{r}.pt") for r in range(2))
    rows = torch.tensor([0.0, 2, 4, 1, 3])[:, None].expand(-1, 3) * 10  # rank order, uneven shards
    assert torch.equal(zero["rows"], rows) and one["rows"] is None
    assert torch.equal(zero["none_from_one"], rows[:3])  # a rank with no rows adds none
    # SampleOutputs: dataset order; rank0_only outputs on rank 0 only, the others everywhere
    assert torch.equal(zero["split"]["features"], torch.arange(5.0)[:, None].expand(-1, 3) * 10)
    assert "features" not in one["split"]
    for split in (zero["split"], one["split"]):
        assert split["index"].tolist() == [0, 1, 2, 3, 4] and split["cluster"].tolist() == [0, 1, 0, 1, 0]
    assert zero["whole"]["index"].tolist() == [0, 1, 2, 3, 4] and one["whole"] == {}
    assert zero["report"] == one["report"] == {"acc": 0.5}
