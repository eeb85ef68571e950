"""Restarts (`restarts` R > 1): R runs one after another in one fit, each from state drawn afresh,
the one with the lowest label-free criterion kept; through SCL, the method that offers them."""

import json

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.errors import ConfigError
from clusterlab.methods.scl import CLUSTERING, SCL
from tests.helpers import TINY_SCL, kill_and_resume, tiny_cnn, tiny_scl, trainer


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)


class RecordRestarts(pl.Callback):
    """The state at each epoch's first batch, and at each epoch's end before the method's own
    epoch-end hook (which begins the next restart)."""

    def __init__(self):
        self.starts, self.ends = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            optimizer = trainer.optimizers[0]
            self.starts[trainer.current_epoch] = {
                "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "lr": optimizer.param_groups[0]["lr"],
                "optimizer_state": len(optimizer.state),
            }

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit_with_restarts(model, epochs=4, callbacks=()):
    run = trainer(callbacks=list(callbacks), max_epochs=epochs, limit_train_batches=2, limit_val_batches=0)
    run.fit(model, ClusterDataModule("digits", batch_size=32))
    return run


def test_each_restart_starts_afresh_and_the_lowest_criterion_is_kept():
    record = RecordRestarts()
    model = tiny_scl(restarts=2, lr_scheduler=cosine)
    fit_with_restarts(model, epochs=4, callbacks=[record])  # restarts of 2 epochs: 0-1 and 2-3

    first, second = record.starts[0], record.starts[2]
    # Restart 1 begins as restart 0 began: an empty optimizer state, the schedule at its start ...
    assert second["optimizer_state"] == first["optimizer_state"] == 0
    assert second["lr"] == first["lr"] == 0.03
    assert record.starts[1]["lr"] < 0.03  # (the schedule did move within restart 0)
    # ... new random weights, the momentum encoder their copy, empty memories, a new balanced
    # partition with no changes counted, and no refresh before its first epoch.
    state = second["state"]
    for name in ("backbone.net.0.weight", "projections.clustering.weight", "cluster_head.heads.0.weight"):
        assert not torch.equal(state[name], first["state"][name]), name
        assert not torch.equal(state[name], record.ends[1][name]), name
    assert torch.equal(state["momentum_encoder.backbone.net.0.weight"], state["backbone.net.0.weight"])
    assert (state["semantic_memory.clustering.index"] == -1).all()
    assert (state["sample_table.changes"] == 0).all()
    labels = state["sample_table.labels"][0]
    assert labels.bincount(minlength=10).tolist() == torch.arange(1797).remainder(10).bincount().tolist()
    assert not torch.equal(labels, first["state"]["sample_table.labels"][0])

    # Both restarts scored; the run ends with the state of the lower one (bookkeeping aside).
    scores = model.restart_scores.tolist()
    assert all(0 < s < 10 for s in scores)
    kept = model.selected_restart
    assert kept == min(range(2), key=scores.__getitem__)
    final, ended = model.state_dict(), record.ends[2 * kept + 1]
    for name, tensor in ended.items():
        # (the epoch's head loss is computed in the method's hook, after the record)
        if not name.startswith(("restart_scores", "criterion_", "epochs_trained", "head_loss")):
            assert torch.equal(final[name], tensor), name
    assert int(model.epochs_trained) == 4


class FirstRestartBest(SCL):
    """SCL whose criterion is a term that ranks restart 0 first (`order` 1; -1: the last first):
    the kept state is then not the last restart's."""

    restart_criterion = "rank"
    order = 1.0

    def objective(self, terms, head_losses=None):
        restart = self.current_epoch // self.restart_length()
        return super().objective({**terms, "rank": torch.tensor(self.order * restart)})


class LastRestartBest(FirstRestartBest):
    order = -1.0


def ranked_restarts(method: type[FirstRestartBest]) -> FirstRestartBest:
    """Three restarts of a tiny SCL ranked by `method`'s criterion."""
    torch.manual_seed(0)
    return method(
        10,
        tiny_cnn(),
        views=tiny_scl().views,
        memory_size=90,
        restarts=3,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9),
    )


