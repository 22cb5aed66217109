"""Cross-validation over sources: how the recipe does on sources it never saw.

Two ways to hold sources out, both scored the same way:

- leave-one-source-out (``folds=0``): for each source S, train on every other
  source, then score S's images against reference images of the other kind
  (human vs AI) that no fold trained on;
- grouped k-fold (``folds=k``): sources are put into groups (``group_by``:
  each ``source``, or each ``family``, see :func:`family`) and the groups into k
  folds, fixed by their own seed (not the training seed, so that a recipe can
  be repeated with other training seeds on the same folds) and recorded; each
  fold is held out once: train on the rest, then score each of the fold's
  sources against the fold's images of the other kind, which the model never
  saw either.

The AUC of p_ai on such a set is the honest estimate of how a model trained
this way ranks images from a new generator or a new kind of human art, and the
share of a held-out human source flagged at the fold's stored threshold is the
false-accusation rate a moderator would meet.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from .data import (LabelledFolder, manifest_name, match_manifest, read_manifest, scan_folders,
                   stratified_split)
from .evaluate import UNKNOWN_SOURCE, figures
from .fileio import write_json, write_text
from .predict import predict
from .train import TrainConfig, train
from .train_state import can_resume, changed_settings

GROUP_BY = ("source", "family")


def family(row: dict) -> str:
    """A source's family: the same generator, or the same origin of human images.

    AI sources: the manifest's ``generator`` without its parenthesis ("FLUX.1-dev
    (artist styles)" and "FLUX.1-dev" are one family, so holding one out while
    training on the other would not be an unseen generator).  Human sources: the
    first part of ``source`` (one collection: "debian_naev-data/bkg" and
    "debian_naev-data/loading").  Without a generator column, the source.
    """
    if row.get("label") != "human" and row.get("generator"):
        return re.sub(r"\s*\(.*\)\s*$", "", row["generator"]).strip()
    return row["source"].split("/")[0] if row.get("label") == "human" else row["source"]


def assign_folds(groups: dict[str, tuple[bool, int]], k: int, seed: int = 0) -> dict[str, int]:
    """Put groups into ``k`` folds: ``groups`` maps a group to (is human, image count).

    Human and AI groups are dealt out separately, largest first (ties in a
    seeded order), each to the fold with the fewest images of its kind, so
    every fold holds out both kinds and the folds are about equal in size.
    """
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    for kind in (True, False):
        names = [g for g, (human, _) in groups.items() if human == kind]
        names = [names[i] for i in rng.permutation(len(names))]
        load = [0] * k
        for g in sorted(names, key=lambda g: -groups[g][1]):  # stable: keeps the seeded order of ties
            f = int(np.argmin(load))
            folds[g] = f
            load[f] += groups[g][1]
    return folds


def recorded_folds(path: str | os.PathLike, groups, k: int) -> dict[str, int]:
    """The folds an earlier run recorded in its ``crossval.json``: group -> fold
    index (0 to k-1), for each of ``groups``.  Lets two recipes whose training
    data differ (one view or two, say: the counts that :func:`assign_folds`
    deals by change) be compared on the same folds.  Every group must be in one
    of the run's folds, and the run must have had ``k`` folds."""
    earlier = json.loads(Path(path).read_text())
    if earlier.get("method", "").split("-fold")[0] != f"grouped {k}":
        raise ValueError(f"{path}: a {earlier.get('method')!r} run, not a grouped {k}-fold one")
    fold_of = {g: int(f["fold"].split()[-1]) - 1 for f in earlier["folds"] for g in f["held_out"]}
    missing = sorted(set(groups) - set(fold_of))
    if missing:
        raise ValueError(f"{path}: its folds do not hold out {', '.join(missing)} (only a run that "
                         f"finished every fold records them all)")
    return {g: fold_of[g] for g in groups}


