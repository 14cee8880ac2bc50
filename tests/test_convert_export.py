"""Weights in (npmask.convert) and domains out (npmask.export): round trips through .safetensors and
.npz fixtures made here, and one clear line (nothing written) for bad input. No torch needed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from npmask import convert as convert_cli
from npmask.convert import ConvertError, convert, read_state_dict
from npmask.export import ExportError, export_domain
from npmask.masking.layers import MaskedConv2d, MaskedLinear
from npmask.models import create
from npmask.multidomain import MultiDomainModel
from npmask.pretrained import load_backbone, read_info
from npmask.storage import save_domain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_like_state(model, seed=0):
    """The model's state with new random values of a trained network's scale (He-initialised weights,
    BN near the identity so that eval-mode logits stay finite through 100+ layers) and the int64
    ``num_batches_tracked`` PyTorch adds per BN."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.ndim > 1:                           # conv / linear weight: He scale of its fan-in
            a = rng.standard_normal(v.shape) * np.sqrt(1.0 / np.prod(v.shape[1:]))
        elif k.endswith("running_var") or (k.endswith("weight") and v.ndim == 1):
            a = rng.uniform(0.8, 1.2, v.shape)
        else:                                    # biases, running means
            a = rng.standard_normal(v.shape) * 0.05
        out[k] = a.astype(np.float32)
        if k.endswith("running_var"):
            out[k[: -len("running_var")] + "num_batches_tracked"] = np.array(7, dtype=np.int64)
    return out


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("name,size,fmt", [("wrn10_1", 32, "npz"), ("densenet121", 64, "safetensors"),
                                           ("resnet26_ra", 64, "safetensors")])
def test_convert_round_trip(tmp_path, name, size, fmt):
    ref = create(name, 5, input_size=size, seed=1)
    state = torch_like_state(ref, seed=2)
    src = tmp_path / f"w.{fmt}"
    save_file(state, str(src)) if fmt == "safetensors" else np.savez(src, **state)
    info = convert(src, name, tmp_path / "bb.npz", input_size=size, domain="imagenet", test_acc=71.5)
    assert info["num_classes"] == 5 and info["dropped"] and all(d.endswith("num_batches_tracked") for d in info["dropped"])
    model, meta = load_backbone(tmp_path / "bb.npz")
    assert meta["model"] == name and meta["test_acc"] == 71.5 and meta["domain"] == "imagenet"
    assert meta["input_size"] == size and meta["source_sha256"]
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    ref.load_state_dict({k: v for k, v in state.items() if "num_batches" not in k})
    x = np.random.default_rng(3).standard_normal((2, 3, size, size)).astype(np.float32)
    np.testing.assert_array_equal(model.eval().forward(x), ref.eval().forward(x))


def test_convert_to_float64_gives_a_float64_backbone(tmp_path):
    """--dtype float64: the .json records it, so load_backbone builds the model in float64."""
    state = torch_like_state(create("wrn10_1", 4), seed=0)
    save_file(state, str(tmp_path / "w.safetensors"))
    convert(tmp_path / "w.safetensors", "wrn10_1", tmp_path / "bb.npz", dtype="float64")
    model, meta = load_backbone(tmp_path / "bb.npz")
    assert meta["dtype"] == "float64"
    assert {v.dtype for v in model.state_dict().values()} == {np.dtype(np.float64)}


def test_convert_lists_every_problem_and_writes_nothing(tmp_path):
    state = torch_like_state(create("wrn10_1", 4), seed=0)
    state.pop("layer1.0.conv2.weight")
    state["layer9.extra.weight"] = np.zeros(3, np.float32)
    state["bn1.weight"] = np.zeros(5, np.float32)
    src = tmp_path / "w.safetensors"
    save_file(state, str(src))
    before = listing(tmp_path)
    with pytest.raises(ConvertError) as err:
        convert(src, "wrn10_1", tmp_path / "bb.npz")
    msg = str(err.value)
    assert "1 missing: layer1.0.conv2.weight" in msg and "1 unexpected: layer9.extra.weight" in msg
    assert "1 wrong shape: bn1.weight (5,) (model: (16,))" in msg and "\n" not in msg
    assert listing(tmp_path) == before


