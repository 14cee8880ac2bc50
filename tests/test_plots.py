"""Plots: files written without touching matplotlib's backend (notebooks keep inline figures),
layer names on the masks/k's axis, a y label on every panel."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from npmask.masking.inspect import mask_statistics, mask_statistics_figure, plot_mask_statistics
from npmask.masking.layers import _MaskedLayer
from npmask.models import create
from npmask.multidomain import MultiDomainModel
from npmask.training.plots import learning_curves_figure

from test_train import REPO

RECORDS = [{"domain": d, "epoch": e, "train_loss": 1.0 / e, "train_acc": 50 + e, "test_loss": 1.1 / e,
            "test_acc": 40 + e} for d in ("a", "b") for e in (1, 2)]


def test_drawing_to_files_keeps_the_notebooks_backend(tmp_path):
    code = f"""
import matplotlib, matplotlib.pyplot as plt
from npmask.models import create
from npmask.multidomain import MultiDomainModel
from npmask.masking.inspect import mask_statistics, plot_mask_statistics
from npmask.training.plots import plot_learning_curves
before = matplotlib.get_backend()
plot_learning_curves({RECORDS!r}, r"{tmp_path / 'curves.png'}")
md = MultiDomainModel(create("wrn10_1", 3, input_size=8))
md.add_domain("t", 2, "full")
plot_mask_statistics({{"t": mask_statistics(md.network("t"))}}, r"{tmp_path / 'masks.png'}")
print(before, matplotlib.get_backend())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"MPLBACKEND": "svg", "PYTHONPATH": str(REPO),
                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "svg"]
    for name in ("curves.png", "masks.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "masks.png"]  # no temporaries


def test_masks_figure_names_the_layers_and_labels_every_panel():
    md = MultiDomainModel(create("wrn10_1", 3, input_size=8))
    md.add_domain("full", 2, "full")
    md.add_domain("pb", 2, "piggyback")
    stats = {d: mask_statistics(md.network(d)) for d in ("full", "pb")}
    fig = mask_statistics_figure(stats, title="t")
    names = [r["layer"] for r in stats["full"]]
    assert names[:2] == ["conv1", "layer1.0.conv1"]
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert ax.get_ylabel()
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), [100 * r["density"] for r in stats["full"]])


def _three_domains():
    """Statistics of a Piggyback domain (no k learned), a full one (scalar k1..k3) and a channel-wise
    one whose k's differ per channel, so that a channel mean differs from any one channel."""
    md = MultiDomainModel(create("wrn10_1", 3, input_size=8))
    for name, variant in (("pb", "piggyback"), ("full", "full"), ("cw", "full_channelwise")):
        md.add_domain(name, 2, variant)
    rng = np.random.default_rng(0)
    for m in md.network("cw").modules():
        if isinstance(m, _MaskedLayer):
            for j in (1, 2, 3):
                m.params[f"k{j}"][...] = rng.standard_normal(m.params[f"k{j}"].shape)
    return {d: mask_statistics(md.network(d)) for d in ("pb", "full", "cw")}


def test_mask_statistics_rows_name_the_learned_ks_and_give_scalars_as_floats():
    stats = _three_domains()
    assert all(r["learned"] == [] for r in stats["pb"])
    full = stats["full"][0]
    assert full["learned"][-3:] == ["k1", "k2", "k3"]
    assert all(type(full[k]) is float for k in ("k0", "k1", "k2", "k3"))   # one learned scalar too
    cw = stats["cw"][0]
    assert isinstance(cw["k1"], list) and len(cw["k1"]) == cw["shape"][0]


def test_masks_figure_draws_learned_ks_only_as_channel_means_in_each_domains_colour():
    stats = _three_domains()
    stats["pb"] = stats["pb"][:3]               # fewer layers: the x axis takes the longest domain's
    fig = mask_statistics_figure(stats, title="three domains")
    assert fig.get_suptitle() == "three domains"
    names = [r["layer"] for r in stats["full"]]
    density, k_axes = fig.axes[0], fig.axes[1:]
    assert [t.get_text() for t in density.get_xticklabels()] == names
    assert [line.get_color() for line in density.lines] == ["C0", "C1", "C2"]
    for ax, key in zip(k_axes, ("k1", "k2", "k3")):
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        # Piggyback's k's are fixed: not drawn; the others keep their density panel colour
        assert [line.get_label() for line in ax.lines if line.get_label() in stats] == ["full", "cw"]
        assert [line.get_color() for line in ax.lines[:2]] == ["C1", "C2"]
        np.testing.assert_allclose(ax.lines[1].get_ydata(), [np.mean(r[key]) for r in stats["cw"]])


def test_masks_figure_refuses_nothing_to_plot():
    with pytest.raises(ValueError, match="nothing to plot"):
        mask_statistics_figure({})


def test_mask_plot_makes_its_folder_and_leaves_nothing_behind_when_saving_fails(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    stats = {"full": _three_domains()["full"]}
    folder = tmp_path / "new" / "folder"
    path = plot_mask_statistics(stats, folder / "masks.png")
    first = (folder / "masks.png").read_bytes()
    assert path == str(folder / "masks.png") and first[:8] == b"\x89PNG\r\n\x1a\n"

    def failing_savefig(self, fname, **kwargs):                 # a full disk: half a file, then an error
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("No space left on device")
    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_mask_statistics(stats, folder / "masks.png")
    assert os.listdir(folder) == ["masks.png"]                   # no temporary left
    assert (folder / "masks.png").read_bytes() == first          # the earlier plot untouched


def test_learning_curves_label_every_panel():
    fig = learning_curves_figure(RECORDS)
    assert len(fig.axes) == 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "loss", "accuracy (%)", "accuracy (%)"]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
