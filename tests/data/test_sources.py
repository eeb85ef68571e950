"""Every source reads its data set's real on-disk format, and says what is wrong when it cannot."""

import numpy as np
import pytest
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import (
    CIFAR10,
    CIFAR20,
    STL10,
    CorruptDataError,
    DataNotFoundError,
    Digits,
    FashionMNIST,
    ImageFolder,
)
from tests.formats import (
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_png_folder,
    write_stl10,
)


def test_digits_is_embedded_and_scaled_to_uint8():
    data = Digits().load("train+test")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert int(data.images.max()) == 255 and data.labels.unique().tolist() == list(range(10))
    with pytest.raises(ValueError, match="digits has no split 'test'"):
        Digits().load("test")


def test_cifar10_pickles(tmp_path):
    images, labels = write_cifar10(tmp_path)
    source = CIFAR10(tmp_path)
    train = source.load("train")
    assert train.images.shape == (50, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), images) and np.array_equal(train.labels.numpy(), labels)
    assert len(source.load("test")) == 10 and len(source.load("train+test")) == 60
    assert len(CIFAR10(tmp_path / "cifar-10-batches-py").load("test")) == 10  # the batches folder itself


def test_cifar20_uses_the_20_superclasses(tmp_path):
    coarse = write_cifar100(tmp_path)
    train = CIFAR20(tmp_path).load("train")
    assert np.array_equal(train.labels.numpy(), coarse)
    assert CIFAR20(tmp_path).num_classes == 20


def test_stl10_binaries_are_read_column_major(tmp_path):
    expected = write_stl10(tmp_path)
    source = STL10(tmp_path)
    train = source.load("train")
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.min() >= 0 and train.labels.max() <= 9  # 1-based on disk
    unlabeled = source.load("unlabeled")
    assert len(unlabeled) == 3 and (unlabeled.labels == -1).all()


def test_fashion_mnist_idx_gz(tmp_path):
    expected = write_fashion_mnist(tmp_path)
    train = FashionMNIST(tmp_path).load("train")
    assert train.images.shape == (20, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), expected)
    assert len(FashionMNIST(tmp_path).load("train+test")) == 30


def test_truncated_idx_file_names_the_file(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte.gz"):
        FashionMNIST(tmp_path).load("train")


def test_image_folder_labels_from_subfolders(tmp_path):
    paths = write_png_folder(tmp_path, classes=("cat", "dog"), per_class=3)
    data = ImageFolder(tmp_path, image_size=16).load("train")
    assert data.images.shape == (6, 3, 16, 16)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.paths == [str(p) for p in sorted(paths)]


def test_image_folder_flat_has_unknown_labels_and_split_folders(tmp_path):
    write_png_folder(tmp_path / "flat", classes=("",), per_class=2)
    assert (ImageFolder(tmp_path / "flat", image_size=8).load("train").labels == -1).all()
    write_png_folder(tmp_path / "split" / "train", classes=("a", "b"), per_class=2)
    write_png_folder(tmp_path / "split" / "val", classes=("a", "b"), per_class=1)
    source = ImageFolder(tmp_path / "split", image_size=8)
    assert source.classes == ["a", "b"]
    assert (
        len(source.load("train")) == 4
        and len(source.load("test")) == 2
        and len(source.load("train+test")) == 6
    )


def test_missing_cifar_root_names_the_path_and_how_to_get_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as error:
        CIFAR10(missing).load("train")
    message = str(error.value)
    assert str(missing) in message and "cifar-10-python.tar.gz" in message and "--data.root" in message


def test_missing_root_through_the_data_module(tmp_path):
    data = ClusterDataModule("cifar20", root=str(tmp_path / "absent"))
    with pytest.raises(DataNotFoundError, match="cifar-100-python.tar.gz"):
        data.setup("fit")


def test_corrupt_png_names_the_file(tmp_path):
    write_png_folder(tmp_path, classes=("a",), per_class=2)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(CorruptDataError) as error:
        ImageFolder(tmp_path, image_size=8).load("train")
    assert str(bad) in str(error.value)


def test_corrupt_png_skipped_on_request(tmp_path):
    write_png_folder(tmp_path, classes=("a",), per_class=2)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"garbage")
    source = ImageFolder(tmp_path, image_size=8, on_error="skip")
    with pytest.warns(UserWarning, match="broken.png"):
        data = source.load("train")
    assert len(data) == 2 and str(bad) not in data.paths
    assert source.skipped[0][0] == str(bad)
