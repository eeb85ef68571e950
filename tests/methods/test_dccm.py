"""DCCM: Table 3's rows as config overrides, pair draws independent of the split, 2 processes equal 1."""

import copy
import functools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.cli import ClusterLabCLI
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import Digits
from clusterlab.data.views import GeometricViews, Views
from clusterlab.methods import DCCM
from clusterlab.methods.base import match_clusters
from clusterlab.metrics import evaluate
from clusterlab.nn import SmallCNN
from tests.ddp_workers import RecordFirstStep
from tests.helpers import REPO, tiny_cnn, trainer

DIGITS = str(Path(REPO, "experiments", "dccm_digits.yaml"))


ABLATIONS = {  # dccm-paper Table 3, as config overrides
    "M1": (
        [
            "--model.init_args.use_local_robustness",
            "false",
            "--model.init_args.use_pseudo_label_loss",
            "false",
            "--model.init_args.use_mutual_information_loss",
            "false",
        ],
        {"pseudo_graph"},
    ),
    "M2": (
        [
            "--model.init_args.use_pseudo_label_loss",
            "false",
            "--model.init_args.use_mutual_information_loss",
            "false",
        ],
        {"pseudo_graph", "pseudo_graph_transformed"},
    ),
    "M3": (
        ["--model.init_args.use_mutual_information_loss", "false"],
        {"pseudo_graph", "pseudo_graph_transformed", "pseudo_label", "pseudo_label_transformed"},
    ),
    "M4": (
        [],
        {
            "pseudo_graph",
            "pseudo_graph_transformed",
            "pseudo_label",
            "pseudo_label_transformed",
            "mutual_information",
        },
    ),
}


SWITCHES = {  # the other switches of the loss terms, beyond Table 3's rows
    "without L_PG": (
        ["--model.init_args.use_pseudo_graph_loss", "false"],
        {"pseudo_label", "pseudo_label_transformed", "mutual_information"},
    ),
    "transformed images only (the authors' code)": (
        ["--model.init_args.original_images", "false"],
        {"pseudo_graph_transformed", "pseudo_label_transformed", "mutual_information"},
    ),
}


def capture_objective(model: DCCM) -> dict:
    """Let the training step run as it is up to `objective`, and record what it was given: the
    loss terms (`terms`) and the per-head losses (`head_losses`). No logging."""
    captured = {}

    def objective(terms, head_losses=None):
        captured.update(terms=terms, head_losses=head_losses)
        return sum(terms.values())

    model.objective, model.log_diagnostics = objective, lambda *args: None
    return captured


@pytest.mark.parametrize("row", [*ABLATIONS, *SWITCHES])
def test_table_3_rows_are_config_overrides(row, in_tmp):
    overrides, expected_terms = {**ABLATIONS, **SWITCHES}[row]
    model = ClusterLabCLI(args=["--config", DIGITS, *overrides], run=False).model
    captured = capture_objective(model)
    images = Digits().load("train+test").images[:64]
    batch = {"image": images, "index": torch.arange(64), "label": torch.zeros(64, dtype=torch.long)}
    model.training_step(batch, 0).backward()
    assert set(captured["terms"]) == expected_terms
    assert (model.discriminators is not None) == ("mutual_information" in expected_terms)


def test_random_pairs_do_not_depend_on_how_the_batch_is_ordered_or_split():
    model = DCCM(10, SmallCNN(1, (8, 16), (False, True)), Views())
    index = torch.randperm(1797)[:48]
    order = torch.randperm(48)
    scores = model.pair_scores(index, batch_idx=5)
    torch.testing.assert_close(model.pair_scores(index[order], batch_idx=5), scores[order][:, order])
    assert not torch.equal(model.pair_scores(index, batch_idx=6), scores)


