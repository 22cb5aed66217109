"""Does one attribute tell the classes apart?  The audit's warning rules, its
per-class and manifest summaries, and the glue to the bias probes
(:mod:`imageorigin.probes`).

Warning rules (every number in a warning is a count or share of files):

* **predicts**: the attribute alone, used as a lookup table (the most common
  class among the *other* files with the same value: leave-one-out, so a value
  seen once predicts nothing), gets the class right for >= 90% of files and at
  least 20 points above always guessing the largest class.  Checked over all
  classes and over every pair of classes (a format can split DALL-E from other
  AI while saying nothing about photographs).
* **separates**: one value covers >= 90% of a class and <= 10% of all other files.
* **marks**: one value is (almost) exclusive to a class: >= 95% of the files
  with it are in that class, at least 2 files and >= 20% of the class have it.
  It does not separate the class, but a model can learn "this value => class".
* **probe**: a bias probe tells AI from human with a cross-validated ROC AUC
  above 0.75 (``probes.WARN_AUC``).
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from . import probes
from .audit_duplicates import BLANK_STD
from .audit_files import aspect, has_originals, jpeg_quality_value, long_side_bucket

# Rule thresholds, documented in the module docstring.
PREDICTS_ACCURACY = 0.90
PREDICTS_MARGIN = 0.20
SEPARATES_COVER = 0.90
SEPARATES_LEAK = 0.10
MARKS_PRECISION = 0.95
MARKS_COVER = 0.20
MARKS_MIN_FILES = 2


# ---------------------------------------------------------------- separation


def make_warning(rule: str, message: str, attribute: str | None = None, origin: str = "files",
             classes: Sequence[str] = (), value: str | None = None, **numbers) -> dict:
    """One entry of the audit's ``warnings``: the rule, what it is about, its numbers, and a message."""
    return {"rule": rule, "attribute": attribute, "origin": origin, "classes": list(classes),
            "value": value, **numbers, "message": message}


def lookup_accuracy(values: Sequence[str], labels: Sequence[str]) -> float:
    """Leave-one-out accuracy of predicting the label from the value alone.

    Each file is given the most common label among the *other* files with the
    same value (ties, and values seen only once, go to the most common label
    overall), so that a value unique to one file earns nothing.
    """
    overall = Counter(labels)
    rank = {c: (-n, c) for c, n in overall.items()}  # tie-break: larger class, then name
    by_value: dict[str, Counter] = defaultdict(Counter)
    for v, y in zip(values, labels):
        by_value[v][y] += 1
    correct = 0
    for counts in by_value.values():
        for y, n in counts.items():
            others = counts.copy()
            others[y] -= 1
            guess = min(overall, key=lambda c: (-others[c], rank[c]))
            correct += n if guess == y else 0
    return correct / len(labels)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def separation_warnings(values: Sequence[str], labels: Sequence[str], attribute: str,
                        name: str, origin: str = "files") -> tuple[dict, list[dict]]:
    """Measure how well one attribute alone tells the classes apart; warn per the module's rules.

    Returns ``(summary, warnings)``: the summary holds the number of distinct
    values and the lookup accuracy and baseline over all classes; each warning
    holds the rule, classes, value and numbers.
    """
    summary, predicts = _predicts(values, labels, attribute, name, origin)
    return summary, predicts + _value_warnings(values, labels, attribute, name, origin)


def _predicts(values: Sequence[str], labels: Sequence[str], attribute: str, name: str,
              origin: str) -> tuple[dict, list[dict]]:
    """The *predicts* rule, over all classes and each pair: at most one warning per attribute."""
    classes = sorted(set(labels))
    summary = {"n_values": len(set(values))}
    scopes = [tuple(classes)] + (list(itertools.combinations(classes, 2)) if len(classes) > 2 else [])
    hits = []  # every scope (all classes, each pair) where the attribute alone predicts the class
    for scope in scopes:
        pairs = [(v, y) for v, y in zip(values, labels) if y in scope]
        if len(pairs) < 4:
            continue
        vs, ys = zip(*pairs)
        acc = lookup_accuracy(vs, ys)
        base = max(Counter(ys).values()) / len(ys)
        if scope == tuple(classes):
            summary.update(accuracy=round(acc, 3), baseline=round(base, 3))
        if acc >= PREDICTS_ACCURACY and acc >= base + PREDICTS_MARGIN:
            hits.append({"classes": list(scope), "files": len(ys), "accuracy": round(acc, 3),
                         "baseline": round(base, 3)})
    if not hits:
        return summary, []
    # One warning per attribute: the first scope in words, the other scopes after it.
    first, more = hits[0], hits[1:]
    what = "the classes" if first["classes"] == classes else " from ".join(first["classes"])
    message = (f"{name} alone tells {what} apart: right for {_pct(first['accuracy'])} of "
               f"{first['files']} files (leave-one-out lookup) vs {_pct(first['baseline'])} "
               "for the largest class")
    if more:
        message += "; pairs: " + ", ".join(
            f"{'/'.join(h['classes'])} {_pct(h['accuracy'])} vs {_pct(h['baseline'])}" for h in more)
    return summary, [make_warning("predicts", message, attribute, origin, first["classes"],
                              accuracy=first["accuracy"], baseline=first["baseline"], scopes=hits)]


