"""A latent-diffusion generator's autoencoder: a real image in, its AI twin out.

Nearly every image generator in use today (Stable Diffusion, SDXL, SD3, FLUX,
Sana, ...) draws its picture through a convolutional decoder that upsamples a
latent grid 8x.  Passing a real image through such an autoencoder (encode,
decode, no denoising) gives a picture with the same content, size and framing
whose pixels carry that decoder's trace: the pseudo-fakes of
:mod:`imageorigin.pseudofakes` ("Aligned Datasets", Rajan et al., ICLR 2025).

This loads the tiny autoencoders of the TAESD family (madebyollin/taesd, MIT:
``taesd_*`` for SD 1.x/2.x, ``taesdxl_*``, ``taesd3_*``, ``taef1_*``, ``taef2_*``)
from a folder holding ``*_encoder.pth`` and ``*_decoder.pth`` (or
``.safetensors``): plain tensors, read without running pickled code.  The
layers are built from the key names, so any sibling drops in (4 or 16 or 32
latent channels, with or without the pooled channel mixers of TAEF2).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones import load_state_dict_file


class AutoencoderError(ValueError):
    """An autoencoder folder or file cannot be used; the message names it."""


class _Block(nn.Module):
    """Three 3x3 convolutions with ReLU between them, added to the input, then ReLU.
    ``pooled``: the input first gets a channel mixer whose GroupNorm normalises
    over the whole image added to it (TAEF2's deepest blocks)."""

    def __init__(self, c: int, pooled: bool):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                  nn.Conv2d(4 * c, c, 1, bias=False)) if pooled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> same
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _Clamp(nn.Module):
    """The decoder's soft clamp of the latent: tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _build(state: dict, decoder: bool, name: str) -> nn.Sequential:
    """The nn.Sequential a TAESD-family state dict describes (index = key prefix).

    A block has ``i.conv.0.weight``; a convolution ``i.weight`` (3x3 or 1x1 by
    its shape).  In the encoder a convolution without bias downsamples (stride
    2).  In the decoder index 0 is the soft clamp, and an index without weights
    is a ReLU after the first convolution, else a nearest 2x upsample.
    """
    indices = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    if not indices or len(indices) != len({k.split(".")[0] for k in state}):
        raise AutoencoderError(f"{name}: not a TAESD-family state dict (keys like '0.weight', '1.conv.0.weight')")
    layers: list[nn.Module] = []
    for i in range(indices[-1] + 1):
        if f"{i}.conv.0.weight" in state:
            layers.append(_Block(state[f"{i}.conv.0.weight"].shape[0], f"{i}.pool.0.weight" in state))
        elif f"{i}.weight" in state:
            out_c, in_c, k, _ = state[f"{i}.weight"].shape
            bias = f"{i}.bias" in state
            stride = 2 if not decoder and not bias else 1
            layers.append(nn.Conv2d(in_c, out_c, k, stride=stride, padding=k // 2, bias=bias))
        elif decoder and i == 0:
            layers.append(_Clamp())
        elif decoder and isinstance(layers[-1], nn.Conv2d) and len(layers) == 2:
            layers.append(nn.ReLU())
        elif decoder:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        else:
            raise AutoencoderError(f"{name}: encoder layer {i} has no weights")
    net = nn.Sequential(*layers)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AutoencoderError(f"{name}: weights do not fit the TAESD layout "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval()


def _read_state(path: Path) -> dict:
    """Plain tensors from a .safetensors or .pth file; a .pth is read by
    :func:`imageorigin.backbones.load_state_dict_file` (``weights_only=True``),
    so a file holding code is refused, never run."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return load_state_dict_file(path)
    except Exception as err:  # BackboneWeightsError, safetensors errors, OSError ...
        raise AutoencoderError(f"{path}: not a plain tensor file ({type(err).__name__}: {err})") from None


class Autoencoder(nn.Module):
    """Encoder and decoder of one latent space; ``reconstruct`` gives a real image's AI twin."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential, name: str, digest: str):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.name = name  # e.g. "taef2"
        self.digest = digest  # SHA-256 of both weight files: names the twins in the cache
        self.factor = 2 ** sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in encoder)  # 8

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1], H and W multiples of ``factor`` -> the same, reconstructed."""
        return self.decoder(self.encoder(x)).clamp(0, 1)

    def reconstruct(self, image: Image.Image) -> Image.Image:
        """The image encoded and decoded: same size and mode RGB.  Sides that are
        not multiples of 8 are padded by reflection and cropped back."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.factor, -w % self.factor
        if pad_h or pad_w:
            # reflection needs the pad to be shorter than the side; tiny images repeat their edge
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        y = self(x)[0, :, :h, :w]  # (3, H, W)
        out = (y.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB")


def load_autoencoder(folder: str | os.PathLike) -> Autoencoder:
    """The autoencoder in ``folder``: one ``*encoder*`` and one ``*decoder*`` weight
    file (.pth or .safetensors), as the TAESD family publishes them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AutoencoderError(f"{folder}: not a folder (give the folder holding the encoder and decoder files)")
    found = {}
    for part in ("encoder", "decoder"):
        files = sorted(p for p in folder.iterdir() if part in p.name and p.suffix in (".pth", ".safetensors"))
        if len(files) != 1:
            raise AutoencoderError(f"{folder}: expected one *{part}*.pth or .safetensors file, found "
                                   f"{[p.name for p in files] or 'none'}")
        found[part] = files[0]
    digest = hashlib.sha256()
    for path in found.values():
        digest.update(path.read_bytes())
    encoder = _build(_read_state(found["encoder"]), False, str(found["encoder"]))
    decoder = _build(_read_state(found["decoder"]), True, str(found["decoder"]))
    name = found["encoder"].name.split("_encoder")[0].split("encoder")[0].strip("_-.") or folder.name
    return Autoencoder(encoder, decoder, name, digest.hexdigest()[:16])
