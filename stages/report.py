"""Stage report: one Markdown report (report/report.md) reproducing the reference's tables and
figures for every run, next to the reference's own figures (reference.yaml).

Reads only files the earlier stages wrote (metrics and timing, architecture tables, the rows of
the DVCLive charts) and links their PNG figures; it imports no torch, so it is quick.
"""
import csv
import json
import os
import statistics
from collections import Counter

from imgcls import params, paths
from imgcls.errors import PipelineError, stage_main
from imgcls.files import save_text

FOLDED_LAYERS = 40  # architecture tables longer than this are folded in the report


def read_json(path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"report: {path} not found; run the earlier stages (dvc repro)") from None


def read_csv(path, delimiter: str = ",") -> list[dict]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh, delimiter=delimiter))
    except FileNotFoundError:
        raise PipelineError(f"report: {path} not found; run the earlier stages (dvc repro)") from None


def link(path) -> str:
    return os.path.relpath(path, paths.REPORT)


def pct(value) -> str:
    return f"{100 * value:.2f}%"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table. By hand: three lines, where tabulate would only pad the cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def history(run: str) -> list[dict]:
    """Per-epoch losses and accuracies, from the rows of the learning-curve charts."""
    epochs = {}
    for metric in paths.LEARNING_CURVES:
        for row in read_json(paths.learning_curve(run, metric)):
            epochs.setdefault(row["epoch"], {"epoch": row["epoch"]})[f"{row['split']}_{metric}"] = row[metric]
    return [epochs[epoch] for epoch in sorted(epochs)]


def confusions(run: str, top: int = 5) -> tuple[int, int, list[tuple[str, str, int]]]:
    cells = read_json(paths.confusion(run))
    wrong = Counter({(c["actual"], c["predicted"]): c["count"] for c in cells
                     if c["actual"] != c["predicted"] and c["count"]})
    return sum(c["count"] for c in cells), sum(wrong.values()), [(a, p, n) for (a, p), n in wrong.most_common(top)]


def method(cfg) -> str:
    """How a run learns, in words, for the comparison table."""
    if cfg.method == "linear_svm":
        return f"frozen features + linear SVM (C = {cfg.svm_c:g})"
    augmented = ", augmented" if cfg.augment.active else ""
    return f"{cfg.epochs} epochs {cfg.optimizer}, lr {cfg.lr:g}{augmented}"


def comparison_sections(all_params, references) -> list[str]:
    """Studies with several runs (the transfer-learning methods): one table next to the reference
    and the runs' t-SNE figures together (the reference's Figure 8)."""
    lines = []
    for study, data in all_params.data.items():
        runs = {run: cfg for run, cfg in all_params.train.items() if cfg.data == study}
        if len(runs) < 2:
            continue
        rows = []
        for run, cfg in runs.items():
            metrics, tsne = read_json(paths.train_metrics(run)), read_json(paths.tsne_metrics(run))
            reference = references.get(run)
            weights = getattr(cfg.model, "pretrained", None)
            size = cfg.input_size or data.image_size
            rows.append([run, cfg.model.name + {True: " (ImageNet)", False: " (random init)", None: ""}[weights],
                         method(cfg), f"{size} px" if size else "native", pct(metrics["best_val_acc"]),
                         pct(reference.best_val_acc) if reference else "–", pct(tsne["svm_2d_acc_features"]),
                         pct(tsne["svm_2d_acc_logits"]), f"{read_json(paths.timing(run))['train_seconds']:.0f} s"])
        lines += [f"## {study}: methods compared", ""]
        lines += table(["run", "model", "method", "input", "best validation acc", "reference", "t-SNE 2-D SVM: features",
                        "t-SNE 2-D SVM: logits", "train time"], rows)
        lines += ["", "t-SNE of each run's validation representations (the features that enter the classifier, "
                  "and the logits) with the line of a linear SVM fitted on the 2-D points; the columns above give "
                  "that SVM's accuracy on the projection:", ""]
        lines += [f"![{run} t-SNE]({link(paths.tsne_png(run))})" for run in runs] + [""]
    return lines


def seed_groups(train: dict) -> dict[str, list[str]]:
    """Runs whose configs differ only by `seed`, keyed by the first of them (params order).
    The others are replicas: they appear in the summary and the seed table, not as sections."""
    groups = {}
    for run, cfg in train.items():
        groups.setdefault(cfg.model_dump_json(exclude={"seed"}), []).append(run)
    return {runs[0]: runs for runs in groups.values()}


def mean_std(values: list[float], percent: bool = True) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}{unit}"


def seed_section(all_params, groups: dict[str, list[str]]) -> list[str]:
    """Mean ± sample standard deviation over the runs that repeat a config with other seeds."""
    rows = []
    for head, runs in groups.items():
        if len(runs) < 2:
            continue
        metrics = [read_json(paths.train_metrics(run)) for run in runs]
        seeds = [params.run_seed(all_params, run) for run in runs]
        rows.append([head, len(runs), ", ".join(map(str, seeds)),
                     mean_std([m["best_val_acc"] for m in metrics]), mean_std([m["final_val_acc"] for m in metrics]),
                     mean_std([m["best_epoch"] for m in metrics], percent=False),
                     ", ".join(pct(m["best_val_acc"]) for m in metrics)])
    if not rows:
        return []
    return ["## Variation over random seeds", "",
            "Runs whose parameters differ only by `seed` (weight initialisation, batch order, dropout): mean ± "
            "sample standard deviation. Two single runs closer than this spread cannot be told apart from seed noise.",
            ""] + table(["run", "runs", "random seeds", "best validation acc", "final validation acc",
                         "epoch of best", "best validation acc per seed"], rows) + [""]


