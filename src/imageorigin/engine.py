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

So ``auto`` picks OpenVINO on a CPU and PyTorch on a GPU.  int8 runs on any
x86 CPU: OpenVINO's own tool (NNCF) quantises the converted model once,
calibrated on images the caller has, and keeps it beside the fp32 one in the
cache (1.6x MobileNetV2's fp32 tiles/s and 1.8x DenseNet121's on the 2-core
AVX2 host, ``experiments/int8_engines.py``).  bf16 needs the
hardware: on a CPU without AVX-512-bf16 or AMX (most laptops, many cloud
machines) asking for it compiles fp32, and every engine reports the precision
its compiled graph really runs in (:attr:`Engine.precision`, read back from
OpenVINO's runtime graph), never the one asked for.  Precision is also a
property of the model, not only of the machine: bf16 keeps 8 bits of mantissa,
and the fine-tuned default model reads pixel-level traces that bf16 rounds
away (95% same label, probabilities off by up to 0.40 on native/val), while a
frozen ImageNet backbone with a linear head is unaffected.  So bf16 is used
only for a model whose checkpoint says it was checked (:func:`check_precision`,
run by training on held-out images); everything else runs in fp32.  int8 is
held to the same check, and the default model fails it by more (int8 changes
the label of two thirds of its calibration images).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .runtime import cache_dir

ENGINES = ("auto", "openvino", "torch")
PRECISIONS = ("fp32", "bf16", "int8")
CALIBRATION_ROWS = 300  # crops int8 calibration reads: NNCF's own default subset
log = logging.getLogger(__name__)


@dataclass
class Engine:
    """A compiled forward pass: ``engine(x)`` maps (B, 3, H, W) float32 to (B, K) float32 on the CPU."""

    name: str  # "openvino" or "torch"
    precision: str  # "int8", "bf16", "fp16" or "fp32": what the compiled graph runs in, read back from it
    run: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K); crops (B, N, 3, H, W) -> (B, N, K)."""
        if x.dim() == 5:
            b, n = x.shape[:2]
            return self.run(x.flatten(0, 1)).view(b, n, -1)
        return self.run(x)

    def __str__(self) -> str:
        return f"{self.name} {self.precision}"


class NotQuantised(LookupError):
    """int8 was asked for a model with no quantised engine in the cache, and no
    calibration images were given to make one."""


def create_engine(module: nn.Module, engine: str = "auto", *, precision: str = "fp32",
                  input_size: int = 224, calibration: torch.Tensor | None = None) -> Engine:
    """The fastest available engine for ``module`` (put in eval mode), or the one named.

    ``engine`` is "auto", "openvino" or "torch"; ``precision`` is "fp32",
    "bf16" (reduced precision where the hardware has it: bf16 on AVX-512-bf16
    CPUs and recent GPUs, fp16 on older GPUs, else fp32) or "int8" (OpenVINO
    only; the torch engine runs fp32 and says so).  An int8 engine is quantised
    once, on ``calibration`` (preprocessed images, see :func:`rows`), and cached;
    without a cached one and without ``calibration`` it raises
    :class:`NotQuantised`.  "auto" falls back to
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
    module.eval()
    on_cpu = next(module.parameters()).device.type == "cpu"
    if engine == "openvino" or (engine == "auto" and on_cpu):
        try:
            head = getattr(module, "head", None)
            if head is None:
                return _openvino(module, precision, input_size, calibration)
            # A classifier: OpenVINO runs the backbone, PyTorch the (B, D) x (D, C)
            # head in fp32.  One converted backbone then serves every head
            # trained on it, and the feature cache's engine is the same one.
            features = _openvino(module.backbone, precision, input_size, calibration)

            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return head(features(x))

            return Engine(features.name, features.precision, run)
        except NotQuantised:
            raise
        except Exception as err:  # ImportError, or a conversion failure: say so, go on
            if engine == "openvino":
                raise RuntimeError(f"OpenVINO engine unavailable: {err}") from err
            log.warning("OpenVINO engine unavailable (%s); using PyTorch", err)
    return _torch(module, precision == "bf16")


_ENGINES: dict[tuple, Engine] = {}


def cached_engine(module: nn.Module, engine: str = "auto", precision: str = "fp32",
                  input_size: int = 224, calibration: torch.Tensor | None = None) -> Engine:
    """:func:`create_engine`, reused while ``module``'s weights are unchanged.

    Evaluation calls ``predict`` once per batch of perturbed images; this keeps
    those calls from compiling the model again each time.  The last few engines
    are kept.
    """
    dev = next(module.parameters()).device.type if isinstance(module, nn.Module) else "cpu"  # ONNX: CPU
    # Where the CPU has no bf16, asking for it compiles fp32: share that engine.
    shared = precision == "bf16" and dev == "cpu" and not host_bf16()
    key = (model_digest(module, input_size), dev, engine, "fp32" if shared else precision)
    if key not in _ENGINES:
        made = create_engine(module, engine, precision=precision, input_size=input_size, calibration=calibration)
        while len(_ENGINES) >= 4:
            _ENGINES.pop(next(iter(_ENGINES)))
        _ENGINES[key] = made
    return _ENGINES[key]


