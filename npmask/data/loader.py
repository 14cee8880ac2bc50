"""Mini-batches for training and evaluation: shuffling, paper-style augmentation, normalisation.

    it = BatchIterator.from_domain(domain, "train", batch_size=32, seed=0)
    for epoch in range(epochs):
        for x, y in it.epoch(epoch):     # x float32 (B, C, h, w), y int64 (B,)
            ...

Determinism: the order *and* the augmentation of epoch ``e`` come from one generator seeded with
``(seed, e)`` (a NumPy SeedSequence), so they depend on nothing else: a run resumed at epoch ``e``
(or at batch ``k`` of it, via ``epoch(e, start_batch=k)``) sees exactly the batches the
uninterrupted run saw.

Augmentation (section 4 of the paper: "random crop and horizontal mirroring, no mirroring for
digits, signs, characters and textures") comes in two protocols:

* ``"pad_crop"`` (CIFAR-style, for the 32x32 synthetic benchmark): train pads every side with
  ``padding`` black pixels and crops a random window of the original size; test uses the image.
* ``"decathlon"`` (images stored with shorter side 72, see docs/design.md section 6): train crops a
  random 64x64 window, test the centre 64x64 window; gtsrb, omniglot and svhn use the full 72x72
  image for both (no cropping) and are never mirrored.

The horizontal flip (probability 1/2) is applied only when the domain's ``mirror`` flag allows it.

Speed: crop and flip of a whole batch are one fancy-indexing gather (the flip is folded into the
column indices), and normalisation is a fused multiply-add per channel written straight into the
NCHW output. With CuPy the uint8 crop is copied to the GPU (4x less traffic than float32) and
normalised there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_device
from .format import Domain

PROTOCOLS = ("pad_crop", "decathlon", "none")
# Decathlon domains fed as the full 72x72 image, for training and testing (docs/design.md section 3).
DECATHLON_FULL_VIEW = frozenset({"gtsrb", "omniglot", "svhn"})


@dataclass(frozen=True)
class Augmentation:
    """How one image (H, W, C) becomes one training/test view.

    crop:        output side length (square); None keeps H x W.
    padding:     black pixels added on every side before cropping (CIFAR: 4 for 32x32).
    random_crop: True draws the window offset uniformly (training); False takes the centre.
    mirror:      True flips horizontally with probability 1/2.
    """

    crop: int | None = None
    padding: int = 0
    random_crop: bool = False
    mirror: bool = False

    def output_size(self, image_size) -> tuple[int, int]:
        h, w = image_size
        if self.crop is None:
            return int(h), int(w)
        return int(self.crop), int(self.crop)

    def check(self, image_size) -> None:
        h, w = image_size
        ch, cw = self.output_size(image_size)
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if ch > h + 2 * self.padding or cw > w + 2 * self.padding:
            raise ValueError(f"crop {ch}x{cw} is larger than the (padded) image "
                             f"{h + 2 * self.padding}x{w + 2 * self.padding}")


def augmentation_for(domain: Domain, train: bool, protocol: str = "auto", *,
                     padding: int | None = None, crop: int = 64) -> Augmentation:
    """The paper's augmentation for ``domain`` in training (``train=True``) or test mode.

    protocol: "pad_crop", "decathlon", "none" or "auto". "auto" reads ``meta["extra"]["protocol"]``
    when the data set records one, else picks "decathlon" for 72x72 images and "pad_crop" otherwise.
    padding: for "pad_crop", default H // 8 (4 for 32x32, as for CIFAR). crop: for "decathlon".
    A domain is fed whole under "decathlon" when its name is gtsrb/omniglot/svhn or its
    ``meta["extra"]["full_view"]`` is true.
    """
    extra = domain.meta.get("extra", {}) or {}
    if protocol == "auto":
        protocol = extra.get("protocol") or ("decathlon" if tuple(domain.image_size) == (72, 72)
                                             else "pad_crop")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown augmentation protocol {protocol!r}; choose one of "
                         f"{', '.join(PROTOCOLS)} or 'auto'")
    if protocol == "none":
        return Augmentation()
    if protocol == "pad_crop":
        if not train:
            return Augmentation()
        pad = domain.image_size[0] // 8 if padding is None else padding
        return Augmentation(crop=None, padding=pad, random_crop=True, mirror=domain.mirror)
    # decathlon
    if domain.name in DECATHLON_FULL_VIEW or extra.get("full_view", False):
        return Augmentation()
    return Augmentation(crop=crop, random_crop=train, mirror=train and domain.mirror)


class BatchIterator:
    """Batches of (normalised float images NCHW, int64 labels) from uint8 NHWC arrays.

    Args:
        images: uint8 (N, H, W, C). labels: integer (N,).
        batch_size: images per batch. drop_last: drop the final incomplete batch.
        mean, std: per-channel statistics in [0, 1] units; output = (x / 255 - mean) / std.
        shuffle: a new random order every epoch (from (seed, epoch)).
        augmentation: an :class:`Augmentation` (default: none).
        seed: int; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
        backend: "numpy" or "cupy", where the batches are returned. dtype: float32 by default.

    Iterating over the object itself runs epoch 0, 1, 2, ... on successive loops; ``epoch(e)``
    runs a given epoch.
    """

    def __init__(self, images, labels, batch_size: int = 32, *, mean=None, std=None,
                 shuffle: bool = False, augmentation: Augmentation | None = None, seed: int = 0,
                 drop_last: bool = False, backend: str = "numpy", dtype=np.float32):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {labels.shape}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        c = images.shape[3]
        mean = np.zeros(c) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.ones(c) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(f"mean and std need one value per channel ({c}), got "
                             f"{mean.shape} and {std.shape}")
        std = np.maximum(std, 1e-8)  # a constant channel would otherwise divide by zero
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augmentation = augmentation or Augmentation()
        self.augmentation.check(images.shape[1:3])
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.backend = backend
        self.dtype = np.dtype(dtype)
        # x_norm = x_uint8 * scale - shift  with scale = 1 / (255 std), shift = mean / std
        self._scale = (1.0 / (255.0 * std)).astype(self.dtype)
        self._shift = (mean / std).astype(self.dtype)
        self._next_epoch = 0
        to_device(np.zeros(1), backend)  # fail now (BackendError) rather than at the first batch

    @classmethod
    def from_domain(cls, domain: Domain, split: str = "train", batch_size: int = 32, *,
                    train: bool | None = None, protocol: str = "auto", seed: int = 0,
                    drop_last: bool | None = None, backend: str = "numpy", **kwargs):
        """Iterator over one split of a loaded domain with the paper's settings.

        ``train`` (default: split == "train") switches on shuffling, random crops, flips where
        allowed, and drop_last (unless given); test mode keeps the order and uses centre views.
        """
        images, labels = domain.split(split)
        train = (split == "train") if train is None else train
        aug = augmentation_for(domain, train, protocol)
        return cls(images, labels, batch_size, mean=domain.mean, std=domain.std, shuffle=train,
                   augmentation=aug, seed=seed,
                   drop_last=train if drop_last is None else drop_last, backend=backend, **kwargs)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one output image."""
        h, w = self.augmentation.output_size(self.images.shape[1:3])
        return int(self.images.shape[3]), h, w

    def __iter__(self):
        e = self._next_epoch
        self._next_epoch += 1
        return self.epoch(e)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``for ... in iterator`` run epoch ``epoch`` (for resuming)."""
        self._next_epoch = int(epoch)

    def plan(self, epoch: int):
        """The random decisions of epoch ``epoch``: (order, crop rows, crop cols, flips).

        order (N,) is the sample order; oy, ox (N,) the top-left window corner in padded
        coordinates and flip (N,) bool, each for the i-th sample *in that order*. All drawn from
        ``default_rng([seed, epoch])`` in a fixed sequence, so they depend only on (seed, epoch).
        """
        n = self.num_samples
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        aug = self.augmentation
        h, w = self.images.shape[1:3]
        ch, cw = aug.output_size((h, w))
        hp, wp = h + 2 * aug.padding, w + 2 * aug.padding
        if aug.random_crop:
            oy = rng.integers(0, hp - ch + 1, size=n)
            ox = rng.integers(0, wp - cw + 1, size=n)
        else:  # centre window (rounded down, as torchvision's CenterCrop)
            oy = np.full(n, (hp - ch) // 2)
            ox = np.full(n, (wp - cw) // 2)
        flip = rng.random(n) < 0.5 if aug.mirror else np.zeros(n, dtype=bool)
        return order, oy, ox, flip

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield the batches ``(x, y)`` of epoch ``epoch``, starting at batch ``start_batch``.

        x: float (B, C, h, w) normalised images, y: int64 (B,), both on ``self.backend``.
        """
        order, oy, ox, flip = self.plan(epoch)
        n, b = self.num_samples, self.batch_size
        for k in range(int(start_batch), len(self)):
            sl = slice(k * b, min((k + 1) * b, n))
            idx = order[sl]
            crop = augment_batch(self.images[idx], oy[sl], ox[sl], flip[sl],
                                 self.augmentation.output_size(self.images.shape[1:3]),
                                 self.augmentation.padding)
            y = self.labels[idx]
            if self.backend != "numpy":
                crop = to_device(crop, self.backend)
                y = to_device(y, self.backend)
            yield normalise(crop, self._scale, self._shift, self.dtype), y


