"""Loading a domain folder into training and test batch iterators with a run's settings."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.format import load_domain
from ..data.loader import BatchIterator, augmentation_for
from .errors import ConfigError

EVAL_BATCH = 200  # test batches: BN uses running statistics, so the size changes no number


def load(root, name: str):
    """Load domain ``name`` under ``root`` (DataFormatError names the file and the problem)."""
    return load_domain(Path(root) / name)


def subset(images, labels, n: int | None, seed: int):
    """A fixed random subset of ``n`` examples (all when n is None or >= the size), sorted order."""
    if n is None or n >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng([seed, 7919]).permutation(len(labels))[:n])
    return images[idx], labels[idx]


TRAIN_SPLITS = ("train", "train+val")


def training_split(domain, train_split: str = "train"):
    """``(images, labels)`` to train on: the train split, or train and val together ("train+val").

    The paper's final Decathlon runs train on train + val (the val split serves to choose the
    schedule beforehand); a domain without a val split is a clear error.
    """
    if train_split == "train":
        return domain.train
    if train_split != "train+val":
        raise ConfigError(f"--train-split must be one of {', '.join(TRAIN_SPLITS)}, got {train_split!r}")
    if domain.val is None:
        raise ConfigError(f"--train-split train+val: domain {domain.name!r} has no val split")
    (xt, yt), (xv, yv) = domain.train, domain.val
    return np.concatenate([xt, xv]), np.concatenate([yt, yv])


def make_iterators(domain, *, batch_size: int, seed: int, backend: str, dtype, protocol: str,
                   max_train: int | None = None, max_test: int | None = None,
                   input_size: int | None = None, train_split: str = "train"):
    """(train iterator, test iterator) for a loaded domain.

    Training: shuffled, augmented as in the paper (crop, mirroring where the domain allows it),
    drop_last, on ``train_split`` ("train" or "train+val"). Test: in order, centre view;
    ``max_test`` keeps the first images (deterministic). The network input must be ``input_size``
    pixels square (a mismatch is a clear error), except for a domain the protocol feeds whole
    (gtsrb/omniglot/svhn at 72 under "decathlon"; the network pools globally).
    """
    train_images, train_labels = subset(*training_split(domain, train_split), max_train, seed)
    aug_train = _aug(domain, True, protocol, input_size)
    aug_test = _aug(domain, False, protocol, input_size)
    train = BatchIterator(train_images, train_labels, batch_size, mean=domain.mean, std=domain.std,
                          shuffle=True, augmentation=aug_train, seed=seed, drop_last=True,
                          backend=backend, dtype=dtype)
    test_images, test_labels = domain.test
    if max_test is not None:
        test_images, test_labels = test_images[:max_test], test_labels[:max_test]
    test = BatchIterator(test_images, test_labels, EVAL_BATCH, mean=domain.mean, std=domain.std,
                         shuffle=False, augmentation=aug_test, seed=seed, drop_last=False,
                         backend=backend, dtype=dtype)
    if input_size is not None and not aug_train.full_view:
        for it, split in ((train, "train"), (test, "test")):
            c, h, w = it.output_shape
            if (h, w) != (input_size, input_size):
                raise ConfigError(
                    f"domain {domain.name!r} gives {h}x{w} {split} images but the network takes "
                    f"{input_size}x{input_size}; convert the data to that size or pick another "
                    "--model/--benchmark")
    if len(train) == 0:
        raise ConfigError(f"domain {domain.name!r} has {train.num_samples} training images, fewer "
                          f"than one batch of {batch_size}")
    return train, test


def _aug(domain, train: bool, protocol: str, input_size: int | None = None):
    return augmentation_for(domain, train, protocol, input_size=input_size)
