"""The audit's reports: markdown (``audit.md``), console lines and the files it writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from . import probes
from .audit_checks import (
    MARKS_COVER,
    MARKS_MIN_FILES,
    MARKS_PRECISION,
    PREDICTS_ACCURACY,
    PREDICTS_MARGIN,
    SEPARATES_COVER,
    SEPARATES_LEAK,
    _pct,
)
from .audit_files import ATTRIBUTES
from .fileio import write_json, write_text

MAX_LISTED_PAIRS = 50  # in the markdown; audit.json keeps up to MAX_STORED_PAIRS


# ---------------------------------------------------------------- reports


def summary_line(result: dict) -> str:
    """One line: files, classes, warnings, duplicate pairs."""
    dup = result["duplicates"]
    count = "across_splits" if result["splits"] else "pairs"
    n_exact, n_near = (dup[kind]["counts"][count] for kind in ("exact", "near"))
    where = "across splits" if result["splits"] else "in all"
    return (f"audited {result['files']} files ({len(result['unreadable'])} unreadable) in "
            f"{len(result['classes'])} classes: {len(result['warnings'])} warnings, "
            f"{n_exact} exact and {n_near} near-duplicate pairs {where}")


def warning_text(w: dict) -> str:
    """A warning's message, saying where it comes from when that is not the files themselves."""
    return w["message"] + (" (manifest originals)" if w["origin"] == "manifest originals" else "")


def probe_lines(result: dict) -> list[str]:
    """One line per bias probe that ran: its feature group, AUC ± std over folds, and WARNING above the limit."""
    bias = result["bias_probes"]
    return [f"bias probe, {probes.FEATURE_GROUPS[key]}: AI vs {probes.HUMAN} ROC AUC {_fmt_auc(p)} "
            f"({bias['images']} images, {bias['folds']} grouped folds)" + (" WARNING" if p["warning"] else "")
            for key, p in bias["probes"].items()]


def console_lines(result: dict) -> list[str]:
    """What the command line prints after the summary line: the warnings, then the bias probes."""
    return [f"warning: {warning_text(w)}" for w in result["warnings"]] + probe_lines(result)


def _fmt_auc(p: dict) -> str:
    return "-" if p["auc"] is None else f"{p['auc']:.3f} ± {p['std']:.3f}"


def _fmt_counts(counts: dict, limit: int = 4) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "") if items else "-"


def _fmt_spread(s: dict) -> str:
    return f"{s['min']} / {s['median']:g} / {s['max']}" if s else "-"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def _class_table(first: str, summaries: dict[str, dict], classes: list[str],
                 rows: Sequence[tuple[str, Callable[[dict], object]]]) -> list[str]:
    """A table with a column per class: one row per (label, how to show a class summary)."""
    return _table([first] + classes, [[label] + [show(summaries[c]) for c in classes] for label, show in rows])


# Rows of the per-class table: label, and how to show it from a class_summary().
PER_CLASS_ROWS: tuple[tuple[str, Callable[[dict], object]], ...] = (
    ("files", lambda s: s["files"]),
    ("format", lambda s: _fmt_counts(s["format"])),
    ("width min / median / max", lambda s: _fmt_spread(s["width"])),
    ("height min / median / max", lambda s: _fmt_spread(s["height"])),
    ("common sizes", lambda s: _fmt_counts(dict(s["common_sizes"]))),
    ("JPEG quality (~ = not IJG tables)", lambda s: _fmt_counts(s["jpeg_quality"])),
    ("chroma subsampling", lambda s: _fmt_counts(s["subsampling"])),
    ("colour mode", lambda s: _fmt_counts(s["mode"])),
    ("alpha channel", lambda s: s["alpha"]),
    ("EXIF", lambda s: s["exif"]),
    ("EXIF Software", lambda s: _fmt_counts(s["exif_software"], 2)),
    ("EXIF Make", lambda s: _fmt_counts(s["exif_make"], 2)),
    ("ICC profile", lambda s: s["icc"]),
    ("XMP", lambda s: s["xmp"]),
    ("PNG text chunks", lambda s: f"{s['png_text']} ({_fmt_counts(s['png_text_keys'], 3)})"),
    ("metadata naming a generator", lambda s: s["ai_metadata"]),
    ("file bytes min / median / max", lambda s: _fmt_spread(s["file_bytes"])),
    ("blank (near-uniform)", lambda s: s["blank"]),
)
# The same for the manifest's originals (manifest_summary()["originals"]).
ORIGINAL_ROWS = PER_CLASS_ROWS[:5]

RULES = (f"Rules: *predicts* = the attribute alone, as a leave-one-out lookup table, is right for "
         f">= {_pct(PREDICTS_ACCURACY)} of files and >= {PREDICTS_MARGIN * 100:.0f} points above the "
         f"largest class (all classes or any pair); *separates* = one value covers >= "
         f"{_pct(SEPARATES_COVER)} of a class and <= {_pct(SEPARATES_LEAK)} of the rest; *marks* = "
         f">= {_pct(MARKS_PRECISION)} of the files with a value are in one class "
         f"(>= {MARKS_MIN_FILES} files, >= {_pct(MARKS_COVER)} of the class); *probe* = a bias probe's "
         f"cross-validated AI-vs-human ROC AUC is above {probes.WARN_AUC} (see Bias probes).")