def crossval(
    data,
    manifest,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    reference=None,
    sources: list[str] | None = None,
    progress: bool = False,
    folds: int = 0,
    group_by: str = "source",
    only: list[int] | None = None,
    resume: bool = False,
    fold_seed: int = 0,
    folds_from: str | os.PathLike | None = None,
) -> dict:
    """Leave-one-source-out (``folds=0``) or grouped k-fold over the sources named in
    ``manifest`` (one CSV or several; ``source`` column, and ``generator`` for
    ``group_by="family"``).

    ``data``: training folder(s).  ``reference``: folder(s) whose images are
    each fold's validation data (k-fold: those of the fold's held-out groups are
    tested too; leave-one-source-out: the other kind in each test set). Default:
    a seeded 20% split of ``data``.  ``sources`` limits leave-one-source-out to
    these, ``only`` k-fold to these fold numbers (1 to k); ``fold_seed`` orders
    the groups of equal size that are dealt into folds; ``folds_from``, an
    earlier run's ``crossval.json``, takes that run's folds instead
    (:func:`recorded_folds`).  Writes
    ``crossval.json`` (after every fold, so an interrupted run keeps what it
    finished) and ``crossval.md`` to ``out_dir``; returns the table.
    ``resume=True`` continues a run in ``out_dir`` made with the same settings:
    a fold it finished is kept as it is (with ``only``, those outside it too),
    and a fold it was training goes on from its last completed epoch
    (:func:`imageorigin.train.train`'s resume).
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"unknown group_by {group_by!r}; choose one of: {', '.join(GROUP_BY)}")
    cfg = config or TrainConfig()
    out = Path(out_dir)
    pool = scan_folders(data)
    if reference is None:
        pool, ref = stratified_split(pool, 0.2, cfg.seed)
    else:
        ref = scan_folders(reference, pool.classes)
    if "human" not in pool.classes:
        raise ValueError("cross-validation over sources scores p_ai: the data needs a 'human' class")
    human = pool.classes.index("human")
    rows = read_manifest(manifest, ("path", "source"))
    samples = pool.samples + ref.samples
    in_ref = np.arange(len(samples)) >= len(pool.samples)
    matched = match_manifest([p for p, _ in samples], rows)
    src = np.array([UNKNOWN_SOURCE if r is None else r["source"] for r in matched])
    is_human = np.array([y == human for _, y in samples])

    plan = []  # (name, held-out mask over samples, test mask, groups)
    if folds:
        key = np.array([UNKNOWN_SOURCE if r is None else (family(r) if group_by == "family" else r["source"])
                        for r in matched])
        known = key != UNKNOWN_SOURCE
        groups = {g: (bool(is_human[key == g][0]), int((key == g).sum())) for g in sorted(set(key[known]))}
        fold_of = (recorded_folds(folds_from, groups, folds) if folds_from
                   else assign_folds(groups, folds, fold_seed))
        missing = [str(f) for f in only or [] if not 1 <= f <= folds]
        if missing:
            raise ValueError(f"folds are numbered 1 to {folds}: there is no fold {', '.join(missing)}")
        for f in range(folds):
            held = np.array([fold_of.get(g, -1) == f for g in key])
            plan.append((f"fold {f + 1}", held, held, sorted(g for g, v in fold_of.items() if v == f)))
    else:
        if only:
            raise ValueError("only (--only-folds) picks folds of a grouped k-fold (--folds K); "
                             "leave-one-source-out picks sources (--source)")
        if folds_from:
            raise ValueError("folds_from (--folds-from) takes the folds of a grouped k-fold (--folds K); "
                             "leave-one-source-out has none")
        for source in sources or sorted(set(src) - {UNKNOWN_SOURCE}):
            held = src == source
            kinds = set(is_human[held])
            test = held | (in_ref & ~held & ~np.isin(is_human, list(kinds)))
            plan.append((source, held, test, [source]))

    table, fold_rows = [], []
    done = _finished(out, _summary([], [], cfg, manifest, folds, group_by)) if resume else {}
    for name, held, test, groups_held in plan:
        if done.get(name, ({}, None))[0].get("held_out") == groups_held:
            print(f"imageorigin: {name}: kept from the earlier run in {out}", file=sys.stderr)
            fold_rows.append(done[name][0])
            table += done[name][1]
            continue
        if only and int(name.split()[-1]) not in only:
            continue
        pick = lambda mask: [s for s, m in zip(samples, mask) if m]  # noqa: E731
        train_set = LabelledFolder(pool.root, pool.classes, pick(~held & ~in_ref))
        val_set = LabelledFolder(ref.root, ref.classes, pick(~held & in_ref))
        model = train(train_set, out / _slug(name), cfg, val=val_set, progress=progress, manifest=manifest,
                      resume=resume and can_resume(out / _slug(name), cfg))
        idx = np.flatnonzero(test)
        preds = list(predict(model, [samples[i][0] for i in idx], batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers))
        ok = np.array([p.error is None for p in preds])
        idx = idx[ok]
        p_ai = np.array([p.p_ai for p, good in zip(preds, ok) if good])
        y = np.array([samples[i][1] for i in idx])
        correct = np.array([pool.classes.index(p.label) for p, good in zip(preds, ok) if good]) == y
        truth_ai = y != human
        # Every tested image's score, for choosing thresholds after the fact.
        write_text(out / _slug(name) / "test_scores.csv", "path,source,label,p_ai\n" + "".join(
            f"{samples[i][0]},{src[i]},{pool.classes[v]},{p:.6f}\n" for i, v, p in zip(idx, y, p_ai)))
        for source in sorted(set(src[idx][held[idx]]) - {UNKNOWN_SOURCE}):
            mine = src[idx] == source
            kind_ai = truth_ai[mine][0]
            # The source against every tested image of the other kind: AUC.
            scored = mine | (truth_ai != kind_ai)
            on_source = figures(correct[mine], truth_ai[mine], p_ai[mine], model.threshold)
            table.append({
                "source": source,
                "fold": name,
                "label": sorted({pool.classes[v] for v in y[mine]}),
                "n_held_out": int(mine.sum()),
                "n_reference": int((truth_ai != kind_ai).sum()),
                "auc": figures(correct[scored], truth_ai[scored], p_ai[scored], None)["ai_vs_human_auc"],
                "accuracy": on_source["accuracy"],
                "flagged_rate": on_source["ai_detected_rate" if kind_ai else "human_flagged_rate"],
                "trained_on": len(train_set.samples),
            })
        fold_rows.append({"fold": name, "held_out": groups_held, "threshold": model.threshold,
                          "trained_on": len(train_set.samples), "tested": int(len(idx))})
        # Written after every fold: an interrupted run keeps what it finished.
        write_json(out / "crossval.json", _summary(table, fold_rows, cfg, manifest, folds, group_by))
    result = _summary(table, fold_rows, cfg, manifest, folds, group_by)
    write_json(out / "crossval.json", result)
    write_text(out / "crossval.md", to_markdown(result))
    return result


def _finished(out: Path, settings: dict) -> dict[str, tuple[dict, list[dict]]]:
    """The folds an earlier run in ``out`` finished with the same ``settings``
    (method, manifest, training config): fold name -> (fold row, its sources' rows)."""
    try:
        earlier = json.loads((out / "crossval.json").read_text())
    except FileNotFoundError:
        return {}
    if any(earlier.get(k) != json.loads(json.dumps(settings[k])) for k in ("method", "manifest")) \
            or changed_settings(earlier.get("config", {}), settings["config"]):
        return {}
    return {f["fold"]: (f, [r for r in earlier["sources"] if r["fold"] == f["fold"]]) for f in earlier["folds"]}


def _slug(name: str) -> str:
    return name.replace("/", "__").replace(" ", "_")


def _summary(table: list[dict], fold_rows: list[dict], cfg: TrainConfig, manifest, folds: int,
             group_by: str) -> dict:
    aucs = [r["auc"] for r in table if r["auc"] is not None]
    human_flags = [r["flagged_rate"] for r in table
                   if r["label"] == ["human"] and r["flagged_rate"] is not None]
    return {
        "method": f"grouped {folds}-fold by {group_by}" if folds else "leave-one-source-out",
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "min_auc": float(np.min(aucs)) if aucs else None,
        "max_human_flagged": float(np.max(human_flags)) if human_flags else None,
        "mean_human_flagged": float(np.mean(human_flags)) if human_flags else None,
        "sources": table,
        "folds": fold_rows,
        "manifest": manifest_name(manifest),
        "config": cfg.__dict__,
    }


def to_markdown(result: dict) -> str:
    """The cross-validation table as markdown."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    kfold = result.get("method", "").startswith("grouped")
    lines = [
        f"# Cross-validation over sources: {result.get('method', 'leave-one-source-out')}",
        "",
        f"Mean AUC on the held-out source: **{fmt(result['mean_auc'])}** "
        f"(lowest {fmt(result['min_auc'])}). Human images of a held-out human source flagged "
        f"as AI at the fold's stored threshold: mean {fmt(result.get('mean_human_flagged'))}, "
        f"highest **{fmt(result.get('max_human_flagged'))}**.",
        "",
        "Each row: a model trained without the source (and, in k-fold, without the rest of "
        "its fold), scored on the source's images against held-out images of the other kind "
        "(human vs AI). `flagged` is the share of the source's images at or above the fold's "
        "stored threshold: the detection rate for an AI source, the false-positive rate for "
        "a human one.",
        "",
        "| held-out source | class |" + (" fold |" if kfold else "")
        + " images | AUC | 3-class accuracy | flagged as AI |",
        "| --- | --- |" + (" --- |" if kfold else "") + " --- | --- | --- | --- |",
    ]
    for r in sorted(result["sources"], key=lambda r: (r["label"], r["source"])):
        lines.append(f"| {r['source']} | {', '.join(r['label'])} |" + (f" {r['fold']} |" if kfold else "")
                     + f" {r['n_held_out']} | {fmt(r['auc'])} | {fmt(r['accuracy'])} | "
                     f"{fmt(r['flagged_rate'])} |")
    if kfold:
        k = int(result["method"].split()[1].split("-")[0])
        if len(result["folds"]) < k:
            lines += ["", f"Only {', '.join(f['fold'] for f in result['folds'])} of {k} were run: "
                      "the means above are over their sources alone."]
        lines += ["", "Folds (held-out groups):", ""]
        lines += [f"- {f['fold']}: {', '.join(f['held_out'])}" for f in result["folds"]]
    return "\n".join(lines) + "\n"
