"""Export a classifier to ONNX, for ONNX Runtime, OpenVINO or any other ONNX consumer.

The graph takes ``image``: (batch, 3, crop, crop) float32, normalised as the
checkpoint's preprocessing says, with a free batch dimension, and gives
``logits`` (batch, C) and ``probs`` (batch, C), the calibrated probabilities
``softmax(logits / temperature)``.  Everything needed to use it travels in the
file's metadata: ``labels``, ``preprocessing``, ``temperature``, ``threshold``,
``human_label`` (JSON values) and ``imageorigin`` (the whole checkpoint
description, as :meth:`Classifier.describe` gives it).

A native multi-crop model (``preprocessing["crops"]``: a grid side n > 1, or
"cover") is exported per crop: feed an image's crops (see
:func:`imageorigin.data.crop_boxes`) as rows of the batch, pool their
``logits`` by the ``pool`` rule (the mean, or for ``detail_mean_logit`` the mean
weighted by :func:`imageorigin.data.tile_detail`), and the image's
probabilities are ``softmax(pooled_logits / temperature)``; ``probs`` is then
each crop's own.  Per crop, so that the patch map survives export.

:func:`load_onnx` reads such a file back as a model ``predict`` runs (on
OpenVINO, which reads ONNX): ``imageorigin predict --model model.onnx``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_path
# OnnxClassifier and load_onnx live with the other loaders in model.py; named here
# too, where earlier versions defined them.
from .model import CheckpointError, Classifier, OnnxClassifier, load_onnx  # noqa: F401


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


def export_seed(model: Classifier, path: str | os.PathLike) -> Path:
    """Write a DenseNet121 model in the seed's layout: a plain torchvision state dict."""
    if model.backbone.name != "densenet121":
        raise CheckpointError(
            f"the seed's .pth layout is a torchvision densenet121; this model's backbone is "
            f"{model.backbone.name}"
        )
    state = {f"features.{k}": v for k, v in model.backbone.features.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in model.head.state_dict().items()})
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    return Path(path)
