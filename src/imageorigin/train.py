"""The seed's training recipe: frozen ImageNet backbone, linear head, Adam, cross-entropy.

``train()`` writes into a run folder: ``model.safetensors`` (rewritten after every
epoch, atomically), ``history.json``, ``loss.png``, ``accuracy.png``,
``collage.png`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import backbones, report
from .data import (
    ImageDataset,
    LabelledFolder,
    default_preprocessing,
    loader,
    scan_folder,
    stratified_split,
    train_transform,
)
from .evaluate import evaluate
from .fileio import write_json
from .model import Classifier, save

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the seed model card's."""

    backbone: str = "densenet121"
    weights: str = "imagenet"  # "imagenet", "random" or a path to a state dict file
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    val_fraction: float = 0.2  # used only when no val folder is given
    seed: int = 0
    flip: bool = True
    rotation: float = 15.0  # degrees
    color_jitter: float = 0.2  # brightness / contrast / saturation strength
    image_size: int = 224
    num_workers: int | None = None


def train(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    val_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Classifier:
    """Train a classifier on a folder with one sub-folder per class.

    Validation data is ``val_dir`` or a seeded, stratified split of ``data_dir``.
    Returns the trained model (also saved as ``out_dir/model.safetensors``).
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    data = scan_folder(data_dir)
    if val_dir is not None:
        train_set, val_set = data, scan_folder(val_dir, classes=data.classes)
    else:
        train_set, val_set = stratified_split(data, cfg.val_fraction, cfg.seed)

    spec = backbones.get_spec(cfg.backbone)
    backbone = backbones.build_backbone(cfg.backbone, cfg.weights)
    model = Classifier(
        backbone,
        data.classes,
        backbone_weights="imagenet" if cfg.weights == "imagenet" else str(cfg.weights),
        preprocessing=default_preprocessing(spec.mean, spec.std, cfg.image_size),
    )
    for p in model.backbone.parameters():  # frozen features, as in the seed card
        p.requires_grad_(False)

    augment = {"flip": cfg.flip, "rotation": cfg.rotation, "color_jitter": cfg.color_jitter}
    train_dl = loader(
        ImageDataset([p for p, _ in train_set.samples], train_transform(model.preprocessing, augment),
                     [y for _, y in train_set.samples]),
        cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
    )
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()

    out.mkdir(parents=True, exist_ok=True)
    report.collage(train_set, out / "collage.png")
    # With a frozen backbone and the eval transform, validation features never
    # change between epochs: compute them once.
    val_feats, val_labels = _features(model, val_set, cfg, progress)

    history: list[dict] = []
    skipped: set[str] = set()
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()  # the backbone stays in eval mode (see Classifier.train)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(train_dl, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress,
                   leave=False)
        for _, images, labels, failures in bar:
            for i, err in failures:
                if err not in skipped:
                    log.warning("skipping unreadable training image: %s", err)
                    skipped.add(err)
            if images is None:
                continue
            with torch.no_grad():
                feats = model.backbone(images)  # (B, D)
            logits = model.head(feats)  # (B, C)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        model.eval()
        with torch.no_grad():
            val_logits = model.head(val_feats)
            val_loss = loss_fn(val_logits, val_labels).item()
            val_acc = (val_logits.argmax(1) == val_labels).float().mean().item()
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(row)
        msg = (f"epoch {epoch:>2}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
               f"acc {row['train_accuracy']:.3f}  val loss {val_loss:.4f} acc {val_acc:.3f}")
        tqdm.write(msg, file=sys.stderr)  # per-epoch figures, even with the bars off
        model.info = _info(cfg, train_set, val_set, val_dir, history, sorted(skipped))
        # Saved every epoch, atomically: an interrupted run keeps its last full epoch.
        save(model, out / "model.safetensors")
        write_json(out / "history.json", history)

    report.training_plots(history, out)
    # The card's confusion matrix and sample predictions come from the same
    # evaluation a user runs with `imageorigin evaluate`.
    evaluation = evaluate(model, val_set, out / "val", batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, progress=progress)
    report.write_model_card(model, out / "MODEL_CARD.md", evaluation)
    return model.eval()


def _features(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool):
    """Backbone features of a labelled folder under the eval transform: (N, D), (N,)."""
    dl = loader(ImageDataset([p for p, _ in folder.samples], model.transform,
                             [y for _, y in folder.samples]),
                cfg.batch_size, num_workers=cfg.num_workers)
    feats, labels = [], []
    model.eval()
    with torch.no_grad():
        for _, images, y, failures in tqdm(dl, desc="val features", unit="batch",
                                           disable=not progress, leave=False):
            for _, err in failures:
                log.warning("skipping unreadable validation image: %s", err)
            if images is not None:
                feats.append(model.backbone(images))
                labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _info(cfg, train_set, val_set, val_dir, history, skipped) -> dict:
    last = history[-1]
    return {
        "training": {
            **asdict(cfg),
            "recipe": "frozen backbone (eval mode), linear head, Adam, cross-entropy",
            "data_dir": str(train_set.root),
            "val_dir": str(val_dir) if val_dir is not None else None,
            "val_split": None if val_dir is not None else f"stratified {cfg.val_fraction:.0%}, seed {cfg.seed}",
            "train_counts": train_set.counts(),
            "val_counts": val_set.counts(),
            "skipped_files": skipped,
            "wall_seconds": last["seconds"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        "metrics": {
            "epochs": last["epoch"],
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "val_loss": last["val_loss"],
            "val_accuracy": last["val_accuracy"],
        },
    }
