"""NNM: its losses (nnm-paper Eqs. 3-11), the pretext hand-over, neighbour delivery, the global
neighbour table, and the same run on 2 processes, or killed and resumed."""

import copy
import functools
import math
import time

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import RandAugment, SmallImageViews, StrongViews, Views
from clusterlab.losses.nnm import class_contrastive_loss, consistency_loss, entropy_loss, moco_loss
from clusterlab.methods import CC, NNM, SimCLR
from clusterlab.methods.base import CheckpointMismatchError
from clusterlab.methods.nnm import PretextNotFoundError, mine_neighbors, resolve_pretext_checkpoint
from clusterlab.nn import SmallCNN
from tests.ddp_workers import RecordFirstStep, RecordGlobalTable
from tests.helpers import TINY_NNM, TINY_SIMCLR, save_pretext


def tiny_cnn(norm: str = "batch") -> SmallCNN:
    return SmallCNN(1, widths=(8, 16), downsample=(False, True), norm=norm)


@pytest.fixture
def pretext(tmp_path):
    torch.manual_seed(0)
    return save_pretext(SimCLR(10, tiny_cnn(), SmallImageViews()), tmp_path / "pretext.ckpt")


# -- losses against values computed by hand ------------------------------------------------------


def test_consistency_loss_is_minus_log_of_the_dot_product_eq_3():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    # <a_1, p_1> = 0.8 and <a_2, p_2> = 0.25 + 0.25 = 0.5
    assert consistency_loss(a, p) == pytest.approx(-(math.log(0.8) + math.log(0.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_class_contrastive_loss_contrasts_cluster_columns_eq_4(tau):
    a = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    # columns: a_1 = (.8, .4), a_2 = (.2, .6); p_1 = (.6, .2), p_2 = (.4, .8); cosine similarities:
    s11 = (0.8 * 0.6 + 0.4 * 0.2) / (math.sqrt(0.8) * math.sqrt(0.4))
    s12 = (0.8 * 0.4 + 0.4 * 0.8) / (math.sqrt(0.8) * math.sqrt(0.8))
    s21 = (0.2 * 0.6 + 0.6 * 0.2) / (math.sqrt(0.4) * math.sqrt(0.4))
    s22 = (0.2 * 0.4 + 0.6 * 0.8) / (math.sqrt(0.4) * math.sqrt(0.8))
    first = -math.log(math.exp(s11 / tau) / (math.exp(s11 / tau) + math.exp(s12 / tau)))
    second = -math.log(math.exp(s22 / tau) / (math.exp(s21 / tau) + math.exp(s22 / tau)))
    assert class_contrastive_loss(a, p, tau) == pytest.approx((first + second) / 2, rel=1e-6)


def test_entropy_loss_is_minus_the_entropy_of_the_mean_assignment_eq_5():
    uniform = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    # mean = (1/3, 1/3, 1/6, 1/6)
    expected = 2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6)
    assert entropy_loss(uniform) == pytest.approx(expected, rel=1e-6)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert entropy_loss(collapsed) == pytest.approx(0.0, abs=1e-6)


def test_moco_loss_contrasts_the_key_with_the_queue_eq_2():
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])  # cosine similarities 0 and -1
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert moco_loss(q, k, queue, 1.0) == pytest.approx(expected, rel=1e-6)


# -- strong views -----------------------------------------------------------------------------


