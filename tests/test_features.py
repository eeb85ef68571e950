"""Features computed once (clusterlab.features): what the cache is keyed on, that a second run reads
it, that a bad file is refused by name, and that TEMI's training steps never run the backbone."""

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.views import Views
from clusterlab.errors import CheckpointError
from clusterlab.features import digest
from clusterlab.methods import TEMI, SimCLR
from tests.helpers import fit_digits, save_pretext, tiny_cnn


def temi(pretext, cache) -> TEMI:
    torch.manual_seed(0)
    return TEMI(
        10,
        tiny_cnn("group"),
        Views(),
        pretext_checkpoint=pretext,
        num_heads=2,
        num_neighbors=5,
        hidden_dim=32,
        bottleneck_dim=16,
        feature_cache=str(cache),
    )


@pytest.fixture
def pretext(tmp_path):
    torch.manual_seed(0)
    return save_pretext(SimCLR(10, tiny_cnn("group"), Views()), tmp_path / "pretext.ckpt")


def test_the_key_changes_with_the_weights_the_transform_and_the_images():
    torch.manual_seed(0)
    backbone, images = tiny_cnn(), torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    key = digest(backbone, Views(), images)
    assert digest(backbone, Views(), images.clone()) == key  # the content, not the object
    changed = images.clone()
    changed[3, 0, 4, 4] ^= 1  # one bit of one pixel
    assert digest(backbone, Views(), changed) != key
    assert digest(backbone, Views(mean=[0.5], std=[0.25]), images) != key
    with torch.no_grad():
        next(backbone.parameters())[0].view(-1)[0] += 1e-6
    assert digest(backbone, Views(), images) != key
    torch.manual_seed(0)
    first = tiny_cnn()
    torch.manual_seed(0)
    second = tiny_cnn()
    assert digest(first, Views(), images) == digest(second, Views(), images)
    norm = next(m for m in second.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.running_mean.add_(1.0)  # batch-norm statistics are part of what embeds
    assert digest(first, Views(), images) != digest(second, Views(), images)


def test_temi_embeds_once_the_training_steps_read_the_table_and_a_second_run_reads_the_cache(
    pretext, tmp_path
):
    cache = tmp_path / "features"
    calls = []
    model = temi(pretext, cache)
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    keys = []

    class Keys(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            keys.append(sorted(batch))

    pl.seed_everything(0)
    fit_digits(model, epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[Keys()])
    # One pass over the 1,797 training images (in evaluation batches), and nothing during the 6 steps,
    # whose batches carry indices, not pixels.
    assert sum(calls) == 1797
    assert keys == [["index", "label", "neighbor_index"]] * 6
    files = list(cache.glob("features-*.pt"))
    assert len(files) == 1
    table = torch.load(files[0], weights_only=True)
    assert table.shape == (1797, model.backbone.out_dim) and table.dtype == torch.float32
    torch.testing.assert_close(model.train_features.cpu(), table, rtol=0, atol=0)
    assert len(list(cache.glob("neighbors-*-k5-cosine.pt"))) == 1  # mined among them, cached beside them

    # A second run with the same backbone and data reads the file: planted values come back as they are.
    planted = torch.randn_like(table)
    torch.save(planted, files[0])
    calls.clear()
    again = temi(pretext, cache)
    again.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    fit_digits(again, epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert calls == []
    torch.testing.assert_close(again.train_features.cpu(), planted, rtol=0, atol=0)


def test_other_weights_are_embedded_again_beside_the_first(pretext, tmp_path):
    cache = tmp_path / "features"
    fit_digits(temi(pretext, cache), epochs=1, limit_train_batches=1, limit_val_batches=0)
    torch.manual_seed(1)  # another pretext: other weights, another key
    other = save_pretext(SimCLR(10, tiny_cnn("group"), Views()), tmp_path / "other.ckpt")
    fit_digits(temi(other, cache), epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert len(list(cache.glob("features-*.pt"))) == 2


@pytest.mark.parametrize("bad", [b"not a tensor file", "wrong rows"])
def test_a_cache_file_that_is_not_the_table_is_refused_by_its_path(pretext, tmp_path, bad):
    cache = tmp_path / "features"
    fit_digits(temi(pretext, cache), epochs=1, limit_train_batches=1, limit_val_batches=0)
    (path,) = cache.glob("features-*.pt")
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        torch.save(torch.zeros(5, 3), path)
    with pytest.raises(CheckpointError, match=str(path)) as error:
        fit_digits(temi(pretext, cache), epochs=1, limit_train_batches=1, limit_val_batches=0)
    assert "delete it to embed again" in str(error.value)
    assert path.exists()  # not overwritten: clusterlab may not have written it


def test_temi_evaluates_on_the_embedded_features_as_it_would_through_the_backbone(pretext, tmp_path):
    calls = []
    model = temi(pretext, tmp_path / "features")
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    pl.seed_everything(0)
    trainer = fit_digits(model, epochs=1, limit_train_batches=3, limit_val_batches=None)
    assert sum(calls) == 1797  # the setup's embedding only: the evaluation read the table
    embedded = {k: model.eval_results[k] for k in ("acc", "nmi", "ari")}
    model.eval_features = None  # through the backbone, batch by batch
    trainer.validate(model, datamodule=trainer.datamodule, verbose=False)
    assert sum(calls) == 2 * 1797
    through = {k: model.eval_results[k] for k in ("acc", "nmi", "ari")}
    assert embedded == pytest.approx(through, abs=1e-6) and embedded["acc"] > 0.1
