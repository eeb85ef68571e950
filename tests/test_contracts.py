"""A callback names what a method lacks when the run is set up, not at the end of an epoch."""

import pytest
import pytorch_lightning as pl

from clusterlab.callbacks import GlobalNeighbors, MomentumEncoder, PseudoLabelRefresh
from clusterlab.callbacks.figures import ClusterFigures
from clusterlab.callbacks.scl import PseudoLabelled
from clusterlab.contracts import members
from clusterlab.data.views import Views
from clusterlab.methods import CC, NNM, SCL, SimCLR
from tests.helpers import tiny_cnn, tiny_scl


def test_protocols_list_their_members():
    assert members(PseudoLabelled) == ["prepare_refresh", "sample_table", "task_clusters", "task_outputs"]


@pytest.mark.parametrize(
    "callback,missing",
    [
        (MomentumEncoder(), "HasMomentumEncoder: missing momentum_encoder"),
        (
            PseudoLabelRefresh(),
            "PseudoLabelled: missing prepare_refresh, sample_table, task_clusters, task_outputs",
        ),
        (GlobalNeighbors(), "HasFeaturesAndLogits: missing features_and_logits"),
    ],
)
def test_a_callback_names_the_members_a_method_lacks(callback, missing):
    model = CC(10, tiny_cnn(), Views())
    with pytest.raises(TypeError, match=f"{type(callback).__name__} needs CC to implement .*{missing}"):
        callback.setup(pl.Trainer(logger=False), model, "fit")


def test_the_methods_implement_what_their_callbacks_need(pretext):
    trainer = pl.Trainer(logger=False)
    moco, nnm = SimCLR(10, tiny_cnn(), Views(), queue_size=64), NNM(10, tiny_cnn(), Views(), pretext)
    for model in (tiny_scl(), moco, nnm):
        for callback in [*model.configure_callbacks(), ClusterFigures()]:
            callback.setup(trainer, model, "fit")
    assert isinstance(tiny_scl(), SCL)


def test_a_method_that_inherits_a_protocol_without_implementing_it_is_refused():
    class Forgetful(CC, PseudoLabelled):  # says it is PseudoLabelled, implements nothing of it
        pass

    with pytest.raises(TypeError, match="missing prepare_refresh, sample_table, task_clusters, task_outputs"):
        PseudoLabelRefresh().setup(pl.Trainer(logger=False), Forgetful(10, tiny_cnn(), Views()), "fit")
