"""Command line: a thin argparse layer over the package's functions."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import textwrap
from dataclasses import fields
from typing import Iterable, TextIO

from . import __version__, backbones, report
from .crossval import crossval, to_markdown
from .data import DataFolderError, describe_preprocessing
from .engine import ENGINES, PRECISIONS, check_outcome
from .evaluate import evaluate
from .export import export_onnx
from .fileio import atomic_path
from .images import find_images
from .model import CheckpointError, export_seed, load
from .predict import Prediction, current_engine, precision_reason, predict
from .train import TrainConfig, train

# Errors that mean "the user asked for something that cannot be done": a message, not a traceback.
GALLERY_MAX = 48
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
    except BrokenPipeError:  # the reader went away (`imageorigin predict ... | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush has nowhere to fail
        return 141  # 128 + SIGPIPE, as a shell tool killed by the closed pipe reports


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imageorigin",
        description="Tell whether an image was made by a person, by DALL-E, or by another AI generator.",
    )
    p.add_argument("--version", action="version", version=f"imageorigin {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    # Every sub-command's --help shows each option's default.
    add = sub.add_parser
    sub.add_parser = lambda *a, **k: add(*a, formatter_class=_Help, **k)

    t = sub.add_parser("train", help="train the seed's recipe on a folder with one sub-folder per class")
    t.add_argument("data_dir", metavar="DATA_DIR", nargs="*",
                   help="one or more folders with one sub-folder per class (e.g. two views)")
    t.add_argument("--out", metavar="RUN_DIR", help="folder for the checkpoint, plots and card")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last completed "
                   "epoch, with its own data and settings (give nothing else but --ddp / --quiet)")
    t.add_argument("--val", metavar="DIR", nargs="+",
                   help="validation folder(s) (default: a stratified split of DATA_DIR)")
    t.add_argument("--manifest", metavar="CSV", nargs="+",
                   help="CSV(s) with path, source, licence columns: training sources in the card")
    _add_train_options(t)
    t.add_argument("--ddp", type=int, default=1, metavar="N",
                   help="split every batch across N local processes (DistributedDataParallel; "
                        "the image loop: --finetune or --no-cache); across machines use torchrun")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    c = sub.add_parser("crossval", help="leave-one-source-out: train without each source, test on it")
    c.add_argument("data_dir", metavar="DATA_DIR", nargs="+", help="training folder(s), class sub-folders")
    c.add_argument("--manifest", required=True, metavar="CSV", nargs="+",
                   help="CSV(s) with path and source columns (and generator for --group-by family)")
    c.add_argument("--folds", type=int, default=0,
                   help="grouped k-fold over sources (k >= 2) instead of leave-one-source-out")
    c.add_argument("--group-by", choices=("source", "family"), default="source",
                   help="k-fold groups: each source, or each family of sources (one generator, "
                        "one collection of human images)")
    c.add_argument("--reference", metavar="DIR", nargs="+",
                   help="folder(s) whose images of the other kind complete each test set "
                        "(default: a seeded 20%% split of DATA_DIR)")
    c.add_argument("--source", dest="sources", action="append", metavar="NAME",
                   help="only this held-out source (repeatable; default: every source)")
    c.add_argument("--only-folds", dest="only", type=int, nargs="+", metavar="N",
                   help="with --folds K: run only these folds (1 to K), e.g. to repeat one with another seed")
    c.add_argument("--fold-seed", type=int, default=0,
                   help="seed that deals the groups into folds (the same folds whatever --seed trains with)")
    c.add_argument("--folds-from", metavar="CROSSVAL_JSON",
                   help="with --folds K: the folds an earlier run recorded, instead of dealing them "
                        "(to compare recipes whose training data differ on the same folds)")
    c.add_argument("--resume", action="store_true",
                   help="continue a run in --out made with the same settings: keep the folds it "
                        "finished, and go on from the last completed epoch of the one it was training")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for crossval.json, crossval.md and each fold")
    _add_train_options(c)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_crossval)

    e = sub.add_parser("evaluate", help="metrics, confusion matrix and sample predictions on a labelled folder")
    e.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    e.add_argument("data_dir", metavar="DATA_DIR", nargs="+", help="labelled folder(s)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, report.md and plots")
    e.add_argument("--manifest", metavar="CSV", nargs="+",
                   help="CSV(s) with path and source columns: adds per-source figures")
    e.add_argument("--no-robustness", dest="robustness", action="store_false",
                   help="skip the JPEG / downscale / blur / sharpen sweep (10 more passes over the data)")
    e.add_argument("--no-samples", dest="samples", action="store_false",
                   help="draw no gallery of the images (for a report published where they may not be copied)")
    e.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    e.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="decoding threads (default: one per CPU, at most 8)")
    _add_engine_options(e)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="classify image files and folders (recursively)")
    r.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    r.add_argument("--model", default="default", metavar="MODEL", help="checkpoint path or 'default'")
    r.add_argument("--format", choices=("table", "csv", "jsonl"), default="table",
                   help="an aligned table for reading, CSV, or JSON lines with caveats and the patch map")
    r.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    r.add_argument("--gallery", metavar="OUT.png",
                   help=f"also draw the first {GALLERY_MAX} images with their verdicts into this picture")
    r.add_argument("--evidence", action="store_true",
                   help="the details of each file's provenance metadata (C2PA, generator text, XMP, "
                        "EXIF) in JSON lines; its one-word summary is always read and shown")
    r.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="call an image AI from p_ai >= P (default: the threshold stored in the model)")
    r.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    r.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="decoding threads (default: one per CPU, at most 8)")
    _add_engine_options(r)
    r.add_argument("--quiet", action="store_true", help="no progress bar, engine line or summary on stderr")
    r.set_defaults(func=_predict)

    x = sub.add_parser("export", help="write a model as ONNX (OUT.onnx) or, for DenseNet121 models, "
                                      "in the seed's .pth layout (OUT.pth)")
    x.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    x.add_argument("out", metavar="OUT", help="OUT.onnx or OUT.pth")
    x.set_defaults(func=_export)

    s = sub.add_parser("scan", help="classify a whole archive into a SQLite database, resumably")
    s.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (walked lazily)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="DB", help="SQLite file (created if missing)")
    where.add_argument("--out", metavar="DIR", help="a folder of Parquet parts instead (shared storage: with "
                       "--ray the workers write their own parts)")
    s.add_argument("--model", default="default", metavar="MODEL", help="checkpoint path or 'default'")
    s.add_argument("--evidence", action="store_true", help="also store each file's provenance summary")
    s.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    s.add_argument("--commit-every", type=int, default=256,
                   help="files per transaction: a crash loses at most this many, redone by a re-run")
    s.add_argument("--ray", metavar="ADDRESS", help="classify on a Ray cluster: 'auto' (the one this "
                   "machine belongs to) or its address; with --db this process stays the database's one writer")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_scan)

    q = sub.add_parser("results", help="export or query a scan's database or Parquet folder")
    q.add_argument("db", metavar="DB", help="the scan's SQLite file, or its --out folder")
    q.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv", help="output format")
    q.add_argument("--where", metavar="SQL", help="an SQL condition, e.g. \"verdict = 'likely_ai'\"")
    q.add_argument("--out", metavar="FILE", help="output file (needed for parquet; default: standard output)")
    q.set_defaults(func=_results)

    h = sub.add_parser("explain", help="draw each image's patch map (each crop's p_ai) over it")
    h.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    h.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    h.add_argument("--out", required=True, metavar="DIR", help="folder for one overlay PNG per image")
    h.set_defaults(func=_explain)

    from .service import LIMIT_DEFAULTS

    v = sub.add_parser("serve", help="the moderation service: HTTP API and web page")
    v.add_argument("--model", default="default", metavar="MODEL", help="checkpoint path or 'default'")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (keep 127.0.0.1 unless you "
                                                      "put an authenticating proxy in front)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on")
    for name, kind, what in (("max_request_bytes", int, "largest request body in bytes"),
                             ("max_files", int, "most images per request"),
                             ("max_batch", int, "most images in one shared forward pass"),
                             ("max_wait_ms", float, "longest wait for a batch to fill, in ms"),
                             ("max_queue", int, "most images waiting; past it: 503 with Retry-After"),
                             ("rate_per_minute", int, "requests a minute per client address, 0 for no limit; "
                                                      "past it: 429 with Retry-After"),
                             ("rate_burst", int, "requests a client may make at once before the rate applies"),
                             ("body_timeout_s", float, "seconds a request body may take to arrive; past it: 408"),
                             ("request_timeout_s", float, "seconds a request may wait for inference; past "
                                                          "it: 503")):
        v.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{what} (default: {LIMIT_DEFAULTS[name]}, or IMAGEORIGIN_{name.upper()})")
    v.add_argument("--api-key", action="append", metavar="KEY",
                   help="require this key on every endpoint but /healthz (repeatable; also "
                        "IMAGEORIGIN_API_KEY, comma-separated)")
    v.add_argument("--api-key-file", metavar="FILE", help="a file of keys, one per line")
    v.add_argument("--insecure-bind", action="store_true",
                   help="allow a non-loopback --host without an API key (something in front authenticates)")
    v.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="proxy addresses (comma-separated, '*' for any) whose X-Forwarded-For names the "
                        "client, for the rate limit; by default that header is never trusted")
    v.set_defaults(func=_serve)

    i = sub.add_parser("info", help="print a model's labels, preprocessing, settings and metrics")
    i.add_argument("model", metavar="MODEL", nargs="?", default="default",
                   help="checkpoint, seed .pth, exported .onnx, or 'default'")
    i.add_argument("--json", action="store_true", help="the raw metadata as JSON")
    i.set_defaults(func=_info)

    a = sub.add_parser("audit", help="per-class formats, sizes, metadata, shortcut warnings and duplicates")
    a.add_argument("data_dir", metavar="DATA_DIR", help="class sub-folders, or train/ val/ ... each with them")
    a.add_argument("--manifest", metavar="CSV", help="manifest with path,label,split,source,orig_* columns")
    a.add_argument("--out", metavar="DIR", help="write audit.json and audit.md here (default: markdown to stdout)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_audit)
    return p


class _Help(argparse.HelpFormatter):
    """Help that states every option's default (on/off switches say what they turn)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="inference engine (default: OpenVINO on a CPU, PyTorch on a GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="force one: fp32 is full precision; int8 (any CPU, OpenVINO) and bf16 (CPUs "
                        "with bf16) are faster but only safe for models checked for them (default: the "
                        "precision the model's check chose, checked on the first batch if it has none)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The training recipe's flags, shared by train and crossval: every TrainConfig field."""
    d = TrainConfig()
    p.add_argument("--backbone", default=d.backbone, choices=sorted(backbones.REGISTRY),
                   help="ImageNet-pretrained feature extractor (mobilenet_v2 works offline)")
    p.add_argument("--weights", default=d.weights,
                   help="backbone weights: 'imagenet', 'random' or a state dict file (default: %(default)s)")
    p.add_argument("--finetune", action="store_true", help="train the whole backbone, not only the head")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (the peak, with onecycle)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="> 0: AdamW instead of Adam")
    p.add_argument("--schedule", choices=("constant", "onecycle"), default=d.schedule,
                   help="learning-rate schedule: constant, or warm up then anneal")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="cross-entropy label smoothing (0: off)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the data held out for validation when no --val is given")
    p.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction,
                   help="share of the training data held out to fit the temperature and threshold")
    p.add_argument("--target-fpr", type=float, default=d.target_fpr,
                   help="share of human images the stored AI threshold may flag (default: %(default)s)")
    p.add_argument("--no-resave-cut", dest="resave_cut", action="store_false",
                   help="set the threshold on the calibration humans as they are only, not also after "
                        "each everyday re-save (JPEG, shrinking, sharpening, WebP, a crop)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice: splits, order, augmentation")
    p.add_argument("--human-class", default=d.human_class, metavar="NAME",
                   help="the class of images made by people (p_ai = 1 - p(NAME))")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="turn random horizontal flips off")
    p.add_argument("--rotation", type=float, default=d.rotation, help="max random rotation in degrees (0: off)")
    p.add_argument("--color-jitter", type=float, default=d.color_jitter,
                   help="brightness/contrast/saturation jitter strength (0: off)")
    p.add_argument("--downscale", type=float, default=d.downscale,
                   help="probability of a random downscale x0.25-1 (every class alike)")
    p.add_argument("--blur", type=float, default=d.blur, help="probability of a random Gaussian blur")
    p.add_argument("--noise", type=float, default=d.noise, help="probability of random Gaussian noise")
    p.add_argument("--jpeg", type=float, default=d.jpeg,
                   help="probability of a random JPEG or WebP re-encode, quality 40-95")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="input side: resize and centre crop to it, or with --native the crop size")
    p.add_argument("--train-crop", type=int, default=d.train_crop,
                   help="train on random crops of this size (0: the centre crop)")
    p.add_argument("--native", action="store_true",
                   help="native resolution: never resize; train on random crops, score a grid of "
                        "crops over the whole image")
    p.add_argument("--crops", type=_crops, default=d.crops, metavar="N|cover",
                   help="with --native: score an N x N grid of crops pooled by mean logit, or 'cover': "
                        "tiles over the whole image (at most 256), flat tiles not voting")
    p.add_argument("--no-samples", dest="samples", action="store_false",
                   help="draw no collage or gallery of the images (for a card published where they "
                        "may not be copied)")
    p.add_argument("--init", default=d.init, metavar="MODEL",
                   help="start from this checkpoint (its backbone, head and preprocessing): adapt "
                        "a model to new data in a few epochs")
    p.add_argument("--no-cache", dest="feature_cache", action="store_false",
                   help="frozen backbone: run the straightforward loop (augment, backbone, head, "
                        "every epoch) instead of training the head on cached features")
    p.add_argument("--views", type=int, default=d.views,
                   help="augmented views per image in the feature cache (default: %(default)s)")
    p.add_argument("--cache-dir", default=d.cache_dir, metavar="DIR",
                   help="feature cache folder (default: $IMAGEORIGIN_CACHE/features, "
                        "else ~/.cache/imageorigin/features)")
    p.add_argument("--pseudo-fakes", default=d.pseudo_fakes, metavar="AUTOENCODER_DIR",
                   help="add each human training image's twin through this latent-diffusion autoencoder "
                        "(a folder with *encoder* and *decoder* weights, e.g. ../shared/decoders/taef2) as an "
                        "AI image, in the same batch with the same crop and degradation (image loop only)")
    p.add_argument("--pseudo-label", default=d.pseudo_label, metavar="CLASS",
                   help="the class the twins are trained as (default: %(default)s)")
    p.add_argument("--pseudo-share", type=float, default=d.pseudo_share, metavar="S",
                   help="share of the AI training examples that are twins (default: one twin per human "
                        "image, every real AI image kept; 1: twins alone)")
    p.add_argument("--no-pseudo-align", dest="pseudo_align", action="store_false",
                   help="save twins losslessly instead of coding each as its real image was")
    p.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="decoding worker processes for training batches, threads for "
                        "feature extraction and validation (default: up to 2 / one per CPU)")


