"""The real dataset copies in ../shared (skipped only where that folder is absent)."""
import json

import pytest

from tests.conftest import SHARED


@pytest.mark.skipif(not (SHARED / "mnist.npz").exists(), reason="../shared/datasets/mnist.npz is absent")
def test_mnist_chain_on_the_shared_copy(repo):
    repo.set_params(**{"data.mnist.source": "npz", "data.mnist.path": str(SHARED / "mnist.npz"),
                       "data.mnist.sha256": "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
                       "data.mnist.limit": 3000, "train.mnist.epochs": 1})
    repo.dvc("repro", "tsne@mnist")
    data = json.loads((repo.root / "metrics/data_mnist.json").read_text())
    assert data["n_train"] == 3000 and data["n_val"] == 3000
    assert abs(data["mean"][0] - 0.1307) < 0.01  # MNIST's well-known pixel mean
    metrics = json.loads((repo.root / "metrics/mnist.json").read_text())
    assert metrics["n_params"] == 813_802
    assert metrics["best_val_acc"] > 0.75  # chance is 0.10; 1 epoch on 3,000 images gives ~0.85


@pytest.mark.skipif(not (SHARED / "alien-vs-predator.zip").exists(),
                    reason="../shared/datasets/alien-vs-predator.zip is absent")
def test_avp_data_on_the_shared_copy(repo, tmp_path):
    """use_local + the committed manifest: all 894 files verified, the five PNGs named .jpg
    decoded, the two train/validation duplicate pairs reported."""
    repo.stage("use_local", str(SHARED), check=True)
    repo.set_params(**{"data.avp.manifest": "manifests/avp.sha256"})
    assert repo.params["data"]["avp"]["subdir"] is None
    repo.dvc("repro", "preprocess@avp")
    data = json.loads((repo.root / "metrics/data_avp.json").read_text())
    assert data["n_train"] == 694 and data["n_val"] == 200
    assert sorted(data["duplicate_pairs"]) == [["train/predator/199.jpg", "validation/predator/1.jpg"],
                                               ["train/predator/247.jpg", "validation/predator/58.jpg"]]
    regenerated = tmp_path / "avp.sha256"
    repo.stage("manifest", str(SHARED / "alien-vs-predator.zip"), str(regenerated), check=True)
    assert regenerated.read_text() == (repo.root / "manifests/avp.sha256").read_text()
