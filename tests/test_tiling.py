"""The whole image is read: tiles cover it at native resolution, flat tiles do
not vote, the cost is bounded, and every tile is in the patch map."""

import numpy as np
import pytest
from PIL import Image

import imageorigin
from imageorigin.cli import main
from imageorigin.data import MAX_TILES, cover_boxes, crop_boxes, grid_boxes, stack_images, tile_detail
from imageorigin.images import decode_image, find_images


@pytest.fixture(scope="module")
def default():
    return imageorigin.load("default")


def _covered(boxes, w, h) -> np.ndarray:
    seen = np.zeros((h, w), int)
    for x, y, bw, bh in boxes:
        assert 0 <= x <= w - bw and 0 <= y <= h - bh
        seen[y:y + bh, x:x + bw] += 1
    return seen


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (1024, 768), (1536, 1024), (97, 1000)])
def test_tiles_cover_every_pixel_of_an_image_up_to_the_cap(size):
    w, h = size
    boxes = [(x, y, 96, 96) for x, y in cover_boxes(w, h, 96)]
    assert len(boxes) == -(-w // 96) * -(-h // 96) <= MAX_TILES
    assert (_covered(boxes, w, h) >= 1).all()


def test_a_256_px_image_gets_the_3x3_grid_and_a_huge_one_at_most_the_cap():
    assert cover_boxes(256, 256, 96) == grid_boxes(256, 256, 96, 3)
    big = cover_boxes(3680, 2456, 96)  # a DSLR frame: 39 x 26 tiles would be 1014
    assert len(big) <= MAX_TILES and big[0] == (0, 0) and big[-1] == (3680 - 96, 2456 - 96)


def test_detail_is_zero_for_flat_colour_and_high_for_a_photo(default, bench):
    pre = default.preprocessing
    flat = default.transform(Image.new("RGB", (96, 96), (40, 120, 200)))
    photo = default.transform(decode_image(sorted(find_images([bench / "native/val/human"]))[0]))
    flat = flat if flat.dim() == 4 else flat[None]
    assert tile_detail(flat, pre).tolist() == [0.0]
    assert tile_detail(photo, pre).mean() > 0.5


def test_the_default_covers_a_full_size_image_and_shows_every_tile(default, shared):
    # A DSLR frame, 2784x1856 px or larger: more tiles than the cap allows.
    path = next(p for p in find_images([shared / "dh3-full/human"]) if "original_real" in p.name)
    image = decode_image(path)
    [p] = imageorigin.predict(default, [path])
    assert default.preprocessing["crops"] == "cover"
    assert len(p.patches) == len(crop_boxes(*image.size, default.preprocessing)) > 9
    assert all(set(t) == {"box", "p_ai", "weight"} and 0 <= t["weight"] <= 1 for t in p.patches)
    # Spread corner to corner, at native resolution (96 px boxes in the image's pixels).
    assert p.patches[0]["box"] == [0, 0, 96, 96]
    assert p.patches[-1]["box"][:2] == [image.width - 96, image.height - 96]


def test_flat_background_does_not_dilute_the_verdict(default, bench, tmp_path):
    """A picture pasted on a wide flat canvas scores as the picture alone: the
    flat tiles around it do not vote."""
    photo = decode_image(sorted(find_images([bench / "native/val/dalle"]))[3]).crop((0, 0, 192, 192))
    canvas = Image.new("RGB", (480, 480), (235, 235, 235))
    canvas.paste(photo, (96, 96))  # exactly the 2x2 tiles (1..2, 1..2) of the canvas's 5x5
    photo.save(tmp_path / "alone.png")
    canvas.save(tmp_path / "on-canvas.png")
    alone, framed = imageorigin.predict(default, [tmp_path / "alone.png", tmp_path / "on-canvas.png"])
    assert len(alone.patches) == 4 and len(framed.patches) == 25
    assert sum(t["weight"] > 0 for t in framed.patches) == 4
    assert framed.p_ai == pytest.approx(alone.p_ai, abs=1e-4)


def test_a_batch_of_mixed_sizes_gives_each_image_its_own_answer(default, raw_files):
    files = raw_files[:8]
    sizes = {decode_image(f).size for f in files}
    assert len(sizes) > 1
    together = list(imageorigin.predict(default, files, batch_size=8))
    alone = [next(imageorigin.predict(default, [f], batch_size=1)) for f in files]
    for a, b in zip(together, alone):
        assert a.error is None and a.p_ai == pytest.approx(b.p_ai, abs=1e-4)
        assert len(a.patches) == len(b.patches)
    assert isinstance(stack_images([default.transform(decode_image(f)) for f in files]), list)


def test_a_covering_model_trains_on_images_of_several_sizes(bench, tmp_path):
    """Training, calibration and the precision check take batches whose images
    have different tile counts (frozen features and fine-tuning alike)."""
    data = tmp_path / "data"
    for c in ("dalle", "human", "other_ai"):
        (data / c).mkdir(parents=True)
        for i, f in enumerate(sorted((bench / "native/train" / c).iterdir())[:12]):
            side = (120, 200, 256)[i % 3]  # 2x2, 3x3 and 3x3 tiles of 96 px
            decode_image(f).crop((0, 0, side, 256 - i)).save(data / c / f"{f.stem}.png")
    for extra in ("--finetune", "--no-cache"):
        out = tmp_path / extra
        assert main(["train", str(data), "--out", str(out), "--backbone", "mobilenet_v2", extra,
                     "--native", "--crops", "cover", "--image-size", "96", "--epochs", "1",
                     "--val-fraction", "0.25", "--batch-size", "4", "--workers", "0", "--quiet"]) == 0
        model = imageorigin.load(out / "model.safetensors")
        assert model.preprocessing["crops"] == "cover" and model.preprocessing["pool"] == "detail_mean_logit"
        assert "tiles of 96 px covering the whole image" in (out / "MODEL_CARD.md").read_text()
