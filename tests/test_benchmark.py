"""benchmarks.train_speed on tiny data: both paths report throughput, and they are comparable."""
import numpy as np
import pytest
import torch

from benchmarks import train_speed
from tests.conftest import write_npz


@pytest.fixture
def tiny_studies(tmp_path):
    return {"mnist": write_npz(tmp_path / "mnist.npz", n_train=64, n_test=32, size=28, channels=1),
            "cifar10": write_npz(tmp_path / "cifar10.npz", n_train=64, n_test=32, size=32, channels=3)}


def test_benchmark_reports_both_paths_on_the_same_loss(tiny_studies, capsys):
    results = train_speed.main(["--mnist", str(tiny_studies["mnist"]), "--cifar10", str(tiny_studies["cifar10"]),
                                "--steps", "2", "--warmup", "1", "--batch-size", "16", "--repeats", "1",
                                "--embed-batches", "2", "--embed-batch-size", "16", "--device", "cpu"])
    assert set(results["studies"]) == {"mnist", "cifar10"}
    for study, r in results["studies"].items():
        assert r["train"]["project"] > 0 and r["train"]["seed"] > 0 and r["train"]["ratio"] > 0
        assert r["embed"]["project"] > 0 and r["embed"]["seed"] > 0
        assert len(r["matrix"]) == 4 and all(speed > 0 for speed in r["matrix"].values())
        project, seed = r["same_loss"]
        assert np.isfinite(project) and project == pytest.approx(seed, rel=1e-5, abs=0)
    printed = capsys.readouterr().out
    assert "| mnist | SimpleCNN |" in printed and "| cifar10 | AlexNet |" in printed and "load average" in printed


def test_loss_check_notices_a_different_input_pipeline(tiny_studies, monkeypatch):
    arrays = train_speed.load_arrays(tiny_studies["cifar10"])
    project, seed = train_speed.same_loss("cifar10", arrays, torch.device("cpu"))
    assert project == pytest.approx(seed, rel=1e-5, abs=0)
    original = train_speed.SeedStyleDataset.__getitem__
    monkeypatch.setattr(train_speed.SeedStyleDataset, "__getitem__",
                        lambda self, i: (original(self, i)[0].flip(2), int(self.targets[i])))  # mirrored images
    project, seed = train_speed.same_loss("cifar10", arrays, torch.device("cpu"))
    assert project != pytest.approx(seed, rel=1e-5, abs=0)
