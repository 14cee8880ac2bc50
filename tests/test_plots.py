"""Plots: files written without touching matplotlib's backend (notebooks keep inline figures),
layer names on the masks/k's axis, a y label on every panel."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from npmask.masking.inspect import mask_statistics, mask_statistics_figure
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


def test_learning_curves_label_every_panel():
    fig = learning_curves_figure(RECORDS)
    assert len(fig.axes) == 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "loss", "accuracy (%)", "accuracy (%)"]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