def test_strong_views_draw_operations_and_magnitudes_per_image():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    views = StrongViews(size=32)(image.repeat(32, 1, 1, 1))
    assert views.shape == (32, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert len({tuple(v.flatten()[::7].tolist()) for v in views}) > 24
    identity = RandAugment(4, {"identity": None})(image.float() / 255)
    assert torch.equal(identity, image.float() / 255)
    with pytest.raises(ValueError, match="unknown RandAugment ops \\['twirl'\\]"):
        RandAugment(4, {"twirl": None})


# -- neighbour delivery -------------------------------------------------------------------------


def _training_batch(data, trainer, indices):
    batch = data.train_dataloader().dataset.__getitems__(indices)
    return data.on_before_batch_transfer(batch, 0)


def test_training_batches_carry_one_of_each_samples_neighbours_drawn_per_epoch():
    data = ClusterDataModule("digits", batch_size=32)
    data.setup("fit")
    torch.manual_seed(0)
    table = torch.stack([torch.randperm(len(data.train_set))[:5] for _ in range(len(data.train_set))])
    data.set_neighbors(table)
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    data.trainer = trainer
    trainer.training = True
    batch = _training_batch(data, trainer, list(range(40, 72)))
    index, neighbor = batch["index"], batch["neighbor_index"]
    assert all(int(n) in table[int(i)].tolist() for i, n in zip(index, neighbor))
    assert torch.equal(batch["neighbor_image"], data.train_set.images[neighbor])
    # A sample's draw depends on (seed, epoch, sample), not on its batch: a resumed run or another
    # number of processes gives it the same neighbour.
    other = _training_batch(data, trainer, list(range(71, 39, -1)))
    assert torch.equal(other["neighbor_index"].flip(0), neighbor)
    trainer.fit_loop.epoch_progress.current.completed = 1
    next_epoch = _training_batch(data, trainer, list(range(40, 72)))
    assert not torch.equal(next_epoch["neighbor_index"], neighbor)


# -- the pretext hand-over ----------------------------------------------------------------------


def test_the_newest_pretext_of_the_runs_seed_is_found(in_tmp, monkeypatch):
    for run in ("a-seed3", "b-seed3", "c-seed4"):
        (in_tmp / "runs" / run / "checkpoints").mkdir(parents=True)
        (in_tmp / "runs" / run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.02)
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    found = resolve_pretext_checkpoint("runs/*-seed{seed}/checkpoints/last.ckpt")
    assert found == __import__("pathlib").Path("runs/b-seed3/checkpoints/last.ckpt")


def test_a_missing_pretext_says_what_was_looked_for(in_tmp, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with pytest.raises(PretextNotFoundError, match=r"no pretext checkpoint matches 'runs/simclr_digits/\*-seed7/"
                       r"checkpoints/last.ckpt'.*seed 7.*simclr_<dataset>.yaml --seed_everything 7"):  # fmt: skip
        resolve_pretext_checkpoint("runs/simclr_digits/*-seed{seed}/checkpoints/last.ckpt")


def test_a_checkpoint_of_another_method_is_refused_as_pretext(tmp_path):
    cc = save_pretext(CC(10, tiny_cnn(), SmallImageViews()), tmp_path / "cc.ckpt")
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=cc)
    with pytest.raises(CheckpointMismatchError, match=f"pretext checkpoint {cc} holds a CC model; NNM needs a SimCLR"):
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False).fit(model, ClusterDataModule("digits", batch_size=64))


def _similarity(backbone, plain, images):
    backbone.eval()
    with torch.no_grad():
        f = F.normalize(backbone(plain(images)), dim=1)
    similarity = f @ f.T
    return similarity.fill_diagonal_(-math.inf)


def assert_top_k(neighbors, similarity):
    """`neighbors` are each row's k most similar other rows (up to ties in the similarity)."""
    k = neighbors.shape[1]
    assert not (neighbors == torch.arange(len(neighbors))[:, None]).any()
    torch.testing.assert_close(similarity.gather(1, neighbors), similarity.topk(k, dim=1).values, rtol=0, atol=1e-5)


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
    assert_top_k(first, _similarity(model.backbone, plain, images))
    (cache,) = tmp_path.glob("neighbors-*.pt")
    torch.save(first.flip(1), cache)  # the cache is what a second mining of the same checkpoint returns
    assert torch.equal(mine(model.backbone), first.flip(1))

    retrained = SimCLR(10, tiny_cnn(), Views())  # other weights under the same path: mined again
    save_pretext(retrained, path)
    again = mine(retrained.backbone)
    assert len(list(tmp_path.glob("neighbors-*.pt"))) == 2
    assert_top_k(again, _similarity(retrained.backbone, plain, images))


# -- the global neighbour table -----------------------------------------------------------------


def _fit(model, devices=1, epochs=1, batch_size=64, callbacks=(), **kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_epochs=epochs, limit_train_batches=kwargs.pop("limit_train_batches", 2), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)  # fmt: skip
    trainer.fit(model, ClusterDataModule("digits", batch_size=batch_size))
    return trainer


