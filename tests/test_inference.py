"""The whole multi-domain model saved and loaded, and prediction on image files (PNG written here).

Also ``python -m npmask.predict``: its output, ``--json`` and one-line errors for user mistakes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from npmask import predict as predict_cli
from npmask import train
from npmask.data.format import Domain, load_domain as load_data
from npmask.inference import Predictions, check_data_info, data_info, prepare_images, softmax
from npmask.models import create
from npmask.multidomain import MultiDomainModel
from npmask.storage import DomainFileError, read_domain_file, save_domain
from npmask.training.batches import make_iterators

from test_storage import ROUND_TRIP, trained_model
from test_train import base_args, tiny  # noqa: F401  (tiny is a fixture)


# ---------------------------------------------------------------------------- save / load
def test_save_load_gives_bit_identical_logits_for_every_domain(tmp_path):
    md, x = trained_model(ROUND_TRIP)
    folder = md.save(tmp_path / "model")
    assert sorted(p.name for p in (folder / "domains").iterdir()) == sorted(f"{v}.npz" for v in ROUND_TRIP)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["domains"] == ROUND_TRIP and meta["backbone"]["fingerprint"] == md.fingerprint()
    fresh = MultiDomainModel.load(folder, backbone=create("wrn10_1", 5, input_size=8, seed=0))
    assert fresh.domains == md.domains
    for v in ROUND_TRIP:
        assert fresh.variant(v).name == v
        assert np.array_equal(fresh.predict(x, domain=v), md.predict(x, domain=v)), v


def test_load_checks_the_backbone(tmp_path):
    md, _ = trained_model(["full"], steps=1)
    folder = md.save(tmp_path / "model")
    with pytest.raises(DomainFileError, match="saved with another backbone"):
        MultiDomainModel.load(folder, backbone=create("wrn10_1", 5, input_size=8, seed=1))
    with pytest.raises(DomainFileError, match="records no backbone location; pass backbone="):
        MultiDomainModel.load(folder)                      # built from a Module: no file to point at
    with pytest.raises(DomainFileError, match="no such folder"):
        MultiDomainModel.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("predict") / "run"
    assert train.main(base_args(tiny, out)) == 0
    return out


def test_a_run_folder_loads_with_its_recorded_backbone_and_saves_again(run, tiny, tmp_path):  # noqa: F811
    model = MultiDomainModel.load(run)
    assert model.domains == ["base", "a", "b"]
    info = model.data_info["a"]
    data = load_data(tiny["data"] / "a")
    assert info["class_names"] == ["c0", "c1", "c2"] and info["image_size"] == [16, 16]
    assert info["input_size"] == [16, 16] and info["mirror"] is True and info["channels"] == 3
    assert np.allclose(info["mean"], data.mean) and np.allclose(info["std"], data.std)
    assert model.data_info["b"]["mirror"] is False
    saved = model.save(tmp_path / "copy")
    assert json.loads((saved / "model.json").read_text())["backbone"]["path"] == str(tiny["backbone"])
    again = MultiDomainModel.load(saved)              # backbone from model.json
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(again.predict(x, "b"), model.predict(x, "b"))
    assert again.data_info == model.data_info


# ---------------------------------------------------------------------------- predict
def test_predict_on_png_files_matches_the_test_pipeline(run, tiny, tmp_path):  # noqa: F811
    """PNG files of test images give the probabilities of the images as training evaluated them."""
    model = MultiDomainModel.load(run)
    data = load_data(tiny["data"] / "b")
    images, labels = data.test
    paths = []
    for i in range(5):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(images[i]).save(p)
        paths.append(p)
    _, test_it = make_iterators(data, batch_size=16, seed=0, backend="numpy", dtype=np.float32,
                                protocol="auto")
    x, _ = next(iter(test_it.epoch(0)))
    want = softmax(model.predict(x[:5], "b"))
    got = model.predict(paths, domain="b")
    assert isinstance(got, Predictions) and got.class_names == data.class_names
    assert np.allclose(got.probabilities, want, rtol=0, atol=1e-6)
    assert np.allclose(got.probabilities.sum(axis=1), 1.0)
    assert got.labels == [data.class_names[i] for i in want.argmax(axis=1)]
    from_arrays = model.predict(images[:5], domain="b")          # uint8 NHWC, no files
    assert np.array_equal(from_arrays.probabilities, got.probabilities)
    top = got.top(2)
    assert len(top) == 5 and all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    assert top[0][0] == (got.labels[0], float(got.probabilities[0].max()))


def test_an_rgba_array_predicts_as_the_same_rgba_file(run, tmp_path):
    """Pillow's convert("RGB") drops alpha (no blending): the array path does the same."""
    model = MultiDomainModel.load(run)
    rgba = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 4), dtype=np.uint8)
    rgba[..., 3] = np.arange(24, dtype=np.uint8) * 10            # alpha from clear to opaque
    paths = [tmp_path / f"rgba{i}.png" for i in range(3)]
    for p, a in zip(paths, rgba):
        Image.fromarray(a, "RGBA").save(p)
    from_files = model.predict(paths, domain="b").probabilities
    assert np.array_equal(model.predict(rgba, domain="b").probabilities, from_files)
    assert np.array_equal(model.predict(list(rgba), domain="b").probabilities, from_files)


