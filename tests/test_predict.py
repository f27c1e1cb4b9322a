"""Applying trained runs: the predict command against embed's predictions, the serving export
against the checkpoint, bad input as one line, and a registry entry per run."""
import csv
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, Repo

RUNS = ("mnist", "avp_finetune")  # greyscale at its native size, RGB resized on the way in


@pytest.fixture(scope="module")
def applied(reproduced, tmp_path_factory) -> Repo:
    """A copy of the reproduced tiny pipeline (exports write beside the weights)."""
    return reproduced.copy(tmp_path_factory.mktemp("applied") / "repo")


def write_validation_images(repo: Repo, run: str, folder) -> list[str]:
    """The run's prepared validation images as lossless PNG files, in their order."""
    study = repo.params["train"][run]["data"]
    with np.load(repo.root / f"data/prepared/{study}.npz") as arrays:
        images = arrays["x_val"].transpose(0, 2, 3, 1)
    folder.mkdir(parents=True)
    names = []
    for i, image in enumerate(images):
        names.append(str(folder / f"{i:05d}.png"))
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(names[-1])
    return names


@pytest.mark.parametrize("run", RUNS)
def test_predicting_the_validation_images_reproduces_embed(applied, tmp_path, run):
    files = write_validation_images(applied, run, tmp_path / "images")
    table = tmp_path / "predictions.csv"
    result = applied.run(sys.executable, "-m", "imgcls.predict", run, str(tmp_path / "images"), "--csv", str(table))
    with np.load(applied.root / f"data/embeddings/{run}.npz") as embedded:
        expected = [str(embedded["classes"][p]) for p in embedded["predictions"]]
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["file"] for row in rows] == files
    assert [row["predicted"] for row in rows] == expected
    assert len(result.stdout.splitlines()) == len(files)
    probabilities = np.array([[float(row[c]) for c in rows[0] if c not in ("file", "predicted", "probability")]
                              for row in rows])
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (("nosuchrun", "x.png"), "unknown run 'nosuchrun'"),
    (("mnist", "missing.png"), "missing.png: no such file or folder"),
    (("mnist", "broken.png"), "broken.png: not a readable image"),
    (("cifar10_aug", "ok.png"), "data/models/cifar10_aug.pt not found; run train@cifar10_aug first"),
])
def test_bad_input_to_predict_is_one_line_naming_it(applied, tmp_path, args, message):
    (tmp_path / "broken.png").write_bytes(b"<html>not an image</html>")
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(tmp_path / "ok.png")
    weights = applied.root / "data/models/cifar10_aug.pt"
    hidden = weights.with_suffix(".hidden")
    weights.rename(hidden)
    try:
        result = applied.run(sys.executable, "-m", "imgcls.predict", args[0],
                             *(str(tmp_path / name) for name in args[1:]), check=False)
    finally:
        hidden.rename(weights)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_export_matches_the_checkpoint_on_the_validation_set(applied):
    assert applied.status() == {}
    applied.run(sys.executable, "-m", "imgcls.export", "avp_finetune")
    assert applied.status() == {}  # an export is no pipeline output: the report's data/models dep is unchanged
    check = """
import sys, torch
from imgcls import paths
from imgcls.export import serving_module
from imgcls.files import load_npz
program = torch.export.load(paths.exported("avp_finetune")).module()
module, _ = serving_module("avp_finetune")
images = torch.from_numpy(load_npz(paths.prepared("avp"), "avp")["x_val"])
with torch.no_grad():
    exported, eager = program(images), module(images)
print(float((exported - eager).abs().max()), bool((exported.argmax(1) == eager.argmax(1)).all()), len(images))
"""
    difference, agree, count = applied.run(sys.executable, "-c", check).stdout.split()
    assert float(difference) <= 1e-4 and agree == "True" and int(count) > 0


def test_every_run_has_a_model_registry_entry():
    """DVC cannot derive `artifacts:` from params, so this keeps them in step."""
    runs = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("artifacts", {})
    assert set(artifacts) == set(runs)
    for run, entry in artifacts.items():
        assert entry["path"] == f"data/models/{run}.pt" and entry["type"] == "model"
        assert runs[run]["data"] in entry["labels"] and entry.get("desc")
