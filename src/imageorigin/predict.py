"""The one inference function: images in, class probabilities out.

The CLI, evaluation and the Python API all call :func:`predict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

from PIL import Image
from tqdm import tqdm

from .data import ImageDataset, batches, crop_boxes, min_decode_size
from .engine import cached_engine
from .model import Classifier

Item = Union[str, os.PathLike, Image.Image]


@dataclass
class Prediction:
    """One image's result.  ``error`` is set (and ``label`` None) when it could not be read."""

    path: str
    label: str | None = None
    probs: dict[str, float] = field(default_factory=dict)
    p_ai: float | None = None
    is_ai: bool | None = None
    error: str | None = None
    # The patch map: where each scored crop lies in the image, (left, top,
    # width, height) in its pixels, and the crop's own p_ai.  Empty for a
    # single-crop model.
    patches: list[dict] = field(default_factory=list)

    def row(self, labels: list[str]) -> dict:
        """Flat record: path, label, p_<label> per class, p_ai, is_ai, error."""
        out = {"path": self.path, "label": self.label}
        out.update({f"p_{l}": self.probs.get(l) for l in labels})
        out["p_ai"] = self.p_ai
        out["is_ai"] = self.is_ai
        out["error"] = self.error
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
    ``p_ai`` is ``1 - p(human)`` for models that have a human class, and
    ``is_ai`` is ``p_ai >= model.threshold`` when the model stores a threshold.
    """
    items = list(items)
    names = [f"<image {i}>" if isinstance(x, Image.Image) else str(x) for i, x in enumerate(items)]
    run = cached_engine(model, engine, precision or model.inference_precision,
                        model.preprocessing["crop"])
    dataset = ImageDataset(items, model.transform, min_size=min_decode_size(model.preprocessing),
                           record_sizes=True)
    dl = batches(dataset, batch_size, threads=num_workers)
    pending: dict[int, Prediction] = {}
    next_out = 0
    with tqdm(total=len(items), unit="img", disable=not progress, leave=False) as bar:
        for idx, images, _, failures in dl:
            for i, err in failures:
                pending[i] = Prediction(names[i], error=err)
            if images is not None:
                out = run(images)  # (B, C) logits, or (B, N, C) for N crops of each image
                probs, ai = model.scores(model.pool(out))  # (B, C), (B,) or None
                ai = [None] * len(probs) if ai is None else ai.tolist()
                crop_ai = _crop_p_ai(model, out)  # (B, N) or None
                for j, (i, p, p_ai) in enumerate(zip(idx.tolist(), probs.tolist(), ai)):
                    size = dataset.sizes.pop(i)  # (width, height)
                    pending[i] = Prediction(
                        names[i],
                        label=model.labels[max(range(len(p)), key=p.__getitem__)],
                        probs=dict(zip(model.labels, p)),
                        p_ai=p_ai,
                        is_ai=None if p_ai is None or model.threshold is None
                        else p_ai >= model.threshold,
                        patches=[] if crop_ai is None else [
                            {"box": list(box), "p_ai": c}
                            for box, c in zip(crop_boxes(*size, model.preprocessing),
                                              crop_ai[j].tolist())],
                    )
            bar.update(len(failures) + (0 if images is None else len(images)))
            while next_out in pending:  # batches keep order; this is cheap insurance
                yield pending.pop(next_out)
                next_out += 1


def _crop_p_ai(model: Classifier, out):
    """Each crop's own calibrated p_ai, (B, N), from per-crop logits (B, N, C);
    None for single-crop output or a model without a human class."""
    if out.dim() != 3 or model.human_index is None:
        return None
    _, p_ai = model.scores(out.flatten(0, 1))
    return p_ai.view(out.shape[0], out.shape[1])
