"""The moving average of an encoder: once per optimizer step, on a schedule."""

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.callbacks import MomentumEncoder
from clusterlab.data.datamodule import ClusterDataModule
from tests.helpers import tiny_scl, trainer


class RecordWeights(pl.Callback):
    def __init__(self):
        self.online, self.momentum = [], []

    def _record(self, pl_module):
        self.online.append({n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()})
        self.momentum.append(
            {n: p.detach().clone() for n, p in pl_module.momentum_encoder["backbone"].named_parameters()}
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(pl_module)


def test_momentum_encoder_moves_once_per_optimizer_step_with_gradient_accumulation():
    record = RecordWeights()
    model = tiny_scl()
    trainer(
        callbacks=[record],
        limit_val_batches=0,
        max_epochs=1,
        limit_train_batches=4,
        accumulate_grad_batches=2,
    ).fit(model, ClusterDataModule("digits", batch_size=32))
    assert model.trainer.global_step == 2
    online, momentum, m = record.online, record.momentum, 0.9
    for name in online[0]:
        assert torch.equal(online[1][name], online[0][name])  # batch 0 accumulated: no step ...
        assert torch.equal(momentum[1][name], momentum[0][name])  # ... and no momentum update
        assert not torch.equal(online[2][name], online[1][name])  # batch 1 stepped
        torch.testing.assert_close(momentum[2][name], m * momentum[1][name] + (1 - m) * online[2][name])
        assert torch.equal(momentum[3][name], momentum[2][name])
        torch.testing.assert_close(momentum[4][name], m * momentum[3][name] + (1 - m) * online[4][name])
    # Keys come from the momentum encoder without gradients.
    assert all(not p.requires_grad and p.grad is None for p in model.momentum_encoder.parameters())


def test_momentum_schedule_rises_from_m_to_its_final_value():
    constant, cosine = MomentumEncoder(0.9), MomentumEncoder(0.9, final_momentum=1.0)
    assert constant.momentum_at(50, 100) == 0.9
    values = [cosine.momentum_at(step, 100) for step in range(101)]
    assert (
        values[0] == pytest.approx(0.9)
        and values[50] == pytest.approx(0.95)
        and values[100] == pytest.approx(1.0)
    )
    assert all(a <= b for a, b in zip(values, values[1:]))