def _crops(text: str) -> int | str:
    """--crops: a grid side (a positive whole number) or "cover"."""
    if text == "cover":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a grid side (1, 2, 3 ...) or 'cover'")
    return n


def _config(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _train(args) -> int:
    if args.resume:
        if args.data_dir or args.out:
            raise ValueError("--resume RUN_DIR continues that run with its own data and settings: "
                             "give no DATA_DIR or --out")
        from .train import resume

        model = resume(args.resume, progress=not args.quiet, ddp=args.ddp)
        args.out = args.resume
    else:
        if not args.data_dir or not args.out:
            raise ValueError("train needs DATA_DIR... and --out RUN_DIR (or --resume RUN_DIR)")
        model = train(args.data_dir, args.out, _config(args), val=args.val, progress=not args.quiet,
                      manifest=args.manifest, ddp=args.ddp)
    m = model.info["metrics"]
    print(f"val accuracy {m['val_accuracy']:.4f}  val loss {m['val_loss']:.4f}  "
          f"({model.info['training']['wall_seconds']} s); wrote {args.out}/model.safetensors")
    return 0


def _crossval(args) -> int:
    result = crossval(args.data_dir, args.manifest, args.out, _config(args), reference=args.reference,
                      sources=args.sources, progress=not args.quiet, folds=args.folds,
                      group_by=args.group_by, only=args.only, resume=args.resume,
                      fold_seed=args.fold_seed, folds_from=args.folds_from)
    print(to_markdown(result))
    print(f"wrote {args.out}/crossval.json and {args.out}/crossval.md")
    return 0


def _evaluate(args) -> int:
    result = evaluate(load(args.model), args.data_dir, args.out, manifest=args.manifest,
                      robustness=args.robustness, samples=args.samples, batch_size=args.batch_size,
                      num_workers=args.num_workers, progress=not args.quiet, engine=args.engine,
                      precision=args.precision)
    rows = report.headline(result)  # the report's headline, on the terminal too
    width = max(len(m) for m, _ in rows)
    print(f"{result['n_images']} images, {len(result['errors'])} unreadable")
    for measure, value in rows:
        print(f"{measure.ljust(width)}  {value}")
    for err in result["errors"]:
        print(f"unreadable: {err}", file=sys.stderr)
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    return 0


def _predict(args) -> int:
    model = load(args.model)
    files = list(find_images(args.paths))
    if not files:
        raise ValueError(f"no image files found in {' '.join(args.paths)}")
    if not args.quiet:
        engine = current_engine(model, args.engine, args.precision)
        print(f"imageorigin: {len(files)} images, engine {engine}", file=sys.stderr)
    preds = predict(model, files, batch_size=args.batch_size, num_workers=args.num_workers,
                    progress=not args.quiet and sys.stderr.isatty(), engine=args.engine,
                    precision=args.precision, threshold=args.threshold, evidence=True)
    counts = dict.fromkeys(("likely_ai", "uncertain", "likely_human", "error"), 0)
    declared = {}  # provenance summary -> files, beside the pixel verdicts
    shown = []
    with _output(args.out) as out:
        header = lambda digits: _header(model, args.threshold, digits)  # noqa: E731
        cuts = _cuts(model, args.threshold)
        for p in _write(preds, model.labels, args.format, out, args.evidence, header, cuts,
                        root=_common_root(files)):
            key = "error" if p.error else p.verdict
            counts[key] = counts.get(key, 0) + 1
            kind = (p.provenance or {}).get("summary", "none")
            declared[kind] = declared.get(kind, 0) + (kind != "none")
            if args.gallery and len(shown) < GALLERY_MAX and not p.error:
                shown.append(p)
        summary = (f"{len(files)} images: {counts['likely_ai']} flagged as AI (likely AI), "
                   f"{counts['uncertain']} uncertain, {counts['likely_human']} likely human, "
                   f"{counts['error']} errors")
        said = _declared_line(declared)
        if args.format == "table":
            out.write(summary + "\n" + (said + "\n" if said else ""))
    if args.gallery:
        report.prediction_gallery(shown, args.gallery)
    check = model.info.get("precision_check") or {}
    if "checked_on" in check and not args.quiet:  # a model that had no stored check: say what was chosen
        cost = check.get("int8", {}).get("quantise_seconds")
        cost = f"; int8 calibration took {cost:.1f} s, once: its engine is cached" if cost else ""
        print(f"imageorigin: precision {check_outcome(check)} (checked on {check['checked_on']}{cost}); "
              f"ran on {current_engine(model, args.engine, args.precision)}", file=sys.stderr)
    if (args.format != "table" or args.out) and not args.quiet:
        print(f"imageorigin: {summary}" + (f"\nimageorigin: {said}" if said else ""), file=sys.stderr)
    if counts["error"]:  # said even with --quiet: the exit status alone does not name the count
        print(f"imageorigin: {counts['error']} of {len(files)} files could not be read", file=sys.stderr)
    return 1 if counts["error"] else 0


def _declared_line(declared: dict[str, int]) -> str | None:
    """The summary's second line, in the table's provenance words:
    "by their own metadata: 5 declares_ai, 2 invalid_manifest" (None when no file says anything)."""
    from .provenance import SUMMARIES

    said = [f"{declared[k]} {k}" for k in SUMMARIES if k != "none" and declared.get(k)]
    return textwrap.fill("by their own metadata: " + ", ".join(said), TABLE_WIDTH, subsequent_indent="  ") \
        if said else None


def _common_root(files) -> str | None:
    """The folder all files lie under, for the table's short paths (a lone file's own folder)."""
    parents = {os.path.dirname(os.path.abspath(f)) for f in files}
    return os.path.commonpath(list(parents)) if parents else None


# The table fits a 120-column terminal: these columns give way (longest first) down
# to 12 characters each, with an ellipsis; CSV and JSON lines carry every column in full.
TABLE_WIDTH = 120
TABLE_COLUMNS = ("file", "verdict", "p_ai", "generator", "caveats", "provenance", "error", "warnings")
SHRINKABLE = ("file", "caveats", "error", "warnings")


def _cuts(model, threshold: float | None) -> list[float]:
    """The p_ai values the table's verdicts are read against: the AI cut, and the human band's edge."""
    cut = model.threshold if threshold is None else threshold
    low = (model.bands or {}).get("likely_human")
    return [c for c in (cut, None if low is None or cut is None else min(low, cut)) if c is not None]


def _digits(values, cuts, least: int = 4) -> int:
    """Decimals that keep every value apart from every cut it differs from (at most 8).
    Rounding keeps order, so distinct strings show each value on its true side."""
    d = least
    while d < 8 and any(v is not None and v != c and f"{v:.{d}f}" == f"{c:.{d}f}" for v in values for c in cuts):
        d += 1
    return d


def _header(model, threshold: float | None, digits: int = 4) -> str:
    """The table's first line: where the verdict bands lie."""
    if model.human_label is None:
        return "# no human class in this model: no AI verdict, only class probabilities"
    cut = model.threshold if threshold is None else threshold
    if cut is None:
        return "# no stored threshold: no verdict (give --threshold P)"
    low = (model.bands or {}).get("likely_human")
    where = "given with --threshold" if threshold is not None else "stored in the model"
    text = f"# likely AI: p_ai >= {cut:.{digits}f} ({where})"
    if low is not None:
        text += f"; likely human: p_ai <= {min(low, cut):.{digits}f}"
    return text + "; else, or with a caveat, uncertain"


@contextlib.contextmanager
def _output(path: str | None):
    if path is None:
        yield sys.stdout
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        yield f


def _write(preds: Iterable[Prediction], labels: list[str], fmt: str, out: TextIO, evidence: bool = False,
           header=None, cuts=(), root: str | None = None):
    """Write predictions as they come (csv, jsonl) or aligned at the end (table); yield each.

    CSV and JSON lines carry every column (per-class probabilities, is_ai, the
    full caveat sentences; JSON lines the patch map, and the provenance details
    with ``evidence``).  The table is for reading: paths relative to ``root``,
    the columns of :data:`TABLE_COLUMNS` that are not empty in every row, at
    most :data:`TABLE_WIDTH` characters wide.  Its p_ai and its
    ``header(digits)`` line share one number of decimals, enough that no p_ai is
    rounded onto a cut of ``cuts`` it is not on."""
    columns = list(Prediction("").row(labels, True))
    if fmt == "csv":
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        for p in preds:
            writer.writerow(p.row(labels, True))
            yield p
    elif fmt == "jsonl":
        for p in preds:  # JSON lines carry the patch map too: per-crop p_ai and where each crop lies
            extra = {"provenance": p.provenance} if evidence else {}
            out.write(json.dumps({**p.row(labels, True), "caveats": p.caveats, **extra, "patches": p.patches})
                      + "\n")
            yield p
    else:
        records = []
        for p in preds:
            row = p.row(labels, True)
            row["file"] = os.path.relpath(os.path.abspath(p.path), root) if root else p.path
            # The table names each caveat by its tag; CSV and JSON lines give the sentences.
            row["caveats"] = "; ".join(c.split(":")[0] for c in p.caveats) or None
            records.append(row)
            yield p
        digits = _digits([r["p_ai"] for r in records], cuts)
        if header is not None:
            out.write(header(digits) + "\n")
        shown = [c for c in TABLE_COLUMNS if any(r.get(c) not in (None, "", "none") for r in records)]
        rows = [[f"{r[c]:.{digits}f}" if c == "p_ai" and r[c] is not None else _cell(r.get(c)) for c in shown]
                for r in records]
        widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(shown)]
        while sum(widths) + 2 * (len(widths) - 1) > TABLE_WIDTH:
            j = max((j for j, c in enumerate(shown) if c in SHRINKABLE and widths[j] > 12),
                    key=lambda j: widths[j], default=None)
            if j is None:
                break
            widths[j] -= 1
        for r in [shown] + rows:
            cells = [v if len(v) <= w else _shorten(v, w, middle=c == "file") for v, w, c in zip(r, widths, shown)]
            out.write("  ".join(v.ljust(w) for v, w in zip(cells, widths)).rstrip() + "\n")


