"""Learning curves of a run, drawn from its ``metrics.jsonl`` (PNG).

One column per domain: the top panel shows the training loss and the test loss per epoch, the
bottom panel the training and test accuracy; every panel has its own axis labels. Mask-density and
k-value plots (figures 3 and 4 of the paper) are drawn by :mod:`npmask.masking.inspect`.

The figure is a bare :class:`matplotlib.figure.Figure` (no pyplot), saved to a file: drawing never
selects or switches matplotlib's backend, so a notebook that trains a model keeps its inline plots.
"""
from __future__ import annotations

import math
import os


def learning_curves_figure(records: list[dict], title: str = ""):
    """The learning curves of ``records`` as a Figure (show it in a notebook, or ``savefig``).

    ``records`` are metrics.jsonl lines with at least ``domain``, ``epoch``, ``train_loss``,
    ``train_acc`` and, when evaluated, ``test_loss``/``test_acc``.
    """
    # Imported here, not at the top: matplotlib takes ~0.7 s to import and only the end of a run draws.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator  # (as above)
    epochs = [r for r in records if r.get("kind", "epoch") == "epoch" and "domain" in r]
    domains = list(dict.fromkeys(r["domain"] for r in epochs))
    ncols = max(1, len(domains))
    fig = Figure(figsize=(3.2 * ncols + 0.6, 5.4))
    axes = fig.subplots(2, ncols, squeeze=False)
    for j, d in enumerate(domains):
        rs = sorted((r for r in epochs if r["domain"] == d), key=lambda r: r["epoch"])
        ep = [r["epoch"] for r in rs]
        ax_loss, ax_acc = axes[0, j], axes[1, j]
        ax_loss.plot(ep, [r["train_loss"] for r in rs], "o-", label="train")
        test = [(r["epoch"], r["test_loss"], r["test_acc"]) for r in rs
                if r.get("test_acc") is not None and not math.isnan(r["test_acc"])]
        if test:
            ax_loss.plot([t[0] for t in test], [t[1] for t in test], "s--", label="test")
        ax_acc.plot(ep, [r["train_acc"] for r in rs], "o-", label="train")
        if test:
            ax_acc.plot([t[0] for t in test], [t[2] for t in test], "s--", label="test")
        ax_loss.set_title(d)
        ax_loss.set_ylabel("loss")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_xlabel("epoch")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if j == 0:
            ax_loss.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path, dpi: int = 110) -> str:
    """``fig.savefig`` to a PNG at ``path`` atomically (folder created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def plot_learning_curves(records: list[dict], path, title: str = "") -> str:
    """Draw the per-epoch records of every domain into ``path`` (PNG); returns the path."""
    return save_figure(learning_curves_figure(records, title), path)
