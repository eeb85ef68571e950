"""TEMI: frozen features, the teacher and the prior it keeps, its switches, 2 processes equal 1."""

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.views import Views
from clusterlab.methods import TEMI, SimCLR
from tests.ddp_workers import RecordFirstStep
from tests.helpers import assert_first_steps_equal, fit_digits, save_pretext, tiny_cnn


def temi(pretext, **kwargs) -> TEMI:
    torch.manual_seed(0)
    settings = dict(num_heads=2, num_neighbors=5, hidden_dim=32, bottleneck_dim=16)
    return TEMI(10, tiny_cnn("group"), Views(), pretext_checkpoint=pretext, **{**settings, **kwargs})


@pytest.fixture
def group_pretext(tmp_path):
    torch.manual_seed(0)
    return save_pretext(SimCLR(10, tiny_cnn("group"), Views()), tmp_path / "pretext.ckpt")


def test_only_the_heads_learn_the_teacher_follows_and_the_prior_moves(group_pretext):
    pl.seed_everything(0)
    model = temi(group_pretext)
    teacher_before = copy.deepcopy(model.momentum_encoder["cluster_head"].state_dict())
    fit_digits(model, epochs=1, limit_train_batches=3, limit_val_batches=0)
    pretext = torch.load(group_pretext, weights_only=False)["state_dict"]
    for name, value in model.backbone.state_dict().items():  # frozen: the pretext's weights as loaded
        torch.testing.assert_close(value, pretext[f"backbone.{name}"], rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(value, teacher_before[name])
        for name, value in model.momentum_encoder["cluster_head"].state_dict().items()
    )
    assert torch.allclose(model.prior.sum(1), torch.ones(2)) and not torch.allclose(
        model.prior, torch.full((2, 10), 0.1)
    )
    assert "neighbor_agreement" in model.diagnostics


def first_loss(pretext, **switches) -> float:
    pl.seed_everything(0)
    trainer = fit_digits(temi(pretext, **switches), epochs=1, limit_train_batches=1, limit_val_batches=0)
    return float(trainer.callback_metrics["train/temi"])


def test_the_instance_weights_and_the_teacher_ensemble_are_switches(group_pretext):
    default = first_loss(group_pretext)
    assert first_loss(group_pretext, use_instance_weights=False) != pytest.approx(default, rel=1e-4)
    assert first_loss(group_pretext, ensemble_weights=False) != pytest.approx(default, rel=1e-4)
    assert first_loss(group_pretext, beta=1.0) != pytest.approx(default, rel=1e-4)


def test_temi_step_on_two_processes_equals_one_process_with_the_whole_batch(group_pretext, tmp_path):
    pl.seed_everything(0)
    # One feature cache: the single process embeds and writes it, the two processes read it (rank 0
    # reads, every rank receives the table).
    model = temi(
        group_pretext,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        feature_cache=str(tmp_path / "features"),
    )
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()
    for devices, batch_size, out in ((1, 64, single_out), (2, 32, ddp_out)):
        fit_digits(
            copy.deepcopy(model),
            devices=devices,
            batch_size=batch_size,
            callbacks=[RecordFirstStep(str(out))],
            limit_train_batches=1,
            limit_val_batches=0,
        )
    assert_first_steps_equal(single_out, ddp_out)


def test_momenta_of_one_hold_the_teacher_and_the_prior_and_temperatures_change_the_loss(group_pretext):
    pl.seed_everything(0)
    model = temi(group_pretext, teacher_momentum=1.0, prior_momentum=1.0)
    teacher_before = copy.deepcopy(model.momentum_encoder["cluster_head"].state_dict())
    fit_digits(model, epochs=1, limit_train_batches=2, limit_val_batches=0)
    for name, value in model.momentum_encoder["cluster_head"].state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert torch.equal(model.prior, torch.full((2, 10), 0.1))
    default = first_loss(group_pretext)
    assert first_loss(group_pretext, student_temperature=0.5) != pytest.approx(default, rel=1e-4)
    assert first_loss(group_pretext, teacher_temperature=0.5) != pytest.approx(default, rel=1e-4)


def test_renumbering_moves_the_students_the_teachers_and_the_prior_together():
    torch.manual_seed(0)
    model = temi(None).eval()
    model.prior.copy_(torch.rand(2, 10).softmax(-1))
    features = torch.randn(5, model.backbone.out_dim)
    before = (
        model.cluster_head(features),
        model.momentum_encoder["cluster_head"](features),
        model.prior.clone(),
    )
    order = torch.randperm(10)
    model.permute_clusters_(order)
    after = (model.cluster_head(features), model.momentum_encoder["cluster_head"](features), model.prior)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old[..., order])
