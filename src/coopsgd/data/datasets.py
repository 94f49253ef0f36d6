"""Data sets as pre-loaded tensors ([SPEC] §6 "Data").

Every loader returns a :class:`Dataset`: all samples in memory as two tensors, so that per-worker batches
are cheap tensor indexing (no ``DataLoader`` worker processes). Names accepted by :func:`load_dataset`:

``"mnist_bundled"`` (default)
    The MNIST t10k files shipped inside the package (``coopsgd/data/bundled``), parsed from IDX with numpy.
    Offline convention: a seeded permutation splits the 10,000 images into 8,000 train / 2,000 test.
``"digits"``
    scikit-learn's bundled ``load_digits`` (1,797 8x8 images), seeded 80/20 split.
``"mnist"``, ``"cifar10"``
    The full data sets through torchvision (optional extra ``coopsgd[vision]``); downloaded into ``root``
    (default ``~/.cache/coopsgd``) only when ``download=True``.
``"synthetic_mnist"``, ``"synthetic_cifar"``
    Inputs of the real shapes (1x28x28, 3x32x32) near a random 16-dimensional subspace, labelled by a
    fixed random linear teacher on the latent factors, so the task is learnable from a few thousand
    samples; seeded, size configurable.
``"wikitext2"``
    WikiText-2 token files (``train.txt``/``valid.txt``/``test.txt`` under ``root``). Without ``train.txt``
    the bundled ``valid.txt`` is used for training and the bundled ``test.txt`` for testing (a warning is
    logged). Helpers :func:`batchify`, :func:`lm_batches` and :func:`lm_windows` turn the token stream into
    language-model batches.

Images are float32, normalised per channel with the usual constants; labels are int64.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.data._seed import mix_seed
from coopsgd.errors import ConfigError, check_choice, check_int

__all__ = [
    "DATASETS",
    "BUNDLED_DIR",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Dataset",
    "Vocabulary",
    "RandomCropFlip",
    "load_dataset",
    "read_idx",
    "batchify",
    "lm_batches",
    "num_lm_batches",
    "lm_windows",
    "shard_tokens",
    "default_root",
]

logger = logging.getLogger(__name__)
#: The WikiText-2 directories whose missing train.txt was already reported (the fallback is said once).
_FALLBACK_SAID: set[str] = set()

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = (
    "mnist_bundled",
    "digits",
    "mnist",
    "cifar10",
    "synthetic_mnist",
    "synthetic_cifar",
    "wikitext2",
)

#: Directory of the data files shipped inside the package.
BUNDLED_DIR: Path = Path(__file__).resolve().parent / "bundled"

MNIST_MEAN: float = 0.1307
MNIST_STD: float = 0.3081
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)

_MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
_MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
_MNIST_BUNDLED_TRAIN = 8000
_SPLITS = ("train", "test")
_LM_SPLITS = ("train", "valid", "test")
_SYNTHETIC_SHAPES: dict[str, tuple[int, int, int]] = {
    "synthetic_mnist": (1, 28, 28),
    "synthetic_cifar": (3, 32, 32),
}
_SYNTHETIC_DEFAULT_SIZE = {"train": 2048, "test": 512}
_SYNTHETIC_LATENT = 16
_SYNTHETIC_NOISE = 0.5

#: A per-batch transform: ``(x, generator) -> x`` on a batch tensor (B, C, H, W).
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]


def default_root() -> Path:
    """Default download/cache directory: ``$COOPSGD_DATA`` if set, else ``~/.cache/coopsgd``."""
    env = os.environ.get("COOPSGD_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/coopsgd").expanduser()


# ----------------------------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id map of a language-model corpus; ids follow first appearance (train, valid, test)."""

    itos: tuple[str, ...]
    stoi: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def from_words(cls, words: Sequence[str]) -> Vocabulary:
        """Build a vocabulary from an iterable of words, in order of first appearance."""
        stoi: dict[str, int] = {}
        for w in words:
            if w not in stoi:
                stoi[w] = len(stoi)
        return cls(tuple(stoi), stoi)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str]) -> Tensor:
        """Token ids (int64) of ``words``; an unknown word raises ``KeyError`` (WikiText has ``<unk>``)."""
        return torch.tensor([self.stoi[w] for w in words], dtype=torch.int64)

    def decode(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Words of the token ids ``ids``."""
        return [self.itos[int(i)] for i in ids]


@dataclass(frozen=True, eq=False)
class Dataset:
    """All samples of one split, pre-loaded.

    Attributes:
        x: inputs, shape ``(N, *input_shape)`` (float32 images) or ``(N,)`` int64 token ids for a
            language-model stream.
        y: int64 labels of shape ``(N,)``; for a token stream ``y`` is the same stream as ``x`` (the
            targets are ``x`` shifted by one and are built by :func:`lm_batches` / :func:`lm_windows`).
        num_classes: number of classes (vocabulary size for a language model).
        name: data set name as given to :func:`load_dataset`, plus the split (``"mnist_bundled/train"``).
        input_shape: shape of one sample, without the batch dimension.
        transform: optional per-batch augmentation ``(x, generator) -> x`` that :class:`WorkerLoader`
            applies to each batch with a seeded generator (e.g. :class:`RandomCropFlip`).
        vocab: the vocabulary of a language-model corpus, else ``None``.

    Indexing (``ds[i] -> (x[i], y[i])``) and ``len`` make it usable as a ``torch.utils.data.Dataset``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    input_shape: tuple[int, ...]
    transform: BatchTransform | None = None
    vocab: Vocabulary | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``, as in ``torch.utils.data.TensorDataset``."""
        return self.x, self.y


# ----------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class RandomCropFlip:
    """Random crop after zero padding plus random horizontal flip, on a batch tensor (B, C, H, W).

    The classic CIFAR-10 augmentation (pad 4, crop back to H x W, flip with probability 1/2), written on
    tensors so that it runs per batch with an explicit, seeded ``torch.Generator``: the same generator
    state gives the same batch, which keeps resumed runs bit-exact.
    """

    padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        check_int("padding", self.padding, minimum=0)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ConfigError.invalid("x.shape", tuple(x.shape), "RandomCropFlip needs a batch (B, C, H, W)")
        b, c, h, w = x.shape
        p = self.padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B,1,H,1)
            cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B,1,1,W)
            bi = torch.arange(b)[:, None, None, None]
            ci = torch.arange(c)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            mask = torch.rand(b, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


# ----------------------------------------------------------------------------------------------- public entry


def load_dataset(
    name: str = "mnist_bundled",
    *,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = False,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = False,
) -> Dataset:
    """Load one split of a data set as pre-loaded tensors.

    Args:
        name: one of :data:`DATASETS` (case-insensitive, ``-`` accepted for ``_``).
        root: directory of downloaded files (torchvision data sets, WikiText-2 token files); default
            :func:`default_root` (``~/.cache/coopsgd``, or ``$COOPSGD_DATA``).
        split: ``"train"`` or ``"test"`` (``"valid"`` too for ``wikitext2`` with a full ``root``).
        download: let torchvision download missing files (never done implicitly).
        seed: seed of the train/test split (``mnist_bundled``, ``digits``) and of synthetic data.
        num_samples: size of the split for synthetic data sets (default 2048 train / 512 test);
            for the other data sets, keep only the first ``num_samples`` samples (quick runs).
        augment: attach :class:`RandomCropFlip` as the per-batch transform (train split of image data sets).

    Raises:
        ConfigError: unknown name or split, missing optional dependency (torchvision), missing files.
    """
    key = check_choice("dataset", name, DATASETS)
    seed = check_int("seed", seed, minimum=0)
    if num_samples is not None:
        num_samples = check_int("num_samples", num_samples, minimum=1)
    if not isinstance(download, bool):
        raise ConfigError.invalid("download", download, "must be true or false")
    if key == "wikitext2":
        ds = _load_wikitext2(root, check_choice("split", split, _LM_SPLITS), download)
    else:
        split = check_choice("split", split, _SPLITS)
        if key == "mnist_bundled":
            ds = _load_mnist_bundled(split, seed)
        elif key == "digits":
            ds = _load_digits(split, seed)
        elif key in _SYNTHETIC_SHAPES:
            ds = _load_synthetic(key, split, seed, num_samples)
            num_samples = None
        else:
            ds = _load_torchvision(key, root, split, download)
    if num_samples is not None and num_samples < len(ds):
        ds = Dataset(
            ds.x[:num_samples],
            ds.y[:num_samples],
            ds.num_classes,
            ds.name,
            ds.input_shape,
            ds.transform,
            ds.vocab,
        )
    if augment:
        if len(ds.input_shape) != 3:
            raise ConfigError.invalid(
                "augment", augment, f"only image data sets can be augmented, not {key!r}"
            )
        ds = Dataset(ds.x, ds.y, ds.num_classes, ds.name, ds.input_shape, RandomCropFlip(), ds.vocab)
    return ds



def _split_indices(n: int, n_train: int, split: str, seed: int) -> Tensor:
    """Seeded disjoint train/test index split of ``range(n)``: first ``n_train`` of a permutation = train."""
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return torch.sort(idx).values


# ----------------------------------------------------------------------------------------------- MNIST (bundled)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array (uint8 data only).

    Format: 2 zero bytes, a type byte (0x08 = uint8), the number of dimensions, then each dimension as
    a big-endian uint32, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ConfigError.invalid("path", str(path), "is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ConfigError.invalid("path", str(path), f"IDX type 0x{raw[2]:02x} is not supported (only uint8)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count:
        raise ConfigError.invalid(
            "path", str(path), f"IDX payload has {len(raw) - offset} bytes, header says {count}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=1)
def _mnist_bundled_raw() -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(BUNDLED_DIR / _MNIST_IMAGES)
    labels = read_idx(BUNDLED_DIR / _MNIST_LABELS)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _normalise_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1] -> (x - mean) / std per channel."""
    x = images.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _load_mnist_bundled(split: str, seed: int) -> Dataset:
    images, labels = _mnist_bundled_raw()
    idx = _split_indices(len(labels), _MNIST_BUNDLED_TRAIN, split, seed)
    x = _normalise_images(torch.from_numpy(images.copy())[idx].unsqueeze(1), (MNIST_MEAN,), (MNIST_STD,))
    y = torch.from_numpy(labels.astype(np.int64))[idx]
    return Dataset(x, y, 10, f"mnist_bundled/{split}", (1, 28, 28))


# ----------------------------------------------------------------------------------------------- digits


def _load_digits(split: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [0, 1]
    # Standardise with the statistics of the whole (fixed) data set, like the MNIST constants.
    mean, std = float(images.mean()), float(images.std())
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = len(labels)
    idx = _split_indices(n, int(round(0.8 * n)), split, seed)
    x = (images[idx] - mean) / std
    return Dataset(x.contiguous(), labels[idx], 10, f"digits/{split}", (1, 8, 8))


# ----------------------------------------------------------------------------------------------- synthetic


def _load_synthetic(key: str, split: str, seed: int, num_samples: int | None) -> Dataset:
    """Low-dimensional structure in a real-shaped tensor, labelled by a linear teacher.

    ``z ~ N(0, I_k)`` with ``k = 16`` latent factors, ``x = z A / sqrt(k) + 0.5 * noise`` reshaped to the
    image shape, label ``argmax(z W)``. The teacher (``A``, ``W``) depends on ``seed`` only, so train and
    test share it; the samples depend on the split too. Because the inputs live near a 16-dimensional
    subspace, a few thousand samples suffice to learn the task (pure Gaussian inputs of 3,072 dims with
    a linear teacher would need far more samples than a quick run has).
    """
    shape = _SYNTHETIC_SHAPES[key]
    n = num_samples if num_samples is not None else _SYNTHETIC_DEFAULT_SIZE[split]
    d = int(np.prod(shape))
    classes, k = 10, _SYNTHETIC_LATENT
    teacher_gen = torch.Generator().manual_seed(mix_seed(seed, 0))
    mixing = torch.randn(k, d, generator=teacher_gen) / k**0.5
    w = torch.randn(k, classes, generator=teacher_gen)
    sample_gen = torch.Generator().manual_seed(mix_seed(seed, 1 if split == "train" else 2))
    z = torch.randn(n, k, generator=sample_gen)
    x = z @ mixing + _SYNTHETIC_NOISE * torch.randn(n, d, generator=sample_gen)
    y = torch.argmax(z @ w, dim=1)
    return Dataset(x.reshape(n, *shape), y, classes, f"{key}/{split}", shape)


# ----------------------------------------------------------------------------------------------- torchvision


def _load_torchvision(key: str, root: str | os.PathLike[str] | None, split: str, download: bool) -> Dataset:
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets as tvd
    except ImportError:
        raise ConfigError(
            f"dataset={key!r} needs torchvision: pip install 'coopsgd[vision]' (or pip install torchvision), "
            "or use dataset='mnist_bundled' / 'synthetic_cifar' / 'digits', which work offline",
            field="dataset",
            value=key,
        ) from None
    base = Path(root).expanduser() if root is not None else default_root()
    cls = tvd.MNIST if key == "mnist" else tvd.CIFAR10
    try:
        raw = cls(str(base), train=(split == "train"), download=download)
    except (
        RuntimeError
    ) as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        hint = "pass download=True (needs internet)" if not download else "the download failed"
        raise ConfigError(
            f"dataset={key!r} files were not found under root={str(base)!r}: {hint}; "
            f"or use dataset='mnist_bundled' offline ({exc})",
            field="root",
            value=str(base),
        ) from None
    if key == "mnist":
        images = torch.as_tensor(raw.data).unsqueeze(1)
        x = _normalise_images(images, (MNIST_MEAN,), (MNIST_STD,))
        shape: tuple[int, ...] = (1, 28, 28)
    else:
        images = torch.from_numpy(np.ascontiguousarray(raw.data)).permute(0, 3, 1, 2)
        x = _normalise_images(images, CIFAR10_MEAN, CIFAR10_STD).contiguous()
        shape = (3, 32, 32)
    y = torch.as_tensor(raw.targets, dtype=torch.int64)
    return Dataset(x, y, 10, f"{key}/{split}", shape)


# ----------------------------------------------------------------------------------------------- WikiText-2


def _read_words(path: Path) -> list[str]:
    words: list[str] = []
    with open(path, encoding="utf8") as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    return words


@functools.lru_cache(maxsize=4)
def _corpus(paths: tuple[str, ...]) -> tuple[Vocabulary, tuple[Tensor, ...]]:
    """Vocabulary over all files (in order) and the token ids of each file."""
    streams = [_read_words(Path(p)) for p in paths]
    vocab = Vocabulary.from_words([w for s in streams for w in s])
    return vocab, tuple(vocab.encode(s) for s in streams)


def _load_wikitext2(root: str | os.PathLike[str] | None, split: str, download: bool) -> Dataset:
    base = Path(root).expanduser() if root is not None else default_root() / "wikitext-2"
    full = [base / f"{s}.txt" for s in _LM_SPLITS]
    if all(p.is_file() for p in full):
        files = {s: str(p) for s, p in zip(_LM_SPLITS, full, strict=True)}
        order = tuple(files[s] for s in _LM_SPLITS)
    else:
        if download:
            raise ConfigError.invalid(
                "download",
                download,
                f"coopsgd does not download WikiText-2; put train.txt, valid.txt and test.txt under root={str(base)!r}",
            )
        if split == "valid":
            raise ConfigError.invalid(
                "split",
                split,
                f"no WikiText-2 train.txt under root={str(base)!r}: the bundled fallback trains on valid.txt, "
                "so only split='train' or 'test' is available",
            )
        if str(base) not in _FALLBACK_SAID:  # once per directory and process, not once per run and split
            _FALLBACK_SAID.add(str(base))
            logger.warning(
                "WikiText-2 train.txt not found under %s: training on the bundled valid.txt and testing on the "
                "bundled test.txt (the offline convention)",
                base,
            )
        files = {"train": str(BUNDLED_DIR / "valid.txt"), "test": str(BUNDLED_DIR / "test.txt")}
        order = (files["train"], files["test"])
    vocab, streams = _corpus(order)
    tokens = streams[order.index(files[split])]
    return Dataset(tokens, tokens, len(vocab), f"wikitext2/{split}", (), None, vocab)


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """Arrange a 1-D token stream into ``batch_size`` columns: shape ``(T, B)``, ``T = len // B``.

    Column ``b`` holds the contiguous slice ``tokens[b*T:(b+1)*T]``; the tail that does not fill a full
    row is dropped (as in the PyTorch word-language-model example).
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if tokens.dim() != 1:
        raise ConfigError.invalid("tokens.shape", tuple(tokens.shape), "batchify needs a 1-D token stream")
    t = tokens.numel() // batch_size
    if t < 2:
        raise ConfigError.invalid(
            "batch_size", batch_size, f"must leave at least 2 tokens per column ({tokens.numel()} tokens)"
        )
    return tokens[: t * batch_size].view(batch_size, t).t().contiguous()


def num_lm_batches(data: Tensor, seq_len: int, *, drop_last: bool = True) -> int:
    """Number of ``(input, target)`` pairs :func:`lm_batches` yields for ``data`` of shape ``(T, B)``."""
    seq_len = check_int("seq_len", seq_len, minimum=1)
    usable = data.shape[0] - 1
    return usable // seq_len if drop_last else -(-usable // seq_len)


def lm_batches(
    data: Tensor, seq_len: int, *, start: int = 0, drop_last: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(input, target)`` pairs of shape ``(seq_len, B)`` from batchified ``data`` ``(T, B)``.

    ``target`` is ``input`` shifted by one token along time. Chunks are consecutive and non-overlapping;
    the last incomplete chunk is dropped unless ``drop_last=False``. ``start`` skips the first ``start``
    chunks (resume).
    """
    if data.dim() != 2:
        raise ConfigError.invalid("data.shape", tuple(data.shape), "lm_batches needs batchified data (T, B)")
    n = num_lm_batches(data, seq_len, drop_last=drop_last)
    start = check_int("start", start, minimum=0)
    for k in range(start, n):
        i = k * seq_len
        length = min(seq_len, data.shape[0] - 1 - i)
        yield data[i : i + length], data[i + 1 : i + 1 + length]


def lm_windows(
    tokens: Tensor, seq_len: int, *, name: str = "lm_windows", vocab: Vocabulary | None = None
) -> Dataset:
    """Cut a token stream into non-overlapping windows: a :class:`Dataset` of ``(N, seq_len)`` inputs and targets.

    Sample ``i`` is ``tokens[i*L : i*L+L]`` with target ``tokens[i*L+1 : i*L+L+1]``. With this form a
    language model trains through :class:`~coopsgd.data.loader.WorkerLoader` like any classifier (each
    worker its own windows, shuffled per epoch, batches ``(B, seq_len)``; use the LSTM model with
    ``batch_first=True``). The model starts every window from a zero state.
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if tokens.dim() != 1:
        raise ConfigError.invalid("tokens.shape", tuple(tokens.shape), "lm_windows needs a 1-D token stream")
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ConfigError.invalid("seq_len", seq_len, f"must be < number of tokens ({tokens.numel()})")
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    num_classes = len(vocab) if vocab is not None else int(tokens.max()) + 1
    return Dataset(x, y, num_classes, name, (seq_len,), None, vocab)


def shard_tokens(tokens: Tensor, workers: int) -> list[Tensor]:
    """Split a 1-D token stream into ``workers`` contiguous pieces of equal length (tail dropped)."""
    workers = check_int("workers", workers, minimum=1)
    per = tokens.numel() // workers
    if per < 2:
        raise ConfigError.invalid(
            "workers", workers, f"must be <= {tokens.numel() // 2} for {tokens.numel()} tokens"
        )
    return [tokens[i * per : (i + 1) * per] for i in range(workers)]