def test_global_table_row_i_holds_the_predictions_of_i_s_own_nearest_neighbour(pretext):
    pl.seed_everything(0)
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext)
    _fit(model, limit_val_batches=0)  # a shuffled loader: the table must not follow its order
    table, stored = model.global_neighbors.table, model.global_neighbors.neighbor_index
    images = ClusterDataModule("digits").split("train+test").images
    model.eval()
    with torch.no_grad():
        _, logits = model.features_and_logits(model.plain(images))
    assert_top_k(stored[:, None], _similarity(model.backbone, model.plain, images))  # i's nearest neighbour
    predictions = logits.softmax(-1)
    assert table.shape == (3, len(images), 10)
    torch.testing.assert_close(table, predictions[:, stored], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(table, predictions, atol=1e-3)  # not the sample's own predictions


def test_nnm_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """At epoch 1 (local and global terms on): loss, gradients and the global table."""
    pl.seed_everything(0)
    torch.manual_seed(0)
    pretext = save_pretext(SimCLR(10, tiny_cnn("group"), Views()), tmp_path / "pretext.ckpt")
    # Un-augmented views and GroupNorm: per-sample outputs that do not depend on the split of the batch.
    model = NNM(10, tiny_cnn("group"), Views(), pretext_checkpoint=pretext,
                optimizer=functools.partial(torch.optim.SGD, lr=0.5))  # fmt: skip
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()
    record = lambda out: [RecordFirstStep(str(out)), RecordGlobalTable(str(out))]
    _fit(copy.deepcopy(model), devices=2, epochs=2, batch_size=32, callbacks=record(ddp_out),
         limit_train_batches=1, limit_val_batches=0)  # fmt: skip
    trainer = _fit(copy.deepcopy(model), epochs=2, batch_size=64, callbacks=record(single_out),
                   limit_train_batches=1, limit_val_batches=0)  # fmt: skip
    assert "train/global_consistency" in trainer.callback_metrics  # the global terms were on

    single = torch.load(single_out / "rank0.pt")
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(2)]
    assert sorted(torch.cat([r["batch"] for r in ranks]).tolist()) == sorted(single["batch"].tolist())
    for result in ranks:
        assert float(result["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
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
    switches = {"use_local_loss": False, "use_global_loss": False, "use_consistency_loss": False,
                "use_class_contrastive_loss": False, "use_entropy_loss": False}  # fmt: skip
    expected_missing = {"use_local_loss": {"local_consistency", "local_class"},
                        "use_global_loss": {"global_consistency", "global_class"},
                        "use_consistency_loss": {"local_consistency", "global_consistency"},
                        "use_class_contrastive_loss": {"local_class", "global_class"}, "use_entropy_loss": {"entropy"}}  # fmt: skip
    all_terms = {"local_consistency", "local_class", "global_consistency", "global_class", "entropy"}
    for switch in switches:
        model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext, num_heads=2, **{switch: False})
        trainer = _fit(model, epochs=2, limit_train_batches=1, limit_val_batches=0)
        logged = {k.split("/")[1] for k in trainer.callback_metrics if k.startswith("train/") and "/loss" not in k}
        logged = {k.removesuffix("_epoch") for k in logged}
        assert logged == all_terms - expected_missing[switch], switch
    with pytest.raises(ValueError, match="every loss term is switched off"):
        NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext, use_consistency_loss=False,
            use_class_contrastive_loss=False, use_entropy_loss=False)  # fmt: skip


# -- resume -----------------------------------------------------------------------------------


def test_killed_and_resumed_nnm_run_continues_with_the_same_global_table(tmp_path):
    from tests.helpers import clusterlab, kill_and_resume

    (tmp_path / "tiny_simclr.yaml").write_text(TINY_SIMCLR)
    (tmp_path / "tiny_nnm.yaml").write_text(TINY_NNM)
    pretext = clusterlab("fit", "--config", "tiny_simclr.yaml", cwd=tmp_path)
    assert pretext.returncode == 0, pretext.stderr[-3000:]
    expected, stopped, got = kill_and_resume(tmp_path, "tiny_nnm.yaml")
    assert stopped["callbacks"]["GlobalNeighbors"]["epoch"] == 1  # epoch 1's table was saved
    table, resumed_table = expected["callbacks"]["GlobalNeighbors"], got["callbacks"]["GlobalNeighbors"]
    assert table["epoch"] == resumed_table["epoch"] == 3
    assert torch.equal(table["table"], resumed_table["table"])
    assert "neighbor_agreement" in __import__("json").loads(next((tmp_path / "runs" / "killed").glob("*/metrics.json")).read_text())["diagnostics"]