def test_each_head_trains_on_its_own_targets_and_the_loss_is_their_mean():
    """num_heads: every head its own pseudo-graph, pseudo labels and discriminator; the per-head
    losses (for the label-free head selection) are each head's own terms, and their mean is the
    objective."""
    torch.manual_seed(0)
    model = DCCM(10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, num_heads=3)
    images = Digits().load("train+test").images[:64]
    batch = {"image": images, "index": torch.arange(64), "label": torch.zeros(64, dtype=torch.long)}
    captured = capture_objective(model)
    loss = model.training_step(batch, 0)
    terms, head_losses = captured["terms"], captured["head_losses"]
    assert set(terms) == set(ABLATIONS["M4"][1]) and head_losses.shape == (3,)
    torch.testing.assert_close(loss, head_losses.mean())
    assert len(set(head_losses.tolist())) == 3  # three heads, three different losses
    assert model.cluster_logits(model.views.plain(images)).shape == (3, 64, 10)
    # Head 1's loss moves head 1 and its discriminator, never another head's layers.
    head_losses[1].backward()
    for h in range(3):
        moved = [
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.cluster_head.heads[h].parameters()
        ]
        moved += [p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminators[h].parameters()]
        assert all(moved) if h == 1 else not any(moved), h


def _dccm_model(**kwargs) -> DCCM:
    torch.manual_seed(0)
    # Batch-independent throughout (GroupNorm, no BatchNorm on the logits): torch has no
    # SyncBatchNorm on CPU. Identity views: each process draws its own views. The thresholds sit
    # at the median similarity and confidence of this freshly initialised net, so the batch has
    # pseudo-graph positives and negatives, confident and unconfident samples.
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")
    return DCCM(
        10,
        backbone,
        Views(),
        graph_threshold=0.9992,
        label_threshold=0.245,
        discriminator_dim=16,
        logit_norm=False,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        **kwargs,
    )