def augment_batch(images: np.ndarray, oy, ox, flip, out_size, padding: int = 0) -> np.ndarray:
    """Crop (and mirror) every image of a batch with one gather; uint8 in, uint8 out.

    images (B, H, W, C); oy, ox (B,) window corners in coordinates of the image padded by
    ``padding`` black pixels per side; flip (B,) bool; out_size (h, w). Returns (B, h, w, C) with

        out[i, r, c] = padded[i, oy[i] + r, ox[i] + (w - 1 - c if flip[i] else c)].
    """
    bsz, h, w, _ = images.shape
    ch, cw = out_size
    if padding == 0 and ch == h and cw == w and not np.any(flip):
        return images  # nothing to do (test mode, no crop)
    if padding:
        images = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = oy[:, None] + np.arange(ch)                                  # (B, h)
    cols = np.where(flip[:, None], cw - 1 - np.arange(cw), np.arange(cw)) + ox[:, None]  # (B, w)
    return images[np.arange(bsz)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalise(crop, scale, shift, dtype=np.float32):
    """uint8 (B, h, w, C) -> float (B, C, h, w): out[:, c] = crop[..., c] * scale[c] - shift[c].

    scale = 1 / (255 std) and shift = mean / std, i.e. (x / 255 - mean) / std. Runs on whichever
    backend holds ``crop``, writing each channel straight into the NCHW output.
    """
    xp = get_array_module(crop)
    dtype = np.dtype(dtype)
    bsz, h, w, c = crop.shape
    out = xp.empty((bsz, c, h, w), dtype=dtype)
    for k in range(c):
        xp.multiply(crop[..., k], dtype.type(scale[k]), out=out[:, k], dtype=dtype)
        out[:, k] -= dtype.type(shift[k])
    return out
