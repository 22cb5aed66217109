"""Checkpoints: the seed's .pth and its variants, our safetensors format, export."""

import shutil

import pytest
import torch
import torchvision
from safetensors import safe_open

import imageorigin
from imageorigin.model import CheckpointError, SEED_LABELS


@pytest.fixture(scope="module")
def seed_net():
    """A torchvision DenseNet121 with the seed's Linear(1024, 3) head, random weights."""
    torch.manual_seed(1)
    net = torchvision.models.densenet121(weights=None)
    net.classifier = torch.nn.Linear(1024, 3)
    # random BatchNorm statistics, so a wrong mapping of any buffer shows up
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def images(raw):
    return [
        raw / "dalle/eudoxia0_gallery_of_sand__dalle2__timon__pollock__6.jpg",
        raw / "human/debian_wesnoth_art__human_painting_portrait_rgba__portrait__monsters__gryphon.png",
        raw / "other_ai/dcsan_imagen__latent_diffusion__woman-coffeeshop-working-her-laptop-53010207__ldif-9.png",
    ]


def _reference(net, model, paths):
    """torchvision's own forward pass on the checkpoint's preprocessing of each file
    (decoded as predict decodes it)."""
    x = torch.stack([model.transform(imageorigin.decode_image(p)) for p in paths])
    with torch.no_grad():
        return torch.softmax(net(x), 1)


def _probs(preds, labels):
    return torch.tensor([[p.probs[l] for l in labels] for p in preds])


def test_seed_file_matches_torchvision_forward(seed_net, images, tmp_path):
    path = tmp_path / "densenet_finetuned_dense.pth"
    torch.save(seed_net.state_dict(), path)
    model = imageorigin.load(path)
    assert model.labels == SEED_LABELS and model.backbone.name == "densenet121"
    preds = list(imageorigin.predict(model, images))
    ref = _reference(seed_net, model, images)
    # predict runs OpenVINO in fp32 here: its kernels round differently from
    # PyTorch's by ~1e-5, far inside the 0.02 agreement target.
    assert torch.allclose(_probs(preds, model.labels), ref, atol=1e-4)

    # save in our format, load again, same answers
    imageorigin.save(model, tmp_path / "seed.safetensors")
    again = imageorigin.load(tmp_path / "seed.safetensors")
    assert again.describe()["backbone"]["weights"] == "checkpoint"
    assert torch.allclose(_probs(imageorigin.predict(again, images), again.labels), ref, atol=1e-4)

    # export back to the seed's layout: torchvision loads it strictly
    imageorigin.export_seed(again, tmp_path / "exported.pth")
    net = torchvision.models.densenet121(weights=None)
    net.classifier = torch.nn.Linear(1024, 3)
    net.load_state_dict(torch.load(tmp_path / "exported.pth", weights_only=True), strict=True)
    assert torch.allclose(_reference(net.eval(), again, images), ref, atol=1e-4)


def _legacy(state):
    # keys as saved by torchvision < 0.3: denselayer1.norm.1.weight
    out = {}
    for k, v in state.items():
        for part in ("norm1", "norm2", "relu1", "relu2", "conv1", "conv2"):
            k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[k] = v
    return out


@pytest.mark.parametrize(
    "variant",
    [
        lambda s: {f"module.{k}": v for k, v in s.items()},  # DataParallel
        _legacy,
        lambda s: {"epoch": 15, "state_dict": s},
        lambda s: {"model_state_dict": {f"module.{k}": v for k, v in s.items()}, "loss": 0.0552},
    ],
    ids=["dataparallel", "legacy-keys", "wrapped", "wrapped-dataparallel"],
)
def test_seed_variants_load(seed_net, images, tmp_path, variant):
    state = variant(seed_net.state_dict())
    if variant is _legacy:
        assert any(".norm.1." in k for k in state)
    torch.save(state, tmp_path / "v.pth")
    model = imageorigin.load(tmp_path / "v.pth")
    ref = _reference(seed_net, model, images[:1])
    assert torch.allclose(_probs(imageorigin.predict(model, images[:1]), model.labels), ref, atol=1e-4)


@pytest.mark.parametrize("cls", [0, 1, 2])
def test_seed_class_order_is_honoured(seed_net, images, tmp_path, cls):
    state = seed_net.state_dict()
    state["classifier.weight"] = torch.zeros(3, 1024)
    bias = torch.zeros(3)
    bias[cls] = 10.0
    state["classifier.bias"] = bias
    torch.save(state, tmp_path / "biased.pth")
    preds = list(imageorigin.predict(imageorigin.load(tmp_path / "biased.pth"), images))
    assert {p.label for p in preds} == {SEED_LABELS[cls]}
    if SEED_LABELS[cls] == "human":
        assert all(p.p_ai < 0.01 for p in preds)
    else:
        assert all(p.p_ai > 0.99 for p in preds)


class Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"classifier.weight": torch.zeros(3, 1024), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        imageorigin.load(path)
    assert "would have run code" not in capsys.readouterr().out


