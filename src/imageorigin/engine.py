"""Inference engines: run a module (images -> logits, or images -> features) fast.

Every forward pass that does not train goes through :func:`create_engine`:
``predict`` runs a classifier through it, and training with a frozen backbone
runs the backbone through it to fill the feature cache.

Measured on the 2-core AVX-512/bf16 development machine (batch 32, 224x224,
images/s; ``benchmarks/speed.py`` has the end-to-end figures):

=============================  ===========  ============
engine                         DenseNet121  MobileNetV2
=============================  ===========  ============
torch eager fp32                        38           167
torch channels-last fp32                50           168
torch channels-last bf16               105           429
OpenVINO fp32                           60           416
OpenVINO bf16 (its default)            135           756
=============================  ===========  ============

(OpenVINO and PyTorch at 224x224; OpenVINO converts the module once and the
converted model is kept in the cache folder, keyed by the module's weights.)

So ``auto`` picks OpenVINO on a CPU and PyTorch on a GPU.  bf16 needs the
hardware: on a CPU without AVX-512-bf16 or AMX (most laptops, many cloud
machines) asking for it compiles fp32, and every engine reports the precision
its compiled graph really runs in (:attr:`Engine.precision`, read back from
OpenVINO's runtime graph), never the one asked for.  Precision is also a
property of the model, not only of the machine: bf16 keeps 8 bits of mantissa,
and the fine-tuned default model reads pixel-level traces that bf16 rounds
away (95% same label, probabilities off by up to 0.40 on native/val), while a
frozen ImageNet backbone with a linear head is unaffected.  So bf16 is used
only for a model whose checkpoint says it was checked (:func:`check_precision`,
run by training on held-out images); everything else runs in fp32.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .runtime import cache_dir

ENGINES = ("auto", "openvino", "torch")
PRECISIONS = ("fp32", "bf16")
log = logging.getLogger(__name__)


@dataclass
class Engine:
    """A compiled forward pass: ``engine(x)`` maps (B, 3, H, W) float32 to (B, K) float32 on the CPU."""

    name: str  # "openvino" or "torch"
    precision: str  # "bf16", "fp16" or "fp32": what the compiled graph runs in, read back from it
    run: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K); crops (B, N, 3, H, W) -> (B, N, K)."""
        if x.dim() == 5:
            b, n = x.shape[:2]
            return self.run(x.flatten(0, 1)).view(b, n, -1)
        return self.run(x)

    def __str__(self) -> str:
        return f"{self.name} {self.precision}"


