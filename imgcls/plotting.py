"""Matplotlib figures of the report (PNG), drawn by the stage that owns the data and logged
with DVCLive (Live.log_image). Colours: PALETTE, which the Vega templates in .dvc/plots use too."""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from imgcls.files import save_json  # noqa: E402

# Vega's "tableau10" scheme, in its order: class i (in params order) and the splits (train,
# validation) take the same colour here and in the Vega charts (.dvc/plots/*.json).
PALETTE = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b",
           "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")


def _image(fig) -> Image.Image:
    """The figure as a PNG image (what Live.log_image writes), trimmed to its contents."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer)


def learning_curves(history: list[dict], title: str) -> Image.Image:
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", color=PALETTE[0], label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", color=PALETTE[1], label="validation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    best = max(history, key=lambda row: row["val_acc"])
    axes[1].axvline(best["epoch"], color="grey", ls=":", lw=1)
    fig.suptitle(f"{title}: best validation accuracy {best['val_acc']:.2%} at epoch {best['epoch']}")
    return _image(fig)


def confusion(matrix: np.ndarray, classes: list[str], title: str) -> Image.Image:
    """Rows: true class, columns: predicted class (as the Vega chart)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.5, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                xticks_rotation=45 if len(classes) > 5 else 0)
    errors = int(matrix.sum() - np.trace(matrix))
    ax.set_title(f"{title}: {errors} errors of {int(matrix.sum())}")
    return _image(fig)


def tsne(panels: list[dict], classes: list[str], title: str) -> Image.Image:
    """One scatter per representation, coloured by true class; optional SVM line per panel.

    Each panel: {"name", "points" [N, 2], "labels" [N], optional "boundary" ((x0, x1), (y0, y1)) and "note"}.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, name in enumerate(classes):
            chosen = panel["labels"] == label
            ax.scatter(*panel["points"][chosen].T, s=4, alpha=0.7, color=PALETTE[label % len(PALETTE)], label=name)
        if panel.get("boundary") is not None:
            xs, ys = panel["boundary"]
            ax.plot(xs, ys, "k--", lw=1.5, label="linear SVM")
        ax.set_title(panel["name"] + (f" ({panel['note']})" if panel.get("note") else ""))
        ax.set_aspect("equal", adjustable="datalim")  # t-SNE distances mean the same along both axes
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    fig.suptitle(title)
    return _image(fig)


def live(directory: Path, summary: Path):
    """A DVCLive logger writing into `directory`, its summary (`Live.summary`, what `dvc metrics`
    reads) to `summary` rather than <directory>/metrics.json: the project keeps metrics under metrics/.
    dvcyaml=False: the stages declare their outputs in the root dvc.yaml, DVCLive never rewrites it."""
    from dvclive import Live  # imported late: only the stages that log need it

    class StageLive(Live):
        @property
        def metrics_file(self) -> str:
            return str(summary)

        def make_summary(self) -> None:
            """The summary exactly as the stage set it: DVCLive would add its step counter."""
            save_json(summary, self.summary)

    return StageLive(dir=str(directory), dvcyaml=False, save_dvc_exp=False)
