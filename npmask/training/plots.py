"""Learning curves of a run, drawn from its ``metrics.jsonl`` (PNG, matplotlib's Agg backend).

One column per domain: the top panel shows the training loss and the test loss per epoch, the
bottom panel the training and test accuracy. Mask-density and k-value plots (figures 3 and 4 of
the paper) are drawn by :mod:`npmask.masking.inspect`.
"""
from __future__ import annotations

import math


def _pyplot():
    # Imported here, not at the top: pyplot takes ~0.7 s to import and only the end of a run draws.
    import matplotlib
    matplotlib.use("Agg", force=False)  # no display needed; keeps working over ssh and in CI
    import matplotlib.pyplot as plt  # the heavy part (see above)
    return plt


def plot_learning_curves(records: list[dict], path, title: str = "") -> str:
    """Draw the per-epoch records of every domain into ``path`` (PNG); returns the path.

    ``records`` are metrics.jsonl lines with at least ``domain``, ``epoch``, ``train_loss``,
    ``train_acc`` and, when evaluated, ``test_loss``/``test_acc``.
    """
    plt = _pyplot()
    epochs = [r for r in records if r.get("kind", "epoch") == "epoch" and "domain" in r]
    domains = list(dict.fromkeys(r["domain"] for r in epochs))
    ncols = max(1, len(domains))
    fig, axes = plt.subplots(2, ncols, figsize=(3.2 * ncols + 0.6, 5.4), squeeze=False)
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
        ax_loss.set_ylabel("loss" if j == 0 else "")
        ax_acc.set_ylabel("accuracy (%)" if j == 0 else "")
        ax_acc.set_xlabel("epoch")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if j == 0:
            ax_loss.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
