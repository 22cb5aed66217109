"""Leave-one-source-out: how the recipe does on a source it never saw.

For each source S in the manifest: train on every other source, then score S's
images against reference images of the other kind (human vs AI) that no fold
trained on.  The AUC of p_ai on that set is the honest estimate of how a model
trained this way ranks images from a new generator or a new kind of human art.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import LabelledFolder, scan_folders, stratified_split
from .evaluate import UNKNOWN_SOURCE, figures, sources_from_manifest
from .fileio import write_json, write_text
from .predict import predict
from .train import TrainConfig, train


def crossval(
    data,
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    reference=None,
    sources: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Leave-one-source-out over the sources named in ``manifest`` (``source`` column).

    ``data``: training folder(s).  ``reference``: folder(s) whose images serve as the
    other kind in each fold's test set (default: a seeded 20% split of ``data``,
    left out of every fold's training).  Writes ``crossval.json`` and
    ``crossval.md`` to ``out_dir``; returns the table as a dict.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    pool = scan_folders(data)
    if reference is None:
        pool, ref = stratified_split(pool, 0.2, cfg.seed)
    else:
        ref = scan_folders(reference, pool.classes)
    pool_src, ref_src = (sources_from_manifest(manifest, [p for p, _ in f.samples]) for f in (pool, ref))
    human = pool.classes.index("human") if "human" in pool.classes else None
    if human is None:
        raise ValueError("leave-one-source-out scores p_ai: the data needs a 'human' class")

    table = []
    for source in sources or sorted(set(pool_src) - {UNKNOWN_SOURCE}):
        keep = [s for s, src in zip(pool.samples, pool_src) if src != source]
        held = [s for s, src in zip(pool.samples, pool_src) if src == source]
        held += [s for s, src in zip(ref.samples, ref_src) if src == source]
        kinds = {y == human for _, y in held}
        others = [s for s, src in zip(ref.samples, ref_src)
                  if src != source and (s[1] == human) not in kinds]
        val = LabelledFolder(ref.root, ref.classes,
                             [s for s, src in zip(ref.samples, ref_src) if src != source])
        model = train(LabelledFolder(pool.root, pool.classes, keep), out / _slug(source), cfg,
                      val=val, progress=progress)
        test = held + others
        preds = list(predict(model, [p for p, _ in test], batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers))
        ok = [i for i, p in enumerate(preds) if p.error is None]
        y = np.array([test[i][1] for i in ok])
        p_ai = np.array([preds[i].p_ai for i in ok])
        is_held = np.array([i < len(held) for i in ok], dtype=bool)
        correct = np.array([pool.classes.index(preds[i].label) for i in ok]) == y
        truth_ai = y != human
        # AUC over the whole test set; accuracy and the flagged share over the source alone
        on_source = figures(correct[is_held], truth_ai[is_held], p_ai[is_held], model.threshold)
        flagged = on_source["ai_detected_rate" if truth_ai[is_held].all() else "human_flagged_rate"]
        table.append({
            "source": source,
            "label": sorted({pool.classes[y_] for _, y_ in held}),
            "n_held_out": int(is_held.sum()),
            "n_reference": int((~is_held).sum()),
            "auc": figures(correct, truth_ai, p_ai, None)["ai_vs_human_auc"],
            "accuracy": on_source["accuracy"],
            "flagged_rate": flagged,
            "trained_on": int(len(keep)),
        })
        write_json(out / "crossval.json", _summary(table, cfg, manifest))  # survives interruption
    result = _summary(table, cfg, manifest)
    write_json(out / "crossval.json", result)
    write_text(out / "crossval.md", to_markdown(result))
    return result


def _slug(source: str) -> str:
    return source.replace("/", "__")


def _summary(table: list[dict], cfg: TrainConfig, manifest) -> dict:
    aucs = [r["auc"] for r in table if r["auc"] is not None]
    return {
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "min_auc": float(np.min(aucs)) if aucs else None,
        "sources": table,
        "manifest": str(manifest),
        "config": cfg.__dict__,
    }


def to_markdown(result: dict) -> str:
    """The leave-one-source-out table as markdown."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Leave-one-source-out",
        "",
        f"Mean AUC on the held-out source: **{fmt(result['mean_auc'])}** "
        f"(lowest {fmt(result['min_auc'])}).",
        "",
        "Each row: a model trained without the source, scored on the source's images "
        "against reference images of the other kind (human vs AI) from other sources. "
        "`flagged` is the share of the source's images at or above the fold's stored "
        "threshold: the detection rate for an AI source, the false-positive rate for a "
        "human one.",
        "",
        "| held-out source | class | images | AUC | 3-class accuracy | flagged as AI |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["sources"]:
        lines.append(f"| {r['source']} | {', '.join(r['label'])} | {r['n_held_out']} | "
                     f"{fmt(r['auc'])} | {fmt(r['accuracy'])} | {fmt(r['flagged_rate'])} |")
    return "\n".join(lines) + "\n"
