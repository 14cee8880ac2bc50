"""Mini-batches for training and evaluation: shuffling, paper-style augmentation, normalisation.

    it = BatchIterator.from_domain(domain, "train", batch_size=32, seed=0)
    for epoch in range(epochs):
        for x, y in it.epoch(epoch):     # x float32 (B, C, h, w), y int64 (B,)
            ...

Determinism: the order *and* the augmentation of epoch ``e`` come from one generator seeded with
``(seed, e)`` (a NumPy SeedSequence), so they depend on nothing else: a run resumed at epoch ``e``
(or at batch ``k`` of it, via ``epoch(e, start_batch=k)``) sees exactly the batches the
uninterrupted run saw.

Augmentation (section 4 of the paper: random crops and horizontal mirroring, except for digits,
signs, characters and textures) comes in these protocols:

* ``"pad_crop"`` (CIFAR-style, for the 32x32 synthetic benchmark): train pads every side with
  ``padding`` black pixels and crops a random window of the original size; test uses the image.
* ``"decathlon"`` (images stored with shorter side 72, see docs/design.md section 6): train crops a random 64x64 window, test the centre
  64x64 window; gtsrb, omniglot and svhn are fed whole (72x72) for both, as the residual-adapters
  loader the paper follows does (the default: the published fine-tuning baseline that defines
  Emax was trained that way).
* ``"decathlon_crop64"``: the paper's text, every domain cropped to 64 (random in training, centre
  in test), gtsrb, omniglot and svhn included.
* ``"imagenet"`` (ImageNet-to-Sketch, Piggyback's loader): train takes a random-size crop (area
  8-100% of the image, aspect ratio 3/4-4/3, as torchvision's RandomResizedCrop) resized to the
  input side and mirrors it; test resizes the image to 256/224 of the input side and takes the
  centre (resize 256, centre 224 at 224 pixels).

Mirroring (a horizontal flip with probability 1/2 in training) follows the domain's ``mirror``
flag, and under the Decathlon protocols never applies to SVHN, Omniglot, GTSRB and DTD (the paper:
"except for the datasets with digits, signs and textures"), whatever their flag says.

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

PROTOCOLS = ("pad_crop", "decathlon", "decathlon_crop64", "imagenet", "none")
# Decathlon domains fed as the full 72x72 image under "decathlon" (the residual-adapters loader;
# docs/design.md section 3).
DECATHLON_FULL_VIEW = frozenset({"gtsrb", "omniglot", "svhn"})
# Decathlon domains never mirrored (paper, section 4: digits, signs, characters and textures).
DECATHLON_NO_MIRROR = frozenset({"svhn", "omniglot", "gtsrb", "dtd"})
# Test view of "imagenet": resize to 256, centre 224 (scaled to the input side).
IMAGENET_TEST_RESIZE = 256 / 224
# Random-size crop of "imagenet" (torchvision RandomResizedCrop defaults, as Piggyback uses).
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augmentation:
    """How one image (H, W, C) becomes one training/test view.

    crop:        output side length (square); None keeps H x W.
    padding:     black pixels added on every side before cropping (CIFAR: 4 for 32x32).
    random_crop: True draws the window offset uniformly (training); False takes the centre.
    mirror:      True flips horizontally with probability 1/2.
    full_view:   the protocol feeds this domain whole although the network's input side differs
                 (gtsrb/omniglot/svhn at 72 under "decathlon"); checked by the caller.
    resize:      output side when the crop is resized (``"imagenet"``): with ``random_crop`` a
                 random-size window of any shape, else the centre square of side
                 round(min(H, W) / (256/224)); either is resized (bilinear) to ``resize`` pixels.
    """

    crop: int | None = None
    padding: int = 0
    random_crop: bool = False
    mirror: bool = False
    full_view: bool = False
    resize: int | None = None

    def output_size(self, image_size) -> tuple[int, int]:
        h, w = image_size
        if self.resize is not None:
            return int(self.resize), int(self.resize)
        if self.crop is None:
            return int(h), int(w)
        return int(self.crop), int(self.crop)

    def check(self, image_size) -> tuple[int, int]:
        """The output size for ``image_size`` images; ValueError when the view cannot be cut."""
        h, w = image_size
        ch, cw = self.output_size(image_size)
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if self.resize is not None:
            if self.resize < 1 or self.padding:
                raise ValueError(f"a resized crop needs a side >= 1 and no padding, got "
                                 f"{self.resize} and {self.padding}")
            return ch, cw
        if ch > h + 2 * self.padding or cw > w + 2 * self.padding:
            raise ValueError(f"crop {ch}x{cw} is larger than the (padded) image "
                             f"{h + 2 * self.padding}x{w + 2 * self.padding}")
        return ch, cw


def augmentation_for(domain: Domain, train: bool, protocol: str = "auto", *,
                     padding: int | None = None, crop: int = 64,
                     input_size: int | None = None) -> Augmentation:
    """The paper's augmentation for ``domain`` in training (``train=True``) or test mode.

    protocol: one of :data:`PROTOCOLS` or "auto". "auto" reads ``meta["extra"]["protocol"]``
    when the data set records one, else picks "decathlon" for 72x72 images and "pad_crop" otherwise.
    padding: for "pad_crop", default H // 8 (4 for 32x32, as for CIFAR). crop: for the Decathlon
    protocols. input_size: the output side of "imagenet" (default 224).
    A domain is fed whole under "decathlon" when its name is gtsrb/omniglot/svhn or its
    ``meta["extra"]["full_view"]`` is true; under "decathlon_crop64" every domain is cropped.
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
    if protocol == "imagenet":
        side = 224 if input_size is None else int(input_size)
        return Augmentation(random_crop=train, mirror=train and domain.mirror, resize=side)
    # decathlon, decathlon_crop64
    mirror = train and domain.mirror and domain.name not in DECATHLON_NO_MIRROR
    if protocol == "decathlon" and (domain.name in DECATHLON_FULL_VIEW or extra.get("full_view", False)):
        return Augmentation(full_view=True)
    return Augmentation(crop=crop, random_crop=train, mirror=mirror)


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
                    drop_last: bool | None = None, backend: str = "numpy",
                    input_size: int | None = None, **kwargs):
        """Iterator over one split of a loaded domain with the paper's settings.

        ``train`` (default: split == "train") switches on shuffling, random crops, flips where
        allowed, and drop_last (unless given); test mode keeps the order and uses centre views.
        """
        images, labels = domain.split(split)
        train = (split == "train") if train is None else train
        aug = augmentation_for(domain, train, protocol, input_size=input_size)
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

    def plan_resized(self, epoch: int):
        """The random decisions of an epoch under a resized crop: (order, oy, ox, h, w, flip).

        Training: a window of area U(8%, 100%) of the image and aspect ratio log-uniform in
        [3/4, 4/3] (up to 10 draws per image, the first that fits; else the whole image), at a
        uniform position, as torchvision's RandomResizedCrop. Test: the centre square of side
        round(min(H, W) / (256/224)). All from ``default_rng([seed, epoch])``.
        """
        n = self.num_samples
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        aug = self.augmentation
        H, W = self.images.shape[1:3]
        if aug.random_crop:
            tries = 10
            area = H * W * rng.uniform(*RESIZED_CROP_SCALE, size=(n, tries))
            ratio = np.exp(rng.uniform(*np.log(RESIZED_CROP_RATIO), size=(n, tries)))
            ww = np.rint(np.sqrt(area * ratio)).astype(np.int64)
            hh = np.rint(np.sqrt(area / ratio)).astype(np.int64)
            fits = (ww >= 1) & (hh >= 1) & (ww <= W) & (hh <= H)
            first = np.argmax(fits, axis=1)
            ok = fits[np.arange(n), first]
            hh = np.where(ok, hh[np.arange(n), first], H)
            ww = np.where(ok, ww[np.arange(n), first], W)
            oy = (rng.random(n) * (H - hh + 1)).astype(np.int64)
            ox = (rng.random(n) * (W - ww + 1)).astype(np.int64)
        else:
            side = max(1, int(round(min(H, W) / IMAGENET_TEST_RESIZE)))
            hh = np.full(n, side)
            ww = np.full(n, side)
            oy = np.full(n, (H - side) // 2)
            ox = np.full(n, (W - side) // 2)
        flip = rng.random(n) < 0.5 if aug.mirror else np.zeros(n, dtype=bool)
        return order, oy, ox, hh, ww, flip

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield the batches ``(x, y)`` of epoch ``epoch``, starting at batch ``start_batch``.

        x: float (B, C, h, w) normalised images, y: int64 (B,), both on ``self.backend``.
        """
        if self.augmentation.resize is not None:
            order, oy, ox, hh, ww, flip = self.plan_resized(epoch)
        else:
            order, oy, ox, flip = self.plan(epoch)
        n, b = self.num_samples, self.batch_size
        for k in range(int(start_batch), len(self)):
            sl = slice(k * b, min((k + 1) * b, n))
            idx = order[sl]
            if self.augmentation.resize is not None:
                crop = resized_crop_batch(self.images[idx], oy[sl], ox[sl], hh[sl], ww[sl],
                                          flip[sl], self.augmentation.resize)
            else:
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


def resized_crop_batch(images: np.ndarray, oy, ox, hh, ww, flip, size: int) -> np.ndarray:
    """Crop window (oy, ox, hh, ww) of every image, resize it to size x size, mirror where ``flip``.

    Bilinear interpolation with half-pixel centres (as PIL/torchvision resize without antialias);
    uint8 in, uint8 out, (B, size, size, C). A window already of side ``size`` is copied exactly.
    """
    bsz, _, _, c = images.shape
    out = np.empty((bsz, size, size, c), dtype=np.uint8)
    grid = np.arange(size, dtype=np.float64) + 0.5
    for i in range(bsz):
        y0, x0, h, w = int(oy[i]), int(ox[i]), int(hh[i]), int(ww[i])
        win = images[i, y0:y0 + h, x0:x0 + w]
        if h == size and w == size:
            res = win
        else:
            ys = np.clip(grid * (h / size) - 0.5, 0, h - 1)
            xs = np.clip(grid * (w / size) - 0.5, 0, w - 1)
            y_lo = np.floor(ys).astype(np.int64)
            x_lo = np.floor(xs).astype(np.int64)
            y_hi = np.minimum(y_lo + 1, h - 1)
            x_hi = np.minimum(x_lo + 1, w - 1)
            fy = (ys - y_lo)[:, None, None]
            fx = (xs - x_lo)[None, :, None]
            f = win.astype(np.float32)
            top = f[y_lo][:, x_lo] * (1 - fx) + f[y_lo][:, x_hi] * fx
            bot = f[y_hi][:, x_lo] * (1 - fx) + f[y_hi][:, x_hi] * fx
            res = np.clip(np.rint(top * (1 - fy) + bot * fy), 0, 255).astype(np.uint8)
        out[i] = res[:, ::-1] if flip[i] else res
    return out


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
