"""The batch iterator: determinism per (seed, epoch), crops, flips, normalisation, batching."""
import numpy as np
import pytest

from npmask.backend import BackendError, cupy_available
from npmask.data.format import Domain
from npmask.data.loader import (Augmentation, BatchIterator, augment_batch, augmentation_for,
                                normalise)


def _data(n=37, size=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, c), dtype=np.uint8), rng.integers(0, 5, n)


def _collect(batches):
    xs, ys = zip(*batches)
    return np.concatenate(xs), np.concatenate(ys)


TRAIN_AUG = Augmentation(padding=2, random_crop=True, mirror=True)


def test_same_seed_and_epoch_same_batches_across_objects():
    images, labels = _data()
    a = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, seed=3)
    b = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, seed=3)
    list(b.epoch(0))  # running other epochs first changes nothing
    xa, ya = _collect(a.epoch(2))
    xb, yb = _collect(b.epoch(2))
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    x0, _ = _collect(a.epoch(0))
    assert not np.array_equal(xa, x0)  # epochs differ
    c = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, seed=4)
    assert not np.array_equal(_collect(c.epoch(2))[0], xa)  # seeds differ


def test_resume_mid_epoch_and_iter_protocol():
    images, labels = _data()
    it = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, seed=1)
    full = list(it.epoch(5))
    tail = list(it.epoch(5, start_batch=2))
    assert len(tail) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    first, second = _collect(iter(it)), _collect(iter(it))  # successive loops = epochs 0, 1
    np.testing.assert_array_equal(first[0], _collect(it.epoch(0))[0])
    np.testing.assert_array_equal(second[0], _collect(it.epoch(1))[0])
    it.set_epoch(5)
    np.testing.assert_array_equal(_collect(iter(it))[0], _collect(full)[0])


@pytest.mark.parametrize("drop_last, sizes", [(False, [8, 8, 8, 8, 5]), (True, [8, 8, 8, 8])])
def test_batches_shapes_dtypes_and_drop_last(drop_last, sizes):
    images, labels = _data(n=37)
    it = BatchIterator(images, labels, 8, shuffle=True, drop_last=drop_last, seed=0)
    batches = list(it.epoch(0))
    assert [len(y) for _, y in batches] == sizes and len(it) == len(sizes)
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape[1:] == (3, 8, 8) and y.dtype == np.int64
    _, ys = _collect(batches)
    if not drop_last:  # each sample exactly once per epoch
        assert sorted(ys.tolist()) == sorted(labels.tolist())
    x64, _ = next(BatchIterator(images, labels, 8, dtype=np.float64).epoch(0))
    assert x64.dtype == np.float64


def test_no_shuffle_keeps_order_and_normalises():
    images, labels = _data(n=10)
    mean, std = np.array([0.2, 0.5, 0.7]), np.array([0.1, 0.3, 0.25])
    x, y = _collect(BatchIterator(images, labels, 4, mean=mean, std=std).epoch(0))
    np.testing.assert_array_equal(y, labels)
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def _coordinate_image(h=6, w=7):
    """One image whose channel 0 holds row+1, channel 1 column+1, channel 2 = 200 (0 = padding)."""
    img = np.zeros((1, h, w, 3), dtype=np.uint8)
    img[0, :, :, 0] = np.arange(1, h + 1)[:, None]
    img[0, :, :, 1] = np.arange(1, w + 1)[None, :]
    img[0, :, :, 2] = 200
    return img


def test_crop_with_padding_on_a_hand_made_image():
    img = _coordinate_image()
    out = augment_batch(img, np.array([0]), np.array([3]), np.array([False]), (4, 5), padding=2)
    # padded row r is image row r - 2: output rows 0..3 = image rows -2..1, columns 1..5
    np.testing.assert_array_equal(out[0, :, :, 0], np.repeat([[0], [0], [1], [2]], 5, axis=1))
    np.testing.assert_array_equal(out[0, 2, :, 1], [2, 3, 4, 5, 6])
    assert (out[0, :2] == 0).all()  # the padding is black
    flipped = augment_batch(img, np.array([0]), np.array([3]), np.array([True]), (4, 5), padding=2)
    np.testing.assert_array_equal(flipped[0, 2, :, 1], [6, 5, 4, 3, 2])
    np.testing.assert_array_equal(flipped, out[:, :, ::-1])


