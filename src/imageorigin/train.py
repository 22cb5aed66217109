"""Training: the seed's recipe (frozen backbone, linear head) and full fine-tuning.

``train()`` writes into a run folder: ``model.safetensors`` (rewritten after every
epoch, atomically), ``history.json``, ``loss.png``, ``accuracy.png``,
``collage.png``, ``val/`` (the final model's evaluation) and ``MODEL_CARD.md``.

After training, a temperature and an AI-vs-human threshold are fitted on a
calibration split held out of the training data, so that neither is chosen on
the validation data the card reports.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import backbones, features, report
from .calibrate import choose_threshold, fit_temperature
from .data import (
    ImageDataset,
    LabelledFolder,
    batches,
    default_preprocessing,
    loader,
    match_manifest,
    read_manifest,
    scan_folders,
    stack_images,
    stratified_split,
    train_transform,
)
from .engine import check_precision, create_engine
from .evaluate import RESAVES, evaluate
from .fileio import atomic_path, write_json
from .autoencoder import load_autoencoder
from .model import Classifier, pooled, save
from .pseudofakes import licence_of, pair_accuracy, training_pairs
from .model import load as load_model
from .runtime import device
from .verdict import fit_bands, least_side

Folders = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], LabelledFolder]


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the seed model card's."""

    backbone: str = "densenet121"
    weights: str = "imagenet"  # "imagenet", "random" or a path to a state dict file
    finetune: bool = False  # train the whole backbone too (the seed freezes it)
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "onecycle": warm up, then anneal the learning rate
    label_smoothing: float = 0.0
    val_fraction: float = 0.2  # used only when no val folder is given
    calibration_fraction: float = 0.15  # of the training data, for temperature and threshold
    target_fpr: float = 0.05  # share of human images the stored threshold may flag
    # ... as they are and after each everyday re-save (evaluate.RESAVES), not only as they are
    resave_cut: bool = True
    seed: int = 0
    # The class whose images are made by people: p_ai = 1 - p(human_class).
    # A model with no such class gives class probabilities only.
    human_class: str = "human"
    flip: bool = True
    rotation: float = 15.0  # degrees
    color_jitter: float = 0.2  # brightness / contrast / saturation strength
    # Degradations applied to every class alike, each with its probability
    # (see data.Degrade): downscale x0.25-1, blur, noise, JPEG / WebP re-encode.
    downscale: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0
    image_size: int = 224  # resize the shorter side and centre crop to this
    train_crop: int = 0  # >0: train on random crops of this size
    # Native resolution: no resize; train on random image_size crops, score a
    # crops x crops grid of them over the whole image, pooled by mean logit, or
    # ("cover") tiles over all of it (see imageorigin.data.cover_boxes).
    native: bool = False
    crops: int | str = 1
    # Warm start: a checkpoint whose backbone, head, labels and preprocessing
    # this run starts from (adapting a model to a new generator).
    init: str | None = None
    # Frozen backbone only: compute the features of `views` augmented views of
    # each image once (kept on disk in cache_dir, default ~/.cache/imageorigin)
    # and train the head on them.  False: the straightforward loop.  One view
    # is as accurate as 2 or 4 or the straightforward loop for the seed's
    # recipe (resized/val over seeds 0-2, README) and the fastest.
    # Draw the collage and gallery of training / validation images (off for a
    # card published where the images may not be copied).
    samples: bool = True
    feature_cache: bool = True
    views: int = 1
    cache_dir: str | None = None
    num_workers: int | None = None
    # Aligned pseudo-fakes (see imageorigin.pseudofakes): the folder of a latent-
    # diffusion generator's autoencoder.  Each human training image's twin through
    # it is trained on as an image of class `pseudo_label`, in the same batch as
    # its real image, with the same crop and degradation (the image loop only).
    pseudo_fakes: str | None = None
    pseudo_label: str = "other_ai"
    # The share of the AI training examples that are twins: None keeps every real
    # AI image and adds one twin per human image; 1.0 trains on twins alone.
    pseudo_share: float | None = None
    pseudo_align: bool = True  # code each twin as its real image was (False: lossless PNG)


