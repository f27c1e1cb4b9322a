"""The whole DAG under `dvc repro` in a throw-away copy of the repository, on tiny data."""
import json
import re
import shutil

import numpy as np
import pytest

from imgcls import params
from stages.report import seed_groups


def stages_that_would_run(repo) -> set[str]:
    output = repo.dvc("repro", "--dry").stdout
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_every_output_is_written(reproduced):
    root = reproduced.root
    runs = list(reproduced.params["train"])
    for study in reproduced.params["data"]:
        prepared = np.load(root / f"data/prepared/{study}.npz")
        assert prepared["x_train"].dtype == np.uint8 and prepared["x_train"].ndim == 4
        assert json.loads((root / f"metrics/data_{study}.json").read_text())["n_train"] == len(prepared["y_train"])
    for run in runs:
        metrics = json.loads((root / f"metrics/{run}.json").read_text())
        assert {"best_val_acc", "best_epoch", "final_val_loss", "n_params", "epochs", "train_seconds",
                "device"} <= set(metrics)
        assert 0.0 <= metrics["best_val_acc"] <= 1.0 and metrics["epochs"] == 1
        embedded = np.load(root / f"data/embeddings/{run}.npz")
        assert len(embedded["features"]) == len(embedded["labels"]) == len(embedded["logits"])
        assert (root / f"plots/{run}/live/plots/metrics/val/acc.tsv").exists()
        for figure in ("learning_curves.png", "confusion.png", "tsne.png"):
            assert (root / f"plots/{run}/{figure}").read_bytes()[:4] == b"\x89PNG"
        header = (root / f"plots/{run}/tsne.csv").read_text().splitlines()[0]
        assert header == "representation,x,y,class"
    report = (root / "report/report.md").read_text()
    assert "813,802" in report and "6,199,498" in report and "98.98%" in report
    for run in seed_groups(params.load(root / "params.yaml").train):  # seed replicas: in the seed table only
        assert f"../plots/{run}/tsne.png" in report


def test_unchanged_workspace_reruns_nothing(reproduced):
    assert "Data and pipelines are up to date" in reproduced.dvc("status").stdout
    assert stages_that_would_run(reproduced) == set()


def test_plots_render(reproduced, tmp_path):
    reproduced.dvc("plots", "show", "-o", str(tmp_path / "html"))
    assert "vega" in (tmp_path / "html" / "index.html").read_text()
    shown = json.loads(reproduced.dvc("plots", "show", "--json").stdout)["data"]
    assert {"mnist loss", "mnist accuracy", "plots/mnist/predictions.csv", "plots/mnist/tsne.png"} <= set(shown)
    tsne = shown["plots/mnist/tsne.csv"][0]["content"]
    assert tsne["encoding"]["color"]["field"] == "class" if "encoding" in tsne else \
        tsne["spec"]["encoding"]["color"]["field"] == "class"
    losses = shown["mnist loss"][0]["content"]["data"]["values"]
    assert {row["filename"] for row in losses} == {"train/loss.tsv", "val/loss.tsv"}


MNIST_CHAIN = {"train@mnist", "embed@mnist", "tsne@mnist", "report"}


@pytest.mark.parametrize("change, expected", [
    ({"train.mnist.epochs": 2}, lambda runs: MNIST_CHAIN),
    ({"train.mnist.model.dropout_fc": 0.3}, lambda runs: MNIST_CHAIN),
    ({"data.mnist.limit": 100}, lambda runs: {"preprocess@mnist", "report"} | {
        f"{stage}@{run}" for run, cfg in runs.items() if cfg["data"] == "mnist" for stage in ("train", "embed", "tsne")}),
    ({"tsne.perplexity": 6}, lambda runs: {f"tsne@{run}" for run in runs} | {"report"}),
])
def test_a_param_change_reruns_only_what_depends_on_it(reproduced, tmp_path, change, expected):
    repo = type(reproduced)(tmp_path / "copy")
    shutil.copytree(reproduced.root, repo.root, symlinks=True)
    repo.set_params(**change)
    output = repo.dvc("repro").stdout
    assert set(re.findall(r"Running stage '([^']+)'", output)) == expected(repo.params["train"])
    assert "Data and pipelines are up to date" in repo.dvc("status").stdout


def test_metrics_diff_shows_the_change(repo):
    repo.dvc("repro", "train@mnist")
    repo.commit("one epoch")
    repo.set_params(**{"train.mnist.epochs": 2})
    repo.dvc("repro", "train@mnist")
    diff = json.loads(repo.dvc("metrics", "diff", "--json").stdout)
    assert diff["metrics/mnist.json"]["epochs"] == {"old": 1, "new": 2, "diff": 1}