def to_markdown(result: dict) -> str:
    """The audit as a human-readable markdown report: warnings first, then tables."""
    classes = result["classes"]
    md = [f"# Dataset audit: {result['data_dir']}", "", summary_line(result) + ".", ""]
    md += _table(["split"] + classes, [[s] + [c.get(k, 0) for k in classes]
                                       for s, c in result["counts"].items()]) + [""]
    md += [f"## Warnings ({len(result['warnings'])})", ""]
    md += [f"- {warning_text(w)}" for w in result["warnings"]] or ["None."]
    md += ["", RULES, ""]
    md += ["## Per class", ""] + _class_table("attribute", result["per_class"], classes, PER_CLASS_ROWS) + [""]
    if result["separation"]:
        md += ["## Each attribute alone (all classes)", ""]
        md += _table(["attribute", "distinct values", "lookup accuracy", "largest class"],
                     [[ATTRIBUTES[k], s["n_values"], s.get("accuracy", "-"), s.get("baseline", "-")]
                      for k, s in result["separation"].items()]) + [""]
    md += _probes_markdown(result["bias_probes"], classes)
    if result["ai_metadata"]:
        md += ["## Metadata naming a generator", ""]
        md += [f"- `{m['path']}` ({m['class']}): {m['found']}" for m in result["ai_metadata"]] + [""]
    md += _duplicates_markdown(result["duplicates"])
    if "manifest" in result:
        md += _manifest_markdown(result["manifest"], classes)
    if result["unreadable"]:
        md += ["## Unreadable files", ""]
        md += [f"- `{u['path']}`: {u['error']}" for u in result["unreadable"]] + [""]
    return "\n".join(md)


def _probes_markdown(bias: dict, classes: list[str]) -> list[str]:
    ai = ", ".join(c for c in classes if c != probes.HUMAN) or "-"
    md = ["## Bias probes", "",
          f"Can low-level statistics alone, without the content, tell AI ({ai}) from {probes.HUMAN}? "
          "Each probe is a logistic regression on standardised features, scored by ROC AUC in "
          f"{bias['folds']}-fold cross-validation (StratifiedGroupKFold, seed {bias['seed']}) grouped by "
          f"{bias['grouped_by']}, so that no group sits on both sides of a split: {bias['images']} images "
          f"({bias['ai']} AI, {bias['human']} {probes.HUMAN}) in {bias['groups']} groups. "
          f"Above {bias['warn_auc']} it warns: a detector can score that much from these statistics.", ""]
    if bias["skipped"]:
        return md + [f"Not run: {bias['skipped']}.", ""]
    md += _table(["features", "what they are", "n features", "ROC AUC (mean ± std over folds)", "images", "warning"],
                 [[probes.FEATURE_GROUPS[k], probes.DESCRIPTIONS[k], p["features"], _fmt_auc(p), bias["images"],
                   "**WARNING**" if p["warning"] else ""] for k, p in bias["probes"].items()]) + [""]
    warned = [k for k, p in bias["probes"].items() if p["warning"]]
    if warned:
        md += [f"**WARNING**: AUC above {bias['warn_auc']} for "
               + ", ".join(probes.FEATURE_GROUPS[k] for k in warned) + ".", ""]
    return md + ([bias["note"] + ".", ""] if bias["note"] else [])


def _duplicates_markdown(dup: dict) -> list[str]:
    md = ["## Duplicates", "", f"Exact: {dup['method']['exact']}. Near: {dup['method']['near']}.", ""]
    rows = []
    for kind in ("exact", "near"):
        c = dup[kind]["counts"]
        within = ", ".join(f"{s} {n}" for s, n in c["within_split"].items()) or "0"
        rows.append([kind, c["pairs"], c["across_splits"], within, c["across_classes"]])
    md += _table(["kind", "pairs", "across splits", "within split", "across classes"], rows) + [""]
    for kind in ("exact", "near"):
        pairs = dup[kind]["pairs"]
        if not pairs:
            continue
        shown = f", first {MAX_LISTED_PAIRS}" if len(pairs) > MAX_LISTED_PAIRS else ""
        md += [f"{kind.capitalize()} pairs ({len(pairs)}{shown}; across splits first):", ""]
        for p in pairs[:MAX_LISTED_PAIRS]:
            dist = f" (pHash {p['phash_distance']}, dHash {p['dhash_distance']})" if "phash_distance" in p else ""
            md.append(f"- `{p['a']}` / `{p['b']}`{dist}")
        md.append("")
    if dup["blank"]:
        md += [f"Blank (near-uniform) images, not hashed ({len(dup['blank'])}):", ""]
        md += [f"- `{p}`" for p in dup["blank"][:MAX_LISTED_PAIRS]] + [""]
    return md


def _manifest_markdown(man: dict, classes: list[str]) -> list[str]:
    md = ["## Manifest", "", f"`{man['path']}`: {man['rows']} rows, {man['matched_files']} files matched, "
          f"{man['files_without_row']} without a row; {len(man['label_mismatches'])} label mismatches; "
          f"prompt groups in more than one split: {man['groups_across_splits']['count']} of "
          f"{man['groups_across_splits']['checked']}; original files in more than one split: "
          f"{man['originals_across_splits']['count']}.", ""]
    cols = sorted({k for c in man["sources"].values() for k in c})
    md += ["Files per source:", ""]
    md += _table(["source"] + cols, [[s] + [c.get(k, 0) for k in cols] for s, c in man["sources"].items()])
    md.append("")
    if man["originals"]:
        md += ["What the originals looked like before normalisation (manifest orig_* columns):", ""]
        md += _class_table("original", man["originals"], [c for c in classes if c in man["originals"]],
                           ORIGINAL_ROWS) + [""]
    return md


def write_outputs(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    return [write_json(out / "audit.json", result), write_text(out / "audit.md", to_markdown(result))]
