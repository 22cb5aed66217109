"""How ``predict`` results are written: an aligned table that fits a terminal,
CSV or JSON lines, with the verdict cuts in the header and the provenance summary.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import textwrap
from typing import Iterable, TextIO

from .fileio import atomic_path
from .predict import Prediction


def declared_line(declared: dict[str, int]) -> str | None:
    """The summary's second line, in the table's provenance words:
    "by their own metadata: 5 declares_ai, 2 invalid_manifest" (None when no file says anything)."""
    from .provenance import SUMMARIES

    said = [f"{declared[k]} {k}" for k in SUMMARIES if k != "none" and declared.get(k)]
    return textwrap.fill("by their own metadata: " + ", ".join(said), TABLE_WIDTH, subsequent_indent="  ") \
        if said else None


def common_root(files) -> str | None:
    """The folder all files lie under, for the table's short paths (a lone file's own folder)."""
    parents = {os.path.dirname(os.path.abspath(f)) for f in files}
    return os.path.commonpath(list(parents)) if parents else None


# The table fits a 120-column terminal: these columns give way (longest first) down
# to 12 characters each, with an ellipsis; CSV and JSON lines carry every column in full.
TABLE_WIDTH = 120
TABLE_COLUMNS = ("file", "verdict", "p_ai", "generator", "caveats", "provenance", "error", "warnings")
SHRINKABLE = ("file", "caveats", "error", "warnings")


def verdict_cuts(model, threshold: float | None) -> list[float]:
    """The p_ai values the table's verdicts are read against: the AI cut, and the human band's edge."""
    cut = model.threshold if threshold is None else threshold
    low = (model.bands or {}).get("likely_human")
    return [c for c in (cut, None if low is None or cut is None else min(low, cut)) if c is not None]


def _digits(values, cuts, least: int = 4) -> int:
    """Decimals that keep every value apart from every cut it differs from (at most 8).
    Rounding keeps order, so distinct strings show each value on its true side."""
    d = least
    while d < 8 and any(v is not None and v != c and f"{v:.{d}f}" == f"{c:.{d}f}" for v in values for c in cuts):
        d += 1
    return d


def table_header(model, threshold: float | None, digits: int = 4) -> str:
    """The table's first line: where the verdict bands lie."""
    if model.human_label is None:
        return "# no human class in this model: no AI verdict, only class probabilities"
    cuts = verdict_cuts(model, threshold)  # [the AI cut, the human band's edge], as there are
    if not cuts:
        return "# no stored threshold: no verdict (give --threshold P)"
    where = "given with --threshold" if threshold is not None else "stored in the model"
    text = f"# likely AI: p_ai >= {cuts[0]:.{digits}f} ({where})"
    if len(cuts) > 1:
        text += f"; likely human: p_ai <= {cuts[1]:.{digits}f}"
    return text + "; else, or with a caveat, uncertain"


@contextlib.contextmanager
def output_file(path: str | None):
    if path is None:
        yield sys.stdout
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        yield f


def write_predictions(preds: Iterable[Prediction], labels: list[str], fmt: str, out: TextIO, evidence: bool = False,
           header=None, cuts=(), root: str | None = None):
    """Write predictions as they come (csv, jsonl) or aligned at the end (table); yield each.

    CSV and JSON lines carry every column (per-class probabilities, is_ai, the
    full caveat sentences; JSON lines the patch map, and the provenance details
    with ``evidence``).  The table is for reading: paths relative to ``root``,
    the columns of :data:`TABLE_COLUMNS` that are not empty in every row, at
    most :data:`TABLE_WIDTH` characters wide.  Its p_ai and its
    ``header(digits)`` line share one number of decimals, enough that no p_ai is
    rounded onto a cut of ``cuts`` it is not on."""
    columns = list(Prediction("").row(labels, True))
    if fmt == "csv":
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        for p in preds:
            writer.writerow(p.row(labels, True))
            yield p
    elif fmt == "jsonl":
        for p in preds:  # JSON lines carry the patch map too: per-crop p_ai and where each crop lies
            extra = {"provenance": p.provenance} if evidence else {}
            out.write(json.dumps({**p.row(labels, True), "caveats": p.caveats, **extra, "patches": p.patches})
                      + "\n")
            yield p
    else:
        records = []
        for p in preds:
            row = p.row(labels, True)
            row["file"] = os.path.relpath(os.path.abspath(p.path), root) if root else p.path
            # The table names each caveat by its tag; CSV and JSON lines give the sentences.
            row["caveats"] = "; ".join(c.split(":")[0] for c in p.caveats) or None
            records.append(row)
            yield p
        digits = _digits([r["p_ai"] for r in records], cuts)
        if header is not None:
            out.write(header(digits) + "\n")
        shown = [c for c in TABLE_COLUMNS if any(r.get(c) not in (None, "", "none") for r in records)]
        rows = [[f"{r[c]:.{digits}f}" if c == "p_ai" and r[c] is not None else _cell(r.get(c)) for c in shown]
                for r in records]
        widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(shown)]
        while sum(widths) + 2 * (len(widths) - 1) > TABLE_WIDTH:
            j = max((j for j, c in enumerate(shown) if c in SHRINKABLE and widths[j] > 12),
                    key=lambda j: widths[j], default=None)
            if j is None:
                break
            widths[j] -= 1
        for r in [shown] + rows:
            cells = [v if len(v) <= w else _shorten(v, w, middle=c == "file") for v, w, c in zip(r, widths, shown)]
            out.write("  ".join(v.ljust(w) for v, w in zip(cells, widths)).rstrip() + "\n")


def _shorten(text: str, width: int, middle: bool) -> str:
    """``text`` in ``width`` characters with an ellipsis: a path keeps its first
    third (the folder) and its end (the file's name), other text its start."""
    if not middle:
        return text[:width - 1] + "…"
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)
