"""Grouped 6-fold runs side by side, and the shipped recipe + a trace model as two branches.

    python experiments/pseudo_fake_folds.py runs/kfold-base --trace runs/kfold-trace \
        --arm "25% twins=runs/kfold-share25" --arm "50% twins=runs/kfold-share50" \
        --arm "50% twins, not aligned=runs/kfold-share50-unaligned" \
        --out docs/pseudofakes/folds.json

Each run is an ``imageorigin crossval`` output folder (the same folds: each
fold's ``test_scores.csv`` holds every held-out image's p_ai).  Per held-out
source: AUC against the fold's held-out images of the other kind (as
``crossval`` computes it), and the share of its images at or above the fold
model's 1% cut (its threshold for at most 1% of its calibration humans
flagged, stored in the checkpoint as ``thresholds_at_fpr``).

The two-branch rule needs no held-out label: each branch's logit of p_ai is
placed on one scale by its own calibration cuts, ``z = (logit p - logit t10) /
(logit t01 - logit t10)`` (t01, t10: the cuts that flag 1% and 10% of its
calibration humans), so z >= 1 is "above this branch's 1% cut".  ``mean``
averages the two z; ``max`` flags an image when either branch is above its own
1% cut (so up to about 2% of calibration humans).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import imageorigin

# The target's latent-diffusion sources (SD, SDXL, FLUX) and the 2022 latent diffusion / SD beta galleries.
LDM = re.compile(r"sdxl|stablediffusion|stable_diffusion|flux|latent_diffusion", re.I)


def fold_scores(run: Path) -> dict[str, dict]:
    """{fold folder: {"cut": {fpr: p}, "rows": {path: (source, is_ai, p_ai)}}} of a crossval run."""
    out = {}
    for fold in sorted(run.glob("fold_*")):
        scores = fold / "test_scores.csv"
        if not scores.is_file():
            continue
        info = imageorigin.load(fold / "model.safetensors").info
        cut = {float(k): float(v) for k, v in info["thresholds_at_fpr"].items()}
        with scores.open(newline="") as f:
            rows = {r["path"]: (r["source"], r["label"] != "human", float(r["p_ai"])) for r in csv.DictReader(f)}
        out[fold.name] = {"cut": cut, "rows": rows}
    return out


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def z_score(p, cut: dict[float, float]):
    """p_ai on the branch-free scale: 0 at the branch's 10% cut, 1 at its 1% cut."""
    lo, hi = _logit(cut[0.1]), _logit(cut[0.01])
    return (_logit(p) - lo) / max(hi - lo, 1e-6)


def per_source(paths, rows, score, flag) -> dict[str, dict]:
    """AUC and flagged share per source of one fold, from one score and one flag per path."""
    src = np.array([rows[p][0] for p in paths])
    ai = np.array([rows[p][1] for p in paths])
    out = {}
    for source in sorted(set(src)):
        mine = src == source
        kind = ai[mine][0]
        both = mine | (ai != kind)
        auc = roc_auc_score(ai[both], score[both]) if (ai[both] != kind).any() else None
        out[source] = {"ai": bool(kind), "n": int(mine.sum()),
                       "auc": None if auc is None else round(float(auc), 3),
                       "flagged": round(float(flag[mine].mean()), 3)}
    return out


def summary(table: dict[str, dict]) -> dict:
    """Mean AUC, worst AUC, mean AUC over latent-diffusion sources, human flagged mean / worst."""
    aucs = [r["auc"] for r in table.values() if r["auc"] is not None]
    ldm = [r["auc"] for s, r in table.items() if r["ai"] and LDM.search(s) and r["auc"] is not None]
    humans = [r["flagged"] for r in table.values() if not r["ai"]]
    return {"sources": len(table), "mean_auc": round(float(np.mean(aucs)), 3), "min_auc": round(float(np.min(aucs)), 3),
            "ldm_mean_auc": round(float(np.mean(ldm)), 3) if ldm else None,
            "human_flagged_mean": round(float(np.mean(humans)), 3) if humans else None,
            "human_flagged_max": round(float(np.max(humans)), 3) if humans else None}


def run_table(runs: dict[str, dict], folds: list[str]) -> dict[str, dict]:
    """Per-source figures of one run on the given folds, at the 1% cut."""
    table = {}
    for fold in folds:
        f = runs[fold]
        paths = sorted(f["rows"])
        p = np.array([f["rows"][x][2] for x in paths])
        table.update(per_source(paths, f["rows"], p, p >= f["cut"][0.01]))
    return table