def train(
    data: Folders,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    val: Folders | None = None,
    progress: bool = True,
    manifest: str | os.PathLike | None = None,
    ddp: int = 1,
    resume: bool = False,
) -> Classifier:
    """Train a classifier on one or more folders with one sub-folder per class.

    Validation data is ``val`` (one or more folders) or a seeded, stratified
    split of ``data``.  A ``manifest`` (CSV with path, source, licence columns)
    puts the training data's sources and licences into the checkpoint and card.
    ``ddp=N`` splits every batch across N local processes (PyTorch
    DistributedDataParallel, gloo on the CPU, NCCL on GPUs); the recipe, the
    seeds and the checkpoint are the same.  Started by ``torchrun`` (which sets
    ``WORLD_SIZE``), each process joins the group on its own.

    After every epoch the whole training state (weights, optimiser, schedule,
    random generators, history, the best epoch so far) is written atomically to
    ``out_dir/resume.safetensors``; ``resume=True`` continues from it (see
    :func:`resume`), and the result equals an uninterrupted run's.
    Returns the trained, calibrated model (also saved as ``out_dir/model.safetensors``).
    """
    cfg = config or TrainConfig()
    distributed = ddp > 1 or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and cfg.feature_cache and not cfg.finetune:
        raise ValueError("--ddp splits the image loop (--finetune, or --no-cache): the frozen "
                         "recipe trains its head on cached features in seconds")
    if cfg.pseudo_fakes and cfg.feature_cache and not cfg.finetune:
        raise ValueError("--pseudo-fakes trains each image beside its twin in the image loop: "
                         "add --finetune (or --no-cache)")
    if ddp > 1 and not dist.is_initialized():
        return _spawn(ddp, data, out_dir, cfg, val, progress, manifest, resume)
    rank, world = _process_group()
    lead = rank == 0  # the one process that validates, saves and reports
    progress = progress and lead
    began = time.perf_counter()
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    start = _warm_start(cfg.init) if cfg.init else None
    if start is not None:  # the run's settings say what it really trained
        cfg = replace(cfg, backbone=start.backbone.name, weights=start.backbone_weights,
                      image_size=start.preprocessing["crop"],
                      native=start.preprocessing.get("resize") is None,
                      crops=start.preprocessing.get("crops", 1))
    pool = data if isinstance(data, LabelledFolder) else scan_folders(
        data, None if start is None else start.labels)
    if val is None:
        train_set, val_set = stratified_split(pool, cfg.val_fraction, cfg.seed)
    else:
        val_set = val if isinstance(val, LabelledFolder) else scan_folders(val, pool.classes)
        train_set = pool
    calib_set = None
    if cfg.calibration_fraction > 0:
        train_set, calib_set = stratified_split(train_set, cfg.calibration_fraction, cfg.seed)

    model = start or _new_model(cfg, pool.classes)
    notes = _data_warnings(model, cfg, train_set, val_set, calib_set)
    for note in notes if lead else ():
        print(f"imageorigin: warning: {note}", file=sys.stderr)
    dev = device() if world == 1 or not torch.cuda.is_available() else torch.device("cuda", _local_rank())
    model.to(dev)
    model.frozen = not cfg.finetune
    for p in model.backbone.parameters():
        p.requires_grad_(cfg.finetune)

    twins = None
    if cfg.pseudo_fakes:  # each human training image's twin through a generator's autoencoder
        if model.human_index is None or cfg.pseudo_label not in model.labels or \
                cfg.pseudo_label == model.human_label:
            raise ValueError(f"--pseudo-fakes needs a human class and an AI class --pseudo-label "
                             f"(got {cfg.pseudo_label!r}; classes {model.labels})")
        autoencoder = load_autoencoder(cfg.pseudo_fakes)
        pairs = lambda folder, bar: training_pairs(  # noqa: E731
            folder, autoencoder, human=model.human_index, label=model.labels.index(cfg.pseudo_label),
            share=cfg.pseudo_share, aligned=cfg.pseudo_align, manifest=manifest, seed=cfg.seed, progress=bar)
        if world > 1:  # each process makes its share of the twins; then all read them from the cache
            pairs(LabelledFolder(train_set.root, train_set.classes, train_set.samples[rank::world]), progress)
            dist.barrier()
        twins = pairs(train_set, progress and lead)
        for err in twins["info"]["errors"] if lead else ():
            print(f"imageorigin: warning: {err}", file=sys.stderr)
    augment = {"flip": cfg.flip, "rotation": cfg.rotation, "color_jitter": cfg.color_jitter,
               "downscale": cfg.downscale, "blur": cfg.blur, "noise": cfg.noise, "jpeg": cfg.jpeg,
               "random_crop": cfg.train_crop}
    cached = cfg.feature_cache and not cfg.finetune
    out.mkdir(parents=True, exist_ok=True)
    if cfg.samples and lead:
        report.collage(train_set, out / "collage.png")
    if cached:
        # The frozen backbone's features of K augmented views of each image,
        # computed once (or read from the cache); each epoch draws one view per image.
        features = _FeatureSource(model, cfg, augment, progress)
        views = features.train_views(train_set)
        epoch_batches = lambda epoch: views.batches(epoch)  # noqa: E731
        steps = views.steps
        val_logits = features.head_logits(val_set)
    else:
        if cfg.batch_size < world:
            raise ValueError(f"--batch-size {cfg.batch_size} cannot be split across {world} processes")
        items, labels, twin_of = ([p for p, _ in train_set.samples], [y for _, y in train_set.samples], None) \
            if twins is None else (twins["items"], twins["labels"], twins["twin_of"])
        train_dl = loader(
            ImageDataset(items, train_transform(model.preprocessing, augment), labels),
            cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed, rank=rank, world=world, twin_of=twin_of,
        )
        # Every process holds the whole model; DistributedDataParallel averages
        # the gradients of the trainable parameters across them after each backward.
        net = model if world == 1 else nn.parallel.DistributedDataParallel(model)

        def epoch_batches(epoch):
            train_dl.batch_sampler.set_epoch(epoch)
            return _image_batches(net, train_dl, model.preprocessing["crop"], world)

        steps = len(train_dl)
        val_logits = _logit_fn(model, val_set, cfg, progress) if lead else None
    params = model.parameters() if cfg.finetune else model.head.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) \
        if cfg.weight_decay else torch.optim.Adam(params, lr=cfg.lr)
    scheduler = None
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    elif cfg.schedule != "constant":
        raise ValueError(f"unknown schedule {cfg.schedule!r}: 'constant' or 'onecycle'")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict] = []
    best: dict | None = None  # the epoch kept: best validation accuracy, then lowest loss
    best_state: dict | None = None
    skipped: set[str] = set()
    generator = views.generator if cached else None  # the cached recipe's shuffles
    first = 1
    if resume:
        history, best, best_state, skipped = _restore(out / RESUME_FILE, cfg, model, optimizer, scheduler,
                                                      generator)
        first = len(history) + 1
        if lead:
            print(f"imageorigin: resuming {out} after epoch {len(history)} of {cfg.epochs}", file=sys.stderr)
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(first, cfg.epochs + 1):
        model.train()  # a frozen backbone stays in eval mode (see Classifier.train)
        total_loss, correct, seen = 0.0, 0, 0
        # A bar advanced by hand after each step: one wrapped around the batches
        # shows its count only at its refresh interval, so short runs sat at "0/2".
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for logits, labels, failures in epoch_batches(epoch):  # (B, C), (B,), unreadable files
            for err in failures:
                if err not in skipped:
                    tqdm.write(f"imageorigin: skipping unreadable training image: {err}", file=sys.stderr)
                    skipped.add(err)
            if logits is None:
                bar.update(1)
                continue
            loss = loss_fn(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        if world > 1:  # the epoch's training loss and accuracy over every process's share
            sums = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
            dist.all_reduce(sums)
            total_loss, correct, seen = sums[0].item(), int(sums[1]), int(sums[2])
        if not lead:
            continue
        logits, y = val_logits()
        row = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": nn.functional.cross_entropy(logits, y).item(),
            "val_accuracy": (logits.argmax(1) == y).float().mean().item(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(row)
        improved = best is None or (row["val_accuracy"], -row["val_loss"]) > \
            (best["val_accuracy"], -best["val_loss"])
        tqdm.write(f"epoch {epoch:>2}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                   f"acc {row['train_accuracy']:.3f}  val loss {row['val_loss']:.4f} "
                   f"acc {row['val_accuracy']:.3f}" + ("  (best so far: kept)" if improved else ""),
                   file=sys.stderr)
        if improved:
            best = row
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.info = _info(cfg, train_set, val_set, val is not None, calib_set, history, best,
                               sorted(skipped), features.stats if cached else None, notes)
            # Saved atomically whenever validation improves: an interrupted run
            # keeps its best full epoch so far.
            save(model, out / "model.safetensors")
        write_json(out / "history.json", history)
        _checkpoint(out / RESUME_FILE, cfg, data, val, manifest, model, optimizer, scheduler, generator,
                    history, best, best_state, skipped)

    if world > 1:
        dist.destroy_process_group()
        if not lead:
            return model
    if best_state is not None:  # the kept epoch, not the last one
        model.load_state_dict(best_state)
        model.info = _info(cfg, train_set, val_set, val is not None, calib_set, history, best,
                           sorted(skipped), features.stats if cached else None, notes)

    model.info["training"]["processes"] = world
    if manifest is not None:
        model.info["sources"] = _sources(pool, manifest)
    if calib_set is not None:
        _calibrate(model, calib_set, cfg, progress, features.head_logits if cached else None)
        model.info["calibration"] = {
            "temperature": model.temperature, "threshold": model.threshold,
            "target_fpr": cfg.target_fpr, "counts": calib_set.counts(),
        }
    if twins is not None:  # what the pseudo-fakes were, and whether the trace was learned at all
        model.info["pseudo_fakes"] = {
            **twins["info"], "folder": str(cfg.pseudo_fakes), "licence": licence_of(cfg.pseudo_fakes),
            "label": cfg.pseudo_label,
            "val_pairs": pair_accuracy(model, [p for p, y in val_set.samples if y == model.human_index],
                                       autoencoder, aligned=cfg.pseudo_align, manifest=manifest)}
    # The whole run: data scan, feature extraction, epochs and calibration.
    model.info["training"]["wall_seconds"] = round(time.perf_counter() - began, 1)
    save(model, out / "model.safetensors")
    report.training_plots(history, out)
    # The card's figures come from the same evaluation a user runs with
    # `imageorigin evaluate`, on the validation data, with the stored threshold.
    evaluation = evaluate(model, val_set, out / "val", batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, progress=progress, robustness=False,
                          samples=cfg.samples)
    report.write_model_card(model, out / "MODEL_CARD.md", evaluation,
                            run_seconds=time.perf_counter() - began)
    return model.eval()


RESUME_FILE = "resume.safetensors"


def _paths(x) -> list[str] | None:
    if x is None or isinstance(x, LabelledFolder):
        return None
    return [str(p) for p in ([x] if isinstance(x, (str, os.PathLike)) else x)]


def _checkpoint(path: Path, cfg: TrainConfig, data, val, manifest, model: nn.Module, optimizer, scheduler,
                generator, history, best, best_state, skipped) -> None:
    """Everything a resumed run needs, in one safetensors file written atomically:
    tensors for the weights (now and of the best epoch), the optimiser's state and
    the random generators; JSON for the rest (settings, data, history, schedule)."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    for i, state in opt["state"].items():
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    tensors["rng.torch"] = torch.get_rng_state()
    if generator is not None:
        tensors["rng.epochs"] = generator.get_state()
    meta = {"config": asdict(cfg), "data": _paths(data), "val": _paths(val), "manifest": _paths(manifest),
            "history": history, "best": best, "skipped": sorted(skipped),
            "optim_groups": opt["param_groups"],
            "optim_scalars": {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)}
                              for i, st in opt["state"].items()},
            "scheduler": None if scheduler is None else scheduler.state_dict()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"imageorigin-resume": json.dumps(meta)})


def _resume_state(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """A :func:`_checkpoint` file's JSON and (with ``tensors``) its tensors."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: nothing to resume (no {RESUME_FILE}: no epoch was completed)")
    with safe_open(str(path), "pt") as f:
        return (json.loads(f.metadata()["imageorigin-resume"]),
                {k: f.get_tensor(k) for k in f.keys()} if tensors else {})


def can_resume(run_dir: str | os.PathLike, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds an interrupted run's state written with these settings."""
    path = Path(run_dir) / RESUME_FILE
    return path.is_file() and not changed_settings(_resume_state(path, tensors=False)[0]["config"], asdict(cfg))


# How fast a run goes, not what it computes: each image's augmentation follows
# (seed, epoch, image) whichever worker decodes it, and the feature cache holds
# the same features wherever it is kept. A resumed run may change these.
_SPEED_ONLY = ("num_workers", "cache_dir")


def changed_settings(earlier: dict, now: dict) -> list[str]:
    """The training settings (``asdict(TrainConfig)``, or their JSON) in which two
    runs differ, leaving out those that change only their speed."""
    earlier, now = json.loads(json.dumps(earlier)), json.loads(json.dumps(now))
    # A setting added since the earlier run had its default then.
    earlier = {**json.loads(json.dumps(asdict(TrainConfig()))), **earlier}
    return sorted(k for k in set(earlier) | set(now) if k not in _SPEED_ONLY and earlier.get(k) != now.get(k))


def _restore(path: Path, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, generator):
    """Load a :func:`_checkpoint` into the run's objects; returns (history, best,
    best_state, skipped).  Refuses a state written with other settings."""
    meta, tensors = _resume_state(path)
    changed = changed_settings(meta["config"], asdict(cfg))
    if changed:
        raise ValueError(f"{path.parent} was trained with other settings ({', '.join(changed)}): "
                         "resume it with its own (imageorigin train --resume RUN_DIR)")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = {}
    for i, scalars in meta["optim_scalars"].items():
        state[int(i)] = dict(scalars)
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optim_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None:
        generator.set_state(tensors["rng.epochs"])
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta["history"], meta["best"], best_state, set(meta["skipped"])


def resume(run_dir: str | os.PathLike, progress: bool = True, ddp: int = 1) -> Classifier:
    """Continue the run in ``run_dir`` from its last completed epoch, with the
    data and settings it was started with."""
    meta, _ = _resume_state(Path(run_dir) / RESUME_FILE, tensors=False)
    return train(meta["data"], run_dir, TrainConfig(**meta["config"]), val=meta["val"], progress=progress,
                 manifest=meta["manifest"], ddp=ddp, resume=True)


def _warm_start(path: str) -> Classifier:
    """The checkpoint a run starts from: its backbone, head, labels and preprocessing
    (its temperature, threshold and metrics are fitted again)."""
    model = load_model(path)
    model.temperature, model.threshold, model.bands, model.inference_precision = 1.0, None, None, "fp32"
    return model


def _new_model(cfg: TrainConfig, classes: list[str]) -> Classifier:
    """A new model for ``cfg``: a registry backbone and a fresh linear head."""
    spec = backbones.get_spec(cfg.backbone)
    return Classifier(
        backbones.build_backbone(cfg.backbone, cfg.weights),
        classes,
        backbone_weights="imagenet" if cfg.weights == "imagenet" else str(cfg.weights),
        human_label=cfg.human_class,
        preprocessing=default_preprocessing(spec.mean, spec.std, cfg.image_size, cfg.native, cfg.crops),
    )


def _image_batches(net: nn.Module, dl, crop: int, world: int = 1):
    """The straightforward loop's batches: augment, forward through the model
    (the whole of it, or DistributedDataParallel around it).  A frozen backbone's
    weights need no gradient, so autograd records only the head.

    Yields ``(logits (B, C), labels (B,), unreadable files)``; logits are None
    for a batch with no readable image.  With several processes, a process whose
    share has no readable image runs one blank image with weight zero: every
    process must take part in every step's gradient average.
    """
    dev = next(net.parameters()).device
    for _, images, labels, failures in dl:
        errors = [err for _, err in failures]
        if images is None and world == 1:
            yield None, None, errors
            continue
        if images is None:
            logits = net(torch.zeros(1, 3, crop, crop, device=dev)) * 0.0  # (1, C): gradient 0
            yield logits, torch.zeros(1, dtype=torch.long, device=dev), errors
            continue
        yield net(images.to(dev)), labels.to(dev), errors


def _process_group() -> tuple[int, int]:
    """This process's (rank, world size): (0, 1) alone; under ``torchrun``
    (``WORLD_SIZE`` > 1 in the environment) it joins the group first."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


def _spawn(n: int, data, out_dir, cfg: TrainConfig, val, progress: bool, manifest, resume: bool) -> Classifier:
    """Run :func:`train` in ``n`` local processes (rank 0 saves), and load its model."""
    import socket

    with socket.socket() as s:  # a free port for the group's rendezvous on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(_rank_main, args=(n, data, out_dir, cfg, val, progress, manifest, resume),
                                nprocs=n, join=True)
    return load_model(Path(out_dir) / "model.safetensors")


def _rank_main(rank: int, world: int, data, out_dir, cfg, val, progress, manifest, resume) -> None:
    # Each process gets its share of the cores: N processes x all cores each
    # fought over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # A process started by spawn starts its DataLoader workers by spawn too,
    # re-importing torch in each every epoch (an epoch took 6x as long); fork
    # them, as in a process torchrun starts.
    if "fork" in torch.multiprocessing.get_all_start_methods():
        torch.multiprocessing.set_start_method("fork", force=True)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    train(data, out_dir, cfg, val, progress, manifest, resume=resume)


class _FeatureSource:
    """A frozen backbone's features of labelled folders, through the feature cache."""

    def __init__(self, model: Classifier, cfg: TrainConfig, augment: dict, progress: bool):
        self.model, self.cfg, self.augment, self.progress = model, cfg, augment, progress
        # Features are computed in fp32: the head is trained on exactly what the
        # fp32 backbone gives.
        self.engine = create_engine(model.backbone, input_size=model.preprocessing["crop"])
        self.context = features.context_dir(model.backbone, model.preprocessing, self.engine,
                                            cfg.cache_dir)
        self.stats = {"views": cfg.views, "cache": str(self.context), "engine": str(self.engine),
                      "vectors_cached": 0, "vectors_computed": 0}

    def _extract(self, folder: LabelledFolder, transform, names: list[str], desc: str):
        cfg = self.cfg
        v = features.extract([p for p, _ in folder.samples], self.engine, transform, names,
                             self.context, seed=cfg.seed, preprocessing=self.model.preprocessing,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             progress=self.progress, desc=desc)
        self.stats["vectors_cached"] += v.cached
        self.stats["vectors_computed"] += v.computed
        y = torch.tensor([y for _, y in folder.samples])
        return v.features[:, v.ok], y[v.ok], v.errors  # (V, N, D), (N,)

    def train_views(self, folder: LabelledFolder) -> "_CachedEpochs":
        """``cfg.views`` augmented views of every training image."""
        names = features.view_names(self.cfg.views, self.augment, self.cfg.seed)
        feats, y, errors = self._extract(folder, train_transform(self.model.preprocessing, self.augment),
                                         names, "augmented views")
        return _CachedEpochs(self.model, feats, y, errors, self.cfg.batch_size, self.cfg.seed)

    def head_logits(self, folder: LabelledFolder):
        """A function giving the current head's logits (N, C) on the folder, and labels (N,)."""
        feats, y, _ = self._extract(folder, self.model.transform, ["eval"], "features")
        dev = next(self.model.head.parameters()).device
        return _head_on(self.model, feats[0].to(dev), y.to(dev))


class _CachedEpochs:
    """Head-training batches from cached features: each epoch a fresh shuffle, and
    for each image one of its K augmented views, drawn at random."""

    def __init__(self, model: Classifier, feats: torch.Tensor, y: torch.Tensor, errors: list[str],
                 batch_size: int, seed: int):
        dev = next(model.head.parameters()).device
        self.model, self.feats, self.y = model, feats.to(dev), y.to(dev)  # (K, N, D), (N,)
        self.errors, self.batch_size = errors, batch_size
        self.steps = -(-len(y) // batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def batches(self, epoch: int):
        k, n, _ = self.feats.shape
        order = torch.randperm(n, generator=self.generator)
        view = torch.randint(k, (n,), generator=self.generator)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield (self.model.head(self.feats[view[idx], idx]), self.y[idx],
                   self.errors if start == 0 else [])


def _logits(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool,
            head: bool = True):
    """Run the model (or only its backbone) over a folder with the eval transform.

    Returns (N, C) logits, or (N, D) features with ``head=False``, and (N,) labels;
    unreadable files are left out.
    """
    dl = batches(ImageDataset([p for p, _ in folder.samples], model.transform,
                              [y for _, y in folder.samples]),
                 cfg.batch_size, threads=cfg.num_workers)
    outs, labels = [], []
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for _, images, y, _ in tqdm(dl, desc="validation", unit="batch", disable=not progress,
                                    leave=False):
            if images is not None:
                # A list where a covering model's images have different tile counts.
                images = [x.to(dev) for x in images] if isinstance(images, list) else images.to(dev)
                y = y.to(dev)
                # Features of a multi-crop model: its crops' features pooled by its rule.
                outs.append(model(images) if head else pooled(model.backbone, images, model.preprocessing)[0])
                labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def _logit_fn(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool):
    """A function giving the current model's validation logits and labels.

    With a frozen backbone the features never change between epochs: they are
    computed once and only the head runs each epoch.
    """
    if cfg.finetune:
        return lambda: _logits(model, folder, cfg, progress)
    return _head_on(model, *_logits(model, folder, cfg, progress, head=False))


def _head_on(model: Classifier, feats: torch.Tensor, y: torch.Tensor):
    """A function giving the current head's logits (N, C) on fixed features (N, D), and y (N,)."""

    def head_only():
        with torch.no_grad():
            return model.head(feats), y

    return head_only


def _calibrate(model: Classifier, folder: LabelledFolder, cfg: TrainConfig, progress: bool,
               head_logits=None) -> None:
    """Fit the temperature and the AI-vs-human threshold on held-out training data,
    and check whether the model may run in bf16 (:func:`imageorigin.engine.check_precision`)."""
    logits, y = head_logits(folder)() if head_logits else _logits(model, folder, cfg, progress)
    model.temperature = fit_temperature(logits, y)
    if model.human_index is not None and (y == model.human_index).any():
        _, p_ai = model.scores(logits)
        is_human = y.cpu().numpy() == model.human_index
        # Every cut is set on the calibration humans as they are and after each
        # everyday re-save (JPEG, shrinking, sharpening, WebP, a crop): a photo
        # re-saved on its way to an upload must not cross it more often.
        humans = {"original": p_ai.numpy()[is_human]}
        if cfg.resave_cut:
            humans.update(_resaved_humans(model, folder, cfg, progress))
        cuts = {f: {name: choose_threshold(p, np.ones(len(p), bool), f) for name, p in humans.items() if len(p)}
                for f in {cfg.target_fpr, 0.01, 0.02, 0.05, 0.1}}
        model.threshold = max(cuts[cfg.target_fpr].values())
        model.info["resave_cuts"] = cuts[cfg.target_fpr]  # the cut each re-save alone would need
        if not is_human.all():
            model.bands = fit_bands(p_ai.numpy(), is_human, model.threshold)
            if model.bands["widened"]:  # said on the terminal and on the card
                note = (f"every calibration AI image scored above the threshold ({model.threshold:.4f}), "
                        "so the data left no uncertain band: 'likely human' starts at p_ai "
                        f"{model.bands['likely_human']:.4f}, one logit below it, by rule")
                model.info.setdefault("warnings", []).append(note)
                print(f"imageorigin: warning: {note}", file=sys.stderr)
        # Other operating points, for a moderator who wants fewer false accusations.
        model.info["thresholds_at_fpr"] = {str(f): max(cuts[f].values()) for f in (0.01, 0.02, 0.05, 0.1)}
    # bf16 doubles CPU speed, but only some models give the fp32 answers in it.
    images = stack_images([image for _, x, _, _ in batches(
        ImageDataset([p for p, _ in folder.samples[:256]], model.transform),
        cfg.batch_size) if x is not None for image in x])
    check = check_precision(model, images)
    model.inference_precision = check["precision"]
    model.info["precision_check"] = check


def _resaved_humans(model: Classifier, folder: LabelledFolder, cfg: TrainConfig,
                    progress: bool) -> dict[str, np.ndarray]:
    """p_ai (N,) of the folder's human images after each everyday re-save
    (:data:`imageorigin.evaluate.RESAVES`, "original" left out).  An image a
    re-save leaves under :func:`imageorigin.verdict.least_side` is left out of
    that one: the small-image caveat makes its verdict uncertain whatever it scores."""
    humans = [p for p, y in folder.samples if y == model.human_index]
    least = least_side(model.preprocessing)
    dev = next(model.parameters()).device
    out = {}
    model.eval()
    for name, change in tqdm(list(RESAVES.items())[1:], desc="re-saved calibration humans",
                             disable=not progress, leave=False):
        def resaved(image, change=change):
            image = change(image)
            return None if min(image.size) < least else model.transform(image)  # None: left out

        p = []
        with torch.no_grad():
            for _, images, _, _ in batches(ImageDataset(humans, resaved), cfg.batch_size, cfg.num_workers):
                if images is not None:
                    images = [x.to(dev) for x in images] if isinstance(images, list) else images.to(dev)
                    p.append(model.scores(model(images))[1])
        out[name] = torch.cat(p).numpy() if p else np.zeros(0)
    return out


def _sources(folder: LabelledFolder, manifest) -> dict:
    """Per source of the training data: class, image count, licence (from the manifest)."""
    rows = match_manifest([p for p, _ in folder.samples], read_manifest(manifest, ("path", "source")))
    out: dict[str, dict] = {}
    for (_, y), row in zip(folder.samples, rows):
        name = "unknown" if row is None else row["source"]
        entry = out.setdefault(name, {"label": folder.classes[y], "n": 0,
                                      "licence": (row or {}).get("licence") or "not stated"})
        entry["n"] += 1
    return out


# Below these counts a figure means little; training warns and the card says so.
MIN_TRAIN_PER_CLASS = 50
MIN_VAL_IMAGES = 100
MIN_VAL_PER_CLASS = 20
MIN_CALIBRATION_HUMAN = 100  # the 1% cut needs at least 100 human images to exist at all
MIN_CALIBRATION_AI = 20


def _data_warnings(model: Classifier, cfg: TrainConfig, train_set: LabelledFolder,
                   val_set: LabelledFolder, calib_set: LabelledFolder | None) -> list[str]:
    """Sentences naming each part of the data too small for its figures to mean much."""
    notes = []
    if model.human_label is None:
        notes.append(f"no class is named {cfg.human_class!r} (classes: {', '.join(model.labels)}): "
                     "this model gives class probabilities only, no p_ai, threshold or verdict; "
                     "name the class of human-made images with --human-class NAME")
    small = {k: v for k, v in train_set.counts().items() if v < MIN_TRAIN_PER_CLASS}
    if small:
        notes.append("few training images in " + ", ".join(f"{k} ({v})" for k, v in small.items())
                     + f": under {MIN_TRAIN_PER_CLASS} a class is barely learnt")
    val_counts = val_set.counts()
    if len(val_set.samples) < MIN_VAL_IMAGES or min(val_counts.values(), default=0) < MIN_VAL_PER_CLASS:
        notes.append(f"the validation set is small ({', '.join(f'{k} {v}' for k, v in val_counts.items())}): "
                     f"its accuracy can be off by {_margin(len(val_set.samples)):.0%} or more either way")
    if calib_set is not None and model.human_label is not None:
        c = calib_set.counts()
        humans = c.get(model.human_label, 0)
        if humans < max(MIN_CALIBRATION_HUMAN, 1 / cfg.target_fpr):
            notes.append(f"the threshold is fitted on only {humans} human images: a "
                         f"{cfg.target_fpr:.0%} false-flag rate cannot be measured on fewer than "
                         f"{int(max(MIN_CALIBRATION_HUMAN, 1 / cfg.target_fpr))}")
        ai = sum(v for k, v in c.items() if k != model.human_label)
        if ai < MIN_CALIBRATION_AI:
            notes.append(f"the verdict bands are fitted on only {ai} AI images")
    return notes


def _margin(n: int) -> float:
    """Half-width of a 95% interval for an accuracy near 0.5 measured on n images."""
    return 1.96 * (0.25 / max(n, 1)) ** 0.5


def _info(cfg, train_set, val_set, val_given, calib_set, history, best, skipped, cache_stats,
          notes) -> dict:
    roots = sorted({str(Path(p).parent.parent) for p, _ in train_set.samples})
    return {
        "training": {
            **asdict(cfg),
            "recipe": ("fine-tuned backbone" if cfg.finetune else "frozen backbone (eval mode)")
            + ("" if cache_stats is None else f", head trained on {cfg.views} cached augmented views")
            + f", linear head, {'AdamW' if cfg.weight_decay else 'Adam'}, cross-entropy",
            "data_dir": ", ".join(roots),
            "val_dir": ", ".join(sorted({str(Path(p).parent.parent) for p, _ in val_set.samples})),
            "val_split": None if val_given else f"stratified {cfg.val_fraction:.0%}, seed {cfg.seed}",
            "train_counts": train_set.counts(),
            "val_counts": val_set.counts(),
            "calibration_counts": None if calib_set is None else calib_set.counts(),
            "skipped_files": skipped,
            "feature_cache": cache_stats,
            "wall_seconds": history[-1]["seconds"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        "metrics": {
            "epochs": history[-1]["epoch"],
            "best_epoch": best["epoch"],
            "train_loss": best["train_loss"],
            "train_accuracy": best["train_accuracy"],
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
        },
        "warnings": notes,
    }
