"""Aligned pseudo-fakes: a real generator's autoencoder (TAEF2, from ../shared),
twins coded as their real images, paired in training batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from safetensors.torch import save_file

import imageorigin
from conftest import SHARED
from imageorigin.autoencoder import AutoencoderError, load_autoencoder
from imageorigin.cli import main
from imageorigin.data import ImageDataset, loader, scan_folder, train_transform
from imageorigin.pseudofakes import make_twins, training_pairs

TAEF2 = SHARED / "decoders" / "taef2"


@pytest.fixture(scope="module")
def taef2():
    return load_autoencoder(TAEF2)


@pytest.fixture(scope="module")
def humans(bench):
    return sorted((bench / "native/train/human").glob("*.jpg"))[:3]


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 10 * np.log10(255 ** 2 / ((x - y) ** 2).mean())


def test_the_autoencoder_reconstructs_a_real_image_as_its_readme_says(taef2, humans, raw):
    assert (taef2.name, taef2.factor) == ("taef2", 8)
    image = imageorigin.decode_image(humans[1])
    twin = taef2.reconstruct(image)
    assert twin.size == image.size and twin.mode == "RGB"
    assert 20 < _psnr(image, twin) < 45  # a close copy, not the same pixels
    # sides that are not multiples of 8 are padded and cropped back
    odd = imageorigin.decode_image(raw / "human/bsds500__real_photo__test_65084.jpg")
    assert odd.size == (321, 481) and taef2.reconstruct(odd).size == (321, 481)


def test_a_sibling_autoencoder_drops_in_and_a_wrong_folder_is_named(tmp_path, humans):
    # an SD-style sibling: 4 latent channels, no pooled channel mixers, safetensors files
    enc = torch.load(TAEF2 / "taef2_encoder.pth", weights_only=True)
    dec = torch.load(TAEF2 / "taef2_decoder.pth", weights_only=True)
    enc = {k: v for k, v in enc.items() if ".pool." not in k}
    dec = {k: v for k, v in dec.items() if ".pool." not in k}
    enc["14.weight"], enc["14.bias"] = enc["14.weight"][:4].clone(), enc["14.bias"][:4].clone()
    dec["1.weight"] = dec["1.weight"][:, :4].clone()
    folder = tmp_path / "taesd_like"
    folder.mkdir()
    save_file(enc, folder / "taesd_encoder.safetensors")
    save_file(dec, folder / "taesd_decoder.safetensors")
    sibling = load_autoencoder(folder)
    assert sibling.name == "taesd" and sibling.encoder[14].out_channels == 4
    assert sibling.reconstruct(imageorigin.decode_image(humans[0])).size == (256, 256)

    with pytest.raises(AutoencoderError, match="nowhere"):
        load_autoencoder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AutoencoderError, match=r"empty: expected one \*encoder\*"):
        load_autoencoder(empty)
    # a .pth that holds code is refused, never run
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"0.weight": torch.zeros(1), "x": np.zeros(1)}, evil / "a_encoder.pth")
    torch.save(dec, evil / "a_decoder.pth")
    with pytest.raises(AutoencoderError, match="a_encoder.pth: not a plain tensor file"):
        load_autoencoder(evil)


def test_twins_are_coded_as_their_real_images_cached_and_bad_files_named(taef2, humans, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8not a jpeg")
    files = [humans[0], broken, humans[1]]
    cache = tmp_path / "cache"
    made = make_twins(files, taef2, codings=[None, None, "webp-roundtrip-q75"], cache=cache, progress=False)
    assert (made.computed, made.cached) == (2, 0) and made.twin[1] is None
    assert len(made.errors) == 1 and "broken.jpg" in made.errors[0]
    for real, twin in zip([humans[0], humans[1]], [made.twin[0], made.twin[2]]):
        with Image.open(real) as a, Image.open(twin) as b:
            # the same JPEG coding, read from the real file: its tables and chroma subsampling
            assert b.format == "JPEG" and b.size == a.size
            assert b.quantization == a.quantization
            assert JpegImagePlugin.get_sampling(b) == JpegImagePlugin.get_sampling(a)
    assert "webp-roundtrip-q75" in made.twin[2].name  # its WebP round trip is part of its name
    again = make_twins(files, taef2, codings=[None, None, "webp-roundtrip-q75"], cache=cache, progress=False)
    assert (again.computed, again.cached) == (0, 2) and again.twin == made.twin
    lossless = make_twins(files[:1], taef2, aligned=False, cache=cache, progress=False)
    assert Image.open(lossless.twin[0]).format == "PNG"


def test_camera_jpegs_lossless_webp_and_tiny_images_get_the_right_twin(taef2, humans, tmp_path):
    image = imageorigin.decode_image(humans[0])
    mpo = tmp_path / "camera.jpg"  # a multi-picture JPEG, as phones write them
    image.save(mpo, "MPO", save_all=True, append_images=[image.resize((64, 64))], quality=80)
    webp = tmp_path / "lossless.webp"
    image.save(webp, "WEBP", lossless=True)
    tiny = tmp_path / "tiny.png"
    image.resize((3, 20)).save(tiny)
    made = make_twins([mpo, webp, tiny], taef2, cache=tmp_path / "cache", progress=False)
    assert made.errors == []
    with Image.open(mpo) as real, Image.open(made.twin[0]) as twin:
        assert twin.format == "JPEG" and twin.quantization == real.quantization
    assert Image.open(made.twin[1]).format == "PNG"  # lossless in, lossless twin
    assert Image.open(made.twin[2]).size == (3, 20)


def test_a_twin_shares_its_real_images_batch_crop_flip_and_degradation(taef2, small_folder):
    folder = scan_folder(small_folder(4, view="native/train"))
    pairs = training_pairs(folder, taef2, human=1, label=2, progress=False)
    assert pairs["info"]["twins"] == 4 and pairs["info"]["real_ai_images"] == 8
    augment = {"flip": True, "downscale": 1.0, "blur": 0.5, "jpeg": 1.0, "random_crop": 0}
    pre = imageorigin.load().preprocessing  # native 96 px crops
    ds = ImageDataset(pairs["items"], train_transform(pre, augment), pairs["labels"])
    dl = loader(ds, batch_size=4, num_workers=0, seed=3, twin_of=pairs["twin_of"])
    for epoch in (1, 2):
        dl.batch_sampler.set_epoch(epoch)
        seen = 0
        for idx, images, labels, _ in dl:
            where = {i: j for j, i in enumerate(idx.tolist())}
            for twin, real in enumerate(pairs["twin_of"]):
                if real is None or twin not in where:
                    continue
                assert real in where, "a twin is always in its real image's batch"
                a, b = images[where[real]], images[where[twin]]
                assert labels[where[twin]] == 2 and labels[where[real]] == 1
                # the same crop of the same content: the two crops correlate (0.76-0.998 seen;
                # the decoder redraws fine texture), unlike the crop of any other image
                # in the batch
                corr = np.corrcoef(a.flatten(), b.flatten())[0, 1]
                others = [np.corrcoef(a.flatten(), images[j].flatten())[0, 1]
                          for j in range(len(idx)) if j not in (where[real], where[twin])]
                assert corr > 0.5 and corr > max(others, default=0) + 0.3  # other crops: about 0
                seen += 1
        assert seen == 4


def test_the_share_of_pseudo_fakes_among_the_ai_examples(taef2, small_folder):
    folder = scan_folder(small_folder(4, view="native/train"))  # 4 humans, 8 real AI images
    quarter = training_pairs(folder, taef2, human=1, label=2, share=0.25, progress=False)["info"]
    assert (quarter["twins"], quarter["real_ai_images"]) == (3, 8)  # 3 / 11 of the AI examples
    alone = training_pairs(folder, taef2, human=1, label=2, share=1.0, progress=False)
    assert (alone["info"]["twins"], alone["info"]["real_ai_images"]) == (4, 0)
    assert sorted(set(alone["labels"])) == [1, 2]
    with pytest.raises(ValueError, match="--pseudo-share 1.5"):
        training_pairs(folder, taef2, human=1, label=2, share=1.5, progress=False)


def test_training_with_pseudo_fakes_says_so_in_the_checkpoint_and_card(small_folder, tmp_path, capsys):
    data = small_folder(6, view="native/train")
    out = tmp_path / "run"
    base = ["train", str(data), "--backbone", "mobilenet_v2_s1", "--epochs", "1", "--native",
            "--image-size", "64", "--crops", "2", "--out", str(out), "--quiet", "--no-samples"]
    assert main(base + ["--pseudo-fakes", str(TAEF2)]) == 2  # the frozen recipe trains on cached features
    assert "--pseudo-fakes trains each image beside its twin in the image loop: add --finetune" \
        in capsys.readouterr().err
    assert main(base + ["--finetune", "--pseudo-fakes", str(TAEF2)]) == 0
    model = imageorigin.load(out / "model.safetensors")
    assert model.backbone.name == "mobilenet_v2_s1" and model.backbone.features[0][0].stride == (1, 1)
    pf = model.info["pseudo_fakes"]
    humans_trained = model.info["training"]["train_counts"]["human"]
    assert pf["twins"] == humans_trained and pf["autoencoder"] == "taef2" and pf["licence"] == "MIT License"
    assert pf["val_pairs"]["pairs"] == model.info["training"]["val_counts"]["human"]
    assert 0 <= pf["val_pairs"]["twin_scored_higher"] <= 1
    card = (out / "MODEL_CARD.md").read_text()
    assert f"**Pseudo-fakes**: {pf['twins']} twins of human training images, each through the taef2" in card
    assert "licence: MIT License" in card
    json.dumps(model.info)  # the checkpoint's metadata stays plain JSON
