"""NNM: the pretext hand-over, mining, the training step on 2 processes, and Table 3's switches."""

import copy
import functools
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import SmallImageViews, Views
from clusterlab.methods import CC, NNM, SimCLR
from clusterlab.methods.base import CheckpointMismatchError
from clusterlab.methods.nnm import global_blocks
from clusterlab.neighbors import kmeans
from clusterlab.pretext import PretextNotFoundError, mine_neighbors, resolve_pretext_checkpoint
from clusterlab.seeding import derive_seed
from tests.ddp_workers import RecordFirstStep, RecordGlobalTable
from tests.helpers import (
    assert_first_steps_equal,
    assert_top_k,
    fit_digits,
    save_pretext,
    similarity,
    tiny_cnn,
)


def test_the_newest_pretext_of_the_runs_seed_is_found(in_tmp, monkeypatch):
    for run in ("a-seed3", "b-seed3", "c-seed4"):
        (in_tmp / "runs" / run / "checkpoints").mkdir(parents=True)
        (in_tmp / "runs" / run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.02)
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    found = resolve_pretext_checkpoint("runs/*-seed{seed}/checkpoints/last.ckpt")
    assert found == Path("runs/b-seed3/checkpoints/last.ckpt")


def test_a_missing_pretext_says_what_was_looked_for(in_tmp, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with pytest.raises(
        PretextNotFoundError,
        match=r"no pretext checkpoint matches 'runs/simclr_digits/\*-seed7/"
        r"checkpoints/last.ckpt'.*seed 7.*simclr_<dataset>.yaml --seed_everything 7",
    ):
        resolve_pretext_checkpoint("runs/simclr_digits/*-seed{seed}/checkpoints/last.ckpt")


def test_a_checkpoint_of_another_method_is_refused_as_pretext(tmp_path):
    cc = save_pretext(CC(10, tiny_cnn(), SmallImageViews()), tmp_path / "cc.ckpt")
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=cc)
    with pytest.raises(
        CheckpointMismatchError, match=f"pretext checkpoint {cc} holds a CC model; NNM needs a SimCLR"
    ):
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False).fit(
            model, ClusterDataModule("digits", batch_size=64)
        )


def test_mined_neighbours_are_the_top_k_and_cached_by_checkpoint_content(tmp_path):
    images = ClusterDataModule("digits").split("train+test").images[:300]
    batches = [{"index": rows, "image": images[rows]} for rows in torch.arange(300).split(128)]
    plain = Views().plain
    torch.manual_seed(0)
    model = SimCLR(10, tiny_cnn(), Views())
    path = tmp_path / "last.ckpt"
    save_pretext(model, path)

    def mine(backbone):
        features = lambda batch: {"features": F.normalize(backbone(plain(batch["image"])), dim=1)}  # noqa: E731
        return mine_neighbors(path, 5, backbone, batches, features, len(images))

    first = mine(model.backbone)
    assert_top_k(first, similarity(model.backbone, plain, images))
    (cache,) = tmp_path.glob("neighbors-*.pt")
    torch.save(first.flip(1), cache)  # the cache is what a second mining of the same checkpoint returns
    assert torch.equal(mine(model.backbone), first.flip(1))

    retrained = SimCLR(10, tiny_cnn(), Views())  # other weights under the same path: mined again
    save_pretext(retrained, path)
    again = mine(retrained.backbone)
    assert len(list(tmp_path.glob("neighbors-*.pt"))) == 2
    assert_top_k(again, similarity(retrained.backbone, plain, images))


