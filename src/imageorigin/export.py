"""Export a classifier to ONNX, for ONNX Runtime, OpenVINO or any other ONNX consumer.

The graph takes ``image``: (batch, 3, crop, crop) float32, normalised as the
checkpoint's preprocessing says, with a free batch dimension, and gives
``logits`` (batch, C) and ``probs`` (batch, C), the calibrated probabilities
``softmax(logits / temperature)``.  Everything needed to use it travels in the
file's metadata: ``labels``, ``preprocessing``, ``temperature``, ``threshold``,
``human_label`` (JSON values) and ``imageorigin`` (the whole checkpoint
description, as :meth:`Classifier.describe` gives it).

A native multi-crop model (``preprocessing["crops"]`` n > 1) is exported per
crop: feed an image's n*n crops (see :func:`imageorigin.data.crop_boxes`) as
rows of the batch, take the mean of their ``logits`` (the ``pool`` rule), and
the image's probabilities are ``softmax(mean_logits / temperature)``; ``probs``
is then each crop's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_path
from .model import Classifier


class _WithProbs(nn.Module):
    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        logits = self.model(image)  # (B, C)
        return logits, self.model.scores(logits)[0]  # calibrated probabilities (B, C)


def export_onnx(model: Classifier, path: str | os.PathLike) -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch and its metadata, atomically."""
    size = model.preprocessing["crop"]
    example = torch.zeros(2, 3, size, size)
    model = model.cpu().eval()
    program = torch.onnx.export(
        _WithProbs(model).eval(), (example,), None, dynamo=True, verbose=False,
        input_names=["image"], output_names=["logits", "probs"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    meta = model.describe()
    program.model.metadata_props.update({
        "imageorigin": json.dumps(meta),
        **{k: json.dumps(meta[k]) for k in ("labels", "preprocessing", "temperature", "threshold",
                                             "human_label")},
    })
    with atomic_path(path) as tmp:
        program.save(tmp)
    return Path(path)