def _value_warnings(values: Sequence[str], labels: Sequence[str], attribute: str, name: str,
                    origin: str) -> list[dict]:
    """The *separates* and *marks* rules, for each (value, class)."""
    found = []
    n_class = Counter(labels)
    n_value = Counter(values)
    for (v, c), n in sorted(Counter(zip(values, labels)).items()):
        rest = len(labels) - n_class[c]
        leak = n_value[v] - n
        cover = n / n_class[c]
        numbers = {"in_class": n, "class_size": n_class[c], "in_rest": leak, "rest_size": rest}
        if rest and cover >= SEPARATES_COVER and leak / rest <= SEPARATES_LEAK:
            message = (f"{name} = {v} nearly separates {c}: {n}/{n_class[c]} {c} files "
                       f"({_pct(cover)}) vs {leak}/{rest} of the rest ({_pct(leak / rest)})")
            found.append(make_warning("separates", message, attribute, origin, [c], v, **numbers))
        elif (n >= MARKS_MIN_FILES and cover >= MARKS_COVER and n / n_value[v] >= MARKS_PRECISION
              and len(n_class) > 1):
            message = (f"{name} = {v} marks {c}: {n}/{n_class[c]} {c} files ({_pct(cover)}) "
                       f"have it, {leak}/{rest} of the rest")
            found.append(make_warning("marks", message, attribute, origin, [c], v, **numbers))
    return found


def separation(values: list[dict], labels: list[str], attributes: dict[str, str],
               origin: str) -> tuple[dict, list[dict]]:
    """:func:`separation_warnings` for every attribute: ``({key: summary}, warnings)``; empty for one class."""
    summary, found = {}, []
    if len(set(labels)) < 2:
        return summary, found
    for key, name in attributes.items():
        summary[key], warns = separation_warnings([v[key] for v in values], labels, key, name, origin)
        found += warns
    return summary, found


# ---------------------------------------------------------------- summaries


def _tally(values: Iterable) -> dict:
    """{value: count}, most common first."""
    return dict(Counter(values).most_common())


def _spread(numbers: list[int]) -> dict:
    if not numbers:
        return {}
    return {"min": min(numbers), "median": statistics.median(numbers), "max": max(numbers)}


def _common_sizes(sizes: Iterable[tuple[int, int]], n: int = 3) -> list[list]:
    """The n most common "WxH" sizes as [size, count] (lists: the same in audit.json)."""
    return [[s, k] for s, k in Counter(f"{w}x{h}" for w, h in sizes).most_common(n)]


def class_summary(records: list[dict]) -> dict:
    """Counts and spreads for the readable files of one class."""
    count = lambda key: _tally(r[key] for r in records)  # noqa: E731
    total = lambda key: sum(bool(r[key]) for r in records)  # noqa: E731
    return {
        "files": len(records),
        "format": count("format"),
        "width": _spread([r["width"] for r in records]),
        "height": _spread([r["height"] for r in records]),
        "common_sizes": _common_sizes((r["width"], r["height"]) for r in records),
        "jpeg_quality": _tally(jpeg_quality_value(r) for r in records),
        "subsampling": _tally(r["subsampling"] or "n/a" for r in records),
        "mode": count("mode"),
        "alpha": total("alpha"),
        "exif": total("exif"),
        "exif_software": _tally(r["exif_software"] for r in records if r["exif_software"]),
        "exif_make": _tally(r["exif_make"] for r in records if r["exif_make"]),
        "icc": total("icc"),
        "xmp": total("xmp"),
        "png_text": total("png_text"),
        "png_text_keys": _tally(k for r in records for k in r["png_text"]),
        "ai_metadata": sum(r["ai_metadata"] is not None for r in records),
        "file_bytes": _spread([r["bytes"] for r in records]),
        "blank": sum(r["grey_std"] < BLANK_STD for r in records),
    }


def manifest_summary(path, rows: list[dict], matched: list[tuple[dict, dict]], n_files: int) -> dict:
    """Per-source counts, the originals' format and size per class (orig_format, orig_width,
    orig_height, where present), prompt groups and original files (orig_sha256) found in
    more than one split, and files whose manifest label differs from their class folder."""
    sources: dict[str, Counter] = defaultdict(Counter)
    for rec, row in matched:
        sources[row.get("source") or "unknown"][rec["class"] + (f"/{rec['split']}" if rec["split"] else "")] += 1
    return {
        "path": str(path),
        "rows": len(rows),
        "matched_files": len(matched),
        "files_without_row": n_files - len(matched),
        "sources": {s: dict(sorted(c.items())) for s, c in sorted(sources.items())},
        "label_mismatches": [rec["path"] for rec, row in matched
                             if row.get("label") and row["label"] != rec["class"]],
        "originals": _originals(matched),
        "groups_across_splits": _across_splits(matched, "group"),
        "originals_across_splits": _across_splits(matched, "orig_sha256"),
    }


