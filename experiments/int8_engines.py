"""Which int8 tool to ship: OpenVINO's NNCF against ONNX Runtime's static quantisation.

    python experiments/int8_engines.py --out docs/int8/engines.json

For the seed's network (DenseNet121 with its 3-way head; random weights, as
ImageNet's cannot be downloaded here) and the shipped default (MobileNetV2 on
96 px tiles), each tool quantises the backbone's convolutions to int8,
calibrated on the crops of 64 native/val images of dh3-bench, and each
engine's forward pass is timed on one batch (32 images at 224 px, or 256
tiles), side by side with its own fp32 in this run.  Agreement is measured
with the model's whole pipeline (pooling, temperature, verdict bands) on 96
other native/val images: the same figures as the precision check
(:func:`imageorigin.engine.check_precision`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import imageorigin
from imageorigin.backbones import build_backbone
from imageorigin.data import stack_images
from imageorigin.engine import Engine, agreement, create_engine, rows
from imageorigin.model import SEED_LABELS

SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def timed(run, x: np.ndarray, repeats: int = 4) -> float:
    run(x)
    start = time.perf_counter()
    for _ in range(repeats):
        run(x)
    return repeats * len(x) / (time.perf_counter() - start)


def ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ort_pair(module, calib: np.ndarray, size: int, tmp: Path):
    """ONNX Runtime fp32 and int8 (static, QDQ, per-channel weights) runners of ``module``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, int8 = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    torch.onnx.export(module, (torch.zeros(2, 3, size, size),), str(fp32), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    start = time.perf_counter()
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ort_session(str(fp32)), ort_session(str(int8)), time.perf_counter() - start


def probs_with(model, backbone_run, images) -> torch.Tensor:
    """Calibrated probabilities (N, C) with the backbone run by ``backbone_run`` (numpy -> numpy)."""
    def run(x):
        with torch.inference_mode():
            return model.head(torch.from_numpy(np.ascontiguousarray(backbone_run(x.contiguous().numpy()))))

    engine = Engine("x", "x", run)
    logits = torch.cat([model.image_logits(engine, images[i:i + 32])[0] for i in range(0, len(images), 32)])
    return model.scores(logits)[0]


def measure(name: str, model, tmp: Path) -> dict:
    files = random.Random(1).sample(sorted((SHARED / "dh3-bench/native/val").rglob("*.jpg")), 160)
    images = [model.transform(imageorigin.decode_image(f)) for f in files]
    calib_images, check_images = stack_images(images[:64]), stack_images(images[64:])
    calib = rows(calib_images)
    calib = calib[:: max(1, len(calib) // 300)].numpy()  # at most ~300 crops
    size = model.preprocessing["crop"]
    batch = rows(stack_images(images[:64]))[:32 if size > 128 else 256].numpy()
    out = {}
    ref = None
    # OpenVINO: the package's own engines (fp32 converted, int8 quantised by NNCF).
    ov32 = create_engine(model.backbone, "openvino", precision="fp32", input_size=size)
    start = time.perf_counter()
    ov8 = create_engine(model.backbone, "openvino", precision="int8", input_size=size,
                        calibration=torch.from_numpy(calib))
    quant_s = time.perf_counter() - start
    ort32, ort8, ort_s = ort_pair(model.backbone.eval(), calib, size, tmp)
    for tool, run32, run8, seconds in (
            ("openvino+nncf", lambda x: ov32(torch.from_numpy(x)).numpy(),
             lambda x: ov8(torch.from_numpy(x)).numpy(), quant_s),
            ("onnxruntime", ort32, ort8, ort_s)):
        p32 = probs_with(model, run32, check_images)
        ref = p32 if ref is None else ref
        p8 = probs_with(model, run8, check_images)
        out[tool] = {"fp32_per_s": round(timed(run32, batch), 1), "int8_per_s": round(timed(run8, batch), 1),
                     "quantise_seconds": round(seconds, 1),
                     "agreement": agreement(model, p32, p8)}
        out[tool]["int8_speedup"] = round(out[tool]["int8_per_s"] / out[tool]["fp32_per_s"], 2)
        out[tool]["fp32_vs_openvino_fp32"] = agreement(model, ref, p32)
        print(name, tool, json.dumps(out[tool]), flush=True)
    return {"unit": "images/s" if size > 128 else "tiles/s", **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    seed = imageorigin.Classifier(build_backbone("densenet121", "random"), SEED_LABELS,
                                  backbone_weights="random").eval()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("seed DenseNet121 (random weights)", seed), ("default", imageorigin.load("default"))):
            (Path(tmp) / name[:4]).mkdir()
            result[name] = measure(name, model, Path(tmp) / name[:4])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
