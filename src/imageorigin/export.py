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

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .data import eval_transform
from .engine import Engine, compile_openvino
from .fileio import atomic_path
from .model import CheckpointError, Classifier, Scoring


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


class OnnxClassifier(Scoring):
    """A model exported by :func:`export_onnx`, read back: the same labels,
    preprocessing, temperature, threshold and bands as the checkpoint it came
    from, its forward pass run by OpenVINO from the ONNX file itself."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.labels = list(meta["labels"])
        self.display_names = meta.get("display_names") or {l: l for l in self.labels}
        self.human_label = meta.get("human_label")
        self.preprocessing = meta["preprocessing"]
        self.temperature = float(meta.get("temperature", 1.0))
        self.threshold = meta.get("threshold")
        self.bands = meta.get("bands")
        self.inference_precision = meta.get("inference_precision", "fp32")
        self.info = meta.get("info") or {}
        self.transform = eval_transform(self.preprocessing)
        with self.path.open("rb") as f:
            self.digest = hashlib.file_digest(f, "sha256").hexdigest()

    def describe(self) -> dict:
        """The checkpoint description stored in the ONNX file, and where it was read."""
        return {**self.meta, "onnx": {"path": str(self.path), "sha256": self.digest}}

    def engine(self, engine: str = "auto", precision: str = "fp32") -> Engine:
        """OpenVINO compiling the ONNX graph: (B, 3, crop, crop) -> logits (B, C)."""
        if engine not in ("auto", "openvino"):
            raise ValueError(f"{self.path}: an .onnx model runs on OpenVINO (--engine auto or openvino)")
        # int8 is not quantised for an exported file: it runs fp32, and says so.
        compiled, ran = compile_openvino(self.path, precision != "bf16")
        logits = compiled.output("logits")

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(compiled(x.detach().cpu().float().contiguous().numpy())[logits].copy())

        return Engine("openvino", ran, run)

    def to(self, device) -> "OnnxClassifier":
        return self

    def eval(self) -> "OnnxClassifier":
        return self


def load_onnx(path: str | os.PathLike) -> OnnxClassifier:
    """Read an ONNX file written by :func:`export_onnx`; CheckpointError names the
    file if it is not valid ONNX or carries no imageorigin metadata."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others for non-ONNX bytes
        raise CheckpointError(f"{path}: not a valid ONNX file ({type(err).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}.get("imageorigin")
    if meta is None:
        raise CheckpointError(f"{path}: an ONNX file without imageorigin metadata (not written by "
                              "`imageorigin export`): its labels and preprocessing are unknown")
    return OnnxClassifier(Path(path), json.loads(meta))
