"""Every method's one cluster head (`cluster_head`, a `clusterlab.nn.ClusterHead`), and the initial
weights of the digits configs, which the recorded results (docs/results.md) were trained from."""

import hashlib
import os

import pytest
import torch

from clusterlab.cli import ClusterLabCLI
from clusterlab.nn.heads import ClusterHead
from tests.helpers import REPO

METHODS = ("cc", "nnm", "scl", "dccm", "simclr")

# sha256 (first 16 hex digits) of every parameter's bytes, in `named_parameters()` order, of
# experiments/<method>_digits.yaml built by the CLI with --seed_everything 0, as the code that
# produced docs/results.md built it. Renaming or regrouping modules must keep these: the same
# random draws in the same order initialise the same weights.
RECORDED_INITIAL_WEIGHTS = {
    "cc": (17, "651fcb066a65f14f"),
    "nnm": (15, "df48f1218e4da93b"),
    "scl": (34, "5c8f9e22f7b4c6f0"),
    # Three restarts on separate backbones (docs/results.md, DCCM, "restarts on separate
    # backbones"): the same weights at d4c027b, which ran those seeds, and after.
    "dccm": (72, "f32d4228c50dbea4"),
    "simclr": (13, "5b7e129ab820ffd2"),
}


def build(method: str, *args: str):
    config = os.path.join(REPO, "experiments", f"{method}_digits.yaml")
    return ClusterLabCLI(args=["--config", config, "--seed_everything", "0", *args], run=False).model


@pytest.mark.parametrize("method", METHODS)
def test_the_digits_configs_start_from_the_weights_their_recorded_results_started_from(method, in_tmp):
    parameters = [p for _, p in build(method).named_parameters()]
    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().contiguous().numpy().tobytes())
    assert (len(parameters), digest.hexdigest()[:16]) == RECORDED_INITIAL_WEIGHTS[method]


@pytest.mark.parametrize(
    "method, args",
    [
        *((m, ()) for m in METHODS),
        (
            "cc",
            ("--model.init_args.use_cluster_loss", "false", "--model.init_args.use_cluster_entropy", "false"),
        ),
        # (restarts 1: the config's restarts are ranked by the clustering task's concept loss)
        ("scl", ("--model.init_args.use_concept_loss", "false", "--model.init_args.restarts", "1")),
        ("scl", ("--model.init_args.clustering_task", "false", "--model.init_args.restarts", "1")),
    ],
)
def test_every_method_clusters_through_its_one_cluster_head(method, args, in_tmp):
    model = build(method, *args).eval()
    assert isinstance(model.cluster_head, ClusterHead)
    for old_name in ("kmeans", "cluster_heads", "cluster_projector", "heads"):
        assert not hasattr(model, old_name), old_name
    x = model.plain(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8))
    with torch.no_grad():
        logits = model.cluster_logits(x)
        # Every head reads its backbone's features: the one backbone, or (DCCM's separate_backbones)
        # its own restart's.
        head_backbone = getattr(model, "head_backbone", lambda h: None)
        for h in range(model.num_heads):
            features = model.cluster_features(x) if head_backbone(h) is None else head_backbone(h)(x)
            assert torch.equal(logits[h], model.cluster_head(features)[h]), h
    assert logits.shape == (model.num_heads, 5, model.num_clusters)
    # A fitted head (k-means) keeps features for the evaluation, a trained one every head's cluster.
    kept = model.evaluation_outputs(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8))
    assert set(kept) == ({"features"} if model.cluster_head.fitted else {"cluster"})
