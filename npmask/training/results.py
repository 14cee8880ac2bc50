"""The results table of a run or a comparison, in the shape of tables 1 and 5 of the paper.

One row per method (variant or baseline), one column per domain (test accuracy in %; the
pretraining domain first, scored like the others as in tables 1-4), then the S-score (eq. 3, with Emax from the fine-tuning baseline), ``# Params`` (footnote 3: the
total size of all domains relative to the backbone, classifiers excluded, from the stored files)
and S_p = S / # Params. A number that cannot be computed is shown as "n/a" and a note below the
table says why (e.g. no fine-tuning run to take Emax from); a row's ``failed`` ({domain: error})
marks the cells of jobs that failed as "failed". A row averaged over several seeds carries
``acc_std``, ``score_std``, ``params_std`` and ``sp_std`` and its cells read "mean ± std".
"""
from __future__ import annotations

import math
import statistics


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _cell(row: dict, key: str, digits: int, domain: str | None = None) -> str:
    """``row[key]`` (or ``row[key][domain]``) formatted, with " ± std" when the row has one."""
    if domain is None:
        v, sd = row.get(key), row.get(key + "_std")
    else:
        v, sd = (row.get(key) or {}).get(domain), (row.get(key + "_std") or {}).get(domain)
    text = _fmt(v, digits)
    if sd is not None and text != "n/a":
        text += f" ± {_fmt(sd, digits)}"
    return text


def _cells(r: dict, domains) -> list:
    failed = r.get("failed") or {}
    return [r["method"], *[("failed" if d in failed else _cell(r, "acc", 1, d)) for d in domains],
            _cell(r, "score", 0), _cell(r, "params", 3), _cell(r, "sp", 0)]


def markdown_table(rows: list[dict], domains: list[str]) -> str:
    """Markdown table of ``rows``: each ``{"method", "acc": {domain: %}, "score", "params", "sp"}``."""
    head = ["Method", *domains, "S-score", "# Params", "S_p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, domains)) + " |")
    return "\n".join(lines) + "\n"


def mean_std_row(method: str, runs: list[dict]) -> dict:
    """One row averaging ``runs`` (each a row as above): mean and sample std (ddof=1) per cell.

    A cell is None when any run lacks it; the std is None for a single run.
    """

    def agg(values):
        if not values or any(v is None for v in values):
            return None, None
        mean = statistics.fmean(values)
        return mean, (statistics.stdev(values) if len(values) > 1 else None)

    row = {"method": method, "runs": len(runs), "acc": {}, "acc_std": {}}
    domains = [d for d in runs[0].get("acc", {})] if runs else []
    for d in domains:
        row["acc"][d], row["acc_std"][d] = agg([r.get("acc", {}).get(d) for r in runs])
    for key in ("score", "params", "sp"):
        row[key], row[key + "_std"] = agg([r.get(key) for r in runs])
    failed = {d: e for r in runs for d, e in (r.get("failed") or {}).items()}
    if failed:
        row["failed"] = failed  # a job of some seed failed: that cell is marked, not averaged
    return row


def text_table(rows: list[dict], domains: list[str]) -> str:
    """The same table as plain aligned text, for the terminal."""
    head = ["method", *domains, "S", "#Params", "S_p"]
    body = [_cells(r, domains) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]) + "\n"