def test_nnm_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """At epoch 1 (local and global terms on): loss, gradients and the global table; the heads
    start there from k-means of the features (head_init_epoch 1), fitted on rank 0 and broadcast."""
    pl.seed_everything(0)
    torch.manual_seed(0)
    pretext = save_pretext(SimCLR(10, tiny_cnn("group"), Views()), tmp_path / "pretext.ckpt")
    # Un-augmented views and GroupNorm: per-sample outputs that do not depend on the split of the batch.
    model = NNM(
        10,
        tiny_cnn("group"),
        Views(),
        pretext_checkpoint=pretext,
        head_init_epoch=1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()
    record = lambda out: [RecordFirstStep(str(out)), RecordGlobalTable(str(out))]
    fit_digits(
        copy.deepcopy(model),
        devices=2,
        epochs=2,
        batch_size=32,
        callbacks=record(ddp_out),
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer = fit_digits(
        copy.deepcopy(model),
        epochs=2,
        batch_size=64,
        callbacks=record(single_out),
        limit_train_batches=1,
        limit_val_batches=0,
    )
    assert "train/global_consistency" in trainer.callback_metrics  # the global terms were on

    assert_first_steps_equal(single_out, ddp_out)
    tables = [torch.load(ddp_out / f"table_rank{r}.pt") for r in range(2)]
    assert torch.equal(tables[0]["table"], tables[1]["table"])
    assert torch.equal(tables[0]["neighbor_index"], tables[1]["neighbor_index"])
    # The same table as one process, up to near-ties of the neighbour search (the weights agree to
    # float rounding, not bit for bit).
    expected = torch.load(single_out / "table_rank0.pt")
    same = tables[0]["neighbor_index"] == expected["neighbor_index"]
    assert same.float().mean() > 0.98
    torch.testing.assert_close(tables[0]["table"][:, same], expected["table"][:, same], rtol=1e-4, atol=1e-5)


def test_every_loss_term_can_be_switched_off_table_3(pretext):
    pl.seed_everything(0)
    switches = {
        "use_local_loss": False,
        "use_global_loss": False,
        "use_consistency_loss": False,
        "use_class_contrastive_loss": False,
        "use_entropy_loss": False,
    }
    expected_missing = {
        "use_local_loss": {"local_consistency", "local_class"},
        "use_global_loss": {"global_consistency", "global_class"},
        "use_consistency_loss": {"local_consistency", "global_consistency"},
        "use_class_contrastive_loss": {"local_class", "global_class"},
        "use_entropy_loss": {"entropy"},
    }
    all_terms = {"local_consistency", "local_class", "global_consistency", "global_class", "entropy"}
    for switch in switches:
        model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext, num_heads=2, **{switch: False})
        trainer = fit_digits(model, epochs=2, limit_train_batches=1, limit_val_batches=0)
        logged = {
            k.split("/")[1] for k in trainer.callback_metrics if k.startswith("train/") and "/loss" not in k
        }
        logged = {k.removesuffix("_epoch") for k in logged}
        assert logged == all_terms - expected_missing[switch], switch
    with pytest.raises(ValueError, match="every loss term is switched off"):
        NNM(
            10,
            tiny_cnn(),
            Views(),
            pretext_checkpoint=pretext,
            use_consistency_loss=False,
            use_class_contrastive_loss=False,
            use_entropy_loss=False,
        )


def test_eqs_9_10_match_three_blocks_by_default_and_the_authors_four_on_request():
    p, p_aug, n_pre, n_local = (torch.full((2, 3), float(v)) for v in range(4))
    paper = global_blocks(p, p_aug, n_pre, n_local)
    assert paper[:, 0].tolist() == [0, 0, 3, 3, 2, 2]  # [p; N_local(p); N_pre(p)]: p counted once
    code = global_blocks(p, p_aug, n_pre, n_local, "code")
    assert code[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # [p; p_aug; N_pre(p); N_local(p)]
    assert NNM(10, tiny_cnn(), Views(), pretext_checkpoint="x").hparams.global_matching == "paper"


def test_neighbours_can_be_mined_by_l2_distance_on_the_raw_features(tmp_path):
    images = ClusterDataModule("digits").split("train+test").images[:200]
    batches = [{"index": rows, "image": images[rows]} for rows in torch.arange(200).split(64)]
    torch.manual_seed(0)
    model = SimCLR(10, tiny_cnn(), Views())
    path = tmp_path / "last.ckpt"
    save_pretext(model, path)
    model.eval()
    with torch.no_grad():
        raw = model.backbone(Views().plain(images))

    def features(batch):
        return {"features": model.backbone(Views().plain(batch["image"]))}

    mined = mine_neighbors(path, 5, model, batches, features, len(images), metric="l2")
    distances = torch.cdist(raw, raw).fill_diagonal_(float("inf"))
    torch.testing.assert_close(
        distances.gather(1, mined), distances.topk(5, largest=False).values, atol=1e-4, rtol=0
    )
    assert list(tmp_path.glob("neighbors-*-l2.pt"))  # cached apart from the cosine neighbours


@pytest.mark.parametrize("second_view, views_per_step", [(True, 3), (False, 2)])
def test_second_view_draws_p_aug_or_reuses_p(pretext, second_view, views_per_step):
    """second_view: A = [p; p_aug] with a second strong view of the anchor (the default); false:
    A = [p; p], Eq. 7 as printed, and one view fewer a step (anchor and neighbour only)."""
    pl.seed_everything(0)
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext, second_view=second_view)
    calls = []
    model.views.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    fit_digits(model, epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert calls == [64] * views_per_step


def test_the_mining_metric_option_reaches_the_mining(pretext):
    """mining_metric "l2" (the authors' code) mines by Euclidean distance: its cache says so."""
    pl.seed_everything(0)
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext, mining_metric="l2")
    fit_digits(model, epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert [path.name.endswith("-l2.pt") for path in Path(pretext).parent.glob("neighbors-*.pt")] == [True]


@pytest.mark.parametrize("restarts", [10, 1])
def test_the_heads_start_from_spherical_kmeans_of_the_features_at_their_epoch(pretext, restarts):
    """head_init_epoch 0: before the first step each head's argmax over the training images is a
    spherical k-means of the backbone features (the best of head_init_restarts runs), each head its
    own run (no label read)."""
    pl.seed_everything(0)
    model = NNM(
        10,
        tiny_cnn(),
        Views(),
        pretext_checkpoint=pretext,
        num_heads=2,
        head_init_epoch=0,
        head_init_restarts=restarts,
    )
    seen = {}

    class AtFirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 0:
                with torch.no_grad():
                    module.eval()
                    h = module.backbone(module.plain(trainer.datamodule.train_set.images))
                    seen["heads"] = module.cluster_head(h).argmax(-1)
                    seen["h"] = h.float()
                    module.train()

    fit_digits(model, epochs=1, callbacks=[AtFirstBatch()], limit_train_batches=1, limit_val_batches=0)
    directions, other = F.normalize(seen["h"], dim=1), {10: 1, 1: 10}[restarts]
    for head, assignment in enumerate(seen["heads"]):
        seed = derive_seed(head, 7) % 2**31
        expected, _ = kmeans(directions, 10, seed=seed, n_init=restarts)
        assert (assignment == expected.to(assignment)).float().mean() > 0.99
        assert len(assignment.unique()) == 10
        # the number of restarts matters here: the other count's k-means is another partition
        assert (assignment != kmeans(directions, 10, seed=seed, n_init=other)[0].to(assignment)).any()
    assert not torch.equal(seen["heads"][0], seen["heads"][1])  # two k-means runs, two starts