def create_engine(module: nn.Module, engine: str = "auto", *, precision: str = "fp32",
                  input_size: int = 224) -> Engine:
    """The fastest available engine for ``module`` (put in eval mode), or the one named.

    ``engine`` is "auto", "openvino" or "torch"; ``precision`` is "fp32" or
    "bf16" (reduced precision where the hardware has it: bf16 on AVX-512-bf16
    CPUs and recent GPUs, fp16 on older GPUs, else fp32).  "auto" falls back to
    PyTorch (with a warning) if OpenVINO is missing or cannot convert the module.
    ``input_size`` is the side of the example image used to trace the module for
    OpenVINO; the batch size stays free.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if not isinstance(module, nn.Module):  # an exported ONNX model brings its own engine
        return module.engine(engine, precision)
    fp32 = precision == "fp32"
    module.eval()
    on_cpu = next(module.parameters()).device.type == "cpu"
    if engine == "openvino" or (engine == "auto" and on_cpu):
        try:
            head = getattr(module, "head", None)
            if head is None:
                return _openvino(module, fp32, input_size)
            # A classifier: OpenVINO runs the backbone, PyTorch the (B, D) x (D, C)
            # head in fp32.  One converted backbone then serves every head
            # trained on it, and the feature cache's engine is the same one.
            features = _openvino(module.backbone, fp32, input_size)

            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return head(features(x))

            return Engine(features.name, features.precision, run)
        except Exception as err:  # ImportError, or a conversion failure: say so, go on
            if engine == "openvino":
                raise RuntimeError(f"OpenVINO engine unavailable: {err}") from err
            log.warning("OpenVINO engine unavailable (%s); using PyTorch", err)
    return _torch(module, fp32)


_ENGINES: dict[tuple, Engine] = {}


def cached_engine(module: nn.Module, engine: str = "auto", precision: str = "fp32",
                  input_size: int = 224) -> Engine:
    """:func:`create_engine`, reused while ``module``'s weights are unchanged.

    Evaluation calls ``predict`` once per batch of perturbed images; this keeps
    those calls from compiling the model again each time.  The last few engines
    are kept.
    """
    dev = next(module.parameters()).device.type if isinstance(module, nn.Module) else "cpu"  # ONNX: CPU
    # Where the CPU has no bf16, asking for it compiles fp32: share that engine.
    key = (model_digest(module, input_size), dev, engine, "fp32" if dev == "cpu" and not host_bf16() else precision)
    if key not in _ENGINES:
        while len(_ENGINES) >= 4:
            _ENGINES.pop(next(iter(_ENGINES)))
        _ENGINES[key] = create_engine(module, engine, precision=precision, input_size=input_size)
    return _ENGINES[key]


# ---------------------------------------------------------------- PyTorch


def _torch(module: nn.Module, fp32: bool) -> Engine:
    dev = next(module.parameters()).device
    dtype = None if fp32 else _autocast_dtype(dev)
    # Channels-last lets oneDNN / cuDNN pick their fast convolution kernels
    # (1.3x on the CPU in fp32); it changes the memory layout, not the values.
    module.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev, memory_format=torch.channels_last, non_blocking=True)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return module(x).float().cpu()

    return Engine("torch", {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], run)


def _autocast_dtype(dev: torch.device) -> torch.dtype | None:
    """bf16 where the hardware does it natively, fp16 on older GPUs, else None (fp32)."""
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and host_bf16():
        return torch.bfloat16
    return None


@functools.cache
def host_bf16() -> bool:
    """Whether this machine's CPU computes in bf16 natively (AVX-512-bf16 or AMX).

    OpenVINO's CPU plugin says so in its optimisation capabilities; without
    OpenVINO, oneDNN's own test (which PyTorch exposes) decides.  Where it is
    False, asking any engine for bf16 gives fp32.  Tests replace this function
    to take the no-bf16 branch on a machine that has bf16.
    """
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # ImportError, or no CPU plugin
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---------------------------------------------------------------- OpenVINO


def _openvino(module: nn.Module, fp32: bool, input_size: int) -> Engine:
    compiled, precision = compile_openvino(_converted(module, input_size), fp32)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = compiled(x.detach().cpu().float().contiguous().numpy())[0]  # (B, K)
        return torch.from_numpy(out.copy())

    return Engine("openvino", precision, run)


def compile_openvino(path: Path, fp32: bool):
    """Compile an OpenVINO IR or ONNX file for the CPU; returns (compiled model,
    the precision its graph runs in: "bf16", "fp16" or "fp32")."""
    import openvino as ov

    # LATENCY runs one request on all cores: with one synchronous request per
    # batch this is 3-4x faster than THROUGHPUT, which splits the cores into
    # streams that only help with several requests in flight.
    # The precision is always asked for: OpenVINO's own default is bf16 only on
    # AVX-512-bf16, though it also computes bf16 on AVX2-VNNI-2 CPUs.
    config = {"PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32" if fp32 or not host_bf16() else "bf16"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return compiled, _ran_precision(compiled)


def _ran_precision(compiled) -> str:
    """What the compiled graph's convolutions and matrix products really run in,
    read from OpenVINO's runtime graph (the precision hint is only a request)."""
    seen = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if rt["layerType"].astype(str) in ("Convolution", "MatMul", "FullyConnected"):
            seen[rt["runtimePrecision"].astype(str)] += 1
    ran = seen.most_common(1)[0][0] if seen else \
        compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return {"bf16": "bf16", "f16": "fp16"}.get(ran, "fp32")


def _converted(module: nn.Module, input_size: int) -> Path:
    """OpenVINO IR of ``module`` in the cache, converted now if it is not there yet."""
    import openvino as ov

    xml = cache_dir() / "openvino" / f"{module_digest(module, input_size, ov.__version__)}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO traces the module with torch.jit, which warns that it is deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        converted = ov.convert_model(module, example_input=example)
    # The batch dimension stays dynamic: one conversion serves every batch size.
    converted.reshape([-1, 3, input_size, input_size])
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
        ov.save_model(converted, f"{tmp}/model.xml", compress_to_fp16=False)
        # The .bin goes first: an .xml in place means its weights are complete.
        os.replace(f"{tmp}/model.bin", xml.with_suffix(".bin"))
        os.replace(f"{tmp}/model.xml", xml)
    return xml


_DIGESTS: dict[tuple, str] = {}


