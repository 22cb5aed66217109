"""Every setting of a training run (:class:`TrainConfig`); the defaults are the seed model card's.
"""

from __future__ import annotations

from dataclasses import dataclass


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