def run_section(run: str, cfg, reference) -> list[str]:
    metrics, timing = read_json(paths.train_metrics(run)), read_json(paths.timing(run))
    tsne = read_json(paths.tsne_metrics(run))
    total, errors, pairs = confusions(run)
    arch = read_csv(paths.architecture(run))
    lines = [f"## {run}: {cfg.model.name} on {cfg.data}", ""]
    lines += ["### Architecture", ""]
    layers = table(["layer", "output shape", "trainable params"],
                   [[r["layer"], r["output_shape"], f"{int(r['params']):,}"] for r in arch])
    if len(arch) > FOLDED_LAYERS:  # an ImageNet backbone: hundreds of rows, folded
        layers = [f"<details><summary>{len(arch)} layers</summary>", "", *layers, "", "</details>"]
    lines += layers
    lines += ["", f"Total trainable parameters: **{metrics['n_params']:,}**.", ""]
    lines += ["### Learning curves and accuracy", "", f"![learning curves]({link(paths.learning_curves_png(run))})", ""]
    ours = [pct(metrics["best_val_acc"]), metrics["best_epoch"], metrics["epochs"], errors]
    rows = [["this pipeline", *ours]]
    if reference is not None:
        rows.append(["reference", pct(reference.best_val_acc), reference.best_epoch or "–", "", reference.errors or "–"])
    lines += table(["", "best validation accuracy", "epoch of best", "epochs", "validation errors"], rows)
    if reference is not None and reference.note:
        lines += ["", reference.note]
    lines += ["", f"Trained on {timing['device']} ({timing['precision']}) in {timing['train_seconds']:.0f} s "
                  f"({timing['seconds_per_epoch']:.1f} s per epoch, {timing['train_images_per_second']:,.0f} "
                  "training images/s).", ""]
    epochs = history(run)
    lines += table(["epoch", "train loss", "validation loss", "train acc", "validation acc"],
                   [[e["epoch"], f"{e['train_loss']:.4f}", f"{e['validation_loss']:.4f}", pct(e["train_accuracy"]),
                     pct(e["validation_accuracy"])] for e in epochs])
    lines += ["", "### Confusion matrix", "", f"![confusion matrix]({link(paths.confusion_png(run))})", "",
              f"{errors} errors out of {total} validation images (best-epoch weights). Most confused pairs:", ""]
    lines += table(["true class", "predicted as", "count"], [list(pair) for pair in pairs])
    lines += ["", "### t-SNE", "", f"![t-SNE]({link(paths.tsne_png(run))})", "",
              f"{tsne['points']} validation points. A linear SVM on the 2-D projection classifies "
              f"{pct(tsne['svm_2d_acc_features'])} (intermediate) and {pct(tsne['svm_2d_acc_logits'])} (final) "
              "of them correctly.", ""]
    return lines


def data_section(all_params) -> list[str]:
    rows = []
    for study in all_params.data:
        info = read_json(paths.data_summary(study))
        rows.append([study, all_params.data[study].source, info["n_train"], info["n_val"],
                     "x".join(map(str, info["image_shape"])), info["mean"], info["std"],
                     info["duplicates_across_splits"]])
    return ["## Data", ""] + table(["study", "source", "train", "validation", "image (CxHxW)", "mean", "std",
                                    "identical train/validation images"], rows) + [""]


@stage_main
def main() -> None:
    all_params = params.load()
    references = params.load_reference()
    lines = ["# Reproduction report", "",
             "Generated by `dvc repro` (stage `report`) from the pipeline's own outputs; the reference is the "
             "practical's report (reference.yaml). Accuracies are on the validation split (the official "
             "test split), best epoch's weights.", ""]
    summary = []
    for run, cfg in all_params.train.items():
        metrics = read_json(paths.train_metrics(run))
        reference = references.get(run)
        summary.append([run, pct(metrics["best_val_acc"]), metrics["best_epoch"],
                        pct(reference.best_val_acc) if reference else "–",
                        (reference.best_epoch or "–") if reference else "–"])
    lines += ["## Summary", ""] + table(["run", "best validation acc", "epoch", "reference best", "reference epoch"], summary)
    groups = seed_groups(all_params.train)
    distinct = all_params.model_copy(update={"train": {run: all_params.train[run] for run in groups}})
    lines += [""] + data_section(all_params) + seed_section(all_params, groups) + comparison_sections(distinct, references)
    for run, cfg in distinct.train.items():
        lines += run_section(run, cfg, references.get(run))
    save_text(paths.report_md(), "\n".join(lines) + "\n")
    print(f"report: {paths.report_md()}")


if __name__ == "__main__":
    main()
