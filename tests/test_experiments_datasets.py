import pickle
import urllib.request

import numpy as np
import pytest
import torch

from hessian_lab.experiments.datasets import (
    load_cifar,
    load_dataset,
    load_digits,
    make_synthetic,
)


def write_batch(path, n, label_key, num_classes, seed, bytes_keys=True):
    rng = np.random.RandomState(seed)
    batch = {
        "data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.randint(0, num_classes, size=n).tolist(),
        "batch_label": "fabricated",
    }
    if bytes_keys:  # the official files are pickled by Python 2: bytes keys
        batch = {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", 4, "labels", 10, seed=i)
    write_batch(folder / "test_batch", 3, "labels", 10, seed=9, bytes_keys=False)
    return tmp_path


def test_cifar10_reader(cifar10_dir):
    data = load_cifar("cifar10", cifar10_dir)
    assert data.train_inputs.shape == (20, 3, 32, 32)
    assert data.test_inputs.shape == (3, 3, 32, 32)
    assert data.train_inputs.dtype == torch.float32
    assert data.train_targets.dtype == torch.int64
    assert data.num_classes == 10 and data.in_shape == (3, 32, 32)
    # standardized per channel with the training statistics
    means = data.train_inputs.mean(dim=(0, 2, 3))
    stds = data.train_inputs.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(means, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones(3), atol=1e-4, rtol=0)
    # labels and pixel layout (row-major CHW, as in the official description) are kept
    raw = pickle.load(open(cifar10_dir / "cifar-10-batches-py" / "data_batch_1", "rb"))
    assert data.train_targets[:4].tolist() == raw[b"labels"]
    pix = raw[b"data"][0].reshape(3, 32, 32).astype(np.float64)
    x0 = data.train_inputs[0].double().numpy()
    corr = np.corrcoef(pix[1].ravel(), x0[1].ravel())[0, 1]
    assert corr > 0.9999
    # the unpacked folder itself is accepted as root too
    same = load_cifar("cifar10", cifar10_dir / "cifar-10-batches-py")
    assert torch.equal(same.train_inputs, data.train_inputs)


def test_cifar100_reader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_batch(folder / "train", 6, "fine_labels", 100, seed=1)
    write_batch(folder / "test", 2, "fine_labels", 100, seed=2)
    data = load_dataset("cifar100", data_dir=tmp_path, max_train=5)
    assert data.num_classes == 100
    assert data.train_inputs.shape == (5, 3, 32, 32)
    assert data.test_targets.shape == (2,)


def test_cifar_missing_file_names_file_and_layout(cifar10_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", cifar10_dir)
    message = str(info.value)
    assert "data_batch_3" in message
    assert "cifar-10-batches-py" in message and "test_batch" in message
    assert "download" in message


def test_cifar_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar100", data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data directory"):
        load_dataset("cifar10")


def test_cifar_bad_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_batch(folder / "train", 2, "coarse_labels", 20, seed=1)
    write_batch(folder / "test", 2, "fine_labels", 100, seed=2)
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar("cifar100", tmp_path)


def test_digits_split():
    a = load_digits(split_seed=0)
    b = load_digits(split_seed=0)
    c = load_digits(split_seed=1)
    assert a.train_inputs.shape == (1438, 1, 8, 8) and a.test_inputs.shape == (359, 1, 8, 8)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(
        a.test_targets, b.test_targets
    )
    assert not torch.equal(a.test_targets, c.test_targets)
    assert abs(a.train_inputs.mean().item()) < 1e-5
    assert abs(a.train_inputs.std().item() - 1) < 1e-3
    # train and test are disjoint: no test image appears in the training set
    train = {tuple(x.flatten().tolist()) for x in a.train_inputs}
    dup = sum(tuple(x.flatten().tolist()) in train for x in a.test_inputs)
    assert dup <= 3  # the digits set itself holds a few exact duplicate images


def test_synthetic_any_shape():
    data = make_synthetic((2, 5, 3), 4, n_train=10, n_test=6, seed=3)
    assert data.train_inputs.shape == (10, 2, 5, 3) and data.test_inputs.shape == (6, 2, 5, 3)
    assert int(data.train_targets.max()) < 4
    again = load_dataset(
        "synthetic", in_shape=(2, 5, 3), num_classes=4, max_train=10, max_test=6, split_seed=3
    )
    assert torch.equal(again.train_inputs, data.train_inputs)


def test_unknown_dataset():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    for name in ("digits", "cifar10", "cifar100", "synthetic"):
        assert name in str(info.value)


def test_cifar_download_only_when_asked(tmp_path, monkeypatch):
    import io
    import tarfile

    # A fabricated official archive, served by a fake urlopen: no network in tests.
    source = tmp_path / "src" / "cifar-10-batches-py"
    source.mkdir(parents=True)
    for i in range(1, 6):
        write_batch(source / f"data_batch_{i}", 2, "labels", 10, seed=i)
    write_batch(source / "test_batch", 2, "labels", 10, seed=7)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(archive.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError):
        load_cifar("cifar10", root)
    assert urls == []
    data = load_cifar("cifar10", root, download=True)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert data.train_inputs.shape == (10, 3, 32, 32)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    load_cifar("cifar10", root, download=True)  # files present: nothing fetched again
    assert len(urls) == 1
