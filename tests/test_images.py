"""Decoding: every real-world image kind becomes RGB; every bad file raises ImageDecodeError."""


import numpy as np
import pytest
from PIL import Image

from imageorigin.images import ImageDecodeError, decode_image, find_images


@pytest.fixture(scope="module")
def photo(bench):
    # a real BSDS500 photograph from the bench
    path = sorted((bench / "native/val/human").glob("bsds500*"))[0]
    with Image.open(path) as im:
        return im.convert("RGB")


def test_every_raw_sample_decodes_to_rgb(raw_files):
    assert len(raw_files) == 15
    for f in raw_files:
        im = decode_image(f)
        assert im.mode == "RGB"
        with Image.open(f) as orig:
            assert im.size == orig.size


def test_palette_png_transparency_is_white_not_black(raw):
    f = raw / "human/debian_openclipart__human_clipart_rgba__animals__dragon_head_nicu_buculei_01.png"
    with Image.open(f) as orig:
        assert orig.mode == "P" and "transparency" in orig.info
        alpha = np.asarray(orig.convert("RGBA"))[..., 3]
    rgb = np.asarray(decode_image(f))
    assert (alpha == 0).any()
    assert (rgb[alpha == 0] == 255).all()


def test_rgba_png_composited_on_white(raw):
    f = raw / "human/debian_openclipart__human_clipart_rgba__animals__mammals__horses__cavallo_architetto_franc_03.png"
    with Image.open(f) as orig:
        rgba = np.asarray(orig.convert("RGBA"))
    rgb = np.asarray(decode_image(f))
    clear = rgba[..., 3] == 0
    opaque = rgba[..., 3] == 255
    assert clear.any() and opaque.any()
    assert (rgb[clear] == 255).all()
    assert (rgb[opaque] == rgba[opaque][:, :3]).all()


def test_exif_orientation_applied(photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    photo.save(path, quality=95, exif=exif.tobytes())
    im = decode_image(path)
    w, h = photo.size
    assert im.size == (h, w)
    expected = np.asarray(photo.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(im, dtype=float) - expected).mean() < 4


def test_grayscale_and_16_bit(photo, tmp_path):
    gray = np.asarray(photo.convert("L"))
    Image.fromarray(gray, "L").save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    for name in ("g8.png", "g16.png"):
        im = decode_image(tmp_path / name)
        arr = np.asarray(im).astype(int)
        assert im.mode == "RGB"
        assert np.abs(arr[..., 0] - gray).max() <= 1, name  # scaled, not clipped to white


def test_cmyk_jpeg(photo, tmp_path):
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    im = decode_image(tmp_path / "cmyk.jpg")
    assert im.mode == "RGB"
    assert np.abs(np.asarray(im, float) - np.asarray(photo, float)).mean() < 6


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 48), c) for c in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    im = decode_image(tmp_path / "anim.gif")
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 150 and b < 50


def test_webp_and_bytes(photo, tmp_path):
    photo.save(tmp_path / "p.webp", quality=90)
    im = decode_image(tmp_path / "p.webp")
    assert im.size == photo.size
    assert np.abs(np.asarray(im, float) - np.asarray(photo, float)).mean() < 6
    again = decode_image((tmp_path / "p.webp").read_bytes())
    assert np.array_equal(np.asarray(again), np.asarray(im))


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty.jpg", lambda src: b"", "empty file"),
        ("notes.jpg", lambda src: b"these are my notes, not a picture\n" * 20, "not a recognised image"),
        ("truncated.jpg", lambda src: src[: len(src) // 2], "truncated"),
        ("corrupt.png", lambda src: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "corrupt"),
    ],
)
def test_bad_files_raise_one_error_type_naming_the_file(raw, tmp_path, name, make, reason):
    src = (raw / "human/bsds500__real_photo__test_65084.jpg").read_bytes()
    path = tmp_path / name
    path.write_bytes(make(src))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path)
    assert str(path) in str(err.value)
    assert reason in str(err.value)


def test_decompression_bomb_refused(tmp_path):
    # 25000 x 25000 one-bit PNG: a few hundred KB on disk, 625 MP when decoded.
    path = tmp_path / "bomb.png"
    Image.new("1", (25000, 25000)).save(path, optimize=True)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: .*625000000 pixels"):
        decode_image(path)


def test_pixel_limit_is_configurable(raw, monkeypatch):
    f = raw / "other_ai/dcsan_imagen__latent_diffusion__woman-coffeeshop-working-her-laptop-53010207__ldif-9.png"
    monkeypatch.setenv("IMAGEORIGIN_MAX_PIXELS", "10000")
    with pytest.raises(ImageDecodeError, match="over the limit of 10000"):
        decode_image(f)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(tmp_path)


def test_find_images_recurses_and_keeps_named_files(raw, tmp_path):
    found = list(find_images([raw]))
    assert len(found) == 15 and all(p.suffix in (".jpg", ".png") for p in found)
    odd = tmp_path / "picture.dat"
    odd.write_bytes(b"x")
    assert list(find_images([odd])) == [odd]
