"""Offline tests of data_scripts/: each converter runs on a tiny fixture written in the source's
real format (file layout, headers, binary records, .mat, IDX, COCO json, tar/zip archives), and
the download helper runs against a local HTTP server on 127.0.0.1 that honours Range requests.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import struct
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data_scripts"))

import _common as C  # noqa: E402
from npmask.data.format import load_domain  # noqa: E402


# ---------------------------------------------------------------------------------------------
# fixture helpers
# ---------------------------------------------------------------------------------------------

def rng_image(seed, h, w, mode="RGB"):
    """A random image (so every fixture image differs and label mix-ups are detectable)."""
    r = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(r.integers(0, 256, shape, dtype=np.uint8), mode)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members: dict, mode="w:gz"):
    """members: {name: bytes}."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def tar_bytes(members: dict, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def assert_no_domain(folder):
    folder = Path(folder)
    assert not folder.exists()
    # no temporary folder left beside it either
    if folder.parent.exists():
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


# ---------------------------------------------------------------------------------------------
# download helper: local HTTP server with Range support
# ---------------------------------------------------------------------------------------------

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_after = None          # serve only this many bytes then drop the connection
    honour_range = True
    log = []

    def do_GET(self):  # noqa: N802
        data = self.payload
        start = 0
        rng = self.headers.get("Range")
        type(self).log.append(rng)
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body = body[: self.cut_after]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("H", (_RangeHandler,), {"log": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_partial_file_with_range(server, tmp_path):
    handler, url = server
    payload = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    handler.payload = payload
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "file.bin"
    # a previous run left the first 20,000 bytes
    (tmp_path / "file.bin.part").write_bytes(payload[:20_000])
    C.download(url, dest, md5=md5, size=len(payload), quiet=True)
    assert dest.read_bytes() == payload
    assert handler.log == ["bytes=20000-"]
    assert not (tmp_path / "file.bin.part").exists()
    # present and verified: no second request
    C.download(url, dest, md5=md5, quiet=True)
    assert handler.log == ["bytes=20000-"]


def test_download_interrupted_then_resumed(server, tmp_path):
    handler, url = server
    payload = bytes(range(256)) * 100
    handler.payload = payload
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "a.bin"
    handler.cut_after = 10_000        # connection drops mid-transfer
    with pytest.raises(C.DataScriptError, match="interrupted"):
        C.download(url, dest, sha256=sha, size=len(payload), quiet=True)
    assert not dest.exists()
    part = tmp_path / "a.bin.part"
    assert 0 < part.stat().st_size < len(payload)
    handler.cut_after = None
    C.download(url, dest, sha256=sha, size=len(payload), quiet=True)
    assert dest.read_bytes() == payload
    assert handler.log[-1] == f"bytes={10_000}-"


def test_download_server_without_range_restarts(server, tmp_path):
    handler, url = server
    payload = b"x" * 3000 + b"y" * 3000
    handler.payload = payload
    handler.honour_range = False
    (tmp_path / "b.bin.part").write_bytes(b"garbage!")
    C.download(url, tmp_path / "b.bin", md5=hashlib.md5(payload).hexdigest(), quiet=True)
    assert (tmp_path / "b.bin").read_bytes() == payload


def test_download_checksum_mismatch_is_clear_and_leaves_nothing(server, tmp_path):
    handler, url = server
    handler.payload = b"not the published file"
    with pytest.raises(C.DataScriptError, match="md5 checksum mismatch"):
        C.download(url, tmp_path / "c.bin", md5="0" * 32, quiet=True)
    assert not (tmp_path / "c.bin").exists()
    assert not (tmp_path / "c.bin.part").exists()


def test_download_file_url_and_offline_fetch(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 100)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    out = C.fetch([{"url": src.as_uri(), "filename": "dst.bin", "md5": md5}], tmp_path / "dl",
                  quiet=True)
    assert out["dst.bin"].read_bytes() == src.read_bytes()
    with pytest.raises(C.DataScriptError, match="missing"):
        C.fetch([{"url": src.as_uri(), "filename": "other.bin"}], tmp_path / "dl", offline=True)


def test_download_unreachable_is_clear(tmp_path):
    with pytest.raises(C.DataScriptError, match="failed"):
        C.download("http://127.0.0.1:9/none", tmp_path / "x", quiet=True, timeout=5)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------

def cifar_records(n, label_bytes, seed, num_classes):
    r = np.random.default_rng(seed)
    labels = r.integers(0, num_classes, n).astype(np.uint8)
    images = r.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    rows = [bytes([int(lab) // 5] * (label_bytes - 1) + [int(lab)])
            + images[i].transpose(2, 0, 1).tobytes() for i, lab in enumerate(labels)]
    return b"".join(rows), images, labels


def test_cifar10_binary(tmp_path):
    import cifar
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members, train_imgs, train_labels = {}, [], []
    for i in range(1, 6):
        data, imgs, labs = cifar_records(3, 1, i, 10)
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = data
        train_imgs.append(imgs)
        train_labels.append(labs)
    test_data, test_imgs, test_labels = cifar_records(4, 1, 99, 10)
    members["cifar-10-batches-bin/test_batch.bin"] = test_data
    members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    cifar.convert(archive, tmp_path / "out" / "cifar10", "cifar10")
    d = load_domain(tmp_path / "out" / "cifar10")
    assert d.class_names == names and d.mirror
    np.testing.assert_array_equal(d.train[0], np.concatenate(train_imgs))
    np.testing.assert_array_equal(d.train[1], np.concatenate(train_labels))
    np.testing.assert_array_equal(d.test[0], test_imgs)
    np.testing.assert_array_equal(d.test[1], test_labels)
    assert C.domain_is_complete(tmp_path / "out" / "cifar10", {"which": "cifar10"})


def test_cifar100_fine_labels_and_truncation(tmp_path):
    import cifar
    names = [f"class{i}" for i in range(100)]
    train, train_imgs, train_labels = cifar_records(6, 2, 1, 100)
    test, _, test_labels = cifar_records(3, 2, 2, 100)
    members = {"cifar-100-binary/train.bin": train, "cifar-100-binary/test.bin": test,
               "cifar-100-binary/fine_label_names.txt": "\n".join(names).encode(),
               "cifar-100-binary/coarse_label_names.txt": b"a\nb\n"}
    archive = write_tar(tmp_path / "cifar-100-binary.tar.gz", members)
    cifar.convert(archive, tmp_path / "cifar100", "cifar100")
    d = load_domain(tmp_path / "cifar100")
    assert d.num_classes == 100
    np.testing.assert_array_equal(d.train[0], train_imgs)
    np.testing.assert_array_equal(d.train[1], train_labels)
    np.testing.assert_array_equal(d.test[1], test_labels)

    truncate(archive, 0.6)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        cifar.convert(archive, tmp_path / "again", "cifar100")
    assert_no_domain(tmp_path / "again")


def test_cifar_main_is_idempotent_and_offline(tmp_path, capsys):
    import cifar
    data, _, _ = cifar_records(2, 1, 0, 10)
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": data for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = data
    members["cifar-10-batches-bin/batches.meta.txt"] = "\n".join("abcdefghij").encode()
    dl = tmp_path / "root" / "_downloads" / "cifar"
    dl.mkdir(parents=True)
    write_tar(dl / "cifar-10-binary.tar.gz", members)
    spec = cifar.SOURCES["cifar10"]["resource"]
    old = spec["md5"]
    spec["md5"] = C.file_hash(dl / "cifar-10-binary.tar.gz")
    try:
        args = ["--root", str(tmp_path / "root"), "--which", "cifar10", "--offline", "--quiet"]
        assert C.run_cli(cifar.main, args) == 0
        assert "written" in capsys.readouterr().out
        assert C.run_cli(cifar.main, args) == 0
        assert "skipped" in capsys.readouterr().out
        # a missing archive (cifar100, offline) is a one-line error, not a traceback
        assert C.run_cli(cifar.main, ["--root", str(tmp_path / "root"), "--which", "cifar100",
                                      "--offline"]) == 1
        assert "missing" in capsys.readouterr().err
        assert_no_domain(tmp_path / "root" / "cifar100")
    finally:
        spec["md5"] = old


# ---------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------

def write_svhn_mat(path, n, seed):
    from scipy.io import savemat
    r = np.random.default_rng(seed)
    images = r.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)   # SVHN: 10 means 0
    savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": y})
    return images, digits


def test_svhn_mat(tmp_path):
    import svhn
    tr_imgs, tr_digits = write_svhn_mat(tmp_path / "train_32x32.mat", 12, 0)
    te_imgs, te_digits = write_svhn_mat(tmp_path / "test_32x32.mat", 5, 1)
    svhn.convert({"train": tmp_path / "train_32x32.mat", "test": tmp_path / "test_32x32.mat"},
                 tmp_path / "svhn")
    d = load_domain(tmp_path / "svhn")
    assert d.class_names == [str(i) for i in range(10)] and not d.mirror
    np.testing.assert_array_equal(d.train[0], tr_imgs)
    np.testing.assert_array_equal(d.train[1], tr_digits)
    np.testing.assert_array_equal(d.test[0], te_imgs)
    np.testing.assert_array_equal(d.test[1], te_digits)

    truncate(tmp_path / "train_32x32.mat", 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        svhn.convert({"train": tmp_path / "train_32x32.mat", "test": tmp_path / "test_32x32.mat"},
                     tmp_path / "svhn2")
    assert_no_domain(tmp_path / "svhn2")


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------

def write_idx_gz(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx(tmp_path):
    import mnist
    r = np.random.default_rng(0)
    files, truth = {}, {}
    for split, n in (("train", 7), ("test", 3)):
        imgs = r.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = r.integers(0, 10, n).astype(np.uint8)
        write_idx_gz(tmp_path / f"{split}-images.gz", imgs)
        write_idx_gz(tmp_path / f"{split}-labels.gz", labs)
        files[f"{split}_images"] = tmp_path / f"{split}-images.gz"
        files[f"{split}_labels"] = tmp_path / f"{split}-labels.gz"
        truth[split] = (imgs, labs)
    mnist.convert(files, tmp_path / "mnist")
    d = load_domain(tmp_path / "mnist")
    assert d.train[0].shape == (7, 28, 28, 3) and not d.mirror
    for c in range(3):
        np.testing.assert_array_equal(d.train[0][..., c], truth["train"][0])
    np.testing.assert_array_equal(d.test[1], truth["test"][1])

    mnist.convert(files, tmp_path / "mnist32", size=32, channels=1)
    d = load_domain(tmp_path / "mnist32")
    assert d.train[0].shape == (7, 32, 32, 1) and d.meta["extra"]["options"]["size"] == 32

    # an IDX whose payload is shorter than its header says
    write_idx_gz(tmp_path / "train-images.gz", truth["train"][0])
    raw = gzip.decompress((tmp_path / "train-images.gz").read_bytes())
    (tmp_path / "train-images.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(C.DataScriptError, match="truncated"):
        mnist.convert(files, tmp_path / "bad")
    truncate(tmp_path / "train-images.gz", 0.5)          # a cut-short gzip stream
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        mnist.convert(files, tmp_path / "bad")
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# GTSRB
# ---------------------------------------------------------------------------------------------

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def sign_image(color, w=30, h=28):
    """A ppm whose ROI (5..w-6, 5..h-6, inclusive) is `color` and whose margin is black."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[5:h - 5, 5:w - 5] = color
    return encode(Image.fromarray(a), "PPM")


def test_gtsrb_roi_and_labels(tmp_path):
    import gtsrb
    train = {}
    colors = {0: (200, 0, 0), 1: (0, 200, 0), 42: (0, 0, 200)}
    for c, color in colors.items():
        folder = f"GTSRB/Final_Training/Images/{c:05d}"
        rows = [HEADER]
        for k in range(2):
            name = f"{k:05d}_{k:05d}.ppm"
            train[f"{folder}/{name}"] = sign_image(color)
            rows.append(f"{name};30;28;5;5;24;22;{c}")
        train[f"{folder}/GT-{c:05d}.csv"] = ("\r\n".join(rows) + "\r\n").encode()
    write_zip(tmp_path / "train.zip", train)
    test_rows, test_imgs = [HEADER], {}
    for i, c in enumerate([42, 0, 1]):
        test_imgs[f"GTSRB/Final_Test/Images/{i:05d}.ppm"] = sign_image(colors[c])
        test_rows.append(f"{i:05d}.ppm;30;28;5;5;24;22;{c}")
    test_imgs["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = b"Filename;Width\n"
    write_zip(tmp_path / "test.zip", test_imgs)
    write_zip(tmp_path / "gt.zip", {"GT-final_test.csv": "\n".join(test_rows).encode()})
    files = {"train": tmp_path / "train.zip", "test": tmp_path / "test.zip",
             "test_gt": tmp_path / "gt.zip"}
    gtsrb.convert(files, tmp_path / "gtsrb", size=16)
    d = load_domain(tmp_path / "gtsrb")
    assert d.num_classes == 43 and not d.mirror and d.image_size == (16, 16)
    np.testing.assert_array_equal(d.train[1], [0, 0, 1, 1, 42, 42])
    np.testing.assert_array_equal(d.test[1], [42, 0, 1])
    # the ROI crop removed the black margin: every pixel has the class colour
    for images, labels in (d.train, d.test):
        for img, lab in zip(images, labels):
            np.testing.assert_array_equal(img, np.broadcast_to(colors[int(lab)], img.shape))

    truncate(tmp_path / "train.zip", 0.7)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        gtsrb.convert(files, tmp_path / "bad")
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------

def test_omniglot_zips_and_split(tmp_path):
    import omniglot
    files = {}
    for key, alphabets in (("background", ["Latin", "Greek"]), ("evaluation", ["Atlantean"])):
        members = {}
        for a in alphabets:
            for ch in (1, 2):
                for drawer in range(1, 5):
                    img = Image.new("1", (105, 105), 1)
                    members[f"images_{key}/{a}/character{ch:02d}/09{ch}{len(a)}_{drawer:02d}.png"] = \
                        encode(img, "PNG")
        files[key] = write_zip(tmp_path / f"images_{key}.zip", members)
    omniglot.convert(files, tmp_path / "omniglot", size=20, train_per_class=3)
    d = load_domain(tmp_path / "omniglot")
    assert d.class_names == ["Atlantean/character01", "Atlantean/character02",
                             "Greek/character01", "Greek/character02",
                             "Latin/character01", "Latin/character02"]
    assert d.train[0].shape == (18, 20, 20, 3) and d.test[0].shape == (6, 20, 20, 3)
    np.testing.assert_array_equal(np.bincount(d.train[1]), [3] * 6)
    np.testing.assert_array_equal(d.test[1], np.arange(6))
    assert not d.mirror

    with pytest.raises(C.DataScriptError, match="only 4 drawings"):
        omniglot.convert(files, tmp_path / "bad", train_per_class=4)
    truncate(files["evaluation"], 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        omniglot.convert(files, tmp_path / "bad")
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# VGG-Flowers 102
# ---------------------------------------------------------------------------------------------

def test_flowers102_mat_splits(tmp_path):
    import flowers102
    from scipy.io import savemat
    n = 9
    members = {f"jpg/image_{i:05d}.jpg": encode(rng_image(i, 40 + i, 50), "JPEG")
               for i in range(1, n + 1)}
    write_tar(tmp_path / "102flowers.tgz", members)
    labels = np.array([[1, 102, 5, 1, 2, 3, 102, 7, 9]], dtype=np.uint8)      # 1 x 8189 in reality
    savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    savemat(tmp_path / "setid.mat", {"trnid": np.array([[1, 2, 3, 4]], dtype=np.uint16),
                                     "valid": np.array([[5, 6]], dtype=np.uint16),
                                     "tstid": np.array([[9, 8, 7]], dtype=np.uint16)})
    files = {"images": tmp_path / "102flowers.tgz", "labels": tmp_path / "imagelabels.mat",
             "setid": tmp_path / "setid.mat"}
    flowers102.convert(files, tmp_path / "flowers", size=24)
    d = load_domain(tmp_path / "flowers")
    assert d.num_classes == 102 and d.mirror and d.image_size == (24, 24)
    np.testing.assert_array_equal(d.train[1], [0, 101, 4, 0])
    np.testing.assert_array_equal(d.val[1], [1, 2])
    np.testing.assert_array_equal(d.test[1], [8, 6, 101])
    # the image order follows setid: test[0] is image 9, centre-cropped from 49x50 to 24x24
    expected = C.to_array(C.square(Image.open(io.BytesIO(members["jpg/image_00009.jpg"])).convert("RGB"), 24))
    np.testing.assert_array_equal(d.test[0][0], expected)

    truncate(tmp_path / "102flowers.tgz", 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        flowers102.convert(files, tmp_path / "bad", size=24)
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# DTD
# ---------------------------------------------------------------------------------------------

def test_dtd_partition_files(tmp_path):
    import dtd
    classes = ["zigzagged", "banded", "dotted"]
    members, lists = {}, {"train": [], "val": [], "test": []}
    for c in classes:
        for k in range(3):
            entry = f"{c}/{c}_{k:04d}.jpg"
            members[f"dtd/images/{entry}"] = encode(rng_image(len(members), 30, 36), "JPEG")
            lists[["train", "val", "test"][k]].append(entry)
    # split lists come after the images in the real archive too: one streaming pass must cope
    for split, entries in lists.items():
        members[f"dtd/labels/{split}1.txt"] = ("\n".join(entries) + "\n").encode()
        members[f"dtd/labels/{split}2.txt"] = b"banded/banded_0000.jpg\n"
    members["dtd/labels/labels_joint_anno.txt"] = b"ignored\n"
    archive = write_tar(tmp_path / "dtd-r1.0.1.tar.gz", members)
    dtd.convert(archive, tmp_path / "dtd", size=16, partition=1)
    d = load_domain(tmp_path / "dtd")
    assert d.class_names == ["banded", "dotted", "zigzagged"] and d.mirror
    np.testing.assert_array_equal(d.train[1], [2, 0, 1])
    np.testing.assert_array_equal(d.val[1], [2, 0, 1])
    assert d.test[0].shape == (3, 16, 16, 3)

    truncate(archive, 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        dtd.convert(archive, tmp_path / "bad", size=16)
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# generic image folder (ImageNet-to-Sketch as Piggyback distributes it)
# ---------------------------------------------------------------------------------------------

def image_tree(members_prefix=""):
    members = {}
    for split, n in (("train", 2), ("test", 1), ("val", 1)):
        for c in ("001.Black_footed_Albatross", "002.Laysan_Albatross"):
            for k in range(n):
                members[f"{members_prefix}{split}/{c}/img{k}.jpg"] = encode(
                    rng_image(len(members), 20, 26), "JPEG")
    members[f"{members_prefix}train/.DS_Store"] = b"junk"
    return members


def test_image_folder_dir_zip_and_tar(tmp_path):
    import image_folder
    members = image_tree()
    src = tmp_path / "cubs_cropped"
    for name, data in members.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    image_folder.convert(src, tmp_path / "out" / "cubs", name="cubs", size=16)
    d = load_domain(tmp_path / "out" / "cubs")
    assert d.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"] and d.mirror
    np.testing.assert_array_equal(d.train[1], [0, 0, 1, 1])
    np.testing.assert_array_equal(d.test[1], [0, 1])
    np.testing.assert_array_equal(d.val[1], [0, 1])
    assert d.train[0].shape == (4, 16, 16, 3)

    write_zip(tmp_path / "sketches.zip", image_tree("sketches/"))
    image_folder.convert(tmp_path / "sketches.zip", tmp_path / "sk", name="sketches", size=16,
                         mirror=False)
    d2 = load_domain(tmp_path / "sk")
    assert not d2.mirror
    np.testing.assert_array_equal(d2.train[0], d.train[0])      # same images, same order

    write_tar(tmp_path / "t.tar.gz", image_tree("x/"))
    image_folder.convert(tmp_path / "t.tar.gz", tmp_path / "tt", name="t", size=16)
    np.testing.assert_array_equal(load_domain(tmp_path / "tt").test[0], d.test[0])

    no_test = {k: v for k, v in members.items() if not k.startswith("test/")}
    write_zip(tmp_path / "no_test.zip", no_test)
    with pytest.raises(C.DataScriptError, match="'test/<class>/'"):
        image_folder.convert(tmp_path / "no_test.zip", tmp_path / "bad", name="bad")
    truncate(tmp_path / "t.tar.gz", 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        image_folder.convert(tmp_path / "t.tar.gz", tmp_path / "bad", name="bad")
    assert_no_domain(tmp_path / "bad")


def write_tree(src, members):
    for name, data in members.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def test_image_folder_scales_16_bit_pictures_and_refuses_float_ones(tmp_path):
    import image_folder
    members = image_tree()
    grey16 = np.full((20, 26), 40000, np.uint16)  # 16-bit PNG: 40000/65535 of white, not white
    members["train/002.Laysan_Albatross/img9.png"] = encode(Image.fromarray(grey16), "PNG")
    src = write_tree(tmp_path / "src", members)
    image_folder.convert(src, tmp_path / "out", name="x", size=16)
    x, y = load_domain(tmp_path / "out").train
    assert np.all(x[-1] == round(40000 / 257))  # the class's last image by file name
    members["train/002.Laysan_Albatross/img9.png"] = encode(
        Image.fromarray(np.full((20, 26), 0.5, np.float32)), "TIFF")
    write_tree(tmp_path / "src", members)
    with pytest.raises(C.DataScriptError, match="img9.png: 32-bit float pixels"):
        image_folder.convert(src, tmp_path / "bad", name="bad", size=16)
    assert_no_domain(tmp_path / "bad")


def test_image_folder_user_mistakes_are_clear(tmp_path):
    import image_folder
    with pytest.raises(C.DataScriptError, match="nope: no such folder or archive"):
        image_folder.convert(tmp_path / "nope", tmp_path / "bad", name="bad")
    one = {k: v for k, v in image_tree().items() if "002." not in k}  # one class folder only
    with pytest.raises(C.DataScriptError, match="single class folder .'001.Black_footed"):
        image_folder.convert(write_tree(tmp_path / "one", one), tmp_path / "bad", name="bad")
    assert_no_domain(tmp_path / "bad")


def test_image_folder_names_a_bad_image_and_blames_an_archive_only_when_there_is_one(tmp_path):
    import image_folder
    members = dict(image_tree(), **{"train/002.Laysan_Albatross/notes.jpg": b"just text"})
    src = write_tree(tmp_path / "src", members)
    with pytest.raises(C.DataScriptError) as e:
        image_folder.convert(src, tmp_path / "bad", name="bad", size=16)
    assert str(e.value).startswith(f"{src / 'train/002.Laysan_Albatross/notes.jpg'}: cannot decode")
    assert "BytesIO" not in str(e.value) and "archive" not in str(e.value)
    write_zip(tmp_path / "src.zip", members)
    with pytest.raises(C.DataScriptError, match=r"src.zip:train/002.Laysan_Albatross/notes.jpg: "
                                                r"cannot decode image .*archive may be corrupt") as e:
        image_folder.convert(tmp_path / "src.zip", tmp_path / "bad", name="bad", size=16)
    assert "BytesIO" not in str(e.value)
    assert_no_domain(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Visual Decathlon
# ---------------------------------------------------------------------------------------------

def coco(entries, categories):
    """entries: [(image_id, file_name, category_id or None)]."""
    out = {"images": [{"id": i, "file_name": f, "width": 1, "height": 1} for i, f, _ in entries],
           "categories": [{"id": c, "name": n} for c, n in categories]}
    if any(c is not None for _, _, c in entries):
        out["annotations"] = [{"id": k, "image_id": i, "category_id": c, "segmentation": [],
                               "area": 1, "bbox": [], "iscrowd": 0}
                              for k, (i, _, c) in enumerate(entries) if c is not None]
    return out


def decathlon_fixture(tmp_path, datasets=("svhn", "dtd")):
    """A devkit tar.gz, a data tar.gz with <ds>.tar inside, and a test-labels zip."""
    annotations, inner, test_labels, truth = {}, {}, {}, {}
    for d_i, ds in enumerate(datasets):
        base = 10_000_000 * (d_i + 1)                  # real ids: 10000001.. aircraft, 20000001.. cifar100
        cats = [(base + k + 1, f"{ds}_class{k}") for k in range(3)]
        members, entries = {}, {"train": [], "val": [], "test": []}
        image_id = base * 10
        for split, n in (("train", 4), ("val", 2), ("test", 3)):
            for k in range(n):
                image_id += 1
                w = 72 + 9 * k                          # shorter side 72, various widths
                name = f"{ds}/{split}/{image_id}.jpg"
                members[name] = encode(rng_image(image_id, 72, w), "JPEG")
                entries[split].append((image_id, "data/" + name, base + 1 + (k % 3)))
        # annotations deliberately listed in reverse so only an image_id join gets them right
        annotations[f"{ds}_train.json"] = coco(entries["train"][::-1], cats)
        annotations[f"{ds}_val.json"] = coco(entries["val"], cats)
        annotations[f"{ds}_test_stripped.json"] = coco([(i, f, None) for i, f, _ in entries["test"]], cats)
        test_labels[f"{ds}_test.json"] = coco(entries["test"], cats)
        inner[f"{ds}.tar"] = tar_bytes(members)
        truth[ds] = {s: [c - base - 1 for _, _, c in e] for s, e in entries.items()}
        truth[ds]["members"] = members
    devkit = write_tar(tmp_path / "decathlon-1.0-devkit.tar.gz",
                       {f"decathlon-1.0/annotations/{k}": json.dumps(v).encode()
                        for k, v in annotations.items()})
    data = write_tar(tmp_path / "decathlon-1.0-data.tar.gz", inner)
    # as residual_adapters' labels_test.zip: <ds>_test.json at the root, COCO with info/licenses
    labels = write_zip(tmp_path / "labels_test.zip",
                       {k: json.dumps(dict(v, info={"description": "Decathlon"}, licenses=[])).encode()
                        for k, v in test_labels.items()})
    return {"devkit": devkit, "data": data, "test_labels": labels}, truth


def test_decathlon_coco_annotations_and_test_labels(tmp_path):
    import decathlon
    files, truth = decathlon_fixture(tmp_path)
    decathlon.convert(files, tmp_path / "out", ["svhn", "dtd"], quiet=True)
    for ds in ("svhn", "dtd"):
        d = load_domain(tmp_path / "out" / ds)
        assert d.class_names == [f"{ds}_class{k}" for k in range(3)]
        assert d.image_size == (72, 72) and not d.mirror   # the paper mirrors neither
        assert d.meta["extra"]["protocol_note"] == (
            "train: random crop 64; test: centre crop 64" if ds == "dtd"
            else "train and test: the whole 72x72 image, no mirroring")
        # train annotations were reversed in the json: labels follow the annotation order
        np.testing.assert_array_equal(d.train[1], truth[ds]["train"][::-1])
        np.testing.assert_array_equal(d.val[1], truth[ds]["val"])
        np.testing.assert_array_equal(d.test[1], truth[ds]["test"])
        assert "published test labels" in d.meta["extra"]["test_split"]
        # the loader's "auto" augmentation reads the protocol the converter recorded
        from npmask.data.loader import augmentation_for
        train_aug = augmentation_for(d, train=True)
        if ds == "dtd":  # 72 -> random crop 64; not mirrored (the paper: no mirroring for textures)
            assert train_aug.crop == 64 and train_aug.random_crop and not train_aug.mirror
        else:            # svhn: the whole 72x72 image, no mirroring
            assert train_aug.crop is None and train_aug.full_view and not train_aug.mirror
    # the 3rd test image is 72 x 90: shorter side kept, centre crop 72 x 72
    member = next(n for n in truth["dtd"]["members"] if "/test/" in n)
    img = Image.open(io.BytesIO(truth["dtd"]["members"][member])).convert("RGB")
    np.testing.assert_array_equal(load_domain(tmp_path / "out" / "dtd").test[0][0],
                                  C.to_array(C.center_crop(img, 72)))


def test_decathlon_without_test_labels_uses_val(tmp_path):
    import decathlon
    files, truth = decathlon_fixture(tmp_path, ("gtsrb",))
    files.pop("test_labels")
    decathlon.convert(files, tmp_path / "out", ["gtsrb"], size=64, quiet=True)
    d = load_domain(tmp_path / "out" / "gtsrb")
    assert d.val is None and not d.mirror and d.image_size == (64, 64)
    np.testing.assert_array_equal(d.test[1], truth["gtsrb"]["val"])
    assert "validation" in d.meta["extra"]["test_split"]


def test_decathlon_truncated_or_incomplete_archives(tmp_path):
    import decathlon
    files, _ = decathlon_fixture(tmp_path, ("svhn",))
    with pytest.raises(C.DataScriptError, match=r"omniglot\.tar missing|annotation files missing"):
        decathlon.convert(files, tmp_path / "out", ["svhn", "omniglot"], quiet=True)
    truncate(files["data"], 0.5)
    with pytest.raises(C.DataScriptError, match="truncated or corrupt"):
        decathlon.convert(files, tmp_path / "out", ["svhn"], quiet=True)
    assert_no_domain(tmp_path / "out" / "svhn")
    assert not any((tmp_path / "out").glob(".*scratch*"))


@pytest.mark.parametrize("script", ["cifar", "svhn", "mnist", "gtsrb", "omniglot", "flowers102",
                                    "dtd", "image_folder", "decathlon"])
def test_every_script_documents_its_flags(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--root", "--offline", "--force", "--downloads"):
        assert flag in text