# ---------------------------------------------------------------- PyTorch


def _torch(module: nn.Module, bf16: bool) -> Engine:
    dev = next(module.parameters()).device
    dtype = _autocast_dtype(dev) if bf16 else None
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


def _openvino(module: nn.Module, precision: str, input_size: int, calibration: torch.Tensor | None) -> Engine:
    path = _converted(module, input_size)
    if precision == "int8":
        path = _quantised(path, calibration)
    # An int8 graph keeps fp32 where NNCF left an operation unquantised.
    compiled, precision = compile_openvino(path, precision != "bf16")

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
    return {"bf16": "bf16", "f16": "fp16", "u8": "int8", "i8": "int8"}.get(ran, "fp32")


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
    return _saved(converted, xml)


def _quantised(xml: Path, calibration: torch.Tensor | None) -> Path:
    """The int8 version of the converted model ``xml``, kept beside it in the cache
    (named by the same digest), quantised now by NNCF if it is not there yet:
    post-training, per-channel int8 weights and per-tensor int8 activations
    whose ranges are read on ``calibration`` (images, see :func:`rows`; at most
    :data:`CALIBRATION_ROWS` crops of them)."""
    import nncf
    import openvino as ov

    out = xml.with_name(f"{xml.stem}-int8-nncf{nncf.__version__}.xml")
    if out.is_file() and out.with_suffix(".bin").is_file():
        return out
    if calibration is None:
        raise NotQuantised(f"no int8 engine of this model in {out.parent} yet: it needs calibration images")
    crops = rows(calibration)
    crops = crops[:: max(1, len(crops) // CALIBRATION_ROWS)][:CALIBRATION_ROWS]  # (n, 3, s, s), spread out
    nncf.set_log_level(logging.ERROR)
    # NNCF draws its progress bars on stdout, where predict writes its results.
    with redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = nncf.quantize(ov.Core().read_model(str(xml)),
                                  nncf.Dataset([c[None].numpy() for c in crops]), subset_size=len(crops),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
    return _saved(quantised, out)


def _saved(model, xml: Path) -> Path:
    """Write an OpenVINO model as ``xml`` (and its .bin) atomically."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
        ov.save_model(model, f"{tmp}/model.xml", compress_to_fp16=False)
        # The .bin goes first: an .xml in place means its weights are complete.
        os.replace(f"{tmp}/model.bin", xml.with_suffix(".bin"))
        os.replace(f"{tmp}/model.xml", xml)
    return xml


def rows(images) -> torch.Tensor:
    """Every crop of a batch of preprocessed images as rows of one tensor
    (N, 3, s, s): from (N, 3, s, s), crops (N, K, 3, s, s) or a list of (K_i, 3, s, s)."""
    if isinstance(images, list):
        return torch.cat(images)
    return images.flatten(0, 1) if images.dim() == 5 else images


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


# The speed issue's agreement target is 99.5% same label and 0.02 max
# probability difference; a reduced precision passes only with half that
# margin, and with the verdict band unchanged on 99.5% of the images.
MAX_PROB_DIFF = 0.01
MIN_SAME_LABEL = 0.995
MIN_SAME_BAND = 0.995


def check_precision(model, images, engine: str = "auto", batch_size: int = 32) -> dict:
    """Whether ``model`` (a Classifier) gives its fp32 answers in int8 and in bf16 on ``images``.

    ``images`` is (N, 3, H, W) or crops (N, K, 3, H, W), or a list of N (K_i, 3, H, W),
    already preprocessed.  int8 is quantised on every other one of these images and
    compared on the rest (:func:`create_engine`; OpenVINO only), and bf16 compiled where the CPU has it; each is compared with
    fp32 by :func:`agreement` and passes if at least 99.5% of labels and of
    verdict bands are the same and no calibrated probability moves by more than
    0.01.  The fastest that passes is chosen: int8, then bf16, else fp32.

    Returns ``{"precision": chosen, "images": N, "int8": figures, "bf16": figures,
    "host_bf16": bool, "outcome": words}``; each figures dict has
    ``same_label``, ``same_band``, ``max_prob_diff`` and ``passed`` (int8 also
    ``images`` it was compared on and ``quantise_seconds``, what its
    calibration cost), or only ``outcome``
    saying why it was not tried (e.g. "this CPU has no bf16").  ``host_bf16`` is
    stored as this machine answers it, so that :func:`needs_check` asks again
    only on another machine.
    """
    size = model.preprocessing["crop"]
    fp32 = cached_engine(model, engine, "fp32", size)
    on_cpu = fp32.name == "openvino" or next(model.parameters()).device.type == "cpu"
    has_bf16 = host_bf16() if on_cpu else False
    ref = _probs(model, fp32, images, batch_size)
    tried = {}
    if not isinstance(model, nn.Module):
        tried["int8"] = {"outcome": "an exported ONNX model runs as exported"}
    elif fp32.name != "openvino":
        tried["int8"] = {"outcome": "int8 runs on the OpenVINO CPU engine only"}
    else:
        # Calibrated on every other image, compared on the others: answers on
        # images it was fitted to flatter it (NNCF's accuracy control, fitted
        # to 32 images, kept them within 0.008 and moved others by 0.017).
        start = time.perf_counter()
        low = cached_engine(model, engine, "int8", size, calibration=images[::2])
        seconds = round(time.perf_counter() - start, 1)
        held_out = images[1::2]
        tried["int8"] = {**agreement(model, ref[1::2], _probs(model, low, held_out, batch_size)),
                         "images": len(held_out), "quantise_seconds": seconds}
    low = cached_engine(model, engine, "bf16", size)
    if low.precision == "bf16":
        tried["bf16"] = agreement(model, ref, _probs(model, low, images, batch_size))
    else:
        tried["bf16"] = {"outcome": "the engine compiled for bf16 runs fp32 here" if has_bf16 else
                         f"this {'CPU' if on_cpu else 'GPU'} has no bf16"}
    chosen = next((p for p in ("int8", "bf16") if tried[p].get("passed")), "fp32")
    check = {"precision": chosen, "images": len(images), **tried, "host_bf16": has_bf16}
    return {**check, "outcome": check_outcome(check)}


def _probs(model, run: Engine, images, batch_size: int) -> torch.Tensor:
    """Calibrated probabilities (N, C) of ``images`` through ``run``."""
    logits = torch.cat([model.image_logits(run, images[i:i + batch_size])[0]
                        for i in range(0, len(images), batch_size)])
    return model.scores(logits)[0]


def agreement(model, ref: torch.Tensor, got: torch.Tensor) -> dict:
    """How far ``got`` (N, C) calibrated probabilities are from ``ref`` (N, C):
    the share of the same label, of the same verdict band (at the model's own
    threshold and bands), the largest probability difference, and whether that
    passes the precision check's margins."""
    from .verdict import band

    same = round((ref.argmax(1) == got.argmax(1)).float().mean().item(), 4)
    diff = round((ref - got).abs().max().item(), 4)
    h = model.human_index
    if h is None or model.threshold is None:
        bands = same  # no verdict to change: the label is the answer
    else:
        verdicts = [[band(1 - float(p), model.bands, model.threshold, []) for p in probs[:, h]]
                    for probs in (ref, got)]
        bands = round(sum(a == b for a, b in zip(*verdicts)) / len(ref), 4)
    return {"same_label": same, "same_band": bands, "max_prob_diff": diff,
            "passed": same >= MIN_SAME_LABEL and bands >= MIN_SAME_BAND and diff <= MAX_PROB_DIFF}


def check_outcome(check: dict) -> str:
    """A precision check's outcome in words, e.g. "int8: same label on 100.0% of
    64 images, probabilities within 0.0030 of fp32" or "fp32: int8 changed the
    answers (...); this CPU has no bf16" (checks stored before the words were
    kept, or before int8 was tried, get them from their figures)."""
    if "int8" not in check:  # a check from before int8: bf16 alone, its figures at the top level
        if check.get("outcome"):
            return check["outcome"]
        figures = f"same label on {check['same_label']:.1%} of {check['images']} images"
        if check["precision"] == "bf16":
            return f"bf16: {figures}, probabilities within {check['max_prob_diff']:.4f} of fp32"
        return f"fp32: bf16 changed the answers ({figures}, probabilities off by up to {check['max_prob_diff']:.4f})"
    n = check["images"]

    def said(name: str) -> str:
        t = check[name]
        if "passed" not in t:
            return f"{name} not tried: {t['outcome']}"
        figures = f"same label on {t['same_label']:.1%} of {t.get('images', n)} images"
        if "same_band" in t:
            figures += f", same verdict on {t['same_band']:.1%}"
        if t["passed"]:
            return f"{figures}, probabilities within {t['max_prob_diff']:.4f} of fp32"
        return f"{name} changed the answers ({figures}, probabilities off by up to {t['max_prob_diff']:.4f})"

    chosen = check["precision"]
    others = [said(p) for p in ("int8", "bf16") if p != chosen]
    words = f"{chosen}: " + "; ".join(([said(chosen)] if chosen != "fp32" else []) + others)
    if check.get("inherited_from"):  # imageorigin adapt kept the fp32 of the model it started from
        words += f" (checked on the model it was adapted from, {check['inherited_from'][:12]})"
    return words


def needs_check(check: dict | None) -> bool:
    """Whether a stored precision check says nothing about this machine: there is
    none, it was made before int8 was tried, or it was made where bf16 could
    not run and this machine has it."""
    return check is None or "int8" not in check or (check.get("host_bf16") is False and host_bf16())