def test_truncated_and_unknown_files_give_one_line(tmp_path):
    state = torch_like_state(create("wrn10_1", 4), seed=0)
    good = tmp_path / "w.safetensors"
    save_file(state, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "w.npz", **state)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:300])
    (tmp_path / "w.bin").write_bytes(b"x")
    before = listing(tmp_path)
    for bad, match in (("cut.safetensors", "not a readable .safetensors"), ("cut.npz", "not a readable .npz"),
                       ("w.bin", "unknown weights format"), ("nothing.npz", "no such file")):
        with pytest.raises(ConvertError, match=match):
            convert(tmp_path / bad, "wrn10_1", tmp_path / "bb.npz")
    with pytest.raises(ConvertError, match="unknown model 'resnet101'"):
        convert(good, "resnet101", tmp_path / "bb.npz")
    with pytest.raises(ConvertError, match="must end in .npz"):
        convert(good, "wrn10_1", tmp_path / "bb.pt")
    for acc in (150.0, -1.0, float("nan")):  # a percentage; NaN would even make the .json invalid
        with pytest.raises(ConvertError, match="--test-acc is a test accuracy in percent"):
            convert(good, "wrn10_1", tmp_path / "bb.npz", test_acc=acc)
    assert listing(tmp_path) == before


def test_convert_out_is_new_or_an_earlier_backbone_never_another_file(tmp_path):
    """The rule of pretrain --save: an existing --out is replaced only when it is a backbone."""
    save_file(torch_like_state(create("wrn10_1", 4), seed=0), str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "mine.npz", a=np.arange(3))              # the user's own .npz
    (tmp_path / "orphan.json").write_text("{}")                   # a .json without its .npz
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out, says in (("mine.npz", "exists and is not an npmask backbone (no mine.json"),
                      ("orphan.npz", "orphan.json exists without its .npz")):
        with pytest.raises(SystemExit) as e:
            convert_cli.main([str(tmp_path / "w.safetensors"), "--model", "wrn10_1",
                              "--out", str(tmp_path / out)])
        msg = str(e.value.code)
        assert msg.startswith(f"python -m npmask.convert: error: --out {tmp_path / out}"), msg
        assert says in msg and "\n" not in msg
    with pytest.raises(ConvertError, match="not an npmask backbone"):    # the API: convert's error
        convert(tmp_path / "w.safetensors", "wrn10_1", tmp_path / "mine.npz")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    convert(tmp_path / "w.safetensors", "wrn10_1", tmp_path / "bb.npz")
    convert(tmp_path / "w.safetensors", "wrn10_1", tmp_path / "bb.npz", domain="again")
    assert read_info(tmp_path / "bb.npz")["domain"] == "again"    # an earlier backbone: replaced


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)       # import torch -> ImportError
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(ConvertError) as err:
        read_state_dict(tmp_path / "w.pth")
    msg = str(err.value)
    assert "torch, which is not installed" in msg and "weights_only=True" in msg and "w.safetensors" in msg
    assert "\n" not in msg


def test_no_pickle_anywhere():
    for mod in ("convert.py", "export.py"):
        text = open(os.path.join(ROOT, "npmask", mod), encoding="utf-8").read()
        assert "allow_pickle=True" not in text and "import pickle" not in text
        for line in text.splitlines():
            if "torch.load(" in line:               # every call (and the hint printed to users) is safe
                assert "weights_only=True" in line, line