def test_an_earlier_restart_is_kept_when_its_criterion_is_lower():
    record = RecordRestarts()
    model = ranked_restarts(FirstRestartBest)
    fit_with_restarts(model, epochs=3, callbacks=[record])
    assert model.restart_scores.tolist() == [0.0, 1.0, 2.0]
    assert model.selected_restart == 0
    assert torch.equal(model.backbone.net[0].weight, record.ends[0]["backbone.net.0.weight"])
    assert not torch.equal(model.backbone.net[0].weight, record.ends[2]["backbone.net.0.weight"])


class StopAfterEpoch(pl.Callback):
    """Stops the fit at the end of `epoch`, as trainer.max_time does (the callback's hook runs
    before the method's)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch >= self.epoch


def test_a_restart_cut_short_by_a_stop_is_not_compared_with_finished_ones():
    """Restarts of 2 epochs (0-1, 2-3, 4-5); stopped after epoch 4, the first of restart 2, whose
    criterion (-2) is the lowest: restart 1 (-1), the best finished one, is the run's model."""
    record = RecordRestarts()
    model = ranked_restarts(LastRestartBest)
    fit_with_restarts(model, epochs=6, callbacks=[record, StopAfterEpoch(4)])
    assert int(model.epochs_trained) == 5
    assert model.restart_scores[:2].tolist() == [0.0, -1.0] and torch.isnan(model.restart_scores[2])
    assert model.selected_restart == 1 and model.restart_cut_short == 2
    assert torch.equal(model.backbone.net[0].weight, record.ends[3]["backbone.net.0.weight"])
    assert not torch.equal(model.backbone.net[0].weight, record.ends[4]["backbone.net.0.weight"])


def test_restarts_are_refused_where_they_cannot_run():
    with pytest.raises(ConfigError, match="restarts must be at least 1"):
        tiny_scl(restarts=0)
    with pytest.raises(ConfigError, match="final_momentum"):
        tiny_scl(restarts=2, final_momentum=0.99)
    with pytest.raises(ConfigError, match="concept loss"):
        tiny_scl(restarts=2, use_concept_loss=False)
    with pytest.raises(ConfigError, match="a multiple of it"):
        fit_with_restarts(tiny_scl(restarts=2), epochs=3)


def test_a_smoke_run_of_a_config_with_restarts_runs_as_one_restart():
    # `--trainer.fast_dev_run` sets max_epochs to 1 whatever the config's: one batch, one restart.
    model = tiny_scl(restarts=3)
    run = trainer(fast_dev_run=2)
    run.fit(model, ClusterDataModule("digits", batch_size=32))
    assert run.global_step == 2
    assert model.selected_restart == 0 and torch.isnan(model.restart_scores[1:]).all()


class NoCriterion(SCL):
    restart_criterion = None


def test_a_method_without_a_criterion_refuses_restarts():
    with pytest.raises(ConfigError, match="NoCriterion has no restart criterion"):
        NoCriterion(10, tiny_cnn(), views=tiny_scl().views, restarts=2)


@pytest.mark.timeout(600)
def test_a_run_killed_in_its_second_restart_resumes_to_the_same_end(tmp_path):
    """4 epochs as 2 restarts of 2; killed in epoch 2 (restart 1), continued from epoch 1's
    checkpoint, which holds restart 1's start and restart 0's kept state."""
    config = TINY_SCL.replace("memory_size: 90", "memory_size: 90\n    restarts: 2").replace(
        "T_max: 4", "T_max: 2"
    )
    (tmp_path / "tiny.yaml").write_text(config)
    expected, at_kill, got = kill_and_resume(tmp_path, "tiny.yaml")
    assert "best_restart" in at_kill
    assert torch.isfinite(at_kill["state_dict"]["restart_scores"][0])
    assert torch.isnan(at_kill["state_dict"]["restart_scores"][1])
    report = json.loads(next((tmp_path / "runs" / "killed").glob("*/metrics.json")).read_text())
    whole = json.loads(next((tmp_path / "runs" / "whole").glob("*/metrics.json")).read_text())
    assert report["restarts"] == whole["restarts"]
    assert report["restarts"]["criterion"] == f"{CLUSTERING}/concept"
    assert report["restarts"]["selected"] in (0, 1) and None not in report["restarts"]["scores"]
