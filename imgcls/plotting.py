"""Matplotlib figures of the report (PNG), drawn by the stage that owns the data."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from imgcls.files import atomic_path  # noqa: E402


def _save(fig, target: Path) -> None:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def learning_curves(history: list[dict], title: str, target: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    best = max(history, key=lambda row: row["val_acc"])
    axes[1].axvline(best["epoch"], color="grey", ls=":", lw=1)
    fig.suptitle(f"{title}: best validation accuracy {best['val_acc']:.2%} at epoch {best['epoch']}")
    _save(fig, target)


def confusion(matrix: np.ndarray, classes: list[str], title: str, target: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.5, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                xticks_rotation=45 if len(classes) > 5 else 0)
    errors = int(matrix.sum() - np.trace(matrix))
    ax.set_title(f"{title}: {errors} errors of {int(matrix.sum())}")
    _save(fig, target)


def tsne(panels: list[dict], classes: list[str], title: str, target: Path) -> None:
    """One scatter per representation, coloured by true class; optional SVM line per panel.

    Each panel: {"name", "points" [N, 2], "labels" [N], optional "boundary" ((x0, x1), (y0, y1)) and "note"}.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 6), squeeze=False)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, panel in zip(axes[0], panels):
        for label, name in enumerate(classes):
            chosen = panel["labels"] == label
            ax.scatter(*panel["points"][chosen].T, s=4, alpha=0.7, color=colours(label % colours.N), label=name)
        if panel.get("boundary") is not None:
            xs, ys = panel["boundary"]
            ax.plot(xs, ys, "k--", lw=1.5, label="linear SVM")
        ax.set_title(panel["name"] + (f" ({panel['note']})" if panel.get("note") else ""))
        ax.set_aspect("equal", adjustable="datalim")  # t-SNE distances mean the same along both axes
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    fig.suptitle(title)
    _save(fig, target)
