"""What a domain learned, layer by layer: mask density and k values (figures 3 and 4 of the paper).

    stats = mask_statistics(model.network("svhn"))         # one row per masked layer, network order
    plot_mask_statistics({"svhn": stats, "dtd": ...}, "masks.png")
    fig = mask_statistics_figure({"svhn": stats})          # the same figure, to show in a notebook
"""
from __future__ import annotations

import os

import numpy as np

from ..backend import to_numpy
from .layers import _MaskedLayer


def mask_statistics(net) -> list[dict]:
    """Per masked layer, in network (module) order: ``{"layer", "shape", "density", "learned", "k0".."k3"}``.

    density = fraction of ones in M = 1[R >= tau]. Each k is a float (fixed or one learned scalar) or,
    for channel-wise k's, the list of per-channel values (plotted as their mean).
    """
    rows = []
    for name, m in net.named_modules():
        if not isinstance(m, _MaskedLayer):
            continue
        row = {"layer": name, "shape": tuple(int(s) for s in m.weight.shape),
               "density": float(to_numpy(m.mask()).mean()),
               "learned": [f"k{j}" for j in range(4) if f"k{j}" in m.params]}
        for j, k in enumerate(m.ks):
            if isinstance(k, float):
                row[f"k{j}"] = k
            else:
                v = to_numpy(k).astype(float)
                row[f"k{j}"] = float(v[0]) if v.size == 1 else v.tolist()
        rows.append(row)
    return rows


def _mean(v) -> float:
    return float(np.mean(v)) if isinstance(v, list) else float(v)


def mask_statistics_figure(stats_by_domain: dict, title: str | None = None):
    """Mask density per layer per domain, and k1, k2, k3 per layer, as a Figure.

    ``stats_by_domain``: ``{domain: mask_statistics(net)}``. Left panel: percentage of ones in the mask
    per layer (one line per domain, as the paper's figures 3/4 compare domains and Piggyback); the
    other three panels: k1, k2, k3 per layer. The x axis names the layers (``conv1``,
    ``layer1.0.conv1``, ...; those of the domain with the most masked layers); every panel has a
    y label. A bare Figure (no pyplot): drawing it never changes matplotlib's backend.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415  (plotting is optional at import time)

    if not stats_by_domain:
        raise ValueError("nothing to plot: stats_by_domain is empty")
    layers = max((r for r in stats_by_domain.values()), key=len)
    names = [r["layer"] for r in layers]
    fig = Figure(figsize=(16, 3.2 + 0.09 * max((len(n) for n in names), default=0)),
                 constrained_layout=True)
    axes = fig.subplots(1, 4)
    for i, (domain, rows) in enumerate(stats_by_domain.items()):
        if not rows:
            continue
        color = f"C{i % 10}"  # one colour per domain in every panel, even where a k is not drawn
        depth = np.arange(1, len(rows) + 1)
        axes[0].plot(depth, [100 * r["density"] for r in rows], marker="o", ms=3, color=color, label=domain)
        for ax, key in zip(axes[1:], ("k1", "k2", "k3")):
            if not any(key in r["learned"] for r in rows):
                continue  # fixed for this variant (e.g. Piggyback's k3 = 1): nothing learned to show
            ax.plot(depth, [_mean(r[key]) for r in rows], marker="o", ms=3, color=color, label=domain)
    axes[0].set_ylim(0, 105)
    ylabels = ("% of ones in the mask", "k1 (channel mean if per channel)",
               "k2 (channel mean if per channel)", "k3 (channel mean if per channel)")
    for ax, label, ylabel in zip(axes, ("mask density", "k1", "k2", "k3"), ylabels):
        ax.set_title(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_xticks(np.arange(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_xlim(0.5, len(names) + 0.5)
    for ax in axes[1:]:
        ax.axhline(0, color="k", lw=0.6)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_mask_statistics(stats_by_domain: dict, path, title: str | None = None) -> str:
    """Draw :func:`mask_statistics_figure` and save it as a PNG at ``path`` (atomically); returns
    the path."""
    fig = mask_statistics_figure(stats_by_domain, title)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
