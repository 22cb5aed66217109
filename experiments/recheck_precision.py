"""Check a trained model's precision again (int8, bf16) on its calibration split,
and store the outcome in the checkpoint; its weights are not touched.

    python experiments/recheck_precision.py src/imageorigin/models/default.safetensors

Checkpoints trained before int8 was tried carry a check that says nothing of
int8, so ``predict`` would check them again on a user's first batch.  This
rebuilds the calibration split exactly as ``train`` made it (the folders
``info.training`` names, the same seeded splits) and runs the check training
now runs on its first 256 images (:func:`imageorigin.engine.check_precision`).
"""

from __future__ import annotations

import argparse
import json

import imageorigin
from imageorigin.data import ImageDataset, batches, scan_folders, stack_images, stratified_split
from imageorigin.engine import check_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    args = p.parse_args()
    model = imageorigin.load(args.checkpoint)
    t = model.info["training"]
    pool = scan_folders(t["data_dir"].split(", "), model.labels)
    train_set = pool
    if t["val_split"] is None and not t["val_dir"]:
        train_set, _ = stratified_split(pool, t["val_fraction"], t["seed"])
    _, calib = stratified_split(train_set, t["calibration_fraction"], t["seed"])
    assert calib.counts() == t["calibration_counts"], (calib.counts(), t["calibration_counts"])
    images = stack_images([image for _, x, _, _ in batches(
        ImageDataset([f for f, _ in calib.samples[:256]], model.transform), t["batch_size"])
        if x is not None for image in x])
    check = check_precision(model, images)
    print(json.dumps(check, indent=2))
    model.inference_precision = check["precision"]
    model.info["precision_check"] = check
    imageorigin.save(model, args.checkpoint)


if __name__ == "__main__":
    main()