def _shorten(text: str, width: int, middle: bool) -> str:
    """``text`` in ``width`` characters with an ellipsis: a path keeps its first
    third (the folder) and its end (the file's name), other text its start."""
    if not middle:
        return text[:width - 1] + "…"
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _export(args) -> int:
    if args.out.endswith(".onnx"):
        path = export_onnx(load(args.model), args.out)
    elif args.out.endswith(".pth"):
        path = export_seed(load(args.model), args.out)
    else:
        raise ValueError(f"{args.out}: name the output .onnx (ONNX) or .pth (the seed's layout)")
    print(f"wrote {path}")
    return 0


def _scan(args) -> int:
    from .scan import scan

    s = scan(args.paths, args.db, args.model, out=args.out, evidence=args.evidence, batch_size=args.batch_size,
             commit_every=args.commit_every, progress=not args.quiet and sys.stderr.isatty(),
             ray_address=args.ray)
    v = s["verdicts"]
    print(f"{s['files']} files in {args.db or args.out} for this model ({s['scanned']} scanned now, {s['skipped']} "
          f"already there): {v.get('likely_ai', 0)} likely AI ({s['flagged_share']:.1%}), "
          f"{v.get('uncertain', 0)} uncertain, {v.get('likely_human', 0)} likely human, {s['errors']} errors; "
          "labels " + ", ".join(f"{k} {n}" for k, n in sorted(s["labels"].items(), key=lambda kv: str(kv[0]))))
    return 0


