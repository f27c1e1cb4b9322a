"""Every path the pipeline reads or writes, in one place (cookiecutter-data-science style).

Stages receive a study name (``mnist``) or a run name (``mnist``, ``avp_finetune``) and ask
this module where things live, so dvc.yaml and the code cannot drift apart silently.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
REFERENCE = ROOT / "reference.yaml"  # the practical's report figures: what the report compares against
SOURCES = ROOT / "sources"  # local data sources: a dependency of every download stage
COPIES_ENV = "IMGCLS_DATASETS"  # per-machine: a folder of local dataset copies, found by checksum
DATA = ROOT / "data"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"
REPORT = ROOT / "report"


def manifest(location: str) -> Path:
    """A data manifest named in params (`data.<study>.manifest`), relative to the repository."""
    return ROOT / location


def raw(study: str) -> Path:
    """Canonical raw copy of a study's data, whatever its source (written by download)."""
    return DATA / "raw" / f"{study}.npz"


def prepared(study: str) -> Path:
    """Decoded uint8 tensors and normalisation statistics (written by preprocess)."""
    return DATA / "prepared" / f"{study}.npz"


def data_summary(study: str) -> Path:
    """Counts, statistics, skipped files and cross-split duplicates of the prepared data (read by
    the report; not a metrics file, so `dvc metrics show` and `dvc exp show` stay about outcomes)."""
    return DATA / "prepared" / f"{study}.json"


def model(run: str) -> Path:
    return DATA / "models" / f"{run}.pt"


def exported(run: str) -> Path:
    """The run exported for serving (python -m imgcls.export <run>); not a pipeline output."""
    return DATA / "models" / f"{run}.pt2"


def architecture(run: str) -> Path:
    return DATA / "models" / f"{run}_architecture.csv"


def timing(run: str) -> Path:
    """Wall-clock times, device and precision of a training run: a plain output, not metrics
    (they change between identical runs, and `dvc metrics diff` must show outcomes only)."""
    return DATA / "models" / f"{run}_timing.json"


# Each stage of a run logs through DVCLive (imgcls.plotting.live) into a directory of its own,
# in DVCLive's layout: plots/metrics/<name>.tsv (a logged metric's history), plots/custom/<name>.json
# (Live.log_plot) and plots/images/<name> (Live.log_image); its summary (`dvc metrics`) goes to
# metrics/ (train_metrics, eval_metrics, tsne_metrics) instead of <directory>/metrics.json.
def live(run: str) -> Path:
    """DVCLive directory of train@<run>."""
    return PLOTS / run / "live"


def eval_live(run: str) -> Path:
    """DVCLive directory of embed@<run> (the evaluation on the validation set)."""
    return PLOTS / run / "eval"


def tsne_live(run: str) -> Path:
    """DVCLive directory of tsne@<run>."""
    return PLOTS / run / "tsne"


def live_plot(directory: Path, name: str) -> Path:
    return directory / "plots" / "custom" / f"{name}.json"


def live_image(directory: Path, name: str) -> Path:
    return directory / "plots" / "images" / name


def train_metrics(run: str) -> Path:
    """Outcomes of train@<run> (best and final accuracy, epochs, parameters): DVCLive's summary."""
    return METRICS / f"{run}.json"


def history(run: str) -> Path:
    """DVCLive's per-epoch TSV files of train@<run> (train/loss.tsv, val/acc.tsv, ...)."""
    return live(run) / "plots" / "metrics"


LEARNING_CURVES = ("loss", "accuracy")  # one chart each: train and validation per epoch


def learning_curve(run: str, metric: str) -> Path:
    """Rows {epoch, split, <metric>} for one learning-curve chart (Live.log_plot)."""
    return live_plot(live(run), metric)


def learning_curves_png(run: str) -> Path:
    return live_image(live(run), "learning_curves.png")


def embeddings(run: str) -> Path:
    return DATA / "embeddings" / f"{run}.npz"


def eval_metrics(run: str) -> Path:
    """Validation accuracy and errors of the best epoch's weights (embed's DVCLive summary)."""
    return METRICS / f"eval_{run}.json"


def confusion(run: str) -> Path:
    """Every (true, predicted) pair of classes with its count, zeros included: a square matrix."""
    return live_plot(eval_live(run), "confusion")


def confusion_png(run: str) -> Path:
    return live_image(eval_live(run), "confusion.png")


def tsne_points(run: str) -> Path:
    """Rows {representation, x, y, class, label} of the 2-D projections."""
    return live_plot(tsne_live(run), "tsne")


def tsne_png(run: str) -> Path:
    return live_image(tsne_live(run), "tsne.png")


def tsne_metrics(run: str) -> Path:
    """Linear separability of the 2-D projections (tsne's DVCLive summary)."""
    return METRICS / f"tsne_{run}.json"


def report_md() -> Path:
    return REPORT / "report.md"