def _originals(matched: list[tuple[dict, dict]]) -> dict:
    """Per class: the original format and size (before normalisation), from the manifest."""
    have = [(rec, row) for rec, row in matched if has_originals(row)]
    per_class: dict[str, dict] = {}
    for c in sorted({rec["class"] for rec, _ in have}):
        rows = [row for rec, row in have if rec["class"] == c]
        widths, heights = [int(r["orig_width"]) for r in rows], [int(r["orig_height"]) for r in rows]
        per_class[c] = {
            "files": len(rows),
            "format": _tally(r["orig_format"] for r in rows),
            "width": _spread(widths),
            "height": _spread(heights),
            "common_sizes": _common_sizes(zip(widths, heights)),
        }
    return per_class


def _across_splits(matched: list[tuple[dict, dict]], column: str) -> dict:
    """Values of ``column`` (prompt group, original hash) whose files sit in more than one split."""
    splits: dict[str, set] = defaultdict(set)
    for rec, row in matched:
        if row.get(column) and rec["split"]:
            splits[row[column]].add(rec["split"])
    shared = sorted(v for v, s in splits.items() if len(s) > 1)
    return {"checked": len(splits), "count": len(shared), "examples": shared[:20]}


# ---------------------------------------------------------------- bias probes


def bias_probes(records: list[dict], pixels: dict[str, dict], rows: dict[str, dict] | None,
                duplicates: dict) -> dict:
    """Run the bias probes (:mod:`imageorigin.probes`) over the readable files.

    ``pixels`` and ``rows`` map a file's path to its pixel features and its
    manifest row (``rows`` None without a manifest).  The ``original`` probe runs
    when every file has a row with the original format and size.  Folds are
    grouped by connected prompt groups and exact / near duplicates.
    """
    records = [r for r in records if pixels.get(r["path"]) is not None]
    features = {key: np.array([pixels[r["path"]][key] for r in records]) for key in ("dct", "noise")}
    file_rows = [(rows or {}).get(r["path"]) for r in records]
    missing = sum(not has_originals(row) for row in file_rows)
    if rows is not None and not missing:
        features["original"] = original_features(file_rows)
    result = probes.run_probes(features, [r["class"] for r in records],
                               _probe_groups(records, file_rows, duplicates))
    prompt_groups = any(row and row.get("group") for row in file_rows)
    result["grouped_by"] = ("prompt group (manifest `group`), " if prompt_groups else "") + \
        "exact and near duplicates"
    result["note"] = None if rows is None or not missing else (
        f"No original probe: {missing} file(s) lack a manifest row with orig_format, orig_width, orig_height")
    return result


def original_features(rows: Sequence[dict]) -> np.ndarray:
    """The ``original`` bias probe's features of manifest rows: (n, k).

    One-hot original format, longer-side band, aspect and coding history
    (dh3-wide's ``coding`` without its quality: webp-orig, webp-roundtrip,
    none; "n/a" without the column), then log2 of the original width and
    height and the round trip's quality / 100 (0 without one).
    """
    categories, numbers = [], []
    for row in rows:
        w, h = int(row["orig_width"]), int(row["orig_height"])
        coding = re.fullmatch(r"(.+)-q(\d+)", row.get("coding") or "")
        categories.append({"format": row["orig_format"], "long_side": long_side_bucket(w, h),
                           "aspect": aspect(w, h),
                           "coding": coding[1] if coding else row.get("coding") or "n/a"})
        numbers.append([np.log2(w), np.log2(h), int(coding[2]) / 100 if coding else 0.0])
    return np.hstack([probes.one_hot(categories), np.array(numbers, dtype=float).reshape(len(rows), 3)])


def _probe_groups(records: list[dict], rows: list[dict | None], duplicates: dict) -> np.ndarray:
    """A group id per file: files linked by a manifest ``group`` or a duplicate pair share one."""
    index = {r["path"]: i for i, r in enumerate(records)}
    links = [(index[p["a"]], index[p["b"]]) for kind in ("exact", "near") for p in duplicates[kind]["pairs"]
             if p["a"] in index and p["b"] in index]
    first: dict[str, int] = {}  # manifest group -> its first file
    for i, row in enumerate(rows):
        if row and row.get("group"):
            links.append((first.setdefault(row["group"], i), i))
    return probes.connected_groups(len(records), links)


def probe_warnings(result: dict, classes: list[str]) -> list[dict]:
    """A *probe* warning for each feature group above probes.WARN_AUC."""
    found = []
    for key, p in result["probes"].items():
        if p["warning"]:
            message = (f"bias probe ({probes.FEATURE_GROUPS[key]}): AI vs {probes.HUMAN} ROC AUC "
                       f"{p['auc']:.3f} ± {p['std']:.3f} > {probes.WARN_AUC} ({result['images']} images, "
                       f"{result['folds']}-fold grouped cross-validation): these features alone, "
                       "without the content, tell the classes apart")
            found.append(make_warning("probe", message, key, "bias probe", classes, auc=p["auc"], std=p["std"]))
    return found
