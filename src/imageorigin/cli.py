"""Command line: a thin argparse layer over the package's functions."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import sys
from dataclasses import fields
from typing import Iterable, TextIO

from . import backbones
from .data import DataFolderError
from .evaluate import evaluate
from .fileio import atomic_path
from .images import find_images
from .model import CheckpointError, export_seed, load
from .predict import Prediction, predict
from .train import TrainConfig, train

# Errors that mean "the user asked for something that cannot be done": a message, not a traceback.
USER_ERRORS = (CheckpointError, DataFolderError, backbones.BackboneWeightsError, ValueError,
               FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imageorigin`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="imageorigin: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"imageorigin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imageorigin: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imageorigin",
        description="Tell whether an image was made by a person, by DALL-E, or by another AI generator.",
    )
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    d = TrainConfig()
    t = sub.add_parser("train", help="train the seed's recipe on a folder with one sub-folder per class")
    t.add_argument("data_dir", metavar="DATA_DIR")
    t.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for the checkpoint, plots and card")
    t.add_argument("--val", metavar="DIR", help="validation folder (default: a stratified split of DATA_DIR)")
    t.add_argument("--backbone", default=d.backbone, choices=sorted(backbones.REGISTRY))
    t.add_argument("--weights", default=d.weights,
                   help="backbone weights: 'imagenet', 'random' or a state dict file (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--val-fraction", type=float, default=d.val_fraction)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--no-flip", dest="flip", action="store_false", help="turn random horizontal flips off")
    t.add_argument("--rotation", type=float, default=d.rotation, help="max random rotation in degrees (0: off)")
    t.add_argument("--color-jitter", type=float, default=d.color_jitter,
                   help="brightness/contrast/saturation jitter strength (0: off)")
    t.add_argument("--image-size", type=int, default=d.image_size)
    t.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="decoding worker processes (default: up to 2)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="metrics, confusion matrix and sample predictions on a labelled folder")
    e.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    e.add_argument("data_dir", metavar="DATA_DIR")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--workers", dest="num_workers", type=int, default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="classify image files and folders (recursively)")
    r.add_argument("paths", nargs="+", metavar="PATH")
    r.add_argument("--model", default="default", metavar="MODEL", help="checkpoint path or 'default'")
    r.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    r.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--workers", dest="num_workers", type=int, default=None)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_predict)

    x = sub.add_parser("export", help="write a DenseNet121 model in the seed's .pth layout")
    x.add_argument("model", metavar="MODEL")
    x.add_argument("out", metavar="OUT.pth")
    x.set_defaults(func=_export)

    i = sub.add_parser("info", help="print a model's labels, preprocessing, settings and metrics")
    i.add_argument("model", metavar="MODEL", nargs="?", default="default")
    i.set_defaults(func=_info)
    return p


def _train(args) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model = train(args.data_dir, args.out, cfg, val_dir=args.val, progress=not args.quiet)
    m = model.info["metrics"]
    print(f"val accuracy {m['val_accuracy']:.4f}  val loss {m['val_loss']:.4f}  "
          f"({model.info['training']['wall_seconds']} s); wrote {args.out}/model.safetensors")
    return 0


def _evaluate(args) -> int:
    result = evaluate(load(args.model), args.data_dir, args.out, batch_size=args.batch_size,
                      num_workers=args.num_workers, progress=not args.quiet)
    auc = result["ai_vs_human_auc"]
    print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
          f"ai_vs_human_auc {'n/a' if auc is None else f'{auc:.4f}'}  images {result['n_images']}")
    for err in result["errors"]:
        print(f"unreadable: {err}", file=sys.stderr)
    print(f"wrote {args.out}/metrics.json")
    return 0


def _predict(args) -> int:
    model = load(args.model)
    files = list(find_images(args.paths))
    if not files:
        raise ValueError(f"no image files found in {' '.join(args.paths)}")
    preds = predict(model, files, batch_size=args.batch_size, num_workers=args.num_workers,
                    progress=not args.quiet and sys.stderr.isatty())
    failed = 0
    with _output(args.out) as out:
        for p in _write(preds, model.labels, args.format, out):
            failed += p.error is not None
    if failed:
        print(f"imageorigin: {failed} of {len(files)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


@contextlib.contextmanager
def _output(path: str | None):
    if path is None:
        yield sys.stdout
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        yield f


def _write(preds: Iterable[Prediction], labels: list[str], fmt: str, out: TextIO):
    """Write predictions as they come (csv, jsonl) or aligned at the end (table); yield each."""
    columns = list(Prediction("").row(labels))
    if fmt == "csv":
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        for p in preds:
            writer.writerow(p.row(labels))
            yield p
    elif fmt == "jsonl":
        for p in preds:
            out.write(json.dumps(p.row(labels)) + "\n")
            yield p
    else:
        rows = []
        for p in preds:
            rows.append([_cell(v) for v in p.row(labels).values()])
            yield p
        widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(columns)]
        for r in [columns] + rows:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _export(args) -> int:
    path = export_seed(load(args.model), args.out)
    print(f"wrote {path}")
    return 0


def _info(args) -> int:
    print(json.dumps(load(args.model).describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
