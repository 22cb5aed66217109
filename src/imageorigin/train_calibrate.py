"""After the epochs: the model's logits on held-out folders, and the fitting of
its temperature, AI-vs-human cut (on the calibration humans as they are and
after each everyday re-save) and verdict bands on the calibration split, then
the precision check (int8, bf16) on the same images.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from .calibrate import choose_threshold, fit_temperature
from .data import (
    ImageDataset,
    LabelledFolder,
    batches,
    stack_images,
)
from .engine import check_precision
from .evaluate import RESAVES
from .model import Classifier, pooled
from .train_config import TrainConfig
from .verdict import fit_bands, least_side


def _logits(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool,
            head: bool = True):
    """Run the model (or only its backbone) over a folder with the eval transform.

    Returns (N, C) logits, or (N, D) features with ``head=False``, and (N,) labels;
    unreadable files are left out.
    """
    dl = batches(ImageDataset([p for p, _ in folder.samples], model.transform,
                              [y for _, y in folder.samples]),
                 cfg.batch_size, threads=cfg.num_workers)
    outs, labels = [], []
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for _, images, y, _ in tqdm(dl, desc="validation", unit="batch", disable=not progress,
                                    leave=False):
            if images is not None:
                # A list where a covering model's images have different tile counts.
                images = [x.to(dev) for x in images] if isinstance(images, list) else images.to(dev)
                y = y.to(dev)
                # Features of a multi-crop model: its crops' features pooled by its rule.
                outs.append(model(images) if head else pooled(model.backbone, images, model.preprocessing)[0])
                labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def logit_fn(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool):
    """A function giving the current model's validation logits and labels.

    With a frozen backbone the features never change between epochs: they are
    computed once and only the head runs each epoch.
    """
    if cfg.finetune:
        return lambda: _logits(model, folder, cfg, progress)
    return head_on(model, *_logits(model, folder, cfg, progress, head=False))


def head_on(model: Classifier, feats: torch.Tensor, y: torch.Tensor):
    """A function giving the current head's logits (N, C) on fixed features (N, D), and y (N,)."""

    def head_only():
        with torch.no_grad():
            return model.head(feats), y

    return head_only


def calibrate(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool,
               head_logits=None, check: bool = True) -> None:
    """Fit the temperature and the AI-vs-human threshold on held-out training data,
    and (``check``) whether the model may run in int8 or bf16
    (:func:`imageorigin.engine.check_precision`)."""
    logits, y = head_logits(folder)() if head_logits else _logits(model, folder, cfg, progress)
    model.temperature = fit_temperature(logits, y)
    if model.human_index is not None and (y == model.human_index).any():
        _, p_ai = model.scores(logits)
        is_human = y.cpu().numpy() == model.human_index
        # Every cut is set on the calibration humans as they are and after each
        # everyday re-save (JPEG, shrinking, sharpening, WebP, a crop): a photo
        # re-saved on its way to an upload must not cross it more often.
        humans = {"original": p_ai.numpy()[is_human]}
        if cfg.resave_cut:
            humans.update(_resaved_humans(model, folder, cfg, progress))
        cuts = {f: {name: choose_threshold(p, np.ones(len(p), bool), f) for name, p in humans.items() if len(p)}
                for f in {cfg.target_fpr, 0.01, 0.02, 0.05, 0.1}}
        model.threshold = max(cuts[cfg.target_fpr].values())
        model.info["resave_cuts"] = cuts[cfg.target_fpr]  # the cut each re-save alone would need
        if not is_human.all():
            model.bands = fit_bands(p_ai.numpy(), is_human, model.threshold)
            if model.bands["widened"]:  # said on the terminal and on the card
                note = (f"every calibration AI image scored above the threshold ({model.threshold:.4f}), "
                        "so the data left no uncertain band: 'likely human' starts at p_ai "
                        f"{model.bands['likely_human']:.4f}, one logit below it, by rule")
                model.info.setdefault("warnings", []).append(note)
                print(f"imageorigin: warning: {note}", file=sys.stderr)
        # Other operating points, for a moderator who wants fewer false accusations.
        model.info["thresholds_at_fpr"] = {str(f): max(cuts[f].values()) for f in (0.01, 0.02, 0.05, 0.1)}
    if not check:
        return
    # bf16 doubles CPU speed, but only some models give the fp32 answers in it.
    images = stack_images([image for _, x, _, _ in batches(
        ImageDataset([p for p, _ in folder.samples[:256]], model.transform),
        cfg.batch_size) if x is not None for image in x])
    check = check_precision(model, images)
    model.inference_precision = check["precision"]
    model.info["precision_check"] = check


def _resaved_humans(model: Classifier, folder: LabelledFolder, cfg: TrainConfig,
                    progress: bool) -> dict[str, np.ndarray]:
    """p_ai (N,) of the folder's human images after each everyday re-save
    (:data:`imageorigin.evaluate.RESAVES`, "original" left out).  An image a
    re-save leaves under :func:`imageorigin.verdict.least_side` is left out of
    that one: the small-image caveat makes its verdict uncertain whatever it scores."""
    humans = [p for p, y in folder.samples if y == model.human_index]
    least = least_side(model.preprocessing)
    dev = next(model.parameters()).device
    out = {}
    model.eval()
    for name, change in tqdm(list(RESAVES.items())[1:], desc="re-saved calibration humans",
                             disable=not progress, leave=False):
        def resaved(image, change=change):
            image = change(image)
            return None if min(image.size) < least else model.transform(image)  # None: left out

        p = []
        with torch.no_grad():
            for _, images, _, _ in batches(ImageDataset(humans, resaved), cfg.batch_size, cfg.num_workers):
                if images is not None:
                    images = [x.to(dev) for x in images] if isinstance(images, list) else images.to(dev)
                    p.append(model.scores(model(images))[1])
        out[name] = torch.cat(p).numpy() if p else np.zeros(0)
    return out
