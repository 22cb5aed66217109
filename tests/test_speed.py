"""The fast paths give the answers of the plain ones: engines, full-size
decoding, ONNX export, and the feature cache with its invalidation.

Timings are not tested here; benchmarks/speed.py measures them.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import imageorigin
from imageorigin import engine as engine_module
from imageorigin import features
from imageorigin.backbones import build_backbone
from imageorigin.cli import main
from imageorigin.data import eval_transform, tile_detail, train_transform
from imageorigin.engine import cached_engine, check_precision, create_engine
from imageorigin.images import decode_image, find_images

AGREEMENT = {"same_label": 0.995, "max_prob_diff": 0.02}  # the speed issue's targets


@pytest.fixture(scope="module")
def default():
    return imageorigin.load("default")


@pytest.fixture(scope="module")
def val_images(bench):
    """48 native/val files, 16 per class."""
    return [f for c in ("dalle", "human", "other_ai")
            for f in sorted((bench / "native/val" / c).iterdir())[:16]]


def _reference_probs(model, files):
    """The plain path: full-size decode, eager fp32 PyTorch forward."""
    x = torch.stack([model.transform(decode_image(f)) for f in files])
    with torch.no_grad():
        return model.scores(model(x))[0]


def _probs(preds, labels):
    return torch.tensor([[p.probs[l] for l in labels] for p in preds])


def test_predict_agrees_with_the_fp32_reference(default, val_images):
    ref = _reference_probs(default, val_images)
    fast = _probs(imageorigin.predict(default, val_images), default.labels)
    assert (fast.argmax(1) == ref.argmax(1)).float().mean() >= AGREEMENT["same_label"]
    assert (fast - ref).abs().max() <= AGREEMENT["max_prob_diff"]


@pytest.mark.parametrize("engine", ["openvino", "torch"])
def test_each_engine_in_fp32_matches_pytorch(default, val_images, engine):
    x = torch.stack([default.transform(decode_image(f)) for f in val_images[:16]])
    with torch.no_grad():
        ref = default(x)
    run = create_engine(default, engine, precision="fp32", input_size=x.shape[-1])
    assert run.name == engine and run.precision == "fp32"
    # (16, 9, 3, 96, 96) crops in, (16, 9, 3) per-crop logits out, pooled as the model pools
    assert run(x).shape == (16, 9, 3)
    assert torch.allclose(default.image_logits(run, x)[0], ref, atol=1e-3)
    # the batch dimension is free: a batch of one gives the same row
    assert torch.allclose(default.image_logits(run, x[:1])[0], ref[:1], atol=1e-3)


@pytest.fixture(params=["this machine", "a CPU without bf16"])
def cpu(request, monkeypatch):
    """Each precision test runs twice: on this machine as it is, and with its bf16
    taken away (engine.host_bf16 answers False, so every engine asked for bf16
    compiles fp32), so the no-bf16 branch is tested on every host.  Yields
    whether bf16 can run."""
    if request.param == "a CPU without bf16":
        monkeypatch.setattr(engine_module, "host_bf16", lambda: False)
    return engine_module.host_bf16()


NO_BF16 = {"outcome": "this CPU has no bf16"}


def test_asking_for_bf16_where_it_cannot_run_gives_an_engine_that_says_fp32(default, val_images, cpu):
    x = torch.stack([default.transform(decode_image(f)) for f in val_images[:4]])
    run = create_engine(default, "openvino", precision="bf16", input_size=x.shape[-1])
    # read back from the compiled graph: bf16 only where the hardware runs it
    assert run.precision == ("bf16" if cpu else "fp32")
    if not cpu:  # then it is the fp32 engine, answers included
        ref = create_engine(default, "openvino", precision="fp32", input_size=x.shape[-1])
        assert torch.equal(run(x), ref(x))


def test_default_model_is_kept_in_fp32_because_int8_and_bf16_change_its_answers(default, val_images, cpu):
    # int8 and bf16 round away the pixel-level traces the fine-tuned model reads
    x = torch.stack([default.transform(decode_image(f)) for f in val_images])
    check = check_precision(default, x)
    assert check["precision"] == "fp32" and check["images"] == len(val_images)
    assert check["int8"]["passed"] is False and check["int8"]["max_prob_diff"] > 0.01
    assert check["int8"]["same_label"] < 0.995 and check["int8"]["quantise_seconds"] >= 0
    assert check["outcome"].startswith("fp32: int8 changed the answers (same label on ")
    if cpu:
        assert check["bf16"]["passed"] is False and check["bf16"]["max_prob_diff"] > 0.01
        assert "; bf16 changed the answers (same label on " in check["outcome"]
    else:  # nothing to compare, and it says so rather than comparing fp32 with fp32
        assert check["bf16"] == NO_BF16 and check["outcome"].endswith("; bf16 not tried: this CPU has no bf16")
    assert default.inference_precision == "fp32"
    assert str(cached_engine(default, "auto", default.inference_precision,
                             default.preprocessing["crop"])) == "openvino fp32"
    # the shipped checkpoint stores this outcome, so predict never quantises it on a user's batch
    stored = imageorigin.load("default").info["precision_check"]
    assert stored["precision"] == "fp32" and stored["int8"]["passed"] is False


def test_a_check_stored_before_int8_still_reads_in_words_and_is_made_again():
    # an older checkpoint's check: bf16 alone, its figures at the top level, no words kept
    old = {"precision": "bf16", "images": 32, "same_label": 1.0, "max_prob_diff": 0.003, "host_bf16": True}
    assert engine_module.check_outcome(old) == \
        "bf16: same label on 100.0% of 32 images, probabilities within 0.0030 of fp32"
    assert engine_module.check_outcome({**old, "precision": "fp32", "same_label": 0.9}) == \
        "fp32: bf16 changed the answers (same label on 90.0% of 32 images, probabilities off by up to 0.0030)"
    assert engine_module.needs_check(old)  # it says nothing of int8: predict checks it again


def test_a_model_that_is_insensitive_to_reduced_precision_runs_in_int8(val_images, cpu):
    model = imageorigin.Classifier(build_backbone("mobilenet_v2"), ["dalle", "human", "other_ai"])
    torch.nn.init.zeros_(model.head.weight)  # every image scores the bias alone, in any precision
    x = torch.stack([model.transform(decode_image(f)) for f in val_images[:16]])
    check = check_precision(model.eval(), x)
    same = {"same_label": 1.0, "same_band": 1.0, "max_prob_diff": 0.0, "passed": True}
    assert check["precision"] == "int8" and check["images"] == 16
    assert {k: check["int8"][k] for k in same} == same
    assert check["bf16"] == (same if cpu else NO_BF16)
    # calibrated on every other image, compared on the 8 others
    assert check["int8"]["images"] == 8
    assert check["outcome"].startswith("int8: same label on 100.0% of 8 images, same verdict on 100.0%, "
                                       "probabilities within 0.0000 of fp32; bf16 ")
    # quantised once, on those images, and kept: the engine now runs int8 without them
    run = cached_engine(model, "auto", "int8", model.preprocessing["crop"])
    assert str(run) == "openvino int8"
    assert run(x).shape == (16, 3)


def test_a_checkpoint_that_chose_int8_elsewhere_is_quantised_and_checked_again_on_its_first_batch(
        val_images, tmp_path, monkeypatch, capsys):
    from imageorigin.cli import main

    model = imageorigin.Classifier(build_backbone("mobilenet_v2"), ["dalle", "human", "other_ai"]).eval()
    torch.nn.init.zeros_(model.head.weight)  # insensitive to precision: int8 passes its check
    x = torch.stack([model.transform(decode_image(f)) for f in val_images[:16]])
    model.info["precision_check"] = check_precision(model, x)
    model.inference_precision = model.info["precision_check"]["precision"]
    assert model.inference_precision == "int8"
    path = imageorigin.save(model, tmp_path / "int8.safetensors")
    monkeypatch.setenv("IMAGEORIGIN_CACHE", str(tmp_path / "cache"))  # another machine: nothing cached
    engine_module._ENGINES.clear()
    assert main(["info", str(path)]) == 0
    assert "int8 is not quantised on this machine yet: predict does it on its first batch" in capsys.readouterr().out
    assert main(["predict", "--model", str(path), *map(str, val_images[:20]), "--format", "csv",
                 "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "precision int8: same label on 100.0% of 10 images" in err  # the 10 it was not calibrated on
    assert "(checked on the first 20 images given to predict; int8 calibration took " in err
    assert "once: its engine is cached); ran on openvino int8" in err
    assert main(["info", str(path)]) == 0  # now from the cache: it runs int8 here
    assert "runs in    openvino int8 on this machine" in capsys.readouterr().out
    engine_module._ENGINES.clear()


def test_int8_quantises_on_the_first_batch_when_forced_and_is_cached_by_digest(default, val_images, tmp_path,
                                                                                monkeypatch, capsys):
    from imageorigin.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("IMAGEORIGIN_CACHE", str(cache))  # a machine that never ran this model
    engine_module._ENGINES.clear()
    out = tmp_path / "p.csv"
    assert main(["predict", "--precision", "int8", *map(str, val_images[:8]), "--format", "csv",
                 "--out", str(out)]) == 0
    # quantised by NNCF on these images' tiles, beside the converted fp32 model, named by its digest
    [fp32_ir] = [p for p in (cache / "openvino").glob("*.xml") if "-int8-" not in p.name]
    [int8_ir] = (cache / "openvino").glob("*-int8-*.xml")
    assert int8_ir.name.startswith(fp32_ir.stem) and int8_ir.with_suffix(".bin").stat().st_size > 0
    # forced, not checked, and it says what ran (the first engine line came before int8 existed)
    assert "precision int8 forced, not checked; ran on openvino int8" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1 + 8
    before = int8_ir.stat().st_mtime_ns
    engine_module._ENGINES.clear()  # a later run: the cached int8 engine, no calibration
    run = cached_engine(default, "auto", "int8", default.preprocessing["crop"])
    assert str(run) == "openvino int8" and int8_ir.stat().st_mtime_ns == before
    engine_module._ENGINES.clear()


def test_a_jpeg_and_a_lossless_png_of_its_pixels_get_the_same_answer_from_a_resizing_model(raw, tmp_path):
    # A user's fine-tuned model said "human" for a 1024 px .jpg and "dalle" for
    # a .png of the same pixels: large JPEGs were decoded at reduced size.  Now
    # every model sees full-size pixels, so the file's container cannot matter.
    torch.manual_seed(0)
    model = imageorigin.Classifier(build_backbone("mobilenet_v2"), ["dalle", "human", "other_ai"]).eval()
    assert model.preprocessing["resize"] == 224  # the seed's resizing preprocessing
    big = raw / "dalle/eudoxia0_gallery_of_sand__dalle2__timon__pollock__6.jpg"
    assert decode_image(big).size == (1024, 1024)
    png = tmp_path / "same_pixels.png"
    decode_image(big).save(png)
    jpg_pred, png_pred = imageorigin.predict(model, [big, png])
    assert jpg_pred.probs == pytest.approx(png_pred.probs, abs=1e-6)


def test_native_crop_models_decode_at_full_size(default, raw):
    big = raw / "dalle/eudoxia0_gallery_of_sand__dalle2__timon__pollock__6.jpg"
    [p] = imageorigin.predict(default, [big])
    ref = _reference_probs(default, [big])[0]
    assert torch.allclose(torch.tensor([p.probs[l] for l in default.labels]), ref, atol=1e-4)


def test_onnx_export_matches_pytorch_in_onnx_runtime(default, val_images, tmp_path):
    path = tmp_path / "default.onnx"
    assert main(["export", "default", str(path)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["labels"]) == default.labels
    assert json.loads(meta["preprocessing"]) == default.preprocessing
    assert json.loads(meta["threshold"]) == pytest.approx(default.threshold)
    assert json.loads(meta["imageorigin"])["temperature"] == pytest.approx(default.temperature)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for files in (val_images[:5], val_images[:1]):  # two batch sizes: the batch is dynamic
        x = torch.stack([default.transform(decode_image(f)) for f in files])  # (B, 9, 3, 96, 96)
        with torch.no_grad():
            ref = default(x)  # (B, 3): the weighted mean logit of each image's crops
        # The graph scores crops: an image's 9 crops are rows of the batch, and
        # the mean of their logits, weighted by each crop's detail, is the
        # image's (as export.py documents).
        logits, _ = session.run(["logits", "probs"], {"image": x.flatten(0, 1).numpy()})
        votes = tile_detail(x.flatten(0, 1), default.preprocessing).view(len(files), 9, 1).numpy()
        pooled = (logits.reshape(len(files), 9, -1) * votes).sum(1) / votes.sum(1)
        np.testing.assert_allclose(pooled, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(default.scores(torch.from_numpy(pooled))[0].numpy(),
                                   default.scores(ref)[0].numpy(), atol=1e-5)


def test_an_exported_model_checked_where_bf16_could_not_run_is_checked_again_where_it_can(
        default, val_images, tmp_path, monkeypatch, capsys):
    # trained on a CPU without bf16, exported, used on one that has it (said to have it here)
    no_bf16 = {"precision": "fp32", "images": 48, "int8": {"same_label": 0.4, "same_band": 0.4,
               "max_prob_diff": 0.99, "passed": False}, "bf16": NO_BF16, "host_bf16": False}
    stored, default.info["precision_check"] = default.info["precision_check"], no_bf16
    try:
        path = imageorigin.export_onnx(default, tmp_path / "model.onnx")
    finally:
        default.info["precision_check"] = stored
    monkeypatch.setattr(engine_module, "host_bf16", lambda: True)
    assert main(["info", str(path)]) == 0
    assert "not checked on this machine yet (checked where bf16 could not run)" in capsys.readouterr().out
    assert main(["predict", "--model", str(path), *map(str, val_images[:20]), "--format", "csv",
                 "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    # checked on the first batch; int8 is not tried on an exported file, and where the
    # CPU really has no bf16 the engine says so
    assert "checked on the first 20 images given to predict" in err
    assert "int8 not tried: an exported ONNX model runs as exported" in err


def test_export_refuses_an_unknown_format(tmp_path, capsys):
    assert main(["export", "default", str(tmp_path / "model.bin")]) == 2
    assert ".onnx" in capsys.readouterr().err


# ---------------------------------------------------------------- feature cache


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("mobilenet_v2").eval()


def _extract(backbone, files, pre, names, root, augment=None, **kw):
    engine = create_engine(backbone, input_size=pre["crop"])
    transform = eval_transform(pre) if augment is None else train_transform(pre, augment)
    return features.extract(files, engine, transform, names,
                            features.context_dir(backbone, pre, engine, root), **{"num_workers": 0, **kw})


def test_feature_cache_hits_and_is_invalidated_by_file_and_preprocessing(backbone, small_folder,
                                                                         tmp_path, default):
    folder = small_folder(2)
    files = sorted(find_images([folder]))
    pre = dict(default.preprocessing, resize=224, crop=224)
    augment = {"flip": True, "rotation": 15.0, "color_jitter": 0.2}
    names = features.view_names(2, augment, seed=0)
    root = tmp_path / "cache"

    first = _extract(backbone, files, pre, names, root, augment)
    assert (first.cached, first.computed) == (0, 2 * len(files))
    again = _extract(backbone, files, pre, names, root, augment)
    assert (again.cached, again.computed) == (2 * len(files), 0)
    assert torch.equal(again.features, first.features)
    # two augmented views of an image differ; each is the same view when recomputed,
    # even by concurrent decoding threads in other batches
    assert not torch.allclose(first.features[0], first.features[1])
    fresh = _extract(backbone, files, pre, names, tmp_path / "elsewhere", augment,
                     num_workers=3, batch_size=1)
    assert torch.allclose(fresh.features, first.features, atol=1e-5)

    # an edited file misses the cache; the others still hit
    edited = files[0]
    Image.open(edited).convert("RGB").rotate(90).save(edited, "JPEG")
    after_edit = _extract(backbone, files, pre, names, root, augment)
    assert (after_edit.cached, after_edit.computed) == (2 * (len(files) - 1), 2)
    assert not torch.allclose(after_edit.features[:, 0], first.features[:, 0])

    # other preprocessing, other cache entries
    other = _extract(backbone, files, dict(pre, resize=256), names, root, augment)
    assert (other.cached, other.computed) == (0, 2 * len(files))


def test_feature_cache_reports_unreadable_files_and_goes_on(backbone, small_folder, tmp_path, default):
    folder = small_folder(1)
    bad = folder / "human" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    files = sorted(find_images([folder]))
    views = _extract(backbone, files, dict(default.preprocessing, resize=224, crop=224), ["eval"],
                     tmp_path / "cache")
    assert views.ok.tolist() == [f != bad for f in files]
    assert len(views.errors) == 1 and "broken.jpg" in views.errors[0]


def test_cached_training_records_views_and_second_run_computes_nothing(small_folder, tmp_path):
    data = small_folder(8)
    args = ["train", str(data), "--backbone", "mobilenet_v2", "--epochs", "2", "--views", "3",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    runs = [imageorigin.load(tmp_path / r / "model.safetensors").info["training"] for r in "ab"]
    assert runs[0]["views"] == 3 and runs[0]["feature_cache"]["views"] == 3
    assert runs[0]["feature_cache"]["vectors_computed"] > 0
    assert runs[1]["feature_cache"]["vectors_computed"] == 0
    assert runs[1]["feature_cache"]["vectors_cached"] == runs[0]["feature_cache"]["vectors_computed"]
    assert "3 cached augmented views" in runs[0]["recipe"]
    same = [json.loads((tmp_path / r / "history.json").read_text())[-1]["val_accuracy"] for r in "ab"]
    assert same[0] == same[1]


def test_no_cache_runs_the_straightforward_loop(small_folder, tmp_path):
    data = small_folder(8)
    assert main(["train", str(data), "--backbone", "mobilenet_v2", "--epochs", "2", "--no-cache",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    info = imageorigin.load(tmp_path / "run" / "model.safetensors").info["training"]
    assert info["feature_cache"] is None and info["recipe"].startswith("frozen backbone")
    assert "cached" not in info["recipe"]
    assert not (tmp_path / "cache").exists()
    shutil.rmtree(tmp_path / "run")
