"""Dataset audit: what a classifier could learn from a labelled folder besides content.

For each class, :func:`audit` measures the spread of file format, pixel size,
JPEG quality, colour mode / alpha, metadata and file size, warns where one of
them nearly separates the classes (the format-bias trap of published
detectors), finds exact and near-duplicate images, above all pairs that
straddle train and val, and runs bias probes: classifiers that see only
low-level statistics (DCT histograms, noise residuals, the original format and
size) and whose cross-validated AUC says how much they alone give away
(:mod:`imageorigin.probes`).

The parts: :mod:`imageorigin.audit_files` (one file), :mod:`imageorigin.audit_checks`
(attribute checks, summaries, bias probes), :mod:`imageorigin.audit_duplicates`,
:mod:`imageorigin.audit_report` (markdown, console, files); this module finds
the folders and runs the audit.
"""

from __future__ import annotations

import os
from pathlib import Path

from .audit_checks import probe_warnings, make_warning, bias_probes, class_summary, manifest_summary, separation
from .audit_duplicates import BLANK_STD, find_duplicates
from .audit_files import ATTRIBUTES, ORIGINAL_ATTRIBUTES, attribute_values, audit_file, has_originals, original_values
from .data import LabelledFolder, match_manifest, read_manifest, scan_folder

# What earlier versions of this module defined, named here too (imageorigin.audit.X keeps working).
from .audit_checks import original_features  # noqa: F401,E402
from .audit_files import IJG_LUMINANCE, estimate_jpeg_quality, ijg_table  # noqa: F401,E402
from .audit_report import console_lines, summary_line, to_markdown, write_outputs  # noqa: F401,E402

# Sub-folders with these names make DATA_DIR a folder of splits, each holding class folders.
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


# ---------------------------------------------------------------- folders


def find_splits(data_dir: str | os.PathLike) -> list[tuple[str | None, LabelledFolder]]:
    """The labelled folders in ``data_dir``: ``[(split or None, LabelledFolder)]``.

    ``data_dir`` either has one sub-folder per class, or only split folders
    (train/, val/, test/ ...) that each have one sub-folder per class.
    """
    root = Path(data_dir)
    subdirs = []
    if root.is_dir():
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and all(name in SPLIT_NAMES for name in subdirs):
        return [(s, scan_folder(root / s)) for s in sorted(subdirs, key=SPLIT_NAMES.index)]
    return [(None, scan_folder(root))]


# ---------------------------------------------------------------- the audit


def audit(data_dir: str | os.PathLike, manifest: str | os.PathLike | None = None,
          progress: bool = False) -> dict:
    """Audit a labelled image folder; returns a JSON-serialisable dict.

    ``data_dir`` has one sub-folder per class, or split folders (train/, val/
    ...) each with class sub-folders.  Keys: ``layout``, ``counts``,
    ``per_class``, ``separation`` (per attribute: leave-one-out lookup accuracy
    and baseline), ``warnings`` (each with ``rule``, ``attribute``,
    ``classes``, numbers and a ``message``), ``duplicates``, ``ai_metadata``
    (files whose metadata names a generator), ``unreadable``, ``manifest``
    (with ``manifest=``), ``bias_probes`` (cross-validated AI-vs-human AUC of
    each probe, see :mod:`imageorigin.probes`), ``files`` (the number of
    files) and ``file_records`` (what was found in each file).
    """
    root = Path(data_dir)
    folders = find_splits(root)
    records, pixels = _read_files(root, folders, progress)
    good = [r for r in records if r["error"] is None]
    classes = sorted({r["class"] for r in records})
    splits = [s for s, _ in folders if s is not None]

    result: dict = {
        "data_dir": str(root),
        "layout": "splits" if splits else "classes",
        "splits": splits,
        "classes": classes,
        "files": len(records),
        "counts": {s or "all": f.counts() for s, f in folders},
        "unreadable": [{"path": r["path"], "error": r["error"]} for r in records if r["error"]],
        "per_class": {c: class_summary([r for r in good if r["class"] == c]) for c in classes},
        "ai_metadata": [{"path": r["path"], "class": r["class"], "found": r["ai_metadata"]}
                        for r in good if r["ai_metadata"]],
    }
    result["separation"], found = separation([attribute_values(r) for r in good], [r["class"] for r in good],
                                             ATTRIBUTES, "files")
    result["duplicates"] = find_duplicates(good)
    rows = None
    if manifest is not None:
        all_rows = read_manifest(manifest)
        rows = _manifest_rows(good, all_rows)
        result["manifest"], more = _audit_manifest(manifest, all_rows, good, rows)
        found += more
    result["bias_probes"] = bias_probes(good, pixels, rows, result["duplicates"])
    result["warnings"] = _data_warnings(result) + found + probe_warnings(result["bias_probes"], classes)
    result["file_records"] = records
    return result