def two_branch(base: dict, trace: dict, folds: list[str]) -> dict[str, dict[str, dict]]:
    """Per-source figures of the mean and max rules on the folds both runs finished."""
    tables = {"mean": {}, "max": {}}
    for fold in folds:
        b, t = base[fold], trace[fold]
        paths = sorted(set(b["rows"]) & set(t["rows"]))
        zb = z_score([b["rows"][x][2] for x in paths], b["cut"])
        zt = z_score([t["rows"][x][2] for x in paths], t["cut"])
        tables["mean"].update(per_source(paths, b["rows"], (zb + zt) / 2, (zb + zt) / 2 >= 1))
        both = np.maximum(zb, zt)
        tables["max"].update(per_source(paths, b["rows"], both, both >= 1))
    return tables


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("base", type=Path, help="the shipped recipe's crossval folder")
    a.add_argument("--trace", type=Path, help="a trace model's crossval folder (the second branch)")
    a.add_argument("--arm", action="append", default=[], help="NAME=FOLDER of another recipe's crossval")
    a.add_argument("--out", type=Path, required=True)
    args = a.parse_args()
    base = fold_scores(args.base)
    arms = {"shipped recipe": base}
    for spec in args.arm:
        name, folder = spec.split("=", 1)
        arms[name] = fold_scores(Path(folder))
    if args.trace:
        arms["trace model alone"] = fold_scores(args.trace)
    result = {"runs": {"shipped recipe": str(args.base), **{s.split("=", 1)[0]: s.split("=", 1)[1] for s in args.arm},
                       **({"trace model alone": str(args.trace)} if args.trace else {})}, "compare": {}}
    for name, run in arms.items():
        if name == "shipped recipe" and len(arms) > 1:
            continue  # it is the second column of every comparison below
        folds = sorted(set(run) & set(base))
        tables = {name: run_table(run, folds)}
        if name != "shipped recipe":
            tables["shipped recipe"] = run_table(base, folds)
        if name == "trace model alone":
            rules = two_branch(base, run, folds)
            tables["two branches, mean of z"], tables["two branches, either above its 1% cut"] = rules["mean"], rules["max"]
        result["compare"][name] = {"folds": folds, "summary": {k: summary(v) for k, v in tables.items()},
                                   "sources": tables}
        print(name, folds, json.dumps({k: summary(v) for k, v in tables.items()}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))


def to_markdown(result: dict) -> str:
    """Each comparison's summary, then every held-out source's AUC / flagged share per recipe."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# Grouped 6-fold runs side by side", "",
             "Written by `experiments/pseudo_fake_folds.py` (its docstring has the command). "
             "`flagged`: share of a source's images at or above the fold model's 1% cut "
             "(for an AI source: detected; for a human source: falsely accused).", ""]
    for name, comp in result["compare"].items():
        lines += [f"## {name} (folds {', '.join(f.split('_')[1] for f in comp['folds'])})", "",
                  "| recipe | sources | mean AUC | worst AUC | latent-diffusion mean AUC "
                  "| humans flagged, mean / worst |", "|---|---|---|---|---|---|"]
        for recipe, sm in comp["summary"].items():
            lines.append(f"| {recipe} | {sm['sources']} | {fmt(sm['mean_auc'])} | {fmt(sm['min_auc'])} | "
                         f"{fmt(sm['ldm_mean_auc'])} | {fmt(sm['human_flagged_mean'])} / "
                         f"{fmt(sm['human_flagged_max'])} |")
        recipes = list(comp["sources"])
        lines += ["", "| held-out source | kind | images | " + " | ".join(f"{r}: AUC / flagged" for r in recipes)
                  + " |", "|---|---|---|" + "---|" * len(recipes)]
        first = comp["sources"][recipes[0]]
        for source in sorted(first, key=lambda s: (not first[s]["ai"], s)):
            kind = ("latent diffusion" if LDM.search(source) else "AI") if first[source]["ai"] else "human"
            lines.append(f"| {source} | {kind} | {first[source]['n']} | " + " | ".join(
                f"{fmt(comp['sources'][r][source]['auc'])} / {comp['sources'][r][source]['flagged']:.3f}"
                for r in recipes) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