def test_prepare_images_resizes_crops_and_normalises():
    info = {"class_names": ["x"], "mean": [0.5], "std": [0.25], "image_size": [8, 8],
            "input_size": [4, 4], "channels": 1, "mirror": False}
    img = np.zeros((16, 32, 1), np.uint8)            # 2x too large, wide: shorter side to 8, crop
    img[2:14, 10:22] = 255                           # a white square in the middle fills the view
    x = prepare_images(img, info)
    assert x.shape == (1, 1, 4, 4) and x.dtype == np.float32
    assert np.allclose(x, (1.0 - 0.5) / 0.25)        # the centre 4x4 of the 8x8: all white
    stripes = np.zeros((8, 32, 1), np.uint8)        # white outer quarters: gone when cropped,
    stripes[:, :8] = stripes[:, 24:] = 255          # kept at the sides when stretched
    square = dict(info, input_size=[8, 8])
    assert np.allclose(prepare_images(stripes, square), (0 - 0.5) / 0.25)
    stretched = prepare_images(stripes, dict(square, resize="stretch"))[0, 0]
    assert np.allclose(stretched[:, [0, 7]], 2.0) and np.allclose(stretched[:, 3:5], -2.0)
    grey_for_rgb = dict(info, mean=[0.5] * 3, std=[0.25] * 3, channels=3)
    assert prepare_images(np.full((8, 8), 255, np.uint8), grey_for_rgb).shape == (1, 3, 4, 4)


def test_prepare_images_takes_cupy_pixels(host_backed_cupy):
    """Pixels already on the GPU (a CuPy array, or a list of them) give what the same NumPy pixels
    give; np.asarray of a CuPy array raises, so they come over with .get()."""
    info = {"class_names": ["x"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": [8, 8],
            "input_size": [4, 4], "channels": 3, "mirror": False}
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = prepare_images(pixels, info)
    assert np.array_equal(prepare_images(host_backed_cupy(pixels), info), expected)
    assert np.array_equal(prepare_images([host_backed_cupy(p) for p in pixels], info), expected)


def test_top_refuses_k_below_1_and_clamps_a_large_k():
    preds = Predictions(["a", "b", "c"], np.array([[0.2, 0.5, 0.3]]))
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"k must be >= 1, got {k}$"):
            preds.top(k)
    assert preds.top(9) == [[("b", 0.5), ("c", 0.3), ("a", 0.2)]]


def test_a_description_with_a_zero_std_is_refused():
    info = {"class_names": ["x"], "mean": [0.5] * 3, "std": [0.25, 0.0, 0.25], "image_size": [8, 8],
            "input_size": [4, 4], "channels": 3, "mirror": False}
    with pytest.raises(ValueError, match=r"std must be > 0, got \[0.25, 0.0, 0.25\]"):
        check_data_info(info)


def _data_domain(preprocess):
    return Domain(name="d", meta={"class_names": ["a", "b"], "extra": {"preprocess": preprocess}},
                  train=None, test=None, val=None, num_classes=2, mean=np.full(3, 0.5, np.float32),
                  std=np.full(3, 0.25, np.float32), mirror=True, image_size=(10, 10))


def test_data_info_takes_a_single_input_side():
    """set_data_info(name, domain, input_size=8), as the module docstring shows: an 8x8 input."""
    info = data_info(_data_domain("crop to 10x10"), 8)
    assert info["image_size"] == [10, 10] and info["input_size"] == [8, 8]
    assert data_info(_data_domain("crop to 10x10"), (8, 6))["input_size"] == [8, 6]
    assert data_info(_data_domain("crop to 10x10"))["input_size"] == [10, 10]


