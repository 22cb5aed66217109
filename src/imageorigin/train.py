"""Training: the seed's recipe (frozen backbone, linear head) and full fine-tuning.

``train()`` writes into a run folder: ``model.safetensors`` (rewritten after every
epoch, atomically), ``history.json``, ``loss.png``, ``accuracy.png``,
``collage.png``, ``val/`` (the final model's evaluation) and ``MODEL_CARD.md``.

After training, a temperature and an AI-vs-human threshold are fitted on a
calibration split held out of the training data, so that neither is chosen on
the validation data the card reports.

The parts: :mod:`imageorigin.train_config` (settings), :mod:`imageorigin.train_state`
(resume), :mod:`imageorigin.train_calibrate` (calibration and precision check),
:mod:`imageorigin.train_info` (sources, warnings, info).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import backbones, features, report
from .autoencoder import load_autoencoder
from .data import (
    ImageDataset,
    LabelledFolder,
    default_preprocessing,
    loader,
    scan_folders,
    stratified_split,
    train_transform,
)
from .engine import create_engine
from .evaluate import evaluate
from .fileio import write_json
from .model import Classifier, save
from .model import load as load_model
from .pseudofakes import licence_of, pair_accuracy, training_pairs
from .runtime import device
from .train_calibrate import calibrate, head_on, logit_fn
from .train_config import TrainConfig
from .train_info import data_warnings, run_info, training_sources
from .train_state import RESUME_FILE, save_state, restore_state, read_state

Folders = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], LabelledFolder]


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
    notes = data_warnings(model, cfg, train_set, val_set, calib_set)
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
        val_logits = logit_fn(model, val_set, cfg, progress) if lead else None
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
        history, best, best_state, skipped = restore_state(out / RESUME_FILE, cfg, model, optimizer, scheduler,
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
            model.info = run_info(cfg, train_set, val_set, val is not None, calib_set, history, best,
                               sorted(skipped), features.stats if cached else None, notes)
            # Saved atomically whenever validation improves: an interrupted run
            # keeps its best full epoch so far.
            save(model, out / "model.safetensors")
        write_json(out / "history.json", history)
        save_state(out / RESUME_FILE, cfg, data, val, manifest, model, optimizer, scheduler, generator,
                    history, best, best_state, skipped)

    if world > 1:
        dist.destroy_process_group()
        if not lead:
            return model
    if best_state is not None:  # the kept epoch, not the last one
        model.load_state_dict(best_state)
        model.info = run_info(cfg, train_set, val_set, val is not None, calib_set, history, best,
                           sorted(skipped), features.stats if cached else None, notes)

    model.info["training"]["processes"] = world
    if manifest is not None:
        model.info["sources"] = training_sources(pool, manifest)
    if calib_set is not None:
        calibrate(model, calib_set, cfg, progress, features.head_logits if cached else None)
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


def resume(run_dir: str | os.PathLike, progress: bool = True, ddp: int = 1) -> Classifier:
    """Continue the run in ``run_dir`` from its last completed epoch, with the
    data and settings it was started with."""
    meta, _ = read_state(Path(run_dir) / RESUME_FILE, tensors=False)
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
        return head_on(self.model, feats[0].to(dev), y.to(dev))


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