@pytest.mark.parametrize(
    "chunked, num_heads",
    [  # the authors' variant and two heads in make test-slow: the paper's case runs every time
        (False, 1),
        pytest.param(True, 1, marks=pytest.mark.slow),
        pytest.param(False, 2, marks=pytest.mark.slow),
    ],
    ids=["paper", "authors-chunks", "two-heads-voting"],
)
def test_dccm_training_step_on_two_processes_equals_one_process_with_the_whole_batch(
    tmp_path, chunked, num_heads
):
    pl.seed_everything(0)
    options = {"chunk_size": 128, "chunk_repeats": 2} if chunked else {}
    options.update({"combine_heads": "vote"} if num_heads > 1 else {})
    model = _dccm_model(num_heads=num_heads, **options)
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()

    trainer(2, RecordFirstStep(str(ddp_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32)
    )
    single_model = copy.deepcopy(model)
    trainer(1, RecordFirstStep(str(single_out)), max_steps=1, limit_val_batches=0).fit(
        single_model, ClusterDataModule("digits", batch_size=64)
    )

    # Every term is at work in this step: the pseudo-graph has positives and negatives, some
    # predictions are confident, and the mutual information has pairs of both kinds.
    logged = single_model.trainer.callback_metrics
    if not chunked:
        assert 0.1 < logged["train/graph_positives"] < 0.9 and 0.1 < logged["train/confident"] < 0.9
    for term in ("pseudo_graph", "pseudo_label", "pseudo_graph_transformed", "mutual_information"):
        assert logged[f"train/{term}"] > 0, term
    if chunked:  # the chunk's targets: the same on both processes as on one
        assert torch.equal(single_model.chunk_rows.sort().values, single_model.chunk_rows)

    single = torch.load(single_out / "rank0.pt")
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(2)]
    assert sorted(torch.cat([r["batch"] for r in ranks]).tolist()) == sorted(single["batch"].tolist())
    if num_heads > 1:  # the vote's counts: of the global batch, the same on every process as on one
        assert single["head_agreement"].sum() == num_heads**2 * 64
    for result in ranks:
        assert torch.equal(result["head_agreement"], single["head_agreement"])
        assert float(result["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
        assert result["grads"].keys() == single["grads"].keys()
        assert any(name.startswith("discriminators") for name in single["grads"])
        assert any(name.startswith(f"cluster_head.heads.{num_heads - 1}.") for name in single["grads"])
        for name, grad in single["grads"].items():
            # float32 sums in another order: agreement to 1e-4 of each gradient's scale
            scale = float(grad.abs().max())
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=0, atol=1e-4 * scale + 1e-9, msg=name
            )


def test_the_authors_chunked_schedule_computes_targets_once_per_chunk(tmp_path):
    """chunk_size: targets from the chunk's start for all its batches (the authors' code)."""

    class RecordTargets(pl.Callback):
        def __init__(self) -> None:
            self.targets = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.targets.append(pl_module.chunk_probs.clone())

    torch.manual_seed(0)
    model = DCCM(
        10,
        tiny_cnn(),
        GeometricViews(flip=False),
        discriminator_dim=16,
        chunk_size=256,
        chunk_repeats=2,
        chunk_batch_repeats=2,
    )
    record = RecordTargets()
    trainer(callbacks=record, max_epochs=1, limit_train_batches=32, limit_val_batches=0).fit(
        model, ClusterDataModule("digits", batch_size=64)
    )
    steps_per_chunk = 2 * (256 // 64) * 2
    chunks = [record.targets[i : i + steps_per_chunk] for i in range(0, 32, steps_per_chunk)]
    assert len(chunks) == 2 and all(torch.equal(t, chunk[0]) for chunk in chunks for t in chunk)
    assert not torch.equal(chunks[0][0], chunks[1][0])  # new targets for the next chunk
    assert torch.allclose(chunks[0][0].sum(-1), torch.ones(1, 256))  # 1 head x 256 images


def test_a_checkpoint_with_the_heads_under_their_old_names_is_refused_in_one_line():
    """Weights under names this DCCM does not have (another layout's `cluster_heads.*` for its
    `cluster_head.heads.*`) are refused with a CheckpointMismatchError that says so, not loaded
    half or raised as torch's list of every key."""
    from clusterlab.methods.base import CheckpointMismatchError

    torch.manual_seed(0)
    model = DCCM(10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, chunk_size=8)
    old = {
        key.replace("cluster_head.heads.", "cluster_heads."): value
        for key, value in model.state_dict().items()
    }
    assert "cluster_heads.0.0.weight" in old
    with pytest.raises(CheckpointMismatchError, match="weights do not fit this config's DCCM"):
        DCCM(10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, chunk_size=8).load_state_dict(
            old
        )


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_dccm(steps: int, **kwargs) -> tuple[DCCM, list[float]]:
    pl.seed_everything(0)
    model = DCCM(10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, **kwargs)
    record = RecordLosses()
    trainer(callbacks=record, max_steps=steps, limit_val_batches=0).fit(
        model, ClusterDataModule("digits", batch_size=64)
    )
    return model, record.losses


def test_targets_from_a_moving_average_follow_the_trained_net_and_m_0_is_the_paper():
    """target_momentum: W, y, V from theta~ <- m theta~ + (1 - m) theta. With m = 0 the average is
    the trained net after each step, so the run is the paper's (targets from the net itself) loss
    for loss; with m = 0.9 the targets lag, so the losses part from the second step on. The average
    is never trained (not the optimizer's, no gradient) and is in the checkpoint."""
    paper, paper_losses = _fit_dccm(6)
    assert paper.momentum_encoder is None
    same, same_losses = _fit_dccm(6, target_momentum=0.0)
    assert same_losses == paper_losses
    lagging, lagging_losses = _fit_dccm(6, target_momentum=0.9)
    assert lagging_losses[0] == paper_losses[0] and lagging_losses[1:] != paper_losses[1:]

    average = dict(lagging.momentum_encoder["backbone"].named_parameters())
    online = dict(lagging.backbone.named_parameters())
    assert all(not p.requires_grad for p in lagging.momentum_encoder.parameters())
    trained = {id(p) for group in lagging.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not trained & {id(p) for p in lagging.momentum_encoder.parameters()}
    assert all(not torch.equal(average[name], online[name]) for name in online if name.endswith("weight"))
    assert any(key.startswith("momentum_encoder.cluster_head.heads.0.") for key in lagging.state_dict())
    with pytest.raises(Exception, match=r"target_momentum must be in \[0, 1\)"):
        DCCM(10, tiny_cnn(), GeometricViews(flip=False), target_momentum=1.0)


def test_separate_backbones_are_independent_restarts_and_the_lowest_loss_one_assigns():
    """separate_backbones: head h reads its own backbone, drawn afresh (not a copy of head 0's), and
    its loss moves only that backbone, its head and its discriminator: restarts trained side by
    side. Predictions stack each restart's own; `assign` and `embed` use the selected restart's
    backbone. The paper's run (one backbone) draws nothing more; the option is refused beside
    target_momentum."""
    torch.manual_seed(0)
    shared = DCCM(10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, num_heads=3)
    torch.manual_seed(0)
    model = DCCM(
        10, tiny_cnn(), GeometricViews(flip=False), discriminator_dim=16, num_heads=3, separate_backbones=True
    )
    # The same draws up to the restarts: the shared run's parameters are the first of these.
    assert all(torch.equal(a, b) for a, b in zip(shared.backbone.parameters(), model.backbone.parameters()))
    backbones = [model.head_backbone(h) for h in range(3)]
    assert len({id(b) for b in backbones}) == 3
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        weights = zip(backbones[a].parameters(), backbones[b].parameters())
        assert not any(torch.equal(p, q) for p, q in weights if p.dim() > 1), (a, b)
    assert any(key.startswith("restart_backbones.1.") for key in model.state_dict())

    images = Digits().load("train+test").images[:64]
    batch = {"image": images, "index": torch.arange(64), "label": torch.zeros(64, dtype=torch.long)}
    captured = capture_objective(model)
    model.training_step(batch, 0)
    captured["head_losses"][2].backward()
    for h in range(3):
        parts = [backbones[h], model.cluster_head.heads[h], model.discriminators[h]]
        moved = [p.grad is not None and p.grad.abs().sum() > 0 for part in parts for p in part.parameters()]
        assert all(moved) if h == 2 else not any(moved), h

    model.eval()
    plain = model.views.plain(images)
    logits = model.cluster_logits(plain)
    for h in range(3):
        torch.testing.assert_close(logits[h], model.cluster_head.heads[h](backbones[h](plain)))
    model.head_loss.copy_(torch.tensor([0.5, 0.7, 0.3]))  # restart 2 has the lowest loss
    cluster, _ = model.assign(images)
    assert torch.equal(cluster, logits[2].argmax(-1))
    torch.testing.assert_close(model.embed(images), backbones[2](plain))
    with pytest.raises(Exception, match="separate_backbones and target_momentum"):
        DCCM(
            10,
            tiny_cnn(),
            GeometricViews(flip=False),
            num_heads=2,
            separate_backbones=True,
            target_momentum=0.9,
        )


def voting_restarts(seed: int) -> DCCM:
    """Three restarts on separate tiny backbones that vote (combine_heads "vote"), drawn from `seed`."""
    torch.manual_seed(seed)
    return DCCM(
        10,
        tiny_cnn(),
        GeometricViews(flip=False),
        discriminator_dim=16,
        num_heads=3,
        separate_backbones=True,
        combine_heads="vote",
    )


def test_the_restarts_vote_renames_each_restarts_clusters_after_the_selected_ones():
    """combine_heads "vote": the co-assignments of a training epoch match every head's clusters to
    the selected head's (Hungarian method, no label), and the run's assignment is the mean of the
    renamed probabilities: heads that are one partition under other names vote as that partition,
    and two heads outvote the selected one where it alone errs."""
    model = voting_restarts(seed=0)
    reference = torch.randn(200, 10).mul(3).softmax(-1)
    names = [torch.arange(10), torch.randperm(10), torch.randperm(10)]  # head h's cluster names[h][k] is k
    probabilities = torch.stack([reference[:, torch.argsort(order)] for order in names])
    assert torch.equal(probabilities[1].argmax(-1), names[1][reference.argmax(-1)])
    model.on_train_epoch_start()
    model.record_head_assignments(probabilities)
    model.head_loss.copy_(torch.tensor([0.2, 0.5, 0.7]))  # head 0 selected
    model.head_alignment.copy_(match_clusters(model.head_agreement[:, model.selected_head]))
    assert torch.equal(model.head_alignment, torch.stack(names))
    torch.testing.assert_close(model.combined_proba(probabilities), reference)

    # The selected head errs on the first 20 samples; the other two outvote it.
    wrong = probabilities.clone()
    wrong[0, :20] = probabilities[0, :20].roll(1, -1)
    voted = model.combined_proba(wrong).argmax(-1)
    assert not torch.equal(wrong[0].argmax(-1)[:20], reference.argmax(-1)[:20])
    assert torch.equal(voted, reference.argmax(-1))

    # Renumbering the clusters (the folder command) renames the vote's clusters the same way.
    images = Digits().load("train+test").images[:64]
    model.eval()
    before, _ = model.assign(images)
    order = torch.randperm(10)
    model.permute_clusters_(order)
    after, _ = model.assign(images)
    assert torch.equal(after, torch.argsort(order)[before])
    with pytest.raises(Exception, match='combine_heads must be "select" or "vote"'):
        DCCM(10, tiny_cnn(), GeometricViews(flip=False), combine_heads="mean")


def test_a_voting_run_reports_the_vote_and_its_checkpoint_predicts_it(tmp_path):
    """A training run with combine_heads "vote": each epoch's alignment comes from that epoch's
    co-assignments; the evaluation reports the vote (every head's figures beside it); `assign`
    of the run and of its checkpoint give the vote's clusters."""
    model = voting_restarts(seed=0)
    data = ClusterDataModule("digits", batch_size=128)
    run = trainer(1, max_epochs=2, limit_train_batches=4)
    run.fit(model, data)
    run.validate(model, data, verbose=False)  # the final evaluation, as `clusterlab fit` ends
    selected = model.selected_head
    alignment = model.head_alignment.clone()
    assert torch.equal(alignment, match_clusters(model.head_agreement[:, selected]))
    assert torch.equal(alignment[selected], torch.arange(10))
    assert all(sorted(row.tolist()) == list(range(10)) for row in alignment)
    assert model.head_agreement.sum() == 3 * 3 * 4 * 128  # every pair of heads, every sample of the epoch

    results = model.eval_results
    assert results["vote"] and len(results["heads"]) == 3
    images = data.eval_set.images
    model.eval()
    probabilities = model.predict_proba(images)
    renamed = torch.stack([probabilities[h][:, alignment[h]] for h in range(3)]).mean(0)
    cluster, confidence = model.assign(images)
    assert torch.equal(cluster, renamed.argmax(-1))
    torch.testing.assert_close(confidence, renamed.max(-1).values)
    assert results["acc"] == evaluate(cluster, data.eval_set.labels)["acc"]
    assert results["cluster_sizes"] == torch.bincount(cluster, minlength=10).tolist()

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    restored = voting_restarts(seed=1)  # other weights, until the checkpoint's load
    restored.load_state_dict(checkpoint["state_dict"])
    restored.eval()
    assert torch.equal(restored.assign(images)[0], cluster)