def _results(args) -> int:
    from .scan import export

    if args.format == "parquet" and not args.out:
        raise ValueError("parquet needs --out FILE")
    n = export(args.db, args.out or sys.stdout, args.format, args.where)
    if args.out:
        print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


def _explain(args) -> int:
    from pathlib import Path

    model = load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for p in predict(model, args.images):
        if p.error:
            print(f"imageorigin: {p.error}", file=sys.stderr)
            failed += 1
            continue
        if not p.patches:
            print(f"imageorigin: {p.path}: this model scores one crop: no patch map", file=sys.stderr)
            continue
        path = report.overlay(p.path, p, out / (Path(p.path).stem + ".overlay.png"))
        print(f"{p.path}: {p.verdict}, p_ai {p.p_ai:.3f}; wrote {path}")
    return 1 if failed else 0


def _serve(args) -> int:
    import uvicorn

    from .service import Limits, check_bind, create_app, load_api_keys

    keys = load_api_keys(args.api_key, args.api_key_file)
    check_bind(args.host, keys, args.insecure_bind)
    limits = Limits(**{k: getattr(args, k) for k in ("max_request_bytes", "max_files", "max_batch",
                                                     "max_wait_ms", "max_queue", "rate_per_minute",
                                                     "rate_burst", "body_timeout_s", "request_timeout_s")
                       if getattr(args, k) is not None})
    # One process, one model: uvicorn's own workers would each load it and fight for the cores.
    # limit_concurrency answers 503 past that many open connections and tasks;
    # timeout_keep_alive drops idle connections. uvicorn trusts X-Forwarded-For
    # from 127.0.0.1 unless told otherwise, which would let any local client
    # forge its address past the rate limit: only the proxies named are trusted.
    uvicorn.run(create_app(args.model, limits, keys), host=args.host, port=args.port, log_level="info",
                access_log=False, limit_concurrency=1024, timeout_keep_alive=5,
                proxy_headers=bool(args.forwarded_allow_ips), forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def _info(args) -> int:
    model = load(args.model)
    # What runs here, read back from the compiled engine (bf16 stored but no bf16
    # on this CPU runs fp32); the stored check says why the model asks for it.
    run = current_engine(model)
    meta = {**model.describe(), "engine_here": str(run), "precision_here": precision_reason(model, run)}
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print("\n".join(_summary(model, meta, args.model)))
    return 0


def _summary(model, meta: dict, name: str) -> list[str]:
    """A readable account of a model: what it tells apart, how it reads an image, how it did."""
    info = meta.get("info") or {}
    t, m = info.get("training", {}), info.get("metrics", {})
    lines = [f"model      {name}",
             f"backbone   {meta['backbone']['name'] if 'backbone' in meta else '?'}"
             + (f", {t.get('recipe')}" if t.get("recipe") else ""),
             "classes    " + ", ".join(f"{l} ({model.display_names.get(l, l)})" for l in model.labels),
             f"human      {model.human_label or 'none: no p_ai, threshold or verdict'}",
             f"reads      {describe_preprocessing(model.preprocessing)}"]
    if model.threshold is not None:
        bands = model.bands or {}
        lines.append(f"verdict    likely AI at p_ai >= {model.threshold:.4f}"
                     + (f", likely human at p_ai <= {bands['likely_human']:.4f}, uncertain between"
                        if bands.get("likely_human") is not None else ", likely human below"))
    lines.append(f"calibrated temperature {model.temperature:.3f}")
    lines += [f"runs in    {meta['engine_here']} on this machine", f"precision  {meta['precision_here']}"]
    if m:
        lines.append(f"validation accuracy {m.get('val_accuracy', float('nan')):.4f}, loss "
                     f"{m.get('val_loss', float('nan')):.4f}"
                     + (f" (epoch {m['best_epoch']} of {m['epochs']}, the best kept)" if m.get("best_epoch")
                        else f" (after {m.get('epochs')} epochs)"))
    if t.get("train_counts"):
        lines.append("trained on " + ", ".join(f"{k} {v}" for k, v in t["train_counts"].items())
                     + f" images from {t.get('data_dir')}")
    if info.get("sources"):
        lines.append(f"sources    {len(info['sources'])} (see --json)")
    for w in info.get("warnings", []):
        lines.append(f"warning    {w}")
    lines.append("(--json for everything stored in the model)")
    return lines


def _audit(args) -> int:
    from .audit import audit, console_lines, summary_line, to_markdown, write_outputs

    result = audit(args.data_dir, manifest=args.manifest, progress=not args.quiet and sys.stderr.isatty())
    if args.out is None:
        print(to_markdown(result))
        return 0
    paths = write_outputs(result, args.out)
    print(f"{summary_line(result)}; wrote {', '.join(map(str, paths))}")
    for line in console_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