def _read_files(root: Path, folders: list[tuple[str | None, LabelledFolder]],
                progress: bool) -> tuple[list[dict], dict[str, dict]]:
    """:func:`audit_file` on every file: records (path, split, class first) and ``{path: pixel features}``."""
    from tqdm import tqdm

    todo = [(split, folder.classes[y], path) for split, folder in folders for path, y in folder.samples]
    records, pixels = [], {}
    for split, cls, path in tqdm(todo, desc="audit", unit="file", disable=not progress):
        rec = {"path": path.relative_to(root).as_posix(), "split": split, "class": cls}
        found, pixels[rec["path"]] = audit_file(path)
        records.append({**rec, **found})
    return records, pixels


def _manifest_rows(records: list[dict], rows: list[dict]) -> dict[str, dict]:
    """``{path: manifest row}`` for the records that match one row."""
    return {rec["path"]: row for rec, row in zip(records, match_manifest([r["path"] for r in records], rows))
            if row is not None}


def _audit_manifest(manifest, all_rows: list[dict], good: list[dict],
                    rows: dict[str, dict]) -> tuple[dict, list[dict]]:
    """The manifest summary, and the separation rules run on the originals' format and size:
    where a normalised bench's bias still shows."""
    matched = [(rec, rows[rec["path"]]) for rec in good if rec["path"] in rows]
    summary = manifest_summary(manifest, all_rows, matched, len(good))
    orig = [(original_values(row), rec["class"]) for rec, row in matched if has_originals(row)]
    found: list[dict] = []
    if orig:
        summary["separation"], found = separation([v for v, _ in orig], [c for _, c in orig],
                                                  ORIGINAL_ATTRIBUTES, "manifest originals")
    return summary, found


def _data_warnings(result: dict) -> list[dict]:
    """Warnings about the data itself: unreadable files, blank images, duplicates, manifest problems."""
    out = []

    def warn(rule: str, message: str, count: int):
        out.append(make_warning(rule, message, count=count))

    if result["unreadable"]:
        warn("unreadable", f"{len(result['unreadable'])} file(s) could not be read", len(result["unreadable"]))
    dup = result["duplicates"]
    if dup["blank"]:
        warn("blank", f"{len(dup['blank'])} near-uniform image(s) (grey-level std < {BLANK_STD}): "
                      "no content to learn from", len(dup["blank"]))
    for kind in ("exact", "near"):
        c = dup[kind]["counts"]
        if c["across_splits"]:
            warn(f"{kind}_duplicates_across_splits",
                 f"{c['across_splits']} {kind}-duplicate pair(s) straddle splits", c["across_splits"])
        if c["across_classes"]:
            warn(f"{kind}_duplicates_across_classes",
                 f"{c['across_classes']} {kind}-duplicate pair(s) have different classes", c["across_classes"])
    man = result.get("manifest", {})
    for key, what in (("groups_across_splits", "prompt group(s)"),
                      ("originals_across_splits", "original file(s) (orig_sha256)")):
        if man.get(key, {}).get("count"):
            warn(key, f"{man[key]['count']} {what} appear in more than one split", man[key]["count"])
    if man.get("label_mismatches"):
        warn("label_mismatches", f"{len(man['label_mismatches'])} file(s) sit in a class folder "
                                 "that differs from their manifest label", len(man["label_mismatches"]))
    return out
