"""The one inference function: images in, class probabilities out.

The CLI, evaluation and the Python API all call :func:`predict`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

from PIL import Image
from tqdm import tqdm

from .data import ImageDataset, batches, crop_boxes
from . import engine as engines
from .engine import Engine, cached_engine, check_outcome, check_precision, model_digest, needs_check
from .fileio import write_json
from . import provenance
from .model import Classifier
from .runtime import cache_dir
from .verdict import band, image_caveats, least_side

Item = Union[str, os.PathLike, Image.Image]


@dataclass
class Prediction:
    """One image's result.  ``error`` is set (and ``label`` None) when it could not be read.

    ``is_ai`` is True only for the "likely_ai" verdict; ``label`` agrees with
    it: "human" unless p_ai reaches the threshold, else the likelier AI class.
    (A caveat can leave an image with an AI label "uncertain", never the
    reverse.)  ``caveats`` say why the model is unreliable on this image.
    """

    path: str
    label: str | None = None
    probs: dict[str, float] = field(default_factory=dict)
    p_ai: float | None = None
    is_ai: bool | None = None
    verdict: str | None = None
    caveats: list[str] = field(default_factory=list)
    error: str | None = None
    # What the decoder said about a damaged but readable file (corrupt EXIF ...).
    warnings: list[str] = field(default_factory=list)
    # The patch map: where each scored crop lies in the image, (left, top,
    # width, height) in its pixels, the crop's own p_ai and its weight in the
    # pool (see _patches).  Empty for a single-crop model.
    patches: list[dict] = field(default_factory=list)
    # (width, height) of the decoded image, EXIF orientation applied.
    size: tuple[int, int] | None = None
    # With predict(..., evidence=True): what the file's own metadata declares
    # (see :mod:`imageorigin.provenance`), with its one-word ``summary``.
    provenance: dict | None = None

    def row(self, labels: list[str], evidence: bool = False) -> dict:
        """Flat record: path, verdict, generator, p_<label> per class, p_ai, is_ai, caveats,
        provenance (its summary; a column only with ``evidence``), error, warnings.

        ``generator`` is the likeliest AI class, given only where the verdict is
        likely_ai: below the cut the likeliest class would read as a verdict it is
        not (an image at p_other_ai 0.86 under a 0.92 cut is not "human").  A model
        with no human class gives no verdict; there it is the likeliest class."""
        generator = self.label if self.is_ai or (self.verdict is None and self.error is None) else None
        out = {"path": self.path, "verdict": self.verdict, "generator": generator}
        out.update({f"p_{l}": self.probs.get(l) for l in labels})
        out["p_ai"] = self.p_ai
        out["is_ai"] = self.is_ai
        out["caveats"] = "; ".join(self.caveats) or None
        if evidence:
            out["provenance"] = (self.provenance or {}).get("summary")
        out["error"] = self.error
        out["warnings"] = "; ".join(self.warnings) or None
        return out


def predict(
    model: Classifier,
    items: Iterable[Item],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
    engine: str = "auto",
    precision: str | None = None,
    threshold: float | None = None,
    evidence: bool = False,
) -> Iterator[Prediction]:
    """Classify image files or PIL images; yields one Prediction per item, in order.

    Files are decoded by :func:`imageorigin.images.decode_image` (large JPEGs
    at reduced size, see there) in ``num_workers`` threads while the model
    runs (:func:`imageorigin.data.batches`); a file that cannot be decoded
    gives a Prediction with ``error`` set, and the rest go on.  The forward pass runs on :func:`imageorigin.engine.create_engine`'s
    ``engine`` in ``precision`` (default: the model's checked
    ``inference_precision``; "fp32" forces full precision).  Memory stays flat
    however many items there are: only a few batches are in flight at a time.  Probabilities are the
    softmax of the logits divided by the model's calibrated ``temperature``.
    ``p_ai`` is ``1 - p(human)`` for models that have a human class; the
    verdict band (:mod:`imageorigin.verdict`) uses ``threshold`` (default: the
    model's stored one) and the checkpoint's bands, and each image's caveats.
    ``evidence=True`` also reads each file's provenance metadata (C2PA, generator
    text chunks, XMP, EXIF) into ``Prediction.provenance``, beside p_ai and never in it.
    """
    items = list(items)
    names = [f"<image {i}>" if isinstance(x, Image.Image) else str(x) for i, x in enumerate(items)]
    run = current_engine(model, engine, precision)
    # A model that never had its precision checked on a machine like this one (a
    # seed .pth), or whose checked int8 engine is not quantised here yet, is
    # checked on the first batch of these images; it keeps the outcome (see
    # _check_on).  A forced int8 is quantised on that batch, unchecked.
    unchecked = precision is None and (needs_check(model.info.get("precision_check")) or
                                       (model.inference_precision == "int8" and _waiting(run)))
    quantise = precision == "int8" and _waiting(run)
    crop = model.preprocessing["crop"]
    cut = model.threshold if threshold is None else threshold
    least = least_side(model.preprocessing)
    dataset = ImageDataset(items, model.transform, inspect=lambda im: (im.size, image_caveats(im, crop, least),
                                                                     im.info.get("warnings", [])))
    dl = batches(dataset, batch_size, threads=num_workers)
    pending: dict[int, Prediction] = {}
    next_out = 0
    with tqdm(total=len(items), desc="predict", unit="img", disable=not progress, leave=False) as bar:
        for idx, images, _, failures in dl:
            for i, err in failures:
                pending[i] = Prediction(names[i], error=err)
            if images is not None:
                if unchecked:
                    run, unchecked = _check_on(model, images, engine), False
                elif quantise:
                    run, quantise = cached_engine(model, engine, "int8", crop, calibration=images), False
                # (B, C) pooled logits; per image its crops' (N_i, C) logits and (N_i,) votes
                logits, crops = model.image_logits(run, images)
                probs, ai = model.scores(logits)  # (B, C), (B,) or None
                ai = [None] * len(probs) if ai is None else ai.tolist()
                for j, (i, p, p_ai) in enumerate(zip(idx.tolist(), probs.tolist(), ai)):
                    size, caveats, warned = dataset.seen.pop(i)  # (width, height), [str], [str]
                    verdict = band(p_ai, model.bands, cut, caveats)
                    pending[i] = Prediction(
                        names[i],
                        label=_label(model, p, p_ai, cut),
                        probs=dict(zip(model.labels, p)),
                        p_ai=p_ai,
                        is_ai=None if verdict is None else verdict == "likely_ai",
                        verdict=verdict,
                        caveats=caveats,
                        warnings=warned,
                        patches=[] if crops is None else _patches(model, size, *crops[j]),
                        size=tuple(size),
                    )
            bar.update(len(failures) + (0 if images is None else len(images)))
            while next_out in pending:  # batches keep order; this is cheap insurance
                p = pending.pop(next_out)
                if evidence and p.error is None and not isinstance(items[next_out], Image.Image):
                    p.provenance = _evidence(items[next_out], p.verdict)
                yield p
                next_out += 1


CHECK_MIN_IMAGES = 16


def current_engine(model: Classifier, engine: str = "auto", precision: str | None = None) -> Engine:
    """The engine ``predict`` runs ``model`` on now (``precision`` None: the model's
    own, as checked, or as an earlier ``predict`` here checked it again); ``str()`` of
    it says which engine and the precision its compiled graph really runs in,
    e.g. "openvino fp32".  Where int8 is wanted but not quantised on this
    machine yet, the fp32 engine (predict quantises int8 on its first batch)."""
    stored = model.info.get("precision_check")
    # A check made here by an earlier predict stands for a stored one that says
    # nothing about this machine, or says int8 (which may have failed on this
    # machine's first batch); once taken (it says what it was checked on) the
    # file is not read again.
    if precision is None and (needs_check(stored) or
                              (model.inference_precision == "int8" and "checked_on" not in (stored or {}))):
        remembered = _remembered(model)
        check = json.loads(remembered.read_text()) if remembered.is_file() else None
        if not needs_check(check):
            model.inference_precision = check["precision"]
            model.info["precision_check"] = check
    crop = model.preprocessing["crop"]
    try:
        return cached_engine(model, engine, precision or model.inference_precision, crop)
    except engines.NotQuantised:
        return cached_engine(model, engine, "fp32", crop)


def _waiting(run: Engine) -> bool:
    """Whether ``run`` is the fp32 stand-in for an int8 engine not quantised yet."""
    return run.name == "openvino" and run.precision != "int8"


def precision_reason(model: Classifier, run: Engine) -> str:
    """Why ``run`` (the model's engine here) computes in the precision it does, in
    words: its precision check's outcome (e.g. "fp32: int8 changed the answers
    (...); bf16 not tried: this CPU has no bf16"), and where the model asks for
    a precision that is not running here, what runs instead."""
    check = model.info.get("precision_check")
    if not needs_check(check):
        why = check_outcome(check)
    else:
        why = ("not checked on this machine yet (checked where bf16 could not run)"
               if check and check.get("host_bf16") is False and "int8" in check else
               "checked before int8 was tried" if check else "not checked yet")
        why += ": predict checks int8 and bf16 on the first batch of images it is given"
    wanted = model.inference_precision
    if wanted == "bf16" and run.precision != "bf16":
        why += "; this CPU has no bf16, so fp32 runs"
    elif wanted == "int8" and run.precision != "int8":
        why += "; int8 is not quantised on this machine yet: predict does it on its first batch"
    return why


def _remembered(model: Classifier) -> Path:
    """Where the precision check of a checkpoint that had none is remembered: per
    weights' digest, beside the converted models, so later runs on the same
    file skip the check and its second compilation."""
    return cache_dir() / "precision" / f"{model_digest(model, model.preprocessing['crop'])}.json"


def _check_on(model: Classifier, images, engine: str):
    """The engine for a model with no precision check that holds here: int8 or
    bf16 when, on this first batch of the user's own images (B, ...), it gives
    the fp32 labels, verdicts and probabilities within the check's margins
    (:func:`imageorigin.engine.check_precision`; int8 is calibrated on these
    images), else fp32.  The outcome is remembered (:func:`_remembered`), and
    kept in ``model.inference_precision`` and ``model.info["precision_check"]``
    (``checked_on`` says on what, ``outcome`` in words), so the rest of this run
    and later calls use it, and callers can say which it was."""
    crop = model.preprocessing["crop"]
    if len(images) < CHECK_MIN_IMAGES:
        # Too few to judge (and too few for speed to matter): fp32 now, checked on a larger call.
        return cached_engine(model, engine, "fp32", crop)
    check = check_precision(model, images, engine)
    check["checked_on"] = f"the first {len(images)} images given to predict"
    remembered = _remembered(model)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    write_json(remembered, check)
    model.inference_precision = check["precision"]
    model.info["precision_check"] = check
    return cached_engine(model, engine, check["precision"], crop)


def _evidence(path, verdict: str | None) -> dict:
    """A file's provenance evidence and its summary against the pixel verdict."""
    try:
        with open(path, "rb") as f:
            ev = provenance.read(f.read())
    except OSError as err:
        return {"summary": "none", "evidence": [], "notes": [f"not readable: {err.strerror}"]}
    return {"summary": provenance.summarise(ev, verdict), **ev}


def _label(model: Classifier, probs: list[float], p_ai: float | None, threshold: float | None) -> str:
    """The likelier class on the side of the threshold p_ai falls: "human" below
    it, the likelier AI class at or above it (argmax without a threshold)."""
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
    if p_ai is None or threshold is None:
        return model.labels[order[0]]
    h = model.human_index
    return model.labels[h] if p_ai < threshold else model.labels[next(i for i in order if i != h)]


def _patches(model: Classifier, size: tuple[int, int], logits, weights) -> list[dict]:
    """The patch map of one image: each scored crop's box (left, top, width, height)
    in the image's pixels, its own calibrated p_ai, and its ``weight`` in the
    pool (0 for a flat crop, which does not vote).  Empty for a model without a
    human class.  logits: (N, C); weights: (N,)."""
    if model.human_index is None:
        return []
    _, p_ai = model.scores(logits)
    return [{"box": list(box), "p_ai": p, "weight": round(w, 4)}
            for box, p, w in zip(crop_boxes(*size, model.preprocessing), p_ai.tolist(), weights.tolist())]
