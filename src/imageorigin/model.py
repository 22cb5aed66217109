"""Classifier = backbone + linear head; self-describing checkpoints; the seed's .pth layout.

Checkpoint format (``.safetensors``): tensors ``head.*`` always, ``backbone.*``
unless the backbone is a frozen registry backbone with its verified ImageNet
weights (then it is rebuilt from the registry, keeping the file small).  The
safetensors metadata key ``imageorigin`` holds JSON: backbone name and weight
source, labels, display names, the human label, preprocessing, threshold, and
``info`` (training settings, data counts, measured metrics).  Nothing is
unpickled when a checkpoint is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import backbones
from .data import default_preprocessing, eval_transform, tile_detail
from .engine import Engine, compile_openvino
from .fileio import atomic_path
from .runtime import device

FORMAT = "imageorigin/1"

# The seed model card's classes, in its output order.
SEED_LABELS = ["dalle", "human", "other_ai"]
DISPLAY_NAMES = {
    "dalle": "DALL-E generated",
    "human": "Human-created",
    "other_ai": "Other AI-generated",
}
# How a multi-crop model pools its crops (see Scoring.pool).
POOL_RULES = ("mean_logit", "detail_mean_logit")


class CheckpointError(ValueError):
    """A model file cannot be loaded; the message names the file and the reason."""


class Scoring:
    """What every model gives callers besides its forward pass: pooling crops,
    calibrated scores and the human class.  Shared by :class:`Classifier` and
    an exported ONNX model (:class:`OnnxClassifier`); needs
    ``preprocessing``, ``temperature``, ``labels`` and ``human_label``."""

    def pool(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-crop logits (B, N, C) -> one image's logits (B, C), by the
        preprocessing's ``pool`` rule (see :func:`pool`).  (B, C) passes unchanged."""
        return pool(logits, weights, self.preprocessing.get("pool", "mean_logit"))

    def image_logits(self, run, images, chunk: int = 256) -> tuple[torch.Tensor, list | None]:
        """:func:`pooled` with this model's preprocessing."""
        return pooled(run, images, self.preprocessing, chunk)

    def scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities (B, C) = softmax(logits / temperature), and
        p_ai (B,) = 1 - p(human), None for a model without a human class."""
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=1)
        h = self.human_index
        return probs, None if h is None else 1.0 - probs[:, h]

    @property
    def human_index(self) -> int | None:
        """Index of the human-created class, or None if the model has none."""
        return None if self.human_label is None else self.labels.index(self.human_label)


def pool(logits: torch.Tensor, weights: torch.Tensor | None, rule: str) -> torch.Tensor:
    """Per-crop logits (B, N, C) -> one image's logits (B, C) by ``rule``: the mean
    logit (the published default for multi-crop detectors; for a linear head it
    equals the head applied to the crops' mean feature), or ``detail_mean_logit``,
    the mean weighted by ``weights`` (B, N), each crop's
    :func:`imageorigin.data.tile_detail`, so flat crops do not vote (an image with
    no detailed crop takes the plain mean).  (B, C) passes unchanged."""
    if logits.dim() == 2:
        return logits
    if rule not in POOL_RULES:
        raise ValueError(f"unknown pooling rule {rule!r} in the checkpoint's preprocessing")
    if rule == "mean_logit" or weights is None:
        return logits.mean(1)
    w = weights.to(logits.device, logits.dtype)  # (B, N)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    return (logits * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)


def pooled(run, images, pre: dict, chunk: int = 256) -> tuple[torch.Tensor, list | None]:
    """Run ``run`` ((M, 3, c, c) -> (M, K): logits, or a backbone's features) over a
    batch of preprocessed images and pool each image's crops by ``pre``'s rule.

    ``images`` is (B, 3, c, c), (B, N, 3, c, c), or a list of B (N_i, 3, c, c)
    (see :func:`imageorigin.data.collate`).  Returns (B, K) and, for crops, each
    image's ``(outputs (N_i, K), weights (N_i,))`` (None for single-crop input).
    The crops of the whole batch run ``chunk`` at a time, so a batch of large
    images needs no more memory than ``chunk`` crops."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return run(images), None
    counts = [len(x) for x in images]
    tiles = torch.cat(list(images)) if isinstance(images, list) else images.flatten(0, 1)
    out = torch.cat([run(tiles[i:i + chunk]) for i in range(0, len(tiles), chunk)])  # (sum N, K)
    rule = pre.get("pool", "mean_logit")
    weighted = rule == "detail_mean_logit"
    w = tile_detail(tiles, pre).to(out.device) if weighted else torch.ones(len(tiles), device=out.device)
    crops = list(zip(out.split(counts), w.split(counts)))
    return torch.cat([pool(o[None], v[None], rule) for o, v in crops]), crops


class Classifier(Scoring, nn.Module):
    """A backbone producing (B, D) features and a linear head producing (B, C) logits.

    Attributes that travel with the checkpoint: ``labels``, ``display_names``,
    ``human_label``, ``preprocessing`` (see :func:`imageorigin.data.eval_transform`),
    ``temperature`` (logits are divided by it before the softmax: calibration),
    ``threshold`` (p_ai at or above it means "AI-generated"), ``bands`` (the
    verdict cut-points, see :mod:`imageorigin.verdict`), ``inference_precision``
    ("bf16" only if checked to give the fp32 answers, see
    :func:`imageorigin.engine.check_precision`; else "fp32") and ``info``.
    """

    def __init__(
        self,
        backbone: backbones.Backbone,
        labels: Sequence[str],
        *,
        backbone_weights: str = "imagenet",
        display_names: dict[str, str] | None = None,
        human_label: str | None = "human",
        preprocessing: dict | None = None,
        threshold: float | None = None,
        bands: dict | None = None,
        temperature: float = 1.0,
        inference_precision: str = "fp32",
        info: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, len(labels))
        self.labels = list(labels)
        self.backbone_weights = str(backbone_weights)
        self.frozen = True
        self.display_names = {l: (display_names or DISPLAY_NAMES).get(l, l) for l in self.labels}
        self.human_label = human_label if human_label in self.labels else None
        spec = backbones.get_spec(backbone.name)
        self.preprocessing = preprocessing or default_preprocessing(spec.mean, spec.std, spec.size)
        self.threshold = threshold
        self.bands = bands
        self.temperature = float(temperature)
        self.inference_precision = inference_precision
        self.info = dict(info or {})
        self.transform = eval_transform(self.preprocessing)

    def forward(self, x) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C) logits; crops (B, N, 3, H, W),
        or a list of B (N_i, 3, H, W), -> (B, C) pooled logits (see :meth:`image_logits`)."""
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            return self.head(self.backbone(x))
        return self.image_logits(lambda t: self.head(self.backbone(t)), x)[0]

    def train(self, mode: bool = True) -> "Classifier":
        """Like nn.Module.train, but a frozen backbone always stays in eval mode.

        Its BatchNorm running statistics would otherwise drift during head
        training even though no weight is updated.
        """
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def describe(self) -> dict:
        """The JSON metadata stored in a checkpoint."""
        return {
            "format": FORMAT,
            "backbone": {
                "name": self.backbone.name,
                "weights": self.backbone_weights,
                "source": backbones.get_spec(self.backbone.name).weights_source
                if self.backbone_weights == "imagenet"
                else "stored in this checkpoint",
            },
            "labels": self.labels,
            "display_names": self.display_names,
            "human_label": self.human_label,
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "bands": self.bands,
            "temperature": self.temperature,
            "inference_precision": self.inference_precision,
            "info": self.info,
        }


# ---------------------------------------------------------------- save / load


def _stores_backbone(model: Classifier) -> bool:
    return not (model.frozen and model.backbone_weights == "imagenet")


def save(model: Classifier, path: str | os.PathLike) -> Path:
    """Write ``model`` as a self-describing ``.safetensors`` checkpoint, atomically."""
    meta = model.describe()
    tensors = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if _stores_backbone(model):
        meta["backbone"]["weights"] = "checkpoint"
        meta["backbone"]["source"] = "stored in this checkpoint"
        tensors.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"imageorigin": json.dumps(meta)})
    return Path(path)


def default_model_path() -> Path:
    """The checkpoint shipped inside the package (``load("default")``)."""
    return Path(str(resources.files("imageorigin") / "models" / "default.safetensors"))


def checkpoint_file(model: str | os.PathLike) -> Path:
    """The file behind ``model`` ("default" or a path; a symbolic link is followed)."""
    return default_model_path() if str(model) == "default" else Path(model).resolve()


def load(model: str | os.PathLike = "default") -> Classifier:
    """Load a model: ``"default"``, an imageorigin ``.safetensors`` checkpoint, or a
    seed-format ``.pth`` (a torchvision DenseNet121 state dict with a 3-way classifier).

    The returned model is in eval mode, on :func:`imageorigin.runtime.device`.
    Raises CheckpointError naming the file.
    """
    path = default_model_path() if str(model) == "default" else Path(model)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    if _is_safetensors(path):
        return _load_safetensors(path).to(device()).eval()
    if _is_torch_file(path):
        return _load_seed(path).to(device()).eval()
    raise CheckpointError(
        f"{path}: {_what_is(path)}, not a model file. MODEL is 'default', an imageorigin "
        ".safetensors checkpoint, a seed-format .pth, or an .onnx written by `imageorigin export`")


def _is_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive (PK), older versions a bare pickle (0x80).
    with path.open("rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _what_is(path: Path) -> str:
    """A few words on what a file that is not a model looks like."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return f"a {im.format} image"
    except (UnidentifiedImageError, OSError):
        pass
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "binary data of no known model format"


def _is_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header.
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _load_safetensors(path: Path) -> Classifier:
    try:

        with safe_open(str(path), framework="pt") as f:
            meta_json = (f.metadata() or {}).get("imageorigin")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a safetensors or .pth model file ({err})") from None
    if meta_json is None:
        raise CheckpointError(f"{path}: safetensors file without imageorigin metadata")
    meta = json.loads(meta_json)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    stored = meta["backbone"]["weights"] == "checkpoint"
    try:
        backbone = backbones.build_backbone(meta["backbone"]["name"], "random" if stored else "imagenet")
    except backbones.BackboneWeightsError as err:
        raise CheckpointError(f"{path}: {err}") from None
    clf = Classifier(
        backbone,
        meta["labels"],
        backbone_weights=meta["backbone"]["weights"],
        display_names=meta.get("display_names"),
        human_label=meta.get("human_label"),
        preprocessing=meta["preprocessing"],
        threshold=meta.get("threshold"),
        bands=meta.get("bands"),
        temperature=meta.get("temperature", 1.0),
        inference_precision=meta.get("inference_precision", "fp32"),
        info=meta.get("info"),
    )
    clf.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    if stored:
        clf.backbone.load_state_dict(
            {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
        )
    return clf


def _load_seed(path: Path) -> Classifier:
    """The seed card's ``densenet_finetuned_dense.pth`` and the variants people make of it."""
    try:
        state = backbones.normalise_state_dict(backbones.load_state_dict_file(path))
    except backbones.BackboneWeightsError as err:
        raise CheckpointError(str(err)) from None
    weight = state.get("classifier.weight")
    if weight is None or weight.ndim != 2 or weight.shape[1] != backbones.get_spec("densenet121").dim:
        raise CheckpointError(
            f"{path}: not a seed-format DenseNet121 state dict (expected 'classifier.weight' "
            f"of shape (n_classes, 1024), found {None if weight is None else tuple(weight.shape)})"
        )
    n = weight.shape[0]
    labels = SEED_LABELS if n == len(SEED_LABELS) else [f"class_{i}" for i in range(n)]
    clf = Classifier(
        backbones.build_backbone("densenet121", "random"),
        labels,
        backbone_weights="checkpoint",
        info={"imported_from": str(path), "origin": "seed .pth (torchvision densenet121 state dict)"},
    )
    try:
        clf.backbone.features.load_state_dict(
            {k[9:]: v for k, v in state.items() if k.startswith("features.")}
        )
        clf.head.load_state_dict({"weight": weight, "bias": state["classifier.bias"]})
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit DenseNet121: {str(err)[:500]}") from None
    return clf


# ---------------------------------------------------------------- exported ONNX files


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
