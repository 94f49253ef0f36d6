"""Data sets, partitions and per-worker loaders (coopsgd.data)."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coopsgd.data import (
    BUNDLED_DIR,
    DATASETS,
    Dataset,
    RandomCropFlip,
    WorkerLoader,
    batchify,
    default_root,
    deterministic_batches,
    label_histograms,
    lm_batches,
    lm_windows,
    load_dataset,
    num_lm_batches,
    partition,
    read_idx,
    shard_tokens,
)
from coopsgd.errors import ConfigError

T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _raises(field: str):
    """pytest.raises for a ConfigError whose message starts with ``field=`` (the field is named first)."""
    return pytest.raises(ConfigError, match=rf"^{field}=")


def _indexed(n: int, num_classes: int = 10, seed: int = 0) -> Dataset:
    """A data set whose single feature is the sample's index (to recover which samples a batch holds)."""
    y = torch.from_numpy(np.random.default_rng(seed).integers(0, num_classes, n))
    return Dataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), y, num_classes, "indexed", (1,))


def _ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].long().tolist()


# ---------------------------------------------------------------------------------------------- bundled MNIST


def test_bundled_files_have_the_documented_md5() -> None:
    want = {
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    for name, md5 in want.items():
        assert hashlib.md5((BUNDLED_DIR / name).read_bytes()).hexdigest() == md5
    assert (BUNDLED_DIR / "LICENSE-DATA.md").is_file()
    assert (BUNDLED_DIR / "valid.txt").is_file() and (BUNDLED_DIR / "test.txt").is_file()


def test_mnist_bundle_parses_to_t10k_with_known_class_counts() -> None:
    images = read_idx(BUNDLED_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(BUNDLED_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == T10K_COUNTS
    train = load_dataset("mnist_bundled", split="train")
    test = load_dataset("mnist_bundled", split="test")
    assert train.x.shape == (8000, 1, 28, 28) and test.x.shape == (2000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    both = torch.cat([train.y, test.y])
    assert torch.bincount(both, minlength=10).tolist() == T10K_COUNTS
    # Normalised with MNIST's (0.1307, 0.3081): close to zero mean, unit variance; 0 maps to -0.4242.
    assert abs(float(train.x.mean())) < 0.05 and abs(float(train.x.std()) - 1.0) < 0.05
    assert float(train.x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert train.num_classes == 10 and train.input_shape == (1, 28, 28)


def test_mnist_split_is_disjoint_and_seeded() -> None:
    def key(ds: Dataset) -> set[bytes]:
        return {row.numpy().tobytes() for row in ds.x.flatten(1)}

    tr0, te0 = load_dataset(split="train", seed=0), load_dataset(split="test", seed=0)
    assert not key(tr0) & key(te0)  # disjoint (t10k has no duplicate images)
    again = load_dataset(split="train", seed=0)
    assert torch.equal(tr0.x, again.x) and torch.equal(tr0.y, again.y)
    other = load_dataset(split="train", seed=1)
    assert not torch.equal(tr0.y, other.y)


def test_digits_and_num_samples() -> None:
    tr, te = load_dataset("digits"), load_dataset("digits", split="test")
    assert tr.x.shape == (1438, 1, 8, 8) and te.x.shape == (359, 1, 8, 8)
    assert set(tr.y.unique().tolist()) == set(range(10))
    small = load_dataset("mnist_bundled", num_samples=100)
    assert small.x.shape[0] == 100


def test_synthetic_shapes_seeded_and_learnable() -> None:
    c = load_dataset("synthetic_cifar", num_samples=64, seed=3)
    assert c.x.shape == (64, 3, 32, 32) and c.input_shape == (3, 32, 32)
    assert torch.equal(c.x, load_dataset("synthetic_cifar", num_samples=64, seed=3).x)
    tr = load_dataset("synthetic_mnist", num_samples=2000, seed=0)
    te = load_dataset("synthetic_mnist", split="test", num_samples=500, seed=0)
    assert tr.x.shape == (2000, 1, 28, 28) and len(torch.unique(tr.y)) == 10
    # One teacher shared by both splits, inputs near a 16-dim subspace: PCA + logistic regression learns it.
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    pca = PCA(16, random_state=0).fit(tr.x.flatten(1).numpy())
    clf = LogisticRegression(max_iter=1000).fit(pca.transform(tr.x.flatten(1).numpy()), tr.y.numpy())
    acc = clf.score(pca.transform(te.x.flatten(1).numpy()), te.y.numpy())
    assert acc > 0.7


def test_random_crop_flip() -> None:
    x = torch.randn(6, 3, 8, 8)
    same = RandomCropFlip(padding=0, flip=False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    flip_only = RandomCropFlip(padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    for a, b in zip(flip_only, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    aug = RandomCropFlip()
    a1 = aug(x, torch.Generator().manual_seed(5))
    a2 = aug(x, torch.Generator().manual_seed(5))
    assert a1.shape == x.shape and torch.equal(a1, a2)
    assert not torch.equal(a1, aug(x, torch.Generator().manual_seed(6)))
    ds = load_dataset("synthetic_cifar", num_samples=16, augment=True)
    assert isinstance(ds.transform, RandomCropFlip)


# ---------------------------------------------------------------------------------------------- WikiText-2


def test_wikitext2_bundled_fallback_vocab_and_batches(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="coopsgd.data.datasets"):
        train = load_dataset("wikitext2", root=tmp_path)
    assert "train.txt not found" in caplog.text
    test = load_dataset("wikitext2", root=tmp_path, split="test")
    assert train.vocab is not None and train.vocab is test.vocab
    assert train.num_classes == len(train.vocab) and 10000 < train.num_classes < 40000
    assert train.x.dtype == torch.int64 and train.x.dim() == 1
    assert 200_000 < train.x.numel() < 230_000 and 230_000 < test.x.numel() < 260_000
    assert "<eos>" in train.vocab.stoi and "<unk>" in train.vocab.stoi
    first = (BUNDLED_DIR / "valid.txt").read_text(encoding="utf8").splitlines()[1].split() + ["<eos>"]
    assert train.vocab.decode(train.x[1 : 1 + len(first)]) == first  # line 0 is blank: one <eos>

    data = batchify(train.x, 20)
    assert data.shape == (train.x.numel() // 20, 20)
    assert torch.equal(data[:, 1], train.x[data.shape[0] : 2 * data.shape[0]])  # column = contiguous slice
    pairs = list(lm_batches(data, 35))
    assert len(pairs) == num_lm_batches(data, 35) == (data.shape[0] - 1) // 35
    for inp, tgt in pairs[:3] + pairs[-1:]:
        assert inp.shape == tgt.shape == (35, 20)
        assert torch.equal(inp[1:], tgt[:-1])
    assert torch.equal(pairs[0][0][0], data[0]) and torch.equal(pairs[1][0][0], data[35])
    assert torch.equal(next(lm_batches(data, 35, start=2))[0], pairs[2][0])

    windows = lm_windows(train.x, 35, vocab=train.vocab)
    assert windows.x.shape == windows.y.shape == ((train.x.numel() - 1) // 35, 35)
    assert torch.equal(windows.x[0, 1:], windows.y[0, :-1]) and windows.num_classes == len(train.vocab)
    shards = shard_tokens(train.x, 4)
    assert len(shards) == 4 and len({s.numel() for s in shards}) == 1


def test_wikitext2_full_root(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(" a b c \n b c d\n", encoding="utf8")
    (tmp_path / "valid.txt").write_text(" c d e\n", encoding="utf8")
    (tmp_path / "test.txt").write_text(" e f\n", encoding="utf8")
    train = load_dataset("wikitext2", root=tmp_path)
    assert train.vocab is not None
    assert train.vocab.itos == ("a", "b", "c", "<eos>", "d", "e", "f")
    assert train.vocab.decode(train.x) == ["a", "b", "c", "<eos>", "b", "c", "d", "<eos>"]
    valid = load_dataset("wikitext2", root=tmp_path, split="valid")
    assert valid.vocab.decode(valid.x) == ["c", "d", "e", "<eos>"]


# ---------------------------------------------------------------------------------------------- partitions


def test_iid_partition_covers_everything_once_with_balanced_sizes() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1003)
    parts = partition(labels, 7, "iid", seed=1)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1003))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(labels, 7, "iid", seed=1), strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(parts, partition(labels, 7, "iid", seed=2), strict=True)
    )
    hist = label_histograms(labels, parts, 10)
    assert hist.shape == (7, 10) and hist.sum(axis=1).tolist() == sizes


def test_dirichlet_skew_depends_on_beta() -> None:
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    for beta, check in ((0.05, lambda s: s > 0.6), (1e5, lambda s: s < 0.2)):
        parts = partition(torch.from_numpy(labels), 10, "dirichlet", beta=beta, seed=0)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
        assert min(p.size for p in parts) >= 1
        hist = label_histograms(labels, parts, 10)
        assert hist.sum(axis=1).tolist() == [p.size for p in parts]
        max_share = float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))
        assert check(max_share), (beta, max_share)


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_give_at_most_shards_per_worker_classes(shuffle: bool) -> None:
    labels = np.repeat(np.arange(10), 100)
    if shuffle:
        labels = labels[np.random.default_rng(1).permutation(labels.size)]
    parts = partition(labels, 10, "shards", shards_per_worker=2, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    hist = label_histograms(labels, parts, 10)
    assert (np.count_nonzero(hist, axis=1) <= 2).all()
    assert hist.sum(axis=1).tolist() == [100] * 10


# ---------------------------------------------------------------------------------------------- loader


def test_loader_drops_last_incomplete_batch_and_uses_own_shard() -> None:
    ds = _indexed(50)
    parts = partition(ds.y, 2, "iid", seed=0)  # 25 + 25
    loader = WorkerLoader(ds, parts, batch_size=4, seed=0)
    assert loader.steps_per_epoch == 6
    for w in range(2):
        batches = list(loader.batches(0, w))
        assert len(batches) == 6 and all(b[0].shape == (4, 1) and b[1].shape == (4,) for b in batches)
        seen = [i for b in batches for i in _ids(b)]
        assert len(set(seen)) == 24 and set(seen) <= set(parts[w].tolist())
        assert all(torch.equal(b[1], ds.y[torch.tensor(_ids(b))]) for b in batches)
    uneven = WorkerLoader(ds, [np.arange(0, 30), np.arange(30, 50)], batch_size=4)
    assert uneven.steps_per_epoch == 5  # min(30 // 4, 20 // 4)


def test_loader_reproducible_and_differs_across_workers_and_epochs() -> None:
    ds = _indexed(400)
    a = WorkerLoader.from_partition(ds, 4, 8, seed=7)
    b = WorkerLoader.from_partition(ds, 4, 8, seed=7)
    for epoch in (0, 3):
        for w in range(4):
            assert [_ids(x) for x in a.batches(epoch, w)] == [_ids(x) for x in b.batches(epoch, w)]
    order0 = a.order(0, 0)
    assert not torch.equal(order0, a.order(1, 0))  # new order each epoch
    assert torch.equal(torch.sort(order0).values, torch.sort(a.order(1, 0)).values)  # same shard
    assert set(a.order(0, 0).tolist()).isdisjoint(a.order(0, 1).tolist())
    c = WorkerLoader.from_partition(ds, 4, 8, seed=8)
    assert not torch.equal(a.order(0, 0), c.order(0, 0))
    # Same shard given to two workers: different orders because the worker id is in the seed.
    same = WorkerLoader(ds, [np.arange(100), np.arange(100)], 10)
    assert not torch.equal(same.order(0, 0), same.order(0, 1))


def test_loader_resumes_exactly_from_state_dict() -> None:
    ds = load_dataset("synthetic_cifar", num_samples=96, augment=True)
    a = WorkerLoader.from_partition(ds, 3, 8, seed=1)  # 32 per worker -> 4 steps per epoch
    assert a.steps_per_epoch == 4
    for _ in range(3):
        a.next_step()
    state = a.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    expected = [a.next_step() for _ in range(6)]  # crosses into epochs 1 and 2
    assert a.position == (2, 1)

    b = WorkerLoader.from_partition(ds, 3, 8, seed=1)
    b.load_state_dict(state)
    assert b.position == (0, 3)
    for want in expected:
        got = b.next_step()
        for (xw, yw), (xg, yg) in zip(want, got, strict=True):
            assert torch.equal(xw, xg) and torch.equal(yw, yg)
    # Augmentation is applied (batch differs from the raw samples) yet reproducible.
    x_aug, _ = a.batch(0, 0, 0)
    raw = WorkerLoader.from_partition(ds, 3, 8, seed=1, transform=None).batch(0, 0, 0)[0]
    assert not torch.equal(x_aug, raw) and torch.equal(x_aug, b.batch(0, 0, 0)[0])

    other = WorkerLoader.from_partition(ds, 3, 4, seed=1)
    with pytest.raises(ConfigError, match=r"^state_dict\['batch_size'\]="):
        other.load_state_dict(state)


def test_deterministic_batches() -> None:
    ds = _indexed(20)
    first = deterministic_batches(ds, 6, 7, seed=0)
    assert len(first) == 7 and all(b[0].shape == (6, 1) for b in first)
    assert [_ids(b) for b in first] == [_ids(b) for b in deterministic_batches(ds, 6, 7, seed=0)]
    assert len(set(i for b in first[:3] for i in _ids(b))) == 18  # one pass: no repeats


# ---------------------------------------------------------------------------------------------- errors


def test_default_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COOPSGD_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("COOPSGD_DATA")
    assert default_root() == Path("~/.cache/coopsgd").expanduser()


def test_torchvision_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    for name in ("cifar10", "mnist"):
        with pytest.raises(ConfigError) as info:
            load_dataset(name)
        msg = str(info.value)
        assert info.value.field == "dataset" and f"dataset={name!r}" in msg
        assert "pip install 'coopsgd[vision]'" in msg and "mnist_bundled" in msg


def test_torchvision_files_absent_gives_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with _raises("root"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(10), 10)
    ds = _indexed(40)
    cases = [
        ("dataset", lambda: load_dataset("imagenet")),
        ("split", lambda: load_dataset("mnist_bundled", split="validation")),
        ("num_samples", lambda: load_dataset("synthetic_mnist", num_samples=0)),
        ("augment", lambda: load_dataset("wikitext2", root=tmp_path, augment=True)),
        ("download", lambda: load_dataset("wikitext2", root=tmp_path, download=True)),
        ("split", lambda: load_dataset("wikitext2", root=tmp_path, split="valid")),
        ("workers", lambda: partition(labels, 0)),
        ("workers", lambda: partition(labels, 101)),
        ("scheme", lambda: partition(labels, 2, "random")),
        ("beta", lambda: partition(labels, 2, "dirichlet", beta=0.0)),
        ("beta", lambda: partition(labels, 2, "dirichlet", beta=-1)),
        ("beta", lambda: partition(labels[:10], 10, "dirichlet", beta=0.01)),  # a worker always left empty
        ("shards_per_worker", lambda: partition(labels, 10, "shards", shards_per_worker=11)),
        ("labels", lambda: partition(np.zeros((4, 2), dtype=int), 2)),
        ("batch_size", lambda: WorkerLoader(ds, partition(ds.y, 4), batch_size=11)),
        ("batch_size", lambda: WorkerLoader(ds, partition(ds.y, 4), batch_size=0)),
        ("worker", lambda: WorkerLoader(ds, partition(ds.y, 4), batch_size=2).order(0, 4)),
        ("batch_size", lambda: batchify(torch.arange(10), 6)),
        ("seq_len", lambda: lm_windows(torch.arange(10), 10)),
    ]
    assert len(cases) >= 8
    for field, call in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == field, (field, str(info.value))
        assert str(info.value).startswith(f"{field}="), str(info.value)
    with _raises("dataset") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)
