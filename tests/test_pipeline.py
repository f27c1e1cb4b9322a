"""The whole DAG under `dvc repro` in a throw-away copy of the repository, on tiny data."""
import json
import shutil
import sys

import numpy as np
import pytest

from imgcls import params, paths
from stages.report import seed_groups

OUTCOMES = {"best_val_acc", "best_epoch", "final_val_acc", "final_val_loss", "n_params", "epochs"}
TIMING = {"train_seconds", "seconds_per_epoch", "train_images_per_second", "device", "precision"}


def rel(path) -> str:
    """A path of imgcls.paths relative to the repository, for the throw-away copies."""
    return str(path.relative_to(paths.ROOT))


def test_every_output_is_written(reproduced):
    root = reproduced.root
    runs = list(reproduced.params["train"])
    for study in reproduced.params["data"]:
        prepared = np.load(root / f"data/prepared/{study}.npz")
        assert prepared["x_train"].dtype == np.uint8 and prepared["x_train"].ndim == 4
        assert json.loads((root / rel(paths.data_summary(study))).read_text())["n_train"] == len(prepared["y_train"])
    for run in runs:
        metrics = json.loads((root / rel(paths.train_metrics(run))).read_text())
        assert set(metrics) == OUTCOMES  # outcomes only: no timing, no repeat of the last epoch's history
        assert TIMING <= set(json.loads((root / rel(paths.timing(run))).read_text()))
        curve = json.loads((root / rel(paths.learning_curve(run, "accuracy"))).read_text())
        validation = [row["accuracy"] for row in curve if row["split"] == "validation"]
        assert metrics["epochs"] == len(validation) == 1 and metrics["best_val_acc"] == max(validation)
        embedded = np.load(root / f"data/embeddings/{run}.npz")
        assert len(embedded["features"]) == len(embedded["labels"]) == len(embedded["logits"])
        assert (root / rel(paths.history(run)) / "val" / "acc.tsv").exists()
        for figure in (paths.learning_curves_png(run), paths.confusion_png(run), paths.tsne_png(run)):
            assert (root / rel(figure)).read_bytes()[:4] == b"\x89PNG"
        tsne = json.loads((root / rel(paths.tsne_points(run))).read_text())
        assert {"representation", "x", "y", "class", "label"} == set(tsne[0])
        evaluated = json.loads((root / rel(paths.eval_metrics(run))).read_text())
        assert evaluated["accuracy"] == pytest.approx(metrics["best_val_acc"])
    report = (root / "report/report.md").read_text()
    assert "813,802" in report and "6,199,498" in report and "98.98%" in report
    for run in seed_groups(params.load(root / "params.yaml").train):  # seed replicas: in the seed table only
        assert f"../{rel(paths.tsne_png(run))}" in report


def test_unchanged_workspace_reruns_nothing(reproduced):
    assert reproduced.status() == {}
    assert reproduced.stages_run("repro") == set()


MNIST_CHAIN = {"train@mnist", "embed@mnist", "tsne@mnist", "report"}


@pytest.mark.parametrize("change, expected", [
    ({"train.mnist.model.dropout_fc": 0.3}, lambda runs: MNIST_CHAIN),  # a nested key of one run
    ({"data.cifar10.limit": 40}, lambda runs: {"preprocess@cifar10", "report"} | {  # a study's data: all its runs
        f"{stage}@{run}" for run, cfg in runs.items() if cfg["data"] == "cifar10" for stage in ("train", "embed", "tsne")}),
    ({"tsne.perplexity": 6}, lambda runs: {f"tsne@{run}" for run in runs} | {"report"}),
])
def test_a_param_change_reruns_only_what_depends_on_it(reproduced, tmp_path, change, expected):
    repo = reproduced.copy(tmp_path / "copy")
    repo.set_params(**change)
    assert repo.stages_run("repro") == expected(repo.params["train"])
    assert repo.status() == {}


def test_metrics_diff_shows_the_change(two_epochs):
    diff = json.loads(two_epochs.dvc("metrics", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert diff["metrics/mnist.json"]["epochs"] == {"old": 1, "new": 2, "diff": 1}


def test_a_forced_rerun_with_the_same_seed_changes_no_metric(reproduced, tmp_path):
    """Issue 12: the metrics files hold outcomes only, so re-running identical work on the CPU
    leaves `dvc metrics diff` empty; the wall-clock timing (a plain output) may change."""
    repo = reproduced.copy(tmp_path / "copy")
    chain = ("train@mnist", "embed@mnist", "tsne@mnist")
    assert repo.stages_run("repro", "-f", "-s", *chain) == set(chain)
    assert json.loads(repo.dvc("metrics", "diff", "--json").stdout) == {}
    assert json.loads((repo.root / rel(paths.timing("mnist"))).read_text())["device"] == "cpu"


# Issue 14: train@mnist fails after its first epoch was logged, as a bad batch would stop it.
FAIL_IN_EPOCH_2 = """
import sys
import stages.train as train
from imgcls.errors import PipelineError


def fit(model, data, cfg, rt, seed, log_epoch, name):
    log_epoch({"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "epoch_seconds": 0.1})
    raise PipelineError(f"{name}: loss became non-finite in epoch 2")


train.fit = fit
train.main(sys.argv[1])
"""


@pytest.mark.parametrize("how", ["non-finite loss", "after an epoch was logged"])
def test_a_stopped_training_leaves_no_outputs(reproduced, tmp_path, how):
    repo = reproduced.copy(tmp_path / "copy")
    outputs = [paths.model("mnist"), paths.architecture("mnist"), paths.timing("mnist"), paths.train_metrics("mnist"),
               paths.live("mnist")]
    for path in map(lambda p: repo.root / rel(p), outputs):  # as `dvc repro` does before it runs the stage
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if how == "non-finite loss":
        repo.set_params(**{"train.mnist.lr": 1e12, "train.mnist.optimizer": "sgd"})
        result = repo.stage("train", "mnist")
    else:
        result = repo.run(sys.executable, "-c", FAIL_IN_EPOCH_2, "mnist", check=False)
    assert result.returncode == 2, result.stderr
    assert [rel(p) for p in outputs if (repo.root / rel(p)).exists()] == []
