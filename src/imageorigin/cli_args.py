"""The command line's arguments: every sub-command, its options and their help
(the handlers that run them are :mod:`imageorigin.cli`'s).
"""

from __future__ import annotations

import argparse

from . import __version__, backbones
from .engine import ENGINES, PRECISIONS
from .train import TrainConfig


GALLERY_MAX = 48  # images predict --gallery draws


def parser(handlers: dict) -> argparse.ArgumentParser:
    """The ``imageorigin`` parser; each sub-command runs ``handlers[its name]``
    (the functions of :mod:`imageorigin.cli`), as ``args.func``."""
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
    t.set_defaults(func=handlers["train"])

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
    c.set_defaults(func=handlers["crossval"])

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
    e.set_defaults(func=handlers["evaluate"])

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
    r.set_defaults(func=handlers["predict"])

    x = sub.add_parser("export", help="write a model as ONNX (OUT.onnx) or, for DenseNet121 models, "
                                      "in the seed's .pth layout (OUT.pth)")
    x.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    x.add_argument("out", metavar="OUT", help="OUT.onnx or OUT.pth")
    x.set_defaults(func=handlers["export"])

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
    s.set_defaults(func=handlers["scan"])

    q = sub.add_parser("results", help="export or query a scan's database or Parquet folder")
    q.add_argument("db", metavar="DB", help="the scan's SQLite file, or its --out folder")
    q.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv", help="output format")
    q.add_argument("--where", metavar="SQL", help="an SQL condition, e.g. \"verdict = 'likely_ai'\"")
    q.add_argument("--out", metavar="FILE", help="output file (needed for parquet; default: standard output)")
    q.set_defaults(func=handlers["results"])

    h = sub.add_parser("explain", help="draw each image's patch map (each crop's p_ai) over it")
    h.add_argument("model", metavar="MODEL", help="checkpoint path or 'default'")
    h.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    h.add_argument("--out", required=True, metavar="DIR", help="folder for one overlay PNG per image")
    h.set_defaults(func=handlers["explain"])

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
    v.add_argument("--store", metavar="DIR", help="keep reviewers' feedback and the deployment history here "
                                                 "(SQLite); without it the service keeps nothing")
    v.add_argument("--keep-images", action="store_true",
                   help="with --store: also keep the bytes of each image a reviewer labels (for adapt)")
    v.set_defaults(func=handlers["serve"])

    d = sub.add_parser("adapt", help="learn from reviewers' feedback: a candidate model, then its gate")
    d.add_argument("model", metavar="MODEL", help="the model in service (checkpoint path or 'default')")
    d.add_argument("--feedback", required=True, metavar="DIR", help="the service's --store folder")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for the candidate and its card")
    d.add_argument("--replay", action="append", metavar="DIR",
                   help="class folders of the model's training data (repeatable; default: those it names)")
    d.add_argument("--replay-per-class", type=int, default=100, help="replay images per class")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--reference", action="append", metavar="DIR",
                   help="the team's reference set (class folders, repeatable): gate the candidate on it")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=handlers["adapt"])

    g = sub.add_parser("gate", help="accept or refuse a candidate against the current model (exit 1: refused)")
    g.add_argument("candidate", metavar="CANDIDATE", help="the candidate checkpoint (adapt.json beside it)")
    g.add_argument("--current", required=True, metavar="MODEL", help="the model in service")
    g.add_argument("--reference", required=True, action="append", metavar="DIR",
                   help="the team's reference set (class folders, repeatable)")
    g.set_defaults(func=handlers["gate"])

    i = sub.add_parser("info", help="print a model's labels, preprocessing, settings and metrics")
    i.add_argument("model", metavar="MODEL", nargs="?", default="default",
                   help="checkpoint, seed .pth, exported .onnx, or 'default'")
    i.add_argument("--json", action="store_true", help="the raw metadata as JSON")
    i.set_defaults(func=handlers["info"])

    a = sub.add_parser("audit", help="per-class formats, sizes, metadata, shortcut warnings and duplicates")
    a.add_argument("data_dir", metavar="DATA_DIR", help="class sub-folders, or train/ val/ ... each with them")
    a.add_argument("--manifest", metavar="CSV", help="manifest with path,label,split,source,orig_* columns")
    a.add_argument("--out", metavar="DIR", help="write audit.json and audit.md here (default: markdown to stdout)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=handlers["audit"])
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
