"""Data: pre-loaded data sets, partitions across workers and per-worker batch loaders ([SPEC] §6).

>>> from coopsgd.data import load_dataset, WorkerLoader
>>> train = load_dataset("mnist_bundled", split="train")          # 8,000 bundled MNIST images
>>> loader = WorkerLoader.from_partition(train, workers=4, batch_size=32, scheme="dirichlet", beta=0.5)
>>> [(x.shape, y.shape) for x, y in loader.next_step()][0]
(torch.Size([32, 1, 28, 28]), torch.Size([32]))
"""

from coopsgd.data.datasets import (
    BUNDLED_DIR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    MNIST_MEAN,
    MNIST_STD,
    BatchTransform,
    Dataset,
    RandomCropFlip,
    Vocabulary,
    batchify,
    default_root,
    lm_batches,
    lm_windows,
    load_dataset,
    num_lm_batches,
    read_idx,
    shard_tokens,
)
from coopsgd.data.loader import WorkerLoader, deterministic_batches
from coopsgd.data.partition import DIRICHLET_MAX_DRAWS, SCHEMES, label_histograms, partition

__all__ = [
    "BUNDLED_DIR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "DIRICHLET_MAX_DRAWS",
    "MNIST_MEAN",
    "MNIST_STD",
    "SCHEMES",
    "BatchTransform",
    "Dataset",
    "RandomCropFlip",
    "Vocabulary",
    "WorkerLoader",
    "batchify",
    "default_root",
    "deterministic_batches",
    "label_histograms",
    "lm_batches",
    "lm_windows",
    "load_dataset",
    "num_lm_batches",
    "partition",
    "read_idx",
    "shard_tokens",
]
