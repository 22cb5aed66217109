"""What was tried to make int8 pass the precision check, and what it gave.

    python experiments/int8_variants.py --out docs/int8/variants.json

Each variant quantises the backbone with NNCF (OpenVINO's tool), calibrated on
crops of 64 native/val images of dh3-bench (the seed's DenseNet121: 32), and is
compared with fp32 by the precision check's own :func:`imageorigin.engine.agreement`
on held-out native/val images, with the model's pooling, temperature and
verdict bands; its forward pass is timed on one batch beside fp32.

- the default (MobileNetV2 on 96 px tiles): the first K convolutions kept in
  fp32 (K = 0, 4, 16, 40 of 52), the PERFORMANCE and MIXED presets;
- the seed's DenseNet121 (random weights: its ImageNet weights cannot be
  downloaded here): full bias correction, the MIXED preset, the first
  convolution (and the last two) kept in fp32, quantile activation ranges, and
  NNCF's accuracy control (layers put back to fp32 one by one until the
  largest probability difference on the calibration images is within 0.008),
  then checked on 64 images it did not see.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

import imageorigin
from imageorigin.backbones import build_backbone
from imageorigin.data import stack_images
from imageorigin.engine import _converted, agreement, rows
from imageorigin.model import SEED_LABELS

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def probs(model, compiled, images) -> torch.Tensor:
    """Calibrated probabilities (N, C) with the backbone compiled by OpenVINO."""
    from imageorigin.engine import Engine

    def run(x):
        with torch.inference_mode():
            return model.head(torch.from_numpy(compiled(x.contiguous().numpy())[0].copy()))

    engine = Engine("openvino", "x", run)
    return model.scores(torch.cat([model.image_logits(engine, images[i:i + 32])[0]
                                   for i in range(0, len(images), 32)]))[0]


def per_s(compiled, batch: np.ndarray) -> float:
    compiled(batch)
    start = time.perf_counter()
    for _ in range(3):
        compiled(batch)
    return round(3 * len(batch) / (time.perf_counter() - start), 1)


def variants(model, n_calib: int, n_check: int, trials: dict) -> dict:
    import nncf
    import openvino as ov

    files = random.Random(1).sample(sorted((SHARED / "dh3-bench/native/val").rglob("*.jpg")), n_calib + n_check)
    images = [model.transform(imageorigin.decode_image(f)) for f in files]
    calib, check = stack_images(images[:n_calib]), stack_images(images[n_calib:])
    crops = rows(calib)
    crops = crops[:: max(1, len(crops) // 300)]
    size = model.preprocessing["crop"]
    core = ov.Core()
    fp = core.read_model(str(_converted(model.backbone, size)))
    convs = [op.get_friendly_name() for op in fp.get_ordered_ops() if op.get_type_name() == "Convolution"]
    fp32 = core.compile_model(fp, "CPU", CONFIG)
    ref = probs(model, fp32, check)
    batch = crops[:32 if size > 128 else 256].numpy()
    out = {"fp32_per_s": per_s(fp32, batch), "convolutions": len(convs), "calibration_images": n_calib,
           "checked_images": n_check}
    data = nncf.Dataset([c[None].numpy() for c in crops])
    for name, make in trials.items():
        start = time.perf_counter()
        quantised = make(nncf, fp, data, convs, model, crops)
        seconds = round(time.perf_counter() - start, 1)
        compiled = core.compile_model(quantised, "CPU", CONFIG)
        out[name] = {**agreement(model, ref, probs(model, compiled, check)), "int8_per_s": per_s(compiled, batch),
                     "quantise_seconds": seconds}
        print(name, json.dumps(out[name]), flush=True)
    return out


def plain(**kw):
    return lambda nncf, fp, data, convs, model, crops: nncf.quantize(fp, data, subset_size=300, **kw)


def keep_first(k: int, preset: str):
    def make(nncf, fp, data, convs, model, crops):
        return nncf.quantize(fp, data, subset_size=300, preset=getattr(nncf.QuantizationPreset, preset),
                             ignored_scope=nncf.IgnoredScope(names=convs[:k]) if k else None)
    return make


def accuracy_control(nncf, fp, data, convs, model, crops):
    """NNCF's accuracy control, its metric the largest probability difference from fp32."""
    import openvino as ov

    with torch.inference_mode():
        ref = model.scores(model.head(torch.from_numpy(
            ov.Core().compile_model(fp, "CPU", CONFIG)(crops.numpy())[0].copy())))[0]
    items = nncf.Dataset([(i, crops[i:i + 1].numpy()) for i in range(len(crops))], lambda item: item[1])

    def validate(compiled, rows_):
        rows_ = list(rows_)
        feats = np.concatenate([compiled(x)[compiled.outputs[0]] for _, x in rows_])
        with torch.inference_mode():
            p = model.scores(model.head(torch.from_numpy(feats)))[0]
        per = (1 - (p - ref[[i for i, _ in rows_]]).abs().amax(1)).tolist()
        return min(per), per

    return nncf.quantize_with_accuracy_control(fp, items, items, validation_fn=validate, max_drop=0.008,
                                               drop_type=nncf.DropType.ABSOLUTE, subset_size=len(crops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    args = p.parse_args()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    result = {"default": variants(imageorigin.load("default"), 64, 96, {
        f"first {k} convolutions fp32, {preset}": keep_first(k, preset)
        for k in (0, 4, 16, 40) for preset in ("PERFORMANCE", "MIXED")})}
    torch.manual_seed(0)
    seed = imageorigin.Classifier(build_backbone("densenet121", "random"), SEED_LABELS,
                                  backbone_weights="random").eval()
    quantile = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE)
    result["seed DenseNet121 (random weights)"] = variants(seed, 32, 64, {
        "NNCF defaults (shipped)": plain(),
        "full bias correction": plain(fast_bias_correction=False),
        "MIXED preset": keep_first(0, "MIXED"),
        "first convolution fp32": keep_first(1, "PERFORMANCE"),
        "quantile activation ranges": plain(advanced_parameters=quantile),
        "accuracy control (within 0.008 on the calibration images)": accuracy_control,
    })
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