def weights_digest(module: nn.Module, input_size: int) -> str:
    """:func:`module_digest`, remembered while no tensor of the module is replaced or
    changed in place (torch counts in-place changes in each tensor's ``_version``):
    hashing 14 MB of weights on every ``predict`` call cost 9 ms, a service's
    batches pay it many times a second."""
    key = (id(module), input_size, tuple((k, v.data_ptr(), v._version) for k, v in module.state_dict().items()))
    if key not in _DIGESTS:
        while len(_DIGESTS) >= 16:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = module_digest(module, input_size)
    return _DIGESTS[key]


def model_digest(model, input_size: int) -> str:
    """What names a model's weights in the caches: :func:`weights_digest` of a
    module, the file's SHA-256 for an exported ONNX model (which has no state dict)."""
    return weights_digest(model, input_size) if isinstance(model, nn.Module) else model.digest


def module_digest(module: nn.Module, *extra) -> str:
    """SHA-256 of a module's class structure and every tensor of its state dict (plus ``extra``)."""
    h = hashlib.sha256(repr(module).encode())
    for part in extra:
        h.update(repr(part).encode())
    for key, value in module.state_dict().items():
        h.update(key.encode())
        t = value.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# The agreement target is 99.5% same label and 0.02 max probability
# difference; a model passes the check only with half that margin.
MAX_PROB_DIFF = 0.01
MIN_SAME_LABEL = 0.995


def check_precision(model, images: torch.Tensor, engine: str = "auto", batch_size: int = 32) -> dict:
    """Whether ``model`` (a Classifier) gives the fp32 answers in bf16 on ``images``.

    ``images`` is (N, 3, H, W) or crops (N, K, 3, H, W), or a list of N (K_i, 3, H, W),
    already preprocessed.
    Returns ``{"precision": "bf16" or "fp32", "images": N, "same_label": share,
    "max_prob_diff": ..., "host_bf16": bool, "outcome": words}``: bf16 only if
    at least 99.5% of labels are the same and no calibrated probability moves
    by more than 0.01.  Where the engine compiled for bf16 runs fp32 (a CPU
    without bf16), nothing is compared: the outcome is fp32, ``images`` 0 and
    ``outcome`` "fp32: this CPU has no bf16", so a later run on this machine
    neither checks again nor claims a bf16 that never ran.
    """
    size = model.preprocessing["crop"]
    low = cached_engine(model, engine, "bf16", size)
    if low.precision != "bf16":
        on_cpu = low.name == "openvino" or next(model.parameters()).device.type == "cpu"
        # host_bf16 is stored as this machine answers it, so that needs_check
        # asks again only on another machine, never on this one.
        has = host_bf16() if on_cpu else False
        why = ("the engine compiled for bf16 runs fp32 here" if has else
               f"this {'CPU' if on_cpu else 'GPU'} has no bf16")
        return {"precision": "fp32", "images": 0, "same_label": None, "max_prob_diff": None,
                "host_bf16": has, "outcome": f"fp32: {why}"}
    runs = {}
    for precision, run in (("fp32", cached_engine(model, engine, "fp32", size)), ("bf16", low)):
        # Cached: the engine chosen by the check is then used without compiling it again.
        logits = torch.cat([model.image_logits(run, images[i:i + batch_size])[0]
                            for i in range(0, len(images), batch_size)])
        runs[precision], _ = model.scores(logits)  # (N, C) calibrated probabilities
    ref, bf16 = runs["fp32"], runs["bf16"]
    same = round((ref.argmax(1) == bf16.argmax(1)).float().mean().item(), 4)
    diff = round((ref - bf16).abs().max().item(), 4)
    check = {"precision": "bf16" if same >= MIN_SAME_LABEL and diff <= MAX_PROB_DIFF else "fp32",
             "images": len(images), "same_label": same, "max_prob_diff": diff, "host_bf16": True}
    return {**check, "outcome": check_outcome(check)}


def check_outcome(check: dict) -> str:
    """A precision check's outcome in words, e.g. "fp32: this CPU has no bf16" or
    "bf16: same label on 100.0% of 32 images, probabilities within 0.0030 of fp32"
    (checks stored before the words were kept get them from their figures)."""
    if check.get("outcome"):
        return check["outcome"]
    figures = f"same label on {check['same_label']:.1%} of {check['images']} images"
    if check["precision"] == "bf16":
        return f"bf16: {figures}, probabilities within {check['max_prob_diff']:.4f} of fp32"
    return f"fp32: bf16 changed the answers ({figures}, probabilities off by up to {check['max_prob_diff']:.4f})"


def needs_check(check: dict | None) -> bool:
    """Whether a stored precision check says nothing about this machine: there is
    none, or it was made where bf16 could not run and this machine has it."""
    return check is None or (check.get("host_bf16") is False and host_bf16())