def test_centre_crop_72_to_64():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 72, 72, 3), dtype=np.uint8)
    it = BatchIterator(images, np.zeros(3, int), 3, augmentation=Augmentation(crop=64))
    x, _ = next(it.epoch(0))
    np.testing.assert_allclose(x, images[:, 4:68, 4:68].transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_random_crops_cover_every_offset_and_stay_in_range():
    img = np.repeat(_coordinate_image(), 400, axis=0)
    it = BatchIterator(img, np.zeros(400, int), 400, augmentation=Augmentation(padding=1, random_crop=True))
    order, oy, ox, flip = it.plan(0)
    assert set(oy.tolist()) == {0, 1, 2} and set(ox.tolist()) == {0, 1, 2} and not flip.any()
    x, _ = next(it.epoch(0))
    assert x.shape == (400, 3, 6, 7)
    # the top-left pixel shows image row oy - 1 + 1 (or padding when oy = 0)
    np.testing.assert_allclose(x[:, 0, 0, 0] * 255, np.where((oy > 0) & (ox > 0), oy, 0), atol=1e-4)


def test_flip_only_when_allowed():
    img = np.repeat(_coordinate_image(), 200, axis=0)
    labels = np.zeros(200, int)
    never = BatchIterator(img, labels, 200, augmentation=Augmentation(mirror=False), shuffle=True)
    x, _ = next(never.epoch(0))
    assert (np.diff(x[:, 1], axis=-1) > 0).all()  # columns increase: nothing mirrored
    sometimes = BatchIterator(img, labels, 200, augmentation=Augmentation(mirror=True), seed=2)
    x, _ = next(sometimes.epoch(0))
    increasing = (np.diff(x[:, 1], axis=-1) > 0).all(axis=(1, 2))
    decreasing = (np.diff(x[:, 1], axis=-1) < 0).all(axis=(1, 2))
    assert (increasing | decreasing).all() and 60 < decreasing.sum() < 140
    np.testing.assert_array_equal(decreasing, sometimes.plan(0)[3])


def _domain(name="d", size=32, mirror=True, extra=None):
    imgs = np.zeros((4, size, size, 3), np.uint8)
    return Domain(name=name, meta={"extra": extra or {}}, train=(imgs, np.zeros(4, np.int64)),
                  test=(imgs, np.zeros(4, np.int64)), val=None, num_classes=1,
                  mean=np.zeros(3, np.float32), std=np.ones(3, np.float32), mirror=mirror,
                  image_size=(size, size))


def test_protocols():
    assert augmentation_for(_domain(), True) == Augmentation(padding=4, random_crop=True, mirror=True)
    assert augmentation_for(_domain(mirror=False), True).mirror is False
    assert augmentation_for(_domain(), False) == Augmentation()
    dec = _domain("aircraft", size=72)
    assert augmentation_for(dec, True) == Augmentation(crop=64, random_crop=True, mirror=True)
    assert augmentation_for(dec, False) == Augmentation(crop=64)
    for name in ("svhn", "gtsrb", "omniglot"):
        assert augmentation_for(_domain(name, 72, mirror=False), True) == Augmentation(full_view=True)
    assert augmentation_for(_domain("x", 72, extra={"full_view": True}), True) == \
        Augmentation(full_view=True)
    assert augmentation_for(_domain(extra={"protocol": "none"}), True) == Augmentation()
    with pytest.raises(ValueError, match="unknown augmentation protocol"):
        augmentation_for(_domain(), True, protocol="imagenet1k")
    it = BatchIterator.from_domain(dec, "train", batch_size=2)
    assert it.shuffle and it.drop_last and it.output_shape == (3, 64, 64)
    assert not BatchIterator.from_domain(dec, "test").shuffle


def test_bad_arguments():
    images, labels = _data()
    with pytest.raises(ValueError, match="uint8"):
        BatchIterator(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="labels"):
        BatchIterator(images, labels[:-1])
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(images, labels, 0)
    with pytest.raises(ValueError, match="larger than"):
        BatchIterator(images, labels, augmentation=Augmentation(crop=20))
    with pytest.raises(ValueError, match="one value per channel"):
        BatchIterator(images, labels, mean=[0.5, 0.5])


def test_constant_channel_does_not_divide_by_zero():
    x = normalise(np.full((1, 2, 2, 1), 7, np.uint8), np.array([2.0]), np.array([1.0]))
    np.testing.assert_array_equal(x, np.full((1, 1, 2, 2), 13.0, np.float32))
    images, labels = _data()
    it = BatchIterator(images, labels, std=[0.0, 1.0, 1.0])
    assert np.isfinite(next(it.epoch(0))[0]).all()


@pytest.mark.skipif(cupy_available(), reason="this machine has a GPU")
def test_cupy_without_gpu_is_a_clear_error():
    images, labels = _data()
    with pytest.raises(BackendError):
        BatchIterator(images, labels, backend="cupy")


@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")
def test_cupy_matches_numpy():
    import cupy
    images, labels = _data()
    a = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, mean=[.5] * 3, std=[.2] * 3)
    b = BatchIterator(images, labels, 8, shuffle=True, augmentation=TRAIN_AUG, mean=[.5] * 3, std=[.2] * 3,
                      backend="cupy")
    for (x1, y1), (x2, y2) in zip(a.epoch(1), b.epoch(1)):
        assert isinstance(x2, cupy.ndarray) and x2.dtype == np.float32
        np.testing.assert_allclose(x1, x2.get(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y1, y2.get())


def test_decathlon_never_mirrors_digits_signs_characters_and_textures():
    """Paper, section 4: no mirroring for SVHN, Omniglot, GTSRB and DTD, whatever the meta flag."""
    for protocol in ("decathlon", "decathlon_crop64"):
        for name in ("svhn", "omniglot", "gtsrb", "dtd"):
            assert augmentation_for(_domain(name, 72, mirror=True), True, protocol).mirror is False
        for name in ("aircraft", "cifar100", "vgg-flowers", "ucf101", "daimlerpedcls"):
            assert augmentation_for(_domain(name, 72, mirror=True), True, protocol).mirror is True
    # dtd is cropped like the other mirrored domains, not fed whole
    assert augmentation_for(_domain("dtd", 72), True, "decathlon") == Augmentation(crop=64, random_crop=True)


def test_decathlon_crop64_crops_every_domain_and_decathlon_feeds_three_whole():
    for name in ("svhn", "gtsrb", "omniglot"):
        d = _domain(name, 72, mirror=False)
        assert augmentation_for(d, True, "decathlon_crop64") == Augmentation(crop=64, random_crop=True)
        assert augmentation_for(d, False, "decathlon_crop64") == Augmentation(crop=64)
        assert augmentation_for(d, False, "decathlon") == Augmentation(full_view=True)
        assert BatchIterator.from_domain(d, "test", protocol="decathlon_crop64").output_shape == (3, 64, 64)
        assert BatchIterator.from_domain(d, "test", protocol="decathlon").output_shape == (3, 72, 72)


def test_imagenet_protocol_random_size_crop_and_test_resize_256_centre_224():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 256, 256, 3)).astype(np.uint8)
    d = Domain(name="cubs", meta={"extra": {}}, train=(img, np.zeros(6, np.int64)),
               test=(img, np.zeros(6, np.int64)), val=None, num_classes=1,
               mean=np.zeros(3, np.float32), std=np.ones(3, np.float32), mirror=True,
               image_size=(256, 256))
    assert augmentation_for(d, True, "imagenet") == Augmentation(random_crop=True, mirror=True, resize=224)
    assert augmentation_for(d, False, "imagenet") == Augmentation(resize=224)
    test = BatchIterator.from_domain(d, "test", protocol="imagenet", batch_size=6)
    x, _ = next(test.epoch(0))
    # 256 stored = resize 256 done; the centre 224 window is taken exactly (no interpolation)
    np.testing.assert_array_equal(np.rint(x.transpose(0, 2, 3, 1) * 255), img[:, 16:240, 16:240])
    train = BatchIterator.from_domain(d, "train", protocol="imagenet", batch_size=2, seed=3)
    assert train.output_shape == (3, 224, 224)
    order, oy, ox, hh, ww, flip = train.plan_resized(0)
    area = hh * ww / 256 ** 2
    assert np.all((area > 0.07) & (area <= 1.0)) and np.all(oy + hh <= 256) and np.all(ox + ww <= 256)
    big = BatchIterator(img[:1].repeat(400, 0), np.zeros(400, np.int64), 400, shuffle=True,
                        augmentation=Augmentation(random_crop=True, mirror=True, resize=32), seed=1)
    _, oy, ox, hh, ww, flip = big.plan_resized(0)
    ratio, area = ww / hh, hh * ww / 256 ** 2
    assert 0.74 < ratio.min() and ratio.max() < 1.35 and len(np.unique(hh)) > 50  # random sizes
    assert area.min() < 0.2 and area.max() > 0.9 and 0.3 < flip.mean() < 0.7
    again = BatchIterator(img[:1].repeat(400, 0), np.zeros(400, np.int64), 400, shuffle=True,
                          augmentation=Augmentation(random_crop=True, mirror=True, resize=32), seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(big.plan_resized(0), again.plan_resized(0)))


def test_resized_crop_is_bilinear_and_mirrors():
    from npmask.data.loader import resized_crop_batch
    # a horizontal ramp: bilinear resizing of a linear function stays linear at the sample points
    ramp = np.tile(np.arange(0, 200, 10, dtype=np.uint8)[None, :, None], (20, 1, 3))[None]  # 20x20
    out = resized_crop_batch(ramp, [0], [0], [20], [20], [False], 10)
    # output column j samples x = (j + 0.5) * 2 - 0.5 = 2j + 0.5 -> value 10 * (2j + 0.5)
    np.testing.assert_array_equal(out[0, 0, :, 0], np.rint(10 * (2 * np.arange(10) + 0.5)).astype(np.uint8))
    flipped = resized_crop_batch(ramp, [0], [0], [20], [20], [True], 10)
    np.testing.assert_array_equal(flipped[0], out[0, :, ::-1])
    same = resized_crop_batch(ramp, [2], [3], [10], [10], [False], 10)
    np.testing.assert_array_equal(same[0], ramp[0, 2:12, 3:13])
