"""The on-disk domain format: round trip, atomic writes, and a clear error for every defect."""
import json
import zipfile

import numpy as np
import pytest

from npmask import io as npmask_io
from npmask.data import format as fmt
from npmask.data.format import DataFormatError, check_domain_files, list_domains, load_domain, write_domain


def _split(n, rng, size=(6, 5), c=3, k=4):
    return (rng.integers(0, 256, (n, *size, c), dtype=np.uint8), rng.integers(0, k, n))


def _write(folder, seed=0, **kw):
    rng = np.random.default_rng(seed)
    args = dict(name="toy", train=_split(12, rng), test=_split(5, rng), val=_split(3, rng),
                class_names=["a", "b", "c", "d"], mirror=False, source="unit test", licence="CC0",
                extra_meta={"note": [1, 2]})
    args.update(kw)
    return write_domain(folder, **args), args


def test_round_trip(tmp_path):
    folder, args = _write(tmp_path / "toy")
    d = load_domain(folder)
    for split in ("train", "test", "val"):
        images, labels = getattr(d, split)
        np.testing.assert_array_equal(images, args[split][0])
        np.testing.assert_array_equal(labels, args[split][1])
        assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert d.name == "toy" and d.num_classes == 4 and d.mirror is False
    assert d.image_size == (6, 5) and d.class_names == ["a", "b", "c", "d"]
    m = d.meta
    assert m["counts"] == {"train": 12, "test": 5, "val": 3} and m["channels"] == 3
    assert m["source"] == "unit test" and m["licence"] == "CC0" and m["extra"] == {"note": [1, 2]}
    assert m["class_counts"]["train"] == np.bincount(args["train"][1], minlength=4).tolist()
    x = args["train"][0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(d.mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(d.std, x.std(axis=0), rtol=1e-5)
    assert d.mean.dtype == np.float32


def test_channel_stats_count_every_image_of_every_chunk(monkeypatch):
    """The sums run over chunks of _CHUNK images (4096): with chunks of 4, 11 images give the
    statistics of all 11 (a slice that missed one image per chunk went unnoticed)."""
    monkeypatch.setattr(fmt, "_CHUNK", 4)
    images = np.random.default_rng(1).integers(0, 256, (11, 3, 2, 3), dtype=np.uint8)
    mean, std = fmt.channel_stats(images)
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-10)


def test_only_requested_splits_and_missing_val(tmp_path):
    folder, _ = _write(tmp_path / "toy", val=None)
    d = load_domain(folder, splits=("test",))
    assert d.train is None and d.val is None and d.test is not None
    assert load_domain(folder).val is None
    with pytest.raises(DataFormatError, match="no split 'val'"):
        load_domain(folder, splits=("val",))
    with pytest.raises(KeyError):
        d.split("train")


def test_grayscale_and_list_domains(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "b", train=_split(4, rng, c=1), test=_split(2, rng, c=1), val=None)
    _write(tmp_path / "a")
    (tmp_path / "not_a_domain").mkdir()
    (tmp_path / ".a.tmp-x").mkdir()
    (tmp_path / ".a.tmp-x" / "meta.json").write_text("{}")
    assert list_domains(tmp_path) == ["a", "b"]
    assert list_domains(tmp_path / "missing") == []
    assert load_domain(tmp_path / "b").mean.shape == (1,)


def test_replace_existing_domain(tmp_path):
    _write(tmp_path / "toy", seed=0)
    folder, args = _write(tmp_path / "toy", seed=1)
    np.testing.assert_array_equal(load_domain(folder).train[0], args["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_failure_midway_keeps_existing_domain(tmp_path, monkeypatch):
    folder, old = _write(tmp_path / "toy", seed=0)
    calls = []

    def failing_savez(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        np.savez(f, **arrays)

    monkeypatch.setattr(fmt.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "toy", seed=1)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_domain(folder).train[0], old["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no half-written folder


def test_failed_final_rename_restores_old_domain(tmp_path, monkeypatch):
    folder, old = _write(tmp_path / "toy", seed=0)
    real_replace = npmask_io.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> aside worked, tmp -> folder fails
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(npmask_io.os, "replace", flaky_replace)  # the folder swap is npmask.io's
    with pytest.raises(OSError, match="rename failed"):
        _write(tmp_path / "toy", seed=1)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_domain(folder).train[0], old["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_failure_on_new_domain_leaves_nothing(tmp_path):
    with pytest.raises(DataFormatError):
        _write(tmp_path / "toy", extra_meta={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    (lambda a, r: a.update(train=(a["train"][0].astype(np.float32), a["train"][1])), "uint8"),
    (lambda a, r: a.update(train=(a["train"][0][..., 0], a["train"][1])), "4 dims"),
    (lambda a, r: a.update(train=(a["train"][0], a["train"][1][:-1])), "labels must have shape"),
    (lambda a, r: a.update(train=(a["train"][0], a["train"][1] + 4)), r"labels must lie in \[0, 3\]"),
    (lambda a, r: a.update(train=(a["train"][0], -a["train"][1] - 1)), "labels must lie"),
    (lambda a, r: a.update(train=(a["train"][0], a["train"][1].astype(float))), "integers"),
    (lambda a, r: a.update(test=_split(5, r, size=(7, 5))), "differs from the training"),
    (lambda a, r: a.update(train=_split(0, r)), "no images"),
    (lambda a, r: a.update(train=a["train"][0]), "tuple"),
    (lambda a, r: a.update(class_names=["a", "b", "c"]), "labels must lie"),
    (lambda a, r: a.update(class_names=["a", "a", "c", "d"]), "duplicates"),
    (lambda a, r: a.update(class_names="abcd"), "list of strings"),
    (lambda a, r: a.update(mirror="yes"), "mirror"),
    (lambda a, r: a.update(name=""), "name"),
    (lambda a, r: a.update(licence=None), "licence"),
])
def test_write_rejects_bad_input(tmp_path, change, message):
    rng = np.random.default_rng(0)
    args = dict(name="toy", train=_split(12, rng), test=_split(5, rng),
                class_names=["a", "b", "c", "d"], mirror=True, source="s", licence="l")
    change(args, rng)
    with pytest.raises(DataFormatError, match=message):
        write_domain(tmp_path / "toy", **args)
    assert not (tmp_path / "toy").exists()


# ---- loading errors ------------------------------------------------------------------------

def _edit_meta(folder, fn):
    meta = json.loads((folder / "meta.json").read_text())
    fn(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _resave(folder, split, **arrays):
    with np.load(folder / f"{split}.npz") as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    for k in [k for k, v in data.items() if v is None]:
        del data[k]
    with open(folder / f"{split}.npz", "wb") as f:
        np.savez(f, **data)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "meta.json").unlink(), "meta.json: missing meta file"),
    (lambda f: (f / "meta.json").write_text("{not json"), "meta.json: malformed JSON"),
    (lambda f: (f / "meta.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda f: _edit_meta(f, lambda m: m.pop("mean")), "missing keys mean"),
    (lambda f: _edit_meta(f, lambda m: m.update(format_version=99)), "format_version 99"),
    (lambda f: _edit_meta(f, lambda m: m.update(num_classes=7)), "num_classes 7"),
    (lambda f: _edit_meta(f, lambda m: m.update(image_size=[6])), "image_size"),
    (lambda f: _edit_meta(f, lambda m: m.update(std=[1.0])), "std must be a list of 3"),
    (lambda f: _edit_meta(f, lambda m: m.update(mirror="no")), "mirror"),
    (lambda f: _edit_meta(f, lambda m: m.update(counts={"train": 12})), "counts"),
    (lambda f: (f / "test.npz").unlink(), "test.npz: missing file"),
    (lambda f: (f / "train.npz").write_bytes((f / "train.npz").read_bytes()[:200]),
     "train.npz: corrupt"),
    (lambda f: (f / "train.npz").write_bytes(b"not a zip file at all"), "train.npz: corrupt"),
    (lambda f: _resave(f, "train", images=None), "expected arrays 'images' and 'labels'"),
    (lambda f: _resave(f, "train", images=np.zeros((12, 6, 5, 3), np.float32)),
     "images must be uint8"),
    (lambda f: _resave(f, "train", images=np.zeros((12, 6, 6, 3), np.uint8)),
     r"images have shape \(12, 6, 6, 3\)"),
    (lambda f: _resave(f, "test", labels=np.zeros(5, np.int32)), "labels must be int64"),
    (lambda f: _resave(f, "test", labels=np.zeros(4, np.int64)), "labels have shape"),
    (lambda f: _resave(f, "val", labels=np.full(3, 4, np.int64)), "val.npz: labels out of range"),
    (lambda f: _resave(f, "val", labels=np.array([0, -1, 1], np.int64)), "val.npz: labels out of range"),
    (lambda f: _resave(f, "val", labels=np.array([0, None, 1], dtype=object)), "val.npz: corrupt"),
])
def test_load_reports_defects(tmp_path, damage, message):
    folder, _ = _write(tmp_path / "toy")
    damage(folder)
    with pytest.raises(DataFormatError, match=message):
        load_domain(folder)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "test.npz").unlink(), "test.npz: missing file"),
    (lambda f: (f / "train.npz").write_bytes((f / "train.npz").read_bytes()[:200]), "train.npz: corrupt"),
    (lambda f: (f / "train.npz").write_bytes(b"not a zip file at all"), "train.npz: corrupt"),
    (lambda f: _resave(f, "train", images=None), "expected arrays 'images' and 'labels'"),
    (lambda f: _resave(f, "train", images=np.zeros((12, 6, 5, 3), np.float32)), "images are float32"),
    (lambda f: _resave(f, "train", images=np.zeros((12, 6, 6, 3), np.uint8)), r"images are uint8 \(12, 6, 6, 3\)"),
    (lambda f: _resave(f, "test", labels=np.zeros(5, np.int32)), "labels are int32"),
    (lambda f: _resave(f, "val", labels=np.array([0, None, 1], dtype=object)), "val.npz: labels are object"),
    (lambda f: _edit_meta(f, lambda m: m.update(std=[0.2, 0.0, 0.2])), r"std \[0.2, 0.0, 0.2\]: a channel"),
])
def test_header_check_finds_defects_without_loading(tmp_path, damage, message):
    folder, _ = _write(tmp_path / "toy")
    assert check_domain_files(folder)["name"] == "toy"
    damage(folder)
    with pytest.raises(DataFormatError, match=message):
        check_domain_files(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_domain(tmp_path / "nowhere")


def test_corrupt_member_crc(tmp_path):
    """Flipping bytes inside a stored array is caught by the zip CRC check."""
    folder, _ = _write(tmp_path / "toy")
    raw = bytearray((folder / "train.npz").read_bytes())
    with zipfile.ZipFile(folder / "train.npz") as z:
        info = z.getinfo("images.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    raw[start:start + 50] = bytes(255 - b for b in raw[start:start + 50])
    (folder / "train.npz").write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="train.npz: corrupt"):
        load_domain(folder)
