"""A run in progress on disk: the resume checkpoint written after every epoch,
what it holds, and whether a run folder can be resumed with the settings given.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .data import (
    LabelledFolder,
)
from .fileio import atomic_path
from .train_config import TrainConfig

RESUME_FILE = "resume.safetensors"


def _paths(x) -> list[str] | None:
    if x is None or isinstance(x, LabelledFolder):
        return None
    return [str(p) for p in ([x] if isinstance(x, (str, os.PathLike)) else x)]


def save_state(path: Path, cfg: TrainConfig, data, val, manifest, model: nn.Module, optimizer, scheduler,
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


def read_state(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """A :func:`save_state` file's JSON and (with ``tensors``) its tensors."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: nothing to resume (no {RESUME_FILE}: no epoch was completed)")
    with safe_open(str(path), "pt") as f:
        return (json.loads(f.metadata()["imageorigin-resume"]),
                {k: f.get_tensor(k) for k in f.keys()} if tensors else {})


def can_resume(run_dir: str | os.PathLike, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds an interrupted run's state written with these settings."""
    path = Path(run_dir) / RESUME_FILE
    return path.is_file() and not changed_settings(read_state(path, tensors=False)[0]["config"], asdict(cfg))


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


def restore_state(path: Path, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, generator):
    """Load a :func:`save_state` into the run's objects; returns (history, best,
    best_state, skipped).  Refuses a state written with other settings."""
    meta, tensors = read_state(path)
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
