"""The results table of a run or a comparison, in the shape of tables 1 and 5 of the paper.

One row per method (variant or baseline), one column per target domain (test accuracy in %),
then the S-score (eq. 3, with Emax from the fine-tuning baseline), ``# Params`` (footnote 3: the
total size of all domains relative to the backbone, classifiers excluded, from the stored files)
and S_p = S / # Params. A number that cannot be computed is shown as "n/a" and a note below the
table says why (e.g. no fine-tuning run to take Emax from).
"""
from __future__ import annotations

import math


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def markdown_table(rows: list[dict], domains: list[str]) -> str:
    """Markdown table of ``rows``: each ``{"method", "acc": {domain: %}, "score", "params", "sp"}``."""
    head = ["Method", *domains, "S-score", "# Params", "S_p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["method"]]
        cells += [_fmt(r.get("acc", {}).get(d)) for d in domains]
        cells += [_fmt(r.get("score"), 0), _fmt(r.get("params"), 3), _fmt(r.get("sp"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict], domains: list[str]) -> str:
    """The same table as plain aligned text, for the terminal."""
    head = ["method", *domains, "S", "#Params", "S_p"]
    body = [[r["method"], *[_fmt(r.get("acc", {}).get(d)) for d in domains],
             _fmt(r.get("score"), 0), _fmt(r.get("params"), 3), _fmt(r.get("sp"), 0)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]) + "\n"