def test_cli_one_line_error_and_success(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    state = torch_like_state(create("wrn10_1", 3), seed=0)
    state["fc.weight"] = state["fc.weight"][:, :5]
    save_file(state, str(tmp_path / "bad.safetensors"))
    r = subprocess.run([sys.executable, "-m", "npmask.convert", str(tmp_path / "bad.safetensors"), "--model",
                        "wrn10_1", "--out", str(tmp_path / "bb.npz")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("python -m npmask.convert: error: the weights do not fit") and "fc.weight" in r.stderr
    assert not (tmp_path / "bb.npz").exists() and not (tmp_path / "bb.json").exists()


# ---------------------------------------------------------------------------- export
def randomise_domain(net, seed):
    rng = np.random.default_rng(seed)
    for m in net.modules():
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            m.params["mask_real"][...] = rng.uniform(-1, 1, m.params["mask_real"].shape)
            for j in range(4):
                if f"k{j}" in m.params:
                    lo, hi = (0.8, 1.2) if j == 0 else (-0.02, 0.02)   # k1..k3 act on every weight
                    m.params[f"k{j}"][...] = rng.uniform(lo, hi, m.params[f"k{j}"].shape)
        elif "running_var" in m.buffers:
            for k in ("weight", "bias"):
                if k in m.params:
                    m.params[k][...] += rng.uniform(-0.2, 0.2, m.params[k].shape)
            m.buffers["running_mean"][...] = rng.uniform(-0.1, 0.1, m.buffers["running_mean"].shape)
        elif "weight" in m.params and m.requires_grad("weight"):        # finetune copies
            m.params["weight"][...] *= rng.uniform(0.5, 1.5, m.params["weight"].shape)


def make_backbone(tmp_path, name, size, classes=6):
    state = torch_like_state(create(name, classes, input_size=size), seed=4)
    save_file(state, str(tmp_path / "src.safetensors"))
    convert(tmp_path / "src.safetensors", name, tmp_path / "bb.npz", input_size=size)
    return load_backbone(tmp_path / "bb.npz")[0]


@pytest.mark.parametrize("name,size,variant", [
    ("wrn10_1", 16, "full"), ("wrn10_1", 16, "piggyback"), ("wrn10_1", 16, "finetune"),
    ("wrn10_1", 16, "classifier_only"), ("wrn10_1", 16, "full_channelwise"),
    ("densenet121", 32, "full"), ("resnet26_ra", 16, "simple")])
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_gives_a_plain_model_with_the_domains_logits(tmp_path, name, size, variant, fmt):
    backbone = make_backbone(tmp_path, name, size)
    md = MultiDomainModel(backbone)
    randomise_domain(md.add_domain("d", 3, variant, seed=5), seed=6)
    save_domain(md, "d", tmp_path / "d.npz")
    arrays = export_domain(tmp_path / "d.npz", tmp_path / "bb.npz", tmp_path / f"x.{fmt}")
    loaded = load_file(str(tmp_path / "x.safetensors")) if fmt == "safetensors" else \
        dict(np.load(tmp_path / "x.npz", allow_pickle=False))
    assert sorted(loaded) == sorted(backbone.state_dict()) == sorted(arrays)
    plain = create(name, 3, input_size=size)
    plain.load_state_dict(loaded, strict=True)
    x = np.random.default_rng(7).standard_normal((2, 3, size, size)).astype(np.float32)
    got, want = plain.eval().forward(x), md.predict(x, domain="d")
    assert np.isfinite(want).all() and np.abs(want).max() > 1e-2      # a real comparison
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    dense = md.export_dense("d")
    for k, v in dense.items():
        np.testing.assert_array_equal(v, loaded[k], err_msg=k)
    if variant != "classifier_only":          # the export really differs from the backbone
        assert any(not np.array_equal(dense[k], v) for k, v in backbone.state_dict().items() if not k.startswith("fc"))


def test_export_dense_is_the_transform(tmp_path):
    backbone = create("wrn10_1", 4, input_size=16).eval()
    md = MultiDomainModel(backbone)
    net = md.add_domain("d", 2, "full", seed=0)
    randomise_domain(net, 1)
    layer = net.layer1[0].conv1
    W, M = layer.weight, layer.mask()
    k0, k1, k2, k3 = (float(np.asarray(k).reshape(-1)[0]) for k in layer.ks)
    expected = k0 * W + k1 + k2 * M + k3 * W * M
    np.testing.assert_allclose(md.export_dense("d")["layer1.0.conv1.weight"], expected, rtol=1e-6, atol=1e-6)
    assert md.export_dense("d")["layer1.0.bn1.running_mean"] is not net.layer1[0].bn1.buffers["running_mean"]


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_an_export_that_fails_before_its_rename_keeps_the_earlier_export(tmp_path, monkeypatch, fmt):
    """The file is written beside --out and renamed into place: until then --out keeps its old
    content, and no temporary file stays behind (a plain open(out, "wb") went unnoticed)."""
    from npmask import io as npmask_io
    md = MultiDomainModel(make_backbone(tmp_path, "wrn10_1", 16))
    md.add_domain("d", 3, "full", seed=5)
    save_domain(md, "d", tmp_path / "d.npz")
    out = tmp_path / f"x.{fmt}"
    out.write_bytes(b"the earlier export")
    before = listing(tmp_path)

    def no_rename(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(npmask_io.os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated crash"):
        export_domain(tmp_path / "d.npz", tmp_path / "bb.npz", out)
    assert out.read_bytes() == b"the earlier export"
    assert listing(tmp_path) == before


def test_export_name_loads_a_domain_stored_under_the_backbones_domain_name(tmp_path):
    """A domain saved as "base" clashes with the pretraining domain: --name renames it on load."""
    backbone = make_backbone(tmp_path, "wrn10_1", 16)
    md = MultiDomainModel(backbone, base_domain="imagenet")
    randomise_domain(md.add_domain("base", 3, "full", seed=5), seed=6)
    save_domain(md, "base", tmp_path / "d.npz")
    with pytest.raises(ExportError, match="named 'base', as the backbone's pretraining domain.*--name"):
        export_domain(tmp_path / "d.npz", tmp_path / "bb.npz", tmp_path / "x.npz")
    arrays = export_domain(tmp_path / "d.npz", tmp_path / "bb.npz", tmp_path / "x.npz", name="other")
    for k, v in md.export_dense("base").items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=k)


def test_export_errors_name_the_file_once(tmp_path):
    backbone = make_backbone(tmp_path, "wrn10_1", 16)
    md = MultiDomainModel(backbone)
    md.add_domain("d", 3, "full", seed=5)
    save_domain(md, "d", tmp_path / "d.npz")
    (tmp_path / "text.npz").write_text("not an npz\n")
    for dom, bb, named in ((tmp_path / "d.npz", tmp_path / "gone.npz", "gone.npz"),
                           (tmp_path / "text.npz", tmp_path / "bb.npz", "text.npz")):
        with pytest.raises(ExportError) as e:
            export_domain(dom, bb, tmp_path / "x.npz")
        assert str(e.value).count(named) == 1, str(e.value)
    assert not (tmp_path / "x.npz").exists()


def test_export_errors_write_nothing(tmp_path):
    backbone = make_backbone(tmp_path, "wrn10_1", 16)
    md = MultiDomainModel(backbone)
    md.add_domain("d", 3, "full", seed=5)
    save_domain(md, "d", tmp_path / "d.npz")
    other = tmp_path / "other"
    other.mkdir()
    make_backbone(other, "wrn10_1", 16, classes=4)  # other weights: another fingerprint
    (tmp_path / "cut.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:200])
    before = listing(tmp_path)
    for dom, bb, out, match in ((tmp_path / "d.npz", other / "bb.npz", "x.safetensors", "another backbone"),
                                (tmp_path / "cut.npz", tmp_path / "bb.npz", "x.safetensors", "cut.npz"),
                                (tmp_path / "d.npz", tmp_path / "bb.npz", "x.pt", "must end in"),
                                (tmp_path / "none.npz", tmp_path / "bb.npz", "x.npz", "no such domain file")):
        with pytest.raises(ExportError, match=match):
            export_domain(dom, bb, tmp_path / out)
    kept = {p: p.read_bytes() for p in (tmp_path / "bb.npz", tmp_path / "d.npz")}
    for out, what in (("bb.npz", "the backbone"), ("d.npz", "the domain file")):  # --out = an input
        with pytest.raises(ExportError, match=f"--out .*{out} is {what} the export reads"):
            export_domain(tmp_path / "d.npz", tmp_path / "bb.npz", tmp_path / out)
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert listing(tmp_path) == before
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "npmask.export", str(tmp_path / "d.npz"), "--backbone",
                        str(other / "bb.npz"), "--out", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and r.stderr.startswith("python -m npmask.export: error:")
    assert r.stderr.strip().count("\n") == 0 and listing(tmp_path) == before
    r = subprocess.run([sys.executable, "-m", "npmask.export", str(tmp_path / "d.npz"), "--backbone",
                        str(tmp_path / "bb.npz"), "--out", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "written to" in r.stdout and (tmp_path / "x.safetensors").is_file()
    json.loads((tmp_path / "bb.json").read_text())
