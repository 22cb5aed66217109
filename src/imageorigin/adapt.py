"""Learn from the reviewers: ``imageorigin adapt`` and the gate before a deployment.

:func:`adapt` warm-starts a candidate from the model in service on the images
reviewers labelled (the service's feedback store, :mod:`imageorigin.feedback`)
plus a replay sample of the model's own training data, so that it learns the
new source without forgetting the old ones: ``imageorigin train --init``'s
recipe (the current model's own settings, a few epochs), with its temperature,
threshold and verdict bands fitted again.  A share of the reviewed images is
held out of training for the gate.

:func:`gate` compares the candidate with the current model on a reference set
the team keeps (class folders) and on those held-out reviewed images.  It is
accepted only if the reference AI-vs-human AUC does not fall by more than
``max_auc_drop`` (0.005), the share of reference human images flagged does not
rise, the AUC on adapt's held-out replay images (the sources the model was
trained on) does not fall, and the held-out reviewed
images come out better (the mean probability of
the reviewer's answer rises and no fewer of them get the reviewer's answer).
The decision and its table are written beside the candidate (``gate.json``,
``gate.md``); the service deploys only a candidate whose gate accepted it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .data import LabelledFolder, scan_folders
from .evaluate import figures
from .feedback import FeedbackStore
from .fileio import write_json, write_text
from .engine import needs_check
from .evaluate import evaluate
from .model import Classifier, checkpoint_file, load, save
from .report import write_model_card
from .train_calibrate import calibrate
from .predict import predict
from .train import train
from .train_config import TrainConfig

MAX_REPEATS = 5  # times a reviewed image is seen per epoch, at most
# Shares of the tuned weights tried, most first: adapt keeps the first whose AUC on
# the old sources does not fall.
ALPHAS = (1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
GATE_FILE = "gate.json"
ADAPT_FILE = "adapt.json"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes ("default": the default checkpoint's): a model's id."""
    with open(checkpoint_file(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def class_of(model: Classifier, label: str, generator: str | None = None) -> str:
    """The model's class for a reviewer's answer: its human class for "human"; for
    "ai", the AI class the generator names (by label or display name, e.g. "DALL-E 3"
    -> dalle), else the catch-all AI class (the one whose name starts with "other",
    else the last)."""
    if label == "human":
        return model.human_label
    ai = [c for c in model.labels if c != model.human_label]
    said = _plain(generator or "")
    for c in ai:
        names = {_plain(c), _plain(model.display_names[c]).replace("generated", "")} - {""}
        if said and any(n in said for n in names):
            return c
    return next((c for c in ai if c.startswith("other")), ai[-1])


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def split_reviewed(rows: list[dict], hold_out: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, held out): every image's place is fixed by its sha256, so a mark added
    later never moves an earlier image from one side to the other.  At least one
    image of each reviewer answer stays in training."""
    held = [r for r in rows if int(r["sha256"][:8], 16) / 16 ** 8 < hold_out]
    train_rows = [r for r in rows if r not in held]
    for label in {r["label"] for r in rows} - {r["label"] for r in train_rows}:
        back = next(r for r in held if r["label"] == label)
        held.remove(back)
        train_rows.append(back)
    return train_rows, held


def _link(src: str | os.PathLike, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(os.path.abspath(src), dst)


def _suffix(path: str | os.PathLike) -> str:
    """The file name suffix of an image's format (a kept image is named by its hash alone,
    and the data loader reads files by their suffix)."""
    with Image.open(path) as im:
        fmt = im.format
    return next((ext for ext, f in Image.registered_extensions().items() if f == fmt), ".png")


def replay_dirs(model: Classifier) -> list[Path]:
    """The training folders a checkpoint names (``info.training.data_dir``), those that exist here."""
    named = model.info.get("training", {}).get("data_dir") or ""
    return [Path(d) for d in named.split(", ") if d and Path(d).is_dir()]


def adapt(current: str | os.PathLike, feedback: str | os.PathLike | list[dict], out_dir: str | os.PathLike, *,
          replay: list[str | os.PathLike] | None = None, replay_per_class: int = 100, epochs: int = 3,
          hold_out: float = 0.2, lr: float | None = 3e-4, calibration_humans: int = 200, seed: int = 0,
          progress: bool = True) -> dict:
    """Warm-start a candidate from ``current`` (a checkpoint path) on reviewed images.

    ``feedback``: a feedback store folder (its images kept by ``serve --keep-images``)
    or rows with ``path``, ``sha256``, ``label`` ("human"/"ai") and optionally
    ``generator``.  ``replay``: class folders of the current model's training data
    (default: the folders its checkpoint names).  Training sees ``replay_per_class``
    replay images of each class and the reviewed images, repeated up to
    MAX_REPEATS times so that they make about a third of it; the epoch kept is
    the best on other replay images plus the reviewed ones.  The temperature,
    threshold and bands are fitted again on ``calibration_humans`` further replay
    humans (the cut's false-alarm rate is only as sure as its count of humans)
    and a quarter as many images of each AI class.
    Writes ``out_dir/model.safetensors`` (its card, ``MODEL_CARD.md``, says what
    feedback it learned from) and ``out_dir/adapt.json``; returns that record.
    """
    began = time.perf_counter()
    out = Path(out_dir)
    rows = FeedbackStore(feedback).reviewed() if not isinstance(feedback, list) else feedback
    if not rows:
        raise ValueError(f"{feedback}: no reviewed images with their bytes kept "
                         "(the service keeps them only with --keep-images)")
    model = load(current)
    train_rows, held = split_reviewed(rows, hold_out)
    pool = replay or replay_dirs(model)
    if not pool:
        raise ValueError(f"{current}: no replay data: its training folders are not here; give --replay")
    found = scan_folders(pool, model.labels)
    by_class: dict[str, list[Path]] = {}
    for path, y in found.samples:
        by_class.setdefault(model.labels[y], []).append(path)
    rng = random.Random(seed)
    shutil.rmtree(out / "data", ignore_errors=True)  # links of an earlier run in this folder
    (out / GATE_FILE).unlink(missing_ok=True)  # and its gate's decision, which was not about this candidate
    data, val, calib = (out / "data" / part for part in ("train", "val", "calibration"))
    val_n, calib_ai = replay_per_class, calibration_humans // 4
    for cls, files in sorted(by_class.items()):
        # Calibration first: the cut matters most; then training, then validation.
        n_calib = calibration_humans if cls == model.human_label else calib_ai
        picked = rng.sample(sorted(files), min(len(files), replay_per_class + val_n + n_calib))
        if len(picked) < n_calib + 2:
            raise ValueError(f"{', '.join(map(str, pool))}: {len(files)} replay images of {cls}; "
                             f"adapt needs more than {n_calib + 2}")
        for i, f in enumerate(picked):
            part = calib if i < n_calib else data if i < n_calib + replay_per_class else val
            _link(f, part / cls / f"replay-{i}-{Path(f).name}")
    repeats = max(1, min(MAX_REPEATS, round(replay_per_class * len(by_class) / 2 / max(1, len(train_rows)))))
    for r in train_rows:
        cls, suffix = class_of(model, r["label"], r.get("generator")), _suffix(r["path"])
        for k in range(repeats):
            _link(r["path"], data / cls / f"reviewed-{r['sha256'][:16]}-{k}{suffix}")
        _link(r["path"], val / cls / f"reviewed-{r['sha256'][:16]}{suffix}")
    keep = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in model.info.get("training", {}).items() if k in keep}
    cfg = TrainConfig(**{**settings, "init": str(current), "epochs": epochs, "pseudo_fakes": None,
                         "samples": False, "seed": seed, "calibration_fraction": 0.0, **({"lr": lr} if lr else {})})
    seconds = {"data": time.perf_counter() - began}
    candidate = train(data, out, cfg, val=val, progress=progress)
    seconds["train"] = time.perf_counter() - began - sum(seconds.values())
    replay_val = sorted(val.glob("*/replay-*"))
    alpha, kept = _keep_the_old(model, candidate, replay_val)
    seconds["mix"] = time.perf_counter() - began - sum(seconds.values())
    # Calibrated here, not in train: on many more humans than a split of this small set holds.
    calib_set = scan_folders([calib], candidate.labels)
    # A model whose own check kept it in fp32 gives a mix of its weights that fp32 is
    # right for too: the check (an int8 quantisation, 10-20 s) is not made again.
    stored = model.info.get("precision_check")
    inherit = not needs_check(stored) and stored["precision"] == "fp32"
    calibrate(candidate, calib_set, cfg, progress, check=not inherit)
    if inherit:
        candidate.inference_precision = "fp32"
        candidate.info["precision_check"] = {**stored, "inherited_from": sha256_file(current)}
    candidate.info["calibration"] = {"temperature": candidate.temperature, "threshold": candidate.threshold,
                                     "target_fpr": cfg.target_fpr, "counts": calib_set.counts()}
    save(candidate, out / "model.safetensors")
    seconds["calibrate"] = time.perf_counter() - began - sum(seconds.values())
    evaluation = evaluate(candidate, scan_folders([val], candidate.labels), out / "val", robustness=False,
                          samples=False)
    record = {
        "current": str(current), "current_id": sha256_file(current),
        "candidate": str(out / "model.safetensors"), "candidate_id": sha256_file(out / "model.safetensors"),
        "epochs": epochs, "lr": cfg.lr, "repeats": repeats, "weight_of_new": alpha, "replay_val_auc": kept,
        "replay_val": [str(f) for f in replay_val], "replay": [str(p) for p in pool],
        "replay_per_class": replay_per_class, "calibration": calib_set.counts(),
        "trained_on": [_public(r) for r in train_rows], "held_out": [_public(r) for r in held],
        "seconds": round(time.perf_counter() - began, 1),
        "phases": {k: round(v, 1) for k, v in seconds.items()},
    }
    write_json(out / ADAPT_FILE, record)
    write_model_card(candidate, out / "MODEL_CARD.md", evaluation)
    _card_section(out / "MODEL_CARD.md", record, candidate)
    return record


def _keep_the_old(current: Classifier, tuned: Classifier, replay_val: list[Path]) -> tuple[float, dict]:
    """Mix the tuned weights back towards the current ones (weight-space ensembling,
    Wortsman et al. 2022, "WiSE-FT"): the largest share of the tuned weights, of
    ALPHAS, whose AI-vs-human AUC on replay validation images (the old sources,
    never trained on here) does not fall; if none, the last, which the gate then
    refuses.  Fine-tuning on a few reviewed images otherwise forgets a little of
    every source it no longer sees.
    ``tuned`` is left holding the mixed weights.  Returns (its share, the AUCs seen)."""
    old = {k: v.detach().clone() for k, v in current.state_dict().items()}
    new = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    seen = {"current": _auc_on(current, replay_val)}
    for alpha in ALPHAS:
        tuned.load_state_dict({k: alpha * new[k] + (1 - alpha) * old[k] if new[k].is_floating_point() else new[k]
                               for k in new})
        seen[str(alpha)] = _auc_on(tuned, replay_val)
        if seen[str(alpha)] >= seen["current"]:
            break
    return alpha, seen


def _auc_on(model: Classifier, files: list) -> float:
    """AI-vs-human AUC on files in class folders (replay links), of the uncalibrated
    scores (temperature 1, fp32 as trained): the same figure in adapt's mixing,
    before the temperature is fitted, and in the gate, after (with three classes
    the temperature can move the AUC a little)."""
    truth = np.array([Path(f).parent.name != model.human_label for f in files])
    fitted, model.temperature = model.temperature, 1.0
    try:
        p = _score(model, files, "fp32")
    finally:
        model.temperature = fitted
    return figures(np.ones(len(truth), bool), truth, p, None)["ai_vs_human_auc"]


def _public(row: dict) -> dict:
    return {k: row.get(k) for k in ("sha256", "path", "label", "generator", "reviewer", "created_at", "model_id")}


def _card_section(card: Path, record: dict, model: Classifier) -> None:
    labels: dict[str, int] = {}
    for r in record["trained_on"]:
        c = class_of(model, r["label"], r.get("generator"))
        labels[c] = labels.get(c, 0) + 1
    reviewers = sorted({r["reviewer"] or "?" for r in record["trained_on"] + record["held_out"]})
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    text += ("\n## Feedback it learned from\n\n"
             f"Adapted (`imageorigin adapt`) from `{record['current']}` (id `{record['current_id'][:12]}`), "
             f"{record['epochs']} epochs, on {len(record['trained_on'])} reviewed images "
             f"({', '.join(f'{model.display_names[c]} {n}' for c, n in sorted(labels.items()))}) "
             f"marked by {', '.join(reviewers)}, plus {record['replay_per_class']} replay images per class "
             f"from {', '.join(record['replay'])}. {len(record['held_out'])} reviewed images were held out for "
             "the gate. The reviewed images' SHA-256s are in `adapt.json`.\n")
    write_text(card, text)


def _score(model: Classifier, paths: list, precision: str | None = None) -> np.ndarray:
    """p_ai of each file (NaN where it could not be read)."""
    return np.array([np.nan if p.p_ai is None else p.p_ai for p in predict(model, paths, precision=precision)],
                    dtype=float)


def reference_files(reference: list[str | os.PathLike], model: Classifier) -> tuple[list[str], np.ndarray]:
    """The reference set's files and their truth "not human" (class folders named as the model's labels)."""
    folder: LabelledFolder = scan_folders(reference, model.labels)
    human = folder.classes.index(model.human_label)
    return [str(p) for p, _ in folder.samples], np.array([y != human for _, y in folder.samples])


def gate(candidate: str | os.PathLike, current: str | os.PathLike, reference: list[str | os.PathLike],
         held_out: list[dict] | None = None, *, max_auc_drop: float = 0.005, write: bool = True) -> dict:
    """Accept or refuse ``candidate`` against ``current`` (checkpoint paths).

    ``reference``: class folders; ``held_out``: reviewed images not trained on
    (default: those its ``adapt.json`` names).  Returns (and, with ``write``,
    writes beside the candidate) {"accepted", "rows": [{"measure", "current",
    "candidate", "rule", "ok"}], ...}.
    """
    began = time.perf_counter()
    cand_path = Path(candidate)
    record = json.loads((cand_path.parent / ADAPT_FILE).read_text()) \
        if (cand_path.parent / ADAPT_FILE).is_file() else {}
    if held_out is None:
        held_out = record.get("held_out")
    old = [f for f in record.get("replay_val", []) if Path(f).is_file()]  # adapt's replay images, never trained on
    held_out = held_out or []
    models = {"current": load(current), "candidate": load(candidate)}
    files, truth = reference_files(reference, models["current"])
    if truth.all() or not truth.any():
        raise ValueError("the reference set needs both human and AI images")
    reviewed_ai = np.array([r["label"] != "human" for r in held_out], dtype=bool)
    got: dict[str, dict] = {}
    for name, m in models.items():
        p = _score(m, files)
        ok = ~np.isnan(p)
        f = figures(np.ones(ok.sum(), bool), truth[ok], p[ok], m.threshold)
        q = _score(m, [r["path"] for r in held_out]) if held_out else np.array([])
        right = np.where(reviewed_ai, q, 1 - q)  # the probability of the reviewer's answer
        old_auc = _auc_on(m, old) if old else None
        got[name] = {"auc": f["ai_vs_human_auc"], "humans_flagged": f["human_flagged_rate"], "old_auc": old_auc,
                     "ai_detected": f["ai_detected_rate"],
                     "reviewed_right": float(np.mean((q >= m.threshold) == reviewed_ai)) if held_out else None,
                     "reviewed_p": float(np.nanmean(right)) if held_out else None}
    cur, new = got["current"], got["candidate"]
    rows = [
        _row("reference AI-vs-human AUC", cur["auc"], new["auc"], f"falls by at most {max_auc_drop}",
             new["auc"] >= cur["auc"] - max_auc_drop),
        _row("reference humans flagged", cur["humans_flagged"], new["humans_flagged"], "does not rise",
             new["humans_flagged"] <= cur["humans_flagged"]),
        _row("reference AI detected", cur["ai_detected"], new["ai_detected"], "(for information)", None),
    ]
    if old:  # what adapt mixed for: a candidate that could not learn without forgetting is refused
        rows.append(_row(f"AUC on adapt's held-out replay images (of {len(old)}; the old sources)",
                         cur["old_auc"], new["old_auc"], "does not fall",
                         new["old_auc"] >= cur["old_auc"]))
    if held_out:
        rows += [
            _row(f"held-out reviewed images given the reviewer's answer (of {len(held_out)})",
                 cur["reviewed_right"], new["reviewed_right"], "does not fall",
                 new["reviewed_right"] >= cur["reviewed_right"]),
            _row("held-out reviewed images: mean probability of the reviewer's answer", cur["reviewed_p"],
                 new["reviewed_p"], "rises", new["reviewed_p"] > cur["reviewed_p"]),
        ]
    else:
        rows.append(_row("held-out reviewed images", None, None, "some are needed", False))
    result = {"accepted": all(r["ok"] is not False for r in rows), "rows": rows,
              "candidate": str(candidate), "candidate_id": sha256_file(candidate),
              "current": str(current), "current_id": sha256_file(current),
              "reference": [str(r) for r in reference], "reference_images": len(files),
              "reference_humans": int((~truth).sum()), "held_out": len(held_out),
              "seconds": round(time.perf_counter() - began, 1)}
    if write:
        write_json(cand_path.parent / GATE_FILE, result)
        write_text(cand_path.parent / "gate.md", gate_table(result))
    return result


def _row(measure: str, current, candidate, rule: str, ok) -> dict:
    return {"measure": measure, "current": current, "candidate": candidate, "rule": rule,
            "ok": None if ok is None else bool(ok)}


def gate_table(result: dict) -> str:
    """The gate's decision as a Markdown table, each row with its rule and outcome."""
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    head = "ACCEPTED" if result["accepted"] else "REFUSED"
    lines = [f"# Gate: {head}", "",
             f"Candidate `{result['candidate']}` (id `{result['candidate_id'][:12]}`) against the current "
             f"model `{result['current']}` (id `{result['current_id'][:12]}`), on {result['reference_images']} "
             f"reference images ({result['reference_humans']} human) from {', '.join(result['reference'])} "
             f"and {result['held_out']} held-out reviewed images.", "",
             "| measure | current | candidate | rule | outcome |", "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        outcome = "" if r["ok"] is None else ("pass" if r["ok"] else "**FAIL**")
        lines.append(f"| {r['measure']} | {fmt(r['current'])} | {fmt(r['candidate'])} | {r['rule']} | {outcome} |")
    return "\n".join(lines) + "\n"


def accepted(candidate: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``candidate`` may be deployed: its gate file accepted these very bytes.
    Returns (ok, why not)."""
    path = Path(candidate).parent / GATE_FILE
    if not path.is_file():
        return False, f"{candidate}: no gate decision beside it ({GATE_FILE}): run imageorigin gate first"
    result = json.loads(path.read_text())
    if result.get("candidate_id") != sha256_file(candidate):
        return False, f"{candidate}: its gate decision is for other bytes (it changed after the gate)"
    if not result.get("accepted"):
        failed = [r["measure"] for r in result["rows"] if r["ok"] is False]
        return False, f"{candidate}: the gate refused it ({'; '.join(failed)})"
    return True, ""

