"""What a run records about itself: its sources and their licences, the warnings
its data earns (too few images for a figure to mean much), and ``info``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from .data import (
    LabelledFolder,
    match_manifest,
    read_manifest,
)
from .model import Classifier
from .train_config import TrainConfig


def training_sources(folder: LabelledFolder, manifest) -> dict:
    """Per source of the training data: class, image count, licence (from the manifest)."""
    rows = match_manifest([p for p, _ in folder.samples], read_manifest(manifest, ("path", "source")))
    out: dict[str, dict] = {}
    for (_, y), row in zip(folder.samples, rows):
        name = "unknown" if row is None else row["source"]
        entry = out.setdefault(name, {"label": folder.classes[y], "n": 0,
                                      "licence": (row or {}).get("licence") or "not stated"})
        entry["n"] += 1
    return out


# Below these counts a figure means little; training warns and the card says so.
MIN_TRAIN_PER_CLASS = 50
MIN_VAL_IMAGES = 100
MIN_VAL_PER_CLASS = 20
MIN_CALIBRATION_HUMAN = 100  # the 1% cut needs at least 100 human images to exist at all
MIN_CALIBRATION_AI = 20


def data_warnings(model: Classifier, cfg: TrainConfig, train_set: LabelledFolder,
                   val_set: LabelledFolder, calib_set: LabelledFolder | None) -> list[str]:
    """Sentences naming each part of the data too small for its figures to mean much."""
    notes = []
    if model.human_label is None:
        notes.append(f"no class is named {cfg.human_class!r} (classes: {', '.join(model.labels)}): "
                     "this model gives class probabilities only, no p_ai, threshold or verdict; "
                     "name the class of human-made images with --human-class NAME")
    small = {k: v for k, v in train_set.counts().items() if v < MIN_TRAIN_PER_CLASS}
    if small:
        notes.append("few training images in " + ", ".join(f"{k} ({v})" for k, v in small.items())
                     + f": under {MIN_TRAIN_PER_CLASS} a class is barely learnt")
    val_counts = val_set.counts()
    if len(val_set.samples) < MIN_VAL_IMAGES or min(val_counts.values(), default=0) < MIN_VAL_PER_CLASS:
        notes.append(f"the validation set is small ({', '.join(f'{k} {v}' for k, v in val_counts.items())}): "
                     f"its accuracy can be off by {_margin(len(val_set.samples)):.0%} or more either way")
    if calib_set is not None and model.human_label is not None:
        c = calib_set.counts()
        humans = c.get(model.human_label, 0)
        if humans < max(MIN_CALIBRATION_HUMAN, 1 / cfg.target_fpr):
            notes.append(f"the threshold is fitted on only {humans} human images: a "
                         f"{cfg.target_fpr:.0%} false-flag rate cannot be measured on fewer than "
                         f"{int(max(MIN_CALIBRATION_HUMAN, 1 / cfg.target_fpr))}")
        ai = sum(v for k, v in c.items() if k != model.human_label)
        if ai < MIN_CALIBRATION_AI:
            notes.append(f"the verdict bands are fitted on only {ai} AI images")
    return notes


def _margin(n: int) -> float:
    """Half-width of a 95% interval for an accuracy near 0.5 measured on n images."""
    return 1.96 * (0.25 / max(n, 1)) ** 0.5


def run_info(cfg, train_set, val_set, val_given, calib_set, history, best, skipped, cache_stats,
          notes) -> dict:
    roots = sorted({str(Path(p).parent.parent) for p, _ in train_set.samples})
    return {
        "training": {
            **asdict(cfg),
            "recipe": ("fine-tuned backbone" if cfg.finetune else "frozen backbone (eval mode)")
            + ("" if cache_stats is None else f", head trained on {cfg.views} cached augmented views")
            + f", linear head, {'AdamW' if cfg.weight_decay else 'Adam'}, cross-entropy",
            "data_dir": ", ".join(roots),
            "val_dir": ", ".join(sorted({str(Path(p).parent.parent) for p, _ in val_set.samples})),
            "val_split": None if val_given else f"stratified {cfg.val_fraction:.0%}, seed {cfg.seed}",
            "train_counts": train_set.counts(),
            "val_counts": val_set.counts(),
            "calibration_counts": None if calib_set is None else calib_set.counts(),
            "skipped_files": skipped,
            "feature_cache": cache_stats,
            "wall_seconds": history[-1]["seconds"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        "metrics": {
            "epochs": history[-1]["epoch"],
            "best_epoch": best["epoch"],
            "train_loss": best["train_loss"],
            "train_accuracy": best["train_accuracy"],
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
        },
        "warnings": notes,
    }
