"""train@mnist under torchrun with two CPU ranks (gloo), against the single-process run."""
import json
import os
from pathlib import Path

import psutil
import pytest
import torch

from imgcls.params import TrainParams
from tests.conftest import write_npz

OUTPUTS = ("data/models/mnist.pt", "metrics/mnist.json")
# Imported by every Python process on PYTHONPATH; makes rank 1 of a torchrun launch fail in fit().
FAIL_RANK_1 = '''import os
if os.environ.get("RANK") == "1":
    import imgcls.training

    def fit(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")

    imgcls.training.fit = fit
'''


def processes_in(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if Path(proc.cwd()) == root:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def test_two_cpu_ranks_match_one_process(repo, tmp_path):
    # Learnable toy data, enough steps (30 global batches of 32) for both runs to converge.
    data = write_npz(tmp_path / "mnist.npz", n_train=960, n_test=400)
    repo.set_params(**{"data.mnist.path": str(data), "train.mnist.batch_size": 32, "train.mnist.device": "cpu",
                       "train.mnist.nproc": 2})
    repo.commit("two ranks")
    assert "train@mnist" in repo.stages_run("repro", "train@mnist")
    assert repo.stage_log.read_text().split().count("train@mnist") == 3  # the launcher and its two ranks
    distributed = json.loads((repo.root / "metrics/mnist.json").read_text())
    assert distributed["epochs"] == 1
    checkpoint = torch.load(repo.root / "data/models/mnist.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])
    assert all(torch.isfinite(value.float()).all() for value in checkpoint["state_dict"].values())
    assert (repo.root / "plots/mnist/live/plots/metrics/val/acc.tsv").exists()
    embedded = repo.stage("embed", "mnist")  # single process, weights as written
    assert embedded.returncode == 0, embedded.stderr

    repo.set_params(**{"train.mnist.nproc": 1})
    single = repo.stage("train", "mnist")
    assert single.returncode == 0, single.stderr
    single = json.loads((repo.root / "metrics/mnist.json").read_text())
    assert single["best_val_acc"] > 0.9, single
    assert abs(distributed["best_val_acc"] - single["best_val_acc"]) <= 0.01, (distributed, single)

    # A rank that fails: one clear error, no outputs, no process left behind.
    for name in OUTPUTS:
        (repo.root / name).unlink()
    repo.set_params(**{"train.mnist.nproc": 2})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_RANK_1)
    repo.env["PYTHONPATH"] = f"{hook}{os.pathsep}{repo.root}"
    failed = repo.stage("train", "mnist")
    assert failed.returncode == 2
    assert "error: train@mnist: rank 1 of 2 failed" in failed.stderr, failed.stderr
    assert not any((repo.root / name).exists() for name in OUTPUTS)
    assert processes_in(repo.root) == []


@pytest.mark.parametrize("change, message", [
    ({"nproc": 3, "batch_size": 128}, "split evenly over nproc x nnodes = 3"),
    ({"nnodes": 2}, "needs rdzv_endpoint"),
    ({"nproc": 2, "method": "linear_svm", "model": {"name": "resnet18"}}, "runs in one process"),
])
def test_distributed_params_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        TrainParams(**{"data": "mnist", "model": {"name": "simple_cnn"}, "epochs": 1, **change})