def test_data_converted_with_resize_stretch_is_predicted_stretched():
    """data_scripts/image_folder.py --resize stretch records "stretch to NxN": predict stretches too."""
    assert data_info(_data_domain("stretch to 10x10"))["resize"] == "stretch"
    assert data_info(_data_domain("crop to 10x10"))["resize"] == "crop"
    assert data_info(_data_domain("none (original 32x32 RGB)"))["resize"] == "crop"


def test_softmax_of_large_logits_is_finite():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [800.0, 800.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (0, 5)])
def test_an_empty_picture_is_one_clear_value_error(shape):
    info = {"class_names": ["x"], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": [8, 8],
            "input_size": [4, 4], "channels": 3, "mirror": False}
    with pytest.raises(ValueError, match=r"image 0: an empty picture, shape \("):
        prepare_images(np.zeros(shape, np.uint8), info)


def test_a_16_bit_picture_reads_as_its_8_bit_version(tmp_path):
    info = {"class_names": ["x"], "mean": [0.0], "std": [1.0], "image_size": [4, 4],
            "input_size": [4, 4], "channels": 1, "mirror": False}
    grey16 = (np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)  # up to 60000: not clipped
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(grey16 / 257).astype(np.uint8)).save(tmp_path / "flat.png")
    assert np.array_equal(prepare_images(str(tmp_path / "deep.png"), info),
                          prepare_images(str(tmp_path / "flat.png"), info))
    Image.fromarray(grey16.astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="float.tiff: not a readable image .*float pixels"):
        prepare_images(str(tmp_path / "float.tiff"), info)


def test_old_domain_files_still_load_and_predict_says_what_is_missing(tmp_path):
    md, x = trained_model(["full"], steps=1)
    path = save_domain(md, "full", tmp_path / "full.npz")       # no data description set
    assert "data" not in read_domain_file(path)[0]
    fresh = MultiDomainModel(create("wrn10_1", 5, input_size=8, seed=0))
    from npmask.storage import load_domain
    load_domain(fresh, path)
    assert np.array_equal(fresh.predict(x, "full"), md.predict(x, "full"))
    with pytest.raises(ValueError, match="has no class names and normalisation"):
        fresh.predict(np.zeros((8, 8, 3), np.uint8), domain="full")


# ---------------------------------------------------------------------------- the command
def _pngs(tiny, tmp_path, n=2):  # noqa: F811
    images, _ = load_data(tiny["data"] / "a").test
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"p{i}.png"))
        Image.fromarray(images[i]).save(paths[-1])
    return paths


def test_predict_command_prints_the_top_classes(run, tiny, tmp_path, capsys):  # noqa: F811
    paths = _pngs(tiny, tmp_path)
    assert predict_cli.main([str(run), "--domain", "a", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    preds = MultiDomainModel.load(run).predict(paths, domain="a").top(3)
    assert lines == [f"{p}: " + " | ".join(f"{n} {q:.3f}" for n, q in t) for p, t in zip(paths, preds)]
    assert predict_cli.main([str(run), "--domain", "a", "--json", "--top", "1", *paths]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == paths
    assert [r["label"] for r in rows] == [t[0][0] for t in preds]
    assert all(len(r["top"]) == 1 and abs(r["top"][0][1] - t[0][1]) < 1e-6 for r, t in zip(rows, preds))


@pytest.mark.parametrize("args, says", [
    (lambda run, png: [run, "--domain", "zz", png], "no domain 'zz'; it holds a, b"),
    (lambda run, png: [run, "--domain", "a", png + ".missing"], "no such image file"),
    (lambda run, png: [run, "--domain", "a", run + "/config.json"], "not a readable image"),
    (lambda run, png: [run + "/nope", "--domain", "a", png], "no such folder"),
])
def test_predict_command_user_mistakes_are_one_line(run, tiny, tmp_path, args, says):  # noqa: F811
    png = _pngs(tiny, tmp_path, 1)[0]
    with pytest.raises(SystemExit) as exc:
        predict_cli.main(args(str(run), png))
    message = str(exc.value)
    assert message.startswith("python -m npmask.predict: error: ") and says in message
    assert "\n" not in message
