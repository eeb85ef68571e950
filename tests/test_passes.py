"""The one pass over a data set: every sample once, outputs in dataset order, the module left as it was."""

import torch
from torch import nn

from clusterlab.passes import SampleOutputs, pass_over


def test_outputs_come_back_in_dataset_order_whatever_the_batch_order():
    outputs = SampleOutputs()
    outputs.add(torch.tensor([3, 0]), value=torch.tensor([30.0, 0.0]), pair=torch.tensor([[3, 3], [0, 0]]))
    outputs.add(torch.tensor([2, 1]), value=torch.tensor([20.0, 10.0]), pair=torch.tensor([[2, 2], [1, 1]]))
    gathered = outputs.gather()
    assert gathered["index"].tolist() == [0, 1, 2, 3]
    assert gathered["value"].tolist() == [0.0, 10.0, 20.0, 30.0]
    assert gathered["pair"][:, 0].tolist() == [0, 1, 2, 3]
    assert not outputs  # gathered once: empty again


def test_pass_over_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.9)).train()
    seen = []

    def step(batch):
        seen.append((module.training, torch.is_grad_enabled()))
        return {"y": module(batch["x"])}

    batches = [
        {"index": torch.tensor([1, 0]), "x": torch.randn(2, 2)},
        {"index": torch.tensor([2]), "x": torch.randn(1, 2)},
    ]
    out = pass_over(module, batches, step)
    assert seen == [(False, False), (False, False)] and module.training
    assert out["index"].tolist() == [0, 1, 2] and out["y"].shape == (3, 2) and not out["y"].requires_grad


def test_pass_over_runs_every_batch_in_the_trainers_mixed_precision():
    """An AMP plugin's forward_context can be entered once: each batch gets its own (a bf16 run's
    evaluation over more than one batch raised AttributeError before)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = nn.Linear(4, 2)
    batches = [{"index": torch.tensor([i]), "x": torch.randn(1, 4)} for i in range(3)]
    out = pass_over(
        module, batches, lambda b: {"y": module(b["x"])}, precision=MixedPrecision("bf16-mixed", "cpu")
    )
    assert out["y"].dtype == torch.bfloat16 and out["index"].tolist() == [0, 1, 2]