def test_not_a_model_file(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth"):
        imageorigin.load(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError, match="no such model file"):
        imageorigin.load(tmp_path / "missing.safetensors")
    torch.save({"fc.weight": torch.zeros(3, 512)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a seed-format DenseNet121"):
        imageorigin.load(tmp_path / "resnet.pth")


def test_default_model_is_self_describing():
    model = imageorigin.load("default")
    meta = model.describe()
    assert meta["labels"] == ["dalle", "human", "other_ai"]
    # fine-tuned MobileNetV2: its backbone weights travel in the checkpoint
    assert meta["backbone"] == {"name": "mobilenet_v2", "weights": "checkpoint",
                                "source": "stored in this checkpoint"}
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    # native resolution: 96 px tiles covering the whole image, never resized, flat tiles not voting
    assert meta["preprocessing"]["crop"] == 96 and meta["preprocessing"]["resize"] is None
    assert meta["preprocessing"]["crops"] == "cover" and meta["preprocessing"]["pool"] == "detail_mean_logit"
    assert meta["preprocessing"]["max_crops"] == 256
    t = meta["info"]["training"]
    assert t["finetune"] and t["epochs"] == 5 and t["native"]
    # calibrated on held-out training data; sources and licences come from the manifest
    assert 0 < meta["threshold"] < 1 and 0 < meta["temperature"] < 20
    assert meta["info"]["calibration"]["target_fpr"] == 0.01
    sources = meta["info"]["sources"]
    assert sources["bsds500/real_photo"]["licence"] == "research dataset"
    # both views of the training split of both data sets
    assert sum(s["n"] for s in sources.values()) == 2 * (1370 + 2069)
    with safe_open(str(imageorigin.model.default_model_path()), "pt") as f:
        keys = list(f.keys())
    assert {"head.weight", "head.bias"} <= set(keys) and len(keys) > 300


@pytest.mark.parametrize("no_bf16", [False, True], ids=["this machine", "a CPU without bf16"])
def test_a_seed_file_is_checked_on_the_first_batch_of_the_users_images(seed_net, tmp_path, bench, capsys,
                                                                       monkeypatch, no_bf16):
    """A seed .pth has no stored precision check: predict checks int8 (quantised on
    these images) and bf16 against fp32 on the first batch of the images it is
    given, keeps the outcome, and says so.  Where bf16 cannot run (this
    machine's CPU, or one taken away from it here) it says that, in words."""
    from imageorigin import engine
    from imageorigin.cli import main
    from imageorigin.predict import current_engine
    from imageorigin.runtime import cache_dir

    if no_bf16:
        monkeypatch.setattr(engine, "host_bf16", lambda: False)
    shutil.rmtree(cache_dir() / "precision", ignore_errors=True)  # the other case's remembered check
    path = tmp_path / "densenet_finetuned_dense.pth"
    torch.save(seed_net.state_dict(), path)
    files = sorted((bench / "native/val/human").glob("*.jpg"))[:40]
    model = imageorigin.load(path)
    fast = list(imageorigin.predict(model, files))
    check = model.info["precision_check"]
    assert check["precision"] == model.inference_precision
    assert check["checked_on"] == "the first 32 images given to predict" and check["images"] == 32
    assert check["host_bf16"] is engine.host_bf16()
    assert {"same_label", "same_band", "max_prob_diff", "passed", "quantise_seconds"} <= set(check["int8"])
    for tried in ("int8", "bf16"):  # what passed is within the margins; the faster one is chosen
        if check[tried].get("passed"):
            assert check[tried]["same_label"] >= 0.995 and check[tried]["max_prob_diff"] <= 0.01
    assert check["precision"] == next((p for p in ("int8", "bf16") if check[p].get("passed")), "fp32")
    if not engine.host_bf16():
        assert check["bf16"] == {"outcome": "this CPU has no bf16"}
        assert check["outcome"].endswith("; bf16 not tried: this CPU has no bf16")
    ran = current_engine(model)
    assert ran.precision == check["precision"]  # what is stored is what runs
    ref = list(imageorigin.predict(imageorigin.load(path), files, precision="fp32"))
    same = sum(a.label == b.label for a, b in zip(fast, ref)) / len(ref)
    diff = (_probs(fast, model.labels) - _probs(ref, model.labels)).abs().max().item()
    assert same >= 0.95 and diff <= 0.02  # the agreement target, on images past the checked batch too

    # a later run on the same checkpoint uses the remembered check: it neither checks again
    # (the remembered file is not rewritten) nor claims a precision that did not run
    [remembered] = (cache_dir() / "precision").glob("*.json")
    before = remembered.stat().st_mtime_ns
    assert main(["predict", "--model", str(path), *map(str, files[:20]), "--format", "csv", "--out",
                 str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert remembered.stat().st_mtime_ns == before
    assert f"precision {check['precision']}: " in err and "checked on the first 32 images" in err
    assert f"ran on openvino {check['precision']}" in err
    assert main(["info", str(path)]) == 0  # says what runs here, from the remembered check
    out = capsys.readouterr().out
    assert f"runs in    openvino {check['precision']} on this machine" in out
    assert f"precision  {check['outcome']}" in out