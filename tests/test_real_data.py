"""The real dataset copies in ../shared, through the committed params and the offline route
(IMGCLS_DATASETS), skipped only where that folder is absent."""
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, SHARED

COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


def offline(repo, study: str, **overrides) -> None:
    """The study exactly as committed (found by copy_sha256 in the shared folder), plus overrides."""
    repo.env["IMGCLS_DATASETS"] = str(SHARED)
    repo.set_params(**{f"data.{study}": COMMITTED["data"][study]})
    repo.set_params(**overrides)


@pytest.mark.skipif(not (SHARED / "mnist.npz").exists(), reason="../shared/datasets/mnist.npz is absent")
def test_mnist_chain_on_the_shared_copy(repo):
    offline(repo, "mnist", **{"data.mnist.limit": 3000, "train.mnist.epochs": 1})
    repo.dvc("repro", "tsne@mnist")
    data = json.loads((repo.root / "data/prepared/mnist.json").read_text())
    assert data["n_train"] == 3000 and data["n_val"] == 3000
    assert abs(data["mean"][0] - 0.1307) < 0.01  # MNIST's well-known pixel mean
    metrics = json.loads((repo.root / "metrics/mnist.json").read_text())
    assert metrics["n_params"] == 813_802
    assert metrics["best_val_acc"] > 0.75  # chance is 0.10; 1 epoch on 3,000 images gives ~0.85


@pytest.mark.skipif(not (SHARED / "alien-vs-predator.zip").exists(),
                    reason="../shared/datasets/alien-vs-predator.zip is absent")
def test_avp_data_on_the_shared_copy(repo, tmp_path):
    """The committed manifest: all 894 files verified, the five PNGs named .jpg decoded, the two
    train/validation duplicate pairs reported; the manifest tool regenerates the same manifest."""
    offline(repo, "avp")
    repo.dvc("repro", "preprocess@avp")
    data = json.loads((repo.root / "data/prepared/avp.json").read_text())
    assert data["n_train"] == 694 and data["n_val"] == 200
    assert sorted(data["duplicate_pairs"]) == [["train/predator/199.jpg", "validation/predator/1.jpg"],
                                               ["train/predator/247.jpg", "validation/predator/58.jpg"]]
    regenerated = tmp_path / "avp.sha256"
    subprocess.run([sys.executable, "-m", "tools.manifest", str(SHARED / "alien-vs-predator.zip"), str(regenerated)],
                   cwd=ROOT, check=True, capture_output=True)
    assert regenerated.read_text() == (ROOT / "manifests/avp.sha256").read_text()
